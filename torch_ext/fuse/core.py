"""fuse(): the loss modules, then each nn.Linear: its uses, the activation after each, the swap."""
from __future__ import annotations

import logging
import warnings
from typing import Dict, List

from torch import nn

from ..integrations import fuse_whole_models, fused_linear_like, is_library_module, linear_like
from ..linear_act import FusedLinear
from ..mlp import GATED_ACTIVATIONS
from . import forwards, local
from .activations import _describe
from .losses import _replacement_loss
from .report import FuseReport
from .rewrite import _deepcopy, _fused_linear_from, _has_hooks, _identity_like, _set
from .traced import _is_builtin_other, _is_custom, _Model, _rewrite_forward, _uses_of_linear

logger = logging.getLogger("torch_ext.fuse")


def fuse(model: nn.Module, inplace: bool = False, *, return_report: bool = False):
    """Return `model` with its Linear + activation pairs as FusedLinear and its loss modules as
    torch_ext's (see torch_ext/fuse/__init__.py for what is found where).

    inplace=False (default) works on a deep copy: the result has the same parameter values and
    state_dict keys, and the model passed in is untouched. inplace=True changes `model` itself
    and keeps its Parameter objects (a loss module passed as the whole model is returned as a new
    module). The report (what was replaced, what was left alone and why) is logged to the
    ``torch_ext.fuse`` logger, and returned as ``(model, report)`` when return_report=True. A
    model with nothing to fuse comes back unchanged, with a warning.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
        >>> torch_ext.fuse(model)
        Sequential(
          (0): FusedLinear(in_features=8, out_features=16, bias=True, activation='gelu')
          (1): Identity()
          (2): Linear(in_features=16, out_features=2, bias=True)
        )
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

    # Linear + activation: nn.Sequential, Transformer layers and traced forwards (traced.py);
    # then, for the Linears those left alone in a custom module, that module on its own (local.py).
    pending: Dict[int, int] = {}  # a Linear left alone in a custom module -> its line in report.skipped
    whole_mlps = {id(mod._modules[name]) for mod in m.modules.values() if _read_locally(m, mod)
                  for name in local.whole_mlp_linears(mod, _linear_ok)}
    for key, paths in m.paths.items():
        linear = m.modules[key]
        if type(linear) is not nn.Linear and _is_custom(linear) and linear_like(linear):
            pending[key] = len(report.skipped)  # a library's Linear variant: only the local path knows it
            report.skipped.append(f"{_label(linear, paths)}: its module's forward does not pass it to an activation")
            continue
        if not isinstance(linear, nn.Linear) or isinstance(linear, FusedLinear):
            continue
        label = _label(linear, paths)
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
        if key in whole_mlps:  # its module's forward, an MLP, becomes one fused_mlp (local.py): more than pairs
            pending[key] = len(report.skipped)
            report.skipped.append(f"{label}: in an MLP that is its module's whole forward, left to its rewrite")
            continue
        uses = _uses_of_linear(m, linear)
        blocked = [u for u in uses if u.spec is None]
        specs = {u.spec for u in uses}
        if blocked or not uses:
            if any(_is_custom(p) for p in parents):
                pending[key] = len(report.skipped)
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
    _rewrite_locally(m, pending, report)
    if any(is_library_module(mod) for mod in m.modules.values()):
        fuse_whole_models(model, report)  # e.g. transformers' causal-LM loss from the hidden states
    for t in m.traced.values():
        if t.edits:
            _rewrite_forward(t)

    if type(model) is nn.Linear:
        report.skipped.append("model (Linear): the model itself, so nothing follows it")
    if report.replaced:
        logger.info("%s", report)
    else:
        reasons = "; ".join(report.skipped[:3]) or "no nn.Linear followed by an activation, no torch.nn loss module"
        warnings.warn(
            f"torch_ext.fuse: nothing to fuse in {type(model).__name__}, returned it unchanged ({reasons})",
            stacklevel=2,
        )
    return (model, report) if return_report else model


def _label(linear: nn.Module, paths: List[str]) -> str:
    if isinstance(linear, nn.Linear):
        return f"{', '.join(paths)} ({type(linear).__name__} {linear.in_features}->{linear.out_features})"
    # Conv1D: weight (in, out)
    return f"{', '.join(paths)} ({type(linear).__name__} {linear.weight.shape[0]}->{linear.weight.shape[1]})"


def _linear_ok(module) -> bool:
    return module is not None and (type(module) is nn.Linear or (_is_custom(module) and linear_like(module)))


def _read_locally(m: _Model, module: nn.Module) -> bool:
    """Whether local.py reads `module` on its own: a library's module, or other code whose own forward
    passes the fx path's checks (no branch on self.training or on data, no with-block)."""
    t = m.traced.get(id(module))
    return _is_custom(module) and (is_library_module(module) or (t is not None and t.rewritable))


def _rewrite_locally(m: _Model, pending: Dict[int, int], report: FuseReport) -> None:
    """local.py on each custom module holding a Linear the fx path left alone (and that the fx
    path does not rewrite itself); its lines in the report are replaced by what it did or, when
    it says why not more precisely, by that."""
    done: Dict[int, str] = {}  # report.skipped index -> new text ("" to drop)
    holders: Dict[int, nn.Module] = {}
    for key in pending:
        for path in m.paths[key]:
            parent = m.model.get_submodule(path.rpartition(".")[0])
            if _is_custom(parent):
                holders.setdefault(id(parent), parent)
    for parent in holders.values():
        t = m.traced.get(id(parent))
        if t is not None and t.edits:
            continue  # its forward is being rewritten from its trace
        if not _read_locally(m, parent):
            continue
        library = is_library_module(parent)
        parent_paths = m.paths.get(id(parent), [""])  # "" for the model itself
        ancestors = {}
        for pp in parent_paths:
            parts = pp.split(".") if pp else []
            for i in range(len(parts)):
                a = m.model.get_submodule(".".join(parts[:i]))
                ancestors[id(a)] = a
        p = local.plan(parent, list(ancestors.values()), _linear_ok)
        where = parent_paths[0] or "model"
        prefix = f"{where}." if parent_paths[0] else ""
        children = {name: sub for name, sub in parent._modules.items() if sub is not None and id(sub) in pending}
        if p.gated is not None:
            gate, up, down, act, kind = p.gated  # act: None for a function (F.silu)
            act_type = type(parent._modules[act]) if act else None
            parent.__class__ = forwards.gated_class(type(parent), gate, up, down, kind, act, act_type)
            for name in (gate, up, down):
                if id(parent._modules[name]) in pending:
                    done[pending[id(parent._modules[name])]] = ""
            what = act_type.__name__ if act else f"{GATED_ACTIVATIONS[kind]} function"
            report.replaced.append(
                f"{where} ({type(parent).__name__}: {gate}, {up}, {down} + {what}) -> torch_ext.fused_mlp {kind}")
            continue
        if p.chunked_gated is not None:
            gate_up, down, act, kind, drop = p.chunked_gated
            parent.__class__ = forwards.chunked_gated_class(type(parent), gate_up, down, kind, act,
                                                            type(parent._modules[act]), drop)
            for name in (gate_up, down):
                if id(parent._modules[name]) in pending:
                    done[pending[id(parent._modules[name])]] = ""
            report.replaced.append(
                f"{where} ({type(parent).__name__}: {gate_up} [gate; up], {down} + "
                f"{type(parent._modules[act]).__name__}) -> torch_ext.fused_mlp {kind}"
                + (f" (unfused while its dropout self.{drop} is active: training with p > 0)" if drop else ""))
            continue
        if p.edit is not None:
            parent.__class__ = forwards.edited_class(type(parent), p.edit)
            for name in p.edit.attrs:
                if id(parent._modules[name]) in pending:
                    done[pending[id(parent._modules[name])]] = ""
            report.replaced.append(f"{where} ({p.edit_label}")
        if any(id(parent._modules[name]) not in pending for name in p.pairs):
            p.pairs = {}  # one of them is handled elsewhere: its activation module must stay
        for name, (spec, act) in p.pairs.items():
            linear = parent._modules[name]
            fused = _fused_linear_from(linear, spec) if type(linear) is nn.Linear else fused_linear_like(linear, spec)
            setattr(parent, name, fused)
            done[pending[id(linear)]] = ""
            what = type(parent._modules[act]).__name__ if act else "function"
            report.replaced.append(
                f"{_label(linear, [prefix + name])} + {_describe(spec)} ({what}) -> {type(fused).__name__} "
                f"(in {type(parent).__name__}.{p.method}, rewritten on its own)")
        for act in {a for _, a in p.pairs.values() if a}:
            setattr(parent, act, _identity_like(parent._modules[act]))
        for name, sub in children.items():
            why = p.why_not.get(name) or p.problem
            if why and name not in p.pairs:
                # A library's module: what its own forward says replaces what the fx path could not
                # see; other code keeps the fx path's reason, with this one after it.
                line = f"{_label(sub, m.paths[id(sub)])}: " if library else f"{report.skipped[pending[id(sub)]]}; "
                done[pending[id(sub)]] = f"{line}on its own in {type(parent).__name__}: {why}"
    report.skipped[:] = [done.get(i, line) for i, line in enumerate(report.skipped) if done.get(i, line)]
