"""torch_ext: fused dense + activation and loss operators for PyTorch.

Swap ``torch.nn.functional`` calls for the same-named ones here, or modules for ours::

    import torch_ext
    y = torch_ext.fused_linear(x, weight, bias, activation="gelu")   # gelu(F.linear(x, w, b))
    layer = torch_ext.FusedLinear(512, 2048, activation="relu")       # Linear + ReLU
"""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers the torch.ops.torch_ext ops)
from .linear_act import ACTIVATIONS, FusedLinear, FusedLinearFunction, fused_linear
from .version import __version__


def cpu_capability() -> str:
    """Instruction set of the CPU kernels in use (DEFAULT, AVX2 or AVX512); follows
    ATEN_CPU_CAPABILITY like PyTorch's own kernels."""
    return _C.cpu_capability()


__all__ = [
    "ACTIVATIONS",
    "FusedLinear",
    "FusedLinearFunction",
    "cpu_capability",
    "fused_linear",
    "__version__",
]
