"""Vocab-parallel linear + cross-entropy for tensor-parallel training:
``linear_cross_entropy(..., process_group=group)``.

Each rank of ``group`` holds a contiguous slice of the vocabulary, in rank order: its rows of the
classifier weight ``(V_rank, H)`` (and of the bias), and the full input ``(*, H)`` and targets
(global class indices), as Megatron's column-parallel LM head leaves them. The loss is the
unsharded ``cross_entropy(input @ W.T + b, target, ...)``: chunk by chunk (no rank ever holds more
than a chunk x V_rank block of logits), each rank takes its slice's per-row max, then the sum of
exponentials, the target's logit (from the rank that owns it) and the weighted logit sum of label
smoothing, combined across ranks by two ``torch.distributed.all_reduce`` calls per chunk (MAX, then
one SUM of the three). The backward recomputes each chunk's logits from the saved per-row
logsumexp (no collective), and all-reduces the input's gradient once; the weight and bias
gradients stay local (each rank's slice).

The arithmetic is torch ops on the chunk (float32 for bfloat16/float16 inputs), not the fused
kernels of the single-device path: those normalize by a row's own classes; a shard needs the
global max and sum first. A documented choice, measured in benchmarks/bench_vocab_parallel.py.
Eager only: under torch.compile the call runs outside the graph (torch.compiler.disable).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

_OP = "torch_ext.linear_cross_entropy"


def _shard_sizes(group, local_vocab: int, device: torch.device) -> List[int]:
    """Every rank's vocabulary slice size, in rank order (one small all_gather)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


class _Options:
    """The loss options and the shard's place in the vocabulary."""

    def __init__(self, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, group, offset, vocab):
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap
        self.chunk_size, self.group, self.offset, self.vocab = chunk_size, group, offset, vocab


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(x: Tensor, w: Tensor, b: Optional[Tensor], o: _Options) -> Tuple[Tensor, Optional[Tensor]]:
    """The chunk's logits of this shard in the accumulation dtype (capped when softcap > 0), and
    the derivative of the cap (1 - (capped / softcap)^2) or None."""
    logits = F.linear(x, w, b).to(_acc(x.dtype))
    if not o.softcap:
        return logits, None
    capped = torch.tanh(logits.div_(o.softcap)).mul_(o.softcap)
    return capped, 1.0 - (capped / o.softcap).square()


def _owned(t: Tensor, o: _Options, local_vocab: int) -> Tuple[Tensor, Tensor]:
    """(whether this shard holds row r's target, its local index there or 0)."""
    local = t - o.offset
    owned = (t != o.ignore_index) & (local >= 0) & (local < local_vocab)
    return owned, torch.where(owned, local, torch.zeros_like(local))


def _forward(x, w, b, t, class_weight, o: _Options, want_accuracy: bool):
    """Per row: loss (unreduced), logsumexp, and (want_accuracy) whether the global argmax is the
    target. x (N, H), t (N,)."""
    rows, local_vocab = x.shape[0], w.shape[0]
    acc = _acc(x.dtype)
    e = o.label_smoothing
    kept = t != o.ignore_index
    class_weight = None if class_weight is None else class_weight.to(acc)
    local_w = None if class_weight is None else class_weight[o.offset:o.offset + local_vocab]
    weight_sum = float(o.vocab) if class_weight is None else class_weight.sum()
    row_loss = torch.zeros(rows, dtype=acc, device=x.device)
    lse = torch.zeros(rows, dtype=acc, device=x.device)
    hit = torch.zeros(rows, dtype=torch.bool, device=x.device) if want_accuracy else None
    for r0 in range(0, rows, o.chunk_size):
        r1 = min(rows, r0 + o.chunk_size)
        logits, _ = _chunk_logits(x[r0:r1], w, b, o)
        tc = t[r0:r1]
        owned, local_t = _owned(tc, o, local_vocab)
        local_max, local_arg = logits.max(1) if local_vocab > 0 else (
            torch.full((r1 - r0,), float("-inf"), dtype=acc, device=x.device),
            torch.zeros(r1 - r0, dtype=torch.int64, device=x.device))
        row_max = local_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=o.group)
        safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        sums = torch.zeros(3, r1 - r0, dtype=acc, device=x.device)
        sums[0] = (logits - safe_max[:, None]).exp_().sum(1)
        sums[1] = torch.where(owned, logits.gather(1, local_t[:, None]).squeeze(1), torch.zeros_like(local_max))
        if e > 0:
            sums[2] = (logits * local_w).sum(1) if local_w is not None else logits.sum(1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=o.group)
        chunk_lse = safe_max + sums[0].log()
        chunk_lse = torch.where(torch.isfinite(row_max), chunk_lse, row_max)  # +inf / NaN rows stay so
        kc = kept[r0:r1]
        rw = kc.to(acc) if class_weight is None else class_weight[tc.masked_fill(~kc, 0)] * kc
        loss = (1 - e) * (chunk_lse - sums[1]) + o.z_loss * chunk_lse.square()
        loss = loss * rw
        if e > 0:
            loss = loss + kc.to(acc) * (e / o.vocab) * (weight_sum * chunk_lse - sums[2])
        row_loss[r0:r1] = torch.where(kc, loss, torch.zeros_like(loss))
        lse[r0:r1] = chunk_lse
        if want_accuracy:
            # The global argmax's first index: the lowest global index among the ranks whose max
            # is the row's max.
            first = torch.where(local_max == row_max, local_arg + o.offset, torch.full_like(local_arg, o.vocab))
            dist.all_reduce(first, op=dist.ReduceOp.MIN, group=o.group)
            hit[r0:r1] = kc & (first == tc)
    return row_loss, lse, hit


def _backward(grad_rows, x, w, b, t, class_weight, lse, o: _Options, needs):
    """Gradients of (x, w, b) for the incoming gradient per row; x's all-reduced across ranks."""
    rows, local_vocab = x.shape[0], w.shape[0]
    acc = _acc(x.dtype)
    e = o.label_smoothing
    kept = t != o.ignore_index
    class_weight = None if class_weight is None else class_weight.to(acc)
    local_w = None if class_weight is None else class_weight[o.offset:o.offset + local_vocab]
    weight_sum = float(o.vocab) if class_weight is None else class_weight.sum()
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if needs[0] else None
    grad_w = torch.zeros(w.shape, dtype=acc, device=x.device) if needs[1] else None
    grad_b = torch.zeros(local_vocab, dtype=acc, device=x.device) if needs[2] and b is not None else None
    for r0 in range(0, rows, o.chunk_size):
        r1 = min(rows, r0 + o.chunk_size)
        logits, cap_derivative = _chunk_logits(x[r0:r1], w, b, o)
        tc, kc, g = t[r0:r1], kept[r0:r1], grad_rows[r0:r1] * kept[r0:r1]
        chunk_lse = lse[r0:r1]
        owned, local_t = _owned(tc, o, local_vocab)
        rw = kc.to(acc) if class_weight is None else class_weight[tc.masked_fill(~kc, 0)] * kc
        coef_p = g * (rw * (1 - e + 2 * o.z_loss * chunk_lse) + (e / o.vocab) * weight_sum)
        dlogits = logits.sub_(chunk_lse[:, None]).exp_().mul_(coef_p[:, None])
        if e > 0:
            smooth = (g * (e / o.vocab))[:, None]
            dlogits.sub_(smooth * local_w if local_w is not None else smooth)
        target_coef = torch.where(owned, g * rw * (1 - e), torch.zeros_like(g))
        dlogits.scatter_add_(1, local_t[:, None], -target_coef[:, None])
        if cap_derivative is not None:
            dlogits.mul_(cap_derivative)
        d = dlogits.to(x.dtype)
        if grad_x is not None:
            grad_x[r0:r1] = (d @ w).to(acc)
        if grad_w is not None:
            grad_w.add_((d.t() @ x[r0:r1]).to(acc))
        if grad_b is not None:
            grad_b.add_(dlogits.sum(0))
    if grad_x is not None:  # once: the sum of every rank's share (the same `needs` on every rank)
        dist.all_reduce(grad_x, op=dist.ReduceOp.SUM, group=o.group)
    cast = lambda g: None if g is None else g.to(x.dtype)  # noqa: E731
    return cast(grad_x), cast(grad_w), cast(grad_b)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, t, class_weight, o, want_accuracy):
        row_loss, lse, hit = _forward(x, w, b, t, class_weight, o, want_accuracy)
        ctx.o = o
        ctx.save_for_backward(x, w, b, t, class_weight, lse)
        ctx.mark_non_differentiable(*(o for o in (lse, hit) if o is not None))  # one call: each replaces the last
        return row_loss, lse, hit

    @staticmethod
    def backward(ctx, grad_rows, _grad_lse, _grad_hit):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{_OP}: torch_ext does not support double backward (a gradient of its gradient); "
                               "use torch.nn.functional for higher-order gradients")
        x, w, b, t, class_weight, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if grad_rows is None or not any(needs[:3]):
            return (None,) * 7
        gx, gw, gb = _backward(grad_rows.to(lse.dtype), x, w, b, t, class_weight, lse, ctx.o, needs)
        return gx, gw, gb, None, None, None, None


@torch.compiler.disable
def vocab_parallel_linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias, weight,
                                        reduction: str, ignore_index: int, label_smoothing: float, z_loss: float,
                                        chunk_size: Optional[int], softcap: float, process_group,
                                        return_lse: bool, return_accuracy: bool):
    """linear_cross_entropy over this rank's vocabulary slice (see the module docstring).
    Arguments as linear_cross_entropy's, already checked; softcap as a float (0: off)."""
    from .linear_cross_entropy import default_chunk_size

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_OP}: process_group was given but torch.distributed is not initialized")
    if linear_weight.dim() != 2:
        raise ValueError(f"{_OP}: with process_group, linear_weight must be this rank's (V_rank, H) slice, got shape "
                         f"{tuple(linear_weight.shape)}")
    if target.is_floating_point():
        raise ValueError(f"{_OP}: with process_group, target must hold class indices (int64 or uint8); class "
                         "probabilities are not supported in the vocab-parallel path")
    hidden = linear_weight.shape[1]
    if input.dim() < 1 or input.shape[-1] != hidden:
        raise ValueError(f"{_OP}: input must have shape (*, H) with H = linear_weight.size(1) = {hidden}, got "
                         f"{tuple(input.shape)}")
    lead = tuple(input.shape[:-1])
    if tuple(target.shape) != lead:
        raise ValueError(f"{_OP}: target of class indices must have shape {lead} (input's leading dims), got "
                         f"{tuple(target.shape)}")
    if linear_bias is not None and tuple(linear_bias.shape) != (linear_weight.shape[0],):
        raise ValueError(f"{_OP}: linear_bias must have shape ({linear_weight.shape[0]},) (this rank's slice), got "
                         f"{tuple(linear_bias.shape)}")
    if linear_weight.dtype != input.dtype:
        raise ValueError(f"{_OP}: linear_weight has dtype {linear_weight.dtype} but input has dtype {input.dtype}; "
                         "they must match")
    sizes = _shard_sizes(process_group, linear_weight.shape[0], input.device)
    rank = dist.get_rank(process_group)
    vocab, offset = sum(sizes), sum(sizes[:rank])
    if weight is not None and tuple(weight.shape) != (vocab,):
        raise ValueError(f"{_OP}: weight must hold the class weights of the whole vocabulary ({vocab},), got "
                         f"{tuple(weight.shape)}")
    x = input.reshape(-1, hidden)
    t = target.reshape(-1).to(torch.int64)
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        raise IndexError(f"{_OP}: target {int(t[bad][0])} is out of bounds: class indices must be in [0, {vocab - 1}] "
                         f"or equal ignore_index ({ignore_index})")
    if chunk_size is None:  # the rows the unsharded loss would take: a shard's chunk is 1/world of its bytes
        chunk_size = default_chunk_size(x.shape[0], vocab, input.dtype, input.device.type)
    o = _Options(int(ignore_index), reduction, float(label_smoothing), float(z_loss), float(softcap),
                 max(1, int(chunk_size)), process_group, offset, vocab)
    row_loss, lse, hit = _VocabParallelLinearCrossEntropy.apply(x, linear_weight, linear_bias, t, weight, o,
                                                                 return_accuracy)
    kept = t != ignore_index
    if reduction == "none":
        loss = row_loss.reshape(lead)
    elif reduction == "sum":
        loss = row_loss.sum()
    else:
        rw = kept.to(row_loss.dtype) if weight is None else weight.to(row_loss.dtype)[t.masked_fill(~kept, 0)] * kept
        loss = row_loss.sum() / rw.sum()
    loss = loss.to(input.dtype)  # as the single-device loss (the caller makes it float32 under autocast)
    if not (return_lse or return_accuracy):
        return loss
    out = [loss]
    if return_lse:
        out.append(lse.reshape(lead))
    if return_accuracy:
        out.append((hit.sum() / kept.sum()).to(lse.dtype))
    return tuple(out)
