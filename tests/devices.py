"""The devices the tests run on.

"cpu" always runs; "cuda" is skipped with a reason where no GPU (or no CUDA build of torch_ext)
is present. TORCH_EXT_TEST_DEVICES (default "cpu,cuda") picks them: scripts/gpu_check.sh sets it
to "cuda", so a GPU's time goes to the CUDA cases only.

Two ways a test file runs on every device:
* test_common.py and test_cuda.py take a `device` argument (parametrize over DEVICES or
  DEVICE_DTYPES) and create their tensors on it;
* the op-family files (test_cross_entropy.py, ...) say `pytestmark = pytest.mark.every_device`:
  conftest.py runs each of their tests once per device of DEVICES with that device as torch's
  default (`with torch.device(...)`), so the tensors a test creates without naming a device are
  on it, and the references it computes run PyTorch's own ops there. A test of the CPU runtime
  itself (its instruction sets, allocator, threads, a subprocess) is marked
  `cpu_only("why")` and runs once, on the CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

import torch_ext  # noqa: F401  (registers the ops the check below asks about)

HAS_CUDA = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "torch_ext::cross_entropy_fwd", "CUDA"
)
_ALL_DEVICES = {
    "cpu": "cpu",
    "cuda": pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not HAS_CUDA,
            reason="no CUDA GPU, or torch_ext built without CUDA kernels (TORCH_EXT_CUDA=1 on a CUDA build of torch)",
        ),
    ),
}
_chosen = [d.strip() for d in os.environ.get("TORCH_EXT_TEST_DEVICES", "cpu,cuda").split(",") if d.strip()]
if not _chosen or set(_chosen) - set(_ALL_DEVICES):
    raise ValueError(f"TORCH_EXT_TEST_DEVICES must list cpu and/or cuda, comma-separated; got {_chosen}")
DEVICES = [_ALL_DEVICES[d] for d in _chosen]
CPU_CHOSEN = "cpu" in _chosen
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and torch_ext's CUDA kernels")


def dtypes_for(device):
    """The floating dtypes the ops take on `device`: the same four on every device."""
    return [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _device_dtypes():
    params = []
    for device in DEVICES:
        name, marks = (device, ()) if isinstance(device, str) else (device.values[0], device.marks)
        for dtype in dtypes_for(name):
            params.append(pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype).removeprefix('torch.')}"))
    return params


# (device, dtype) for every dtype each device takes: parametrize("device,dtype", DEVICE_DTYPES).
DEVICE_DTYPES = _device_dtypes()
