"""Fused elementwise regression losses: ``mse_loss``, ``huber_loss``, ``smooth_l1_loss``.

Ops (csrc/ops.cpp): ``torch_ext::regression_loss_fwd`` and ``torch_ext::regression_loss_bwd``.
This file gives them their fake kernels and autograd (``RegressionLossFunction``, also registered
on the forward op), the functionals and the modules ``MSELoss``, ``HuberLoss``, ``SmoothL1Loss``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C
from ._common import (
    accumulation_dtype,
    autocast_off,
    autocast_to_float32,
    check_reduction,
    check_reduction_with_grad_in_forward,
    direct_when_no_grad,
    divide_by_items,
    eager_without_autograd,
    fake_grads,
    float32_loss_of_16_bit,
    for_transforms,
    forms_grad_in_forward,
    forward_with_ctx,
    grads_of_composite,
    hand_over_formed,
    loss_dtype_or_input,
    needs_autograd,
    reduction_for_items,
    register_no_double_backward,
    resolve_reduction,
    save_with_formed_grads,
    transforms_active,
)

_fwd_op = direct_when_no_grad(torch.ops.torch_ext.regression_loss_fwd.default)
_bwd_op = direct_when_no_grad(torch.ops.torch_ext.regression_loss_bwd.default)

# Device types whose eager training path is the C++ node of _C._regression_loss_eager, which forms
# the gradients in the forward kernel (reductions mean and sum; reduction none: the node calls the
# backward op): all that have the kernels.
GRAD_IN_FORWARD_DEVICES = frozenset({"cpu", "cuda"})

LOSSES = ("mse", "huber", "smooth_l1")


def _check_args(op, input, target, weight, loss, param, reduction):
    """The checks of csrc/cpu/regression_loss.cpp, for fake tensors (torch.compile tracing)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be 'mse', 'huber' or 'smooth_l1'; got {loss!r}")
    check_reduction(reduction)
    torch._check(
        input.shape == target.shape,
        lambda: f"{op}: input and target must have the same shape (the functional API broadcasts them first), "
        f"got {tuple(input.shape)} and {tuple(target.shape)}",
    )
    torch._check(
        target.dtype == input.dtype,
        lambda: f"{op}: target has dtype {target.dtype} but input has dtype {input.dtype}; they must match",
    )
    if weight is not None:
        torch._check(
            weight.shape == input.shape,
            lambda: f"{op}: weight must have input's shape {tuple(input.shape)}, got {tuple(weight.shape)}",
        )
        torch._check(
            weight.dtype == input.dtype,
            lambda: f"{op}: weight has dtype {weight.dtype} but input has dtype {input.dtype}; they must match",
        )
    _check_param(op, loss, param)


def _check_param(op, loss, param):
    if loss == "huber" and not param > 0:
        raise ValueError(f"{op}: huber_loss needs delta > 0, got delta={param}")
    if loss == "smooth_l1" and not param >= 0:
        raise ValueError(f"{op}: smooth_l1_loss needs beta >= 0, got beta={param}")


@torch.library.register_fake("torch_ext::regression_loss_fwd")
def _regression_loss_fwd_fake(input, target, weight, loss, param, reduction, grad_mask, loss_dtype=None):
    op = "torch_ext.regression_loss"
    _check_args(op, input, target, weight, loss, param, reduction)
    if any(grad_mask):
        check_reduction_with_grad_in_forward(op, reduction)
    dtype = loss_dtype_or_input(op, input, loss_dtype)
    value = input.new_empty(input.shape if reduction == "none" else (), dtype=dtype)
    return (value,) + tuple(input.new_empty(input.shape) if m else None for m in grad_mask)


@torch.library.register_fake("torch_ext::regression_loss_bwd")
def _regression_loss_bwd_fake(grad_loss, input, target, weight, loss, param, reduction, output_mask):
    _check_args("torch_ext.regression_loss_bwd", input, target, weight, loss, param, reduction)
    return fake_grads(input, output_mask, (input.shape, input.shape))


# The forward op's arguments: (input, target, weight, loss, param, reduction, grad_mask, loss_dtype).
_N_INPUTS = 8
NO_GRADS = (False, False)  # the grad_mask of a forward that forms no gradient


def _setup_context(ctx, inputs, output):
    input, target, weight, loss, param, reduction, grad_mask = inputs[:7]
    ctx.options = (loss, param, reduction)
    save_with_formed_grads(ctx, (input, target, weight), output, grad_mask, first_grad=1)


def _loss_in_pytorch_ops(input, target, weight, loss, param, reduction):
    """The loss the kernels compute, written in PyTorch's differentiable ops, in float32 (float64
    for float64 input): elementwise, times the weight, reduced (a weighted mse's mean divides by the
    weights' sum, the others' by the element count)."""
    dtype = accumulation_dtype(input.dtype)
    x, t = input.to(dtype), target.to(dtype)
    if loss == "mse":
        value = (x - t).square()
    elif loss == "huber":
        value = F.huber_loss(x, t, reduction="none", delta=param)
    else:
        value = F.smooth_l1_loss(x, t, reduction="none", beta=param)
    if weight is not None:
        value = value * weight.to(dtype)
    if reduction == "none":
        return value
    if reduction == "sum":
        return value.sum()
    if weight is not None and loss == "mse":
        return value.sum() / weight.to(dtype).sum()
    return value.mean()


@torch.library.impl("torch_ext::regression_loss_bwd_composite", "CompositeImplicitAutograd")
def _regression_loss_bwd_composite(grad_loss, input, target, weight, loss, param, reduction, output_mask):
    """regression_loss_bwd's gradients, by differentiating _loss_in_pytorch_ops: the backward that
    records a graph (create_graph), so gradients of gradients are PyTorch's (csrc/ops.cpp)."""

    def loss_of(x, t):
        return _loss_in_pytorch_ops(x, t, weight, loss, param, reduction)

    return grads_of_composite(loss_of, grad_loss, (input, target), output_mask)


def _backward(ctx, grad_loss, *_unused):
    """The gradients the forward formed, scaled by grad_loss, and the backward op for those it did
    not form; with create_graph, regression_loss_bwd_composite (differentiable again)."""
    if grad_loss is None:  # only the non-differentiable outputs reached backward
        return (None,) * _N_INPUTS
    input, target, weight, *unit_grads = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wanted = [bool(needs[0]), bool(needs[1])]
    grads = [None] * _N_INPUTS
    if torch.is_grad_enabled():
        grads[:2] = torch.ops.torch_ext.regression_loss_bwd_composite(grad_loss, input, target, weight, *ctx.options,
                                                                      wanted)
        return tuple(grads)
    grads[:2], missing = hand_over_formed(ctx, wanted, unit_grads, grad_loss)
    if any(missing):
        computed = _bwd_op(grad_loss, input, target, weight, *ctx.options, missing)
        for i in range(2):
            if missing[i]:
                grads[i] = computed[i]
    return tuple(grads)


# Calling torch.ops.torch_ext.regression_loss_fwd directly is differentiable too.
torch.library.register_autograd("torch_ext::regression_loss_fwd", _backward, setup_context=_setup_context)
register_no_double_backward("torch_ext::regression_loss_bwd", "torch_ext's regression losses")


class RegressionLossFunction(torch.autograd.Function):
    """autograd.Function over the op pair, with the forward op's arguments: ``apply(input,
    target, weight, loss, param, reduction, grad_mask, loss_dtype=None) -> (loss, grad_input,
    grad_target)`` with loss ``"mse"``, ``"huber"`` (param = delta) or ``"smooth_l1"`` (beta);
    input, target and weight (or None) of one shape; loss_dtype None (the input's) or the dtype to
    return the loss in (float32 for 16-bit inputs: unrounded, as under autocast). With grad_mask
    all False the backward op forms the gradients; with grad_mask (reductions mean and sum) the
    forward forms them for grad_loss = 1 in its pass and the backward scales them. The outputs
    after the loss are not differentiable; the gradients not asked for are None.

    Example::

        >>> x, y = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)
        >>> loss, *_ = torch_ext.RegressionLossFunction.apply(x, y, None, "huber", 0.5, "mean", [False, False])
        >>> loss.backward()
        >>> x.grad.shape
        torch.Size([8, 3])
    """

    forward = forward_with_ctx(_fwd_op, _setup_context)
    backward = staticmethod(_backward)


_RegressionLossForTransforms = for_transforms(RegressionLossFunction, _fwd_op, _setup_context,
                                              "torch_ext's regression losses")


def _regression_loss(name, input, target, weight, loss, param, reduction, num_items_in_batch=None):
    reduction = reduction_for_items(num_items_in_batch, reduction, name)
    return divide_by_items(
        _regression_loss_value(name, input, target, weight, loss, param, reduction), num_items_in_batch
    )


def _regression_loss_value(name, input, target, weight, loss, param, reduction):
    if target.shape != input.shape and not torch.compiler.is_compiling():  # warn() breaks graphs
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
    if weight is not None:
        if weight.shape != input.shape:
            raise ValueError(f"{name}: weight must have input's size {tuple(input.shape)}, got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{name}: the gradient with respect to weight is not implemented; pass weight.detach()")
    _check_param(name, loss, param)
    loss_dtype = None
    if not autocast_off():
        input, target, weight, loss_dtype = _autocast_inputs(input, target, weight)
    weight_sum = None
    if target.shape != input.shape:
        # Expanded views: autograd's expand backward sums the gradients back to each shape.
        input, target = torch.broadcast_tensors(input, target)
        if weight is not None:
            if loss == "mse" and reduction == "mean":
                # F.mse_loss divides by the sum of the weight as given (input's size), not of its
                # broadcast: take the kernel's sum and divide by that.
                weight_sum, reduction = weight.sum(), "sum"
            weight = weight.expand(input.shape)
    if target.dtype != input.dtype and input.is_floating_point() and target.is_floating_point():
        dtype = torch.promote_types(input.dtype, target.dtype)  # as PyTorch's losses promote
        input, target = input.to(dtype), target.to(dtype)
    if weight is not None and weight.dtype != input.dtype:
        weight = weight.to(input.dtype)
    args = (input, target, weight, loss, float(param), reduction)
    if transforms_active():  # torch.func
        out = _RegressionLossForTransforms.apply(*args, NO_GRADS, loss_dtype)[0]
    elif (
        input.device.type in GRAD_IN_FORWARD_DEVICES
        and forms_grad_in_forward(input.requires_grad or target.requires_grad)
    ) or eager_without_autograd(input, target, weight):
        # The loss and its gradients from one pass, handed over by a C++ node (csrc/autograd_node.h;
        # reduction none: the node calls the backward op); without autograd, the forward op alone.
        out = _C._regression_loss_eager(*args, loss_dtype is not None)
    elif not needs_autograd(input, target, weight):  # compiled
        out = _fwd_op(*args, NO_GRADS, loss_dtype)[0]
    else:
        out = RegressionLossFunction.apply(*args, NO_GRADS, loss_dtype)[0]
    return out if weight_sum is None else out / weight_sum


def _autocast_inputs(input: Tensor, target: Tensor, weight: Optional[Tensor]):
    """(input, target, weight, loss_dtype) as autocast gives PyTorch's regression losses their
    inputs (float32), except that 16-bit inputs of one dtype (with the weight, if any, in it too)
    stay as they are: the kernels compute in float32 from them and return the loss in float32
    (loss_dtype), so no float32 copies of the inputs and their gradients are made."""
    if float32_loss_of_16_bit(input, target, *(() if weight is None else (weight,))):
        return input, target, weight, torch.float32
    return (*autocast_to_float32(input, target, weight), None)


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    weight: Optional[Tensor] = None,
    *,
    num_items_in_batch=None,
) -> Tensor:
    """``F.mse_loss`` in fused kernels: same arguments (``weight``: elementwise, input's size; the
    mean then divides by ``weight.sum()``), broadcasting and results. ``num_items_in_batch``:
    as ``torch_ext.cross_entropy``'s (the summed loss divided by it).

    Example::

        >>> loss = torch_ext.mse_loss(torch.randn(8, 3), torch.randn(8, 3), reduction="none")
        >>> loss.shape
        torch.Size([8, 3])
    """
    reduction = resolve_reduction(size_average, reduce, reduction)
    return _regression_loss("torch_ext.mse_loss", input, target, weight, "mse", 0.0, reduction, num_items_in_batch)


def huber_loss(
    input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0, weight: Optional[Tensor] = None,
    *, num_items_in_batch=None,
) -> Tensor:
    """``F.huber_loss`` in fused kernels: same arguments (``weight``: elementwise, input's size),
    broadcasting and results; ``num_items_in_batch`` as ``mse_loss``'s.

    Example::

        >>> loss = torch_ext.huber_loss(torch.randn(8, 3), torch.randn(8, 3), delta=0.5)
        >>> loss.shape
        torch.Size([])
    """
    reduction = resolve_reduction(None, None, reduction)
    return _regression_loss(
        "torch_ext.huber_loss", input, target, weight, "huber", delta, reduction, num_items_in_batch
    )


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    beta: float = 1.0,
    *,
    num_items_in_batch=None,
) -> Tensor:
    """``F.smooth_l1_loss`` in fused kernels: same arguments, broadcasting and results
    (``beta=0`` is the L1 loss); ``num_items_in_batch`` as ``mse_loss``'s.

    Example::

        >>> loss = torch_ext.smooth_l1_loss(torch.randn(8, 3), torch.randn(8, 3), beta=0.5)
        >>> loss.shape
        torch.Size([])
    """
    reduction = resolve_reduction(size_average, reduce, reduction)
    return _regression_loss("torch_ext.smooth_l1_loss", input, target, None, "smooth_l1", beta, reduction,
                            num_items_in_batch)


class MSELoss(nn.MSELoss):
    """``nn.MSELoss`` on the fused kernels.

    Example::

        >>> criterion = torch_ext.MSELoss(reduction="sum")
        >>> criterion(torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)).backward()
    """

    def forward(self, input: Tensor, target: Tensor, *, num_items_in_batch=None) -> Tensor:
        return mse_loss(input, target, reduction=self.reduction, num_items_in_batch=num_items_in_batch)


class HuberLoss(nn.HuberLoss):
    """``nn.HuberLoss`` on the fused kernels.

    Example::

        >>> criterion = torch_ext.HuberLoss(delta=0.5)
        >>> criterion(torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)).backward()
    """

    def forward(self, input: Tensor, target: Tensor, *, num_items_in_batch=None) -> Tensor:
        return huber_loss(
            input, target, reduction=self.reduction, delta=self.delta, num_items_in_batch=num_items_in_batch
        )


class SmoothL1Loss(nn.SmoothL1Loss):
    """``nn.SmoothL1Loss`` on the fused kernels.

    Example::

        >>> criterion = torch_ext.SmoothL1Loss(beta=0.5)
        >>> criterion(torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)).backward()
    """

    def forward(self, input: Tensor, target: Tensor, *, num_items_in_batch=None) -> Tensor:
        return smooth_l1_loss(
            input, target, reduction=self.reduction, beta=self.beta, num_items_in_batch=num_items_in_batch
        )
