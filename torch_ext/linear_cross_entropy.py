"""Linear + cross-entropy without materializing the logits:
``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` over row chunks.

Ops (csrc/ops.cpp, loop in csrc/linear_cross_entropy.cpp): ``torch_ext::linear_cross_entropy_fwd``
and ``torch_ext::linear_cross_entropy_bwd``. This file gives them their fake kernels and autograd,
the functional ``linear_cross_entropy`` and the module ``LinearCrossEntropyLoss``.
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
    any_requires_grad,
    autocast_to_lower_precision,
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
from .cross_entropy import check_accuracy_target, extra_outputs, softcap_value

_fwd_op = direct_when_no_grad(torch.ops.torch_ext.linear_cross_entropy_fwd.default)
_bwd_op = direct_when_no_grad(torch.ops.torch_ext.linear_cross_entropy_bwd.default)

# Bytes of one chunk's logits (their gradient is written over them), per device type. CPU: measured
# (benchmarks/results/cpu.txt). CUDA: each chunk's weight-gradient GEMM also reads and writes the
# float32 V x H sum (8 V H bytes for 2 V H x rows FLOPs), so a chunk needs some 600+ rows to keep an
# H200's GEMM compute-bound; 512 MiB gives 2088 rows at V=128256 in bfloat16 (not yet measured on
# a GPU).
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}
# bfloat16/float16 on CPU: each chunk's weight gradient comes out of a 16-bit GEMM and is added into
# the float32 V x H sum, a pass over 12 V H bytes per chunk whatever its rows, against the chunk's
# 6 rows V H FLOPs of GEMM: amortizing it takes rows, not bytes. At 4096x512->32000 in bfloat16
# (AVX-512 BF16, 2 cores, interleaved): 520 rows (32 MiB) 617 ms a step, 1024 rows 564 ms,
# 2048 rows 551 ms, torch.compile 588 ms.
MIN_ROWS_16_BIT_CPU = 1024


def default_chunk_size(rows: int, vocab: int, dtype: torch.dtype, device_type: str = "cpu") -> int:
    """Rows per chunk when chunk_size is None: as many as keep one chunk's logits (rows x vocab) within
    CHUNK_BYTES of the device type (CPU 32 MiB, CUDA 512 MiB), rounded down to a multiple of 8 when
    at least 8, at least 1; bfloat16/float16 on CPU at least MIN_ROWS_16_BIT_CPU; at most the rows.
    At N=4096, V=32000, float32 on CPU that is 256 rows: 31 MiB of logits, ~1/16 of the whole; in
    bfloat16 1024 rows (62.5 MiB)."""
    element = torch.empty((), dtype=dtype).element_size()
    chunk = max(1, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) // max(1, vocab * element))
    if chunk >= 8:
        chunk -= chunk % 8
    if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        chunk = max(chunk, MIN_ROWS_16_BIT_CPU)
    return int(max(1, min(chunk, rows))) if rows > 0 else 1


def _check_args(op, input, linear_weight, linear_bias, target, reduction, label_smoothing, chunk_size):
    """The checks of csrc/linear_cross_entropy.cpp, for fake tensors (torch.compile tracing)."""
    torch._check(
        linear_weight.dim() == 2,
        lambda: f"{op}: linear_weight must be 2-D (V, H), got shape {tuple(linear_weight.shape)}",
    )
    torch._check(input.dim() >= 1, lambda: f"{op}: input must have shape (*, H), got a 0-D tensor")
    vocab, hidden = linear_weight.shape
    torch._check(
        input.shape[-1] == hidden,
        lambda: f"{op}: input.size(-1) is {input.shape[-1]} but linear_weight.size(1) (H) is {hidden}; "
        "they must be equal",
    )
    torch._check(
        linear_weight.dtype == input.dtype,
        lambda: f"{op}: linear_weight has dtype {linear_weight.dtype} but input has dtype {input.dtype}; "
        "they must match",
    )
    if linear_bias is not None:
        torch._check(
            linear_bias.dim() == 1 and linear_bias.shape[0] == vocab,
            lambda: f"{op}: linear_bias must have shape (V,) = ({vocab},), got {tuple(linear_bias.shape)}",
        )
    lead = list(input.shape[:-1])
    if target.is_floating_point():
        torch._check(
            list(target.shape) == lead + [vocab],
            lambda: f"{op}: a floating-point target holds class probabilities and must have shape "
            f"{tuple(lead + [vocab])}, got {tuple(target.shape)}",
        )
    else:
        torch._check(
            target.dtype in (torch.int64, torch.uint8),
            lambda: f"{op}: target must hold class indices as int64 (or uint8), or class probabilities; "
            f"got {target.dtype}",
        )
        torch._check(
            list(target.shape) == lead,
            lambda: f"{op}: target of class indices must have shape {tuple(lead)}, got {tuple(target.shape)}",
        )
    check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    return lead


def _grads_like(mask, input, linear_weight, linear_bias):
    """The fake kernels' gradients of (input, linear_weight, linear_bias); None where not asked
    for, and the bias's without a bias."""
    mask = (mask[0], mask[1], mask[2] and linear_bias is not None)
    return fake_grads(input, mask, (input.shape, linear_weight.shape, linear_weight.shape[:1]))


def _check_softcap(op, softcap):
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"{op}: softcap must be a positive finite number (0: no softcap), got {softcap}")


@torch.library.register_fake("torch_ext::linear_cross_entropy_fwd")
def _lce_fwd_fake(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                  chunk_size, grad_mask, softcap=0.0, ignored_row_stats=False, loss_dtype=None):
    op = "torch_ext.linear_cross_entropy"
    lead = _check_args(op, input, linear_weight, linear_bias, target, reduction, label_smoothing, chunk_size)
    _check_softcap(op, softcap)
    loss = input.new_empty(lead if reduction == "none" else (), dtype=loss_dtype_or_input(op, input, loss_dtype))
    rows = math.prod(lead)
    stats = input.new_empty((rows, 3), dtype=accumulation_dtype(input.dtype))
    return (loss, stats) + _grads_like(grad_mask, input, linear_weight, linear_bias)


@torch.library.register_fake("torch_ext::linear_cross_entropy_bwd")
def _lce_bwd_fake(grad_loss, input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
                  label_smoothing, z_loss, chunk_size, output_mask, softcap=0.0):
    op = "torch_ext.linear_cross_entropy_bwd"
    _check_args(op, input, linear_weight, linear_bias, target, reduction, label_smoothing, chunk_size)
    _check_softcap(op, softcap)
    return _grads_like(output_mask, input, linear_weight, linear_bias)


def _probability_target_grad(grad_loss, saved, options):
    """The gradient of the loss with respect to a class-probability target, as F.cross_entropy's:
    the loss of a row is ``-sum_c w_c q_c log_softmax(logits)_c`` with ``q = (1 - label_smoothing)
    * target + label_smoothing / V`` (z_loss does not depend on the target), so its gradient is
    ``-(1 - label_smoothing) * w_c * log_softmax(logits)_c`` times grad_loss (divided by the row
    count for reduction mean). Chunk by chunk: each chunk's logits are recomputed (one more GEMM
    of the chunk) and never the whole N x V at once; only the result is target-sized. Torch ops,
    so with create_graph it is differentiable like any other."""
    input, linear_weight, linear_bias, target, weight = saved
    ignore_index, reduction, label_smoothing, z_loss, chunk_size, softcap = options
    vocab = linear_weight.shape[0]
    x = input.reshape(-1, input.shape[-1])
    rows = x.shape[0]
    dtype = target.dtype
    if reduction == "none":
        row_scale = grad_loss.reshape(-1, 1).to(dtype) * -(1.0 - label_smoothing)
    else:
        row_scale = grad_loss.reshape(()).to(dtype) * -(1.0 - label_smoothing)
        if reduction == "mean":
            row_scale = row_scale / max(rows, 1)
    class_weight = None if weight is None else weight.to(dtype)
    # From grad_loss: batched by vmap (is_grads_batched, torch.func) the result is batched too, and
    # takes the chunks' batched values in place.
    out = grad_loss.new_empty((rows, vocab), dtype=dtype)
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        logits = F.linear(x[start:stop], linear_weight, linear_bias)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        log_prob = torch.log_softmax(logits, -1).to(dtype)
        if class_weight is not None:
            log_prob = log_prob * class_weight
        out[start:stop] = log_prob * (row_scale[start:stop] if reduction == "none" else row_scale)
    return out.reshape(target.shape)


def _output_mask(ctx):
    needs = ctx.needs_input_grad
    return [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2])]


# The forward op's arguments: (input, linear_weight, linear_bias, target, weight, ignore_index,
# reduction, label_smoothing, z_loss, chunk_size, grad_mask, softcap, ignored_row_stats, loss_dtype).
_N_INPUTS = 14


def _setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight = inputs[:5]
    # ignore_index, reduction, label_smoothing, z_loss, chunk_size, softcap
    ctx.options = tuple(inputs[5:10]) + (inputs[11] if len(inputs) > 11 else 0.0,)
    ctx.has_bias = linear_bias is not None
    # The gradients a grad_mask asked the forward op for (a scalar loss's only: the op refuses one
    # with reduction none, whose backward recomputes).
    grad_mask = inputs[10] if inputs[6] != "none" else (False, False, False)
    save_with_formed_grads(ctx, (input, linear_weight, linear_bias, target, weight), output, grad_mask, first_grad=2)


def _bwd_args(ctx, mask):
    """linear_cross_entropy_bwd's arguments after grad_loss and the saved tensors."""
    *options, softcap = ctx.options
    return (*options, mask, softcap)


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:  # only the non-differentiable outputs reached backward
        return (None,) * _N_INPUTS
    input, linear_weight, linear_bias, target, weight, *unit_grads = ctx.saved_tensors
    grads = [None] * _N_INPUTS
    grads[:3], missing = hand_over_formed(ctx, _output_mask(ctx), unit_grads, grad_loss)
    if any(missing):
        computed = _bwd_op(grad_loss, input, linear_weight, linear_bias, target, weight, *_bwd_args(ctx, missing))
        for i in range(3):
            if missing[i]:
                grads[i] = computed[i]
    if ctx.needs_input_grad[3]:
        grads[3] = _probability_target_grad(grad_loss, (input, linear_weight, linear_bias, target, weight),
                                            ctx.options)
    return tuple(grads)


torch.library.register_autograd("torch_ext::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)
register_no_double_backward("torch_ext::linear_cross_entropy_bwd", "torch_ext.linear_cross_entropy")


class LinearCrossEntropyFunction(torch.autograd.Function):
    """autograd.Function over the op pair: ``apply(input, linear_weight, linear_bias, target,
    weight, ignore_index, reduction, label_smoothing, z_loss, chunk_size, grad_mask, softcap,
    ignored_row_stats, loss_dtype=None)`` -> (loss, stats, grad_input, grad_weight, grad_bias), the
    gradients not asked for None. With grad_mask all
    False the backward recomputes each chunk's logits (torch.compile'd graphs with reduction none
    use this path); with grad_mask (reductions mean and sum) the forward forms the gradients for
    grad_output = 1 while each chunk's logits exist, and the backward scales them (torch.compile'd
    graphs, and the eager path of a probability target that requires grad, whose own gradient is
    formed in backward; other eager paths use the C++ node of csrc/autograd_node.h).

    Example::

        >>> x, w, t = torch.randn(8, 16, requires_grad=True), torch.randn(100, 16), torch.randint(0, 100, (8,))
        >>> loss, stats, *_ = torch_ext.LinearCrossEntropyFunction.apply(
        ...     x, w, None, t, None, -100, "mean", 0.0, 0.0, 4, [False, False, False], 0.0, False)
        >>> loss.backward()
        >>> x.grad.shape
        torch.Size([8, 16])
    """

    forward = forward_with_ctx(_fwd_op, _setup_context)
    backward = staticmethod(_backward)


_LinearCrossEntropyForTransforms = for_transforms(LinearCrossEntropyFunction, _fwd_op, _setup_context,
                                                  "torch_ext.linear_cross_entropy")


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
    options=None,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    return_accuracy: bool = False,
    num_items_in_batch=None,
    process_group=None,
):
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without ever
    holding the whole logits: rows go through in chunks of ``chunk_size`` (None: see
    ``default_chunk_size``). Arguments as ``torch.nn.functional.linear_cross_entropy`` (and
    ``torch_ext.cross_entropy``'s ``z_loss``). input ``(*, H)``, linear_weight ``(V, H)``,
    linear_bias ``(V,)``; target class indices ``(*)`` or class probabilities ``(*, V)``.
    Under ``torch.autocast`` the linear runs in the autocast dtype and the loss is returned in
    float32 (computed in float32 from the 16-bit logits, not rounded to their dtype), as ``F.linear``
    followed by ``F.cross_entropy`` would. In eager mode with reduction
    mean or sum, the gradients are formed in the forward pass, while each chunk's logits exist (the
    logits computed once instead of twice). A class-probability target that requires grad gets its
    gradient too, as through F.cross_entropy: in backward, chunk by chunk (each chunk's logits
    recomputed once more); a target that does not require grad costs nothing extra. A
    K-dimensional linear_weight ``(V, d_1, ..., d_K, H)`` (bias ``(V, d_1, ..., d_K)``, input
    ``(N, H)``, target ``(N, d_1, ..., d_K)`` or ``(N, V, d_1, ..., d_K)``) is taken as
    F.linear_cross_entropy takes it: one chunked problem per output position.
    ``options`` (a ``torch.nn.LinearCrossEntropyOptions``, as PyTorch's function takes it): this
    function always chunks; only its ``batch_chunk_size`` is used, as the rows per chunk when
    ``chunk_size`` is None and its ``chunking_method`` is None (see LinearCrossEntropyLoss).
    ``num_items_in_batch``: as ``torch_ext.cross_entropy``'s (the summed loss divided by it).
    ``softcap``, ``return_lse``, ``return_accuracy``: as ``torch_ext.cross_entropy``'s, formed chunk
    by chunk in the same pass, except that this ``lse`` is not differentiable (a detached output:
    its gradient would need every chunk's logits once more; use ``z_loss`` for a penalty on it);
    not with a K-dimensional linear_weight.

    ``process_group`` (a ``torch.distributed`` group; None: this device alone): vocab-parallel
    (tensor-parallel) training. linear_weight ``(V_rank, H)`` and linear_bias ``(V_rank,)`` are then
    this rank's contiguous slice of the vocabulary, in rank order; input, target (global class
    indices) and ``weight`` (class weights of the whole vocabulary) are the same on every rank. The
    result is the unsharded loss on every rank; the input's gradient is all-reduced (once), the
    weight and bias gradients are this rank's slice's. Class-index targets only; eager (see
    torch_ext/vocab_parallel.py). A DTensor linear_weight sharded on dim 0 (``Shard(0)`` on a 1-D
    mesh; bias likewise, input replicated or a plain tensor) is taken the same way, with its mesh's
    group as process_group; its gradient is then a DTensor sharded as the weight.

    Example::

        >>> hidden, lm_head = torch.randn(32, 64, requires_grad=True), torch.nn.Linear(64, 1000, bias=False)
        >>> target = torch.randint(0, 1000, (32,))
        >>> torch_ext.linear_cross_entropy(hidden, lm_head.weight, target, ignore_index=-100).backward()
        >>> lm_head.weight.grad.shape
        torch.Size([1000, 64])
    """
    op = "torch_ext.linear_cross_entropy"
    reduction = reduction_for_items(num_items_in_batch, resolve_reduction(None, None, reduction), op)
    cap = softcap_value(op, softcap)
    chunk_size = rows_per_chunk(chunk_size, options)
    check_accuracy_target(op, target, return_accuracy)
    if ignore_index is None:  # as F.linear_cross_entropy
        ignore_index = -100
    extras = return_lse or return_accuracy
    if _is_dtensor(linear_weight):
        input, linear_weight, linear_bias, process_group = _dtensor_shards(input, linear_weight, linear_bias,
                                                                          process_group)
    if process_group is not None:
        out = _vocab_parallel(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                              label_smoothing, z_loss, chunk_size, cap, process_group, return_lse, return_accuracy)
        if extras:
            return (divide_by_items(out[0], num_items_in_batch),) + out[1:]
        return divide_by_items(out, num_items_in_batch)
    if extras and linear_weight.dim() > 2:
        raise ValueError(f"{op}: return_lse and return_accuracy are not supported with a K-dimensional "
                         f"linear_weight (got shape {tuple(linear_weight.shape)})")
    out = _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                label_smoothing, z_loss, chunk_size, cap, extras, return_lse)
    if not extras:
        return divide_by_items(out, num_items_in_batch)
    loss, stats = out
    return extra_outputs(divide_by_items(loss, num_items_in_batch), stats, target, ignore_index, return_lse,
                         return_accuracy, list(input.shape[:-1]))


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _dtensor_shards(input, linear_weight, linear_bias, process_group):
    """(input, this rank's weight and bias slices, the mesh's group) from a DTensor weight sharded
    on dim 0; to_local is differentiable, so the weight's gradient comes back as a DTensor."""
    from torch.distributed.tensor import Replicate, Shard

    op = "torch_ext.linear_cross_entropy"
    mesh = linear_weight.device_mesh
    if mesh.ndim != 1 or tuple(linear_weight.placements) != (Shard(0),):
        raise ValueError(f"{op}: a DTensor linear_weight must be sharded on dim 0 (the vocabulary) over a 1-D mesh, "
                         f"got placements {tuple(linear_weight.placements)} on a {mesh.ndim}-D mesh")
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError(
            f"{op}: process_group differs from the DTensor linear_weight's mesh group; pass one or the other"
        )
    if linear_bias is not None and _is_dtensor(linear_bias):
        if tuple(linear_bias.placements) != (Shard(0),) or linear_bias.device_mesh != mesh:
            raise ValueError(f"{op}: a DTensor linear_bias must be sharded on dim 0 over linear_weight's mesh, got "
                             f"{tuple(linear_bias.placements)}")
        linear_bias = linear_bias.to_local()
    if _is_dtensor(input):
        if any(p != Replicate() for p in input.placements):
            raise ValueError(f"{op}: a DTensor input must be replicated, got placements {tuple(input.placements)}")
        input = input.to_local()
    return input, linear_weight.to_local(), linear_bias, group


def rows_per_chunk(chunk_size: Optional[int], options) -> Optional[int]:
    """chunk_size, else the rows per chunk that PyTorch's LinearCrossEntropyOptions ask for (its
    batch_chunk_size, used when its chunking_method is None), else None (default_chunk_size)."""
    if chunk_size is not None or options is None:
        return chunk_size
    if getattr(options, "chunking_method", "auto") is None:
        return getattr(options, "batch_chunk_size", None)
    return None


def _check_call(weight, chunk_size) -> None:
    """What both paths (one process, vocab-parallel) refuse before any work: a class weight that
    asks for its gradient, and fewer than one row per chunk."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "torch_ext.linear_cross_entropy is not differentiable with respect to weight; pass weight.detach()"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"torch_ext.linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")


def _vocab_parallel(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                    z_loss, chunk_size, softcap, process_group, return_lse, return_accuracy):
    from .vocab_parallel import vocab_parallel_linear_cross_entropy

    _check_call(weight, chunk_size)
    input, linear_weight, linear_bias = autocast_to_lower_precision(input, linear_weight, linear_bias)
    loss_dtype = torch.float32 if float32_loss_of_16_bit(input) else input.dtype
    return vocab_parallel_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                               ignore_index, label_smoothing, z_loss, chunk_size, softcap,
                                               process_group, return_lse, return_accuracy, loss_dtype)


def _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                          z_loss, chunk_size, softcap=0.0, return_stats=False, ignored_row_stats=False):
    """The loss (with return_stats: (loss, the rows' stats)) by the path that applies."""
    _check_call(weight, chunk_size)
    if linear_weight.dim() > 2:
        return _k_dimensional(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                              label_smoothing, z_loss, chunk_size, softcap)
    rows = input.shape[:-1].numel() if input.dim() >= 1 else 0
    input, linear_weight, linear_bias = autocast_to_lower_precision(input, linear_weight, linear_bias)
    if chunk_size is None:  # for the dtype the GEMMs run in (autocast's, where it casts)
        chunk_size = default_chunk_size(
            rows, linear_weight.shape[0] if linear_weight.dim() == 2 else 1, input.dtype, input.device.type
        )
    # Under autocast the loss is float32, as F.cross_entropy's of 16-bit logits: the op writes the
    # loss it computed in float32 as it is, not rounded to the logits' dtype first.
    float32_loss = float32_loss_of_16_bit(input)
    loss_dtype = torch.float32 if float32_loss else None
    if target.is_floating_point():  # under autocast float32, as F.cross_entropy reads it (the op widens the logits)
        target = target.to(torch.float32 if float32_loss else input.dtype)
    args = (input, linear_weight, linear_bias, target, weight, int(ignore_index), reduction, float(label_smoothing),
            float(z_loss), int(chunk_size))
    no_grads = [False, False, False]
    wanted = [input.requires_grad, linear_weight.requires_grad, linear_bias is not None and linear_bias.requires_grad]
    eager_training = forms_grad_in_forward(any_requires_grad(input, linear_weight, linear_bias))
    if transforms_active():  # torch.func: the backward op forms the gradients
        loss, stats, *_ = _LinearCrossEntropyForTransforms.apply(*args, no_grads, softcap, ignored_row_stats,
                                                                 loss_dtype)
    elif (eager_training and not target.requires_grad) or eager_without_autograd(
        input, linear_weight, linear_bias, target
    ):
        # The gradients formed chunk by chunk in the forward and handed over by a C++ node
        # (csrc/autograd_node.h; reduction none: the node calls the backward op); without
        # autograd, the forward op alone.
        loss, stats = _C._linear_cross_entropy_eager(*args, softcap, ignored_row_stats, True, float32_loss)
    elif eager_training and reduction != "none":
        # A probability target's gradient: formed in backward, in Python (the Function).
        loss, stats, *_ = LinearCrossEntropyFunction.apply(*args, wanted, softcap, ignored_row_stats, loss_dtype)
    elif not needs_autograd(input, linear_weight, linear_bias, target):  # compiled
        loss, stats, *_ = _fwd_op(*args, no_grads, softcap, ignored_row_stats, loss_dtype)
    else:
        # Compiled training (or an eager call the branches above left: nothing wanted, or reduction none). The
        # compiled graph forms the gradients in its forward too (reductions mean and sum): a
        # backward recomputing every chunk's logits would repeat the forward's GEMMs.
        mask = wanted if reduction != "none" and torch.is_grad_enabled() else no_grads
        loss, stats, *_ = LinearCrossEntropyFunction.apply(*args, mask, softcap, ignored_row_stats, loss_dtype)
    return (loss, stats) if return_stats else loss


def _k_dimensional(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, z_loss,
                   chunk_size, softcap):
    """The K-dimensional loss of F.linear_cross_entropy: linear_weight ``(C, d_1, ..., d_K, H)``,
    linear_bias ``(C, d_1, ..., d_K)``, input ``(N, H)``, target ``(N, d_1, ..., d_K)`` (class
    indices) or ``(N, C, d_1, ..., d_K)`` (probabilities). Each output position p has its own
    ``(C, H)`` weight, so it is one (C) problem per position (the same FLOPs as the logits GEMM,
    and no ``N x C x prod(d)`` logits): the per-position losses of reduction sum are added, and
    mean divides that sum by what F.cross_entropy divides by (the number of N x prod(d) rows for
    probabilities, the summed class weights of the rows not ignored for indices; z_loss too)."""
    op = "torch_ext.linear_cross_entropy"
    classes, hidden = linear_weight.shape[0], linear_weight.shape[-1]
    dims = tuple(linear_weight.shape[1:-1])
    positions = math.prod(dims)
    if input.dim() != 2:
        raise ValueError(f"{op}: a K-dimensional linear_weight {tuple(linear_weight.shape)} needs a batched input "
                         f"(N, H), got input of shape {tuple(input.shape)}")
    if input.shape[1] != hidden:
        raise ValueError(f"{op}: input.size(-1) is {input.shape[1]} but linear_weight.size(-1) (H) is {hidden}; "
                         "they must be equal")
    if linear_bias is not None and tuple(linear_bias.shape) != (classes,) + dims:
        raise ValueError(f"{op}: linear_bias must have shape {(classes,) + dims} to match linear_weight "
                         f"{tuple(linear_weight.shape)}, got {tuple(linear_bias.shape)}")
    rows = input.shape[0]
    prob = target.is_floating_point()
    expected = (rows, classes) + dims if prob else (rows,) + dims
    if tuple(target.shape) != expected:
        kind = "class probabilities" if prob else "class indices"
        raise ValueError(f"{op}: a target of {kind} must have shape {expected} for input {tuple(input.shape)} "
                         f"and linear_weight {tuple(linear_weight.shape)}, got {tuple(target.shape)}")
    w = linear_weight.reshape(classes, positions, hidden)
    b = None if linear_bias is None else linear_bias.reshape(classes, positions)
    t = target.reshape(rows, classes, positions) if prob else target.reshape(rows, positions)
    per_position = "none" if reduction == "none" else "sum"
    losses = [
        linear_cross_entropy(input, w[:, p], t[:, :, p] if prob else t[:, p],
                             linear_bias=None if b is None else b[:, p],
                             weight=weight, reduction=per_position, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size,
                             softcap=softcap or None)
        for p in range(positions)
    ]
    if reduction == "none":
        return torch.stack(losses, 1).reshape((rows,) + dims) if losses else input.new_empty((rows,) + dims)
    loss = torch.stack(losses).sum() if losses else input.new_zeros(())
    if reduction == "sum":
        return loss
    if prob:
        return loss / (rows * positions)
    valid = t != ignore_index
    if weight is None:
        return loss / valid.sum()
    return loss / (weight[t.masked_fill(~valid, 0)] * valid).sum().to(loss.dtype)


# torch.nn.LinearCrossEntropyLoss exists from PyTorch 2.13; before, the same module on _WeightedLoss
# (its base there: the class weight a buffer, reduction an attribute).
_TorchLinearCrossEntropyLoss = getattr(nn, "LinearCrossEntropyLoss", None)
_LossBase = _TorchLinearCrossEntropyLoss if _TorchLinearCrossEntropyLoss is not None else nn.modules.loss._WeightedLoss


class LinearCrossEntropyLoss(_LossBase):
    """``torch.nn.LinearCrossEntropyLoss`` on the fused kernels: the module holds its own Linear
    (``linear.weight`` of shape ``(C * prod(out_features), in_features)``, ``linear.bias`` when
    ``bias=True``; the class weight is the buffer ``weight``) and is called ``loss(input, target)``.
    Same constructor, parameters, state_dict keys and forward as PyTorch's (a subclass of it on
    PyTorch >= 2.13; an nn.Module with the same interface before), plus the keyword-only ``z_loss``,
    ``chunk_size``, ``softcap``, ``return_lse`` and ``return_accuracy`` of
    :func:`linear_cross_entropy`, which is the weight-as-argument form.

    ``options`` (a ``torch.nn.LinearCrossEntropyOptions``) is accepted and kept (repr, attribute)
    for code written for PyTorch's module, but this module always chunks, by ``chunk_size``: the
    options' ``acc_policy`` and ``allow_retain_graph`` do not apply (the kernels accumulate in
    float32, and a retained graph can always be backpropagated twice). Only its
    ``batch_chunk_size`` is used, as the rows per chunk when ``chunk_size`` is None and the
    options' ``chunking_method`` is None (what makes PyTorch use ``batch_chunk_size``).

    ``out_features=(d_1, ..., d_K)``: the K-dimensional loss, input ``(N, in_features)``, target
    ``(N, d_1, ..., d_K)`` or ``(N, C, d_1, ..., d_K)``; computed as one chunked (C) problem per
    output position (see :func:`linear_cross_entropy`).

    Example::

        >>> criterion = torch_ext.LinearCrossEntropyLoss(64, 1000, label_smoothing=0.1)
        >>> criterion(torch.randn(32, 64), torch.randint(0, 1000, (32,))).backward()
        >>> criterion.linear.weight.grad.shape
        torch.Size([1000, 64])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        chunk_size: Optional[int] = None,
        softcap: Optional[float] = None,
        return_lse: bool = False,
        return_accuracy: bool = False,
    ) -> None:
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"LinearCrossEntropyLoss: {name} must be an int, got {type(value).__name__}. The module now "
                    "mirrors torch.nn.LinearCrossEntropyLoss: LinearCrossEntropyLoss(in_features, num_classes, "
                    "bias=..., weight=..., ...) holds the head's Linear and is called loss(input, target); "
                    "torch_ext.linear_cross_entropy(input, linear_weight, target, ...) is the form that takes "
                    "the head's weight as an argument"
                )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"LinearCrossEntropyLoss: chunk_size must be >= 1 or None, got {chunk_size}")
        out_features = tuple(out_features)
        if _TorchLinearCrossEntropyLoss is not None:
            super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device,
                             dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, options=options)
        else:  # PyTorch's __init__, on _WeightedLoss
            if weight is not None and weight.shape != (num_classes,):
                raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
            if label_smoothing < 0 or label_smoothing > 1.0:
                raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
            super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
            self.num_classes = num_classes
            self.out_features = out_features
            self.ignore_index = ignore_index
            self.label_smoothing = label_smoothing
            self.linear = nn.Linear(in_features, math.prod(out_features) * num_classes, bias=bias, device=device,
                                    dtype=dtype)
            self.options = options
        self.reduction = resolve_reduction(None, None, self.reduction)
        softcap_value("LinearCrossEntropyLoss", softcap)
        self.z_loss = z_loss
        self.chunk_size = chunk_size
        self.softcap = softcap
        self.return_lse = return_lse
        self.return_accuracy = return_accuracy

    def forward(self, input: Tensor, target: Tensor, *, num_items_in_batch=None):
        linear_weight, linear_bias = self.linear.weight, self.linear.bias
        if self.out_features:
            linear_weight = linear_weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
            if linear_bias is not None:
                linear_bias = linear_bias.reshape((self.num_classes, *self.out_features))
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
            options=self.options,
            chunk_size=self.chunk_size,
            softcap=self.softcap,
            return_lse=self.return_lse,
            return_accuracy=self.return_accuracy,
            num_items_in_batch=num_items_in_batch,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, reduction={self.reduction}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, options={self.options}, "
            f"z_loss={self.z_loss}, chunk_size={self.chunk_size}, softcap={self.softcap}, "
            f"return_lse={self.return_lse}, return_accuracy={self.return_accuracy}"
        )
