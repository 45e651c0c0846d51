"""torch.nn loss modules -> torch_ext's (drop-in subclasses)."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from ..cross_entropy import CrossEntropyLoss
from ..regression_loss import HuberLoss, MSELoss, SmoothL1Loss
from ..triplet_margin_loss import TripletMarginLoss
from .report import FuseReport
from .rewrite import _has_hooks


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
    elif hasattr(nn, "LinearCrossEntropyLoss") and kind is nn.LinearCrossEntropyLoss:
        return _linear_cross_entropy_loss(module)
    else:
        return None, ""
    new.train(module.training)
    return new, ""


def _linear_cross_entropy_loss(module: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """torch_ext.LinearCrossEntropyLoss (which mirrors nn.LinearCrossEntropyLoss, PyTorch 2.13+)
    with the same arguments, built on meta, then given the module's own Linear (the same
    Parameter objects) and class-weight buffer."""
    from ..linear_cross_entropy import LinearCrossEntropyLoss  # noqa: PLC0415 (only where PyTorch has it)

    linear = module.linear
    try:
        new = LinearCrossEntropyLoss(
            linear.in_features, module.num_classes, out_features=tuple(module.out_features),
            bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype,
            reduction=module.reduction, weight=None, ignore_index=module.ignore_index,
            label_smoothing=module.label_smoothing, options=module.options,
        )
    except (TypeError, ValueError) as e:
        return None, f"torch_ext.LinearCrossEntropyLoss does not take these arguments ({e})"
    new.linear = linear
    new.weight = module.weight  # the class weights (a buffer; None when not given)
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

