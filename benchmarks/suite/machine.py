"""What a result file records about where and when it was measured."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import List, Optional, Tuple

import torch


def git_commit(path: str) -> Tuple[Optional[str], Optional[bool]]:
    """(commit hash, whether the work tree has uncommitted changes) of the git checkout holding
    `path`; (None, None) outside one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages (runnable processes; compare with the core count)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str = "cpu") -> dict:
    import torch_ext

    info = {
        "torch": torch.__version__,
        "torch_ext": torch_ext.__version__,
        "torch_ext_path": os.path.dirname(torch_ext.__file__),  # which build was measured
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch_ext.cpu_capability(),
        "cpu_gemm": torch_ext.cpu_gemm(),
        # How the CPU ops multiply 16-bit matrices: "aten" (its GEMM of that dtype) or "float32".
        "cpu_16bit_gemm": {d: torch_ext._C._cpu_16bit_gemm(d) for d in ("bfloat16", "float16")},
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
