"""Tests of the logit soft-capping and the extra outputs of the fused cross-entropy losses (every device):
``softcap``, ``return_lse`` and ``return_accuracy`` of ``torch_ext.cross_entropy`` /
``CrossEntropyLoss`` and ``torch_ext.linear_cross_entropy`` / ``LinearCrossEntropyLoss``, and the
new trailing arguments of the raw ops (``softcap``, ``ignored_row_stats``, ``grad_lse``, the stats
output of ``linear_cross_entropy_fwd``).

The reference is always PyTorch itself:

* loss: ``F.cross_entropy(softcap * torch.tanh(x / softcap), target, ...)`` plus the z_loss term
  (``reference`` of tests/test_cross_entropy.py, applied to the capped logits), with eager
  autograd through the tanh; for linear_cross_entropy the same on ``F.linear(input, W, b)``;
  ``num_items_in_batch``: the reduction-sum reference divided by it;
* lse: ``torch.logsumexp(capped, class_dim)`` for every position (ignored ones included), and its
  gradient by eager autograd (cross_entropy: ``(loss * g).sum() + 0.3 * (lse**2).sum()``
  backpropagated through both); linear_cross_entropy's lse is a detached output;
* accuracy: ``((capped.argmax(class_dim) == target) & (target != ignore_index)).sum() /
  (target != ignore_index).sum()`` (NaN when every position is ignored); ties as torch.argmax
  (the first index of the max). The reference's capped values are computed so that equal logits
  give bit-equal capped values (see ``position_independent_cap``).

Covered: input (C), (N, C), (N, C, d1), (N, C, d1, d2); C from 1 to 2500 (the CPU kernel's
1024-class blocks crossed); empty batches; non-contiguous, transposed, sliced and expanded
operands; float32 / float64 / bfloat16; class (int64, uint8) and probability targets (requiring
grad or not); class weights; ignore_index (some rows, all rows, a valid class); label smoothing;
z_loss; reductions mean / sum / none; num_items_in_batch; saturation (|logits| 1e4, +-inf) and NaN
logits; both eager paths (gradients formed in the forward op or not: the ``grad_in_forward``
fixture) and the no-grad paths; torch.compile (aot_eager, inductor); torch.autocast; gradcheck
(float64); torch.library.opcheck of every op with the new arguments; the raw ops' stats and
gradients; linear_cross_entropy's chunking (chunk_size 1, 3, larger than the rows, None);
argument errors; the modules against the functionals.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_ext
from torch_ext import CrossEntropyLoss, LinearCrossEntropyLoss, cross_entropy, linear_cross_entropy
from test_cross_entropy import (
    class_dim,
    class_target,
    dtype_id,
    make_input,
    make_weight,
    prob_target,
    reference_leaves,
    target_shape,
)
from test_cross_entropy import reference as ce_reference
from test_linear_cross_entropy import class_target as lce_class_target
from utils import assert_close, default_device_type, leaf, reference_dtype, tolerance

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
BAD_SOFTCAPS = [0, 0.0, -1.0, -30.0, float("nan"), float("inf"), float("-inf")]
LSE_COEF = 0.3
# linear_cross_entropy in bfloat16 rounds each chunk's logits to bfloat16 (as F.linear's bf16 GEMM
# does) before the loss: the tolerance of tests/test_linear_cross_entropy.py.
LCE_BF16_TOL = dict(rtol=3e-2, atol=2e-2)

CE_FWD = torch.ops.torch_ext.cross_entropy_fwd.default
CE_BWD = torch.ops.torch_ext.cross_entropy_bwd.default
CE_BWD_INPLACE = torch.ops.torch_ext.cross_entropy_bwd_inplace.default
CE_NO_GRADS = [False, False]  # cross_entropy_fwd's grad_mask: no gradient formed
LCE_FWD = torch.ops.torch_ext.linear_cross_entropy_fwd.default
LCE_BWD = torch.ops.torch_ext.linear_cross_entropy_bwd.default
NO_GRADS = [False, False, False]
ALL_GRADS = [True, True, True]


# ----------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of lse / accuracy / stats for input of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cap(x, softcap):
    """softcap * tanh(x / softcap) (differentiable); softcap None: x."""
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def position_independent_cap(x, softcap):
    """cap(x) with equal values of x mapped to bit-equal capped values wherever they sit (an
    elementwise kernel's vector body and scalar tail may round tanh differently, which would turn
    a tie of the logits into a non-tie of the reference's capped logits)."""
    if softcap is None or x.numel() == 0:
        return x
    u, inv = torch.unique(x, return_inverse=True)
    return cap(u, softcap)[inv]


def ref_accuracy(logits, target, ignore_index, softcap, dim):
    """PyTorch's accuracy of the capped logits (computed in lse/accuracy dtype); NaN with no
    position left."""
    ad = acc_dtype(logits.dtype)
    capped = position_independent_cap(logits.detach().to(ad), softcap)
    t = target.long()
    pred = capped.argmax(dim)
    valid = t != ignore_index
    correct = (pred == t) & valid
    return correct.sum().to(ad) / valid.sum().to(ad)


def check_accuracy(acc, logits, target, ignore_index, softcap, dim, ambiguity=0.0, msg=""):
    """acc (0-D, lse dtype, no grad) equals PyTorch's accuracy. ambiguity > 0 (bfloat16
    linear_cross_entropy, whose logits are rounded to bfloat16 inside): rows whose two largest
    capped reference logits are within `ambiguity` may go either way, no other row."""
    want = ref_accuracy(logits, target, ignore_index, softcap, dim)
    assert isinstance(acc, torch.Tensor), f"{msg}: accuracy is {type(acc)}"
    assert acc.shape == (), f"{msg}: accuracy shape {tuple(acc.shape)}"
    assert acc.dtype == want.dtype, f"{msg}: accuracy dtype {acc.dtype}, expected {want.dtype}"
    assert not acc.requires_grad, f"{msg}: accuracy requires grad"
    if ambiguity == 0:
        torch.testing.assert_close(acc.double(), want.double(), rtol=1e-6, atol=1e-7, equal_nan=True,
                                   msg=lambda m: f"{msg}: accuracy\n{m}")
        return
    t = target.long()
    valid = t != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        assert torch.isnan(acc), f"{msg}: accuracy {acc} over no position (expected NaN)"
        return
    capped = cap(logits.detach().to(acc_dtype(logits.dtype)), softcap)
    if capped.shape[dim] >= 2:
        top2 = capped.topk(2, dim).values
        gap = top2.select(dim, 0) - top2.select(dim, 1)
        ambiguous = int(((gap <= ambiguity) & valid).sum())
    else:
        ambiguous = 0
    diff = abs(acc.item() - want.item()) * n_valid
    assert diff <= ambiguous + 1e-3, (
        f"{msg}: accuracy {acc.item()} vs {want.item()} over {n_valid} rows: {diff:.3f} rows differ, "
        f"only {ambiguous} are near-ties")


def ce_ref(x, t, w, softcap, num_items=None, **opts):
    """The loss reference on the capped logits; num_items: the reduction-sum loss divided by it."""
    capped = cap(x, softcap)
    if num_items is not None:
        assert opts.get("reduction", "mean") == "mean"
        opts = dict(opts, reduction="sum")
        n = float(num_items.item()) if torch.is_tensor(num_items) else float(num_items)
        return ce_reference(capped, t, w, **opts) / n
    return ce_reference(capped, t, w, **opts)


def unpack(out, return_lse, return_accuracy, msg=""):
    """(loss, lse or None, accuracy or None) of a loss call; checks the return's structure."""
    if not (return_lse or return_accuracy):
        assert isinstance(out, torch.Tensor), f"{msg}: expected a plain tensor, got {type(out)}"
        return out, None, None
    assert isinstance(out, tuple), f"{msg}: expected a tuple, got {type(out)}"
    assert len(out) == 1 + int(return_lse) + int(return_accuracy), f"{msg}: {len(out)} outputs"
    loss = out[0]
    lse = out[1] if return_lse else None
    acc = out[-1] if return_accuracy else None
    return loss, lse, acc


def run_ce(input, target, weight=None, *, softcap, return_lse=True, return_accuracy=True, input_grad=True,
           target_grad=False, num_items=None, check_nograd=True, msg="", **opts):
    """torch_ext.cross_entropy with softcap / return_lse / return_accuracy against PyTorch: the
    loss, lse and accuracy values, dtypes and shapes; the gradients of
    (loss * g).sum() + 0.3 * (lse**2).sum() (g random) for the input (and a probability target when
    target_grad); then the same call under torch.no_grad() and with detached operands. bfloat16
    is compared with the float32 computation from the same bfloat16 values. Returns
    (loss, lse, accuracy, grads)."""
    dtype = input.dtype
    rd, ad = reference_dtype(dtype), acc_dtype(dtype)
    cd = class_dim(input)
    ii = opts.get("ignore_index", -100)
    kw = dict(softcap=softcap, return_lse=return_lse, return_accuracy=return_accuracy, num_items_in_batch=num_items,
              **opts)
    tag = f"{msg} {dtype_id(dtype)} {tuple(input.shape)} softcap={softcap} num_items={num_items} {opts}"

    x = leaf(input) if input_grad else input.detach()
    t = leaf(target) if target_grad else target.detach()
    loss, lse, acc = unpack(cross_entropy(x, t, weight, **kw), return_lse, return_accuracy, tag)

    xr, tr, wr = reference_leaves(input, target, weight, rd, input_grad, target_grad)
    yr = ce_ref(xr, tr, wr, softcap, num_items, **opts)
    lse_r = torch.logsumexp(cap(xr, softcap), cd)
    rtol, atol = tolerance(dtype)

    assert loss.dtype == dtype, f"{tag}: loss dtype {loss.dtype}"
    assert loss.shape == yr.shape, f"{tag}: loss shape {tuple(loss.shape)} vs {tuple(yr.shape)}"
    assert_close(loss, yr.detach(), dtype=dtype, equal_nan=True, msg=f"{tag}: loss")
    if return_lse:
        assert lse.shape == target_shape(input.shape), f"{tag}: lse shape {tuple(lse.shape)}"
        assert lse.dtype == ad, f"{tag}: lse dtype {lse.dtype}"
        assert_close(lse, lse_r.detach(), dtype=ad, rtol=rtol, atol=atol, equal_nan=True, msg=f"{tag}: lse")
        if input_grad:
            assert lse.requires_grad, f"{tag}: lse does not require grad (input does)"
    if return_accuracy:
        check_accuracy(acc, input, target, ii, softcap, cd, msg=tag)

    grads = []
    if input_grad or target_grad:
        leaves = [v for v, r in ((x, input_grad), (t, target_grad)) if r]
        ref_leaves = [v for v, r in ((xr, input_grad), (tr, target_grad)) if r]
        g = torch.randn(loss.shape).to(dtype)
        obj = (loss * g).sum()
        obj_r = (yr * g.to(rd)).sum()
        if return_lse and input_grad:
            obj = obj + LSE_COEF * lse.square().sum()
            obj_r = obj_r + LSE_COEF * lse_r.square().sum()
        grads = torch.autograd.grad(obj, leaves)
        ref_grads = torch.autograd.grad(obj_r, ref_leaves)
        names = [n for n, r in (("grad_input", input_grad), ("grad_target", target_grad)) if r]
        for name, got, want, lf in zip(names, grads, ref_grads, leaves):
            assert got.shape == lf.shape, f"{tag}: {name} shape {tuple(got.shape)}"
            assert got.dtype == dtype, f"{tag}: {name} dtype {got.dtype}"
            assert_close(got, want, dtype=dtype, equal_nan=True, msg=f"{tag}: {name}")

    if check_nograd:
        for how in ("no_grad", "detached"):
            if how == "no_grad":
                with torch.no_grad():
                    out = cross_entropy(input.detach(), target.detach(), weight, **kw)
            else:
                out = cross_entropy(input.detach(), target.detach(), weight, **kw)
            loss2, lse2, acc2 = unpack(out, return_lse, return_accuracy, f"{tag} {how}")
            assert not loss2.requires_grad, f"{tag} {how}: loss requires grad"
            assert_close(loss2, yr.detach(), dtype=dtype, equal_nan=True, msg=f"{tag} {how}: loss")
            if return_lse:
                assert not lse2.requires_grad and lse2.dtype == ad and lse2.shape == lse_r.shape
                assert_close(lse2, lse_r.detach(), dtype=ad, rtol=rtol, atol=atol, equal_nan=True,
                             msg=f"{tag} {how}: lse")
            if return_accuracy:
                check_accuracy(acc2, input, target, ii, softcap, cd, msg=f"{tag} {how}")
    return loss, lse, acc, grads


# linear_cross_entropy


def lce_args(lead, hidden, vocab, dtype=torch.float32, bias=True, logit_scale=2.0):
    """input (*lead, H), linear_weight (V, H) scaled so that the logits are O(logit_scale), bias (V,)."""
    x = torch.randn(*lead, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) * logit_scale / math.sqrt(max(hidden, 1))).to(dtype)
    b = (0.5 * torch.randn(vocab)).to(dtype) if bias else None
    return x, w, b


def lce_prob_target(lead, vocab, dtype=torch.float32):
    return torch.softmax(torch.randn(*lead, vocab), -1).to(dtype)


def lce_logits(x, w, b):
    return F.linear(x, w, b)


def lce_ref(x, w, b, t, cw, softcap, num_items=None, reduction="mean", **opts):
    """The loss reference of linear_cross_entropy: ce_ref on the rows of F.linear(x, w, b);
    reduction none gives input's leading shape."""
    vocab = w.shape[0]
    lead = x.shape[:-1]
    logits = lce_logits(x, w, b).reshape(-1, vocab)
    tt = t.reshape(-1, vocab) if t.is_floating_point() else t.reshape(-1)
    loss = ce_ref(logits, tt, cw, softcap, num_items, reduction=reduction, **opts)
    return loss.reshape(lead) if reduction == "none" else loss


def run_lce(x, w, t, b=None, cw=None, *, softcap, return_lse=True, return_accuracy=True,
            requires=("input", "linear_weight", "linear_bias"), target_grad=False, num_items=None,
            check_nograd=True, msg="", **opts):
    """torch_ext.linear_cross_entropy with softcap / return_lse / return_accuracy against PyTorch:
    loss, lse (shape input.shape[:-1], detached), accuracy, and the gradients of (loss * g).sum()
    for the operands named in `requires` (and a probability target when target_grad); then the
    same under torch.no_grad()."""
    dtype = x.dtype
    rd, ad = reference_dtype(dtype), acc_dtype(dtype)
    prob = t.is_floating_point()
    ii = opts.get("ignore_index", -100)
    tol = LCE_BF16_TOL if dtype == torch.bfloat16 else {}
    kw = dict(softcap=softcap, return_lse=return_lse, return_accuracy=return_accuracy, num_items_in_batch=num_items,
              **opts)
    ref_opts = {k: v for k, v in opts.items() if k != "chunk_size"}
    tag = (f"{msg} {dtype_id(dtype)} {tuple(x.shape)} V={w.shape[0]} bias={b is not None} softcap={softcap} "
           f"num_items={num_items} {opts}")
    names = ("input", "linear_weight", "linear_bias")
    values = dict(zip(names, (x, w, b)))
    ours = {n: None if v is None else (leaf(v) if n in requires else v.detach()) for n, v in values.items()}
    refs = {n: None if v is None else (leaf(v, rd) if n in requires else v.detach().to(rd)) for n, v in values.items()}
    tl = leaf(t) if target_grad else t
    if prob:
        tr = leaf(t, rd) if target_grad else t.to(rd)
    else:
        tr = t
    cwr = None if cw is None else cw.to(rd)
    out = linear_cross_entropy(ours["input"], ours["linear_weight"], tl, linear_bias=ours["linear_bias"], weight=cw,
                               **kw)
    loss, lse, acc = unpack(out, return_lse, return_accuracy, tag)
    yr = lce_ref(refs["input"], refs["linear_weight"], refs["linear_bias"], tr, cwr, softcap, num_items, **ref_opts)
    logits_r = lce_logits(refs["input"], refs["linear_weight"], refs["linear_bias"]).detach()
    lse_r = torch.logsumexp(cap(logits_r, softcap), -1)

    assert loss.dtype == dtype, f"{tag}: loss dtype {loss.dtype}"
    assert loss.shape == yr.shape, f"{tag}: loss shape {tuple(loss.shape)} vs {tuple(yr.shape)}"
    assert_close(loss, yr.detach(), dtype=dtype, equal_nan=True, msg=f"{tag}: loss", **tol)
    if return_lse:
        assert lse.shape == x.shape[:-1], f"{tag}: lse shape {tuple(lse.shape)}"
        assert lse.dtype == ad, f"{tag}: lse dtype {lse.dtype}"
        assert not lse.requires_grad, f"{tag}: linear_cross_entropy's lse must be detached"
        rtol, atol = (tol["rtol"], tol["atol"]) if tol else tolerance(dtype)
        assert_close(lse, lse_r, dtype=ad, rtol=rtol, atol=atol, equal_nan=True, msg=f"{tag}: lse")
    # The logits of our GEMM differ from F.linear's by rounding: rows whose two largest capped
    # logits are closer than that may go either way in the accuracy (float64: none).
    finite = logits_r[torch.isfinite(logits_r)].abs()
    largest = max(1.0, float(finite.max())) if finite.numel() else 1.0
    ambiguity = 0.0
    if dtype == torch.bfloat16:  # the logits rounded to bfloat16 (2**-8 relative) before capping
        ambiguity = 2.0 ** -6 * min(largest, softcap if softcap is not None else largest)
    elif dtype == torch.float32:
        ambiguity = 1e-5 * largest
    if return_accuracy:
        check_accuracy(acc, logits_r, t, ii, softcap, -1, ambiguity=ambiguity, msg=tag)

    grad_names = [n for n in names if n in requires and values[n] is not None]
    leaves = [ours[n] for n in grad_names] + ([tl] if target_grad else [])
    ref_leaves = [refs[n] for n in grad_names] + ([tr] if target_grad else [])
    grads = {}
    if not leaves:
        assert not loss.requires_grad, f"{tag}: the loss requires grad, no operand does"
    else:
        assert loss.requires_grad, f"{tag}: the loss does not require grad"
        g = torch.randn(loss.shape).to(dtype)
        got = torch.autograd.grad((loss * g).sum(), leaves)
        want = torch.autograd.grad((yr * g.to(rd)).sum(), ref_leaves)
        for name, a, e, lf in zip(grad_names + (["target"] if target_grad else []), got, want, leaves):
            assert a.shape == lf.shape, f"{tag}: grad of {name} shape {tuple(a.shape)}"
            assert a.dtype == lf.dtype, f"{tag}: grad of {name} dtype {a.dtype}"
            assert_close(a, e, dtype=dtype, equal_nan=True, msg=f"{tag}: grad of {name}", **tol)
            grads[name] = a
    if check_nograd:
        with torch.no_grad():
            out2 = linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, **kw)
        loss2, lse2, acc2 = unpack(out2, return_lse, return_accuracy, f"{tag} no_grad")
        assert not loss2.requires_grad
        assert_close(loss2, yr.detach(), dtype=dtype, equal_nan=True, msg=f"{tag} no_grad: loss", **tol)
        if return_lse:
            rtol, atol = (tol["rtol"], tol["atol"]) if tol else tolerance(dtype)
            assert lse2.dtype == ad and lse2.shape == x.shape[:-1]
            assert_close(lse2, lse_r, dtype=ad, rtol=rtol, atol=atol, equal_nan=True, msg=f"{tag} no_grad: lse")
        if return_accuracy:
            check_accuracy(acc2, logits_r, t, ii, softcap, -1, ambiguity=ambiguity, msg=f"{tag} no_grad")
    return loss, lse, acc, grads


# ----------------------------------------------------------------------------------------------
# 1. cross_entropy: every option with softcap / lse / accuracy vs PyTorch
# ----------------------------------------------------------------------------------------------

MATRIX_SHAPES = [(5,), (4, 5), (3, 6, 2), (2, 3, 2, 3), (6, 7), (2, 9, 3)]
# (weighted, ignored rows, ignore_index, label_smoothing, z_loss, softcap, uint8 target, num_items)
CLASS_OPTION_SETS = [
    (False, "none", -100, 0.0, 0.0, 1.0, False, None),
    (True, "some", -100, 0.1, 1e-3, 30.0, False, 7),
    (True, "some", 2, 1.0, 0.5, 2.0, False, None),
    (False, "some", -100, 0.0, 0.5, 0.5, False, "tensor"),
    (True, "none", 2, 0.1, 0.0, 5.0, True, None),
    (False, "all", -100, 0.1, 1e-3, 3.0, False, None),
    (True, "some", 2, 0.0, 0.0, None, True, None),
    (False, "some", -100, 0.0, 0.0, 0.01, False, None),
]
# (weighted, label_smoothing, z_loss, softcap, target kind, target requires grad, num_items)
PROB_OPTION_SETS = [
    (False, 0.0, 0.0, 1.0, "softmax", True, None),
    (True, 0.1, 1e-3, 30.0, "nonneg", False, 5),
    (True, 1.0, 0.5, 2.0, "softmax", False, None),
    (False, 0.1, 0.5, 0.5, "nonneg", True, "tensor"),
    (True, 0.0, 0.0, None, "softmax", True, None),
]
FLAG_SETS = [(True, True), (True, False), (False, True), (False, False)]


def _items(num_items, reduction):
    """num_items_in_batch of an option set (reduction mean only): an int, or "tensor" (a 0-D tensor)."""
    if num_items is None or reduction != "mean":
        return None
    return torch.tensor(9) if num_items == "tensor" else num_items  # (an int64 count, as the HF Trainer passes)


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_pytorch(dtype, reduction, kind, grad_in_forward):
    offset = DTYPES.index(dtype) + 2 * REDUCTIONS.index(reduction)
    sets = CLASS_OPTION_SETS if kind == "class" else PROB_OPTION_SETS
    for i, opts_set in enumerate(sets):
        shape = MATRIX_SHAPES[(i + offset) % len(MATRIX_SHAPES)]
        c = shape[class_dim(torch.empty(shape))]
        lse_flag, acc_flag = FLAG_SETS[(i + offset) % len(FLAG_SETS)]
        x = make_input(shape, dtype, scale=3.0)
        if kind == "class":
            weighted, ignored, ii, ls, z, softcap, uint8, items = opts_set
            if uint8 and ii < 0:
                ii = 2
            target = class_target(shape, c, ignored, ii, torch.uint8 if uint8 else torch.int64)
            target_grad = False
        else:
            weighted, ls, z, softcap, tkind, target_grad, items = opts_set
            ii = -100
            target = prob_target(shape, tkind, dtype)
            acc_flag = False  # only for class-index targets
        w = make_weight(c, dtype) if weighted else None
        run_ce(x, target, w, softcap=softcap, return_lse=lse_flag, return_accuracy=acc_flag, target_grad=target_grad,
               num_items=_items(items, reduction), ignore_index=ii, reduction=reduction, label_smoothing=ls,
               z_loss=z, msg=f"{kind} set {i}")


CLASS_COUNTS = [1, 2, 7, 33, 1000, 1025, 2500]


@pytest.mark.parametrize("c", CLASS_COUNTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_class_counts(dtype, c):
    # Vector tails of every kind, and C > 1024 / 2048 (the CPU kernel's class blocks): the capped
    # max, logsumexp and argmax carried across blocks.
    x = make_input((3, c), dtype, scale=4.0)
    w = make_weight(c, dtype)
    run_ce(x, class_target(x.shape, c), softcap=2.0, msg=f"C={c}")
    run_ce(x, class_target(x.shape, c, "some", -100), w, softcap=30.0, reduction="none", label_smoothing=0.1,
           z_loss=1e-3, msg=f"C={c} options")
    run_ce(x, prob_target(x.shape, "softmax", dtype), w, softcap=1.5, return_accuracy=False, target_grad=True,
           reduction="sum", label_smoothing=0.1, z_loss=1e-3, msg=f"C={c} probabilities")
    # (N, C, d) layout: the class dim strided in memory
    x3 = make_input((2, c, 3), dtype, scale=4.0)
    run_ce(x3, class_target(x3.shape, c, "some", -100), softcap=5.0, reduction="mean", z_loss=1e-3,
           msg=f"C={c} 3d")


def test_argmax_across_blocks_and_tails():
    # The maximum placed in the last classes of C = 2500 (a later block and the vector tail), and
    # in the first class: accuracy 1 for rows whose target is that class, 0 otherwise.
    c = 2500
    x = torch.randn(6, c)
    for row, pos in enumerate((0, 1023, 1024, 2047, 2048, 2499)):
        x[row, pos] = 10.0
    t = torch.tensor([0, 1023, 5, 2047, 7, 2499])
    for softcap in (None, 3.0):
        _, _, acc, _ = run_ce(x, t, softcap=softcap, msg=f"placed maxima softcap={softcap}")
        assert acc.item() == pytest.approx(4 / 6)


EMPTY_SHAPES = [(0, 5), (0, 5, 3), (2, 5, 0), (0, 1100)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_empty(dtype, reduction, shape, grad_in_forward):
    # No rows: lse empty of the loss shape, accuracy NaN (0/0), mean NaN, sum 0, as PyTorch.
    c = shape[1]
    x = make_input(shape, dtype)
    loss, lse, acc, grads = run_ce(x, class_target(shape, c), softcap=2.0, reduction=reduction, z_loss=0.5,
                                   msg="empty")
    assert lse.shape == target_shape(shape) and lse.numel() == 0
    assert torch.isnan(acc).item()
    assert all(g.numel() == 0 for g in grads)
    run_ce(x, prob_target(shape, "softmax", dtype), softcap=2.0, return_accuracy=False, target_grad=True,
           reduction=reduction, label_smoothing=0.1, msg="empty probabilities")


@pytest.mark.parametrize("z_loss", [0.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_all_ignored(dtype, z_loss, grad_in_forward):
    # Every row ignored: lse still has every row's value and gradient (the loss none), accuracy NaN.
    x = make_input((4, 6, 2), dtype, scale=3.0)
    w = make_weight(6, dtype)
    for ii, weight in ((-100, None), (2, w)):
        t = class_target(x.shape, 6, "all", ii)
        for reduction in REDUCTIONS:
            loss, lse, acc, (gx,) = run_ce(x, t, weight, softcap=2.0, ignore_index=ii, reduction=reduction,
                                           label_smoothing=0.1, z_loss=z_loss, msg="all ignored")
            assert torch.isnan(acc).item()
            if reduction == "mean":
                assert torch.isnan(loss).item()
            else:
                assert (loss == 0).all()
            assert torch.isfinite(lse).all() and (gx != 0).any()  # the lse term's gradient


# ----------------------------------------------------------------------------------------------
# 2. Layouts: non-contiguous, transposed, sliced, expanded
# ----------------------------------------------------------------------------------------------


def _layout_cases(dtype=torch.float32):
    """{case: (input, target)}, the input's layout made in `dtype` (a cast would copy it)."""

    def r(*shape):
        return (torch.randn(*shape) * 3).to(dtype)

    base = r(9, 12)
    t9 = class_target((9, 12), 12, "some", -100)
    return {
        "transposed": (r(12, 9).t(), t9),
        "sliced_rows": (base[::2], class_target((5, 12), 12, "some", -100)),
        "sliced_classes": (base[:, 1:12:2], class_target((9, 6), 6, "some", -100)),
        "expanded_stride0": (r(1, 12).expand(9, 12), t9),
        "expanded_3d": (r(2, 7, 1).expand(2, 7, 4), class_target((2, 7, 4), 7, "some", -100)),
        "permuted_4d": (r(2, 3, 4, 7).permute(0, 3, 1, 2), class_target((2, 7, 3, 4), 7, "some", -100)),
        "channels_last": (r(2, 7, 3, 4).contiguous(memory_format=torch.channels_last),
                          class_target((2, 7, 3, 4), 7, "some", -100)),
        "noncontiguous_target": (r(5, 12), torch.randint(0, 12, (5, 2))[:, 0]),
        "1d_strided": (r(14)[::2], torch.tensor(3)),
    }


@pytest.mark.parametrize("case", list(_layout_cases().keys()))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_noncontiguous(dtype, case, grad_in_forward):
    x, t = _layout_cases(dtype)[case]
    c = x.shape[class_dim(x)]
    w = make_weight(c, dtype)
    for reduction in REDUCTIONS:
        run_ce(x, t, w, softcap=2.5, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, msg=case)
    # probability targets, themselves non-contiguous
    p = prob_target(tuple(reversed(x.shape)), "softmax", dtype).permute(*reversed(range(x.dim())))
    run_ce(x, p, None, softcap=2.5, return_accuracy=False, target_grad=True, reduction="none", msg=f"{case} prob")


# ----------------------------------------------------------------------------------------------
# 3. Saturation, infinities, NaN
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_saturation(dtype, reduction, grad_in_forward):
    # |logits| 1e4 and +-inf with softcap=30: the capped logits are finite (+-30), as are the loss,
    # lse and gradients (0 through a saturated tanh): equal to F.cross_entropy on the capped logits.
    inf = float("inf")
    x = torch.randn(6, 9)
    x[0, 0], x[0, 3] = 1e4, -1e4
    x[1, 2] = inf
    x[2, 4] = -inf
    x[3, :] = 1e4
    x[4, 1], x[4, 5], x[4, 7] = inf, -inf, 5e3
    x[5, :4] = -inf
    x = x.to(dtype)
    t = torch.tensor([0, 2, 4, 8, 5, 1])
    for target, ls, z in ((t, 0.0, 0.0), (t, 0.1, 1e-3)):
        loss, lse, acc, (gx,) = run_ce(x, target, softcap=30.0, reduction=reduction, label_smoothing=ls, z_loss=z,
                                       msg="saturation")
        assert torch.isfinite(loss).all() and torch.isfinite(lse).all() and torch.isfinite(gx).all()
        assert (lse.float() <= 30.0 + math.log(9) + 1e-3).all()
    p = prob_target(x.shape, "softmax", dtype)
    loss, lse, _, (gx, gt) = run_ce(x, p, softcap=30.0, return_accuracy=False, target_grad=True, reduction=reduction,
                                    label_smoothing=0.1, msg="saturation prob")
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gt).all()


def test_saturation_large_softcap_and_tiny_softcap():
    # softcap 1e4 (barely capping logits of O(1)) and 1e-3 (all logits capped to about +-1e-3).
    x = make_input((5, 11), scale=3.0)
    t = class_target(x.shape, 11, "some", -100)
    for softcap in (1e4, 1e-3):
        run_ce(x, t, softcap=softcap, reduction="none", z_loss=0.5, msg=f"softcap={softcap}")
        run_ce(x.double(), t, softcap=softcap, reduction="mean", label_smoothing=0.1, msg=f"softcap={softcap} f64")


@pytest.mark.parametrize("layout", ("classes", "positions"))
@pytest.mark.parametrize("mixed", (False, True), ids=("one_branch_per_vector", "branches_mixed"))
def test_cap_values_to_float32_rounding(layout, mixed, grad_in_forward):
    # The float32 cap takes a polynomial where |x / softcap| < 1/4 and an exponential elsewhere,
    # choosing per vector. Logits swept densely across [-12, 12] softcaps (the boundary 1/4 on both
    # sides, and saturation), sorted (whole vectors on one branch) or shuffled (vectors mixing
    # both), against float64 tanh. "classes": rows of 16 classes, the lse against float64
    # logsumexp; "positions": one class at many positions ((1, 1, M), a vector spans adjacent
    # positions), where lse is the capped logit itself and d lse / dx the cap's derivative.
    softcap = 30.0
    u = torch.cat([torch.linspace(-12, 12, 4000, dtype=torch.float64),
                   0.25 + torch.linspace(-1e-5, 1e-5, 40, dtype=torch.float64),
                   -0.25 + torch.linspace(-1e-5, 1e-5, 40, dtype=torch.float64)])
    if mixed:
        u = u[torch.randperm(len(u), generator=torch.Generator().manual_seed(0), device="cpu").to(u.device)]
    shape = (-1, 16) if layout == "classes" else (1, 1, -1)
    x = (u * softcap).float().reshape(shape).requires_grad_()
    t = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long)
    x64 = x.detach().double().requires_grad_()
    ref_lse = torch.logsumexp(softcap * torch.tanh(x64 / softcap), 1)
    (ref_grad,) = torch.autograd.grad(ref_lse.sum(), x64)
    loss, lse, _ = cross_entropy(x, t, softcap=softcap, return_lse=True, return_accuracy=True, reduction="sum")
    loss_ref = F.cross_entropy(softcap * torch.tanh(x64 / softcap), t, reduction="sum")
    gx, gx_loss = torch.autograd.grad(lse.sum(), x, retain_graph=True)[0], torch.autograd.grad(loss, x)[0]
    # within ~5 float32 ulps (PyTorch's own float32 tanh is within ~1.5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=6e-7, atol=1e-6)
    torch.testing.assert_close(gx.double(), ref_grad, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_loss.double(), torch.autograd.grad(loss_ref, x64)[0], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_logits(dtype):
    # A NaN logit makes its row's loss and lse NaN (the others are unchanged), as in PyTorch.
    x = make_input((4, 7), dtype)
    x[1, 3] = float("nan")
    t = torch.tensor([0, 1, 2, 3])
    for reduction in REDUCTIONS:
        xr = x.to(reference_dtype(dtype))
        yr = ce_ref(xr, t, None, 30.0, reduction=reduction)
        loss, lse = cross_entropy(leaf(x), t, softcap=30.0, reduction=reduction, return_lse=True)
        assert_close(loss, yr, dtype=dtype, equal_nan=True, msg=f"NaN logits {reduction}: loss")
        lse_r = torch.logsumexp(cap(xr, 30.0), 1)
        assert torch.isnan(lse[1]).item() and torch.isfinite(lse[[0, 2, 3]]).all()
        assert_close(lse, lse_r, dtype=acc_dtype(dtype), rtol=tolerance(dtype)[0], atol=tolerance(dtype)[1],
                     equal_nan=True, msg="NaN logits: lse")
        with torch.no_grad():
            loss2 = cross_entropy(x, t, softcap=30.0, reduction=reduction)
        assert_close(loss2, yr, dtype=dtype, equal_nan=True, msg=f"NaN logits {reduction} no_grad: loss")


# ----------------------------------------------------------------------------------------------
# 4. Accuracy: ties, independence of the reduction
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_accuracy_ties(dtype, softcap):
    # The target ties with an earlier class: argmax is the earlier one, so wrong; with a later
    # class: right (torch.argmax's first index of the max).
    x = torch.tensor([
        [1.0, 3.0, 3.0, 0.0],   # target 2 ties with class 1 (earlier): wrong
        [1.0, 3.0, 3.0, 0.0],   # target 1 ties with class 2 (later): right
        [2.0, 2.0, 2.0, 2.0],   # all equal, target 0: right
        [2.0, 2.0, 2.0, 2.0],   # all equal, target 3: wrong
        [-1.0, 0.5, -2.0, 0.5],  # target 3 ties with class 1: wrong
    ], dtype=dtype)
    t = torch.tensor([2, 1, 0, 3, 3])
    _, _, acc, _ = run_ce(x, t, softcap=softcap, msg="ties")
    assert acc.item() == pytest.approx(2 / 5)
    # the same on the raw op: col2 of stats is 1 where the argmax is the target
    _, stats, *_ = CE_FWD(x, t, None, -100, "none", 0.0, 0.0, CE_NO_GRADS, softcap or 0.0)
    assert stats[:, 2].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    # (N, C, d) layout: the same rows as positions
    x3 = x.t().unsqueeze(0).contiguous()  # (1, 4, 5)
    _, _, acc3, _ = run_ce(x3, t.unsqueeze(0), softcap=softcap, msg="ties 3d")
    assert acc3.item() == pytest.approx(2 / 5)


@pytest.mark.parametrize("c", [40, 1030, 2500])
def test_accuracy_ties_far_apart(c):
    # Ties between classes in different vectors / blocks / the tail.
    x = torch.randn(4, c)
    x[:, 5] = 10.0
    x[:, c - 3] = 10.0
    t = torch.tensor([5, c - 3, c - 3, 5])
    for softcap in (None, 4.0):
        _, _, acc, _ = run_ce(x, t, softcap=softcap, msg=f"ties C={c}")
        assert acc.item() == pytest.approx(0.5)


def test_accuracy_is_argmax_of_the_capped_logits():
    # 1e4 and 2e4 both cap to exactly 30.0 (tanh rounds to 1): a tie of the capped logits, so the
    # target 1 (the larger raw logit) is NOT the argmax with softcap=30; without softcap it is.
    x = torch.tensor([[1e4, 2e4, 0.0], [0.0, 1.0, 2.0]])
    t = torch.tensor([1, 2])
    capped = 30.0 * torch.tanh(x / 30.0)
    assert capped[0, 0] == capped[0, 1] and capped.argmax(1).tolist() == [0, 2]
    _, _, acc, _ = run_ce(x, t, softcap=30.0, msg="saturated tie")
    assert acc.item() == pytest.approx(0.5)
    _, _, acc, _ = run_ce(x, t, softcap=None, msg="no softcap")
    assert acc.item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_accuracy_independent_of_reduction_and_items(dtype, grad_in_forward):
    x = make_input((13, 9, 2), dtype, scale=3.0)
    t = class_target(x.shape, 9, "some", -100)
    want = ref_accuracy(x, t, -100, 2.0, 1)
    accs = []
    for reduction, items in (("mean", None), ("sum", None), ("none", None), ("mean", 4), ("mean", torch.tensor(3.0))):
        for xin in (leaf(x), x):
            loss, acc = cross_entropy(xin, t, softcap=2.0, reduction=reduction, num_items_in_batch=items,
                                      return_accuracy=True)
            assert acc.shape == () and not acc.requires_grad
            accs.append(acc)
    for acc in accs:
        assert acc.dtype == want.dtype
        torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# 5. lse gradients: every path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_loss_plus_lse(reduction, grad_in_forward):
    # (loss + 0.3 * (lse**2).sum()).backward(), ignored rows included.
    x = make_input((6, 8, 3), scale=3.0)
    t = class_target(x.shape, 8, "some", -100)
    w = make_weight(8)
    xl, xr = leaf(x), leaf(x)
    loss, lse = cross_entropy(xl, t, w, softcap=2.0, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                              return_lse=True)
    (loss.sum() + 0.3 * (lse ** 2).sum()).backward()
    yr = ce_ref(xr, t, w, 2.0, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    lr = torch.logsumexp(cap(xr, 2.0), 1)
    (yr.sum() + 0.3 * (lr ** 2).sum()).backward()
    assert_close(xl.grad, xr.grad, msg=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_plus_lse_under_torch_func(reduction):
    # torch.func.grad, and vmap of it over three samples, of loss + (lse**2).sum(): the lse's own
    # Function (its for_transforms variant) as the loss's.
    x = make_input((6, 8), scale=3.0)
    t = class_target(x.shape, 8, "some", -100)

    def ours(x):
        loss, lse = cross_entropy(x, t, softcap=2.0, reduction=reduction, z_loss=1e-3, return_lse=True)
        return loss.sum() + 0.3 * (lse ** 2).sum()

    def ref(x):
        return ce_ref(x, t, None, 2.0, reduction=reduction, z_loss=1e-3).sum() + 0.3 * (
            torch.logsumexp(cap(x, 2.0), 1) ** 2).sum()

    assert_close(torch.func.grad(ours)(x), torch.func.grad(ref)(x), msg="grad")
    samples = torch.stack([x, 2 * x, -x])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop because we have not yet implemented")
        got = torch.vmap(torch.func.grad(ours))(samples)
    assert_close(got, torch.vmap(torch.func.grad(ref))(samples), msg="vmap of grad")


@pytest.mark.parametrize("prob", [False, True], ids=["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_lse_only_and_loss_only_backward(reduction, prob, grad_in_forward):
    # Only lse reaches backward (the loss's gradient is None), or only the loss (lse's is None).
    x = make_input((5, 7), scale=3.0)
    t = prob_target(x.shape) if prob else class_target(x.shape, 7, "some", -100)
    for softcap in (None, 2.0):
        xl, xr = leaf(x), leaf(x)
        loss, lse = cross_entropy(xl, t, softcap=softcap, reduction=reduction, z_loss=1e-3, return_lse=True)
        lr = torch.logsumexp(cap(xr, softcap), 1)
        g = torch.randn(5)
        (gx,) = torch.autograd.grad(lse, xl, g)
        (gr,) = torch.autograd.grad(lr, xr, g)
        assert_close(gx, gr, msg=f"lse only softcap={softcap}")
        xl, xr = leaf(x), leaf(x)
        loss, lse = cross_entropy(xl, t, softcap=softcap, reduction=reduction, z_loss=1e-3, return_lse=True)
        yr = ce_ref(xr, t, None, softcap, reduction=reduction, z_loss=1e-3)
        (gx,) = torch.autograd.grad(loss.sum(), xl)
        (gr,) = torch.autograd.grad(yr.sum(), xr)
        assert_close(gx, gr, msg=f"loss only softcap={softcap}")


def test_lse_gradient_with_probability_target_requiring_grad(grad_in_forward):
    x = make_input((4, 6, 2), scale=2.0)
    p = prob_target(x.shape)
    for reduction in REDUCTIONS:
        xl, pl, xr, pr = leaf(x), leaf(p), leaf(x), leaf(p)
        loss, lse = cross_entropy(xl, pl, softcap=1.5, reduction=reduction, label_smoothing=0.1, return_lse=True)
        yr = ce_ref(xr, pr, None, 1.5, reduction=reduction, label_smoothing=0.1)
        lr = torch.logsumexp(cap(xr, 1.5), 1)
        got = torch.autograd.grad(loss.sum() + 0.3 * (lse ** 2).sum(), (xl, pl))
        want = torch.autograd.grad(yr.sum() + 0.3 * (lr ** 2).sum(), (xr, pr))
        assert_close(got[0], want[0], msg=f"{reduction}: grad_input")
        assert_close(got[1], want[1], msg=f"{reduction}: grad_target")
        # lse alone: the input's gradient; the target's is zero or None
        xl, pl = leaf(x), leaf(p)
        _, lse = cross_entropy(xl, pl, softcap=1.5, reduction=reduction, return_lse=True)
        gx, gp = torch.autograd.grad(lse.sum(), (xl, pl), allow_unused=True)
        xr = leaf(x)
        (gr,) = torch.autograd.grad(torch.logsumexp(cap(xr, 1.5), 1).sum(), xr)
        assert_close(gx, gr, msg=f"{reduction}: lse only")
        assert gp is None or (gp == 0).all()


def test_retain_graph_backward_twice_with_lse(grad_in_forward):
    x = leaf(make_input((5, 7), scale=3.0))
    t = class_target(x.shape, 7, "some", -100)
    loss, lse, acc = cross_entropy(x, t, softcap=2.0, z_loss=1e-3, return_lse=True, return_accuracy=True)
    obj = loss + 0.3 * (lse ** 2).sum()
    (g1,) = torch.autograd.grad(obj, x, retain_graph=True)
    (g2,) = torch.autograd.grad(obj, x)
    assert torch.equal(g1, g2)
    xr = leaf(x)
    objr = ce_ref(xr, t, None, 2.0, z_loss=1e-3) + 0.3 * (torch.logsumexp(cap(xr, 2.0), 1) ** 2).sum()
    assert_close(g1, torch.autograd.grad(objr, xr)[0])


def test_grad_scale_of_the_loss_with_lse(grad_in_forward):
    # The gradient formed in the forward (for grad 1) scaled by grad_output, plus lse's term.
    x = make_input((6, 9), scale=3.0)
    t = class_target(x.shape, 9, "some", -100)
    for scale in (0.0, 2.5):
        xl, xr = leaf(x), leaf(x)
        loss, lse = cross_entropy(xl, t, softcap=3.0, label_smoothing=0.1, return_lse=True)
        (loss * scale + lse.sum()).backward()
        (ce_ref(xr, t, None, 3.0, label_smoothing=0.1) * scale + torch.logsumexp(cap(xr, 3.0), 1).sum()).backward()
        assert_close(xl.grad, xr.grad, msg=f"scale {scale}")


# ----------------------------------------------------------------------------------------------
# 6. gradcheck (float64)
# ----------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    # id, shape, target kind, weighted, ignore_index, reduction, label_smoothing, z_loss, softcap
    ("class_mean", (3, 4), "class", False, -100, "mean", 0.0, 0.0, 2.0),
    ("class_options_none", (3, 4), "class_some", True, -100, "none", 0.1, 1e-3, 1.5),
    ("class_ii2_sum", (4, 5), "class_ii2", True, 2, "sum", 1.0, 0.5, 0.7),
    ("class_3d_mean", (2, 4, 3), "class_some", True, -100, "mean", 0.1, 0.5, 3.0),
    ("class_1d", (5,), "class", True, -100, "none", 0.1, 1e-3, 1.0),
    ("prob_mean", (3, 4), "prob", False, -100, "mean", 0.0, 0.0, 2.0),
    ("prob_options_none", (2, 4, 2), "prob", True, -100, "none", 0.1, 0.5, 0.8),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(case, grad_in_forward):
    _, shape, kind, weighted, ii, reduction, ls, z, softcap = case
    c = shape[class_dim(torch.empty(shape))]
    x = leaf(make_input(shape, torch.float64, scale=2.0))
    w = make_weight(c, torch.float64) if weighted else None
    opts = dict(ignore_index=ii, reduction=reduction, label_smoothing=ls, z_loss=z, softcap=softcap)
    if kind.startswith("class"):
        t = class_target(shape, c, "some" if kind != "class" else "none", ii)
        assert torch.autograd.gradcheck(lambda a: cross_entropy(a, t, w, **opts), (x,))
        assert torch.autograd.gradcheck(lambda a: cross_entropy(a, t, w, return_lse=True, **opts), (x,))
        assert torch.autograd.gradcheck(
            lambda a: cross_entropy(a, t, w, return_lse=True, return_accuracy=True, **opts)[:2], (x,))
    else:
        t = leaf(prob_target(shape, "softmax", torch.float64))
        assert torch.autograd.gradcheck(lambda a, b: cross_entropy(a, b, w, return_lse=True, **opts), (x, t))
        assert torch.autograd.gradcheck(lambda a: cross_entropy(a, t.detach(), w, return_lse=True, **opts)[1], (x,))


def test_gradcheck_all_ignored_lse():
    x = leaf(make_input((3, 4), torch.float64, scale=2.0))
    t = class_target(x.shape, 4, "all", -100)
    for reduction in ("sum", "none"):
        assert torch.autograd.gradcheck(
            lambda a: cross_entropy(a, t, softcap=1.5, reduction=reduction, return_lse=True), (x,))


def test_gradcheck_raw_ops():
    x = leaf(make_input((2, 5, 3), torch.float64, scale=2.0))
    t = class_target(x.shape, 5, "some", 1)
    w = make_weight(5, torch.float64)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda a: CE_FWD(a, t, w, 1, reduction, 0.1, 1e-3, CE_NO_GRADS, 2.0, True)[0], (x,)
        )


# ----------------------------------------------------------------------------------------------
# 7. Raw ops: stats, grad_lse, the in-place and fused-gradient forms
# ----------------------------------------------------------------------------------------------


def ref_stats(x, t, w, ii, ls, softcap):
    """(rows, 3) reference stats of every row (ignored ones included; col2 0 there)."""
    ad = acc_dtype(x.dtype)
    cd = class_dim(x)
    xa = x.detach().to(ad)
    capped = torch.movedim(cap(xa, softcap), cd, -1).reshape(-1, x.shape[cd])
    mx = capped.max(1).values
    col1 = torch.log(torch.exp(capped - mx[:, None]).sum(1))
    if t.is_floating_point():
        c = x.shape[cd]
        tt = torch.movedim(t.to(ad), cd, -1).reshape(-1, c) * (1 - ls) + ls / c
        if w is not None:
            tt = tt * w.to(ad)
        col2 = tt.sum(1)
    else:
        pos = torch.movedim(position_independent_cap(xa, softcap), cd, -1).reshape(-1, x.shape[cd])
        tl = t.long().reshape(-1)
        col2 = ((pos.argmax(1) == tl) & (tl != ii)).to(ad)
    return torch.stack([mx, col1, col2], 1)


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("shape", [(6, 11), (2, 11, 3), (11,), (4, 1030)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fwd_stats(dtype, shape, kind):
    c = shape[class_dim(torch.empty(shape))]
    x = make_input(shape, dtype, scale=3.0)
    w = make_weight(c, dtype)
    prob = kind == "prob"
    t = (prob_target(shape, "softmax", dtype) if prob
         else class_target(shape, c, "some" if len(shape) > 1 else "none", -100))
    ls = 0.1
    rows = t.numel() // (c if prob else 1)
    ad = acc_dtype(dtype)
    rtol, atol = tolerance(dtype)
    want = ref_stats(x, t, w, -100, ls, 2.0)
    ignored = torch.zeros(rows, dtype=torch.bool) if prob else (t.reshape(-1) == -100)
    for reduction in REDUCTIONS:
        for irs in (False, True):
            loss, stats, *_ = CE_FWD(x, t, w, -100, reduction, ls, 1e-3, CE_NO_GRADS, 2.0, irs)
            assert stats.shape == (rows, 3) and stats.dtype == ad
            assert_close(loss, ce_ref(x.to(reference_dtype(dtype)), t.to(reference_dtype(dtype)) if prob else t,
                                      w.to(reference_dtype(dtype)), 2.0, reduction=reduction, label_smoothing=ls,
                                      z_loss=1e-3), dtype=dtype, equal_nan=True, msg=f"{reduction} loss")
            keep = ~ignored
            assert_close(stats[keep, 0], want[keep, 0], dtype=ad, rtol=rtol, atol=atol, msg="col0 (capped max)")
            assert_close(stats[keep, 1], want[keep, 1], dtype=ad, rtol=rtol, atol=atol, msg="col1 (log sum exp)")
            assert_close(stats[keep, 0] + stats[keep, 1], want[keep, 0] + want[keep, 1], dtype=ad, rtol=rtol,
                         atol=atol, msg="lse")
            assert_close(stats[keep, 2], want[keep, 2], dtype=ad, rtol=rtol, atol=atol, msg="col2")
            if ignored.any():
                if irs:
                    assert_close(stats[ignored, :2], want[ignored, :2], dtype=ad, rtol=rtol, atol=atol,
                                 msg="ignored rows' col0/col1 with ignored_row_stats")
                    assert (stats[ignored, 2] == 0).all()
                else:
                    assert (stats[ignored] == 0).all(), f"ignored rows' stats not 0: {stats[ignored]}"


def test_fwd_defaults_unchanged():
    # Existing calls (no softcap, no ignored_row_stats) keep working and equal softcap=0.0.
    x = make_input((5, 9), scale=3.0)
    t = class_target(x.shape, 9, "some", -100)
    loss, stats, *_ = CE_FWD(x, t, None, -100, "mean", 0.1, 1e-3, CE_NO_GRADS)
    loss0, stats0, *_ = CE_FWD(x, t, None, -100, "mean", 0.1, 1e-3, CE_NO_GRADS, 0.0, False)
    assert torch.equal(loss, loss0) and torch.equal(stats, stats0)
    assert_close(loss, ce_reference(x, t, label_smoothing=0.1, z_loss=1e-3))
    gi, _ = CE_BWD(torch.tensor(1.0), x, t, None, stats, -100, "mean", 0.1, 1e-3, [True, False])
    gi0, _ = CE_BWD(torch.tensor(1.0), x, t, None, stats, -100, "mean", 0.1, 1e-3, [True, False], 0.0, None)
    assert torch.equal(gi, gi0)


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bwd_op_with_softcap_and_grad_lse(dtype, reduction, kind):
    shape = (3, 11, 2)
    x = make_input(shape, dtype, scale=3.0)
    w = make_weight(11, dtype)
    prob = kind == "prob"
    t = prob_target(shape, dtype=dtype) if prob else class_target(shape, 11, "some", -100)
    loss, stats, *_ = CE_FWD(x, t, w, -100, reduction, 0.1, 0.5, CE_NO_GRADS, 2.0, True)
    g = torch.randn(loss.shape).to(dtype)
    grad_lse = torch.randn(target_shape(shape), dtype=acc_dtype(dtype))
    rd = reference_dtype(dtype)
    xr = leaf(x, rd)
    tr = leaf(t, rd) if prob else t
    yr = ce_ref(xr, tr, w.to(rd), 2.0, reduction=reduction, label_smoothing=0.1, z_loss=0.5)
    lr = torch.logsumexp(cap(xr, 2.0), 1)
    leaves = (xr, tr) if prob else (xr,)
    with_lse = torch.autograd.grad((yr * g.to(rd)).sum() + (lr * grad_lse.to(rd)).sum(), leaves, retain_graph=True)
    without = torch.autograd.grad((yr * g.to(rd)).sum(), leaves)
    mask = [True, prob]
    gi, gt = CE_BWD(g, x, t, w, stats, -100, reduction, 0.1, 0.5, mask, 2.0, grad_lse)
    assert gi.dtype == dtype and gi.shape == x.shape
    assert_close(gi, with_lse[0], dtype=dtype, msg="grad_input with grad_lse")
    gi2, _ = CE_BWD(g, x, t, w, stats, -100, reduction, 0.1, 0.5, mask, 2.0, None)
    assert_close(gi2, without[0], dtype=dtype, msg="grad_input without grad_lse")
    if prob:
        assert_close(gt, with_lse[1], dtype=dtype, msg="grad_target")
    # only grad_lse (grad_loss 0)
    gi3, _ = CE_BWD(torch.zeros_like(g), x, t, w, stats, -100, reduction, 0.1, 0.5, [True, False], 2.0, grad_lse)
    (want3,) = torch.autograd.grad((lr * grad_lse.to(rd)).sum(), xr)
    assert_close(gi3, want3, dtype=dtype, msg="grad_lse alone")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(6, 37), (3, 1500), (2, 5, 3), (9,)], ids=str)
def test_bwd_inplace_with_softcap_equals_bwd(shape, dtype, reduction):
    c = shape[0] if len(shape) == 1 else shape[1]
    x = make_input(shape, dtype, scale=3.0)
    t = class_target(shape, c, "some" if len(shape) > 1 else "none", 2)
    w = make_weight(c, dtype)
    loss, stats, *_ = CE_FWD(x, t, w, 2, reduction, 0.1, 1e-3, CE_NO_GRADS, 3.0)
    g = torch.randn(loss.shape, dtype=dtype) if reduction == "none" else torch.tensor(0.7, dtype=dtype)
    want = CE_BWD(g, x, t, w, stats, 2, reduction, 0.1, 1e-3, [True, False], 3.0)[0]
    y = x.clone()
    assert CE_BWD_INPLACE(g, y, t, w, stats, 2, reduction, 0.1, 1e-3, 3.0) is None
    assert torch.equal(y, want)
    # and that is PyTorch's gradient
    rd = reference_dtype(dtype)
    xr = leaf(x, rd)
    yr = ce_ref(xr, t, w.to(rd), 3.0, ignore_index=2, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert_close(y, torch.autograd.grad(yr, xr, g.to(rd))[0], dtype=dtype)


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(6, 11), (3, 11, 2), (11,), (0, 11), (3, 1100)], ids=str)
def test_fwd_grad_with_softcap_equals_fwd_then_bwd(shape, dtype, reduction, kind):
    c = shape[class_dim(torch.empty(shape))]
    x = make_input(shape, dtype, scale=3.0)
    w = make_weight(c, dtype)
    t = prob_target(shape, dtype=dtype) if kind == "prob" else \
        class_target(shape, c, "some" if len(shape) > 1 and shape[0] > 1 else "none")
    for irs in (False, True):
        loss, stats, grad, _ = CE_FWD(x, t, w, -100, reduction, 0.1, 0.5, [True, False], 2.0, irs)
        loss_ref, stats_ref, *_ = CE_FWD(x, t, w, -100, reduction, 0.1, 0.5, CE_NO_GRADS, 2.0, irs)
        grad_ref, _ = CE_BWD(torch.ones((), dtype=dtype), x, t, w, stats_ref, -100, reduction, 0.1, 0.5,
                             [True, False], 2.0)
        same = dict(rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(loss, loss_ref, **same)
        torch.testing.assert_close(stats, stats_ref, **same)
        torch.testing.assert_close(grad, grad_ref, **same)
    # vs PyTorch
    rd = reference_dtype(dtype)
    xr = leaf(x, rd)
    yr = ce_ref(xr, t.to(rd) if kind == "prob" else t, w.to(rd), 2.0, reduction=reduction, label_smoothing=0.1,
                z_loss=0.5)
    assert_close(loss, yr.detach(), dtype=dtype, equal_nan=True)
    if x.numel():
        assert_close(grad, torch.autograd.grad(yr, xr)[0], dtype=dtype)


# opcheck

def _ce_opcheck_args(shape, kind, requires_grad, ii=-100):
    c = shape[class_dim(torch.empty(shape))]
    x = make_input(shape, scale=3.0)
    w = make_weight(c)
    if kind == "prob":
        t = prob_target(shape)
        if requires_grad:
            t = leaf(t)
    else:
        t = class_target(shape, c, "some" if len(shape) > 1 else "none", ii)
    if requires_grad:
        x = leaf(x)
    return x, t, w


CE_FWD_SAMPLES = [
    # id, shape, kind, reduction, softcap, ignored_row_stats, requires_grad
    ("class_mean_irs_grad", (5, 7), "class", "mean", 2.0, True, True),
    ("class_3d_none_nograd", (2, 7, 3), "class", "none", 30.0, True, False),
    ("prob_sum_grad", (5, 7), "prob", "sum", 1.5, False, True),
    ("class_1d_none_grad", (7,), "class", "none", 0.5, True, True),
]


@pytest.mark.parametrize("sample", CE_FWD_SAMPLES, ids=[s[0] for s in CE_FWD_SAMPLES])
def test_opcheck_ce_fwd(sample):
    _, shape, kind, reduction, softcap, irs, rg = sample
    x, t, w = _ce_opcheck_args(shape, kind, rg)
    torch.library.opcheck(CE_FWD, (x, t, w, -100, reduction, 0.1, 1e-3, CE_NO_GRADS, softcap, irs))


@pytest.mark.parametrize("kind", ["class", "prob"])
def test_opcheck_ce_bwd(kind):
    shape = (2, 7, 3)
    x, t, w = _ce_opcheck_args(shape, kind, False)
    loss, stats, *_ = CE_FWD(x, t, w, -100, "none", 0.1, 1e-3, CE_NO_GRADS, 2.0, True)
    g = torch.randn(loss.shape)
    grad_lse = torch.randn(target_shape(shape))
    mask = [True, kind == "prob"]
    torch.library.opcheck(CE_BWD, (g, x, t, w, stats, -100, "none", 0.1, 1e-3, mask, 2.0, grad_lse))
    loss, stats, *_ = CE_FWD(x, t, w, -100, "mean", 0.1, 1e-3, CE_NO_GRADS, 2.0, True)
    torch.library.opcheck(CE_BWD, (torch.tensor(1.3), x, t, w, stats, -100, "mean", 0.1, 1e-3, mask, 2.0, grad_lse),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_ce_bwd_inplace_and_fwd_grad_mask():
    x, t, w = _ce_opcheck_args((5, 11), "class", False)
    loss, stats, *_ = CE_FWD(x, t, w, -100, "sum", 0.0, 0.0, CE_NO_GRADS, 2.0)
    torch.library.opcheck(CE_BWD_INPLACE, (torch.tensor(1.0), x.clone(), t, w, stats, -100, "sum", 0.0, 0.0, 2.0),
                          test_utils=("test_schema", "test_faketensor"))
    xg = leaf(x)
    torch.library.opcheck(CE_FWD, (xg, t, w, -100, "mean", 0.1, 1e-3, [True, False], 2.0, True))
    torch.library.opcheck(CE_FWD, (x, t, w, -100, "sum", 0.0, 0.5, [True, False], 0.7, False))
    xp, tp, wp = _ce_opcheck_args((5, 11), "prob", True)
    torch.library.opcheck(CE_FWD, (xp, tp, wp, -100, "mean", 0.1, 1e-3, [True, True], 2.0, False))


# ----------------------------------------------------------------------------------------------
# 8. torch.compile
# ----------------------------------------------------------------------------------------------


def _compiled_losses(x, t, w, xp, tp, h, lw, lb, tl):
    loss1, lse1, acc1 = torch_ext.cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                                return_lse=True, return_accuracy=True)
    loss2, lse2 = torch_ext.cross_entropy(xp, tp, reduction="none", softcap=3.0, return_lse=True)
    acc_only = torch_ext.cross_entropy(x, t, reduction="sum", softcap=2.0, return_accuracy=True)[1]
    loss3, lse3, acc3 = torch_ext.linear_cross_entropy(h, lw, tl, linear_bias=lb, softcap=4.0, chunk_size=3,
                                                       z_loss=1e-3, return_lse=True, return_accuracy=True)
    total = loss1 + LSE_COEF * (lse1 ** 2).sum() + (0.5 * loss2).sum() + 0.2 * lse2.sum() + loss3
    return total, lse1, acc1, lse2, acc_only, lse3, acc3


def _reference_losses(x, t, w, xp, tp, h, lw, lb, tl):
    loss1 = ce_ref(x, t, w, 5.0, label_smoothing=0.1, z_loss=1e-3)
    lse1 = torch.logsumexp(cap(x, 5.0), 1)
    acc1 = ref_accuracy(x, t, -100, 5.0, 1)
    loss2 = ce_ref(xp, tp, None, 3.0, reduction="none")
    lse2 = torch.logsumexp(cap(xp, 3.0), 1)
    acc_only = ref_accuracy(x, t, -100, 2.0, 1)
    loss3 = lce_ref(h, lw, lb, tl, None, 4.0, z_loss=1e-3)
    logits = F.linear(h, lw, lb).detach()
    lse3 = torch.logsumexp(cap(logits, 4.0), -1)
    acc3 = ref_accuracy(logits, tl, -100, 4.0, -1)
    total = loss1 + LSE_COEF * (lse1 ** 2).sum() + (0.5 * loss2).sum() + 0.2 * lse2.sum() + loss3
    return total, lse1, acc1, lse2, acc_only, lse3, acc3


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(dynamo_reset, backend):
    x = make_input((6, 9), scale=3.0)
    t = class_target(x.shape, 9, "some", -100)
    w = make_weight(9)
    xp = make_input((2, 9, 3), scale=3.0)
    tp = prob_target((2, 9, 3))
    h, lw, lb = lce_args((7,), 5, 11)
    tl = lce_class_target((7,), 11, "some")
    compiled = torch.compile(_compiled_losses, fullgraph=True, backend=backend)
    results = []
    for f in (_compiled_losses, compiled, _reference_losses):
        leaves = [leaf(v) for v in (x, xp, tp, h, lw, lb)]
        lx, lxp, ltp, lh, llw, llb = leaves
        outs = f(lx, t, w, lxp, ltp, lh, llw, llb, tl)
        grads = torch.autograd.grad(outs[0], leaves)
        results.append(([o.detach() for o in outs], grads))
    names = ("total", "lse1", "acc1", "lse2", "acc_only", "lse3", "acc3")
    grad_names = ("x", "xp", "tp", "h", "linear_weight", "linear_bias")
    (eager_out, eager_g), (comp_out, comp_g), (ref_out, ref_g) = results
    for name, a, e, r in zip(names, comp_out, eager_out, ref_out):
        assert a.shape == r.shape and a.dtype == r.dtype, (
            f"{backend} {name}: {a.shape} {a.dtype} vs {r.shape} {r.dtype}"
        )
        assert_close(a, e, msg=f"{backend} {name}: compiled vs eager")
        assert_close(a, r, msg=f"{backend} {name}: compiled vs PyTorch")
        assert_close(e, r, msg=f"{backend} {name}: eager vs PyTorch")
    for name, a, e, r in zip(grad_names, comp_g, eager_g, ref_g):
        assert_close(a, e, msg=f"{backend} grad {name}: compiled vs eager")
        assert_close(a, r, msg=f"{backend} grad {name}: compiled vs PyTorch")
    # inference: the same compiled function under torch.no_grad()
    with torch.no_grad():
        outs = compiled(x, t, w, xp, tp, h, lw, lb, tl)
    for name, a, r in zip(names, outs, ref_out):
        assert not a.requires_grad
        assert_close(a, r, msg=f"{backend} no_grad {name}: compiled vs PyTorch")


def test_compile_no_graph_breaks(dynamo_reset):
    module = CrossEntropyLoss(reduction="none", softcap=2.0, return_lse=True, return_accuracy=True)

    def fn(x, t, p):
        loss, lse, acc = module(x, t)
        loss2, lse2 = torch_ext.cross_entropy(x, p, softcap=1.0, return_lse=True)
        return loss.sum() + lse.sum() + acc + loss2 + lse2.sum()

    x = make_input((4, 6))
    explanation = torch._dynamo.explain(fn)(x, class_target(x.shape, 6), prob_target(x.shape))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ----------------------------------------------------------------------------------------------
# 9. autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [False, True], ids=["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bfloat16(reduction, prob):
    # Under bf16 autocast the loss computes in float32 and returns float32 (as torch's losses);
    # lse and accuracy are float32; gradients in the input's dtype.
    w = make_weight(9)
    for in_dtype in (torch.float32, torch.bfloat16):
        x = make_input((5, 9), in_dtype, scale=3.0)
        t = prob_target(x.shape) if prob else class_target(x.shape, 9, "some", -100)
        xl, xr = leaf(x), leaf(x, torch.float32)
        kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        with torch.autocast(default_device_type(), dtype=torch.bfloat16):
            out = cross_entropy(xl, t, w, softcap=2.5, return_lse=True, return_accuracy=not prob, **kw)
            ref_plain = F.cross_entropy(cap(xr, 2.5), t, w, reduction=reduction, label_smoothing=0.1)
        assert ref_plain.dtype == torch.float32
        loss, lse, acc = unpack(out, True, not prob)
        assert loss.dtype == torch.float32, f"{in_dtype}: loss {loss.dtype}"
        assert lse.dtype == torch.float32
        yr = ce_ref(xr, t, w, 2.5, **kw)
        lr = torch.logsumexp(cap(xr, 2.5), 1)
        assert_close(loss, yr.detach(), msg=f"autocast {in_dtype}: loss")
        assert_close(lse, lr.detach(), msg=f"autocast {in_dtype}: lse")
        if not prob:
            assert acc.dtype == torch.float32
            check_accuracy(acc, x, t, -100, 2.5, 1, msg=f"autocast {in_dtype}")
        g = torch.randn(loss.shape)
        (gx,) = torch.autograd.grad((loss * g).sum() + LSE_COEF * (lse ** 2).sum(), xl)
        (gr,) = torch.autograd.grad((yr * g).sum() + LSE_COEF * (lr ** 2).sum(), xr)
        assert gx.dtype == in_dtype
        assert_close(gx, gr, dtype=in_dtype, msg=f"autocast {in_dtype}: grad")


def test_autocast_float64_stays_float64():
    x = leaf(make_input((4, 5), torch.float64))
    t = class_target(x.shape, 5)
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        loss, lse, acc = cross_entropy(x, t, softcap=2.0, return_lse=True, return_accuracy=True)
    assert loss.dtype == lse.dtype == acc.dtype == torch.float64
    assert_close(loss, ce_ref(x, t, None, 2.0).detach())


# ----------------------------------------------------------------------------------------------
# 10. Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", BAD_SOFTCAPS, ids=str)
def test_bad_softcap(softcap):
    x = make_input((4, 5))
    t = class_target(x.shape, 5)
    for xin in (x, leaf(x)):
        with pytest.raises(ValueError, match="softcap"):
            cross_entropy(xin, t, softcap=softcap)
        with pytest.raises(ValueError, match="softcap"):
            cross_entropy(xin, t, softcap=softcap, reduction="none", return_lse=True)
        with pytest.raises(ValueError, match="softcap"):
            CrossEntropyLoss(softcap=softcap)(xin, t)
    h, lw, lb = lce_args((4,), 3, 5)
    for hin in (h, leaf(h)):
        with pytest.raises(ValueError, match="softcap"):
            linear_cross_entropy(hin, lw, t, softcap=softcap)
        with pytest.raises(ValueError, match="softcap"):
            linear_cross_entropy(hin, lw, t, softcap=softcap, reduction="none", return_accuracy=True)
    with pytest.raises(ValueError, match="softcap"):
        LinearCrossEntropyLoss(3, 5, softcap=softcap)(h, t)


def test_return_accuracy_with_probability_targets_raises():
    x = make_input((4, 5))
    p = prob_target(x.shape)
    for xin, pin in ((x, p), (leaf(x), p), (leaf(x), leaf(p))):
        for reduction in REDUCTIONS:
            with pytest.raises(ValueError, match="return_accuracy"):
                cross_entropy(xin, pin, return_accuracy=True, reduction=reduction)
        with pytest.raises(ValueError, match="return_accuracy"):
            cross_entropy(xin, pin, softcap=2.0, return_lse=True, return_accuracy=True)
        with pytest.raises(ValueError, match="return_accuracy"):
            CrossEntropyLoss(return_accuracy=True)(xin, pin)
    h, lw, lb = lce_args((4,), 3, 5)
    for hin in (h, leaf(h)):
        with pytest.raises(ValueError, match="return_accuracy"):
            linear_cross_entropy(hin, lw, lce_prob_target((4,), 5), return_accuracy=True)


def test_k_dimensional_linear_weight_with_lse_or_accuracy_raises():
    x = torch.randn(3, 2)
    w = torch.randn(4, 2, 2)
    t = lce_class_target((3, 2), 4)
    for flags in (dict(return_lse=True), dict(return_accuracy=True), dict(return_lse=True, return_accuracy=True)):
        with pytest.raises(ValueError):
            linear_cross_entropy(x, w, t, **flags)
        with pytest.raises(ValueError):
            linear_cross_entropy(leaf(x), leaf(w), t, softcap=2.0, **flags)
        with pytest.raises(ValueError):
            m = LinearCrossEntropyLoss(2, 4, out_features=(2,), **flags)
            m(x, t)


# ----------------------------------------------------------------------------------------------
# 11. The CrossEntropyLoss module
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: f"lse{int(f[0])}_acc{int(f[1])}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_matches_functional(reduction, flags):
    return_lse, return_accuracy = flags
    w = make_weight(7)
    opts = dict(weight=w, ignore_index=2, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=2.0,
                return_lse=return_lse, return_accuracy=return_accuracy)
    m = CrossEntropyLoss(**opts)
    x = make_input((4, 7, 3), scale=3.0)
    t = class_target(x.shape, 7, "some", 2)
    xl, xf = leaf(x), leaf(x)
    out = m(xl, t)
    out_f = cross_entropy(xf, t, **opts)
    ours, theirs = unpack(out, return_lse, return_accuracy), unpack(out_f, return_lse, return_accuracy)
    for a, b in zip(ours, theirs):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, equal_nan=True)
    # vs PyTorch (run_ce is the functional's check) and gradients
    loss, lse, acc = ours
    xr = leaf(x)
    yr = ce_ref(xr, t, w, 2.0, ignore_index=2, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert_close(loss, yr.detach())
    obj, obj_r = loss.sum(), yr.sum()
    if return_lse:
        lr = torch.logsumexp(cap(xr, 2.0), 1)
        assert_close(lse, lr.detach())
        obj, obj_r = obj + LSE_COEF * (lse ** 2).sum(), obj_r + LSE_COEF * (lr ** 2).sum()
    if return_accuracy:
        check_accuracy(acc, x, t, 2, 2.0, 1)
    obj.backward()
    obj_r.backward()
    assert_close(xl.grad, xr.grad)
    # num_items_in_batch through forward
    if reduction == "mean":
        m_items = m(leaf(x), t, num_items_in_batch=5)
        f_items = cross_entropy(x, t, num_items_in_batch=5, **opts)
        for a, b in zip(unpack(m_items, return_lse, return_accuracy), unpack(f_items, return_lse, return_accuracy)):
            if a is not None:
                torch.testing.assert_close(a.detach(), b, equal_nan=True)
        assert_close(unpack(m_items, return_lse, return_accuracy)[0],
                     ce_ref(x, t, w, 2.0, num_items=5, ignore_index=2, label_smoothing=0.1, z_loss=1e-3))


def test_module_plain_output_with_softcap():
    x = make_input((3, 4))
    t = class_target(x.shape, 4)
    out = CrossEntropyLoss(softcap=2.0)(x, t)
    assert isinstance(out, torch.Tensor)
    assert_close(out, ce_ref(x, t, None, 2.0))


# ----------------------------------------------------------------------------------------------
# 12. linear_cross_entropy
# ----------------------------------------------------------------------------------------------

LCE_LEADS = [(7,), (2, 5), (), (4,), (3, 3)]
LCE_CHUNKS = [1, 3, None, 50, 2]
# (bias, weighted, ignored rows, ignore_index, label_smoothing, z_loss, softcap, num_items)
LCE_CLASS_SETS = [
    (True, False, "none", -100, 0.0, 0.0, 2.0, None),
    (True, True, "some", -100, 0.1, 1e-3, 30.0, 6),
    (False, True, "some", 2, 1.0, 0.5, 0.7, None),
    (True, False, "some", -100, 0.0, 0.5, 5.0, "tensor"),
    (False, False, "all", -100, 0.1, 0.0, 3.0, None),
    (True, True, "some", 2, 0.0, 0.0, None, None),
]
# (bias, weighted, label_smoothing, z_loss, softcap, target requires grad, num_items)
LCE_PROB_SETS = [
    (True, False, 0.0, 0.0, 2.0, False, None),
    (True, True, 0.1, 1e-3, 30.0, True, 4),
    (False, True, 1.0, 0.5, 0.7, True, None),
    (False, False, 0.1, 0.0, None, False, None),
]


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_lce_matches_pytorch(dtype, reduction, kind):
    hidden, vocab = 8, 37
    offset = DTYPES.index(dtype) + REDUCTIONS.index(reduction)
    sets = LCE_CLASS_SETS if kind == "class" else LCE_PROB_SETS
    for i, opts_set in enumerate(sets):
        lead = LCE_LEADS[(i + offset) % len(LCE_LEADS)]
        chunk = LCE_CHUNKS[(i + 2 * offset) % len(LCE_CHUNKS)]
        lse_flag, acc_flag = FLAG_SETS[(i + offset) % len(FLAG_SETS)]
        if kind == "class":
            bias, weighted, ignored, ii, ls, z, softcap, items = opts_set
            t = lce_class_target(lead, vocab, ignored if lead else "none", ii)
            target_grad = False
        else:
            bias, weighted, ls, z, softcap, target_grad, items = opts_set
            ii = -100
            t = lce_prob_target(lead, vocab, dtype)
            acc_flag = False
        x, w, b = lce_args(lead, hidden, vocab, dtype, bias, logit_scale=4.0)
        cw = make_weight(vocab, dtype) if weighted else None
        run_lce(x, w, t, b, cw, softcap=softcap, return_lse=lse_flag, return_accuracy=acc_flag,
                target_grad=target_grad, num_items=_items(items, reduction), ignore_index=ii, reduction=reduction,
                label_smoothing=ls, z_loss=z, chunk_size=chunk, msg=f"{kind} set {i} lead={lead} chunk={chunk}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_lce_chunk_sizes(dtype):
    # 10 rows: chunk 1, 3 (not a divisor), 4, 10, 64 (larger than the rows), None; same results.
    lead, hidden, vocab = (10,), 6, 1030
    x, w, b = lce_args(lead, hidden, vocab, dtype, logit_scale=5.0)
    t = lce_class_target(lead, vocab, "some")
    outs = []
    for chunk in (1, 3, 4, 10, 64, None):
        loss, lse, acc, grads = run_lce(x, w, t, b, softcap=3.0, reduction="sum", z_loss=1e-3, label_smoothing=0.1,
                                        chunk_size=chunk, check_nograd=chunk == 3, msg=f"chunk={chunk}")
        outs.append((loss, lse, acc))
    tol = LCE_BF16_TOL if dtype == torch.bfloat16 else {}
    for chunk, (loss, lse, acc) in zip((3, 4, 10, 64, None), outs[1:]):
        assert_close(loss, outs[0][0], dtype=dtype, msg=f"chunk={chunk}: loss against chunk=1", **tol)
        assert_close(lse, outs[0][1], dtype=acc_dtype(dtype), rtol=tolerance(dtype)[0], atol=tolerance(dtype)[1])
        if dtype != torch.bfloat16:  # (bfloat16: bounded by run_lce's near-tie allowance)
            torch.testing.assert_close(acc, outs[0][2])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_lce_partial_requires_grad(reduction):
    lead, hidden, vocab = (6,), 5, 13
    x, w, b = lce_args(lead, hidden, vocab)
    t = lce_class_target(lead, vocab, "some")
    for requires in (("input",), ("linear_weight",), ("linear_bias",), ("input", "linear_bias"), ()):
        run_lce(x, w, t, b, softcap=2.0, requires=requires, reduction=reduction, chunk_size=4, z_loss=1e-3,
                check_nograd=False, msg=f"requires={requires}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_lce_saturation(dtype, reduction):
    # Logits of magnitude ~1e4 (through the weight) and +-inf (through the bias) with softcap=30.
    lead, hidden, vocab = (6,), 4, 9
    x, w, b = lce_args(lead, hidden, vocab, torch.float32, logit_scale=2e4)
    b[2] = float("inf")
    b[5] = float("-inf")
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    t = torch.tensor([2, 5, 0, 1, 8, -100])
    loss, lse, acc, grads = run_lce(x, w, t, b, softcap=30.0, requires=("input", "linear_weight"),
                                    reduction=reduction, chunk_size=4, label_smoothing=0.1, msg="saturation")
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_lce_empty_and_all_ignored(reduction):
    x, w, b = lce_args((0,), 4, 9)
    loss, lse, acc, _ = run_lce(x, w, torch.zeros(0, dtype=torch.long), b, softcap=2.0, reduction=reduction,
                                msg="empty")
    assert lse.shape == (0,) and torch.isnan(acc).item()
    x, w, b = lce_args((2, 3), 4, 9)
    loss, lse, acc, _ = run_lce(x, w, lce_class_target((2, 3), 9, "all"), b, softcap=2.0, reduction=reduction,
                                z_loss=0.5, chunk_size=4, msg="all ignored")
    assert lse.shape == (2, 3) and torch.isfinite(lse).all() and torch.isnan(acc).item()


def test_lce_accuracy_ties():
    # Ties of the logits built through the weight (identical rows of W): first index wins.
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[0.0, 2.0], [0.0, 2.0], [3.0, 0.0], [-2.0, 0.0]])
    t = torch.tensor([2, 1, 0, 3])  # tie 1/2 wrong (later), tie 1/2 right (earlier), clear right, clear right
    for softcap in (None, 1.5):
        for chunk in (1, 3, None):
            _, _, acc, _ = run_lce(x, w, t, softcap=softcap, chunk_size=chunk, msg=f"ties chunk={chunk}")
            assert acc.item() == pytest.approx(0.75)


def test_lce_k_dimensional_with_softcap():
    # A K-dimensional linear_weight (C, d1, H) with softcap (no lse / accuracy): the capped logits
    # (N, C, d1) through F.cross_entropy.
    x = leaf(torch.randn(5, 3, dtype=torch.float64))
    w = leaf(torch.randn(4, 2, 3, dtype=torch.float64))
    b = leaf(torch.randn(4, 2, dtype=torch.float64))
    t = lce_class_target((5, 2), 4, "some")
    for reduction in REDUCTIONS:
        y = linear_cross_entropy(x, w, t, linear_bias=b, softcap=1.5, reduction=reduction, z_loss=1e-3, chunk_size=2)
        logits = torch.einsum("nh,cdh->ncd", x, w) + b[None]
        yr = ce_ref(logits, t, None, 1.5, reduction=reduction, z_loss=1e-3)
        assert_close(y, yr, rtol=1e-10, atol=1e-10, msg=f"K-dim {reduction}")
        g = torch.randn(y.shape, dtype=torch.float64)
        for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(yr, (x, w, b), g)):
            assert_close(a, r, rtol=1e-10, atol=1e-10, msg=f"K-dim {reduction} grad")


LCE_GRADCHECK_CASES = [
    # id, lead, kind, bias, reduction, label_smoothing, z_loss, softcap, chunk
    ("class_mean", (3,), "class", True, "mean", 0.0, 0.0, 1.5, 2),
    ("class_none_options", (4,), "class_some", True, "none", 0.1, 1e-3, 0.8, 3),
    ("class_sum_nobias", (2, 2), "class_some", False, "sum", 1.0, 0.5, 2.0, 1),
    ("class_1d", (), "class", True, "mean", 0.1, 1e-3, 1.0, None),
    ("prob_none", (3,), "prob", True, "none", 0.1, 0.5, 1.2, 2),
]


@pytest.mark.parametrize("case", LCE_GRADCHECK_CASES, ids=[c[0] for c in LCE_GRADCHECK_CASES])
def test_lce_gradcheck(case):
    _, lead, kind, bias, reduction, ls, z, softcap, chunk = case
    hidden, vocab = 3, 5
    x, w, b = (leaf(v) if v is not None else None for v in lce_args(lead, hidden, vocab, torch.float64, bias))
    if kind.startswith("class"):
        t = lce_class_target(lead, vocab, "some" if kind == "class_some" else "none")
    else:
        t = lce_prob_target(lead, vocab, torch.float64)
    opts = dict(reduction=reduction, label_smoothing=ls, z_loss=z, chunk_size=chunk, softcap=softcap)
    inputs = (x, w, b) if bias else (x, w)

    def fn(*args):
        return linear_cross_entropy(args[0], args[1], t, linear_bias=args[2] if bias else None, **opts)

    def fn_lse(*args):  # returning lse (and accuracy) does not change the loss's gradients
        out = linear_cross_entropy(args[0], args[1], t, linear_bias=args[2] if bias else None, return_lse=True,
                                   return_accuracy=not t.is_floating_point(), **opts)
        return out[0]

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradcheck(fn_lse, inputs)
    if kind == "prob":
        assert torch.autograd.gradcheck(
            lambda *a: linear_cross_entropy(a[0], a[1], a[3], linear_bias=a[2], return_lse=True, **opts)[0],
            inputs + (leaf(t),))


# raw ops


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_lce_raw_ops(dtype, reduction, kind):
    rows, hidden, vocab = 7, 5, 11
    x, w, b = lce_args((rows,), hidden, vocab, dtype, logit_scale=4.0)
    if kind == "class":
        t = lce_class_target((rows,), vocab, "some")
    else:
        t = lce_prob_target((rows,), vocab, dtype)
    cw = make_weight(vocab, dtype)
    rd, ad = reference_dtype(dtype), acc_dtype(dtype)
    tol = LCE_BF16_TOL if dtype == torch.bfloat16 else {}
    xr, wr, br = leaf(x, rd), leaf(w, rd), leaf(b, rd)
    tr = t.to(rd) if kind == "prob" else t
    yr = lce_ref(xr, wr, br, tr, cw.to(rd), 2.0, reduction=reduction, label_smoothing=0.1, z_loss=0.5)
    logits = F.linear(xr, wr, br).detach()
    ignored = torch.zeros(rows, dtype=torch.bool) if kind == "prob" else t == -100
    want_stats = ref_stats(logits, tr if kind == "prob" else t, cw.to(rd), -100, 0.1, 2.0)
    rtol, atol = (tol["rtol"], tol["atol"]) if tol else tolerance(dtype)
    for irs in (False, True):
        out = LCE_FWD(x, w, b, t, cw, -100, reduction, 0.1, 0.5, 3, NO_GRADS, 2.0, irs)
        assert len(out) == 5
        loss, stats, gi, gw, gb = out
        assert_close(loss, yr.detach(), dtype=dtype, msg="fwd op: loss", **tol)
        assert gi is None and gw is None and gb is None
        assert stats.shape == (rows, 3) and stats.dtype == ad
        keep = ~ignored
        assert_close(stats[keep, 0] + stats[keep, 1], want_stats[keep, 0] + want_stats[keep, 1], dtype=ad, rtol=rtol,
                     atol=atol, msg="fwd op: lse of the stats")
        assert_close(stats[keep, 0], want_stats[keep, 0], dtype=ad, rtol=rtol, atol=atol, msg="fwd op: capped max")
        if kind == "prob":
            assert_close(stats[:, 2], want_stats[:, 2], dtype=ad, rtol=rtol, atol=atol, msg="fwd op: target mass")
        elif dtype != torch.bfloat16:
            torch.testing.assert_close(stats[keep, 2], want_stats[keep, 2], msg="fwd op: argmax == target")
        if ignored.any():
            if irs:
                assert_close(stats[ignored, 0] + stats[ignored, 1], want_stats[ignored, 0] + want_stats[ignored, 1],
                             dtype=ad, rtol=rtol, atol=atol, msg="fwd op: ignored rows' lse")
                assert (stats[ignored, 2] == 0).all()
            else:
                assert (stats[ignored] == 0).all()
    # the gradients for grad_output 1 from the forward op (mean / sum), then the backward op
    if reduction != "none":
        ref1 = torch.autograd.grad(yr, (xr, wr, br), retain_graph=True)
        loss, stats, gi, gw, gb = LCE_FWD(x, w, b, t, cw, -100, reduction, 0.1, 0.5, 3, ALL_GRADS, 2.0, False)
        for name, got, want in zip(("input", "linear_weight", "linear_bias"), (gi, gw, gb), ref1):
            assert got.dtype == dtype
            assert_close(got, want, dtype=dtype, msg=f"fwd op: grad of {name}", **tol)
    g = torch.randn(yr.shape).to(dtype)
    ref = torch.autograd.grad(yr, (xr, wr, br), g.to(rd))
    gi, gw, gb = LCE_BWD(g, x, w, b, t, cw, -100, reduction, 0.1, 0.5, 3, ALL_GRADS, 2.0)
    for name, got, want in zip(("input", "linear_weight", "linear_bias"), (gi, gw, gb), ref):
        assert got.dtype == dtype
        assert_close(got, want, dtype=dtype, msg=f"bwd op: grad of {name}", **tol)


def test_lce_raw_ops_defaults_unchanged():
    x, w, b = lce_args((5,), 4, 7)
    t = lce_class_target((5,), 7, "some")
    out = LCE_FWD(x, w, b, t, None, -100, "mean", 0.0, 0.0, 2, ALL_GRADS)
    out0 = LCE_FWD(x, w, b, t, None, -100, "mean", 0.0, 0.0, 2, ALL_GRADS, 0.0, False)
    assert len(out) == 5
    for a, e in zip(out, out0):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert_close(out[0], lce_ref(x, w, b, t, None, None))
    g = LCE_BWD(torch.tensor(1.0), x, w, b, t, None, -100, "mean", 0.0, 0.0, 2, ALL_GRADS)
    g0 = LCE_BWD(torch.tensor(1.0), x, w, b, t, None, -100, "mean", 0.0, 0.0, 2, ALL_GRADS, 0.0)
    for a, e in zip(g, g0):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


LCE_OPCHECK_SAMPLES = [
    # id, kind, reduction, grad_mask, requires_grad, softcap, ignored_row_stats
    ("class_mean_all_grads_irs", "class", "mean", ALL_GRADS, True, 2.0, True),
    ("class_none_nograd", "class", "none", NO_GRADS, False, 30.0, True),
    ("prob_sum_weight_grad", "prob", "sum", [False, True, True], False, 0.7, False),
]


@pytest.mark.parametrize("sample", LCE_OPCHECK_SAMPLES, ids=[s[0] for s in LCE_OPCHECK_SAMPLES])
def test_opcheck_lce_fwd(sample):
    _, kind, reduction, mask, rg, softcap, irs = sample
    x, w, b = lce_args((5,), 4, 7)
    t = lce_class_target((5,), 7, "some") if kind == "class" else lce_prob_target((5,), 7)
    cw = make_weight(7)
    if rg:
        x, w, b = leaf(x), leaf(w), leaf(b)
    torch.library.opcheck(LCE_FWD, (x, w, b, t, cw, -100, reduction, 0.1, 1e-3, 2, mask, softcap, irs))


def test_opcheck_lce_bwd():
    x, w, b = lce_args((5,), 4, 7)
    t = lce_class_target((5,), 7, "some")
    cw = make_weight(7)
    torch.library.opcheck(LCE_BWD, (torch.randn(5), x, w, b, t, cw, -100, "none", 0.1, 1e-3, 2, ALL_GRADS, 2.0))
    torch.library.opcheck(LCE_BWD, (torch.tensor(0.7), x, w, None, lce_prob_target((5,), 7), None, -100, "mean", 0.0,
                                    0.5, 3, [True, True, False], 1.5))


# modules


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: f"lse{int(f[0])}_acc{int(f[1])}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_lce_module_matches_functional(reduction, flags):
    return_lse, return_accuracy = flags
    cw = make_weight(9)
    opts = dict(reduction=reduction, weight=cw, ignore_index=2, label_smoothing=0.1, z_loss=1e-3, chunk_size=3,
                softcap=2.0, return_lse=return_lse, return_accuracy=return_accuracy)
    m = LinearCrossEntropyLoss(4, 9, bias=True, **opts)
    with torch.no_grad():
        m.linear.weight.mul_(3.0)
    x = torch.randn(2, 5, 4)
    t = lce_class_target((2, 5), 9, "some", 2)
    xl = leaf(x)
    out = m(xl, t)
    loss, lse, acc = unpack(out, return_lse, return_accuracy)
    xf, wf, bf = leaf(x), leaf(m.linear.weight), leaf(m.linear.bias)
    out_f = linear_cross_entropy(xf, wf, t, linear_bias=bf, **opts)
    for a, b in zip(unpack(out, return_lse, return_accuracy), unpack(out_f, return_lse, return_accuracy)):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.detach(), b.detach(), equal_nan=True)
    # vs PyTorch
    xr, wr, br = leaf(x), leaf(m.linear.weight), leaf(m.linear.bias)
    yr = lce_ref(xr, wr, br, t, cw, 2.0, reduction=reduction, ignore_index=2, label_smoothing=0.1, z_loss=1e-3)
    assert_close(loss, yr.detach())
    logits = F.linear(x, m.linear.weight, m.linear.bias).detach()
    if return_lse:
        assert not lse.requires_grad
        assert_close(lse, torch.logsumexp(cap(logits, 2.0), -1))
    if return_accuracy:
        check_accuracy(acc, logits, t, 2, 2.0, -1, ambiguity=1e-4 * max(1.0, float(logits.abs().max())))
    g = torch.randn(loss.shape)
    got = torch.autograd.grad(loss, (xl, m.linear.weight, m.linear.bias), g)
    want = torch.autograd.grad(yr, (xr, wr, br), g)
    for name, a, e in zip(("input", "linear.weight", "linear.bias"), got, want):
        assert_close(a, e, msg=f"module grad of {name}")
    if reduction == "mean":
        out_items = m(x, t, num_items_in_batch=6)
        assert_close(unpack(out_items, return_lse, return_accuracy)[0].detach(),
                     lce_ref(x, m.linear.weight.detach(), m.linear.bias.detach(), t, cw, 2.0, num_items=6,
                             ignore_index=2, label_smoothing=0.1, z_loss=1e-3))


def test_lce_module_plain_output_with_softcap():
    m = LinearCrossEntropyLoss(4, 9, softcap=1.5)
    x = torch.randn(6, 4)
    t = lce_class_target((6,), 9)
    out = m(x, t)
    assert isinstance(out, torch.Tensor)
    assert_close(out.detach(), lce_ref(x, m.linear.weight.detach(), None, t, None, 1.5))
