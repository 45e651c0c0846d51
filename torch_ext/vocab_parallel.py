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

from ._common import accumulation_dtype, hand_over_unit_grads, transforms_active

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

    def __init__(self, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, group, offset, vocab,
                 loss_dtype):
        self.ignore_index, self.reduction, self.loss_dtype = ignore_index, reduction, loss_dtype
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap
        self.chunk_size, self.group, self.offset, self.vocab = chunk_size, group, offset, vocab


def _chunk_logits(x: Tensor, w: Tensor, b: Optional[Tensor], o: _Options) -> Tuple[Tensor, Optional[Tensor]]:
    """The chunk's logits of this shard in the accumulation dtype (capped when softcap > 0), and
    the derivative of the cap (1 - (capped / softcap)^2) or None."""
    logits = F.linear(x, w, b).to(accumulation_dtype(x.dtype))
    if not o.softcap:
        return logits, None
    capped = logits.div_(o.softcap).tanh_().mul_(o.softcap)
    return capped, capped.div(o.softcap).square_().neg_().add_(1.0)


class _Shard:
    """What every chunk of one call shares: this shard's options, class weights and per-row
    weights (rw: weight[target], 0 for ignored rows), in the accumulation dtype."""

    def __init__(self, x: Tensor, w: Tensor, t: Tensor, class_weight: Optional[Tensor], o: _Options):
        self.o, self.acc, self.local_vocab = o, accumulation_dtype(x.dtype), w.shape[0]
        self.kept = t != o.ignore_index
        cw = None if class_weight is None else class_weight.to(self.acc)
        self.local_w = None if cw is None else cw[o.offset:o.offset + self.local_vocab]
        self.weight_sum = float(o.vocab) if cw is None else cw.sum()
        self.rw = self.kept.to(self.acc) if cw is None else cw[t.masked_fill(~self.kept, 0)] * self.kept
        local = t - o.offset
        self.owned = self.kept & (local >= 0) & (local < self.local_vocab)  # this shard holds the target
        self.local_t = torch.where(self.owned, local, torch.zeros_like(local))

    def gradient_(self, buffer: Tensor, p_scale: Tensor, g: Tensor, lse: Tensor, cap_derivative, r0: int, r1: int):
        """The chunk's logits' gradient, in place of `buffer`, which holds p / p_scale (p: the
        softmax over the whole vocabulary); g: the rows' incoming gradient (0 for ignored rows)."""
        o, e = self.o, self.o.label_smoothing
        rw = self.rw[r0:r1]
        coef_p = g * (rw * (1 - e + 2 * o.z_loss * lse) + (e / o.vocab) * self.weight_sum)
        d = buffer.mul_((coef_p * p_scale)[:, None])
        if e > 0:  # in place, no chunk-sized temporary
            smooth = g * (e / o.vocab)
            if self.local_w is not None:
                d.addr_(smooth, self.local_w, alpha=-1)
            else:
                d.sub_(smooth[:, None])
        target_coef = torch.where(self.owned[r0:r1], g * rw * (1 - e), torch.zeros_like(g))
        d.scatter_add_(1, self.local_t[r0:r1, None], -target_coef[:, None])
        if cap_derivative is not None:
            d.mul_(cap_derivative)
        return d

    def accumulate(self, d: Tensor, x: Tensor, w: Tensor, grads, r0: int, r1: int) -> None:
        """This chunk's share of the gradients (x's rows; w's and b's sums, in place)."""
        grad_x, grad_w, grad_b = grads
        if grad_x is not None:
            grad_x[r0:r1] = (d.to(x.dtype) @ w).to(self.acc)
        if grad_w is not None:  # accumulated in place: no weight-sized temporary
            grad_w.addmm_(d.t(), x[r0:r1].to(self.acc))
        if grad_b is not None:
            grad_b.add_(d.sum(0))

    def new_grads(self, x: Tensor, w: Tensor, b: Optional[Tensor], needs):
        z = lambda shape: torch.zeros(shape, dtype=self.acc, device=x.device)  # noqa: E731
        return (z(x.shape) if needs[0] else None, z(w.shape) if needs[1] else None,
                z((self.local_vocab,)) if needs[2] and b is not None else None)

    def finish_grads(self, grads, dtype: torch.dtype):
        """x's gradient all-reduced across the ranks (once; the same grads on every rank), all in
        the input's dtype."""
        if grads[0] is not None:
            dist.all_reduce(grads[0], op=dist.ReduceOp.SUM, group=self.o.group)
        return tuple(None if g is None else g.to(dtype) for g in grads)


def _forward(x, w, b, t, class_weight, o: _Options, want_accuracy: bool, unit_scale=None, needs=(False,) * 3):
    """Per row: loss (unreduced), logsumexp, and (want_accuracy) whether the global argmax is the
    target; with unit_scale (the incoming gradient of every row's loss, 0 for ignored rows),
    also the gradients (those in needs) formed chunk by chunk while each chunk's logits exist.
    x (N, H), t (N,)."""
    rows = x.shape[0]
    sh = _Shard(x, w, t, class_weight, o)
    acc, e, kept = sh.acc, o.label_smoothing, sh.kept
    row_loss = torch.zeros(rows, dtype=acc, device=x.device)
    lse = torch.zeros(rows, dtype=acc, device=x.device)
    hit = torch.zeros(rows, dtype=torch.bool, device=x.device) if want_accuracy else None
    grads = sh.new_grads(x, w, b, needs) if unit_scale is not None else None
    for r0 in range(0, rows, o.chunk_size):
        r1 = min(rows, r0 + o.chunk_size)
        logits, cap_derivative = _chunk_logits(x[r0:r1], w, b, o)
        tc, owned = t[r0:r1], sh.owned[r0:r1]
        local_max, local_arg = logits.max(1) if sh.local_vocab > 0 else (
            torch.full((r1 - r0,), float("-inf"), dtype=acc, device=x.device),
            torch.zeros(r1 - r0, dtype=torch.int64, device=x.device))
        row_max = local_max.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=o.group)
        safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        # In place on the chunk's logits (its one chunk-sized buffer), the exponentials last.
        sums = torch.zeros(3, r1 - r0, dtype=acc, device=x.device)
        sums[1] = torch.where(owned, logits.gather(1, sh.local_t[r0:r1, None]).squeeze(1), torch.zeros_like(local_max))
        if e > 0:
            sums[2] = torch.mv(logits, sh.local_w) if sh.local_w is not None else logits.sum(1)
        exps = logits.sub_(safe_max[:, None]).exp_()
        sums[0] = exps.sum(1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=o.group)
        chunk_lse = safe_max + sums[0].log()
        chunk_lse = torch.where(torch.isfinite(row_max), chunk_lse, row_max)  # +inf / NaN rows stay so
        kc, rw = kept[r0:r1], sh.rw[r0:r1]
        loss = ((1 - e) * (chunk_lse - sums[1]) + o.z_loss * chunk_lse.square()) * rw
        if e > 0:
            loss = loss + kc.to(acc) * (e / o.vocab) * (sh.weight_sum * chunk_lse - sums[2])
        row_loss[r0:r1] = torch.where(kc, loss, torch.zeros_like(loss))
        lse[r0:r1] = chunk_lse
        if want_accuracy:
            # The global argmax's first index: the lowest global index among the ranks whose max
            # is the row's max.
            first = torch.where(local_max == row_max, local_arg + o.offset, torch.full_like(local_arg, o.vocab))
            dist.all_reduce(first, op=dist.ReduceOp.MIN, group=o.group)
            hit[r0:r1] = kc & (first == tc)
        if grads is not None:  # exps / sum of exps is the softmax
            d = sh.gradient_(exps, sums[0].reciprocal(), unit_scale[r0:r1], chunk_lse, cap_derivative, r0, r1)
            sh.accumulate(d, x, w, grads, r0, r1)
            del d
        del logits, exps, cap_derivative  # before the next chunk's are made: one chunk-sized buffer at a time
    if grads is not None:
        grads = sh.finish_grads(grads, x.dtype)
    return row_loss, lse, hit, grads


def _backward(grad_rows, x, w, b, t, class_weight, lse, o: _Options, needs):
    """Gradients of (x, w, b) for the incoming gradient per row (0 taken for ignored rows), each
    chunk's logits recomputed from the saved logsumexp (no collective but x's gradient's)."""
    sh = _Shard(x, w, t, class_weight, o)
    grads = sh.new_grads(x, w, b, needs)
    g_all = torch.where(sh.kept, grad_rows, torch.zeros_like(grad_rows))
    for r0 in range(0, x.shape[0], o.chunk_size):
        r1 = min(x.shape[0], r0 + o.chunk_size)
        logits, cap_derivative = _chunk_logits(x[r0:r1], w, b, o)
        chunk_lse = lse[r0:r1]
        probs = logits.sub_(chunk_lse[:, None]).exp_()
        d = sh.gradient_(probs, torch.ones_like(chunk_lse), g_all[r0:r1], chunk_lse, cap_derivative, r0, r1)
        sh.accumulate(d, x, w, grads, r0, r1)
        del logits, probs, d, cap_derivative  # one chunk-sized buffer at a time
    return sh.finish_grads(grads, x.dtype)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """apply(x, w, b, t, class_weight, o, want_accuracy) -> (loss, lse, hit). Reductions mean and
    sum with a gradient to form: the forward forms it chunk by chunk (the logits computed once per
    step) and backward hands it over, scaled by grad_output (torch_ext._common.hand_over_unit_grads);
    reduction none: recomputed from the saved logsumexp."""

    @staticmethod
    def forward(ctx, x, w, b, t, class_weight, o, want_accuracy):
        needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        kept = t != o.ignore_index
        denominator = None
        if o.reduction == "mean":
            rw = kept.to(accumulation_dtype(x.dtype)) if class_weight is None else (
                class_weight.to(accumulation_dtype(x.dtype))[t.masked_fill(~kept, 0)] * kept)
            denominator = rw.sum()
        per_row = torch.ones(x.shape[0], dtype=accumulation_dtype(x.dtype), device=x.device)
        if denominator is not None:
            per_row = per_row / denominator  # d(loss)/d(row loss)
        form = o.reduction != "none" and any(needs)
        unit = torch.where(kept, per_row, torch.zeros_like(per_row)) if form else None
        row_loss, lse, hit, grads = _forward(x, w, b, t, class_weight, o, want_accuracy, unit, needs)
        if o.reduction == "none":
            loss = row_loss
        else:
            loss = row_loss.sum() if denominator is None else row_loss.sum() / denominator
        ctx.o, ctx.per_row = o, per_row
        # The gradients formed here are saved tensors too, so saved-tensor hooks (save_on_cpu) see them.
        ctx.save_for_backward(x, w, b, t, class_weight, lse, *(grads or ()))
        ctx.mark_non_differentiable(*(v for v in (lse, hit) if v is not None))  # one call: each replaces the last
        return loss.to(ctx.o.loss_dtype), lse, hit

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_hit):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{_OP}: torch_ext does not support double backward (a gradient of its gradient); "
                               "use torch.nn.functional for higher-order gradients")
        x, w, b, t, class_weight, lse, *formed = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if grad_loss is None or not any(needs[:3]):
            return (None,) * 7
        if formed:  # formed in forward for grad_output = 1
            return tuple(hand_over_unit_grads(formed, needs[:3], grad_loss)) + (None,) * 4
        grad_rows = grad_loss.to(lse.dtype)
        grad_rows = grad_rows if ctx.o.reduction == "none" else grad_rows.reshape(()) * ctx.per_row
        gx, gw, gb = _backward(grad_rows, x, w, b, t, class_weight, lse, ctx.o, needs)
        return gx, gw, gb, None, None, None, None


@torch.compiler.disable
def vocab_parallel_linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias, weight,
                                        reduction: str, ignore_index: int, label_smoothing: float, z_loss: float,
                                        chunk_size: Optional[int], softcap: float, process_group,
                                        return_lse: bool, return_accuracy: bool, loss_dtype: torch.dtype):
    """linear_cross_entropy over this rank's vocabulary slice (see the module docstring).
    Arguments as linear_cross_entropy's, already checked; softcap as a float (0: off); the loss
    returned in loss_dtype (input's, or float32 under autocast: computed in float32, not rounded)."""
    from .linear_cross_entropy import default_chunk_size

    if transforms_active():
        raise RuntimeError(f"{_OP}: with process_group, torch.func transforms (grad, vmap, ...) and forward-mode AD "
                           "are not supported: the path checks targets on the host and runs collectives; use "
                           "torch.autograd")
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
                 max(1, int(chunk_size)), process_group, offset, vocab, loss_dtype)
    loss, lse, hit = _VocabParallelLinearCrossEntropy.apply(
        x, linear_weight, linear_bias, t, weight, o, return_accuracy
    )
    kept = t != ignore_index
    if reduction == "none":
        loss = loss.reshape(lead)
    if not (return_lse or return_accuracy):
        return loss
    out = [loss]
    if return_lse:
        out.append(lse.reshape(lead))
    if return_accuracy:
        out.append((hit.sum() / kept.sum()).to(lse.dtype))
    return tuple(out)
