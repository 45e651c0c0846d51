"""Linear + cross-entropy without materializing the logits:
``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` over row chunks.

Ops (csrc/ops.cpp, loop in csrc/linear_cross_entropy.cpp): ``torch_ext::linear_cross_entropy_fwd``
and ``torch_ext::linear_cross_entropy_bwd``. This file gives them their fake kernels and autograd,
the functional ``linear_cross_entropy`` and the module ``LinearCrossEntropyLoss``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._common import autocast_to_lower_precision, forms_grad_in_forward, register_no_double_backward, resolve_reduction, forward_with_ctx, unit_grads_backward

_fwd_op = torch.ops.torch_ext.linear_cross_entropy_fwd.default
_bwd_op = torch.ops.torch_ext.linear_cross_entropy_bwd.default

# Bytes of one chunk's logits (their gradient is written over them), per device type. CPU: measured
# (benchmarks/results/cpu.txt). CUDA: each chunk's weight-gradient GEMM also reads and writes the
# float32 V x H sum (8 V H bytes for 2 V H x rows FLOPs), so a chunk needs some 600+ rows to keep an
# H200's GEMM compute-bound; 512 MiB gives 2088 rows at V=128256 in bfloat16 (not yet measured on
# a GPU).
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


def default_chunk_size(rows: int, vocab: int, dtype: torch.dtype, device_type: str = "cpu") -> int:
    """Rows per chunk when chunk_size is None: as many as keep one chunk's logits (rows x vocab) within
    CHUNK_BYTES of the device type (CPU 64 MiB, CUDA 512 MiB), rounded down to a multiple of 8 when
    at least 8, at least 1. At N=4096, V=32000, float32 on CPU that is 520 rows: 63 MiB of logits,
    ~1/8 of the whole."""
    element = torch.empty((), dtype=dtype).element_size()
    chunk = max(1, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) // max(1, vocab * element))
    if chunk >= 8:
        chunk -= chunk % 8
    return int(max(1, min(chunk, rows))) if rows > 0 else 1


def _check_args(op, input, linear_weight, linear_bias, target, reduction, label_smoothing, chunk_size):
    """The checks of csrc/linear_cross_entropy.cpp, for fake tensors (torch.compile tracing)."""
    torch._check(linear_weight.dim() == 2, lambda: f"{op}: linear_weight must be 2-D (V, H), got shape {tuple(linear_weight.shape)}")
    torch._check(input.dim() >= 1, lambda: f"{op}: input must have shape (*, H), got a 0-D tensor")
    vocab, hidden = linear_weight.shape
    torch._check(
        input.shape[-1] == hidden,
        lambda: f"{op}: input.size(-1) is {input.shape[-1]} but linear_weight.size(1) (H) is {hidden}; they must be equal",
    )
    torch._check(linear_weight.dtype == input.dtype, lambda: f"{op}: linear_weight has dtype {linear_weight.dtype} but input has dtype {input.dtype}; they must match")
    if linear_bias is not None:
        torch._check(
            linear_bias.dim() == 1 and linear_bias.shape[0] == vocab,
            lambda: f"{op}: linear_bias must have shape (V,) = ({vocab},), got {tuple(linear_bias.shape)}",
        )
    lead = list(input.shape[:-1])
    if target.is_floating_point():
        torch._check(
            list(target.shape) == lead + [vocab],
            lambda: f"{op}: a floating-point target holds class probabilities and must have shape {tuple(lead + [vocab])}, got {tuple(target.shape)}",
        )
    else:
        torch._check(
            target.dtype in (torch.int64, torch.uint8),
            lambda: f"{op}: target must hold class indices as int64 (or uint8), or class probabilities; got {target.dtype}",
        )
        torch._check(list(target.shape) == lead, lambda: f"{op}: target of class indices must have shape {tuple(lead)}, got {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    return lead


def _grads_like(mask, input, linear_weight, linear_bias):
    vocab = linear_weight.shape[0]
    return (
        input.new_empty(input.shape) if mask[0] else input.new_empty((0,)),
        input.new_empty(linear_weight.shape) if mask[1] else input.new_empty((0,)),
        input.new_empty((vocab,)) if mask[2] and linear_bias is not None else input.new_empty((0,)),
    )


@torch.library.register_fake("torch_ext::linear_cross_entropy_fwd")
def _lce_fwd_fake(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss, chunk_size, grad_mask):
    lead = _check_args("torch_ext.linear_cross_entropy", input, linear_weight, linear_bias, target, reduction, label_smoothing, chunk_size)
    loss = input.new_empty(lead if reduction == "none" else ())
    return (loss,) + _grads_like(grad_mask, input, linear_weight, linear_bias)


@torch.library.register_fake("torch_ext::linear_cross_entropy_bwd")
def _lce_bwd_fake(grad_loss, input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss, chunk_size, output_mask):
    _check_args("torch_ext.linear_cross_entropy_bwd", input, linear_weight, linear_bias, target, reduction, label_smoothing, chunk_size)
    return _grads_like(output_mask, input, linear_weight, linear_bias)


def _output_mask(ctx):
    needs = ctx.needs_input_grad
    return [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2])]


def _setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight = inputs[:5]
    ctx.options = tuple(inputs[5:10])  # ignore_index, reduction, label_smoothing, z_loss, chunk_size
    ctx.has_bias = linear_bias is not None
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the other outputs in backward


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:  # only the non-differentiable outputs reached backward
        return (None,) * 11
    input, linear_weight, linear_bias, target, weight = ctx.saved_tensors
    mask = _output_mask(ctx)
    grads = [None] * 11
    if any(mask):
        computed = _bwd_op(grad_loss, input, linear_weight, linear_bias, target, weight, *ctx.options, mask)
        for i in range(3):
            grads[i] = computed[i] if mask[i] else None
    return tuple(grads)


torch.library.register_autograd("torch_ext::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)
register_no_double_backward("torch_ext::linear_cross_entropy_bwd", "torch_ext.linear_cross_entropy")


class LinearCrossEntropyFunction(torch.autograd.Function):
    """autograd.Function over the op pair: ``apply(input, linear_weight, linear_bias, target,
    weight, ignore_index, reduction, label_smoothing, z_loss, chunk_size, grad_mask)`` -> (loss,
    *unused); the backward recomputes each chunk's logits. torch.compile'd graphs use this path."""

    forward = forward_with_ctx(_fwd_op, _setup_context)
    backward = staticmethod(_backward)


class _LinearCrossEntropyGradInForward(torch.autograd.Function):
    """The eager path for reductions mean and sum when something requires grad: the forward op
    also forms the gradients for grad_output = 1 while each chunk's logits exist, so the logits
    are computed once instead of twice. The first backward hands them over, scaled in place by
    grad_output unless it is 1; a later backward of a retained graph recomputes them (for
    grad_output = 1, scaled the same way, so both give the same bits). They are held from forward
    to backward as ctx attributes (input- and weight-sized), which saved-tensor hooks do not see."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss, chunk_size):
        ctx.has_bias = linear_bias is not None
        mask = _output_mask(ctx)
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss, chunk_size)
        loss, *grads = _fwd_op(input, linear_weight, linear_bias, target, weight, *ctx.options, mask)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight)
        ctx.unit_grads = [g if m else None for g, m in zip(grads, mask)]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        mask = _output_mask(ctx)
        return unit_grads_backward(
            ctx, grad_loss, mask, 10,
            recompute=lambda ones: _bwd_op(ones, *ctx.saved_tensors, *ctx.options, mask),
            graph_backward=lambda: _backward(ctx, grad_loss)[:10],
        )


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without ever
    holding the whole logits: rows go through in chunks of ``chunk_size`` (None: see
    ``default_chunk_size``). Arguments as ``torch.nn.functional.linear_cross_entropy`` (and
    ``torch_ext.cross_entropy``'s ``z_loss``). input ``(*, H)``, linear_weight ``(V, H)``,
    linear_bias ``(V,)``; target class indices ``(*)`` or class probabilities ``(*, V)``.
    Under ``torch.autocast`` the linear runs in the autocast dtype and the loss is returned in
    float32, as ``F.linear`` followed by ``F.cross_entropy`` would. In eager mode with reduction
    mean or sum, the gradients are formed in the forward pass (see
    _LinearCrossEntropyGradInForward)."""
    reduction = resolve_reduction(None, None, reduction)
    if ignore_index is None:  # as F.linear_cross_entropy
        ignore_index = -100
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("torch_ext.linear_cross_entropy is not differentiable with respect to weight; pass weight.detach()")
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("torch_ext.linear_cross_entropy does not compute a gradient for class-probability targets; pass target.detach()")
    rows = input.shape[:-1].numel() if input.dim() >= 1 else 0
    if chunk_size is None:
        chunk_size = default_chunk_size(
            rows, linear_weight.shape[0] if linear_weight.dim() == 2 else 1, input.dtype, input.device.type
        )
    elif chunk_size < 1:
        raise ValueError(f"torch_ext.linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    autocast = input.device.type if torch.amp.is_autocast_available(input.device.type) and torch.is_autocast_enabled(input.device.type) else None
    input, linear_weight, linear_bias = autocast_to_lower_precision(input, linear_weight, linear_bias)
    if target.is_floating_point():
        target = target.to(input.dtype)
    args = (input, linear_weight, linear_bias, target, weight, int(ignore_index), reduction, float(label_smoothing), float(z_loss), int(chunk_size))
    requires_grad = input.requires_grad or linear_weight.requires_grad or (linear_bias is not None and linear_bias.requires_grad)
    if reduction != "none" and forms_grad_in_forward(requires_grad):
        loss = _LinearCrossEntropyGradInForward.apply(*args)
    else:
        loss = LinearCrossEntropyFunction.apply(*args, [False, False, False])[0]
    return loss.float() if autocast is not None and loss.dtype in (torch.float16, torch.bfloat16) else loss


class LinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``forward(input, linear_weight, target,
    linear_bias=None)``; the class weight is a buffer, as in ``nn.CrossEntropyLoss``."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if weight is not None and not isinstance(weight, Tensor):
            raise TypeError(
                f"LinearCrossEntropyLoss: weight is the optional 1-D tensor of class weights, got {type(weight).__name__}; "
                "the head's weight is not held by the module but passed to forward(input, linear_weight, target)"
            )
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = resolve_reduction(None, None, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, chunk_size={self.chunk_size}")
