"""fuse(): the loss modules, then each nn.Linear: its uses, the activation after each, the swap."""
from __future__ import annotations

import logging
import warnings

from torch import nn

from ..linear_act import FusedLinear
from .activations import _describe
from .losses import _replacement_loss
from .report import FuseReport
from .rewrite import _deepcopy, _fused_linear_from, _has_hooks, _set
from .traced import _is_builtin_other, _Model, _rewrite_forward, _uses_of_linear

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
