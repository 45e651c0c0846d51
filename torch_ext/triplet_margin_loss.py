"""Fused triplet margin loss: ``F.triplet_margin_loss``.

Ops (csrc/ops.cpp): ``torch_ext::triplet_margin_loss_fwd`` and ``torch_ext::triplet_margin_loss_bwd``.
This file gives them their fake kernels and autograd (``TripletMarginLossFunction``, also
registered on the forward op), the functional and the module ``TripletMarginLoss``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import _C
from ._common import (
    accumulation_dtype,
    any_requires_grad,
    autocast_off,
    autocast_to_float32,
    check_reduction,
    direct_when_no_grad,
    divide_by_items,
    eager_without_autograd,
    fake_grads,
    float32_loss_of_16_bit,
    for_transforms,
    forms_grad_in_forward,
    forward_with_ctx,
    hand_over_formed,
    loss_dtype_or_input,
    needs_autograd,
    reduction_for_items,
    register_no_double_backward,
    resolve_reduction,
    save_with_formed_grads,
    transforms_active,
)

_fwd_op = direct_when_no_grad(torch.ops.torch_ext.triplet_margin_loss_fwd.default)
_bwd_op = direct_when_no_grad(torch.ops.torch_ext.triplet_margin_loss_bwd.default)


def _check_p(op, p):
    if not (p > 0 and math.isfinite(p)):
        raise ValueError(
            f"{op}: p must be a positive finite number (torch_ext does not implement the p=0 and p=inf distances), "
            f"got p={p}"
        )


def _check_args(op, anchor, positive, negative, p, reduction):
    """The checks of csrc/cpu/triplet_margin_loss.cpp, for fake tensors (torch.compile tracing)."""
    torch._check(
        anchor.dim() in (1, 2), lambda: f"{op}: anchor must have shape (D) or (N, D), got {tuple(anchor.shape)}"
    )
    for name, t in (("positive", positive), ("negative", negative)):
        torch._check(
            t.shape == anchor.shape,
            lambda name=name, t=t: f"{op}: {name} must have anchor's shape {tuple(anchor.shape)}, got {tuple(t.shape)}",
        )
        torch._check(
            t.dtype == anchor.dtype,
            lambda name=name, t=t: f"{op}: {name} has dtype {t.dtype} but anchor has dtype {anchor.dtype}; "
            "they must match",
        )
    _check_p(op, p)
    check_reduction(reduction)


@torch.library.register_fake("torch_ext::triplet_margin_loss_fwd")
def _triplet_fwd_fake(anchor, positive, negative, margin, p, eps, swap, reduction, grad_mask, loss_dtype=None):
    op = "torch_ext.triplet_margin_loss"
    _check_args(op, anchor, positive, negative, p, reduction)
    rows = anchor.shape[0] if anchor.dim() == 2 else 1
    loss_shape = (anchor.shape[0],) if anchor.dim() == 2 and reduction == "none" else ()
    acc = accumulation_dtype(anchor.dtype)
    grads = tuple(anchor.new_empty(anchor.shape) if m else None for m in grad_mask)
    loss = anchor.new_empty(loss_shape, dtype=loss_dtype_or_input(op, anchor, loss_dtype))
    return (loss, anchor.new_empty((rows, 3), dtype=acc)) + grads


@torch.library.register_fake("torch_ext::triplet_margin_loss_bwd")
def _triplet_bwd_fake(grad_loss, anchor, positive, negative, dist, margin, p, eps, swap, reduction, output_mask):
    _check_args("torch_ext.triplet_margin_loss_bwd", anchor, positive, negative, p, reduction)
    return fake_grads(anchor, output_mask, (anchor.shape,) * 3)


# The forward op's arguments: (anchor, positive, negative, margin, p, eps, swap, reduction, grad_mask,
# loss_dtype).
_N_INPUTS = 10
NO_GRADS = (False, False, False)  # the grad_mask of a forward that forms no gradient


def _setup_context(ctx, inputs, output):
    anchor, positive, negative, margin, p, eps, swap, reduction, grad_mask = inputs[:9]
    ctx.options = (margin, p, eps, swap, reduction)
    # Formed for a loss gradient of 1 per row with reduction none (each row's loss depends on its
    # own inputs only), else for grad_loss = 1.
    save_with_formed_grads(ctx, (anchor, positive, negative, output[1]), output, grad_mask, first_grad=2)


def _backward(ctx, grad_loss, *_unused):
    """The gradients the forward formed, scaled by grad_loss (row by row for reduction none;
    create_graph takes the backward op: differentiable once), and the backward op for the others."""
    if grad_loss is None:  # only the non-differentiable outputs reached backward
        return (None,) * _N_INPUTS
    anchor, positive, negative, dist, *unit_grads = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wanted = [bool(needs[0]), bool(needs[1]), bool(needs[2])]
    grads = [None] * _N_INPUTS
    scale = grad_loss.reshape(-1, 1) if grad_loss.dim() == 1 else grad_loss  # a loss per row: row by row
    grads[:3], missing = hand_over_formed(ctx, wanted, unit_grads, scale)
    if any(missing):
        computed = _bwd_op(grad_loss, anchor, positive, negative, dist, *ctx.options, missing)
        for i in range(3):
            if missing[i]:
                grads[i] = computed[i]
    return tuple(grads)


torch.library.register_autograd("torch_ext::triplet_margin_loss_fwd", _backward, setup_context=_setup_context)
register_no_double_backward("torch_ext::triplet_margin_loss_bwd", "torch_ext.triplet_margin_loss")


class TripletMarginLossFunction(torch.autograd.Function):
    """autograd.Function over the op pair, with the forward op's arguments: ``apply(anchor,
    positive, negative, margin, p, eps, swap, reduction, grad_mask) -> (loss, dist, grad_anchor,
    grad_positive, grad_negative)``; ``dist`` (the row distances) is what backward uses. With
    grad_mask all False the backward op forms the gradients; with grad_mask the forward forms them
    in its pass and the backward scales them. The outputs after the loss are not differentiable;
    the gradients not asked for are None.

    Example::

        >>> a, p, n = torch.randn(16, 128, requires_grad=True), torch.randn(16, 128), torch.randn(16, 128)
        >>> loss, dist, *_ = torch_ext.TripletMarginLossFunction.apply(
        ...     a, p, n, 1.0, 2.0, 1e-6, False, "mean", [False, False, False])
        >>> loss.backward()
        >>> a.grad.shape
        torch.Size([16, 128])
    """

    forward = forward_with_ctx(_fwd_op, _setup_context)
    backward = staticmethod(_backward)


_TripletMarginLossForTransforms = for_transforms(TripletMarginLossFunction, _fwd_op, _setup_context,
                                                 "torch_ext.triplet_margin_loss")


def triplet_margin_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 1.0,
    p: float = 2,
    eps: float = 1e-6,
    swap: bool = False,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    *,
    num_items_in_batch=None,
) -> Tensor:
    """``F.triplet_margin_loss`` in fused kernels: same arguments and results for inputs ``(D)``
    or ``(N, D)``. ``p`` must be positive and finite. In eager mode, when an input requires grad,
    its gradient is formed in the forward pass (see csrc/autograd_node.h). ``num_items_in_batch``:
    as ``torch_ext.cross_entropy``'s (the summed loss divided by it).

    Example::

        >>> anchor, positive, negative = torch.randn(16, 128), torch.randn(16, 128), torch.randn(16, 128)
        >>> loss = torch_ext.triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2, swap=True)
        >>> loss.shape
        torch.Size([])
    """
    reduction = reduction_for_items(num_items_in_batch, resolve_reduction(size_average, reduce, reduction),
                                    "torch_ext.triplet_margin_loss")
    return divide_by_items(_triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, reduction),
                           num_items_in_batch)


def _triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, reduction):
    if margin <= 0:  # as F.triplet_margin_loss (the raw op takes any margin)
        raise ValueError(f"margin must be greater than 0, got {margin}")
    _check_p("torch_ext.triplet_margin_loss", p)
    loss_dtype = None
    if not autocast_off():
        anchor, positive, negative, loss_dtype = _autocast_inputs(anchor, positive, negative)
    args = (anchor, positive, negative, float(margin), float(p), float(eps), bool(swap), reduction)
    if transforms_active():  # torch.func
        return _TripletMarginLossForTransforms.apply(*args, NO_GRADS, loss_dtype)[0]
    if forms_grad_in_forward(any_requires_grad(anchor, positive, negative)) or eager_without_autograd(
        anchor, positive, negative
    ):
        # The loss and its gradients from one pass, handed over by a C++ node (csrc/autograd_node.h);
        # without autograd, the forward op alone.
        return _C._triplet_margin_loss_eager(*args, loss_dtype is not None)
    if not needs_autograd(anchor, positive, negative):  # compiled
        return _fwd_op(*args, NO_GRADS, loss_dtype)[0]
    return TripletMarginLossFunction.apply(*args, NO_GRADS, loss_dtype)[0]


def _autocast_inputs(anchor, positive, negative):
    """(anchor, positive, negative, loss_dtype) as autocast gives F.triplet_margin_loss its inputs
    (float32), except that three 16-bit inputs of one dtype (one network's embeddings) stay as they
    are: the kernels compute in float32 from them and return the loss in float32 (loss_dtype), so
    no float32 copies of the inputs and their gradients are made."""
    if float32_loss_of_16_bit(anchor, positive, negative):
        return anchor, positive, negative, torch.float32
    return (*autocast_to_float32(anchor, positive, negative), None)


class TripletMarginLoss(nn.TripletMarginLoss):
    """``nn.TripletMarginLoss`` on the fused kernels.

    Example::

        >>> criterion = torch_ext.TripletMarginLoss(margin=1.0, p=2.0, swap=True)
        >>> anchor, positive, negative = torch.randn(3, 16, 128, requires_grad=True).unbind(0)
        >>> criterion(anchor, positive, negative).backward()
    """

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor, *, num_items_in_batch=None) -> Tensor:
        return triplet_margin_loss(
            anchor, positive, negative, margin=self.margin, p=self.p, eps=self.eps, swap=self.swap,
            reduction=self.reduction, num_items_in_batch=num_items_in_batch,
        )
