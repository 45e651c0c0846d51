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
  - where the fx path cannot rewrite a module (code above it it cannot read, or a library
    module whose own forward it cannot trace), in that module on its own, read from its
    forward's source (local.py): a Linear -> activation module pair (FusedLinear, the activation
    nn.Identity); ``fc1 -> act -> fc2`` statements (``fused_mlp``); a gated MLP
    ``down(act(gate(x)) * up(x))`` (``fused_mlp`` swiglu / geglu / geglu_tanh; the activation a
    module or a function such as F.silu; taken over the fx path's pairs in a traced model too,
    as it fuses more, and so are fc1 -> act -> fc2 statements that are a module's whole
    forward), its variant on one
    [gate; up] Linear (``gate, up = self.gate_up(x).chunk(2, dim=-1)``) or gated product (one
    GEMM and the gated activation). This is how it reaches Hugging Face models
    (BertIntermediate, ViTMLP, LlamaMLP, Phi3MLP, ModernBertMLP, T5DenseActDense,
    T5DenseGatedActDense, GPT2MLP with its Conv1D, CLIPMLP). A module is swapped there only if no
    method of the module or of any module above it names it (an attribute chain or a string), so
    no other code can call it directly. An edited or replaced forward swaps nothing: code above
    that names its layers (CLIP's _init_weights) still finds them as they were, and only an edit
    of three statements needs its class's other methods not to name them. Where a source cannot
    be read, it is left alone.
- activations of other libraries (transformers.activations' GELUActivation, NewGELUActivation,
  SiLUActivation..., timm's, open_clip's QuickGELU) are known by class name in
  torch_ext/integrations, in traced forwards, nn.Sequential slots and rewritten modules alike, and
  accepted only if they also compute the activation numerically at fuse time
  (activations.computes).
- loss modules (``CrossEntropyLoss``, ``MSELoss``, ``HuberLoss``, ``SmoothL1Loss``,
  ``TripletMarginLoss``, ``LinearCrossEntropyLoss``) become torch_ext's, which subclass them.
- a transformers causal LM (``...ForCausalLM``, ``GPT2LMHeadModel``) computes its loss with
  ``linear_cross_entropy`` on the hidden states when given labels, and returns logits=None then
  (torch_ext/integrations/transformers.py).

A Linear used in several places is replaced only if every use is followed by the same
activation; one used where fuse() cannot see what follows it (a module fx cannot trace, a
built-in module other than the two above) is left alone. Subclasses of nn.Linear and modules
with hooks are left alone too (their forward or hooks could depend on the class). Everything
left alone is listed, with the reason, in the report.

Files: core.py (fuse() itself), activations.py (the activation table and the numerical check),
source.py (reading a module's source), traced.py (the fx path over a whole model, the traced
forwards), local.py (rewriting one module from its source), forwards.py (the forwards local.py
gives a module), rewrite.py (swapping modules; the rewritten classes and how they pickle: as the
original class plus what was changed, with no source to execute on load), losses.py (loss
modules), report.py (FuseReport).
What is specific to one library is in torch_ext/integrations/<library>.py, imported only when a
model holds that library's modules.
"""
from .core import fuse
from .report import FuseReport

__all__ = ["FuseReport", "fuse"]
