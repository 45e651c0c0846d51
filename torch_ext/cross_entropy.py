"""Fused cross-entropy: ``F.cross_entropy`` with every option, plus ``z_loss``.

Ops (csrc/ops.cpp): ``torch_ext::cross_entropy_fwd`` and ``torch_ext::cross_entropy_bwd``. This
file gives them their fake kernels and autograd (``CrossEntropyFunction``, also registered on the
forward op), the functional ``cross_entropy`` and the module ``CrossEntropyLoss``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _C

from ._common import (
    autocast_to_float32, direct_when_no_grad, divide_by_items, forms_grad_in_forward, forward_with_ctx, needs_autograd,
    reduction_for_items, register_no_double_backward, resolve_reduction,
)

_fwd_op = direct_when_no_grad(torch.ops.torch_ext.cross_entropy_fwd.default)
_bwd_op = direct_when_no_grad(torch.ops.torch_ext.cross_entropy_bwd.default)

# Device types whose eager path forms the input's gradient in the forward kernel (reductions mean
# and sum; see _C._cross_entropy_grad_in_forward): all that have the kernels.
GRAD_IN_FORWARD_DEVICES = frozenset({"cpu", "cuda"})


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_args(op, input, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    """The checks of csrc/cpu/cross_entropy.cpp, for fake tensors (torch.compile tracing).
    Returns (loss shape of reduction='none', rows, class-probability targets?)."""
    torch._check(input.dim() >= 1, lambda: f"{op}: input must have shape (C), (N, C) or (N, C, d1, ..., dk), got a 0-D tensor")
    class_dim = 0 if input.dim() == 1 else 1
    classes = input.shape[class_dim]
    loss_shape = [s for d, s in enumerate(input.shape) if d != class_dim]
    probabilities = target.is_floating_point()
    if probabilities:
        torch._check(
            target.shape == input.shape,
            lambda: f"{op}: a floating-point target holds class probabilities and must have input's shape {tuple(input.shape)}, got {tuple(target.shape)}",
        )
        torch._check(target.dtype == input.dtype, lambda: f"{op}: target has dtype {target.dtype} but input has dtype {input.dtype}; they must match")
        if ignore_index >= 0:
            raise ValueError(f"{op}: ignore_index is not supported for class-probability (floating point) targets; got ignore_index={ignore_index}")
    else:
        torch._check(
            target.dtype in (torch.int64, torch.uint8),
            lambda: f"{op}: target must hold class indices as int64 (or uint8), or class probabilities of input's floating dtype; got {target.dtype}",
        )
        torch._check(
            list(target.shape) == loss_shape,
            lambda: f"{op}: target of class indices must have shape {tuple(loss_shape)} (input's shape without the class dimension), got {tuple(target.shape)}",
        )
    if weight is not None:
        torch._check(
            weight.dim() == 1 and weight.shape[0] == classes,
            lambda: f"{op}: weight must be a 1-D tensor of {classes} class weights, got shape {tuple(weight.shape)}",
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    rows = 1
    for s in loss_shape:
        rows = rows * s
    return loss_shape, rows, probabilities


@torch.library.register_fake("torch_ext::cross_entropy_fwd")
def _cross_entropy_fwd_fake(input, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    loss_shape, rows, _ = _check_args(
        "torch_ext.cross_entropy", input, target, weight, ignore_index, reduction, label_smoothing, z_loss
    )
    loss = input.new_empty(loss_shape if reduction == "none" else ())
    stats = input.new_empty((rows, 3), dtype=_accumulation_dtype(input.dtype))
    return loss, stats


@torch.library.register_fake("torch_ext::cross_entropy_bwd")
def _cross_entropy_bwd_fake(grad_loss, input, target, weight, stats, ignore_index, reduction, label_smoothing, z_loss, output_mask):
    _, _, probabilities = _check_args(
        "torch_ext.cross_entropy_bwd", input, target, weight, ignore_index, reduction, label_smoothing, z_loss
    )
    torch._check(
        not output_mask[1] or probabilities,
        lambda: "torch_ext.cross_entropy_bwd: output_mask[1] asks for the target's gradient, which exists only for class-probability targets",
    )
    return (
        input.new_empty(input.shape) if output_mask[0] else input.new_empty((0,)),
        input.new_empty(input.shape) if output_mask[1] else input.new_empty((0,)),
    )


@torch.library.register_fake("torch_ext::cross_entropy_bwd_inplace")
def _cross_entropy_bwd_inplace_fake(grad_loss, input, target, weight, stats, ignore_index, reduction, label_smoothing, z_loss):
    _check_args(
        "torch_ext.cross_entropy_bwd_inplace", input, target, weight, ignore_index, reduction, label_smoothing, z_loss
    )
    return None


@torch.library.register_fake("torch_ext::cross_entropy_fwd_grad")
def _cross_entropy_fwd_grad_fake(input, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    if reduction == "none":
        raise ValueError("torch_ext.cross_entropy_fwd_grad: reduction must be 'mean' or 'sum' (the gradient is formed for a grad_loss of one value), got 'none'")
    loss, stats = _cross_entropy_fwd_fake(input, target, weight, ignore_index, reduction, label_smoothing, z_loss)
    return loss, stats, input.new_empty(input.shape)


def _setup_context_fwd_grad(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss = inputs
    _, stats, unit_grad = output
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss)
    ctx.save_for_backward(input, target, weight, stats, unit_grad)
    ctx.mark_non_differentiable(stats, unit_grad)
    ctx.set_materialize_grads(False)


def _backward_fwd_grad(ctx, grad_loss, _grad_stats, _grad_unit):
    """Calling the op directly is differentiable too: the input gradient it formed times grad_loss,
    and the backward op for a probability target's gradient (which the op does not form)."""
    grads = [None] * 7
    if grad_loss is None:
        return tuple(grads)
    input, target, weight, stats, unit_grad = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        grads[0] = unit_grad * grad_loss.reshape(())
    if ctx.needs_input_grad[1]:
        grads[1] = _bwd_op(grad_loss, input, target, weight, stats, *ctx.options, [False, True])[1]
    return tuple(grads)


torch.library.register_autograd("torch_ext::cross_entropy_fwd_grad", _backward_fwd_grad, setup_context=_setup_context_fwd_grad)


def _setup_context(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss = inputs
    _, stats = output
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss)
    ctx.probabilities = target.is_floating_point()
    ctx.save_for_backward(input, target, weight, stats)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for `stats` in backward


def _backward(ctx, grad_loss, _grad_stats):
    if grad_loss is None:  # only `stats` reached backward (materialize_grads is off)
        return (None,) * 7
    input, target, weight, stats = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(ctx.probabilities and needs[1])]
    grads = [None] * 7
    if any(mask):
        grad_input, grad_target = _bwd_op(grad_loss, input, target, weight, stats, *ctx.options, mask)
        grads[0] = grad_input if mask[0] else None
        grads[1] = grad_target if mask[1] else None
    return tuple(grads)


# Calling torch.ops.torch_ext.cross_entropy_fwd directly is differentiable too.
torch.library.register_autograd("torch_ext::cross_entropy_fwd", _backward, setup_context=_setup_context)
register_no_double_backward("torch_ext::cross_entropy_bwd", "torch_ext.cross_entropy")


class CrossEntropyFunction(torch.autograd.Function):
    """autograd.Function over the fused ops: ``apply(input, target, weight, ignore_index,
    reduction, label_smoothing, z_loss) -> (loss, stats)``; ``stats`` (per row: the max logit and log(sum exp(x - max))) is
    what backward uses and is not differentiable."""

    forward = forward_with_ctx(_fwd_op, _setup_context)
    backward = staticmethod(_backward)


def _grad_in_forward(input: Tensor, target: Tensor, reduction: str) -> bool:
    return (
        input.device.type in GRAD_IN_FORWARD_DEVICES
        and reduction != "none"
        and forms_grad_in_forward(input.requires_grad and not target.requires_grad)
    )


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    num_items_in_batch=None,
) -> Tensor:
    """``F.cross_entropy`` in fused kernels: same arguments, defaults and results.

    input ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; target class indices (int64 or uint8) of
    input's shape without the class dimension, or class probabilities of input's shape.
    ``z_loss`` (keyword-only, default 0) adds ``z_loss * logsumexp(row)**2`` per row, weighted
    like the row's loss (by ``weight[target]``; 0 for ignored rows; 1 for probability targets)
    and reduced like it. Under ``torch.autocast`` it computes in float32, as PyTorch's losses do.
    In eager mode (reductions mean and sum) the input's gradient is formed in the forward pass
    in a C++ autograd node (csrc/autograd_node.h): the forward kernel also writes the input's
    gradient for grad_output = 1 while each row is in cache, so a training step reads the logits
    once instead of twice, and the first backward hands it over (scaled by grad_output unless it
    is 1). ``num_items_in_batch`` (keyword-only; a number or a one-element tensor): the summed
    loss (weighted, as reduction="sum" gives it) divided by it instead of by the mean's own
    denominator, for gradient accumulation as the Hugging Face Trainer does it; reduction must
    then be "mean".
    """
    reduction = reduction_for_items(
        num_items_in_batch, resolve_reduction(size_average, reduce, reduction), "torch_ext.cross_entropy"
    )
    return divide_by_items(_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss),
                           num_items_in_batch)


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss):
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        # As F.cross_entropy: class weights are not differentiated.
        raise RuntimeError("torch_ext.cross_entropy is not differentiable with respect to weight; pass weight.detach()")
    input, target, weight = autocast_to_float32(input, target, weight)
    args = (input, target, weight, int(ignore_index), reduction, float(label_smoothing), float(z_loss))
    if _grad_in_forward(input, target, reduction):
        return _C._cross_entropy_grad_in_forward(*args)
    if not needs_autograd(input, target):
        return _fwd_op(*args)[0]
    return CrossEntropyFunction.apply(*args)[0]


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` on the fused kernels (same arguments and state_dict), plus the
    keyword-only ``z_loss`` of :func:`cross_entropy`; forward takes its ``num_items_in_batch``."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss

    def forward(self, input: Tensor, target: Tensor, *, num_items_in_batch=None) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            num_items_in_batch=num_items_in_batch,
        )

    def extra_repr(self) -> str:
        return f"z_loss={self.z_loss}" if self.z_loss else ""
