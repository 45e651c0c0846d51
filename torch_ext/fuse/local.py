"""Local rewriting: a module whose own forward passes a Linear's output straight to an activation
is rewritten on its own, read from its source, whatever the forwards above it are (Hugging Face's
``BertIntermediate``, ``ViTMLP``, ``LlamaMLP``, ``T5DenseActDense``, ``GPT2MLP``: their parents'
forwards take optional arguments and branch, so the fx path cannot rewrite them).

What is read, in the module's forward (no trace), first match wins:
1. a gated MLP: a forward that is exactly ``return self.down(self.act(self.gate(x)) * self.up(x))``
   (Llama, Mistral, Qwen2, Gemma) with silu / gelu / gelu_tanh: its class becomes a subclass
   whose forward is ``fused_mlp`` (swiglu / geglu / geglu_tanh) on the same Parameters
   (forwards.py gated_class).
   Or its variant whose first Linear holds [gate; up]: ``h = self.gate_up(x); a, b =
   h.chunk(2, dim=-1); c = b * self.act(a); return self.down(c)`` (Phi3MLP, GlmMLP; ModernBertMLP
   with a dropout before down): fused_mlp on that weight as it is (forwards.py chunked_gated_class).
2. a gated product inside a longer forward: ``a = self.act(self.gate(x)); b = self.up(x);
   h = a * b`` (T5DenseGatedActDense) -> ``h = gated_linear(...)``: one GEMM and the gated
   activation pass (an Edit of its source, forwards.py edited_class).
3. a whole MLP: ``h = self.fc1(x); h = self.act(h); y = self.fc2(h)`` (ViTMLP, GPT2MLP with its
   Conv1D) -> ``y = fused_mlp(...)`` (an Edit).
4. pairs: ``self.act(self.fc(x))``, or ``h = self.fc(x)`` directly followed by ``h = self.act(h)``
   (``h`` read nowhere else), where ``act`` is an activation module (fuse/activations.py
   ``activation_spec``): the Linear becomes a FusedLinear (a Conv1D a FusedConv1D) with the same
   Parameters, the activation module nn.Identity; the forward is not touched. A function
   (torch.tanh) is recognised but stays, since swapping modules cannot remove it from the forward.
A forward that only hands its input to transformers' ``apply_chunking_to_forward(self.ff_chunk, ...)``
(DistilBERT's FFN) is read in that method instead, for 4. only.
An Edit compiles the module's own forward source with three statements replaced (nothing else
changes: dropout, casts and branches around them stay); it is not done for a forward with
decorators or closures (super()), whose source alone is not the whole function.

"Could other code call them directly?": for 2. to 4., the attribute names of what is swapped or
edited must appear nowhere else in the module's methods, nor in any method of any module above it (an attribute
chain or a getattr string naming them; reading their .weight / .bias does not count). Where a
source cannot be read, nothing is done and the report says so.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from .activations import _FUNCTION_ACTIVATIONS, Spec, _describe, activation_spec
from .forwards import Edit
from .rewrite import _has_hooks
from .source import _own_methods, names_in_class, parsed

_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}
# Reading these attributes of a Linear stays valid after the swap (FusedLinear has them too).
_LINEAR_ATTRIBUTES = {"weight", "bias", "in_features", "out_features", "nf", "nx"}


@dataclass
class Plan:
    """What the local rewrite of one module would do, and why not for the rest."""

    module: nn.Module
    # linear -> (spec, activation module name)
    pairs: Dict[str, Tuple[Spec, Optional[str]]] = field(default_factory=dict)
    gated: Optional[Tuple[str, str, str, str, str]] = None  # (gate, up, down, activation, gated kind)
    # (gate_up, down, activation, gated kind, dropout before down or None)
    chunked_gated: Optional[Tuple[str, str, str, str, Optional[str]]] = None
    # Three statements of a longer forward replaced by one call (see Edit); with its report text.
    edit: Optional[Edit] = None
    edit_label: str = ""
    why_not: Dict[str, str] = field(default_factory=dict)  # linear name -> reason
    problem: str = ""  # why nothing in this module can be rewritten
    method: str = "forward"  # the method read: forward, or the one it hands its work to (_chunking_method)


def _self_attr(node) -> Optional[str]:
    """'a' for self.a."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _one_arg_call(node) -> bool:
    return (isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords
            and not isinstance(node.args[0], ast.Starred))


def _resolve(node, scope) -> object:
    """The object a dotted name (F.gelu, torch.nn.functional.silu) names in `scope`, else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id == "self" or node.id not in scope:
        return None
    obj = scope[node.id]
    for name in reversed(names):
        obj = getattr(obj, name, None)
    return obj


class _Reader:
    """One module's forward, as far as the local rewrite needs it."""

    def __init__(self, module: nn.Module, linear_ok, method: str = "forward"):
        self.module = module
        self.linear_ok = linear_ok  # nn.Linear (exact) or a library's Linear variant
        self.method = method  # the method read: forward, or the one forward hands all its work to
        self.fn = getattr(type(module), method)
        self.tree = parsed(self.fn)
        self.scope = getattr(self.fn, "__globals__", {})

    def sub(self, name: Optional[str]):
        return self.module._modules.get(name) if name else None

    def linear(self, node) -> Optional[str]:
        """'fc' for the call self.fc(x) of a Linear."""
        if not _one_arg_call(node):
            return None
        name = _self_attr(node.func)
        return name if name is not None and self.linear_ok(self.sub(name)) else None

    def activation(self, node) -> Optional[Tuple[Spec, Optional[str]]]:
        """(spec, module name or None) for the call self.act(h) or F.act(h) of an activation."""
        if not _one_arg_call(node):
            return None
        name = _self_attr(node.func)
        if name is not None:
            act = self.sub(name)
            spec = activation_spec(act) if act is not None and not _has_hooks(act) else None
            return (spec, name) if spec is not None else None
        fn = _resolve(node.func, self.scope)
        kind = _FUNCTION_ACTIVATIONS.get(fn) if callable(fn) else None
        # leaky_relu / gelu without their arguments: their defaults (0.01, exact gelu)
        return ((kind, 0.01), None) if kind is not None else None


def _pairs(r: _Reader, body: List[ast.stmt],
           activation=None) -> List[Tuple[ast.Call, ast.Call, str, Spec, Optional[str]]]:
    """(linear call, activation call, linear name, spec, activation name) for each pair in forward
    (`activation`: what counts as one, default r.activation)."""
    activation = activation or r.activation
    found = []
    for node in ast.walk(r.tree):
        act = activation(node)
        if act is None:
            continue
        arg = node.args[0]
        name = r.linear(arg)
        if name is not None:
            found.append((arg, node, name, *act))
            continue
        # h = self.fc(x); h = self.act(h): two consecutive top-level statements of forward
        if not isinstance(arg, ast.Name):
            continue
        for i, stmt in enumerate(body[1:], 1):
            prev = body[i - 1]
            if not (isinstance(stmt, ast.Assign) and stmt.value is node and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)):
                continue
            if not (isinstance(prev, ast.Assign) and len(prev.targets) == 1 and isinstance(prev.targets[0], ast.Name)
                    and prev.targets[0].id == arg.id):
                continue
            name = r.linear(prev.value)
            rebinds = stmt.targets[0].id == arg.id
            read_later = any(isinstance(n, ast.Name) and n.id == arg.id for s in body[i + 1:] for n in ast.walk(s))
            if name is not None and (rebinds or not read_later):
                found.append((prev.value, node, name, *act))
    return found


def _only_argument(r: _Reader) -> Optional[str]:
    """The name of forward's one argument besides self (no defaults, *args, **kwargs), or None."""
    args = r.tree.body[0].args
    if len(args.args) != 2 or args.vararg or args.kwarg or args.kwonlyargs or args.defaults or args.posonlyargs:
        return None
    return args.args[1].arg


def _assigned(stmt) -> Optional[str]:
    """'h' for the statement `h = ...` (one name), else None."""
    ok = isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
    return stmt.targets[0].id if ok else None


def _gated_factors(r: _Reader, product, functions: bool = False):
    """(activation call, other factor, (spec, activation module name)) for each order of the
    product `self.act(...) * other` whose activation module is a gated one's (silu, gelu,
    gelu_tanh), with `functions` also `F.silu(...) * other` (module name None); nothing when
    `product` is not such a product."""
    if not (isinstance(product, ast.BinOp) and isinstance(product.op, ast.Mult)):
        return
    for act_call, other in ((product.left, product.right), (product.right, product.left)):
        act = r.activation(act_call)
        if act is not None and (functions or act[1] is not None) and act[0][0] in _GATED:
            yield act_call, other, act


def _gated(r: _Reader, body: List[ast.stmt]) -> Optional[Tuple[str, str, str, str, Spec]]:
    """The gated MLP forward `return self.down(self.act(self.gate(x)) * self.up(x))`, also as
    `h = self.down(...); return h` or `h = self.act(self.gate(x)) * self.up(x); return
    self.down(h)` (Llama 4's), the activation a module or a function (`F.silu(self.w1(x))`, as
    torchtitan's and Meta's Llama FeedForward): (gate, up, down, act module name or None, spec),
    or None."""
    x = _only_argument(r)
    if x is None or not body or not isinstance(body[-1], ast.Return):
        return None
    ret = body[-1].value
    if len(body) == 1:
        expr, product = ret, None
    elif len(body) == 2 and (h := _assigned(body[0])) is not None:
        if isinstance(ret, ast.Name) and ret.id == h:
            expr, product = body[0].value, None
        elif r.linear(ret) and isinstance(ret.args[0], ast.Name) and ret.args[0].id == h:
            expr, product = ret, body[0].value
        else:
            return None
    else:
        return None
    down = r.linear(expr)
    if down is None or type(r.sub(down)) is not nn.Linear:
        return None
    for act_call, up_call, act in _gated_factors(r, expr.args[0] if product is None else product, functions=True):
        gate, up = r.linear(act_call.args[0]), r.linear(up_call)
        on_x = all(isinstance(c.args[0], ast.Name) and c.args[0].id == x for c in (act_call.args[0], up_call))
        if gate and up and on_x and gate != up and type(r.sub(gate)) is type(r.sub(up)) is nn.Linear:
            return gate, up, down, act[1], act[0]
    return None


def _chunked_gated(r: _Reader, body: List[ast.stmt]):
    """The gated MLP whose first Linear holds [gate; up] (Phi3MLP, GlmMLP, ModernBertMLP): a forward
    that is exactly `h = self.gate_up(x)`, `a, b = h.chunk(2, dim=-1)` (or `a, b =
    self.gate_up(x).chunk(2, dim=-1)`), `c = b * self.act(a)` (either order; or the product inside
    the return) and `return self.down(c)`, optionally `self.down(self.drop(c))` with drop an
    nn.Dropout; names reused or not: (gate_up, down, act, spec, drop or None), or None."""
    x = _only_argument(r)
    if x is None:
        return None

    if not body or not isinstance(body[-1], ast.Return):
        return None
    down_call, rest = body[-1].value, list(body[:-1])
    if not r.linear(down_call):
        return None
    inner, drop = down_call.args[0], None
    if _one_arg_call(inner) and type(r.sub(_self_attr(inner.func))) is nn.Dropout:
        drop, inner = _self_attr(inner.func), inner.args[0]
    product = inner
    if isinstance(inner, ast.Name) and rest and _assigned(rest[-1]) == inner.id:
        product = rest.pop().value
    # a, b = <h or self.gate_up(x)>.chunk(2, dim=-1)
    if not (rest and isinstance(rest[-1], ast.Assign) and len(rest[-1].targets) == 1
            and isinstance(rest[-1].targets[0], ast.Tuple) and len(rest[-1].targets[0].elts) == 2
            and all(isinstance(e, ast.Name) for e in rest[-1].targets[0].elts)):
        return None
    split = rest.pop()
    a, b = (e.id for e in split.targets[0].elts)
    chunk = split.value
    if not (isinstance(chunk, ast.Call) and isinstance(chunk.func, ast.Attribute) and chunk.func.attr == "chunk"):
        return None
    source = chunk.func.value
    if isinstance(source, ast.Name) and len(rest) == 1 and _assigned(rest[0]) == source.id:
        gate_up_call = rest.pop().value
    else:
        gate_up_call = source
    if rest or not r.linear(gate_up_call):
        return None
    if not (isinstance(gate_up_call.args[0], ast.Name) and gate_up_call.args[0].id == x):
        return None
    values = list(chunk.args) + [k.value for k in chunk.keywords]
    names = [None] * len(chunk.args) + [k.arg for k in chunk.keywords]
    if not (len(values) == 2 and names[1] in (None, "dim") and names[0] in (None, "chunks")
            and all(isinstance(v, (ast.Constant, ast.UnaryOp)) for v in values)):
        return None
    try:
        n_chunks, dim = (ast.literal_eval(v) for v in values)
    except ValueError:
        return None
    if (n_chunks, dim) != (2, -1) or a == b:
        return None
    for act_call, other, act in _gated_factors(r, product):
        if not (isinstance(act_call.args[0], ast.Name) and act_call.args[0].id == a
                and isinstance(other, ast.Name) and other.id == b):
            continue
        # (The forward is exactly these statements, each matched whole: h, a and b are read
        # nowhere else, whatever names they reuse, as Phi3MLP's up_states does.)
        gate_up, down = r.linear(gate_up_call), r.linear(down_call)
        gu, d = r.sub(gate_up), r.sub(down)
        if gate_up == down or not type(gu) is type(d) is nn.Linear or gu.out_features != 2 * d.in_features:
            return None
        return gate_up, down, act[1], act[0], drop
    return None


def _gated_product(r: _Reader, body: List[ast.stmt]):
    """Three consecutive statements `a = self.act(self.gate(x))`, `b = self.up(x)` (either order),
    `h = a * b` (T5DenseGatedActDense), `a` and `b` read nowhere else: (index of the first, the
    three call nodes, gate, up, act, spec, x, h), or None."""
    for i in range(len(body) - 2):
        s1, s2, s3 = body[i:i + 3]
        names = [_assigned(s) for s in (s1, s2, s3)]
        if None in names:
            continue
        for (sa, a), (sb, b) in (((s1, names[0]), (s2, names[1])), ((s2, names[1]), (s1, names[0]))):
            act = r.activation(sa.value)
            if act is None or act[1] is None or act[0][0] not in _GATED:
                continue
            gate_call = sa.value.args[0]
            gate, up = r.linear(gate_call), r.linear(sb.value)
            if not (gate and up and gate != up and type(r.sub(gate)) is type(r.sub(up)) is nn.Linear):
                continue
            x = gate_call.args[0]
            if not (isinstance(x, ast.Name) and isinstance(sb.value.args[0], ast.Name) and sb.value.args[0].id == x.id):
                continue
            prod = s3.value
            if not (isinstance(prod, ast.BinOp) and isinstance(prod.op, ast.Mult) and isinstance(prod.left, ast.Name)
                    and isinstance(prod.right, ast.Name) and {prod.left.id, prod.right.id} == {a, b} and a != b
                    and x.id not in (a, b)):
                continue
            reads = [n for n in ast.walk(r.tree)
                     if isinstance(n, ast.Name) and n.id in (a, b) and isinstance(n.ctx, ast.Load)]
            if len(reads) != 2:
                continue
            return i, (sa.value, gate_call, sb.value), gate, up, act[1], act[0], x.id, names[2]
    return None


def _mlp_sequence(r: _Reader, body: List[ast.stmt]):
    """Three consecutive statements `h = self.fc1(x)`, `h = self.act(h)`, `y = self.fc2(h)` (ViTMLP,
    GPT2MLP), fc1 and fc2 both nn.Linear or both a library's Linear variant, `h` read nowhere after
    unless `y` rebinds it: (index, the three call nodes, fc1, fc2, act, spec, x, y), or None."""
    for i in range(len(body) - 2):
        s1, s2, s3 = body[i:i + 3]
        if not all(isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
                   for s in (s1, s2, s3)):
            continue
        h, h2, y = (s.targets[0].id for s in (s1, s2, s3))
        fc1, fc2 = r.linear(s1.value), r.linear(s3.value)
        act = r.activation(s2.value)
        if not (fc1 and fc2 and act and act[1] and fc1 != fc2 and type(r.sub(fc1)) is type(r.sub(fc2))):
            continue
        if type(r.sub(fc1)) is not nn.Linear and isinstance(r.sub(fc1), nn.Linear):
            continue  # an nn.Linear subclass (FalconLinear): fused_mlp's layer checks take exact Linears only
        x = s1.value.args[0]
        a2, a3 = s2.value.args[0], s3.value.args[0]
        if not (isinstance(x, ast.Name) and h == h2 and isinstance(a2, ast.Name) and a2.id == h
                and isinstance(a3, ast.Name) and a3.id == h):
            continue
        read_later = any(isinstance(n, ast.Name) and n.id == h for st in body[i + 3:] for n in ast.walk(st))
        if y != h and read_later:
            continue
        return i, (s1.value, s2.value, s3.value), fc1, fc2, act[1], act[0], x.id, y
    return None


def _without_docstring(body: List[ast.stmt]) -> List[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        return body[1:]
    return body


def _chunking_method(r: _Reader, body: List[ast.stmt], methods) -> Optional[str]:
    """'ff_chunk' for a forward that hands work to transformers' helper (known by name: this module
    does not import transformers) as `apply_chunking_to_forward(self.ff_chunk, ...)`, ff_chunk an
    own method of the class, and calls no Linear itself: exactly `return apply_chunking_to_forward(
    self.ff_chunk, ..., x)` (DistilBERT's FFN), or among other statements (ALBERT's layer); else
    None. Only pairs are rewritten there: swapping a Linear and its activation is the same function
    whatever the chunking passes in."""
    if any(isinstance(n, ast.Call) and r.linear(n) for n in ast.walk(r.tree)):
        return None
    found = None
    for call in ast.walk(r.tree):
        if not (isinstance(call, ast.Call) and call.args and not call.keywords):
            continue
        fn = _resolve(call.func, r.scope)
        if not (callable(fn) and getattr(fn, "__name__", "") == "apply_chunking_to_forward"
                and getattr(fn, "__module__", "").startswith("transformers.")):
            continue
        method = _self_attr(call.args[0])
        if method is None or method == "forward" or method not in methods or found not in (None, method):
            return None
        found = method
    return found


def whole_mlp_linears(module: nn.Module, linear_ok) -> Tuple[str, ...]:
    """The Linears (names) of an MLP that is the module's whole forward and that plan() makes one
    fused_mlp (a gated MLP; `h = fc1(x); h = act(h); y = fc2(h); return y`), or (): the fx path
    leaves them to it, as its pairs would fuse less (a FusedLinear gate and a plain up projection;
    a FusedLinear fc1 whose output fc2 saves again). plan() decides, so nothing is handed over
    that it then refuses; none of these rewrites reads the modules above (no ancestors given)."""
    if sum(1 for sub in module._modules.values() if sub is not None and linear_ok(sub)) < 2:
        return ()  # (no MLP: spares plan() on every other module)
    p = plan(module, [], linear_ok)
    if p.gated is not None:
        return p.gated[:3]
    if p.chunked_gated is not None:
        return p.chunked_gated[:2]
    if p.edit is None or p.edit.helper != "mlp" or p.edit.index != 0:
        return ()
    r = _Reader(module, linear_ok)
    body = _without_docstring(r.tree.body[0].body)
    last = body[-1]
    whole = (len(body) == 4 and p.edit.x == _only_argument(r) and isinstance(last, ast.Return)
             and isinstance(last.value, ast.Name) and last.value.id == p.edit.target)
    return p.edit.attrs if whole else ()


def plan(module: nn.Module, ancestors: List[nn.Module], linear_ok) -> Plan:
    """What can be rewritten in `module` alone (see the module docstring); `ancestors`: every
    module above it, whose methods must not name what is swapped."""
    p = Plan(module)
    methods = _own_methods(type(module))
    if "forward" not in methods:
        p.problem = "its forward is not its own source code"
        return p
    r = _Reader(module, linear_ok)
    if r.tree is None or not isinstance(r.tree.body[0], ast.FunctionDef):
        p.problem = f"the source of {type(module).__name__}.forward is not available"
        return p
    body = _without_docstring(r.tree.body[0].body)
    # A forward that only hands its input to transformers' apply_chunking_to_forward(self.<method>,
    # ...) (DistilBERT's FFN): its pairs are read in that method; only pairs are rewritten there
    # (the other rewrites replace forward's own statements).
    chunked = _chunking_method(r, body, methods)
    if chunked is not None:
        r = _Reader(module, linear_ok, chunked)
        if r.tree is None or not isinstance(r.tree.body[0], ast.FunctionDef):
            p.problem = f"the source of {type(module).__name__}.{chunked} is not available"
            return p
        body = _without_docstring(r.tree.body[0].body)
        p.method = chunked

    # Mentions allowed: the calls being rewritten and reads of a Linear's weight/bias.
    allowed = set()
    for node in ast.walk(r.tree):
        if (isinstance(node, ast.Attribute) and node.attr in _LINEAR_ATTRIBUTES
                and r.linear_ok(r.sub(_self_attr(node.value)))):
            allowed.add(id(node.value))

    def elsewhere(names, sites, above: bool = True) -> str:
        """Where code other than `sites` (call nodes) names one of `names` ("" if nowhere): in
        this class's code, and with `above` in the classes of the modules above it."""
        ok = allowed | {id(c.func) for c in sites}
        for node in ast.walk(r.tree):
            if isinstance(node, ast.Attribute) and node.attr in names and id(node) not in ok:
                return f"{type(module).__name__}.{r.method} also uses self.{node.attr}"
            if isinstance(node, ast.Constant) and node.value in names and isinstance(node.value, str):
                return f"{type(module).__name__}.{r.method} names {node.value!r}"
        for owner in [module] + (ancestors if above else []):
            if type(owner).__module__.startswith("torch."):
                continue  # torch.nn's containers: no code that names attributes of their children
            found, unreadable = names_in_class(type(owner), (r.method,) if owner is module else ())
            for name in names:
                if name in found:
                    return f"{found[name]} names {name!r} (it may call it directly)"
            if unreadable:
                return f"the source of {unreadable} is not available, so fuse() cannot tell whether it calls it"
        return ""

    # The gated MLPs replace forward whole: not a decorated one (e.g. @torch.no_grad(), more than
    # its body), nor where forward hands its work to another method. No `elsewhere` check for
    # them: no module is swapped, so code above that names the Linears, such as an _init_weights,
    # still finds them as they were. The edits of three statements of forward below swap no
    # module either: they check only this class's own code (which their edit could bypass).
    whole_forward = chunked is None and not r.tree.body[0].decorator_list
    g = _gated(r, body) if whole_forward else None
    if g is not None:
        gate, up, down, act, spec = g
        why = ""
        if (r.sub(gate).bias is None) != (r.sub(up).bias is None):
            why = "only one of its gate and up projections has a bias"
        if any(_has_hooks(r.sub(n)) for n in (gate, up, down) + ((act,) if act else ())):
            why = why or "a module of its gated MLP has hooks"
        if not why:
            p.gated = (gate, up, down, act, _GATED[spec[0]])
            _rest_not_fused(p, module, linear_ok, done=(gate, up, down))
            return p
        for name in (gate, up, down):
            p.why_not[name] = why

    cg = _chunked_gated(r, body) if whole_forward and g is None else None
    if cg is not None:
        gate_up, down, act, spec, drop = cg
        modules = (gate_up, down, act) + ((drop,) if drop else ())
        why = "a module of its gated MLP has hooks" if any(_has_hooks(r.sub(n)) for n in modules) else ""
        if not why:
            p.chunked_gated = (gate_up, down, act, _GATED[spec[0]], drop)
            _rest_not_fused(p, module, linear_ok, done=(gate_up, down))
            return p
        for name in (gate_up, down):
            p.why_not[name] = why

    gp = _gated_product(r, body) if g is None and cg is None and chunked is None else None
    fn = type(module).forward
    if gp is not None and not (fn.__code__.co_freevars or r.tree.body[0].decorator_list):
        index, calls, gate, up, act, spec, x, target = gp
        why = elsewhere({gate, up, act}, [calls[0], calls[1], calls[2]], above=False)
        if (r.sub(gate).bias is None) != (r.sub(up).bias is None):
            why = why or "only one of its gate and up projections has a bias"
        if any(_has_hooks(r.sub(n)) for n in (gate, up, act)):
            why = why or "a module of its gated product has hooks"
        if not why:
            kind = _GATED[spec[0]]
            p.edit = Edit(index, 3, target, "gated_linear", (gate, up), x, (kind,), act, type(r.sub(act)))
            p.edit_label = (f"{type(module).__name__}: {gate}, {up} + {type(r.sub(act)).__name__}) "
                            f"-> one GEMM + torch_ext's gated activation {kind} (in its forward)")
            _rest_not_fused(p, module, linear_ok, done=(gate, up))
            return p
        for name in (gate, up):
            p.why_not[name] = why

    seq = _mlp_sequence(r, body) if g is None and cg is None and gp is None and chunked is None else None
    if seq is not None and not (fn.__code__.co_freevars or r.tree.body[0].decorator_list):
        index, calls, fc1, fc2, act, spec, x, target = seq
        why = elsewhere({fc1, fc2, act}, list(calls), above=False)
        if any(_has_hooks(r.sub(n)) for n in (fc1, fc2, act)):
            why = why or "a module of its MLP has hooks"
        if not why:
            # Conv1D stores its weight (in, out): fused_mlp gets its transposed view (no copy).
            p.edit = Edit(index, 3, target, "mlp", (fc1, fc2), x, (*spec, not isinstance(r.sub(fc1), nn.Linear)), act,
                          type(r.sub(act)))
            p.edit_label = (f"{type(module).__name__}: {fc1}, {fc2} + {type(r.sub(act)).__name__}) "
                            f"-> torch_ext.fused_mlp {_describe(spec)} (in its forward)")
            _rest_not_fused(p, module, linear_ok, done=(fc1, fc2))
            return p

    # Inside a with-block (autocast, no_grad) FusedLinear would round differently: left alone.
    in_with = {id(n) for w in ast.walk(r.tree) if isinstance(w, (ast.With, ast.AsyncWith)) for n in ast.walk(w)}
    pairs = []
    for site in _pairs(r, body):
        if site[4] is None:
            # Swapping modules cannot take a function call out of the forward.
            p.why_not[site[2]] = (f"{type(module).__name__}.{r.method} applies a function activation to it, "
                                  "which only a traced forward can drop")
        elif id(site[1]) in in_with:
            p.why_not[site[2]] = f"{type(module).__name__}.{r.method} calls it inside a with-block"
        else:
            pairs.append(site)
    by_linear: Dict[str, list] = {}
    for site in pairs:
        by_linear.setdefault(site[2], []).append(site)
    acts: Dict[str, list] = {}
    for site in pairs:
        if site[4] is not None:
            acts.setdefault(site[4], []).append(site)
    # A Linear is rewritten when every use of it is a pair with one activation, and an activation
    # module (to become Identity) only when every use of it is a pair whose Linear is rewritten.
    ok = {}
    for name, sites in by_linear.items():
        calls = sum(1 for n in ast.walk(r.tree) if isinstance(n, ast.Call) and _self_attr(n.func) == name)
        if name in p.why_not:
            continue
        if _has_hooks(r.sub(name)):
            p.why_not[name] = "has hooks"
        elif calls != len(sites):
            p.why_not[name] = f"{type(module).__name__}.{r.method} also calls it without an activation after it"
        elif len({(s[3], s[4]) for s in sites}) > 1:
            p.why_not[name] = f"used {len(sites)} times with different activations"
        else:
            why = elsewhere({name}, [s[0] for s in sites])
            if why:
                p.why_not[name] = why
            else:
                ok[name] = sites
    changed = True
    while changed:
        changed = False
        for act, sites in acts.items():
            why = ""
            if any(s[2] not in ok for s in sites):
                why = f"its activation self.{act} also follows a Linear that is not fused"
            else:
                why = elsewhere({act}, [s[1] for s in sites])
            if why:
                for s in sites:
                    if s[2] in ok:
                        del ok[s[2]]
                        p.why_not[s[2]] = why
                        changed = True
    p.pairs = {name: (sites[0][3], sites[0][4]) for name, sites in ok.items()}
    _rest_not_fused(p, module, linear_ok, done=tuple(p.pairs), r=r, body=body)
    return p


def _rest_not_fused(p: Plan, module: nn.Module, linear_ok, done, r: Optional[_Reader] = None, body=()) -> None:
    """Why the module's other Linears stay: what their output goes to, where that is a module
    fuse() does not take as an activation (Mish, say), else no activation at all."""
    others = {}
    if r is not None:
        def any_module(node):
            name = _self_attr(node.func) if _one_arg_call(node) else None
            sub = r.sub(name)
            return ((None, 0.0), name) if sub is not None and not linear_ok(sub) else None

        others = {site[2]: site[4] for site in _pairs(r, body, any_module)}
    method = r.method if r is not None else "forward"
    for name, sub in module._modules.items():
        if name not in done and name not in p.why_not and linear_ok(sub):
            if name in others:
                act = type(module._modules[others[name]]).__name__
                p.why_not[name] = (f"{type(module).__name__}.{method} passes its output to self.{others[name]} "
                                   f"({act}), not one of FusedLinear's activations (or it failed fuse's numerical "
                                   "check)")
            else:
                p.why_not[name] = f"{type(module).__name__}.{method} does not pass its output to a supported activation"
