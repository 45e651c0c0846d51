"""Helpers shared by the op-family test files: per-dtype tolerances, an ``assert_close`` that
applies them, a recorder of the bytes autograd saves, and a runner for subprocess checks under
each ``ATEN_CPU_CAPABILITY``."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
from torch import Tensor, nn

# (rtol, atol) per dtype of the tensor under test. The reference is always PyTorch's own ops:
# - float64 / float32: the same computation in the same dtype; only summation order and the
#   activation formulas' rounding differ.
# - bfloat16: a float32 reference computed from the *same* bfloat16 values upcast (see
#   reference_dtype). The op under test rounds its GEMM result and its output to bfloat16, so it
#   is a few bf16 ulps (2**-8 = 3.9e-3 relative) off the exact result; 1.6e-2 allows ~4 ulps.
# - float16: the same float32 reference, rounded to float16 before the comparison: float16's range
#   ends at 65504, and a result beyond it is inf in the op and in PyTorch's float16 ops alike. The
#   same ~4 ulps (2**-10 = 9.8e-4 relative) as bfloat16's: a gradient summed from float16-rounded
#   terms (a broadcast target's) is that far off in PyTorch's own float16 ops too.
# atol is relative to the magnitude of the expected tensor (see assert_close's `scale`), so
# reductions over many elements (weight and bias gradients) are judged at their own scale.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (4e-3, 2.5e-3),
}


def default_device_type() -> str:
    """The type of the device a test's tensors are created on: "cpu", or "cuda" in the CUDA case of
    an every_device test (tests/devices.py), e.g. for ``torch.autocast(default_device_type(), ...)``."""
    return torch.get_default_device().type


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(rtol, atol) for results of dtype `dtype`."""
    return TOLERANCES[dtype]


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute PyTorch's reference in for inputs of `dtype`: float32 for the reduced
    precision types (from the same low-precision values, upcast), else `dtype` itself.

    Why not the bfloat16 eager result: eager bf16 rounds twice (after the GEMM and after the
    activation) and its own error is as large as the one we want to bound; comparing two noisy
    results needs a tolerance that is the sum of both. The float32 result from the same bf16
    inputs is the exact answer up to float32 rounding, so the tolerance bounds our error alone.
    """
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def assert_close(
    actual: Optional[Tensor],
    expected: Optional[Tensor],
    *,
    dtype: Optional[torch.dtype] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    scale: Optional[float] = None,
    equal_nan: bool = False,
    check_dtype: bool = True,
    msg: str = "",
) -> None:
    """torch.testing.assert_close with the tolerance of `dtype` (default: actual's dtype).

    Values are compared in float64, so `expected` may be a higher-precision reference. atol is
    multiplied by `scale` (default: max(1, the largest finite |expected|)). With check_dtype,
    `actual` must have `dtype` when given, else expected's dtype. None matches only None.
    """
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{msg}: one is None: {actual!r} vs {expected!r}"
        return
    if check_dtype:
        want = dtype if dtype is not None else expected.dtype
        assert actual.dtype == want, f"{msg}: dtype {actual.dtype}, expected {want}"
    dtype = dtype or actual.dtype
    if actual.dtype == torch.float16 and expected.is_floating_point():
        expected = expected.to(torch.float16)  # see TOLERANCES: overflow to inf as float16 does
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    default_rtol, default_atol = tolerance(dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if scale is None:
        finite = expected[torch.isfinite(expected)] if expected.is_floating_point() else expected
        scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=rtol,
        atol=atol * scale,
        equal_nan=equal_nan,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SavedTensorBytes:
    """Context manager recording the tensors autograd saves for backward (through
    torch.autograd.graph.saved_tensors_hooks). ``bytes_excluding(tensors)`` sums the storage
    bytes of those that share storage with none of `tensors` (e.g. the op's inputs/parameters),
    each storage counted once."""

    def __init__(self) -> None:
        self.saved = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        self.saved.append(t)
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def bytes_excluding(self, tensors: Iterable[Optional[Tensor]]) -> int:
        excluded = {storage_key(t) for t in tensors if t is not None}
        seen: Dict[int, int] = {}
        for t in self.saved:
            key = storage_key(t)
            if key not in excluded:
                seen[key] = t.untyped_storage().nbytes()
        return sum(seen.values())


CPU_CAPABILITY_LEVELS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def cpu_supports(capability: str) -> bool:
    """Whether this CPU executes `capability`'s instructions. ATEN_CPU_CAPABILITY alone does not
    tell: torch honours ATEN_CPU_CAPABILITY=avx512 on a CPU without AVX-512 (it reports AVX512 and
    its own kernels, like ours, then die of SIGILL), so the hardware is asked directly."""
    hardware = {"DEFAULT": True, "AVX2": torch.cpu._is_avx2_supported(), "AVX512": torch.cpu._is_avx512_supported()}
    return hardware[capability.upper()]


def run_python(code: str, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` with this interpreter in a fresh process (env added to os.environ)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    # cwd is tests/, so that `import torch_ext` finds the installed package and not the
    # uncompiled source folder at the repository root.
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )


def leaf(t: Optional[Tensor], dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """A leaf requiring grad with t's values *and strides* (detach keeps the layout), cast to
    dtype when given; None stays None."""
    if t is None:
        return None
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.requires_grad_()


def act_fn(activation: str, negative_slope: float = 0.01):
    """PyTorch's own activation (torch_ext.ACTIVATIONS names), as a function of its input."""
    return {
        "none": lambda t: t,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, negative_slope),
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "quick_gelu": quick_gelu,
    }[activation]


def quick_gelu(t):
    """CLIP's QuickGELU as transformers writes it (PyTorch has no op of its own for it)."""
    return t * torch.sigmoid(1.702 * t)


class QuickGELU(nn.Module):
    def forward(self, t):
        return quick_gelu(t)


def act_module(activation: str, negative_slope: float = 0.01) -> nn.Module:
    """PyTorch's own activation module for a torch_ext.ACTIVATIONS name."""
    return {
        "none": nn.Identity(),
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(negative_slope),
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"),
        "silu": nn.SiLU(),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
        "quick_gelu": QuickGELU(),
    }[activation]


class BackwardOpMasks(torch.utils._python_dispatch.TorchDispatchMode):
    """``with BackwardOpMasks(op) as masks:`` records the output_mask (last argument) of each call
    of the op `op` (an OpOverload), whether Python or a C++ autograd node calls it."""

    def __init__(self, op):
        super().__init__()
        self.op, self.masks = op, []

    def __enter__(self):
        super().__enter__()
        return self.masks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op:
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


class LossDtypeCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Within ``with LossDtypeCalls(op, position) as recorder:``, ``recorder.calls`` gets (first
    input's dtype, loss_dtype) of each call of the torch_ext op `op` (e.g. "cross_entropy_fwd"),
    whose loss_dtype is positional argument `position` or a keyword."""

    def __init__(self, op: str, position: int):
        super().__init__()
        self.op, self.position, self.calls = f"torch_ext::{op}", position, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.name() == self.op:
            loss_dtype = args[self.position] if len(args) > self.position else kwargs.get("loss_dtype")
            self.calls.append((args[0].dtype, loss_dtype))
        return func(*args, **kwargs)


def check_reads_16_bit_under_autocast(op: str, position: int, path: str, fn, reference, args, ref_args, leaves,
                                      ref_leaves, **kwargs) -> None:
    """A loss under bfloat16 autocast, given bfloat16 inputs: ``fn(*args, **kwargs)`` (path
    "compiled": through torch.compile; else recorded, "no_grad" under no_grad) must call the op
    `op` once with them as they are and loss_dtype float32 (argument `position`), and return
    ``reference(*ref_args, **kwargs)``'s float32 loss to float32 rounding; then (but for no_grad)
    the gradients of `leaves`, bfloat16, those of `ref_leaves` within a bfloat16 ulp."""
    recorder = LossDtypeCalls(op, position)
    run = torch.compile(fn, fullgraph=True, backend="aot_eager") if path == "compiled" else fn
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        if path == "compiled":
            y = run(*args, **kwargs)
        else:
            with recorder, torch.no_grad() if path == "no_grad" else contextlib.nullcontext():
                y = run(*args, **kwargs)
        y_ref = reference(*ref_args, **kwargs)
    if path != "compiled":
        assert recorder.calls == [(torch.bfloat16, torch.float32)], recorder.calls
    assert y.dtype == y_ref.dtype == torch.float32
    assert_close(y, y_ref, msg=f"{path}: autocast loss")
    if path == "no_grad":
        return
    g = torch.rand(y.shape) + 0.5
    for i, (got, want) in enumerate(zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, ref_leaves, g))):
        assert got.dtype == want.dtype == torch.bfloat16, i
        assert_close(got, want, dtype=torch.bfloat16, msg=f"{path}: autocast gradient {i}")
