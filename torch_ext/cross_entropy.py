"""Fused cross-entropy: ``F.cross_entropy`` with every option, plus ``z_loss``, ``softcap`` and the
``return_lse`` / ``return_accuracy`` outputs.

Ops (csrc/ops.cpp): ``torch_ext::cross_entropy_fwd`` and ``torch_ext::cross_entropy_bwd``. This
file gives them their fake kernels and autograd (``CrossEntropyFunction``, also registered on the
forward op), the functional ``cross_entropy`` and the module ``CrossEntropyLoss``.
"""
from __future__ import annotations

import math
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

_fwd_op = direct_when_no_grad(torch.ops.torch_ext.cross_entropy_fwd.default)
_bwd_op = direct_when_no_grad(torch.ops.torch_ext.cross_entropy_bwd.default)

# Device types whose eager training path is the C++ node of _C._cross_entropy_eager, which forms the
# input's gradient in the forward kernel (reductions mean and sum; reduction none: the node calls
# the backward op): all that have the kernels.
GRAD_IN_FORWARD_DEVICES = frozenset({"cpu", "cuda"})


def softcap_value(op: str, softcap) -> float:
    """The ops' softcap argument from the public one: None -> 0.0 (off), else a positive finite
    float (anything else is a ValueError naming it)."""
    if softcap is None:
        return 0.0
    value = float(softcap)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{op}: softcap must be a positive finite number or None, got {softcap!r}")
    return value


def _check_args(op, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap=0.0):
    """The checks of csrc/cpu/cross_entropy.cpp, for fake tensors (torch.compile tracing).
    Returns (loss shape of reduction='none', rows, class-probability targets?)."""
    torch._check(
        input.dim() >= 1, lambda: f"{op}: input must have shape (C), (N, C) or (N, C, d1, ..., dk), got a 0-D tensor"
    )
    class_dim = 0 if input.dim() == 1 else 1
    classes = input.shape[class_dim]
    loss_shape = [s for d, s in enumerate(input.shape) if d != class_dim]
    probabilities = target.is_floating_point()
    if probabilities:
        torch._check(
            target.shape == input.shape,
            lambda: f"{op}: a floating-point target holds class probabilities and must have input's shape "
            f"{tuple(input.shape)}, got {tuple(target.shape)}",
        )
        torch._check(
            target.dtype == input.dtype,
            lambda: f"{op}: target has dtype {target.dtype} but input has dtype {input.dtype}; they must match",
        )
        if ignore_index >= 0:
            raise ValueError(
                f"{op}: ignore_index is not supported for class-probability (floating point) targets; "
                f"got ignore_index={ignore_index}"
            )
    else:
        torch._check(
            target.dtype in (torch.int64, torch.uint8),
            lambda: f"{op}: target must hold class indices as int64 (or uint8), or class probabilities of input's "
            f"floating dtype; got {target.dtype}",
        )
        torch._check(
            list(target.shape) == loss_shape,
            lambda: f"{op}: target of class indices must have shape {tuple(loss_shape)} (input's shape without the "
            f"class dimension), got {tuple(target.shape)}",
        )
    if weight is not None:
        torch._check(
            weight.dim() == 1 and weight.shape[0] == classes,
            lambda: f"{op}: weight must be a 1-D tensor of {classes} class weights, got shape {tuple(weight.shape)}",
        )
    check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"{op}: softcap must be a positive finite number (0: no softcap), got {softcap}")
    rows = 1
    for s in loss_shape:
        rows = rows * s
    return loss_shape, rows, probabilities


@torch.library.register_fake("torch_ext::cross_entropy_fwd")
def _cross_entropy_fwd_fake(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, grad_mask,
                            softcap=0.0, ignored_row_stats=False, loss_dtype=None):
    op = "torch_ext.cross_entropy"
    loss_shape, rows, probabilities = _check_args(
        op, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    if any(grad_mask):
        check_reduction_with_grad_in_forward(op, reduction)
    torch._check(
        not grad_mask[1] or probabilities,
        lambda: f"{op}: grad_mask[1] asks for the target's gradient, which exists only for class-probability targets",
    )
    loss = input.new_empty(loss_shape if reduction == "none" else (), dtype=loss_dtype_or_input(op, input, loss_dtype))
    stats = input.new_empty((rows, 3), dtype=accumulation_dtype(input.dtype))
    return (loss, stats) + fake_grads(input, grad_mask, (input.shape, input.shape))


@torch.library.register_fake("torch_ext::cross_entropy_bwd")
def _cross_entropy_bwd_fake(grad_loss, input, target, weight, stats, ignore_index, reduction, label_smoothing, z_loss,
                            output_mask, softcap=0.0, grad_lse=None):
    _, rows, probabilities = _check_args(
        "torch_ext.cross_entropy_bwd", input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    if grad_lse is not None:
        torch._check(
            grad_lse.is_floating_point() and grad_lse.numel() == rows,
            lambda: f"torch_ext.cross_entropy_bwd: grad_lse must be a floating tensor with one value per row ({rows}), "
            f"got {grad_lse.dtype} of shape {tuple(grad_lse.shape)}",
        )
    torch._check(
        not output_mask[1] or probabilities,
        lambda: "torch_ext.cross_entropy_bwd: output_mask[1] asks for the target's gradient, which exists only for "
        "class-probability targets",
    )
    return fake_grads(input, output_mask, (input.shape, input.shape))


@torch.library.register_fake("torch_ext::cross_entropy_bwd_inplace")
def _cross_entropy_bwd_inplace_fake(grad_loss, input, target, weight, stats, ignore_index, reduction, label_smoothing,
                                    z_loss, softcap=0.0):
    _check_args(
        "torch_ext.cross_entropy_bwd_inplace", input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
        softcap,
    )
    return None


# The forward op's arguments: (input, target, weight, ignore_index, reduction, label_smoothing,
# z_loss, grad_mask, softcap, ignored_row_stats, loss_dtype); its autograd returns one gradient (or
# None) for each.
_N_INPUTS = 11
NO_GRADS = (False, False)  # the grad_mask of a forward that forms no gradient


def _setup_context(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss, grad_mask = inputs[:8]
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss)
    ctx.softcap = inputs[8] if len(inputs) > 8 else 0.0
    ctx.probabilities = target.is_floating_point()
    save_with_formed_grads(ctx, (input, target, weight, output[1]), output, grad_mask, first_grad=2)


def _loss_in_pytorch_ops(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """The loss the kernels compute, written in PyTorch's differentiable ops, in float32 (float64
    for float64 input): the logits capped (softcap * tanh(x / softcap)), F.cross_entropy, plus
    z_loss * logsumexp^2 per row weighted (class weight of the target, 0 for ignored rows; 1 for
    probability targets) and reduced like the loss."""
    x = input.to(accumulation_dtype(input.dtype))
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    probabilities = target.is_floating_point()
    t = target.to(x.dtype) if probabilities else target.long()
    w = None if weight is None else weight.to(x.dtype)
    loss = F.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if not z_loss:
        return loss
    lse = torch.logsumexp(x, 0 if x.dim() == 1 else 1)
    if probabilities:
        row_weight = torch.ones_like(lse)
    else:
        valid = t != ignore_index
        kept = t.masked_fill(~valid, 0)
        row_weight = valid.to(x.dtype) if w is None else torch.where(valid, w[kept], 0.0)
    z = z_loss * row_weight * lse.square()
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss + z.sum()
    denominator = lse.new_tensor(float(lse.numel())) if probabilities else row_weight.sum()
    # No rows, or all ignored: the loss is F.cross_entropy's NaN; the z term adds 0 (not 0/0).
    return loss + z.sum() / torch.where(denominator == 0, torch.ones_like(denominator), denominator)


@torch.library.impl("torch_ext::cross_entropy_bwd_composite", "CompositeImplicitAutograd")
def _cross_entropy_bwd_composite(grad_loss, input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                 output_mask, softcap=0.0, grad_lse=None):
    """cross_entropy_bwd's gradients, by differentiating _loss_in_pytorch_ops: the backward that
    records a graph (create_graph), so gradients of gradients are PyTorch's (csrc/ops.cpp)."""
    if grad_lse is not None:
        raise NotImplementedError("torch_ext.cross_entropy: a second derivative through the lse output is not "
                                  "supported; use torch.logsumexp for it")

    def loss_of(x, t):
        return _loss_in_pytorch_ops(x, t, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)

    return grads_of_composite(loss_of, grad_loss, (input, target), output_mask)


def _backward(ctx, grad_loss, *_unused):
    """The gradients the forward formed, scaled by grad_loss, and the backward op for those it did
    not form; with create_graph, cross_entropy_bwd_composite (differentiable again)."""
    if grad_loss is None:  # only the non-differentiable outputs reached backward
        return (None,) * _N_INPUTS
    input, target, weight, stats, *unit_grads = ctx.saved_tensors
    needs = ctx.needs_input_grad
    wanted = [bool(needs[0]), bool(ctx.probabilities and needs[1])]
    grads = [None] * _N_INPUTS
    if torch.is_grad_enabled():
        grads[:2] = torch.ops.torch_ext.cross_entropy_bwd_composite(grad_loss, input, target, weight, *ctx.options,
                                                                    wanted, ctx.softcap)
        return tuple(grads)
    grads[:2], missing = hand_over_formed(ctx, wanted, unit_grads, grad_loss)
    if any(missing):
        computed = _bwd_op(grad_loss, input, target, weight, stats, *ctx.options, missing, ctx.softcap)
        for i in range(2):
            if missing[i]:
                grads[i] = computed[i]
    return tuple(grads)


# Calling torch.ops.torch_ext.cross_entropy_fwd directly is differentiable too.
torch.library.register_autograd("torch_ext::cross_entropy_fwd", _backward, setup_context=_setup_context)
register_no_double_backward("torch_ext::cross_entropy_bwd", "torch_ext.cross_entropy")


class CrossEntropyFunction(torch.autograd.Function):
    """autograd.Function over the op pair, with the forward op's arguments: ``apply(input, target,
    weight, ignore_index, reduction, label_smoothing, z_loss, grad_mask, softcap,
    ignored_row_stats) -> (loss, stats, grad_input, grad_target)``. ``stats`` (per row: the max
    logit and log(sum exp(x - max)), ...) is what backward uses. With grad_mask all False the
    backward op forms the gradients; with grad_mask (reductions mean and sum) the forward forms
    them for grad_loss = 1 while each row is in cache, and the backward scales them. The outputs
    after the loss are not differentiable; the gradients not asked for are None.

    Example::

        >>> x, t = torch.randn(4, 10, requires_grad=True), torch.tensor([1, 0, 3, 9])
        >>> loss, stats, *_ = torch_ext.CrossEntropyFunction.apply(
        ...     x, t, None, -100, "mean", 0.0, 0.0, [False, False], 0.0, False)
        >>> loss.backward()
        >>> x.grad.shape
        torch.Size([4, 10])
    """

    forward = forward_with_ctx(_fwd_op, _setup_context)
    backward = staticmethod(_backward)


_CrossEntropyForTransforms = for_transforms(CrossEntropyFunction, _fwd_op, _setup_context, "torch_ext.cross_entropy")


def _lse_of_stats(input, target, weight, stats, ignore_index, label_smoothing, z_loss, softcap, shape):
    return (stats[:, 0] + stats[:, 1]).reshape(shape)


def _lse_setup_context(ctx, inputs, output):
    input, target, weight, stats, ignore_index, label_smoothing, z_loss, softcap, _ = inputs
    ctx.options = (ignore_index, "sum", label_smoothing, z_loss)
    ctx.softcap = softcap
    ctx.save_for_backward(input, target, weight, stats)


def _lse_backward(ctx, grad_lse):
    input, target, weight, stats = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        no_loss_grad = torch.zeros((), dtype=stats.dtype, device=stats.device)
        grad_input = _bwd_op(no_loss_grad, input, target, weight, stats, *ctx.options, [True, False], ctx.softcap,
                             grad_lse.reshape(-1))[0]
    return (grad_input,) + (None,) * 8


class _LogSumExpFunction(torch.autograd.Function):
    """The rows' logsumexp from the forward's stats (max + log-sum, which it formed in its pass),
    differentiable: backward is the backward op with a zero loss gradient and ``grad_lse``, one pass
    over the logits (grad_lse * softmax, through the softcap). ``apply(input, target, weight, stats,
    ignore_index, label_smoothing, z_loss, softcap, shape) -> lse``."""

    forward = forward_with_ctx(_lse_of_stats, _lse_setup_context)
    backward = staticmethod(_lse_backward)


_LogSumExpForTransforms = for_transforms(_LogSumExpFunction, _lse_of_stats, _lse_setup_context,
                                         "torch_ext.cross_entropy")


def extra_outputs(loss: Tensor, stats: Tensor, target: Tensor, ignore_index: int, return_lse: bool,
                  return_accuracy: bool, lse_shape, lse=None):
    """``loss``, or ``(loss, [lse], [accuracy])`` as asked, from the forward's per-row ``stats``
    (max, log-sum, and for class targets whether the row's argmax is its target). ``lse``: the
    rows' logsumexp (given, when it is differentiable), else formed from the stats (detached)."""
    if not (return_lse or return_accuracy):
        return loss
    out = [loss]
    if return_lse:
        out.append(lse if lse is not None else (stats[:, 0] + stats[:, 1]).reshape(lse_shape))
    if return_accuracy:
        kept = (target != ignore_index).sum()
        out.append(stats[:, 2].sum() / kept.to(stats.dtype))
    return tuple(out)


def check_accuracy_target(op: str, target: Tensor, return_accuracy: bool) -> None:
    if return_accuracy and target.is_floating_point():
        raise ValueError(f"{op}: return_accuracy needs class-index targets (an argmax to compare); got a "
                         f"floating-point target of class probabilities")


def _autocast_inputs(input: Tensor, target: Tensor, weight: Optional[Tensor]):
    """(input, target, weight, loss_dtype) as autocast gives F.cross_entropy its inputs (float32),
    except that 16-bit logits with class-index targets stay as they are: the kernels compute in
    float32 from them and return the loss in float32 (loss_dtype), unrounded, so the float32 copy
    of the logits and of their gradient (8 bytes per logit) is not made. Probability targets are
    cast with the logits (the kernels take them in the logits' dtype)."""
    if not target.is_floating_point() and float32_loss_of_16_bit(input):
        return (input, target, *autocast_to_float32(weight), torch.float32)  # (a float64 weight stays)
    return (*autocast_to_float32(input, target, weight), None)


def _takes_eager_node(input: Tensor, target: Tensor) -> bool:
    """Whether an eager call records the C++ node of _C._cross_entropy_eager (see
    GRAD_IN_FORWARD_DEVICES); a target requiring grad takes CrossEntropyFunction."""
    return input.device.type in GRAD_IN_FORWARD_DEVICES and forms_grad_in_forward(
        input.requires_grad and not target.requires_grad
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
    softcap: Optional[float] = None,
    return_lse: bool = False,
    return_accuracy: bool = False,
    num_items_in_batch=None,
):
    """``F.cross_entropy`` in fused kernels: same arguments, defaults and results.

    input ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; target class indices (int64 or uint8) of
    input's shape without the class dimension, or class probabilities of input's shape.
    ``z_loss`` (keyword-only, default 0) adds ``z_loss * logsumexp(row)**2`` per row, weighted
    like the row's loss (by ``weight[target]``; 0 for ignored rows; 1 for probability targets)
    and reduced like it. ``softcap`` (keyword-only; None: off): every logit x is taken as
    ``softcap * tanh(x / softcap)`` first (Gemma 2's final_logit_softcapping), for the loss,
    z_loss and the extra outputs, with gradients through the tanh. Under ``torch.autocast`` it
    computes in float32 and returns float32, as PyTorch's losses do, reading 16-bit logits with
    class-index targets without a float32 copy (their gradient is written in their dtype).

    ``return_lse`` / ``return_accuracy`` (keyword-only): the result is then a tuple ``(loss,
    lse)``, ``(loss, accuracy)`` or ``(loss, lse, accuracy)``, both formed in the loss's own pass
    over the logits. ``lse``: ``logsumexp`` of each position's (capped) logits, ignored positions
    included, of input's shape without the class dimension, in float32 (float64 for float64
    input); differentiable (its backward is one more pass over the logits, when it gets a
    gradient). ``accuracy``: a 0-dim tensor, the fraction of the positions not ignored whose argmax
    (first index of the max, as ``torch.argmax``) is the target (NaN if all are ignored); not
    differentiable; class-index targets only.

    In eager mode (reductions mean and sum) the input's gradient is formed in the forward pass
    in a C++ autograd node (csrc/autograd_node.h): the forward kernel also writes the input's
    gradient for grad_output = 1 while each row is in cache, so a training step reads the logits
    once instead of twice, and the first backward hands it over (scaled by grad_output unless it
    is 1). ``num_items_in_batch`` (keyword-only; a number or a one-element tensor): the summed
    loss (weighted, as reduction="sum" gives it) divided by it instead of by the mean's own
    denominator, for gradient accumulation as the Hugging Face Trainer does it; reduction must
    then be "mean".

    Example::

        >>> loss = torch_ext.cross_entropy(torch.randn(4, 10), torch.tensor([1, 0, 3, 9]))
        >>> loss.shape
        torch.Size([])
        >>> loss, lse = torch_ext.cross_entropy(torch.randn(4, 10), torch.tensor([1, 0, 3, 9]), return_lse=True)
        >>> lse.shape
        torch.Size([4])
    """
    op = "torch_ext.cross_entropy"
    reduction = reduction_for_items(num_items_in_batch, resolve_reduction(size_average, reduce, reduction), op)
    cap = softcap_value(op, softcap)
    check_accuracy_target(op, target, return_accuracy)
    if not (return_lse or return_accuracy):
        return divide_by_items(
            _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, cap),
            num_items_in_batch,
        )
    input, target, weight, _ = _autocast_inputs(input, target, weight)
    loss, stats = _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, cap,
                                 return_stats=True, ignored_row_stats=return_lse)
    lse = None
    class_dim = 0 if input.dim() == 1 else 1
    lse_shape = [s for d, s in enumerate(input.shape) if d != class_dim]
    if return_lse and torch.is_grad_enabled() and input.requires_grad:
        function = _LogSumExpForTransforms if transforms_active() else _LogSumExpFunction
        lse = function.apply(input, target, weight, stats, int(ignore_index), float(label_smoothing), float(z_loss),
                             cap, lse_shape)
    return extra_outputs(divide_by_items(loss, num_items_in_batch), stats, target, ignore_index, return_lse,
                         return_accuracy, lse_shape, lse)


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                   return_stats=False, ignored_row_stats=False):
    """The loss (and with return_stats, (loss, stats)) by the path that applies: the C++ node that
    forms the gradient in forward, the op alone without autograd, CrossEntropyFunction, or under
    torch.func its for_transforms variant."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        # As F.cross_entropy: class weights are not differentiated.
        raise RuntimeError("torch_ext.cross_entropy is not differentiable with respect to weight; pass weight.detach()")
    loss_dtype = None
    if not autocast_off():  # (checked here first: the per-call cost of a small head's loss)
        input, target, weight, loss_dtype = _autocast_inputs(input, target, weight)
    args = (input, target, weight, int(ignore_index), reduction, float(label_smoothing), float(z_loss))
    if transforms_active():  # torch.func
        out = _CrossEntropyForTransforms.apply(*args, NO_GRADS, softcap, ignored_row_stats, loss_dtype)
    elif _takes_eager_node(input, target) or eager_without_autograd(input, target):
        return _C._cross_entropy_eager(*args, softcap, ignored_row_stats, return_stats, loss_dtype is not None)
    elif not needs_autograd(input, target):  # compiled
        out = _fwd_op(*args, NO_GRADS, softcap, ignored_row_stats, loss_dtype)
    else:
        out = CrossEntropyFunction.apply(*args, NO_GRADS, softcap, ignored_row_stats, loss_dtype)
    return out[:2] if return_stats else out[0]


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` on the fused kernels (same arguments and state_dict), plus the
    keyword-only ``z_loss``, ``softcap``, ``return_lse`` and ``return_accuracy`` of
    :func:`cross_entropy`; forward takes its ``num_items_in_batch``.

    Example::

        >>> criterion = torch_ext.CrossEntropyLoss(label_smoothing=0.1)
        >>> logits, target = torch.randn(4, 10, requires_grad=True), torch.tensor([1, 0, 3, 9])
        >>> criterion(logits, target).backward()
        >>> loss, lse = torch_ext.CrossEntropyLoss(return_lse=True)(logits, target)
        >>> lse.shape
        torch.Size([4])
    """

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
        softcap: Optional[float] = None,
        return_lse: bool = False,
        return_accuracy: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        softcap_value("CrossEntropyLoss", softcap)
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.return_accuracy = return_accuracy

    def forward(self, input: Tensor, target: Tensor, *, num_items_in_batch=None):
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_lse=self.return_lse,
            return_accuracy=self.return_accuracy,
            num_items_in_batch=num_items_in_batch,
        )

    def extra_repr(self) -> str:
        extras = [("z_loss", self.z_loss, 0.0), ("softcap", self.softcap, None), ("return_lse", self.return_lse, False),
                  ("return_accuracy", self.return_accuracy, False)]
        return ", ".join(f"{name}={value}" for name, value, default in extras if value != default)
