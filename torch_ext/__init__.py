"""torch_ext: fused dense + activation and loss operators for PyTorch.

Swap ``torch.nn.functional`` calls for the same-named ones here, or modules for ours::

    import torch_ext
    y = torch_ext.fused_linear(x, weight, bias, activation="gelu")   # gelu(F.linear(x, w, b))
    layer = torch_ext.FusedLinear(512, 2048, activation="relu")       # Linear + ReLU
    loss = torch_ext.cross_entropy(logits, target, label_smoothing=0.1)

Each function and class of ``__all__`` has its own docstring, with an example. The other names:
``ACTIVATIONS``, the activations of ``fused_linear`` and ``FusedLinear``; ``MLP_ACTIVATIONS``,
those of ``fused_mlp`` and ``FusedMLP`` (``ACTIVATIONS`` and the gated ones);
``GATED_ACTIVATIONS``, each gated activation -> the activation applied to its gate half (the
first half of fc1's output; the second half multiplies it); ``__version__``, this version.

Example::

    >>> torch_ext.ACTIVATIONS
    ('none', 'relu', 'leaky_relu', 'gelu', 'gelu_tanh', 'silu', 'sigmoid', 'tanh', 'quick_gelu')
    >>> torch_ext.GATED_ACTIVATIONS
    {'swiglu': 'silu', 'geglu': 'gelu', 'geglu_tanh': 'gelu_tanh'}
    >>> torch_ext.MLP_ACTIVATIONS == torch_ext.ACTIVATIONS + tuple(torch_ext.GATED_ACTIVATIONS)
    True
    >>> torch_ext.__version__
    '...'
"""
import os as _os
import sys as _sys

import torch  # noqa: F401  (loads libtorch before our extension)


def _installed_copy(source):
    """Another torch_ext folder on sys.path that holds the compiled module, or None."""
    for entry in _sys.path:
        folder = _os.path.join(_os.path.abspath(entry or _os.curdir), "torch_ext")
        if folder != source and _os.path.isdir(folder) and any(n.startswith("_C.") for n in _os.listdir(folder)):
            return folder
    return None


_here = _os.path.dirname(_os.path.abspath(__file__))
_installed = None if any(n.startswith("_C.") for n in _os.listdir(_here)) else _installed_copy(_here)
if _installed:
    # Python started in the repository root (`python -m pytest`, `python -m torch_ext`) found
    # the checkout's source folder first, which has no compiled module: the package meant is the
    # installed one, so its submodules (compiled ones included) come from there.
    __path__[:] = [_installed]

try:
    from . import _C  # noqa: F401  (registers the torch.ops.torch_ext ops)
except ImportError as _error:
    if _os.path.isfile(_os.path.join(_os.path.dirname(_here), "setup.py")):
        _why = (f"Python imported the source folder {_here} (the current folder comes first on sys.path), "
                "which has no compiled extension, and found no installed torch_ext. Install it: "
                "`pip install --no-build-isolation .` (or `-e .`, editable, which builds the extension in place).")
    else:
        _why = (f"{_error}. Reinstall torch_ext against the torch you run: "
                "`pip install --no-build-isolation --force-reinstall --no-deps <checkout>`.")
    raise ImportError(f"torch_ext: cannot load its compiled module torch_ext._C: {_why}") from None
from . import _config
from ._config import config, get_config, set_config, show_config
from .cross_entropy import CrossEntropyFunction, CrossEntropyLoss, cross_entropy
from .fuse import FuseReport, fuse
from .linear_act import ACTIVATIONS, FusedLinear, FusedLinearFunction, fused_linear
from .linear_cross_entropy import LinearCrossEntropyFunction, LinearCrossEntropyLoss, linear_cross_entropy
from .mlp import GATED_ACTIVATIONS, MLP_ACTIVATIONS, FusedMLP, FusedMLPFunction, fused_mlp
from .regression_loss import (
    HuberLoss,
    MSELoss,
    RegressionLossFunction,
    SmoothL1Loss,
    huber_loss,
    mse_loss,
    smooth_l1_loss,
)
from .triplet_margin_loss import TripletMarginLoss, TripletMarginLossFunction, triplet_margin_loss
from .version import __version__

if torch.version.cuda and not _C.built_with_cuda() and torch.cuda.is_available():
    # pip hides the build's own warning; say it where it matters, on a machine with a GPU.
    import warnings as _warnings

    _warnings.warn(
        "torch_ext was built without its CUDA kernels "
        f"({_config.build_config().get('cuda_why_not', 'see python -m torch_ext')}): its ops raise on CUDA tensors. "
        "Fix the cause and reinstall; `python -m torch_ext` shows the build.",
        RuntimeWarning,
        stacklevel=2,
    )


def cpu_capability() -> str:
    """Instruction set of the CPU kernels in use (DEFAULT, AVX2 or AVX512); follows
    ATEN_CPU_CAPABILITY like PyTorch's own kernels.

    Example::

        >>> torch_ext.cpu_capability() in ("DEFAULT", "AVX2", "AVX512")
        True
    """
    return _C.cpu_capability()


def cpu_gemm() -> str:
    """Which GEMM float32 CPU products of 32 rows or more run on now: "ours" (torch_ext's AVX2 /
    AVX-512 kernel, the default on AMD CPUs running the AVX-512 kernels, where it was measured faster
    than ATen's) or "aten".
    ``set_config(cpu_gemm="ours" | "aten" | "auto")`` (or TORCH_EXT_CPU_GEMM, read at import)
    overrides the default.

    Example::

        >>> torch_ext.cpu_gemm() in ("ours", "aten")
        True
    """
    return _C.cpu_gemm()


def empty_cache() -> int:
    """Return the CPU output buffers torch_ext keeps for reuse (large gradients and outputs
    freed by PyTorch, up to the config's cpu_cache_bytes, default 2 GiB) to the system, like
    torch.cuda.empty_cache(). Returns the bytes released.

    Example::

        >>> released = torch_ext.empty_cache()
        >>> torch_ext.cached_bytes()
        0
    """
    return _C.empty_cache()


def cached_bytes() -> int:
    """Bytes held in CPU output buffers kept for reuse (see empty_cache).

    Example::

        >>> torch_ext.cached_bytes() >= 0
        True
    """
    return _C.cached_bytes()


__all__ = [
    "ACTIVATIONS",
    "CrossEntropyFunction",
    "CrossEntropyLoss",
    "FuseReport",
    "FusedLinear",
    "FusedLinearFunction",
    "FusedMLP",
    "FusedMLPFunction",
    "GATED_ACTIVATIONS",
    "MLP_ACTIVATIONS",
    "HuberLoss",
    "LinearCrossEntropyFunction",
    "LinearCrossEntropyLoss",
    "MSELoss",
    "RegressionLossFunction",
    "SmoothL1Loss",
    "TripletMarginLoss",
    "TripletMarginLossFunction",
    "cached_bytes",
    "cpu_capability",
    "cpu_gemm",
    "config",
    "empty_cache",
    "get_config",
    "set_config",
    "show_config",
    "cross_entropy",
    "fuse",
    "fused_linear",
    "fused_mlp",
    "huber_loss",
    "linear_cross_entropy",
    "mse_loss",
    "smooth_l1_loss",
    "triplet_margin_loss",
    "__version__",
]
