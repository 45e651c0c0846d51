"""``torch_ext.fuse(model)``: swap the fused modules into a model that was written with torch.nn.

What it replaces:
- an ``nn.Linear`` whose output goes only into a supported activation (``nn.ReLU``,
  ``nn.LeakyReLU``, ``nn.GELU`` in both modes, ``nn.SiLU``, ``nn.Sigmoid``, ``nn.Tanh``, or their
  functional forms) becomes a ``FusedLinear`` with that activation, holding the same Parameter
  objects. It finds the pair
  - in ``nn.Sequential`` (the activation's slot becomes ``nn.Identity``),
  - in ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (``linear1`` and the
    layer's activation, which becomes ``nn.Identity``),
  - in the ``forward`` of any other module that ``torch.fx`` can trace: the module keeps its
    class (as a subclass with the traced forward, minus the activation call), its submodules
    and its state_dict.
- loss modules (``CrossEntropyLoss``, ``MSELoss``, ``HuberLoss``, ``SmoothL1Loss``,
  ``TripletMarginLoss``) become torch_ext's, which subclass them.

A Linear used in several places is replaced only if every use is followed by the same
activation; one used where fuse() cannot see what follows it (a module fx cannot trace, a
built-in module other than the two above) is left alone. Subclasses of nn.Linear and modules
with hooks are left alone too (their forward or hooks could depend on the class). Everything
left alone is listed, with the reason, in the report.

Files: core.py (fuse() itself), activations.py (the activation table), source.py (reading a
module's source), traced.py (the fx path over a whole model), rewrite.py (swapping modules,
traced forwards), losses.py (loss modules), report.py (FuseReport).
"""
from .core import fuse
from .report import FuseReport

__all__ = ["FuseReport", "fuse"]
