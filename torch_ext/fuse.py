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

import ast
import copy
import inspect
import logging
import textwrap
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
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", F.gelu: "gelu", F.silu: "silu",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", torch.tanh: "tanh", torch.tanh_: "tanh",
}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "tanh": "tanh", "tanh_": "tanh"}


def _node_spec(node: torch.fx.Node, owner: nn.Module) -> Optional[Spec]:
    """The activation a traced node applies to its first argument, or None."""
    if node.op == "call_module":
        if len(node.args) + len(node.kwargs) != 1:
            return None
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


def _replacement_loss(module: nn.Module, where: str, report: FuseReport) -> Optional[nn.Module]:
    """torch_ext's loss module to put in place of `module` (None: keep it), reported either way."""
    new, why = _fused_loss(module)
    if new is not None and _has_hooks(module):
        new, why = None, "has hooks"
    if new is not None:
        report.replaced.append(f"{where} ({type(module).__name__}) -> torch_ext.{type(new).__name__}")
    elif why:
        report.skipped.append(f"{where} ({type(module).__name__}): {why}")
    return new


# --- the model's tree ------------------------------------------------------------------------

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _is_builtin_other(module: nn.Module) -> bool:
    """A torch.nn module whose forward fuse() does not look into (not Sequential, a container or
    a Transformer layer)."""
    return (type(module).__module__.startswith("torch.nn") and type(module) is not nn.Sequential
            and not isinstance(module, _CONTAINERS) and type(module) not in _TRANSFORMER_LAYERS)


def _is_custom(module: nn.Module) -> bool:
    """A module whose forward fuse() traces: not one of torch.nn's or torch_ext's own."""
    name = type(module).__module__ or ""
    return not (name.startswith("torch.") or name.startswith("torch_ext."))


class _ChildrenAreLeaves(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call stays a call_module node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


# --- what a module's source does with its submodules -------------------------------------------

ALL = None  # "every submodule" in _SourceFacts.opaque


@dataclass
class _SourceFacts:
    """What fuse() reads from a custom module's source (its class's methods).

    problem: why its forward must not be replaced by its trace ("" if it may): torch.fx would
      drop or freeze something (a with-block, an optional argument, an attribute read).
    called: ids of the submodules its methods call through a plain attribute chain (self.a.b(x));
      in_forward: those called from forward (and the helpers forward calls), other: the rest.
    opaque: ids of submodules its forward reaches in ways fuse() cannot follow (indexing,
      iteration, passing them around), with everything under them; ALL when it cannot tell;
      opaque_elsewhere: the same in its other methods.
    """

    problem: str = ""
    called_in_forward: set = field(default_factory=set)
    called_elsewhere: Dict[int, str] = field(default_factory=dict)
    opaque: Optional[set] = field(default_factory=set)
    opaque_elsewhere: Optional[set] = field(default_factory=set)  # the same, in the other methods


def _method_ast(fn) -> Optional[ast.AST]:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def _own_methods(cls) -> Dict[str, Callable]:
    """Functions defined by cls and its bases below nn.Module, by name (the most derived)."""
    methods: Dict[str, Callable] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, nn.Module) or klass.__module__.startswith("torch."):
            continue
        for name, value in vars(klass).items():
            fn = value.fget if isinstance(value, property) else value
            if inspect.isfunction(fn) and name != "__init__":
                methods[name] = fn
    return methods


def _analyze_source(module: nn.Module) -> _SourceFacts:
    facts = _SourceFacts()
    methods = _own_methods(type(module))
    forward = type(module).forward
    if "forward" not in methods:
        return _SourceFacts(problem="its forward is not its own source code", opaque=ALL)
    sig = inspect.signature(forward)
    for param in list(sig.parameters.values())[1:]:
        if param.default is not param.empty or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            facts.problem = facts.problem or f"its forward has an optional argument ({param.name}), which a trace would fix"
    # forward and the methods it calls on self are "forward"; the other methods are checked for
    # direct calls of submodules (a Linear they call must stay a Linear).
    in_forward, queue = set(), ["forward"]
    while queue:
        name = queue.pop()
        if name in in_forward or name not in methods:
            continue
        in_forward.add(name)
        tree = _method_ast(methods[name])
        if tree is None:
            return _SourceFacts(problem=f"the source of {type(module).__name__}.{name} is not available", opaque=ALL)
        queue += _scan(tree, module, methods, facts, in_forward=True, method=name)
    for name, fn in methods.items():
        if name not in in_forward:
            tree = _method_ast(fn)
            if tree is None:
                facts.opaque_elsewhere = ALL
            else:
                _scan(tree, module, methods, facts, in_forward=False, method=name)
    return facts


def _is_config_constant(value) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    return isinstance(value, tuple) and all(_is_config_constant(v) for v in value)


def _attribute_chain(node) -> Optional[List[str]]:
    """['a', 'b'] for the expression self.a.b, else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return list(reversed(names)) if isinstance(node, ast.Name) and node.id == "self" and names else None


def _scan(tree, module, methods, facts: _SourceFacts, in_forward: bool, method: str) -> List[str]:
    """Records in `facts` what one method does with self; returns the methods of self it calls."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    helpers = []
    state = set(module._parameters) | set(module._buffers) | {"training"}

    def opaque(obj):
        field_name = "opaque" if in_forward else "opaque_elsewhere"
        if getattr(facts, field_name) is not ALL:
            getattr(facts, field_name).add(id(obj))

    def opaque_all():
        setattr(facts, "opaque" if in_forward else "opaque_elsewhere", ALL)

    for node in ast.walk(tree):
        if in_forward and isinstance(node, (ast.With, ast.AsyncWith)):
            facts.problem = facts.problem or "its forward has a with-block (torch.no_grad, autocast, ...), which torch.fx does not record"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
            opaque_all()  # the base class's methods are not analysed
            if in_forward:
                facts.problem = facts.problem or "its forward calls super(), whose code fuse() does not read"
        if isinstance(node, ast.Name) and node.id == "self" and not isinstance(parents.get(node), ast.Attribute):
            opaque_all()  # self passed around (getattr(self, ...), helper(self)): anything may happen
            if in_forward:
                facts.problem = facts.problem or "its forward passes self to other code"
        chain = _attribute_chain(node)
        if chain is None or isinstance(parents.get(node), ast.Attribute):
            continue  # only the longest chain self.a.b.c
        head = chain[0]
        if head in methods:
            helpers.append(head)  # a helper method or property: its code runs as part of this one
            continue
        if head in state and len(chain) == 1:
            continue
        # What self.a.b names: `obj`, an attribute of `owner` (self.a).
        try:
            owner = module
            for name in chain[:-1]:
                owner = getattr(owner, name)
            obj = getattr(owner, chain[-1])
        except AttributeError:
            owner = obj = None
        if isinstance(obj, nn.Module):
            called = isinstance(parents.get(node), ast.Call) and parents[node].func is node
            if called and in_forward:
                facts.called_in_forward.add(id(obj))
            elif called:
                facts.called_elsewhere[id(obj)] = method
            elif not in_forward or not isinstance(parents.get(node), ast.Attribute):
                opaque(obj)  # indexed, iterated, or passed on
            continue
        # A parameter or buffer of a submodule (self.fc.weight) is read as it is; anything else
        # read in forward (a flag, a temperature) would be frozen by the trace.
        if isinstance(owner, nn.Module) and (chain[-1] in owner._parameters or chain[-1] in owner._buffers):
            continue
        # Configuration constants (ints, strings, bools, None, tuples of them) are taken as fixed.
        if in_forward and not _is_config_constant(obj):
            facts.problem = facts.problem or f"its forward reads self.{'.'.join(chain)}, which a trace would freeze"
    return helpers


@dataclass
class _Traced:
    module: nn.Module
    graph: Optional[torch.fx.Graph]
    error: str = ""
    facts: _SourceFacts = field(default_factory=_SourceFacts)
    edits: List[torch.fx.Node] = field(default_factory=list)  # activation nodes to remove
    constants: Dict[str, object] = field(default_factory=dict)

    @property
    def rewritable(self) -> bool:
        return self.graph is not None


def _trace_once(module: nn.Module) -> Tuple[torch.fx.Graph, Dict[str, object]]:
    """A trace of module's own forward, and the tensor constants torch.fx attaches to the module
    for it (taken off again: they come back only if the forward is rewritten)."""
    before = set(vars(module))
    constants = {}
    try:
        return _ChildrenAreLeaves().trace(module), constants
    finally:
        for name in set(vars(module)) - before:
            constants[name] = getattr(module, name)
            delattr(module, name)


def _trace(module: nn.Module) -> _Traced:
    facts = _analyze_source(module)
    if facts.problem:
        return _Traced(module, None, facts.problem, facts)
    try:
        graph, constants = _trace_once(module)
    except Exception as e:  # noqa: BLE001 (any tracing failure means: leave it alone)
        return _Traced(module, None, f"torch.fx cannot trace its forward ({type(e).__name__}: {str(e).splitlines()[0][:120]})", facts)
    # A forward that branches on self.training would be baked into one mode: compare both
    # (flipping this module's own flag only; its submodules keep theirs).
    module.training = not module.training
    try:
        other = _trace_once(module)[0]
    except Exception:  # noqa: BLE001
        other = None
    finally:
        module.training = not module.training
    if other is None or other.python_code("self").src != graph.python_code("self").src:
        return _Traced(module, None, "its forward differs between training and eval mode", facts)
    return _Traced(module, graph, facts=facts, constants=constants)


@dataclass
class _Use:
    """One place that calls a Linear, and the activation applied to its output there."""

    where: str
    spec: Optional[Spec]
    why_not: str = ""
    apply: Optional[Callable[[], None]] = None  # removes the activation there


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


class _Model:
    """The model's tree and what fuse() knows about each custom module's code."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.paths: Dict[int, List[str]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            if path:
                self.paths.setdefault(id(module), []).append(path)
        self.modules = {id(m): m for _, m in model.named_modules()}
        self.traced = {key: _trace(m) for key, m in self.modules.items() if _is_custom(m)}
        # Calls seen in the traces of the forwards that will be rewritten.
        self.calls: Dict[int, List[Tuple[_Traced, torch.fx.Node]]] = {}
        for t in self.traced.values():
            if t.rewritable:
                for node in t.graph.nodes:
                    if node.op == "call_module":
                        self.calls.setdefault(id(t.module.get_submodule(node.target)), []).append((t, node))

    def blocked(self, module: nn.Module) -> str:
        """Why code fuse() cannot follow may use `module` directly ("" if none does)."""
        for t in self.traced.values():
            owner = type(t.module).__name__
            if id(module) in t.facts.called_elsewhere:
                return f"{owner}.{t.facts.called_elsewhere[id(module)]} also calls it"
            if not t.rewritable and id(module) in t.facts.called_in_forward:
                return f"called by {owner}.forward, which fuse() does not rewrite: {t.error}"
        # Reached through an opaque submodule of a module that is not rewritten (or of any
        # module's other methods): self.seq[0](x), for layer in self.layers, ...
        for path in self.paths.get(id(module), []):
            parts = path.split(".")
            for i in range(len(parts)):
                ancestor = self.model.get_submodule(".".join(parts[:i]))
                t = self.traced.get(id(ancestor))
                if t is None:
                    continue
                below = [id(self.model.get_submodule(".".join(parts[: j + 1]))) for j in range(i, len(parts))]
                for opaque, applies in ((t.facts.opaque_elsewhere, True), (t.facts.opaque, not t.rewritable)):
                    if applies and (opaque is ALL or any(k in opaque for k in below)):
                        how = "code fuse() cannot read" if opaque is ALL else "indexing or iterating a module above it"
                        return f"{type(ancestor).__name__} at '{'.'.join(parts[:i]) or 'the model'}' may call it directly ({how})"
        return ""


def _uses_of_linear(m: _Model, linear: nn.Linear) -> List[_Use]:
    """Every use of `linear`: its slots in nn.Sequential / Transformer layers, and the calls to it
    in the traced forwards; plus, as unusable, any use fuse() cannot see."""
    uses: List[_Use] = []
    seen = set()
    why = m.blocked(linear)
    if why:
        return [_Use(m.paths[id(linear)][0], None, why)]
    for path in m.paths[id(linear)]:
        parent_path, _, key = path.rpartition(".")
        parent = m.model.get_submodule(parent_path)
        if (id(parent), key) in seen:
            continue
        seen.add((id(parent), key))
        if type(parent) is nn.Sequential:
            uses.append(_sequential_use(m, path, parent, key))
        elif type(parent) in _TRANSFORMER_LAYERS:
            uses.append(_transformer_use(m, path, parent, key))
        elif isinstance(parent, _CONTAINERS):
            caller_path = parent_path
            while caller_path and isinstance(m.model.get_submodule(caller_path), _CONTAINERS):
                caller_path = caller_path.rpartition(".")[0]
            caller = m.model.get_submodule(caller_path)
            if isinstance(caller, _CONTAINERS):
                uses.append(_Use(path, None, f"held in a {type(caller).__name__} at the top of the model, which nothing calls"))
            elif not (_is_custom(caller) and m.traced[id(caller)].rewritable):
                what = m.traced[id(caller)].error if _is_custom(caller) else f"{type(caller).__name__} is not rewritten by fuse()"
                uses.append(_Use(path, None, f"used through {type(parent).__name__} by {caller_path or 'the model'}: {what}"))
        elif _is_custom(parent) and m.traced[id(parent)].rewritable:
            continue  # its calls are in the trace (or it is never called)
        elif _is_custom(parent):
            uses.append(_Use(path, None, f"used by {parent_path or 'the model'}, where {m.traced[id(parent)].error}"))
        else:
            uses.append(_Use(path, None, f"used inside {type(parent).__name__}, which fuse() does not rewrite"))
    for t, node in m.calls.get(id(linear), []):
        uses.append(_traced_use(m, t, node))
    return uses


def _activation_replaceable(m: _Model, act: nn.Module) -> str:
    """Why the activation module in a slot cannot become nn.Identity ("" if it can)."""
    if _has_hooks(act):
        return "its activation module has hooks"
    if id(act) in m.calls:
        return "its activation module is also called directly in a forward"
    return m.blocked(act)


def _identity_like(module: nn.Module) -> nn.Identity:
    return nn.Identity().train(module.training)


def _sequential_use(m: _Model, path: str, seq: nn.Sequential, key: str) -> _Use:
    keys = list(seq._modules)
    index = keys.index(key)
    if index + 1 >= len(keys):
        return _Use(path, None, "last in its nn.Sequential")
    act = seq._modules[keys[index + 1]]
    spec = _module_spec(act)
    if spec is None:
        return _Use(path, None, f"followed by {type(act).__name__}, not a supported activation")
    why = _activation_replaceable(m, act)
    if why:
        return _Use(path, None, why)

    def apply():
        seq._modules[keys[index + 1]] = _identity_like(act)

    return _Use(path, spec, apply=apply)


def _transformer_use(m: _Model, path: str, layer: nn.Module, key: str) -> _Use:
    if key != "linear1":
        return _Use(path, None, f"{type(layer).__name__}.{key} is not followed by the activation")
    spec = _callable_spec(layer.activation)
    if spec is None:
        return _Use(path, None, f"the layer's activation {layer.activation!r} is not a supported one")
    if isinstance(layer.activation, nn.Module):
        why = _activation_replaceable(m, layer.activation)
        if why:
            return _Use(path, None, why)

    def apply():
        # Its feed-forward block is linear2(dropout(activation(linear1(x)))).
        layer.activation = _identity_like(layer)

    return _Use(path, spec, apply=apply)


def _activation_input(act: torch.fx.Node):
    """The tensor an activation node applies to: its first argument, or a module's input= keyword."""
    if act.args:
        return act.args[0]
    return act.kwargs.get("input") if act.op == "call_module" and len(act.kwargs) == 1 else None


def _traced_use(m: _Model, t: _Traced, node: torch.fx.Node) -> _Use:
    where = f"{type(t.module).__name__}.forward calling self.{node.target}"
    users = list(node.users)
    act = users[0] if len(users) == 1 else None
    spec = None
    if act is not None and _activation_input(act) is node:
        spec = _node_spec(act, t.module)
    if spec is None:
        why = "its output has several users" if len(users) > 1 else "not followed by a supported activation"
        return _Use(where, None, f"in {where}: {why}")
    if act.op == "call_module" and _has_hooks(t.module.get_submodule(act.target)):
        return _Use(where, None, f"in {where}: its activation module has hooks")  # the call is removed
    return _Use(where, spec, apply=lambda: t.edits.append(act))


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
        act.replace_all_uses_with(_activation_input(act))
        t.graph.erase_node(act)
    t.graph.lint()
    for name, value in t.constants.items():  # tensors the forward creates, as torch.fx keeps them
        setattr(t.module, name, value)
    code = t.graph.python_code(root_module="self")
    t.module.__class__ = _traced_class(type(t.module), code.src, code.globals)


def _traced_class(cls, src: str, scope: Dict[str, object]):
    """A subclass of cls whose forward is the traced source (run with the globals torch.fx
    generated it with); pickled as cls, that source and an import block for those globals."""
    forward = torch.fx.graph_module._forward_from_src(src, dict(scope))

    def __reduce_ex__(self, protocol):
        from torch.package import sys_importer

        try:
            imports = torch.fx.graph_module._format_import_block(scope, sys_importer)
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"{cls.__name__} rewritten by torch_ext.fuse cannot be pickled whole ({e}); save its state_dict() "
                "instead, which loads into the original class"
            ) from e
        return (_rebuild_traced, (cls, src, imports, self.__getstate__()))

    return type(cls.__name__, (cls,), {
        "forward": forward,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__reduce_ex__": __reduce_ex__,
        "__doc__": f"{cls.__name__} with its forward traced by torch_ext.fuse (activations fused into FusedLinear).",
    })


def _rebuild_traced(cls, src, imports, state):
    scope: Dict[str, object] = {}
    exec(imports, scope)  # noqa: S102 (the import block torch.fx wrote for this forward)
    module = cls.__new__(_traced_class(cls, src, scope))
    module.__setstate__(state)
    return module


def _deepcopy(model: nn.Module) -> nn.Module:
    copied = copy.deepcopy(model)
    # nn.TransformerDecoderLayer.__setstate__ puts F.relu in the copy's __dict__ when its
    # activation is a module, which then hides the module: take the module again.
    for module in copied.modules():
        if "activation" in module._modules and "activation" in module.__dict__:
            del module.__dict__["activation"]
    return copied


# --- fuse ------------------------------------------------------------------------------------

def fuse(model: nn.Module, inplace: bool = False, *, return_report: bool = False):
    """Return `model` with its Linear + activation pairs as FusedLinear and its loss modules as
    torch_ext's (see torch_ext/fuse.py for what is found where).

    inplace=False (default) works on a deep copy: the result has the same parameter values and
    state_dict keys, and the model passed in is untouched. inplace=True changes `model` itself
    and keeps its Parameter objects (a loss module passed as the whole model is returned as a new
    module). The report (what was replaced, what was left alone and why) is logged to the
    ``torch_ext.fuse`` logger, and returned as ``(model, report)`` when return_report=True. A
    model with nothing to fuse comes back unchanged, with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"torch_ext.fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _deepcopy(model)
    report = FuseReport()

    # Loss modules: a drop-in subclass each, wherever they are (the model itself too).
    new_loss = _replacement_loss(model, "model", report)
    model = model if new_loss is None else new_loss
    m = _Model(model)
    for key, paths in m.paths.items():
        new_loss = _replacement_loss(m.modules[key], ", ".join(paths), report)
        for path in paths if new_loss is not None else ():
            _set(model, path, new_loss)

    # Linear + activation.
    for key, paths in m.paths.items():
        linear = m.modules[key]
        if not isinstance(linear, nn.Linear) or isinstance(linear, FusedLinear):
            continue
        label = f"{', '.join(paths)} ({type(linear).__name__} {linear.in_features}->{linear.out_features})"
        parents = [m.model.get_submodule(p.rpartition(".")[0]) for p in paths]
        if all(type(p).__module__.startswith("torch_ext.") for p in parents):
            continue  # inside torch_ext's own modules (FusedMLP's fc1/fc2): fused already
        if all(_is_builtin_other(p) for p in parents) and type(linear) is not nn.Linear:
            continue  # a Linear subclass inside a torch.nn module (MultiheadAttention.out_proj): not a candidate
        if type(linear) is not nn.Linear:
            report.skipped.append(f"{label}: a subclass of nn.Linear")
            continue
        if _has_hooks(linear):
            report.skipped.append(f"{label}: has hooks")
            continue
        uses = _uses_of_linear(m, linear)
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
    for t in m.traced.values():
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
