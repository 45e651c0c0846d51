"""``torch_ext.show_config()`` / ``python -m torch_ext``: what was built and what runs now; and the
run-time switches (``get_config`` / ``set_config`` / ``config``), held in one C++ object
(csrc/runtime_config.h, with their names, variables and rules) that reads their environment
variables once, at import."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

UNKNOWN = "unknown (torch_ext/_build_config.py missing: not built by setup.py)"


def build_config() -> dict:
    """The dict setup.py wrote next to the compiled module (torch_ext/_build_config.py)."""
    try:
        from ._build_config import BUILD_CONFIG
    except ImportError:  # a module built by hand, not by setup.py
        return {}
    return dict(BUILD_CONFIG)


def torch_mismatch(config: dict) -> str | None:
    """Why the torch now running differs from the one torch_ext was built against, or None.
    A C++ extension is tied to the torch it was compiled with (ABI): rebuild after upgrading."""
    built = config.get("torch")
    if built and built != torch.__version__:
        return (f"torch_ext was built against torch {built} but torch {torch.__version__} is running: "
                "reinstall torch_ext (pip install --no-build-isolation --force-reinstall --no-deps .)")
    return None


def _cuda_line(cfg: dict, compiled_with_cuda: bool) -> str:
    if not cfg:
        return "built" if compiled_with_cuda else "not built"
    if cfg.get("cuda"):
        return (f"built: CUDA {cfg.get('cuda_version')} toolkit at {cfg.get('cuda_home')} "
                f"(found from {cfg.get('cuda_home_from')})")
    return f"not built: {cfg.get('cuda_why_not')}"


def get_config() -> dict:
    """torch_ext's run-time switches and their current values: ``cpu_gemm``, ``panel_bytes``,
    ``cublaslt``, ``cpu_cache_bytes``. Each starts from its environment variable
    (``TORCH_EXT_CPU_GEMM``, ``TORCH_EXT_PANEL_BYTES``, ``TORCH_EXT_CUBLASLT``,
    ``TORCH_EXT_CPU_CACHE_BYTES``), read once when torch_ext is imported; after that only
    :func:`set_config` changes them.

    Example::

        >>> sorted(torch_ext.get_config())
        ['cpu_cache_bytes', 'cpu_gemm', 'cublaslt', 'panel_bytes']
    """
    from . import _C

    return _C._get_config()


def set_config(**changes) -> dict:
    """Change run-time switches (see :func:`get_config`); returns the previous values of those
    changed, so that ``set_config(**previous)`` restores them. Takes effect at the next op call,
    in every thread; lowering ``cpu_cache_bytes`` frees the cached blocks beyond it at once.

    Example::

        >>> previous = torch_ext.set_config(cpu_gemm="aten")
        >>> torch_ext.cpu_gemm()
        'aten'
        >>> _ = torch_ext.set_config(**previous)
    """
    from . import _C

    # The switches' names and rules live in C++ (csrc/runtime_config.h); it checks every change
    # before applying any, so a refused call changes nothing.
    return _C._set_config(changes)


@contextlib.contextmanager
def config(**changes):
    """A context manager: :func:`set_config` on entry, the previous values restored on exit.

    Example::

        >>> with torch_ext.config(cpu_gemm="aten"):
        ...     torch_ext.cpu_gemm()
        'aten'
    """
    previous = set_config(**changes)
    try:
        yield
    finally:
        set_config(**previous)


def show_config() -> str:
    """One line per fact: torch_ext's version, the torch it was built against and the one
    running, whether the CUDA kernels were built (and why not), their archs, the CPU kernels'
    instruction set in use, which float32 CPU GEMM runs, and the build flags. Warns when the
    running torch is not the one it was built against.

    Example::

        >>> print(torch_ext.show_config().splitlines()[0])
        torch_ext ... at ...
    """
    from . import _C, __version__

    cfg = build_config()
    mismatch = torch_mismatch(cfg)
    if mismatch:
        warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
    built = (lambda key: cfg.get(key) or "-") if cfg else (lambda key: UNKNOWN)
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device(s))"
    else:
        device = "none (torch.cuda.is_available() is False)"
    rows = [
        ("torch_ext", f"{__version__} at {os.path.dirname(os.path.abspath(_C.__file__))}"),
        ("torch (built against)", built("torch")),
        ("torch (running)", torch.__version__ + (f"  MISMATCH: {mismatch}" if mismatch else "")),
        ("torch CUDA", torch.version.cuda or "none (CPU build of torch)"),
        ("CUDA kernels", _cuda_line(cfg, _C.built_with_cuda())),
        ("CUDA archs", built("cuda_archs")),
        ("CUDA runtime linked", built("cudart")),
        ("cuBLASLt linked", built("cublaslt")),
        ("CUDA device", device),
        ("CPU capability", f"{_C.cpu_capability()} in use, of {', '.join(cfg.get('cpu_capabilities', ['?']))} "
                           "built (ATEN_CPU_CAPABILITY overrides)"),
        ("CPU float32 GEMM", f"{_C.cpu_gemm()} (set_config(cpu_gemm=...) or TORCH_EXT_CPU_GEMM=ours|aten|auto)"),
        *((f"CPU {dtype} GEMM", "ATen's (oneDNN)" if _C._cpu_16bit_gemm(dtype) == "aten" else
           f"float32 products of the {dtype} values (no {needs}: ATen's {dtype} GEMM runs far below its float32 "
           "one here)")
          for dtype, needs in (("bfloat16", "AVX512-BF16"), ("float16", "AVX-512 FP16"))),
        ("run-time config", ", ".join(f"{k}={v}" for k, v in get_config().items())),
        ("C++ flags", " ".join(cfg["cxx_flags"] + [f"(CPU kernels: + {f})" for f in cfg.get("cpu_kernel_flags", [])])
         if cfg else UNKNOWN),
        ("nvcc flags", " ".join(cfg.get("nvcc_flags") or ["-"]) if cfg else UNKNOWN),
        ("TORCH_EXT_CUDA at build", built("cuda_mode")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
