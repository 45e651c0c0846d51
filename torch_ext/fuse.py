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
"""
from __future__ import annotations

import copy
import logging
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .cross_entropy import CrossEntropyLoss
from .linear_act import FusedLinear
from .regression_loss import HuberLoss, MSELoss, SmoothL1Loss
from .triplet_margin_loss import TripletMarginLoss

logger = logging.getLogger("torch_ext.fuse")

Spec = Tuple[str, float]  # (FusedLinear activation, negative_slope)
_DEFAULT_SLOPE = 0.01


@dataclass
class FuseReport:
    """What ``fuse`` replaced and what it left alone (one line each, by module path)."""

    replaced: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"torch_ext.fuse: replaced {len(self.replaced)}, left alone {len(self.skipped)}"]
        lines += [f"  replaced  {r}" for r in self.replaced]
        lines += [f"  left      {s}" for s in self.skipped]
        return "\n".join(lines)


# --- activations -----------------------------------------------------------------------------

def _module_spec(module) -> Optional[Spec]:
    """The FusedLinear activation equal to this activation module (exact classes only: a subclass
    may change forward)."""
    kind = type(module)
    if kind is nn.ReLU:
        return ("relu", _DEFAULT_SLOPE)
    if kind is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope))
    if kind is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu", _DEFAULT_SLOPE)
    if kind is nn.SiLU:
        return ("silu", _DEFAULT_SLOPE)
    if kind is nn.Sigmoid:
        return ("sigmoid", _DEFAULT_SLOPE)
    if kind is nn.Tanh:
        return ("tanh", _DEFAULT_SLOPE)
    return None


def _callable_spec(fn) -> Optional[Spec]:
    """A Transformer layer's `activation`: F.relu / F.gelu (what its string options give), or a module."""
    if fn is F.relu or fn is torch.relu:
        return ("relu", _DEFAULT_SLOPE)
    if fn is F.gelu:
        return ("gelu", _DEFAULT_SLOPE)
    if isinstance(fn, nn.Module):
        return _module_spec(fn)
    return None


_FUNCTION_ACTIVATIONS: Dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu",
    torch.sigmoid: "sigmoid", torch.tanh: "tanh",
}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "tanh": "tanh", "tanh_": "tanh"}


def _node_spec(node: torch.fx.Node, owner: nn.Module) -> Optional[Spec]:
    """The activation a traced node applies to its first argument, or None."""
    if node.op == "call_module":
        return _module_spec(owner.get_submodule(node.target))
    if node.op == "call_method" and node.target in _METHOD_ACTIVATIONS and len(node.args) == 1 and not node.kwargs:
        return (_METHOD_ACTIVATIONS[node.target], _DEFAULT_SLOPE)
    if node.op != "call_function" or node.target not in _FUNCTION_ACTIVATIONS:
        return None
    name = _FUNCTION_ACTIVATIONS[node.target]
    extra = dict(node.kwargs)
    extra.pop("inplace", None)  # in place on a tensor nothing else reads: the same result
    if name == "leaky_relu":
        slope = node.args[1] if len(node.args) > 1 else extra.pop("negative_slope", _DEFAULT_SLOPE)
        if not isinstance(slope, (int, float)) or len(node.args) > 3 or extra:
            return None
        return ("leaky_relu", float(slope))
    if name == "gelu":
        approximate = node.args[1] if len(node.args) > 1 else extra.pop("approximate", "none")
        if approximate not in ("none", "tanh") or extra:
            return None
        return ("gelu_tanh" if approximate == "tanh" else "gelu", _DEFAULT_SLOPE)
    if len(node.args) > (2 if name in ("relu", "silu") else 1) or extra:
        return None
    return (name, _DEFAULT_SLOPE)


def _describe(spec: Spec) -> str:
    return f"{spec[0]}, negative_slope={spec[1]}" if spec[0] == "leaky_relu" else spec[0]


# --- losses ----------------------------------------------------------------------------------

def _fused_loss(module: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """torch_ext's loss module equal to `module`, or (None, why not)."""
    kind = type(module)
    if kind is nn.CrossEntropyLoss:
        new = CrossEntropyLoss(weight=module.weight, ignore_index=module.ignore_index,
                               reduction=module.reduction, label_smoothing=module.label_smoothing)
    elif kind is nn.MSELoss:
        new = MSELoss(reduction=module.reduction)
    elif kind is nn.HuberLoss:
        new = HuberLoss(reduction=module.reduction, delta=module.delta)
    elif kind is nn.SmoothL1Loss:
        new = SmoothL1Loss(reduction=module.reduction, beta=module.beta)
    elif kind is nn.TripletMarginLoss:
        if not (module.p > 0 and module.p != float("inf")):
            return None, f"p={module.p}: torch_ext.triplet_margin_loss supports finite p > 0"
        new = TripletMarginLoss(margin=module.margin, p=module.p, eps=module.eps, swap=module.swap,
                                reduction=module.reduction)
    else:
        return None, ""
    new.train(module.training)
    return new, ""


# --- the model's tree ------------------------------------------------------------------------

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _is_custom(module: nn.Module) -> bool:
    """A module whose forward fuse() traces: not one of torch.nn's or torch_ext's own."""
    name = type(module).__module__ or ""
    return not (name.startswith("torch.") or name.startswith("torch_ext."))


class _ChildrenAreLeaves(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


@dataclass
class _Traced:
    module: nn.Module
    graph: Optional[torch.fx.Graph]
    error: str = ""
    edits: List[torch.fx.Node] = field(default_factory=list)  # activation nodes to remove


def _trace(module: nn.Module) -> _Traced:
    try:
        graph = _ChildrenAreLeaves().trace(module)
    except Exception as e:  # noqa: BLE001 (any tracing failure means: leave it alone)
        return _Traced(module, None, f"torch.fx cannot trace its forward ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    # A forward that branches on self.training would be baked into one mode: compare both.
    module.train(not module.training)
    try:
        other = _ChildrenAreLeaves().trace(module)
    except Exception:  # noqa: BLE001
        other = None
    finally:
        module.train(not module.training)
    if other is None or other.python_code("self").src != graph.python_code("self").src:
        return _Traced(module, None, "its forward differs between training and eval mode")
    return _Traced(module, graph)


@dataclass
class _Use:
    """One place that calls a Linear, and the activation applied to its output there."""

    where: str
    spec: Optional[Spec]
    why_not: str = ""
    apply: Optional[Callable[[], None]] = None  # removes the activation there


def _uses_of_linear(model, paths, traced, calls, linear) -> List[_Use]:
    """Every use of `linear`: from each path to it, the module whose forward calls it (its parent,
    or past ModuleList/ModuleDict the first module that has a forward), plus every call to it in
    a traced forward (`calls`, which also sees calls like self.block.fc(x) from further up)."""
    uses: List[_Use] = []
    seen = set()
    for path in paths:
        parent_path, _, key = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        caller_path = parent_path
        while caller_path and isinstance(model.get_submodule(caller_path), _CONTAINERS):
            caller_path = caller_path.rpartition(".")[0]
        caller = model.get_submodule(caller_path)
        if (id(parent), key) in seen:
            continue
        seen.add((id(parent), key))
        if type(parent) is nn.Sequential:
            uses.append(_sequential_use(path, parent, int(key)))
        elif type(parent) in _TRANSFORMER_LAYERS:
            uses.append(_transformer_use(path, parent, key))
        elif isinstance(caller, _CONTAINERS):
            uses.append(_Use(path, None, "held in a ModuleList/ModuleDict at the top of the model"))
        elif _is_custom(caller):
            t = traced[id(caller)]
            if t.graph is None:
                uses.append(_Use(path, None, f"used by {caller_path or 'the model'}, where {t.error}"))
        else:
            uses.append(_Use(path, None, f"used inside {type(caller).__name__}, which fuse() does not rewrite"))
    for t, node in calls.get(id(linear), []):
        uses.append(_traced_use(t, node))
    return uses


def _sequential_use(path: str, seq: nn.Sequential, index: int) -> _Use:
    if index + 1 >= len(seq):
        return _Use(path, None, "last in its nn.Sequential")
    spec = _module_spec(seq[index + 1])
    if spec is None:
        return _Use(path, None, f"followed by {type(seq[index + 1]).__name__}, not a supported activation")

    def apply():
        seq[index + 1] = nn.Identity()

    return _Use(path, spec, apply=apply)


def _transformer_use(path: str, layer: nn.Module, key: str) -> _Use:
    if key != "linear1":
        return _Use(path, None, f"{type(layer).__name__}.{key} is not followed by the activation")
    spec = _callable_spec(layer.activation)
    if spec is None:
        return _Use(path, None, f"the layer's activation {layer.activation!r} is not a supported one")

    def apply():
        layer.activation = nn.Identity()  # its feed-forward block: linear2(dropout(activation(linear1(x))))

    return _Use(path, spec, apply=apply)


def _traced_use(t: _Traced, node: torch.fx.Node) -> _Use:
    where = f"{type(t.module).__name__}.forward calling self.{node.target}"
    users = list(node.users)
    spec = _node_spec(users[0], t.module) if len(users) == 1 else None
    if spec is None:
        why = "its output has several users" if len(users) > 1 else "not followed by a supported activation"
        return _Use(where, None, f"in {where}: {why}")
    act = users[0]
    return _Use(where, spec, apply=lambda: t.edits.append(act))


def _module_calls(traced: Dict[int, _Traced]) -> Dict[int, List[Tuple[_Traced, torch.fx.Node]]]:
    """id(module) -> the call_module nodes that call it, over every traced forward."""
    calls: Dict[int, List[Tuple[_Traced, torch.fx.Node]]] = {}
    for t in traced.values():
        if t.graph is None:
            continue
        for node in t.graph.nodes:
            if node.op == "call_module":
                calls.setdefault(id(t.module.get_submodule(node.target)), []).append((t, node))
    return calls


def _fused_linear_from(linear: nn.Linear, spec: Spec) -> FusedLinear:
    """A FusedLinear holding linear's own Parameter objects (built on meta: nothing allocated)."""
    fused = FusedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        activation=spec[0], negative_slope=spec[1], device="meta")
    fused.weight = linear.weight
    if linear.bias is not None:
        fused.bias = linear.bias
    fused.train(linear.training)
    return fused


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, key = path.rpartition(".")
    setattr(model.get_submodule(parent_path), key, module)


def _rewrite_forward(t: _Traced) -> None:
    """Drop the fused activation calls from the traced graph and make it the module's forward,
    through a subclass of its class (so isinstance, its other methods and state_dict stay)."""
    for act in t.edits:
        act.replace_all_uses_with(act.args[0])
        t.graph.erase_node(act)
    t.graph.lint()
    cls = type(t.module)
    traced = torch.fx.GraphModule(t.module, t.graph, class_name=cls.__name__)
    t.module.__class__ = type(cls.__name__, (cls,), {
        "forward": type(traced).forward,
        "__module__": cls.__module__,
        "__doc__": f"{cls.__name__} with its forward traced by torch_ext.fuse (activations fused into FusedLinear).",
    })


# --- fuse ------------------------------------------------------------------------------------

def fuse(model: nn.Module, inplace: bool = False, *, return_report: bool = False):
    """Return `model` with its Linear + activation pairs as FusedLinear and its loss modules as
    torch_ext's (see torch_ext/fuse.py for what is found where).

    inplace=False (default) works on a deep copy: the result has the same parameter values and
    state_dict keys, and the model passed in is untouched. inplace=True changes `model` itself
    and keeps its Parameter objects. The report (what was replaced, what was left alone and why)
    is logged to the ``torch_ext.fuse`` logger, and returned as ``(model, report)`` when
    return_report=True. A model with nothing to fuse comes back unchanged, with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"torch_ext.fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()

    # Loss modules: a drop-in subclass each, wherever they are.
    new_loss, why = _fused_loss(model)
    if new_loss is not None:
        report.replaced.append(f"model ({type(model).__name__}) -> torch_ext.{type(new_loss).__name__}")
        model = new_loss
    paths_of: Dict[int, List[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if path:
            paths_of.setdefault(id(module), []).append(path)
    modules = {id(m): m for _, m in model.named_modules()}
    for key, paths in paths_of.items():
        module = modules[key]
        new_loss, why = _fused_loss(module)
        if new_loss is not None:
            for path in paths:
                _set(model, path, new_loss)
            report.replaced.append(f"{', '.join(paths)} ({type(module).__name__}) -> torch_ext.{type(new_loss).__name__}")
        elif why:
            report.skipped.append(f"{', '.join(paths)} ({type(module).__name__}): {why}")

    # Linear + activation.
    traced: Dict[int, _Traced] = {}
    for key, module in modules.items():
        if _is_custom(module):
            traced[key] = _trace(module)
    calls = _module_calls(traced)
    for key, paths in paths_of.items():
        linear = modules[key]
        if not isinstance(linear, nn.Linear) or isinstance(linear, FusedLinear):
            continue
        label = f"{', '.join(paths)} ({type(linear).__name__} {linear.in_features}->{linear.out_features})"
        if type(linear) is not nn.Linear:
            report.skipped.append(f"{label}: a subclass of nn.Linear")
            continue
        if linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks:
            report.skipped.append(f"{label}: has hooks")
            continue
        uses = _uses_of_linear(model, paths, traced, calls, linear)
        blocked = [u for u in uses if u.spec is None]
        specs = {u.spec for u in uses}
        if blocked or not uses:
            report.skipped.append(f"{label}: {blocked[0].why_not if blocked else 'never called'}")
            continue
        if len(specs) > 1:
            report.skipped.append(f"{label}: used {len(uses)} times with different activations")
            continue
        spec = specs.pop()
        fused = _fused_linear_from(linear, spec)
        for path in paths:
            _set(model, path, fused)
        for use in uses:
            use.apply()
        times = f" ({len(uses)} uses)" if len(uses) > 1 else ""
        report.replaced.append(f"{label} + {_describe(spec)} -> FusedLinear{times}")
    for t in traced.values():
        if t.edits:
            _rewrite_forward(t)

    if type(model) is nn.Linear:
        report.skipped.append("model (Linear): the model itself, so nothing follows it")
    if report.replaced:
        logger.info("%s", report)
    else:
        reasons = "; ".join(report.skipped[:3]) or "no nn.Linear followed by an activation, no torch.nn loss module"
        warnings.warn(f"torch_ext.fuse: nothing to fuse in {type(model).__name__}, returned it unchanged ({reasons})", stacklevel=2)
    return (model, report) if return_report else model
