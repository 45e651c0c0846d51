"""Tests of the fused triplet margin loss (every device): ``torch_ext.triplet_margin_loss``, the module
``torch_ext.TripletMarginLoss`` and the raw ops ``torch.ops.torch_ext.triplet_margin_loss_fwd``
/ ``triplet_margin_loss_bwd``.

The reference is always PyTorch itself: ``F.triplet_margin_loss`` (``nn.TripletMarginLoss``) with
eager autograd, and ``torch.triplet_margin_loss`` (the ATen op, which also takes margin <= 0)
for the raw op. Covered:

* forward and the anchor/positive/negative gradients for (D) and (N, D) inputs: N = 0, D = 1,
  odd D (1, 7, 33, 513) and D = 4096, a size above 100k elements (the parallel path);
* p in 1, 2, 3, 1.5, 0.5; eps 0 and 1e-6; margins; swap (with cases where swap changes the
  chosen negative); reductions mean/sum/none; float32, float64, bfloat16, float16;
* any subset of the three inputs requiring grad; random, stepped and stride-0 grad_output for
  reduction="none"; rows whose loss is clamped to 0 (gradient 0) and a row exactly at the hinge;
  identical anchor and positive with eps = 0; non-contiguous and expanded inputs;
* gradcheck (float64); torch.library.opcheck of both ops (retain_graph and double backward:
  tests/test_common.py); the raw ops (dist, the
  backward op and its output_mask); torch.compile (aot_eager, inductor); torch.autocast;
* the module (including the deprecated size_average/reduce); argument errors: p = 0 and p = inf
  (accepted by PyTorch, refused here: a documented limitation), shapes, ranks, reduction, margin.
"""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_ext import TripletMarginLoss, triplet_margin_loss
from utils import assert_close, check_reads_16_bit_under_autocast, default_device_type, leaf, reference_dtype

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
P_VALUES = (1.0, 2.0, 3.0, 1.5, 0.5)
NAMES = ("anchor", "positive", "negative")
FWD = torch.ops.torch_ext.triplet_margin_loss_fwd.default
BWD = torch.ops.torch_ext.triplet_margin_loss_bwd.default
NO_GRADS = [False, False, False]  # the forward op's grad_mask: no gradient formed
REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------


def reference(a, pos, neg, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean"):
    """PyTorch's triplet margin loss. F.triplet_margin_loss refuses margin <= 0; the ATen op it
    calls takes any margin, so that one is used for margin <= 0 (raw op tests)."""
    if margin > 0:
        return F.triplet_margin_loss(a, pos, neg, margin=margin, p=p, eps=eps, swap=swap, reduction=reduction)
    return torch.triplet_margin_loss(a, pos, neg, margin, p, eps, swap, REDUCTION_ENUM[reduction])


def ours(a, pos, neg, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean"):
    return triplet_margin_loss(a, pos, neg, margin=margin, p=p, eps=eps, swap=swap, reduction=reduction)


def raw(a, pos, neg, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean"):
    """The raw forward op (its autograd included); the loss only."""
    return FWD(a, pos, neg, float(margin), float(p), float(eps), swap, reduction, NO_GRADS)[0]


def plain(t, dtype=None):
    t = t.detach()
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def make_triplet(shape, dtype=torch.float32):
    """anchor, positive, negative of `shape`, with per-row distance scales drawn so that, for
    margin 1, some rows are clamped to 0 and others are not (distances grow like D**(1/p))."""
    batch = tuple(shape[:-1])
    a = torch.randn(shape)
    sp = torch.rand(batch + (1,)) + 0.25
    sn = torch.rand(batch + (1,)) + 0.25
    pos = a + sp * torch.randn(shape)
    neg = a + sn * torch.randn(shape)
    a, pos, neg = (v.to(dtype) for v in (a, pos, neg))
    # No difference component exactly 0 after rounding to dtype (bfloat16 often collides): there,
    # with eps = 0 and p < 1, |x|**(p-1) is infinite and the gradient is undefined.
    pos = torch.where(pos == a, pos + 0.5, pos)
    neg = torch.where((neg == a) | (neg == pos), neg - 0.75, neg)
    return a, pos, neg


def forward_backward(fn, tensors, wrt, grad, dtype=None):
    """y = fn(a, p, n) on fresh tensors (cast to dtype; leaves for the names in `wrt`) and the
    gradients for grad_output `grad` (tensor, "sum", or None). Returns y, [ga, gp, gn]."""
    args = [leaf(v, dtype) if name in wrt else plain(v, dtype) for name, v in zip(NAMES, tensors)]
    y = fn(*args)
    leaves = [v for name, v in zip(NAMES, args) if name in wrt]
    if not leaves or grad is None:
        return y, [None] * 3
    if isinstance(grad, str):
        assert grad == "sum"
        grads = list(torch.autograd.grad(y.sum(), leaves))
    else:
        g = grad if dtype is None or grad.dtype == dtype else grad.to(dtype)
        grads = list(torch.autograd.grad(y, leaves, g))
    return y, [grads.pop(0) if name in wrt else None for name in NAMES]


def check_against_pytorch(tensors, margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean", grad="random",
                          wrt=NAMES, fn=ours, equal_nan=False, msg=""):
    """Forward and gradients vs PyTorch's eager autograd (bfloat16: the float32 computation from
    the same bfloat16 values, see utils.reference_dtype). Returns y, [ga, gp, gn]."""
    dtype = tensors[0].dtype
    rdt = reference_dtype(dtype)
    if isinstance(grad, str) and grad == "random":
        out_shape = tensors[0].shape[:-1] if reduction == "none" else ()
        grad = torch.randn(out_shape).to(dtype)
    kw = dict(margin=margin, p=p, eps=eps, swap=swap, reduction=reduction)
    y, grads = forward_backward(lambda a, b, c: fn(a, b, c, **kw), tensors, wrt, grad)
    g_ref = grad.to(rdt) if isinstance(grad, torch.Tensor) else grad
    ref_y, ref_grads = forward_backward(lambda a, b, c: reference(a, b, c, **kw), tensors, wrt, g_ref, rdt)
    tag = f"{msg} {dtype_id(dtype)} shape={tuple(tensors[0].shape)} {kw}"
    assert y.dtype == dtype, f"{tag}: dtype {y.dtype}"
    assert_close(y, ref_y, dtype=dtype, equal_nan=equal_nan, msg=f"{tag}: output")
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close(got, want, dtype=dtype, equal_nan=equal_nan, msg=f"{tag}: grad_{name}")
    return y, grads


def hinge(tensors, margin=1.0, p=2.0, eps=1e-6, swap=False):
    """margin + d(a, p) - d(a, n) per row in float64 (before the clamp)."""
    a, pos, neg = (v.detach().double() for v in tensors)
    d_ap = F.pairwise_distance(a, pos, p, eps)
    d_an = F.pairwise_distance(a, neg, p, eps)
    if swap:
        d_an = torch.minimum(d_an, F.pairwise_distance(pos, neg, p, eps))
    return margin + d_ap - d_an


def away_from_kinks(n, d, p, eps, swap, margin=1.0):
    """float64 triplets for gradcheck: every row's hinge, the swap choice and every difference
    component stay away from the kinks of max(0, .), min(., .) and |.|**p."""
    for _ in range(200):
        a = torch.randn(n, d, dtype=torch.float64)
        step = lambda: (torch.rand(n, d, dtype=torch.float64) * 0.9 + 0.2) * torch.where(  # noqa: E731
            torch.rand(n, d) < 0.5, -1.0, 1.0).double() * (torch.rand(n, 1, dtype=torch.float64) + 0.5)
        pos = a + step()
        neg = a + step()
        h = hinge((a, pos, neg), margin, p, eps, swap)
        ok = (h.abs() > 2e-2).all() and ((pos - neg).abs() > 5e-2).all()
        if swap:
            gap = F.pairwise_distance(a, neg, p, eps) - F.pairwise_distance(pos, neg, p, eps)
            ok = ok and (gap.abs() > 2e-2).all()
        if ok and (h > 0).any():
            return a, pos, neg
    raise AssertionError("could not draw triplets away from the kinks")


# ----------------------------------------------------------------------------------------------
# 1. Forward and gradients vs PyTorch: shapes, reductions, dtypes
# ----------------------------------------------------------------------------------------------

# (D) and (N, D); the last one has > 100k elements (at::parallel_for's GRAIN_SIZE is 32768),
# as has test_large_rows' (40, 4096).
SHAPES = [(1,), (7,), (33,), (513,), (4096,), (1, 1), (6, 1), (4, 7), (9, 33), (3, 513), (5, 4096), (3001, 37)]
assert math.prod(SHAPES[-1]) > 100_000


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_pytorch(reduction, dtype, shape):
    tensors = make_triplet(shape, dtype)
    y, _ = check_against_pytorch(tensors, reduction=reduction)
    assert y.shape == (shape[:-1] if reduction == "none" else ())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_large_rows(dtype):
    # Few long rows, > 100k elements in all: the parallel path over a row's elements (or rows).
    tensors = make_triplet((40, 4096), dtype)
    for reduction in REDUCTIONS:
        check_against_pytorch(tensors, reduction=reduction, swap=reduction == "sum")


@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_p_eps_swap(dtype, p, eps, swap):
    tensors = make_triplet((11, 33), dtype)
    check_against_pytorch(tensors, p=p, eps=eps, swap=swap, reduction="none")
    check_against_pytorch(tensors, p=p, eps=eps, swap=swap, reduction="mean")
    tensors = make_triplet((513,), dtype)
    check_against_pytorch(tensors, p=p, eps=eps, swap=swap, reduction="sum")


@pytest.mark.parametrize("shape", [(6, 4096), (1, 7), (7,)], ids=["6x4096", "1x7", "7"])
@pytest.mark.parametrize("p", P_VALUES)
def test_p_values_large_and_small_d(p, shape):
    for dtype in DTYPES:
        check_against_pytorch(make_triplet(shape, dtype), p=p, reduction="none" if len(shape) == 2 else "mean")


@pytest.mark.parametrize("margin", [0.1, 0.5, 2.5, 100.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_margins(dtype, margin):
    tensors = make_triplet((9, 7), dtype)
    for reduction in REDUCTIONS:
        check_against_pytorch(tensors, margin=margin, reduction=reduction, swap=reduction == "sum")


@pytest.mark.parametrize("margin", [0.0, -0.5, -50.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_raw_op_margin_zero_and_negative(dtype, margin):
    # F.triplet_margin_loss refuses margin <= 0 (and so does torch_ext.triplet_margin_loss, see
    # test_margin_not_positive_raises_like_pytorch); the raw op computes it like the ATen op.
    tensors = make_triplet((12, 7), dtype)
    for reduction in REDUCTIONS:
        check_against_pytorch(tensors, margin=margin, reduction=reduction, fn=raw)
    y = raw(*tensors, margin=margin, reduction="none")
    below = hinge(tensors, margin=margin) < 0
    assert below.any()
    assert torch.equal(y[below], torch.zeros_like(y[below]))


@pytest.mark.parametrize("shape", [(0, 7), (0, 1), (0, 4096)], ids=["0x7", "0x1", "0x4096"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction, dtype, shape):
    tensors = make_triplet(shape, dtype)
    y, grads = check_against_pytorch(tensors, reduction=reduction, equal_nan=True)
    if reduction == "mean":
        assert y.shape == () and torch.isnan(y)
    elif reduction == "sum":
        assert y.shape == () and y.item() == 0
    else:
        assert y.shape == (0,)
    for g in grads:
        assert g.shape == shape


# ----------------------------------------------------------------------------------------------
# 2. swap
# ----------------------------------------------------------------------------------------------


def _swap_matters(dtype, n=16, d=9):
    """Triplets where, in some rows, the negative is nearer the positive than the anchor (so swap
    picks d(p, n)) and in others not; and every row's hinge is positive with swap."""
    a = torch.randn(n, d)
    pos = a + 1.5 * torch.randn(n, d)
    near_pos = torch.arange(n) % 2 == 0
    neg = torch.where(near_pos[:, None], pos + 0.3 * torch.randn(n, d), a + 2.0 * torch.randn(n, d))
    return tuple(v.to(dtype) for v in (a, pos, neg)), near_pos


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_swap_changes_the_negative(reduction, dtype, p):
    tensors, near_pos = _swap_matters(dtype)
    a, pos, neg = (v.double() for v in tensors)
    swapped = F.pairwise_distance(pos, neg, p, 1e-6) < F.pairwise_distance(a, neg, p, 1e-6)
    assert swapped.any() and not swapped.all()
    y_swap, g_swap = check_against_pytorch(tensors, p=p, swap=True, reduction=reduction, margin=5.0)
    y_plain, g_plain = check_against_pytorch(tensors, p=p, swap=False, reduction=reduction, margin=5.0)
    assert not torch.equal(y_swap, y_plain)
    # With swap, the positive's gradient includes d(p, n)'s term in the swapped rows.
    assert not torch.equal(g_swap[1], g_plain[1])


def test_swap_uses_positive_negative_distance_exactly():
    # Small integers (exact distances, p = 1, eps = 0): d(a,p) = 3, d(a,n) = 5, d(p,n) = 2;
    # margin 4: no swap -> 4 + 3 - 5 = 2; swap -> 4 + 3 - min(5, 2) = 5.
    a = torch.tensor([[0.0, 0.0]])
    pos = torch.tensor([[3.0, 0.0]])
    neg = torch.tensor([[4.0, 1.0]])
    y_plain = ours(a, pos, neg, margin=4.0, p=1.0, eps=0.0, reduction="none")
    y_swap = ours(a, pos, neg, margin=4.0, p=1.0, eps=0.0, swap=True, reduction="none")
    assert y_plain.tolist() == [2.0]
    assert y_swap.tolist() == [5.0]
    for swap, y in ((False, y_plain), (True, y_swap)):
        assert_close(y, reference(a, pos, neg, 4.0, 1.0, 0.0, swap, "none"))


# ----------------------------------------------------------------------------------------------
# 3. Which inputs require grad; grad_output layouts; clamped rows
# ----------------------------------------------------------------------------------------------

SUBSETS = [s for r in (0, 1, 2, 3) for s in itertools.combinations(NAMES, r)]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s) or "none")
@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_requires_grad_subsets(reduction, swap, subset):
    tensors = away_from_kinks(5, 6, 2.0, 1e-6, swap, margin=1.0)
    named = dict(zip(NAMES, (v.clone() for v in tensors)))
    for name in subset:
        named[name].requires_grad_()
    y = ours(*named.values(), swap=swap, reduction=reduction)
    if not subset:
        assert not y.requires_grad
        assert_close(y, reference(*tensors, swap=swap, reduction=reduction))
        return
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g)
    ref = {k: v.detach().clone().requires_grad_(k in subset) for k, v in named.items()}
    reference(*ref.values(), swap=swap, reduction=reduction).backward(g)
    for name, v in named.items():
        if name in subset:
            assert v.grad is not None, name
            assert_close(v.grad, ref[name].grad, msg=name)
        else:
            assert v.grad is None, f"{name} does not require grad but got a gradient"
    required = [named[n] for n in subset]

    def fn(*args):
        vals = dict(named)
        vals.update(zip(subset, args))
        return ours(*vals.values(), swap=swap, reduction=reduction)

    assert torch.autograd.gradcheck(fn, required)


def _grad_layout(name, n, dtype):
    c = lambda v: v.to(dtype)  # noqa: E731
    if name == "random":
        return c(torch.randn(n))
    if name == "stepped":
        return c(torch.randn(3 * n))[::3]
    if name == "expanded":  # one value, stride 0
        return c(torch.randn(1)).expand(n)
    if name == "from_sum":
        return "sum"
    if name == "zeros":
        return torch.zeros(n, dtype=dtype)
    raise AssertionError(name)


@pytest.mark.parametrize("layout", ["random", "stepped", "expanded", "from_sum", "zeros"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
def test_grad_output_layouts(swap, dtype, layout):
    tensors = make_triplet((13, 33), dtype)
    grad = _grad_layout(layout, 13, dtype)
    if isinstance(grad, torch.Tensor) and layout in ("stepped", "expanded"):
        assert not grad.is_contiguous()
    check_against_pytorch(tensors, swap=swap, reduction="none", grad=grad, msg=layout)


def test_grad_output_of_1d_input_is_0d():
    tensors = make_triplet((33,))
    y, _ = check_against_pytorch(tensors, reduction="none", grad=torch.tensor(-1.75))
    assert y.shape == ()


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_clamped_rows_have_zero_gradient(dtype, p):
    # Half of the rows have a negative far away: margin + d(a,p) - d(a,n) < 0, the loss is
    # clamped to exactly 0 and so are those rows' gradients (of all three inputs).
    n, d = 10, 17
    a = torch.randn(n, d)
    pos = a + 0.2 * torch.randn(n, d)
    neg = a + torch.where((torch.arange(n) % 2 == 0)[:, None], 20.0, 0.1) * torch.randn(n, d)
    tensors = tuple(v.to(dtype) for v in (a, pos, neg))
    clamped = hinge(tensors, p=p) < 0
    assert clamped.sum() == n // 2 and (hinge(tensors, p=p)[~clamped] > 0).all()
    y, grads = check_against_pytorch(tensors, p=p, reduction="none")
    assert torch.equal(y[clamped], torch.zeros_like(y[clamped]))
    assert (y[~clamped] > 0).all()
    for name, g in zip(NAMES, grads):
        assert torch.equal(g[clamped], torch.zeros_like(g[clamped])), f"grad_{name} of clamped rows"
        assert (g[~clamped] != 0).any(), f"grad_{name} of unclamped rows"
    _, grads = check_against_pytorch(tensors, p=p, reduction="mean")
    for g in grads:
        assert torch.equal(g[clamped], torch.zeros_like(g[clamped]))


def test_all_rows_clamped():
    a = torch.randn(6, 5)
    tensors = (a, a + 0.01, a + 100.0)
    y, grads = check_against_pytorch(tensors, reduction="mean")
    assert y.item() == 0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
def test_row_exactly_at_the_hinge(swap):
    # margin + d(a,p) - d(a,n) == 0 exactly (p = 1, eps = 0, small integers): the loss is 0 and
    # torch_ext passes the gradient through at the boundary, as clamp_min's backward does in
    # torch 2.13 (x >= min). torch 2.14's F.triplet_margin_loss gives 0 there instead: both are
    # subgradients, so row 0 is checked against the one-sided gradient, not the installed torch.
    a = torch.tensor([[0.0], [0.0]])
    pos = torch.tensor([[1.0], [1.0]])
    neg = torch.tensor([[-2.0], [-3.0]])  # row 0: 1 + 1 - 2 = 0; row 1: 1 + 1 - 3 < 0
    assert hinge((a, pos, neg), 1.0, 1.0, 0.0, swap).tolist() == [0.0, -1.0]
    leaves = [leaf(t) for t in (a, pos, neg)]
    y = ours(*leaves, margin=1.0, p=1.0, eps=0.0, swap=swap, reduction="none")
    assert y.tolist() == [0.0, 0.0]
    grads = torch.autograd.grad(y, leaves, torch.ones(2))
    # Row 0, active side: d/da (|a - p| - |a - n|) = sign(a - p) - sign(a - n) = -1 - 1; d/dp = 1;
    # d/dn = sign(a - n) = 1 (swap keeps d(a, n) = 2 < d(p, n) = 3). Row 1 is clamped: 0.
    assert [g[0].item() for g in grads] == [-2.0, 1.0, 1.0]
    assert [g[1].item() for g in grads] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 0.5])
def test_identical_anchor_and_positive_eps_zero(p):
    # d(a, p) = 0 exactly with eps = 0: the norm's gradient at 0 is 0 in PyTorch (not NaN).
    a = torch.randn(4, 9, dtype=torch.float64)
    pos = a.clone()
    neg = a + 0.3 * torch.randn(4, 9, dtype=torch.float64)
    margin = 100.0 if p == 0.5 else 5.0
    _, grads = check_against_pytorch((a, pos, neg), margin=margin, p=p, eps=0.0, reduction="sum", equal_nan=True)
    assert torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()
    # And the three the same tensor: every distance 0, loss = margin.
    y, _ = check_against_pytorch((a, a, a), margin=margin, p=p, eps=0.0, reduction="none", equal_nan=True)
    assert torch.equal(y, torch.full_like(y, margin))


# ----------------------------------------------------------------------------------------------
# 4. Non-contiguous inputs
# ----------------------------------------------------------------------------------------------


def _layout_case(name, dtype):
    c = lambda v: v.to(dtype)  # noqa: E731
    a, pos, neg = make_triplet((8, 33), dtype)
    if name == "anchor_transposed":
        a = c(torch.randn(33, 8)).t()
    elif name == "positive_stepped_columns":
        pos = c(1.3 * torch.randn(8, 66))[:, ::2]
    elif name == "negative_stepped_rows":
        neg = c(torch.randn(24, 33))[::3]
    elif name == "anchor_expanded":  # one anchor for all rows (stride 0)
        a = c(torch.randn(33)).expand(8, 33)
    elif name == "negative_column_expanded":  # strides (1, 0)
        neg = c(torch.randn(8, 1)).expand(8, 33)
    elif name == "all_transposed":
        a, pos, neg = (c(torch.randn(33, 8) * s).t() for s in (1.0, 1.5, 2.0))
    elif name == "1d_stepped":
        a, pos, neg = (c(torch.randn(99) * s)[::3] for s in (1.0, 0.5, 1.0))
    elif name == "large_transposed":
        a, pos, neg = (c(torch.randn(4096, 30) * s).t() for s in (1.0, 1.0, 1.2))
    else:
        raise AssertionError(name)
    return a, pos, neg


LAYOUT_CASES = ["anchor_transposed", "positive_stepped_columns", "negative_stepped_rows", "anchor_expanded",
                "negative_column_expanded", "all_transposed", "1d_stepped", "large_transposed"]


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
def test_noncontiguous(swap, dtype, case):
    tensors = _layout_case(case, dtype)
    assert not all(v.is_contiguous() for v in tensors)
    for reduction in ("none",) if case == "large_transposed" else REDUCTIONS:
        check_against_pytorch(tensors, swap=swap, reduction=reduction, p=1.5 if swap else 2.0, msg=case)


def test_same_tensor_twice():
    # The same tensor passed as anchor and negative: gradients of both paths accumulate.
    a, pos, _ = make_triplet((5, 7))
    al, pl = leaf(a), leaf(pos)
    y = ours(al, pl, al * 1.0 + 0.5, swap=True)
    y.backward()
    ar, pr = leaf(a), leaf(pos)
    reference(ar, pr, ar * 1.0 + 0.5, swap=True).backward()
    assert_close(al.grad, ar.grad)
    assert_close(pl.grad, pr.grad)


# ----------------------------------------------------------------------------------------------
# 5. gradcheck (retain_graph, double backward: tests/test_common.py)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("p", P_VALUES)
def test_gradcheck(p, eps, swap, reduction):
    tensors = [v.requires_grad_() for v in away_from_kinks(4, 5, p, eps, swap)]
    assert torch.autograd.gradcheck(lambda a, b, c: ours(a, b, c, 1.0, p, eps, swap, reduction=reduction), tensors)


@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
def test_gradcheck_1d_and_raw_op(swap):
    a, pos, neg = away_from_kinks(1, 6, 2.0, 1e-6, swap)
    tensors = [v[0].clone().requires_grad_() for v in (a, pos, neg)]
    assert torch.autograd.gradcheck(lambda x, y, z: ours(x, y, z, swap=swap, reduction="none"), tensors)
    tensors = [v.requires_grad_() for v in away_from_kinks(3, 4, 3.0, 1e-6, swap)]
    assert torch.autograd.gradcheck(lambda x, y, z: raw(x, y, z, 0.5, 3.0, 1e-6, swap, "sum"), tensors)


# ----------------------------------------------------------------------------------------------
# 6. Raw ops: dist, backward op, opcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fwd_op_dist(dtype, p, swap):
    tensors = make_triplet((6, 33), dtype)
    loss, dist, *_ = FWD(*tensors, 1.0, p, 1e-6, swap, "none", NO_GRADS)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert dist.dtype == acc
    assert dist.shape == (6, 3)
    a, pos, neg = (v.to(acc) for v in tensors)
    assert_close(dist[:, 0], F.pairwise_distance(a, pos, p, 1e-6), msg="d(a, p)")
    assert_close(dist[:, 1], F.pairwise_distance(a, neg, p, 1e-6), msg="d(a, n)")
    if swap:
        assert_close(dist[:, 2], F.pairwise_distance(pos, neg, p, 1e-6), msg="d(p, n)")
    assert_close(loss, reference(a, pos, neg, 1.0, p, 1e-6, swap, "none"), dtype=dtype)
    # 1-D input: one row.
    loss, dist, *_ = FWD(*(v[0] for v in tensors), 1.0, p, 1e-6, swap, "none", NO_GRADS)
    assert loss.shape == () and dist.numel() == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("swap", [False, True], ids=["noswap", "swap"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bwd_op_matches_autograd(reduction, swap, dtype):
    tensors = make_triplet((7, 13), dtype)
    p, eps, margin = 1.5, 1e-6, 1.0
    loss, dist, *_ = FWD(*tensors, margin, p, eps, swap, reduction, NO_GRADS)
    g = torch.randn(loss.shape).to(dtype)
    rdt = reference_dtype(dtype)
    _, ref = forward_backward(lambda a, b, c: reference(a, b, c, margin, p, eps, swap, reduction), tensors, NAMES,
                              g.to(rdt), rdt)
    got = BWD(g, *tensors, dist, margin, p, eps, swap, reduction, [True, True, True])
    for name, a, r in zip(NAMES, got, ref):
        assert_close(a, r, dtype=dtype, msg=name)
    for mask in itertools.product([False, True], repeat=3):
        got = BWD(g, *tensors, dist, margin, p, eps, swap, reduction, list(mask))
        for name, want, a, r in zip(NAMES, mask, got, ref):
            if want:
                assert_close(a, r, dtype=dtype, msg=f"{name} with mask {mask}")
            else:
                assert a is None, f"{name} not requested but got {a}"


OPCHECK_SAMPLES = [
    # id, shape, p, eps, swap, reduction
    ("2d_p2_mean", (5, 7), 2.0, 1e-6, False, "mean"),
    ("2d_p1_swap_sum", (5, 7), 1.0, 0.0, True, "sum"),
    ("2d_p1.5_none", (4, 9), 1.5, 1e-6, False, "none"),
    ("1d_p3_swap_none", (9,), 3.0, 1e-6, True, "none"),
    ("2d_p0.5_swap_mean", (3, 4), 0.5, 1e-6, True, "mean"),
    ("empty_sum", (0, 4), 2.0, 1e-6, False, "sum"),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=[s[0] for s in OPCHECK_SAMPLES])
def test_opcheck_fwd(sample, requires_grad):
    _, shape, p, eps, swap, reduction = sample
    tensors = make_triplet(shape)
    if requires_grad:
        tensors = tuple(leaf(v) for v in tensors)
    torch.library.opcheck(FWD, (*tensors, 1.0, p, eps, swap, reduction, NO_GRADS))


BWD_MASKS = [[True, True, True], [True, False, False], [False, True, True], [False, False, True]]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("mask", BWD_MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("sample", OPCHECK_SAMPLES[:5], ids=[s[0] for s in OPCHECK_SAMPLES[:5]])
def test_opcheck_bwd(sample, mask, requires_grad):
    _, shape, p, eps, swap, reduction = sample
    tensors = make_triplet(shape)
    loss, dist, *_ = FWD(*tensors, 1.0, p, eps, swap, reduction, NO_GRADS)
    g = torch.randn(loss.shape)
    if not requires_grad:
        torch.library.opcheck(BWD, (g, *tensors, dist, 1.0, p, eps, swap, reduction, mask))
        return
    # The backward op is differentiable once, by design (no double backward): every opcheck utility
    # runs except the one that differentiates through it, which must fail with the op's message.
    g = leaf(g)
    tensors = tuple(leaf(v) for v in tensors)
    args = (g, *tensors, dist, 1.0, p, eps, swap, reduction, mask)
    torch.library.opcheck(BWD, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="does not support double backward"):
        torch.library.opcheck(BWD, args, test_utils="test_aot_dispatch_dynamic")


# ----------------------------------------------------------------------------------------------
# 7. torch.compile
# ----------------------------------------------------------------------------------------------


def _losses(fn, a, pos, neg):
    return (
        fn(a, pos, neg)
        + fn(a, pos, neg, margin=0.5, p=1.0, eps=0.0, swap=True, reduction="sum")
        + fn(a, pos, neg, p=1.5, reduction="none").mul(torch.arange(a.shape[0], dtype=a.dtype)).sum()
        + fn(a[0], pos[0], neg[0], p=3.0, swap=True)
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(dynamo_reset, backend):
    compiled = torch.compile(lambda a, b, c: _losses(triplet_margin_loss, a, b, c), fullgraph=True, backend=backend)
    tensors = make_triplet((6, 9))
    results = []
    for fn in (lambda a, b, c: _losses(triplet_margin_loss, a, b, c), compiled,
               lambda a, b, c: _losses(F.triplet_margin_loss, a, b, c)):
        y, grads = forward_backward(fn, tensors, NAMES, "sum")
        results.append((y.detach(), grads))
    (y, g), (yc, gc), (yr, gr) = results
    assert_close(yc, y, msg="compiled output")
    assert_close(y, yr, msg="eager vs PyTorch")
    for name, a, b, r in zip(NAMES, gc, g, gr):
        assert_close(a, b, msg=f"compiled grad_{name}")
        assert_close(b, r, msg=f"eager grad_{name} vs PyTorch")


def test_compile_no_graph_breaks(dynamo_reset):
    module = TripletMarginLoss(margin=0.5, p=1.5, swap=True)

    def fn(a, b, c):
        return _losses(triplet_margin_loss, a, b, c) + module(a, b, c)

    explanation = torch._dynamo.explain(fn)(*make_triplet((4, 5)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_dynamic_shapes(dynamo_reset):
    compiled = torch.compile(lambda a, b, c: triplet_margin_loss(a, b, c, swap=True), fullgraph=True,
                             backend="aot_eager", dynamic=True)
    for i, n in enumerate((3, 5, 12)):
        tensors = make_triplet((n, 7))
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            y, grads = forward_backward(compiled, tensors, NAMES, "sum")
        yr, ref = forward_backward(lambda a, b, c: F.triplet_margin_loss(a, b, c, swap=True), tensors, NAMES, "sum")
        assert_close(y, yr, msg=str(n))
        for a, r in zip(grads, ref):
            assert_close(a, r, msg=str(n))


# ----------------------------------------------------------------------------------------------
# 8. autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16,) * 3,
                                    (torch.float32, torch.bfloat16, torch.float32)], ids=["f32", "bf16", "mixed"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bfloat16_computes_in_float32(reduction, dtypes):
    tensors = [v.to(dt) for v, dt in zip(make_triplet((6, 17)), dtypes)]
    ours_leaves = [leaf(v) for v in tensors]
    ref_leaves = [leaf(v) for v in tensors]
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = ours(*ours_leaves, swap=True, reduction=reduction)
        y_ref = reference(*ref_leaves, swap=True, reduction=reduction)
    assert y_ref.dtype == torch.float32
    assert y.dtype == torch.float32
    assert_close(y, y_ref, msg="autocast output")
    g = torch.randn(y.shape)
    y.backward(g)
    y_ref.backward(g)
    for name, a, r, dt in zip(NAMES, ours_leaves, ref_leaves, dtypes):
        assert a.grad.dtype == dt, name
        assert_close(a.grad, r.grad, dtype=dt, msg=f"autocast grad_{name}")


@pytest.mark.parametrize("path", ["eager", "no_grad", "compiled"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_reads_16_bit_inputs_as_they_are(dynamo_reset, reduction, path):
    # Under bf16 autocast, three bfloat16 inputs reach the kernel as they are, not as float32
    # copies: the op gets them with loss_dtype float32; the loss is F.triplet_margin_loss's (float32
    # from the same values) and the gradients, formed in bfloat16, eager's within a bfloat16 ulp.
    tensors = [v.bfloat16() for v in make_triplet((6, 17))]
    ours_leaves = [leaf(v) for v in tensors]
    ref_leaves = [leaf(v) for v in tensors]
    check_reads_16_bit_under_autocast("triplet_margin_loss_fwd", 9, path, ours, reference, ours_leaves, ref_leaves,
                                      ours_leaves, ref_leaves, swap=True, reduction=reduction)


# ----------------------------------------------------------------------------------------------
# 9. The module
# ----------------------------------------------------------------------------------------------

MODULE_CASES = [
    {},
    {"margin": 0.5, "p": 1.0, "swap": True},
    {"margin": 2.0, "p": 3.0, "eps": 0.0, "reduction": "sum"},
    {"p": 1.5, "reduction": "none"},
    {"p": 0.5, "swap": True, "reduction": "none"},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kwargs", MODULE_CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_module_matches_torch_nn(kwargs, dtype):
    mod, ref_mod = TripletMarginLoss(**kwargs), nn.TripletMarginLoss(**kwargs)
    assert isinstance(mod, nn.Module)
    for attr in ("margin", "p", "eps", "swap", "reduction"):
        assert getattr(mod, attr) == getattr(ref_mod, attr), attr
    assert list(mod.state_dict().keys()) == []
    tensors = make_triplet((8, 11), dtype)
    rdt = reference_dtype(dtype)
    y, grads = forward_backward(mod, tensors, NAMES, "sum")
    y_ref, ref = forward_backward(ref_mod, tensors, NAMES, "sum", rdt)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype=dtype)
    for name, a, r in zip(NAMES, grads, ref):
        assert_close(a, r, dtype=dtype, msg=name)


def test_module_positional_arguments_like_torch_nn():
    tensors = make_triplet((5, 6))
    args = (0.5, 1.0, 1e-6, True, None, None, "sum")
    assert_close(TripletMarginLoss(*args)(*tensors), nn.TripletMarginLoss(*args)(*tensors))
    fargs = (0.5, 1.0, 0.0, True, None, None, "none")
    assert_close(triplet_margin_loss(*tensors, *fargs), F.triplet_margin_loss(*tensors, *fargs))


LEGACY = [(None, False), (False, None), (True, None), (False, False), (True, True), (False, True), (None, True)]


@pytest.mark.parametrize("size_average,reduce", LEGACY)
def test_deprecated_size_average_reduce(size_average, reduce):
    tensors = make_triplet((6, 5))
    with warnings.catch_warnings(record=True) as rec_ref:
        warnings.simplefilter("always")
        ref_mod = nn.TripletMarginLoss(size_average=size_average, reduce=reduce)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mod = TripletMarginLoss(size_average=size_average, reduce=reduce)
    assert mod.reduction == ref_mod.reduction
    assert any("deprecated" in str(w.message) for w in rec) == any("deprecated" in str(w.message) for w in rec_ref)
    assert_close(mod(*tensors), ref_mod(*tensors))
    # The functional, with reduction given too (the legacy arguments win, as in PyTorch).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = triplet_margin_loss(*tensors, size_average=size_average, reduce=reduce, reduction="sum")
        y_ref = F.triplet_margin_loss(*tensors, size_average=size_average, reduce=reduce, reduction="sum")
    assert y.shape == y_ref.shape
    assert_close(y, y_ref)


# ----------------------------------------------------------------------------------------------
# 10. Argument errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, float("inf"), -1.0, float("nan"), -float("inf")],
                         ids=["0", "inf", "-1", "nan", "-inf"])
def test_p_not_positive_finite_raises(p):
    # PyTorch accepts p = 0 and p = inf (and more); torch_ext refuses any p that is not a positive
    # finite number with a ValueError naming p: a documented limitation.
    tensors = make_triplet((4, 5))
    with pytest.raises(ValueError, match=r"\bp\b"):
        triplet_margin_loss(*tensors, p=p)
    with pytest.raises(ValueError, match=r"\bp\b"):
        TripletMarginLoss(p=p)(*tensors)
    with pytest.raises((ValueError, RuntimeError), match=r"\bp\b"):
        FWD(*tensors, 1.0, p, 1e-6, False, "mean", NO_GRADS)


@pytest.mark.parametrize("margin", [0.0, -1.0])
def test_margin_not_positive_raises_like_pytorch(margin):
    tensors = make_triplet((4, 5))
    with pytest.raises(ValueError, match="margin"):
        F.triplet_margin_loss(*tensors, margin=margin)
    with pytest.raises(ValueError, match="margin"):
        triplet_margin_loss(*tensors, margin=margin)
    with pytest.raises(ValueError, match="margin"):
        nn.TripletMarginLoss(margin=margin)
    with pytest.raises(ValueError, match="margin"):
        TripletMarginLoss(margin=margin)


def _error_cases():
    a, pos, neg = make_triplet((4, 5))
    return {
        # name: (anchor, positive, negative, kwargs, exceptions, message regex)
        "negative_other_d": (a, pos, torch.randn(4, 6), {}, RuntimeError, r"negative|shape|size"),
        "positive_other_n": (a, torch.randn(3, 5), neg, {}, RuntimeError, r"positive|shape|size"),
        "negative_1d_others_2d": (a, pos, torch.randn(5), {}, RuntimeError, r"negative|dim|shape"),
        "anchor_1d_others_2d": (torch.randn(5), pos, neg, {}, RuntimeError, r"anchor|dim|shape"),
        "all_0d": (torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), {}, RuntimeError,
                   r"0-D|\(D\)|\(N, D\)|dim"),
        "all_3d": (torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 5), {}, RuntimeError,
                   r"3-D|\(D\)|\(N, D\)|dim"),
        "unknown_reduction": (a, pos, neg, {"reduction": "avg"}, ValueError, r"reduction|avg"),
        "integer": (a.long(), pos.long(), neg.long(), {}, (RuntimeError, ValueError, TypeError),
                    r"dtype|Long|int64|float"),
    }


ERROR_CASES = list(_error_cases().keys())


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_arguments(case, requires_grad):
    a, pos, neg, kwargs, exc, match = _error_cases()[case]
    if requires_grad and a.is_floating_point():
        a, pos, neg = leaf(a), leaf(pos), leaf(neg)
    with pytest.raises(exc, match=match):
        triplet_margin_loss(a, pos, neg, **kwargs)
    with pytest.raises(exc, match=match):
        TripletMarginLoss(**kwargs)(a, pos, neg)


@pytest.mark.parametrize("case", [c for c in ERROR_CASES if c not in ("integer", "unknown_reduction")])
def test_raw_op_bad_shapes(case):
    a, pos, neg, _, exc, match = _error_cases()[case]
    with pytest.raises(exc, match=match):
        FWD(a, pos, neg, 1.0, 2.0, 1e-6, False, "mean", NO_GRADS)


def test_raw_op_bad_strings_and_dist():
    a, pos, neg = make_triplet((4, 5))
    with pytest.raises(ValueError, match="reduction"):
        FWD(a, pos, neg, 1.0, 2.0, 1e-6, False, "avg", NO_GRADS)
    loss, dist, *_ = FWD(a, pos, neg, 1.0, 2.0, 1e-6, False, "none", NO_GRADS)
    g = torch.randn(4)
    with pytest.raises((RuntimeError, ValueError), match="dist"):
        BWD(g, a, pos, neg, dist[:3], 1.0, 2.0, 1e-6, False, "none", [True, True, True])
    with pytest.raises((RuntimeError, ValueError), match="grad"):
        BWD(torch.randn(5), a, pos, neg, dist, 1.0, 2.0, 1e-6, False, "none", [True, True, True])


def test_mixed_float_dtypes_like_pytorch():
    # PyTorch promotes mixed floating dtypes; torch_ext must give PyTorch's result (dtype and
    # value) or refuse with a clear message about the dtypes.
    a, pos, neg = make_triplet((4, 5))
    for args in ((a, pos, neg.double()), (a.bfloat16(), pos, neg), (a.double(), pos.double(), neg)):
        ref = F.triplet_margin_loss(*args)
        try:
            y = triplet_margin_loss(*args)
        except (RuntimeError, ValueError, TypeError) as err:
            assert "dtype" in str(err) or "Float" in str(err) or "float" in str(err), str(err)
            continue
        assert y.dtype == ref.dtype, f"{[v.dtype for v in args]}: result {y.dtype}, PyTorch {ref.dtype}"
        assert_close(y, ref, dtype=torch.bfloat16, check_dtype=False)


# ----------------------------------------------------------------------------------------------
# The forward op that also forms the gradients (the eager path when an input requires grad)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("swap", (False, True))
@pytest.mark.parametrize("p", (1.0, 2.0, 3.0))
@pytest.mark.parametrize("mask", ([True, False, False], [True, True, True], [False, True, False]))
def test_fwd_grad_mask_equals_fwd_and_bwd_ops(reduction, swap, p, mask):
    a, pos, neg = make_triplet((6, 11))
    loss, dist, *grads = FWD(a, pos, neg, 0.7, p, 1e-6, swap, reduction, mask)
    ref_loss, ref_dist, *_ = FWD(a, pos, neg, 0.7, p, 1e-6, swap, reduction, NO_GRADS)
    assert torch.equal(loss, ref_loss) and torch.equal(dist, ref_dist)
    ones = torch.ones(ref_loss.shape)
    ref_grads = BWD(ones, a, pos, neg, ref_dist, 0.7, p, 1e-6, swap, reduction, mask)
    for got, want, m in zip(grads, ref_grads, mask):
        assert (got.shape == want.shape) if m else got is None
        if m:
            assert torch.equal(got, want)  # the same row routine, so the same bits


@pytest.mark.parametrize("shape", ((5, 7), (7,), (0, 4)))
def test_opcheck_fwd_grad_mask(shape):
    a, pos, neg = make_triplet(shape)
    for mask in ([True, False, True], [False, True, False]):
        # "sum": the mean of no rows is NaN, which opcheck's comparison does not accept
        torch.library.opcheck(FWD, (a, pos, neg, 1.0, 2.0, 1e-6, True, "sum", mask))
    # with inputs that require grad: the forward's gradients handed over through its autograd
    a, pos, neg = (leaf(v) for v in make_triplet(shape))
    torch.library.opcheck(FWD, (a, pos, neg, 1.0, 2.0, 1e-6, False, "sum", [True, True, False]))


def test_gradient_formed_in_forward_handed_over_once():
    # The first backward returns the forward's gradients (scaled by grad_output); a retained
    # graph's later backward recomputes them, with the same bits; grad_output 1 skips the scaling.
    tensors = [leaf(v) for v in make_triplet((8, 5))]
    y = triplet_margin_loss(*tensors)
    g1 = torch.autograd.grad(y, tensors, retain_graph=True)
    g2 = torch.autograd.grad(y, tensors, torch.tensor(1.0), retain_graph=True)
    g3 = torch.autograd.grad(y, tensors, torch.tensor(-2.5))
    for a, b, c in zip(g1, g2, g3):
        assert torch.equal(a, b)
        assert_close(c, -2.5 * a)
