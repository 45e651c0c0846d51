"""Reading a custom module's source (its class's methods): what it does with its submodules,
and whether torch.fx may replace its forward by a trace."""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from ..integrations import framework_class

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
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    try:
        return ast.parse(textwrap.dedent(source))
    except (SyntaxError, IndentationError):
        pass
    # dedent fails when a docstring has lines indented less than the def: parse it in a block.
    try:
        block = ast.parse("if True:\n" + source).body[0]
    except (SyntaxError, IndentationError):
        return None
    return ast.Module(body=block.body, type_ignores=[])


def _generic_class(klass) -> bool:
    """A class whose methods fuse() does not read: object, torch's, and a library's base classes of
    every model (integrations.framework_class), none of which calls a layer of the model on data."""
    return klass is object or klass.__module__.startswith("torch.") or framework_class(klass)


def _own_methods(cls) -> Dict[str, Callable]:
    """Functions defined by cls and its bases below nn.Module, by name (the most derived); not
    the pickling methods fuse() gives the classes it rewrites (rewrite.fused_subclass), nor those
    of generic classes (_generic_class)."""
    methods: Dict[str, Callable] = {}
    for klass in reversed(cls.__mro__):
        if _generic_class(klass):
            continue
        for name, value in vars(klass).items():
            fn = value.fget if isinstance(value, property) else value
            if inspect.isfunction(fn) and name != "__init__" and not getattr(fn, "_torch_ext_plumbing", False):
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
            facts.problem = (facts.problem
                             or f"its forward has an optional argument ({param.name}), which a trace would fix")
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


def _super_reaches_generic_code(cls, method: str, attribute) -> bool:
    """Whether `super().name` (`attribute`, the ast.Attribute on the super() call) in cls's
    `method` reaches a method of a generic class (transformers' PreTrainedModel._init_weights,
    say), which fuse() does not read either."""
    if not isinstance(attribute, ast.Attribute):
        return False
    mro = cls.__mro__
    owner = next((i for i, k in enumerate(mro) if method in vars(k)), None)
    target = None if owner is None else next((k for k in mro[owner + 1:] if attribute.attr in vars(k)), None)
    return target is not None and _generic_class(target)


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
            facts.problem = facts.problem or ("its forward has a with-block (torch.no_grad, autocast, ...), "
                                              "which torch.fx does not record")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
            if not _super_reaches_generic_code(type(module), method, parents.get(node)):
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



# --- names: which attributes a class's code mentions --------------------------------------------

@functools.cache
def parsed(fn) -> Optional[ast.AST]:
    """_method_ast, once per function (fuse() reads the same library classes for every layer)."""
    return _method_ast(fn)


# Reading these of a module does not call it (x.fc.weight, hasattr(x.fc, "bias")).
_READS = {"weight", "bias", "in_features", "out_features", "nf", "nx", "training"}
_INSPECTING = {"hasattr", "isinstance", "type", "id"}


def mentioned_names(tree: ast.AST) -> Dict[str, ast.AST]:
    """Every attribute name (x.name) and string constant ("name", for getattr and the like) in
    `tree` through which code could reach a module to call it, with one node that mentions it;
    reads of a module's weights and checks like hasattr(x.fc, "bias") do not count."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names: Dict[str, ast.AST] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.attr in _READS:
                continue
            if (isinstance(parent, ast.Call) and node in parent.args and isinstance(parent.func, ast.Name)
                    and parent.func.id in _INSPECTING):
                continue
            names.setdefault(node.attr, node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.setdefault(node.value, node)
    return names


@functools.cache
def names_in_class(cls, skip: Tuple[str, ...] = ()) -> Tuple[Dict[str, str], str]:
    """The names the methods of cls (all but `skip`) mention, each with the first 'Class.method'
    mentioning it, and the first method whose source cannot be read ("" if none)."""
    names: Dict[str, str] = {}
    unreadable = ""
    for name, fn in _own_methods(cls).items():
        if name in skip:
            continue
        tree = parsed(fn)
        if tree is None:
            unreadable = unreadable or f"{cls.__name__}.{name}"
            continue
        for mentioned in mentioned_names(tree):
            names.setdefault(mentioned, f"{cls.__name__}.{name}")
    return names, unreadable
