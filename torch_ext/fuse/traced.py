"""The fx path: trace each custom module's own forward, find every use of a Linear (in
nn.Sequential, Transformer layers and the traces) and the activation that follows it there; the
rewritten forward (the trace without those activations) as a subclass of the module's class."""
from __future__ import annotations

import functools
import itertools
import linecache
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn

from .activations import Spec, _callable_spec, _node_spec, activation_spec
from .rewrite import _has_hooks, _identity_like, fused_subclass, rebuilt
from .source import ALL, _analyze_source, _SourceFacts

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


def _trace_once(module: nn.Module,
                tracer: Optional[torch.fx.Tracer] = None) -> Tuple[torch.fx.Graph, Dict[str, object]]:
    """A trace of module's own forward, and the tensor constants torch.fx attaches to the module
    for it (taken off again: they come back only if the forward is rewritten)."""
    before = set(vars(module))
    constants = {}
    try:
        return (tracer or _ChildrenAreLeaves()).trace(module), constants
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
        why = f"torch.fx cannot trace its forward ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        return _Traced(module, None, why, facts)
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
                        at = ".".join(parts[:i]) or "the model"
                        return f"{type(ancestor).__name__} at '{at}' may call it directly ({how})"
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
                uses.append(_Use(path, None,
                                 f"held in a {type(caller).__name__} at the top of the model, which nothing calls"))
            elif not (_is_custom(caller) and m.traced[id(caller)].rewritable):
                what = (m.traced[id(caller)].error if _is_custom(caller)
                        else f"{type(caller).__name__} is not rewritten by fuse()")
                uses.append(_Use(path, None,
                                 f"used through {type(parent).__name__} by {caller_path or 'the model'}: {what}"))
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


def _sequential_use(m: _Model, path: str, seq: nn.Sequential, key: str) -> _Use:
    keys = list(seq._modules)
    index = keys.index(key)
    if index + 1 >= len(keys):
        return _Use(path, None, "last in its nn.Sequential")
    act = seq._modules[keys[index + 1]]
    spec = activation_spec(act)
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



def _rewrite_forward(t: _Traced) -> None:
    """Drop the fused activation calls from the traced graph and make it the module's forward,
    through a subclass of its class (so isinstance, its other methods and state_dict stay)."""
    cls = type(t.module)
    dropped = tuple(act.name for act in t.edits)
    _drop_activations(t.graph, t.edits)
    for name, value in t.constants.items():  # tensors the forward creates, as torch.fx keeps them
        setattr(t.module, name, value)
    t.module.__class__ = _traced_class(cls, dropped, tuple(t.constants), _forward_from_graph(t.graph, cls))


def _drop_activations(graph: torch.fx.Graph, acts: Sequence[torch.fx.Node]) -> None:
    for act in acts:
        act.replace_all_uses_with(_activation_input(act))
        graph.erase_node(act)
    graph.lint()


_SOURCES = itertools.count()


def _forward_from_graph(graph: torch.fx.Graph, cls) -> Callable:
    """The function torch.fx writes for `graph` (Graph.python_code), compiled, its source kept in
    linecache under its own file name for tracebacks and inspect.getsource."""
    code = graph.python_code(root_module="self")
    filename = f"<torch_ext.fuse {cls.__module__}.{cls.__qualname__}.forward #{next(_SOURCES)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(keepends=True), filename)
    scope = dict(code.globals)
    exec(compile(code.src, filename, "exec", dont_inherit=True), scope)  # noqa: S102 (torch.fx's code for the trace)
    return scope["forward"]


def _traced_class(cls, dropped: Tuple[str, ...], constants: Tuple[str, ...], forward: Optional[Callable] = None):
    """A subclass of cls whose forward is its traced forward without the activation nodes named
    `dropped` (`forward`, or, for a module being unpickled, the same built from a new trace on
    its first call); `constants`: the attributes torch.fx attached to the module for the trace."""
    return fused_subclass(
        cls, f"{cls.__name__} with its forward traced by torch_ext.fuse (activations fused into FusedLinear).",
        _rebuild_traced, (dropped, constants), forward,
        build=functools.partial(_retraced_forward, cls, dropped, constants),
        # what the new trace traces (a staticmethod: not one more method of the class for fuse() to read)
        _torch_ext_unfused_forward=staticmethod(cls.forward),
    )


def _rebuild_traced(cls, dropped, constants, state):
    return rebuilt(_traced_class(cls, dropped, constants), state)


def _retraced_forward(cls, dropped: Tuple[str, ...], constants: Tuple[str, ...], module: nn.Module) -> Callable:
    """cls.forward traced on `module` as fuse() traced it (same tracer, same node names), the
    activations `dropped` taken out. The tensor constants keep the values the module was saved
    with: they are set aside during the trace, so that torch.fx gives its own the same names."""
    saved = {name: module.__dict__.pop(name) for name in constants if name in module.__dict__}
    tracer = _ChildrenAreLeaves()
    tracer.traced_func_name = "_torch_ext_unfused_forward"
    try:
        graph, traced_constants = _trace_once(module, tracer)
    finally:
        module.__dict__.update(saved)
    for name, value in traced_constants.items():
        if name not in saved:
            setattr(module, name, value)
    nodes = {node.name: node for node in graph.nodes}
    acts = [nodes.get(name) for name in dropped]
    if any(act is None or _activation_input(act) is None or _node_spec(act, module) is None for act in acts):
        raise RuntimeError(
            f"torch_ext.fuse: {cls.__qualname__}.forward no longer traces as it did when this model was fused "
            f"(activations {', '.join(dropped)}): load its state_dict() into {cls.__name__} and fuse it again"
        )
    _drop_activations(graph, acts)
    return _forward_from_graph(graph, cls)
