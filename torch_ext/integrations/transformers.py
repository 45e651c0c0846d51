"""Hugging Face transformers: what torch_ext.fuse needs to know about its modules.

- ACTIVATIONS: the classes of ``transformers.activations`` (what ``ACT2FN[...]`` gives) that
  compute one of FusedLinear's activations. Taken by class name, and fused only if they also pass
  fuse's numerical check (fuse/activations.py ``computes``), so that a release that changes a
  formula (FastGELUActivation's rounded constant, say) is not fused silently.
- ``Conv1D`` (GPT-2): a Linear whose weight is stored (in, out). GPT2MLP as a whole becomes
  fused_mlp on the transposed views (fuse/local.py); a Conv1D + activation pair elsewhere
  becomes FusedConv1D, which keeps the Parameter and hands its transposed view to fused_linear.
  Neither copies the weight.
- The causal-LM loss without logits (fuse_whole_model): see its section below.

Imported only when a model holds a transformers module.
"""
from __future__ import annotations

import ast
import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._common import divide_by_items
from ..fuse.forwards import unchanged
from ..fuse.rewrite import _fused_linear_from, fused_subclass, rebuilt
from ..linear_act import fused_linear
from ..linear_cross_entropy import linear_cross_entropy

MODULE_PREFIX = "transformers."

_SLOPE = 0.01
ACTIVATIONS = {
    "GELUActivation": ("gelu", _SLOPE),  # "gelu", "gelu_python"
    "NewGELUActivation": ("gelu_tanh", _SLOPE),  # "gelu_new" (GPT-2, T5 v1.1)
    "GELUTanh": ("gelu_tanh", _SLOPE),  # "gelu_pytorch_tanh" (Gemma)
    "PytorchGELUTanh": ("gelu_tanh", _SLOPE),  # its name in older releases
    "FastGELUActivation": ("gelu_tanh", _SLOPE),  # "gelu_fast": fused only if it matches gelu_tanh
    "AccurateGELUActivation": ("gelu_tanh", _SLOPE),  # "gelu_accurate": the tanh formula, spelled out
    "SiLUActivation": ("silu", _SLOPE),  # "silu" (Llama, Mistral, Qwen2)
    "QuickGELUActivation": ("quick_gelu", _SLOPE),  # "quick_gelu" (CLIP, X-CLIP, OWL-ViT, GroupViT)
    "BloomGelu": ("gelu_tanh", _SLOPE),  # BLOOM's MLP: the tanh formula (its own autograd Function in training)
}
# ("relu", "swish", "sigmoid", "tanh", "leaky_relu" give torch.nn's own classes: fuse's own table.)


def framework_class(cls) -> bool:
    """transformers' own base classes of every model, defined outside transformers.models
    (PreTrainedModel and its mixins: loading, saving, generation, adapters, parallelism). Their
    methods work on any model generically (modules(), submodules by names from a config or a
    checkpoint) and pass `self` to helpers, which makes fuse() assume they may call any layer;
    none calls a layer on data. So fuse() does not read them: otherwise every nn.Sequential inside
    a transformers model (Qwen2-VL's patch merger, SAM's feed-forward heads) is left alone."""
    return cls.__module__.startswith("transformers.") and not cls.__module__.startswith("transformers.models.")


def linear_like(module) -> bool:
    """Conv1D (GPT-2: weight stored (in, out)), or Falcon's FalconLinear: an nn.Linear subclass whose
    forward writes F.linear out (`input @ weight.T`, then `+ bias`), taken by name with a check
    of its class's numbers (_computes_linear), so that a changed forward is not fused silently."""
    cls = type(module)
    if cls is Conv1D:
        return True
    return (cls.__name__ == "FalconLinear" and cls.__module__.startswith(MODULE_PREFIX)
            and isinstance(module, nn.Linear) and _computes_linear(cls, module.bias is not None))


@functools.cache
def _computes_linear(cls, bias: bool) -> bool:
    """Whether a small instance of the nn.Linear subclass `cls` gives F.linear's output."""
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.device("cpu"), torch.no_grad():
            probe = cls(5, 3, bias=bias)
            x = torch.randn(4, 5, generator=gen)
            return torch.allclose(probe(x), F.linear(x, probe.weight, probe.bias), rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 (a class that cannot be built or run so is not taken)
        return False


class FusedConv1D(Conv1D):
    """transformers' Conv1D (weight (in, out), bias (out,)) followed by an activation, fused: the
    same Parameters and state_dict keys; fused_linear gets ``weight.t()``, a view."""

    def __init__(self, nf: int, nx: int, activation: str, negative_slope: float = _SLOPE):
        super().__init__(nf, nx)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, x):
        return fused_linear(x, self.weight.t(), self.bias, activation=self.activation,
                            negative_slope=self.negative_slope)

    def __repr__(self) -> str:
        return f"FusedConv1D(nf={self.nf}, nx={self.nx}, activation={self.activation!r})"


def fused_linear_like(module: nn.Module, spec) -> nn.Module:
    """A FusedConv1D holding a Conv1D's own weight and bias (built on meta: nothing allocated); for
    FalconLinear, a FusedLinear holding its Parameters."""
    if isinstance(module, nn.Linear):
        return _fused_linear_from(module, spec)
    with torch.device("meta"):
        fused = FusedConv1D(module.nf, module.nx, spec[0], spec[1])
    fused.weight, fused.bias = module.weight, module.bias
    return fused.train(module.training)


# --- the causal-LM loss without logits -------------------------------------------------------
#
# Design: XForCausalLM.forward does `logits = self.lm_head(hidden)` and then, with labels,
# `loss = self.loss_function(logits, labels, vocab_size, **kwargs)` (ForCausalLMLoss). Rather than
# copy each family's forward (which differ: caches, softcapping, output classes), fuse() keeps it
# and changes two things whose meaning it checks in the forward's source:
# - lm_head becomes CausalLMHead (an nn.Linear with the same Parameters): while its model's
#   forward runs with labels, it returns the hidden states it is given instead of the logits;
# - the model's loss_function (HF's own setter) becomes DeferredCausalLMLoss, which then computes
#   ForCausalLMLoss's value with linear_cross_entropy on those hidden states (shifted labels,
#   ignore_index, the sum over num_items_in_batch); with real logits it calls ForCausalLMLoss.
# The forward is accepted only if `logits` is used for nothing but the loss and the returned
# output (no scaling or slicing in between), so the two are exact; the one transformation allowed
# is Gemma 2's final-logit softcapping, exactly as its forward writes it (`if self.config.X is not
# None: logits = logits / self.config.X; logits = torch.tanh(logits); logits = logits *
# self.config.X`), which becomes linear_cross_entropy's softcap (a patch that dropped it would
# train a different model, silently). The model's class becomes a subclass whose forward sets the
# head's flag when labels are given (with the softcap read from the config, and the config's value
# set to None while the forward runs, so that the forward does not cap the hidden states) and
# returns logits=None then (return_logits=True: the original computation, logits and all).


class CausalLMHead(nn.Linear):
    """The LM head of a model fused by torch_ext.fuse: an nn.Linear (same Parameters, same
    state_dict keys) that, while `defer` is set by its model's forward, returns its input."""

    defer = False
    softcap = None  # the final-logit softcap of the forward that set `defer`

    def forward(self, input):
        return input if self.defer else super().forward(input)


class DeferredCausalLMLoss:
    """transformers' ForCausalLMLoss, computed from the hidden states when the head deferred."""

    def __init__(self, head: CausalLMHead):
        self.head = head

    def __call__(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                 **kwargs):
        from transformers.loss.loss_utils import ForCausalLMLoss

        if not self.head.defer:
            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                   ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        hidden = logits  # what the deferring head returned
        if shift_labels is None:
            # Shift so that tokens < n predict n, as ForCausalLMLoss does.
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        target = shift_labels.reshape(-1).to(hidden.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.head.weight, target,
                                    linear_bias=self.head.bias, reduction=reduction, ignore_index=ignore_index,
                                    softcap=self.head.softcap)
        # ForCausalLMLoss returns float32 (it upcasts the logits), and divides by
        # num_items_in_batch in float32. For bf16 / fp16 models linear_cross_entropy returns its
        # loss in their dtype, so the value is rounded to it (its gradients are not); float32
        # models get the same loss to float32 rounding.
        return divide_by_items(loss.float(), num_items_in_batch)


def _softcap_block(node, name: str):
    """The config attribute X if `node` is exactly Gemma 2's final-logit softcapping of `name`:
    if self.config.X is not None: name = name / self.config.X; name = torch.tanh(name);
    name = name * self.config.X. Else None."""
    def config_attr(n):
        if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "config"
                and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"):
            return n.attr
        return None

    def is_name(n):
        return isinstance(n, ast.Name) and n.id == name

    if not (isinstance(node, ast.If) and not node.orelse and len(node.body) == 3 and isinstance(node.test, ast.Compare)
            and len(node.test.ops) == 1 and isinstance(node.test.ops[0], ast.IsNot)
            and isinstance(node.test.comparators[0], ast.Constant) and node.test.comparators[0].value is None):
        return None
    attr = config_attr(node.test.left)
    if attr is None:
        return None
    first, second, third = node.body
    for stmt in node.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and is_name(stmt.targets[0])):
            return None
    ok = (isinstance(first.value, ast.BinOp) and isinstance(first.value.op, ast.Div) and is_name(first.value.left)
          and config_attr(first.value.right) == attr
          and isinstance(second.value, ast.Call) and len(second.value.args) == 1 and not second.value.keywords
          and is_name(second.value.args[0]) and isinstance(second.value.func, ast.Attribute)
          and second.value.func.attr == "tanh" and isinstance(second.value.func.value, ast.Name)
          and second.value.func.value.id == "torch"
          and isinstance(third.value, ast.BinOp) and isinstance(third.value.op, ast.Mult) and is_name(third.value.left)
          and config_attr(third.value.right) == attr)
    return attr if ok else None


def _lm_forward_problem(cls):
    """(why cls.forward's loss cannot come from the hidden states, or ""; the config attribute of
    its final-logit softcap, or None)."""
    from ..fuse.source import parsed

    tree = parsed(cls.forward)
    if tree is None:
        return f"the source of {cls.__name__}.forward is not available", None
    heads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_self(n.func, "lm_head")]
    losses = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_self(n.func, "loss_function")]
    if len(heads) != 1 or len(losses) != 1:
        return f"{cls.__name__}.forward does not call self.lm_head and self.loss_function once each", None
    def is_head(value):  # self.lm_head(h), or self.lm_head(h).contiguous() (OPT): the same values
        if (isinstance(value, ast.Call) and not value.args and not value.keywords
                and isinstance(value.func, ast.Attribute) and value.func.attr == "contiguous"):
            value = value.func.value
        return value is heads[0]

    assign = next((n for n in ast.walk(tree) if isinstance(n, ast.Assign) and is_head(n.value)), None)
    if assign is None or len(assign.targets) != 1 or not isinstance(assign.targets[0], ast.Name):
        return f"{cls.__name__}.forward does not assign self.lm_head's output to a name", None
    name = assign.targets[0].id
    call = losses[0]
    given = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "logits"), None)
    if not (isinstance(given, ast.Name) and given.id == name):
        return f"{cls.__name__}.forward does not pass {name} to self.loss_function as the logits", None
    # `logits` may only go to the loss and into the returned output (logits=logits), and through
    # one final-logit softcapping block.
    allowed = {id(given)}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "logits" and isinstance(node.value, ast.Name):
            allowed.add(id(node.value))
    caps = [(n, attr) for n in ast.walk(tree) for attr in [_softcap_block(n, name)] if attr is not None]
    if len(caps) > 1:
        return f"{cls.__name__}.forward softcaps {name} more than once", None
    softcap_attr = caps[0][1] if caps else None
    for block, _ in caps:
        allowed.update(id(n) for n in ast.walk(block) if isinstance(n, ast.Name) and n.id == name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == name and node is not assign.targets[0] and id(node) not in allowed:
            return (f"{cls.__name__}.forward does more with {name} than the loss (line {node.lineno} of its source)",
                    None)
    return "", softcap_attr


def _is_self(node, attr: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _causal_lm_class(cls):
    """A subclass of cls whose forward defers the LM head when labels are given (see above)."""
    signature = inspect.signature(cls.forward)
    softcap_attr = _lm_forward_problem(cls)[1]

    def forward(self, *args, return_logits: bool = False, **kwargs):
        bound = signature.bind_partial(self, *args, **kwargs)
        labels = bound.arguments.get("labels", bound.arguments.get("kwargs", {}).get("labels"))
        head = self.lm_head
        # A head replaced or hooked since fuse() (an adapter's wrapper, a hook on the logits) gets
        # the original forward: deferring would hand its hooks the hidden states.
        if labels is None or return_logits:
            return super(fused_cls, self).forward(*args, **kwargs)
        if not unchanged(head, CausalLMHead):
            warnings.warn(f"torch_ext.fuse: {cls.__name__}.lm_head was replaced or hooked after fuse(); the loss comes "
                          "from its logits, unfused (apply such changes before fuse(), which then leaves the head "
                          "alone)", stacklevel=2)
            return super(fused_cls, self).forward(*args, **kwargs)
        # The output's logits field is taken out below, so the forward must give a ModelOutput:
        # ask for one where a tuple was asked for (return_dict is the forward's own argument,
        # or can_return_tuple's), and make the tuple here.
        return_dict = kwargs.pop("return_dict", None)
        want_tuple = return_dict is False or (
            return_dict is None and getattr(self.config, "return_dict", True) is False
        )
        if return_dict is not None or want_tuple:
            kwargs["return_dict"] = True
        head.defer = True
        head.softcap = getattr(self.config, softcap_attr) if softcap_attr else None
        if head.softcap is not None:  # the loss caps the logits; the forward must not cap the hidden states
            setattr(self.config, softcap_attr, None)
        try:
            out = super(fused_cls, self).forward(*args, **kwargs)
        finally:
            if head.softcap is not None:
                setattr(self.config, softcap_attr, head.softcap)
            head.defer, head.softcap = False, None
        if not (hasattr(out, "items") and "logits" in out):
            raise RuntimeError(
                f"torch_ext.fuse: {cls.__name__}.forward returned {type(out).__name__}, not a ModelOutput with logits; "
                "call it with return_dict=True or return_logits=True"
            )
        out = type(out)(**{k: v for k, v in out.items() if k != "logits"})  # logits=None
        return out.to_tuple() if want_tuple else out

    # generate() and others read the forward's parameters (logits_to_keep, cache...): the
    # original ones, plus return_logits before **kwargs.
    params = list(signature.parameters.values())
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
    at = len(params) - (params[-1].kind is inspect.Parameter.VAR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=params[:at] + [extra] + params[at:])
    forward.__doc__ = cls.forward.__doc__

    fused_cls = fused_subclass(
        cls, f"{cls.__name__} whose loss, given labels, comes from torch_ext.linear_cross_entropy on the hidden "
        "states (logits are then None; return_logits=True computes them).", _rebuild_causal_lm, (), forward)
    return fused_cls


def _rebuild_causal_lm(cls, state):
    return rebuilt(_causal_lm_class(cls), state)


def fuse_whole_model(model: nn.Module, where: str):
    """Make `model`'s loss come from linear_cross_entropy on the hidden states (see above).
    Returns (replaced line, "") or ("", why not) or ("", "") when this is no causal LM."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING

    head = getattr(model, "lm_head", None)
    if (not isinstance(model, PreTrainedModel) or not isinstance(head, nn.Linear)
            or "labels" not in inspect.signature(type(model).forward).parameters):
        return "", ""
    if isinstance(head, CausalLMHead):
        return "", ""  # fused already
    label = f"{where} ({type(model).__name__}.lm_head, its loss)"
    if type(head) is not nn.Linear:
        return "", f"{label}: lm_head is a {type(head).__name__}, not an nn.Linear"
    # What PreTrainedModel.loss_function would give (read without it: it warns when loss_type is None).
    loss_type = getattr(model, "loss_type", None)
    loss = LOSS_MAPPING.get(loss_type) if loss_type in LOSS_MAPPING else LOSS_MAPPING.get("ForCausalLM")
    if "_loss_function" in vars(model) or loss is not LOSS_MAPPING.get("ForCausalLM"):
        return "", f"{label}: its loss_function is not transformers' ForCausalLMLoss"
    if model._forward_hooks or model._forward_pre_hooks or head._forward_hooks or head._forward_pre_hooks:
        return "", f"{label}: the model or its lm_head has hooks"
    why, softcap_attr = _lm_forward_problem(type(model))
    if why:
        return "", f"{label}: {why}"
    with torch.device("meta"):
        new_head = CausalLMHead(head.in_features, head.out_features, bias=head.bias is not None)
    new_head.weight, new_head.bias = head.weight, head.bias
    new_head.train(head.training)
    model.lm_head = new_head
    model.loss_function = DeferredCausalLMLoss(new_head)
    model.__class__ = _causal_lm_class(type(model))
    capped = f", softcap=config.{softcap_attr}" if softcap_attr else ""
    return (f"{label} -> torch_ext.linear_cross_entropy{capped} on the hidden states when labels are given "
            "(logits None)", "")
