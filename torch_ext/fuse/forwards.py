"""The forwards fuse() gives a module it rewrites on its own (local.py decides where): a subclass
of the module's class (isinstance, its other methods and state_dict stay) whose forward is
- ``fused_mlp`` on its gate / up / down Linears (gated_class) or on its [gate; up] and down
  Linears (chunked_gated_class), or
- its own forward source with three statements replaced by one call (edited_class, Edit):
  ``gated_linear`` (one GEMM on [gate; up] and the gated activation) or ``mlp`` (fused_mlp).
Each pickles as the original class plus what was changed (rewrite.fused_subclass).
"""
from __future__ import annotations

import ast
import copy
import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from ..linear_act import activation_function, fused_linear
from ..mlp import GATED_ACTIVATIONS, fused_mlp, gated_activation
from .rewrite import _has_hooks, fused_subclass, rebuilt
from .source import parsed


@dataclass(frozen=True)
class Edit:
    """Replace `count` top-level statements of forward from `index` (docstring not counted) by
    `target = self._torch_ext_<helper>(self.<attrs[0]>, self.<attrs[1]>, <x>, *consts, act=self.<act>)`,
    the helper bound to act_type: the activation module's type when fused (act None: an Edit
    pickled before the activation was recorded)."""

    index: int
    count: int
    target: str
    helper: str
    attrs: Tuple[str, ...]
    x: str
    consts: Tuple = ()
    act: Optional[str] = None
    act_type: Optional[type] = None


def as_found(*modules, transposed: bool = False) -> bool:
    """Whether the layers a fused forward reads the weights of are still what fuse() fused: plain
    nn.Linear (transformers' Conv1D where `transposed`), without hooks. A layer replaced after
    fuse() (a LoRA adapter or a quantized wrapper, as PEFT and bitsandbytes install them) or hooked
    (activation statistics, pruning) would be skipped by reading its .weight, so the fused forwards
    then compute through the layers themselves, as the module's own forward does."""
    if transposed:  # (by name: this module does not import transformers)
        return all(type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")
                   and not _has_hooks(m) for m in modules)
    return all(unchanged(m, nn.Linear) for m in modules)


def unchanged(module: nn.Module, kind: type) -> bool:
    """Whether `module` is still of class `kind` (not a subclass or a wrapper) and has no hooks."""
    return type(module) is kind and not _has_hooks(module)


def _unfused_because_changed(where: str) -> None:
    warnings.warn(f"torch_ext.fuse: a layer that {where} reads was replaced or hooked after fuse(); it runs "
                  "unfused, through the layers (apply such changes before fuse(), which then leaves them alone)",
                  stacklevel=3)


def gated_class(cls, gate: str, up: str, down: str, kind: str, act: Optional[str] = None, act_type=None):
    """A subclass of cls (isinstance, other methods and state_dict stay) whose forward is fused_mlp
    on its own gate / up / down Linears; fc1's weight is [gate; up] concatenated on each call, so
    the Parameters and state_dict keys stay those of the original (the copy is of the weights,
    small next to the activations fused_mlp saves). Where a Linear was replaced or hooked since
    (as_found), or the activation module `act` (of type act_type when fused) was, the class's own
    forward runs."""

    def forward(self, x):
        g, u, d = self._modules[gate], self._modules[up], self._modules[down]
        if not as_found(g, u, d) or (act is not None and not unchanged(self._modules.get(act), act_type)):
            _unfused_because_changed(f"{cls.__name__}'s fused_mlp")
            return cls.forward(self, x)
        bias = None if g.bias is None else torch.cat([g.bias, u.bias])
        return fused_mlp(x, torch.cat([g.weight, u.weight]), bias, d.weight, d.bias, kind)

    return fused_subclass(
        cls, f"{cls.__name__} with its forward as torch_ext.fused_mlp ({kind}), by torch_ext.fuse.",
        _rebuild_gated, (gate, up, down, kind, act, act_type), forward)


def _rebuild_gated(cls, gate, up, down, kind, *rest):
    """rest: (act, act_type, state), or (state,) from a pickle that did not record the activation."""
    *act, state = rest
    return rebuilt(gated_class(cls, gate, up, down, kind, *act), state)


def chunked_gated_class(cls, gate_up: str, down: str, kind: str, act: str, act_type, drop: Optional[str] = None):
    """A subclass of cls whose forward is fused_mlp on its gate_up / down Linears, for the gated MLP
    whose first Linear already holds [gate; up] (Phi-3, GLM, ModernBERT: ``gate, up =
    self.gate_up_proj(x).chunk(2, dim=-1)``): that weight is fused_mlp's first one as it is (no
    copy). Where a Linear or the activation module `act` was replaced or hooked since (as_found),
    or the nn.Dropout `drop` between the product and down is active (training with p > 0:
    fused_mlp has no dropout there), the class's own forward runs."""

    def forward(self, x):
        gu, d = self._modules[gate_up], self._modules[down]
        if not as_found(gu, d) or not unchanged(self._modules.get(act), act_type) or (
                drop is not None and not unchanged(self._modules.get(drop), nn.Dropout)):
            _unfused_because_changed(f"{cls.__name__}'s fused_mlp")
            return cls.forward(self, x)
        if drop is not None and self._modules[drop].training and self._modules[drop].p > 0:
            return cls.forward(self, x)  # (documented: the report names the dropout)
        return fused_mlp(x, gu.weight, gu.bias, d.weight, d.bias, kind)

    return fused_subclass(
        cls, f"{cls.__name__} with its forward as torch_ext.fused_mlp ({kind}), by torch_ext.fuse.",
        _rebuild_chunked_gated, (gate_up, down, kind, act, act_type, drop), forward)


def _rebuild_chunked_gated(cls, gate_up, down, kind, act, act_type, drop, state):
    return rebuilt(chunked_gated_class(cls, gate_up, down, kind, act, act_type, drop), state)


def _act_changed(act: Optional[nn.Module], act_type: Optional[type]) -> bool:
    """Whether the activation module of an edited forward was replaced or hooked since fuse()."""
    return act is not None and not unchanged(act, act_type)


def gated_linear(gate: nn.Linear, up: nn.Linear, x, kind: str, act=None, act_type=None):
    """``act(gate(x)) * up(x)`` as one GEMM on [gate; up] and torch_ext's gated activation pass
    (mlp_act_fwd, differentiable), with the Linears' own Parameters (concatenated per call); through
    the layers themselves where one, or the activation module `act`, was replaced or hooked since
    fuse() (as_found)."""
    if not as_found(gate, up) or _act_changed(act, act_type):
        _unfused_because_changed("a gated activation's GEMM")
        act = act if act is not None else activation_function(GATED_ACTIVATIONS[kind])
        return act(gate(x)) * up(x)
    bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])
    pre = fused_linear(x, torch.cat([gate.weight, up.weight]), bias, activation="none")
    return gated_activation(pre, GATED_ACTIVATIONS[kind])


def mlp(fc1: nn.Module, fc2: nn.Module, x, activation: str, negative_slope: float, transposed: bool = False,
        act=None, act_type=None):
    """``fc2(act(fc1(x)))`` as torch_ext.fused_mlp on the Linears' own Parameters (`transposed`:
    weights stored (in, out), as transformers' Conv1D: their .t() views); through the layers
    themselves where one, or the activation module `act`, was replaced or hooked since fuse()
    (as_found)."""
    if not as_found(fc1, fc2, transposed=transposed) or _act_changed(act, act_type):
        _unfused_because_changed("a fused_mlp")
        act = act if act is not None else activation_function(activation, negative_slope)
        return fc2(act(fc1(x)))
    w1, w2 = (fc1.weight.t(), fc2.weight.t()) if transposed else (fc1.weight, fc2.weight)
    return fused_mlp(x, w1, fc1.bias, w2, fc2.bias, activation, negative_slope)


_HELPERS = {"gated_linear": gated_linear, "mlp": mlp}


def edited_class(cls, edit: Edit, build: bool = True):
    """A subclass of cls whose forward is cls.forward's own source with `edit` applied; for a
    module being unpickled (build=False), compiled on its first call. isinstance, the other
    methods and the state_dict stay."""
    return fused_subclass(
        cls, f"{cls.__name__} with {', '.join(edit.attrs)} through torch_ext ({edit.helper}), by torch_ext.fuse.",
        _rebuild_edited, (edit,), _edited_forward(cls, edit) if build else None,
        build=lambda module: _edited_forward(cls, edit),
        **{f"_torch_ext_{edit.helper}": staticmethod(functools.partial(_HELPERS[edit.helper], act_type=edit.act_type))},
    )


@functools.cache
def _edited_forward(cls, edit: Edit):
    """cls.forward's source with `edit` applied, compiled with the globals of cls.forward (a copy:
    nothing is added to the library's module; and since torch.compile looks globals up in that
    module by name, the new call is a method, not a global). One per class and edit: the layers
    of a model share it."""
    fn = cls.forward
    tree = copy.deepcopy(parsed(fn))
    fdef = tree.body[0]
    body = fdef.body
    has_docstring = body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    start = edit.index + (1 if has_docstring else 0)

    def self_attr(name):
        return ast.Attribute(ast.Name("self", ast.Load()), name, ast.Load())

    call = ast.Call(func=self_attr(f"_torch_ext_{edit.helper}"),
                    args=[self_attr(a) for a in edit.attrs] + [ast.Name(edit.x, ast.Load())]
                    + [ast.Constant(c) for c in edit.consts],
                    keywords=[ast.keyword("act", self_attr(edit.act))] if edit.act else [])
    body[start:start + edit.count] = [ast.Assign(targets=[ast.Name(edit.target, ast.Store())], value=call)]
    fdef.decorator_list = []
    ast.fix_missing_locations(tree)
    scope = dict(fn.__globals__)
    exec(compile(tree, inspect.getsourcefile(fn) or "<torch_ext.fuse>", "exec"), scope)  # noqa: S102 (cls.forward's own source)
    return scope[fdef.name]


def _rebuild_edited(cls, edit, state):
    return rebuilt(edited_class(cls, edit, build=False), state)
