"""Tests of the fused regression losses (every device): ``torch_ext.mse_loss``, ``huber_loss``,
``smooth_l1_loss``, the modules ``MSELoss``, ``HuberLoss``, ``SmoothL1Loss`` and the raw ops
``torch.ops.torch_ext.regression_loss_fwd`` / ``regression_loss_bwd``.

The reference is always PyTorch itself: ``F.mse_loss`` / ``F.huber_loss`` / ``F.smooth_l1_loss``
(and ``nn.MSELoss`` / ``nn.HuberLoss`` / ``nn.SmoothL1Loss``) with eager autograd. Covered:

* forward and the input/target gradients for every loss, reduction (mean/sum/none) and dtype
  (float32, float64, bfloat16 and float16 against float32 from the same 16-bit values);
* shapes: 0-D..4-D, sizes 1, 7, 17, 1000+ and one above 100k elements (the parallel path),
  empty tensors (mean is nan, sum 0);
* broadcasting input vs target both ways (with PyTorch's UserWarning) and the reduced gradients;
* delta/beta values (0.5, 1, 2.5; beta=0 is L1), elements exactly at |d| = delta/beta and at
  d = 0; the ``weight`` argument of mse/huber (torch 2.13 semantics);
* gradients w.r.t. input, target or both; random, non-contiguous and stride-0 grad_output for
  reduction="none"; non-contiguous (transposed, stepped, expanded) input/target;
* NaN/inf propagation; torch.autocast; gradcheck (float64) (retain_graph and double backward:
  tests/test_common.py);
* torch.library.opcheck of both ops; the raw backward op; torch.compile (aot_eager, inductor);
* the modules, including the deprecated size_average/reduce; argument errors.
"""
from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ext
from utils import assert_close, check_reads_16_bit_under_autocast, default_device_type, leaf, reference_dtype

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

LOSSES = ("mse", "huber", "smooth_l1")
WEIGHTED_LOSSES = ("mse", "huber")
REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FWD = torch.ops.torch_ext.regression_loss_fwd.default
BWD = torch.ops.torch_ext.regression_loss_bwd.default
NO_GRADS = [False, False]  # the forward op's grad_mask: no gradient formed
DEFAULT_PARAM = {"mse": 0.0, "huber": 1.0, "smooth_l1": 1.0}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------


def ours(loss, input, target, reduction="mean", param=None, weight=None):
    """The torch_ext loss; param is delta (huber) or beta (smooth_l1), ignored for mse."""
    if loss == "mse":
        return torch_ext.mse_loss(input, target, reduction=reduction, weight=weight)
    if loss == "huber":
        return torch_ext.huber_loss(input, target, reduction=reduction, delta=1.0 if param is None else param,
                                    weight=weight)
    assert weight is None
    return torch_ext.smooth_l1_loss(input, target, reduction=reduction, beta=1.0 if param is None else param)


def reference(loss, input, target, reduction="mean", param=None, weight=None):
    """PyTorch's own loss, same arguments as ``ours``."""
    if loss == "mse":
        return F.mse_loss(input, target, reduction=reduction, weight=weight)
    if loss == "huber":
        return F.huber_loss(input, target, reduction=reduction, delta=1.0 if param is None else param, weight=weight)
    assert weight is None
    return F.smooth_l1_loss(input, target, reduction=reduction, beta=1.0 if param is None else param)


def plain(t, dtype=None):
    t = t.detach()
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def forward_backward(fn, x, t, wrt, grad, dtype=None):
    """y = fn(input, target) on fresh tensors (cast to dtype; leaves for the names in `wrt`) and
    their gradients for grad_output `grad` (a tensor, "sum" for y.sum()'s stride-0 grad, or
    None for no backward). Returns y and [grad_input, grad_target] (None where not in wrt)."""
    xl = leaf(x, dtype) if "input" in wrt else plain(x, dtype)
    tl = leaf(t, dtype) if "target" in wrt else plain(t, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # broadcasting warning, tested on its own
        y = fn(xl, tl)
    leaves = [v for v, name in ((xl, "input"), (tl, "target")) if name in wrt]
    if not leaves or grad is None:
        return y, [None, None]
    if isinstance(grad, str):
        assert grad == "sum"
        grads = torch.autograd.grad(y.sum(), leaves)
    else:
        g = grad if dtype is None or grad.dtype == dtype else grad.to(dtype)
        grads = torch.autograd.grad(y, leaves, g)
    grads = list(grads)
    return y, [grads.pop(0) if "input" in wrt else None, grads.pop(0) if "target" in wrt else None]


def check_against_pytorch(loss, x, t, reduction="mean", param=None, weight=None, grad="random",
                          wrt=("input", "target"), equal_nan=False, msg=""):
    """Forward and gradients of the torch_ext loss vs PyTorch's with eager autograd. float32 and
    float64 are compared with PyTorch in the same dtype, bfloat16 with the float32 computation from
    the same bfloat16 values (see utils.reference_dtype). Returns (y, [grad_input, grad_target])."""
    dtype = x.dtype
    rdt = reference_dtype(dtype)
    if isinstance(grad, str) and grad == "random":
        out_shape = torch.broadcast_shapes(x.shape, t.shape) if reduction == "none" else ()
        grad = torch.randn(out_shape).to(dtype)
    y, grads = forward_backward(lambda a, b: ours(loss, a, b, reduction, param, weight), x, t, wrt, grad)
    w_ref = None if weight is None else weight.to(rdt)
    g_ref = grad.to(rdt) if isinstance(grad, torch.Tensor) else grad
    ref_y, ref_grads = forward_backward(lambda a, b: reference(loss, a, b, reduction, param, w_ref), x, t, wrt, g_ref,
                                        rdt)
    tag = f"{msg} {loss} {reduction} param={param} {dtype_id(dtype)} x{tuple(x.shape)} t{tuple(t.shape)}"
    assert_close(y, ref_y, dtype=dtype, equal_nan=equal_nan, msg=f"{tag}: output")
    for name, got, want in zip(("grad_input", "grad_target"), grads, ref_grads):
        if got is not None or want is not None:
            assert got is not None and want is not None, f"{tag}: {name} missing"
            assert got.shape == want.shape, f"{tag}: {name} shape {tuple(got.shape)} vs {tuple(want.shape)}"
        assert_close(got, want, dtype=dtype, equal_nan=equal_nan, msg=f"{tag}: {name}")
    return y, grads


def make_pair(shape, dtype=torch.float32, spread=2.0):
    """input, target with differences spread over both sides of delta/beta = 0.5..2.5."""
    x = (spread * torch.randn(shape)).to(dtype)
    t = torch.randn(shape).to(dtype)
    return x, t


def away_from_kinks(shape, param, loss, dtype=torch.float64, margin=0.05):
    """float64 input/target whose differences stay `margin` away from the kinks (|d| = param for
    huber/smooth_l1, d = 0 for L1), for gradcheck's finite differences."""
    t = torch.randn(shape, dtype=dtype)
    d = torch.empty(shape, dtype=dtype).uniform_(0.1, 3.0) * torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).to(dtype)
    if loss != "mse" and param > 0:
        near = (d.abs() - param).abs() < margin
        d = torch.where(near, d + margin * 2 * d.sign(), d)
    return t + d, t


# ----------------------------------------------------------------------------------------------
# 1. Forward and gradients vs PyTorch: shapes, reductions, dtypes
# ----------------------------------------------------------------------------------------------

# The last one has > 100k elements (at::parallel_for's GRAIN_SIZE is 32768): the parallel path.
SHAPES = [(), (1,), (7,), (17,), (3, 5), (2, 3, 7), (2, 3, 4, 5), (1031,), (33, 37), (257, 513)]
assert math.prod(SHAPES[-1]) > 100_000


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_pytorch(loss, reduction, dtype, shape, grad_in_forward):
    x, t = make_pair(shape, dtype)
    y, _ = check_against_pytorch(loss, x, t, reduction)
    assert y.dtype == dtype
    assert y.shape == (shape if reduction == "none" else ())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
def test_large_reduction_accuracy(loss, reduction):
    # A big float32 reduction (parallel partial sums) against a float64 reference: the fused sum
    # must be at least as accurate as float32 pairwise summation.
    x, t = make_pair((300_001,), torch.float32)
    y = ours(loss, x, t, reduction)
    exact = reference(loss, x.double(), t.double(), reduction)
    assert_close(y, exact.float(), rtol=1e-5, atol=0, msg="vs float64")


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4)], ids=["0", "0x3", "2x0x4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_empty(loss, reduction, dtype, shape, grad_in_forward):
    x, t = make_pair(shape, dtype)
    y, (gx, gt) = check_against_pytorch(loss, x, t, reduction, equal_nan=True)
    if reduction == "mean":
        assert y.shape == () and torch.isnan(y)
    elif reduction == "sum":
        assert y.shape == () and y.item() == 0
    else:
        assert y.shape == shape
    assert gx.shape == shape and gt.shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss", LOSSES)
def test_empty_weighted_or_param(loss, dtype):
    x, t = make_pair((0, 5), dtype)
    if loss in WEIGHTED_LOSSES:
        w = torch.rand(0, 5).to(dtype)
        for reduction in REDUCTIONS:
            check_against_pytorch(loss, x, t, reduction, weight=w, equal_nan=True, msg="empty weighted")
    else:
        for reduction in REDUCTIONS:
            check_against_pytorch(loss, x, t, reduction, param=0.0, equal_nan=True, msg="empty L1")


# ----------------------------------------------------------------------------------------------
# 2. delta / beta, the |d| = delta/beta boundary, beta = 0 (L1)
# ----------------------------------------------------------------------------------------------

PARAMS = {"huber": [0.5, 1.0, 2.5], "smooth_l1": [0.0, 0.5, 1.0, 2.5]}
PARAM_CASES = [(loss, p) for loss, ps in PARAMS.items() for p in ps]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,param", PARAM_CASES)
def test_param_values(loss, param, reduction, dtype):
    x, t = make_pair((6, 37), dtype)
    check_against_pytorch(loss, x, t, reduction, param)
    x, t = make_pair((2, 3, 5), dtype, spread=param + 0.5)
    check_against_pytorch(loss, x, t, reduction, param, grad="sum")


def _boundary_pair(param, dtype):
    """Differences exactly 0, +-param, and just inside/outside it, all exact in every dtype."""
    t = torch.tensor([0.25, -0.5, 1.0, 0.0, -1.25, 0.75, 0.5, -0.25, 2.0, 0.0])
    d = torch.tensor([0.0, param, -param, param, -param, 0.5 * param, -0.5 * param,
                      param + 0.5, -(param + 0.5), 0.0])
    return (t + d).to(dtype), t.to(dtype), d


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss,param", PARAM_CASES)
def test_boundary_and_zero_difference(loss, param, dtype):
    x, t, d = _boundary_pair(param, dtype)
    assert torch.equal((x.double() - t.double()), d.double())  # the differences are exact
    g = torch.randn(d.shape).to(dtype)
    for reduction in REDUCTIONS:
        grad = g if reduction == "none" else torch.tensor(1.5, dtype=dtype)
        check_against_pytorch(loss, x, t, reduction, param, grad=grad, msg="boundary")
    # The derivative of the per-element loss, exactly (dyadic values): d / beta inside, +-1
    # outside (smooth_l1); d inside, +-delta outside (huber); sign(d), 0 at d = 0 (L1).
    _, (gx, gt) = forward_backward(lambda a, b: ours(loss, a, b, "none", param), x, t, ("input", "target"),
                                   torch.ones(d.shape, dtype=dtype))
    dd = d.double()
    if param == 0.0:
        expected = torch.sign(dd)
    elif loss == "smooth_l1":
        expected = torch.clamp(dd / param, -1.0, 1.0)
    else:
        expected = torch.clamp(dd, -param, param)
    assert torch.equal(gx.double(), expected), f"grad_input at the boundary: {gx.tolist()} vs {expected.tolist()}"
    assert torch.equal(gt.double(), -expected), f"grad_target at the boundary: {gt.tolist()}"
    if param == 0.0:
        assert gx[0].item() == 0 and gx[-1].item() == 0  # L1 at d = 0: gradient 0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_huber_delta_one_equals_smooth_l1_beta_one(reduction, dtype):
    x, t = make_pair((5, 9), dtype)
    assert_close(ours("huber", x, t, reduction, 1.0), ours("smooth_l1", x, t, reduction, 1.0), dtype=dtype)


@pytest.mark.parametrize("loss", ["huber", "smooth_l1"])
def test_default_param_is_one(loss):
    x, t = make_pair((4, 6))
    fn = torch_ext.huber_loss if loss == "huber" else torch_ext.smooth_l1_loss
    assert_close(fn(x, t), reference(loss, x, t, "mean", 1.0))
    assert_close(fn(x, t), ours(loss, x, t, "mean", 1.0))


# ----------------------------------------------------------------------------------------------
# 3. Broadcasting input vs target
# ----------------------------------------------------------------------------------------------

BROADCAST_CASES = [
    ((3, 4), (4,)),
    ((4,), (3, 4)),
    ((3, 1), (1, 4)),
    ((2, 3, 4), (3, 1)),
    ((3, 1), (2, 3, 4)),
    ((), (5,)),
    ((2, 5), ()),
    ((1, 1, 7), (3, 2, 1)),
]


@pytest.mark.parametrize("case", BROADCAST_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_broadcasting(loss, reduction, dtype, case, grad_in_forward):
    x_shape, t_shape = case
    x = (2 * torch.randn(x_shape)).to(dtype)
    t = torch.randn(t_shape).to(dtype)
    y, (gx, gt) = check_against_pytorch(loss, x, t, reduction, param=None if loss == "mse" else 0.5)
    assert y.shape == (torch.broadcast_shapes(x_shape, t_shape) if reduction == "none" else ())
    assert gx.shape == x_shape and gt.shape == t_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("loss", LOSSES)
def test_broadcasting_large(loss, dtype):
    # A 120k-element broadcast result: the parallel path, and large reduced gradients.
    x = (2 * torch.randn(400, 1)).to(dtype)
    t = torch.randn(1, 300).to(dtype)
    for reduction in REDUCTIONS:
        check_against_pytorch(loss, x, t, reduction, param=None if loss == "mse" else 0.5)


@pytest.mark.parametrize("loss", LOSSES)
def test_broadcasting_warns_like_pytorch(loss):
    x, t = torch.randn(3, 4), torch.randn(4)
    with pytest.warns(UserWarning, match="target size") as ours_rec:
        ours(loss, x, t)
    with pytest.warns(UserWarning, match="target size") as ref_rec:
        reference(loss, x, t)
    ours_msgs = [str(w.message) for w in ours_rec if "target size" in str(w.message)]
    ref_msgs = [str(w.message) for w in ref_rec if "target size" in str(w.message)]
    assert ours_msgs and ours_msgs[0] == ref_msgs[0]
    with pytest.warns(UserWarning, match="target size"):
        ours(loss, t, x)
    # Same shapes: no warning at all.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(loss, x, x + 1)


@pytest.mark.parametrize("loss", LOSSES)
def test_broadcasting_target_only_grad(loss):
    # Gradient of a broadcast target alone (input not requiring grad), and of the input alone.
    x, t = make_pair((5, 6))
    t = t[:1]
    check_against_pytorch(loss, x, t, "mean", wrt=("target",))
    check_against_pytorch(loss, x, t, "none", wrt=("input",))
    check_against_pytorch(loss, t, x, "sum", wrt=("input",))


# ----------------------------------------------------------------------------------------------
# 4. weight (mse, huber; torch 2.13 semantics)
# ----------------------------------------------------------------------------------------------


def _weight(shape, dtype, kind):
    if kind == "positive":
        return (torch.rand(shape) + 0.1).to(dtype)
    if kind == "with_zeros_and_negative":
        # Zeros and negative weights, with weight.sum() well away from 0 (mse's mean divides by it).
        w = torch.rand(shape) + 0.1
        w.view(-1)[::3] = 0.0
        w.view(-1)[1::5] *= -0.5
        return w.to(dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["positive", "with_zeros_and_negative", "ones"])
@pytest.mark.parametrize("shape", [(), (7,), (4, 9), (2, 3, 5)], ids=["0d", "7", "4x9", "2x3x5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_weight(loss, dtype, shape, kind, grad_in_forward):
    x, t = make_pair(shape, dtype)
    w = _weight(shape, dtype, kind)
    param = 0.5 if loss == "huber" else None
    for reduction in REDUCTIONS:
        # (A 0-D weight "with zeros" is 0: mse's mean is then 0 / 0 = nan, as in PyTorch.)
        y, _ = check_against_pytorch(loss, x, t, reduction, param, weight=w, equal_nan=shape == ())
        if kind == "ones":
            assert_close(y, ours(loss, x, t, reduction, param), dtype=dtype, msg="weight of ones = no weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_weight_large(loss, dtype):
    # > 100k elements: the parallel path, weighted.
    x, t = make_pair((257, 513), dtype)
    w = _weight((257, 513), dtype, "with_zeros_and_negative")
    for reduction in REDUCTIONS:
        check_against_pytorch(loss, x, t, reduction, 2.5 if loss == "huber" else None, weight=w)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_mean_denominators(reduction):
    # mse's mean divides by weight.sum(), huber's by numel (torch 2.13's F.mse_loss/F.huber_loss).
    x = torch.tensor([1.0, 3.0, 0.0, -2.0])
    t = torch.zeros(4)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    mse = torch_ext.mse_loss(x, t, reduction=reduction, weight=w)
    huber = torch_ext.huber_loss(x, t, reduction=reduction, weight=w, delta=1.0)
    mse_terms = torch.tensor([1.0, 4.5, 0.0, 0.0])
    huber_terms = torch.tensor([0.5, 1.25, 0.0, 0.0])
    expected = {
        "none": (mse_terms, huber_terms),
        "sum": (mse_terms.sum(), huber_terms.sum()),
        "mean": (mse_terms.sum() / w.sum(), huber_terms.sum() / 4),
    }[reduction]
    assert_close(mse, expected[0], msg="mse")
    assert_close(huber, expected[1], msg="huber")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_weight_with_broadcast_target(loss, reduction):
    # weight has input's size; target broadcasts to it.
    x = torch.randn(4, 6)
    t = torch.randn(6)
    w = _weight((4, 6), torch.float32, "positive")
    check_against_pytorch(loss, x, t, reduction, weight=w)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_weight_with_broadcast_input(loss, reduction):
    # PyTorch checks weight against input's size (not the broadcast size) and then lets
    # weight broadcast against the per-element loss.
    x = torch.randn(4, 1)
    t = torch.randn(4, 6)
    w = _weight((4, 1), torch.float32, "positive")
    check_against_pytorch(loss, x, t, reduction, weight=w)


@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_weight_non_contiguous(loss):
    x, t = make_pair((6, 10))
    w = _weight((10, 6), torch.float32, "positive").t()
    assert not w.is_contiguous()
    check_against_pytorch(loss, x, t, "none", weight=w)
    w = _weight((10,), torch.float32, "positive").expand(6, 10)
    check_against_pytorch(loss, x, t, "mean", weight=w)


@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_weight_requiring_grad_raises(loss):
    x, t = make_pair((3, 4))
    w = torch.rand(3, 4, requires_grad=True)
    with pytest.raises((RuntimeError, ValueError), match="weight"):
        ours(loss, leaf(x), t, "mean", weight=w)


# ----------------------------------------------------------------------------------------------
# 5. Which tensors require grad; grad_output layouts; non-contiguous inputs
# ----------------------------------------------------------------------------------------------

WRT_SUBSETS = [("input",), ("target",), ("input", "target")]


@pytest.mark.parametrize("wrt", WRT_SUBSETS, ids=lambda s: "+".join(s))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,param", [("mse", None), ("huber", 0.5), ("smooth_l1", 2.5), ("smooth_l1", 0.0)])
def test_requires_grad_subsets(loss, param, reduction, wrt, grad_in_forward):
    x, t = make_pair((5, 7), torch.float64)
    named = {"input": x.clone(), "target": t.clone()}
    for name in wrt:
        named[name].requires_grad_()
    y = ours(loss, named["input"], named["target"], reduction, param)
    assert y.requires_grad
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g)
    ref = {k: v.detach().clone().requires_grad_(k in wrt) for k, v in named.items()}
    reference(loss, ref["input"], ref["target"], reduction, param).backward(g)
    for name, v in named.items():
        if name in wrt:
            assert v.grad is not None, name
            assert_close(v.grad, ref[name].grad, msg=name)
        else:
            assert v.grad is None, f"{name} does not require grad but got a gradient"
    x, t = away_from_kinks((3, 4), param or 1.0, loss)
    named = {"input": x, "target": t}
    required = [named[n].requires_grad_() for n in wrt]

    def fn(*args):
        vals = dict(named)
        vals.update(zip(wrt, args))
        return ours(loss, vals["input"], vals["target"], reduction, param)

    assert torch.autograd.gradcheck(fn, required)


@pytest.mark.parametrize("loss", LOSSES)
def test_no_grad_needed(loss):
    x, t = make_pair((3, 4))
    y = ours(loss, x, t)
    assert not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        y = ours(loss, leaf(x), leaf(t))
    assert not y.requires_grad
    assert_close(y, reference(loss, x, t))


def _layout_case(name, dtype):
    """(input, target, grad_output) for reduction="none" with one non-contiguous piece."""
    c = lambda v: v.to(dtype)  # noqa: E731
    x, t = make_pair((6, 10), dtype)
    grad = c(torch.randn(6, 10))
    if name == "input_transposed":
        x = c(2 * torch.randn(10, 6)).t()
    elif name == "target_transposed":
        t = c(torch.randn(10, 6)).t()
    elif name == "input_stepped":
        x = c(2 * torch.randn(12, 30))[::2, ::3]
    elif name == "target_stepped":
        t = c(torch.randn(6, 20))[:, 1::2]
    elif name == "input_expanded":  # stride 0 along rows (a leaf with overlapping memory)
        x = c(2 * torch.randn(10)).expand(6, 10)
    elif name == "target_expanded":
        t = c(torch.randn(6, 1)).expand(6, 10)
    elif name == "both_3d_permuted":
        x = c(2 * torch.randn(5, 6, 2)).permute(1, 2, 0)
        t = c(torch.randn(2, 5, 6)).permute(2, 0, 1)
        grad = c(torch.randn(6, 2, 5))
    elif name == "grad_transposed":
        grad = c(torch.randn(10, 6)).t()
    elif name == "grad_stepped":
        grad = c(torch.randn(6, 30))[:, ::3]
    elif name == "grad_row_expanded":  # strides (0, 1)
        grad = c(torch.randn(10)).expand(6, 10)
    elif name == "grad_column_expanded":  # strides (1, 0)
        grad = c(torch.randn(6, 1)).expand(6, 10)
    elif name == "grad_from_sum":  # y.sum() backward: strides (0, 0)
        grad = "sum"
    elif name == "large_transposed":
        x = c(2 * torch.randn(513, 257)).t()
        t = c(torch.randn(257, 1026))[:, ::2]
        grad = c(torch.randn(513, 257)).t()
    elif name == "all_strided":
        x = c(2 * torch.randn(10, 6)).t()
        t = c(torch.randn(6, 20))[:, ::2]
        grad = c(torch.randn(10)).expand(6, 10)
    else:
        raise AssertionError(name)
    return x, t, grad


LAYOUT_CASES = [
    "input_transposed", "target_transposed", "input_stepped", "target_stepped", "input_expanded",
    "target_expanded", "both_3d_permuted", "grad_transposed", "grad_stepped", "grad_row_expanded",
    "grad_column_expanded", "grad_from_sum", "large_transposed", "all_strided",
]


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("loss,param", [("mse", None), ("huber", 0.5), ("smooth_l1", 1.0), ("smooth_l1", 0.0)])
def test_noncontiguous(loss, param, dtype, case):
    x, t, grad = _layout_case(case, dtype)
    if case.startswith(("input", "target", "both", "large", "all")):
        assert not (x.is_contiguous() and t.is_contiguous())
    check_against_pytorch(loss, x, t, "none", param, grad=grad, msg=case)
    if not case.startswith("grad"):
        for reduction in ("sum",) if case == "large_transposed" else ("mean", "sum"):
            check_against_pytorch(loss, x, t, reduction, param, msg=case)


@pytest.mark.parametrize("loss", LOSSES)
def test_grad_from_backward_of_sum_reaches_leaves(loss):
    x, t = (leaf(v) for v in make_pair((4, 3, 5)))
    ours(loss, x, t, "none").sum().backward()
    rx, rt = leaf(x), leaf(t)
    reference(loss, rx, rt, "none").sum().backward()
    assert_close(x.grad, rx.grad)
    assert_close(t.grad, rt.grad)


@pytest.mark.parametrize("loss", LOSSES)
def test_same_tensor_as_input_and_target(loss):
    # loss(x, x) is 0 and its gradients (sum of both paths) are 0.
    x = leaf(torch.randn(3, 4))
    y = ours(loss, x, x, "sum")
    assert y.item() == 0
    (g,) = torch.autograd.grad(y, x)
    assert torch.equal(g, torch.zeros_like(g))


# ----------------------------------------------------------------------------------------------
# 6. NaN / inf
# ----------------------------------------------------------------------------------------------


def _nonfinite_pair(dtype):
    x, t = make_pair((4, 6), torch.float32)
    x[0, 0] = float("nan")
    x[0, 1] = float("inf")
    x[0, 2] = -float("inf")
    t[1, 0] = float("nan")
    t[1, 1] = float("inf")
    t[1, 2] = -float("inf")
    x[2, 0] = t[2, 0] = float("inf")  # inf - inf: NaN
    x[2, 1] = float("inf")
    t[2, 1] = -float("inf")
    return x.to(dtype), t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,param",
                         [("mse", None), ("huber", 0.5), ("huber", 2.5), ("smooth_l1", 1.0), ("smooth_l1", 2.5)])
def test_nonfinite(loss, param, reduction, dtype):
    x, t = _nonfinite_pair(dtype)
    y, (gx, gt) = check_against_pytorch(loss, x, t, reduction, param, equal_nan=True)
    if reduction == "none":
        assert torch.isnan(y[0, 0]) and torch.isinf(y[0, 1]) and torch.isnan(y[2, 0])
        assert torch.isfinite(y[3]).all()
    else:
        assert torch.isnan(y)
    assert torch.isnan(gx).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nonfinite_l1(reduction, dtype):
    # smooth_l1 with beta = 0 is PyTorch's l1_loss, whose gradient is sgn(d): sgn(NaN) = 0 in
    # PyTorch, so a NaN difference gets a 0 gradient while the loss is NaN.
    x, t = _nonfinite_pair(dtype)
    check_against_pytorch("smooth_l1", x, t, reduction, 0.0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_nonfinite_weighted(loss, dtype):
    x, t = _nonfinite_pair(dtype)
    w = _weight((4, 6), dtype, "positive")
    w[3, 0] = float("inf")
    for reduction in REDUCTIONS:
        check_against_pytorch(loss, x, t, reduction, weight=w, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# 7. autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)], ids=["f32", "bf16", "f32_bf16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_autocast_bfloat16_computes_in_float32(loss, reduction, dtypes):
    x_dtype, t_dtype = dtypes
    x, t = make_pair((5, 13))
    x, t = x.to(x_dtype), t.to(t_dtype)
    xl, tl, xr, tr = leaf(x), leaf(t), leaf(x), leaf(t)
    param = None if loss == "mse" else 0.5
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = ours(loss, xl, tl, reduction, param)
        y_ref = reference(loss, xr, tr, reduction, param)
    assert y_ref.dtype == torch.float32
    assert y.dtype == torch.float32
    # Both are float32 computations from the same values.
    assert_close(y, y_ref, dtype=torch.float32, msg="autocast output")
    g = torch.randn(y.shape)
    y.backward(g)
    y_ref.backward(g)
    assert xl.grad.dtype == x_dtype and tl.grad.dtype == t_dtype
    assert_close(xl.grad, xr.grad, dtype=x_dtype, msg="grad_input")
    assert_close(tl.grad, tr.grad, dtype=t_dtype, msg="grad_target")


@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_autocast_with_weight(loss):
    # float32 input/target/weight under bf16 autocast: the loss is computed and returned in
    # float32 (the weighting does not bring bfloat16 back in).
    x, t = make_pair((5, 7))
    w = _weight((5, 7), torch.float32, "positive")
    xl, xr = leaf(x), leaf(x)
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = ours(loss, xl, t, "mean", weight=w)
    assert y.dtype == torch.float32
    y_ref = reference(loss, xr, t, "mean", weight=w)
    assert_close(y, y_ref)
    y.backward()
    y_ref.backward()
    assert_close(xl.grad, xr.grad)


@pytest.mark.parametrize("case", ["plain", "weighted", "broadcast"])
@pytest.mark.parametrize("path", ["eager", "no_grad", "compiled"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_autocast_reads_16_bit_inputs_as_they_are(dynamo_reset, loss, reduction, path, case):
    # Under bf16 autocast, bfloat16 input and target (and weight) reach the kernel as they are, not
    # as float32 copies (8 bytes per element each, with their gradients): the op gets them with
    # loss_dtype float32. The loss is PyTorch's (float32 from the same values); the gradients,
    # formed in bfloat16, are eager's (float32, then rounded) within a bfloat16 ulp.
    if case == "weighted" and loss not in WEIGHTED_LOSSES:
        pytest.skip("smooth_l1_loss takes no weight")
    x, t = (v.bfloat16() for v in make_pair((6, 17)))
    if case == "broadcast":
        t = t[:1].clone()
    w = _weight((6, 17), torch.bfloat16, "positive") if case == "weighted" else None
    param = None if loss == "mse" else 0.5
    xl, tl, xr, tr = leaf(x), leaf(t), leaf(x), leaf(t)

    def want(a, b, reduction):
        if w is None:
            return reference(loss, a, b, reduction, param)
        # PyTorch's weighted mse_loss is a Python composition that autocast leaves in bfloat16;
        # ours computes in float32 as unweighted: the reference is float32 from the same values.
        return reference(loss, a.float(), b.float(), reduction, param, w.float())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # broadcasting warning, tested on its own
        check_reads_16_bit_under_autocast(
            "regression_loss_fwd", 7, path, lambda a, b, reduction: ours(loss, a, b, reduction, param, w), want,
            (xl, tl), (xr, tr), [xl, tl], [xr, tr], reduction=reduction)


def test_autocast_mixed_16_bit_dtypes_compute_from_float32_copies():
    # A float16 target with a bfloat16 input under autocast: no shared 16-bit dtype, so both go to
    # float32 as autocast casts them for F.mse_loss (the op gets float32 and no loss_dtype).
    x, t = make_pair((4, 9))
    xl, xr = leaf(x.bfloat16()), leaf(x.bfloat16())
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = torch_ext.mse_loss(xl, t.half())
        y_ref = F.mse_loss(xr, t.half())
    assert y.dtype == y_ref.dtype == torch.float32
    assert_close(y, y_ref)
    y.backward()
    y_ref.backward()
    assert xl.grad.dtype == torch.bfloat16
    assert_close(xl.grad, xr.grad, dtype=torch.bfloat16)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_loss_dtype(reduction):
    # The op's loss_dtype (tests/test_common.py checks None and refusals): the loss in that dtype,
    # computed in float32 from the 16-bit inputs (reduction none: each element's loss unrounded);
    # the gradients formed in the inputs' dtype.
    x, t = (v.bfloat16() for v in make_pair((5, 11)))
    mask = [False, False] if reduction == "none" else [True, True]
    loss, gi, gt = FWD(x, t, None, "huber", 0.5, reduction, mask, torch.float32)
    want = F.huber_loss(x.float(), t.float(), reduction=reduction, delta=0.5)
    assert loss.dtype == torch.float32
    assert_close(loss, want, dtype=torch.float32)
    if reduction != "none":
        xf = leaf(x.float())
        F.huber_loss(xf, t.float(), reduction=reduction, delta=0.5).backward()
        assert gi.dtype == gt.dtype == torch.bfloat16
        assert_close(gi, xf.grad, dtype=torch.bfloat16)
        assert_close(gt, -xf.grad, dtype=torch.bfloat16)
    # Its backward op reads a float32 incoming gradient as it is (rounding the product once).
    g = torch.rand(loss.shape) + 0.5
    gi, gt = BWD(g, x, t, None, "huber", 0.5, reduction, [True, True])
    xf = leaf(x.float())
    want_grad = torch.autograd.grad(F.huber_loss(xf, t.float(), reduction=reduction, delta=0.5), xf, g)[0]
    assert gi.dtype == gt.dtype == torch.bfloat16
    if reduction == "none":  # one product per element, as eager's: the same bits
        assert torch.equal(gi, want_grad.bfloat16()) and torch.equal(gt, (-want_grad).bfloat16())
    assert_close(gi, want_grad, dtype=torch.bfloat16)
    assert_close(gt, -want_grad, dtype=torch.bfloat16)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,param", [("mse", 0.0), ("huber", 0.5), ("smooth_l1", 0.7), ("smooth_l1", 0.0)])
def test_bwd_composite_and_gradgradcheck(loss, param, reduction, weighted):
    # regression_loss_bwd_composite (create_graph's backward: the loss in PyTorch's ops,
    # differentiated) gives regression_loss_bwd's gradients, passes every opcheck utility, and
    # second derivatives through the public loss pass gradgradcheck (float64).
    if weighted and loss == "smooth_l1":
        pytest.skip("smooth_l1_loss takes no weight")
    x, t = away_from_kinks((3, 5), param or 1.0, loss)
    w = _weight((3, 5), torch.float64, "positive") if weighted else None
    g = torch.randn(x.shape if reduction == "none" else (), dtype=torch.float64)
    want = BWD(g, x, t, w, loss, param, reduction, [True, True])
    args = (leaf(g), leaf(x), leaf(t), w, loss, param, reduction, [True, True])
    got = torch.ops.torch_ext.regression_loss_bwd_composite(*args)
    assert_close(got[0], want[0], msg="grad_input")
    assert_close(got[1], want[1], msg="grad_target")
    torch.library.opcheck(torch.ops.torch_ext.regression_loss_bwd_composite.default, args)
    public = {"mse": None, "huber": param, "smooth_l1": param}[loss]
    assert torch.autograd.gradgradcheck(lambda a, b: ours(loss, a, b, reduction, public, w), (leaf(x), leaf(t)))


# ----------------------------------------------------------------------------------------------
# 8. gradcheck (retain_graph, double backward: tests/test_common.py)
# ----------------------------------------------------------------------------------------------

GRADCHECK_CASES = [("mse", None), ("huber", 0.5), ("huber", 1.0), ("huber", 2.5), ("smooth_l1", 0.0),
                   ("smooth_l1", 0.5), ("smooth_l1", 1.0), ("smooth_l1", 2.5)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,param", GRADCHECK_CASES)
def test_gradcheck(loss, param, reduction):
    x, t = away_from_kinks((3, 5), param or 1.0, loss)
    assert torch.autograd.gradcheck(lambda a, b: ours(loss, a, b, reduction, param),
                                    (x.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,param", [("mse", None), ("huber", 0.5), ("smooth_l1", 2.5), ("smooth_l1", 0.0)])
def test_gradcheck_broadcast(loss, param, reduction):
    x, t = away_from_kinks((3, 4), param or 1.0, loss)
    x, t = x[:, :1].clone(), t[:1].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert torch.autograd.gradcheck(lambda a, b: ours(loss, a, b, reduction, param),
                                        (x.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", WEIGHTED_LOSSES)
def test_gradcheck_weighted(loss, reduction, grad_in_forward):
    x, t = away_from_kinks((3, 5), 0.5, loss)
    w = _weight((3, 5), torch.float64, "with_zeros_and_negative")
    assert torch.autograd.gradcheck(lambda a, b: ours(loss, a, b, reduction, 0.5, weight=w),
                                    (x.requires_grad_(), t.requires_grad_()))


# ----------------------------------------------------------------------------------------------
# 9. Raw ops: opcheck, the backward op
# ----------------------------------------------------------------------------------------------


def _raw_args(loss, weighted, shape=(4, 7), dtype=torch.float32):
    x, t = make_pair(shape, dtype)
    w = _weight(shape, dtype, "positive") if weighted else None
    param = {"mse": 0.0, "huber": 0.5, "smooth_l1": 2.5}[loss]
    return x, t, w, param


OPCHECK_CASES = [(loss, w) for loss in LOSSES for w in ([False, True] if loss in WEIGHTED_LOSSES else [False])]


@pytest.mark.parametrize("reduction,requires_grad", [("mean", False), ("mean", True), ("sum", True), ("none", True)],
                         ids=["mean-nograd", "mean-grad", "sum-grad", "none-grad"])
@pytest.mark.parametrize("loss,weighted", OPCHECK_CASES, ids=lambda v: str(v))
def test_opcheck_fwd(loss, weighted, reduction, requires_grad):
    x, t, w, param = _raw_args(loss, weighted, (2, 3, 5) if weighted else (4, 7))
    if requires_grad:
        x, t = leaf(x), leaf(t)
    torch.library.opcheck(FWD, (x, t, w, loss, param, reduction, NO_GRADS))


def test_opcheck_fwd_l1_and_empty():
    x, t = make_pair((4, 7))
    torch.library.opcheck(FWD, (leaf(x), leaf(t), None, "smooth_l1", 0.0, "mean", NO_GRADS))
    x, t = make_pair((0, 3))
    torch.library.opcheck(FWD, (x, t, None, "mse", 0.0, "sum", NO_GRADS))


BWD_MASKS = [([True, True], False), ([True, False], False), ([False, True], False), ([True, True], True)]


@pytest.mark.parametrize("mask,requires_grad", BWD_MASKS, ids=["11-nograd", "10-nograd", "01-nograd", "11-grad"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,weighted", OPCHECK_CASES, ids=lambda v: str(v))
def test_opcheck_bwd(loss, weighted, reduction, mask, requires_grad):
    x, t, w, param = _raw_args(loss, weighted)
    g = torch.randn(x.shape if reduction == "none" else ())
    if not requires_grad:
        torch.library.opcheck(BWD, (g, x, t, w, loss, param, reduction, mask))
        return
    # The backward op is differentiable once, by design: its autograd gives its outputs a grad_fn
    # whose backward raises (no double backward). Every opcheck utility runs except the one that
    # differentiates through the op, and that one must fail with the op's message.
    g, x, t = leaf(g), leaf(x), leaf(t)
    args = (g, x, t, w, loss, param, reduction, mask)
    torch.library.opcheck(BWD, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="does not support double backward"):
        torch.library.opcheck(BWD, args, test_utils="test_aot_dispatch_dynamic")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,weighted", OPCHECK_CASES, ids=lambda v: str(v))
def test_raw_ops_match_autograd(loss, weighted, reduction, dtype):
    x, t, w, param = _raw_args(loss, weighted, (3, 11), dtype)
    y, *_ = FWD(x, t, w, loss, param, reduction, NO_GRADS)
    rdt = reference_dtype(dtype)
    w_ref = None if w is None else w.to(rdt)
    ref_param = None if loss == "mse" else param
    _, (rx, rt) = forward_backward(lambda a, b: reference(loss, a, b, reduction, ref_param, w_ref), x, t,
                                   ("input", "target"), None, rdt)
    ref_y = reference(loss, x.to(rdt), t.to(rdt), reduction, ref_param, w_ref)
    assert_close(y, ref_y, dtype=dtype, msg="fwd op")
    g = torch.randn(y.shape).to(dtype)
    _, (rx, rt) = forward_backward(lambda a, b: reference(loss, a, b, reduction, ref_param, w_ref), x, t,
                                   ("input", "target"), g.to(rdt), rdt)
    gx, gt = BWD(g, x, t, w, loss, param, reduction, [True, True])
    assert_close(gx, rx, dtype=dtype, msg="grad_input")
    assert_close(gt, rt, dtype=dtype, msg="grad_target")
    gx, gt = BWD(g, x, t, w, loss, param, reduction, [True, False])
    assert gt is None
    assert_close(gx, rx, dtype=dtype, msg="grad_input alone")
    gx, gt = BWD(g, x, t, w, loss, param, reduction, [False, True])
    assert gx is None
    assert_close(gt, rt, dtype=dtype, msg="grad_target alone")


@pytest.mark.parametrize("mask", [[True, True], [True, False], [False, True]], ids=["11", "10", "01"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss,weighted", OPCHECK_CASES, ids=lambda v: str(v))
def test_fwd_grad_mask_equals_fwd_then_bwd(loss, weighted, reduction, mask):
    """regression_loss_fwd with grad_mask = (the loss without, the backward op's gradients for grad 1)."""
    for dtype in DTYPES:
        # (3, 20001): whole vectors in several blocks, then a tail (the forward's vector loop)
        for shape in [(3, 11), (2, 0), (7,), (3, 20001)]:
            x, t, w, param = _raw_args(loss, weighted, shape, dtype)
            value, gx, gt = FWD(x, t, w, loss, param, reduction, mask)
            same = dict(rtol=0, atol=0, equal_nan=True)  # the mean of nothing is NaN in both
            torch.testing.assert_close(value, FWD(x, t, w, loss, param, reduction, NO_GRADS)[0], **same)
            rx, rt = BWD(torch.ones(()).to(dtype), x, t, w, loss, param, reduction, mask)
            for got, want, m in ((gx, rx, mask[0]), (gt, rt, mask[1])):
                if m:
                    torch.testing.assert_close(got, want, **same)
                else:
                    assert got is None  # not asked for


def test_fwd_grad_mask_refuses_reduction_none():
    x, t, _, _ = _raw_args("mse", False)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        FWD(x, t, None, "mse", 0.0, "none", [True, True])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        FWD(mode.from_tensor(x), mode.from_tensor(t), None, "mse", 0.0, "none", [False, True])


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss,weighted", OPCHECK_CASES, ids=lambda v: str(v))
def test_opcheck_fwd_grad_mask(loss, weighted, reduction, requires_grad):
    x, t, w, param = _raw_args(loss, weighted)
    if requires_grad:
        x, t = leaf(x), leaf(t)
    torch.library.opcheck(FWD, (x, t, w, loss, param, reduction, [True, True]))


def test_fwd_grad_mask_op_is_differentiable_directly():
    x, t, _, _ = _raw_args("huber", False)
    x, t = leaf(x), leaf(t)
    value, _, _ = FWD(x, t, None, "huber", 0.5, "mean", [True, False])
    (gx,) = torch.autograd.grad(value * 3.0, x, retain_graph=True)
    xr = leaf(x)
    (gr,) = torch.autograd.grad(F.huber_loss(xr, t.detach(), delta=0.5) * 3.0, xr)
    assert_close(gx, gr)
    # target's gradient was not formed (grad_mask[1] False): the backward op supplies it.
    (gt,) = torch.autograd.grad(value * 3.0, t)
    tr = leaf(t)
    (gtr,) = torch.autograd.grad(F.huber_loss(x.detach(), tr, delta=0.5) * 3.0, tr)
    assert_close(gt, gtr)


def test_grad_in_forward_path_is_taken_only_where_it_applies(monkeypatch):
    """The eager C++ node (csrc/autograd_node.h) when input or target requires grad (reductions
    mean and sum: the gradients formed in forward; none: the node calls the backward op);
    otherwise no graph."""
    on_this_device = frozenset({default_device_type()})
    monkeypatch.setattr(sys.modules["torch_ext.regression_loss"], "GRAD_IN_FORWARD_DEVICES", on_this_device)
    x, t = make_pair((4, 6))
    xl, tl = leaf(x), leaf(t)
    assert torch_ext.mse_loss(xl, t).grad_fn.name() == "RegressionLossBackward"
    loss = torch_ext.huber_loss(x, tl, reduction="sum")
    assert loss.grad_fn.name() == "RegressionLossBackward"
    loss.backward()  # only the target's gradient was formed, and only it is handed over
    tr = leaf(t)
    F.huber_loss(x, tr, reduction="sum").backward()
    assert_close(tl.grad, tr.grad)
    assert torch_ext.mse_loss(xl, t, reduction="none").grad_fn.name() == "RegressionLossBackward"
    assert torch_ext.mse_loss(x, t).grad_fn is None
    with torch.no_grad():
        assert torch_ext.mse_loss(xl, t).grad_fn is None


@pytest.mark.parametrize("grad_scale", [1.0, 2.5, 0.0])
def test_grad_in_forward_scales_by_grad_output(grad_scale, grad_in_forward):
    x, t = make_pair((6, 9))
    x, t = leaf(x), leaf(t)
    torch_ext.smooth_l1_loss(x, t, beta=0.5).backward(torch.tensor(grad_scale))
    xr, tr = leaf(x), leaf(t)
    F.smooth_l1_loss(xr, tr, beta=0.5).backward(torch.tensor(grad_scale))
    assert_close(x.grad, xr.grad)
    assert_close(t.grad, tr.grad)


def test_fwd_op_ignores_param_for_mse():
    x, t = make_pair((5, 6))
    assert torch.equal(FWD(x, t, None, "mse", 0.0, "sum", NO_GRADS)[0], FWD(x, t, None, "mse", 7.5, "sum", NO_GRADS)[0])


# ----------------------------------------------------------------------------------------------
# 10. torch.compile
# ----------------------------------------------------------------------------------------------


def _all_losses(x, t, w):
    return (
        torch_ext.mse_loss(x, t)
        + torch_ext.mse_loss(x, t, reduction="sum", weight=w)
        + torch_ext.huber_loss(x, t, delta=0.5, reduction="none").mean(0).sum()
        + torch_ext.huber_loss(x, t, weight=w)
        + torch_ext.smooth_l1_loss(x, t, beta=2.5, reduction="sum")
        + torch_ext.smooth_l1_loss(x, t, beta=0.0)
    )


def _all_losses_reference(x, t, w):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return (
            F.mse_loss(x, t)
            + F.mse_loss(x, t, reduction="sum", weight=w)
            + F.huber_loss(x, t, delta=0.5, reduction="none").mean(0).sum()
            + F.huber_loss(x, t, weight=w)
            + F.smooth_l1_loss(x, t, beta=2.5, reduction="sum")
            + F.smooth_l1_loss(x, t, beta=0.0)
        )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(dynamo_reset, backend, grad_in_forward):
    compiled = torch.compile(_all_losses, fullgraph=True, backend=backend)
    x, t = make_pair((6, 9))
    w = _weight((6, 9), torch.float32, "positive")
    results = []
    for fn in (_all_losses, compiled, _all_losses_reference):
        xl, tl = leaf(x), leaf(t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            y = fn(xl, tl, w)
        y.backward()
        results.append((y.detach(), xl.grad, tl.grad))
    (y, gx, gt), (yc, gxc, gtc), (yr, gxr, gtr) = results
    assert_close(yc, y, msg="compiled output")
    assert_close(gxc, gx, msg="compiled grad_input")
    assert_close(gtc, gt, msg="compiled grad_target")
    assert_close(y, yr, msg="eager vs PyTorch")
    assert_close(gx, gxr, msg="eager grad_input vs PyTorch")


@pytest.mark.parametrize("loss", LOSSES)
def test_compile_broadcasting(dynamo_reset, loss):
    # PyTorch's own losses compile with fullgraph=True when input and target broadcast (the
    # UserWarning does not break the graph); so must ours.
    def fn(lib):
        return lambda a, b: (ours if lib == "ours" else reference)(loss, a[:1], b, "sum") + \
            (ours if lib == "ours" else reference)(loss, a, b[:, :1], "none").sum()

    compiled = torch.compile(fn("ours"), fullgraph=True, backend="aot_eager")
    x, t = make_pair((4, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        y, grads = forward_backward(compiled, x, t, ("input", "target"), "sum")
        y_ref, ref = forward_backward(fn("reference"), x, t, ("input", "target"), "sum")
    assert_close(y, y_ref)
    for name, a, r in zip(("grad_input", "grad_target"), grads, ref):
        assert_close(a, r, msg=name)


def test_compile_no_graph_breaks(dynamo_reset, grad_in_forward):
    x, t = make_pair((4, 5))
    w = _weight((4, 5), torch.float32, "positive")
    explanation = torch._dynamo.explain(_all_losses)(x, t, w)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_dynamic_shapes(dynamo_reset):
    compiled = torch.compile(lambda a, b: torch_ext.huber_loss(a, b, delta=0.5, reduction="sum"),
                             fullgraph=True, backend="aot_eager", dynamic=True)
    for i, n in enumerate((3, 5, 11)):
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            x, t = (leaf(v) for v in make_pair((n, 4)))
            y = compiled(x, t)
            y.backward()
        rx, rt = leaf(x), leaf(t)
        yr = F.huber_loss(rx, rt, delta=0.5, reduction="sum")
        yr.backward()
        assert_close(y, yr, msg=str(n))
        assert_close(x.grad, rx.grad, msg=str(n))


# ----------------------------------------------------------------------------------------------
# 11. Modules
# ----------------------------------------------------------------------------------------------

MODULE_CASES = [
    ("MSELoss", {}),
    ("MSELoss", {"reduction": "sum"}),
    ("MSELoss", {"reduction": "none"}),
    ("HuberLoss", {}),
    ("HuberLoss", {"delta": 0.5, "reduction": "sum"}),
    ("HuberLoss", {"delta": 2.5, "reduction": "none"}),
    ("SmoothL1Loss", {}),
    ("SmoothL1Loss", {"beta": 0.0}),
    ("SmoothL1Loss", {"beta": 2.5, "reduction": "sum"}),
    ("SmoothL1Loss", {"beta": 0.5, "reduction": "none"}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items()))
def test_module_matches_torch_nn(case, dtype):
    name, kwargs = case
    mod, ref_mod = getattr(torch_ext, name)(**kwargs), getattr(nn, name)(**kwargs)
    assert isinstance(mod, nn.Module)
    assert mod.reduction == ref_mod.reduction
    for attr in ("delta", "beta"):
        if hasattr(ref_mod, attr):
            assert getattr(mod, attr) == getattr(ref_mod, attr)
    assert list(mod.state_dict().keys()) == list(ref_mod.state_dict().keys()) == []
    x, t = make_pair((3, 4, 5), dtype)
    rdt = reference_dtype(dtype)
    xl, tl, xr, tr = leaf(x), leaf(t), leaf(x, rdt), leaf(t, rdt)
    y, y_ref = mod(xl, tl), ref_mod(xr, tr)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype=dtype)
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    y_ref.backward(g.to(rdt))
    assert_close(xl.grad, xr.grad, dtype=dtype)
    assert_close(tl.grad, tr.grad, dtype=dtype)


LEGACY = [(None, False), (False, None), (True, None), (False, False), (True, True), (False, True), (True, False),
          (None, True)]


@pytest.mark.parametrize("size_average,reduce", LEGACY)
@pytest.mark.parametrize("name", ["MSELoss", "SmoothL1Loss"])
def test_module_deprecated_size_average_reduce(name, size_average, reduce):
    with warnings.catch_warnings(record=True) as rec_ref:
        warnings.simplefilter("always")
        ref_mod = getattr(nn, name)(size_average=size_average, reduce=reduce)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mod = getattr(torch_ext, name)(size_average=size_average, reduce=reduce)
    assert mod.reduction == ref_mod.reduction
    ref_deprecated = [str(w.message) for w in rec_ref if "deprecated" in str(w.message)]
    ours_deprecated = [str(w.message) for w in rec if "deprecated" in str(w.message)]
    assert bool(ours_deprecated) == bool(ref_deprecated), (ours_deprecated, ref_deprecated)
    x, t = make_pair((4, 6))
    assert_close(mod(x, t), ref_mod(x, t))


@pytest.mark.parametrize("size_average,reduce", LEGACY)
@pytest.mark.parametrize("loss", ["mse", "smooth_l1"])
def test_functional_deprecated_size_average_reduce(loss, size_average, reduce):
    x, t = (leaf(v) for v in make_pair((4, 6)))
    fn, ref_fn = (torch_ext.mse_loss, F.mse_loss) if loss == "mse" else (torch_ext.smooth_l1_loss, F.smooth_l1_loss)
    with warnings.catch_warnings(record=True) as rec_ref:
        warnings.simplefilter("always")
        y_ref = ref_fn(x, t, size_average=size_average, reduce=reduce, reduction="sum")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = fn(x, t, size_average=size_average, reduce=reduce, reduction="sum")
    assert y.shape == y_ref.shape
    assert_close(y, y_ref)
    assert any("deprecated" in str(w.message) for w in rec) == any("deprecated" in str(w.message) for w in rec_ref)
    g = torch.randn(y.shape)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


def test_module_positional_arguments_like_torch_nn():
    x, t = make_pair((3, 4))
    assert_close(torch_ext.HuberLoss("sum", 0.5)(x, t), nn.HuberLoss("sum", 0.5)(x, t))
    assert_close(torch_ext.SmoothL1Loss(None, None, "sum", 0.5)(x, t), nn.SmoothL1Loss(None, None, "sum", 0.5)(x, t))
    assert_close(torch_ext.MSELoss(None, None, "none")(x, t), nn.MSELoss(None, None, "none")(x, t))
    # And the functional ones, positionally.
    assert_close(torch_ext.huber_loss(x, t, "sum", 0.5), F.huber_loss(x, t, "sum", 0.5))
    assert_close(torch_ext.smooth_l1_loss(x, t, None, None, "sum", 0.5), F.smooth_l1_loss(x, t, None, None, "sum", 0.5))
    assert_close(torch_ext.mse_loss(x, t, None, None, "none"), F.mse_loss(x, t, None, None, "none"))


# ----------------------------------------------------------------------------------------------
# 12. Argument errors
# ----------------------------------------------------------------------------------------------


def _error_cases():
    """name: (loss, input, target, kwargs, exception types, message regex). In every case PyTorch
    raises too (test_pytorch_raises_too); ours must name the offending argument."""
    x, t = make_pair((3, 4))
    ones = torch.ones(3, 4)
    any_exc = (RuntimeError, ValueError, TypeError)
    return {
        "mse_shapes_do_not_broadcast": ("mse", x, torch.randn(3, 5), {}, RuntimeError, r"size|shape|broadcast"),
        "huber_shapes_do_not_broadcast": ("huber", x, torch.randn(2, 4), {}, RuntimeError, r"size|shape|broadcast"),
        "smooth_l1_shapes_do_not_broadcast": ("smooth_l1", torch.randn(5), x, {}, RuntimeError,
                                              r"size|shape|broadcast"),
        "mse_unknown_reduction": ("mse", x, t, {"reduction": "avg"}, ValueError, r"reduction|avg"),
        "huber_unknown_reduction": ("huber", x, t, {"reduction": "avg"}, ValueError, r"reduction|avg"),
        "smooth_l1_unknown_reduction": ("smooth_l1", x, t, {"reduction": "avg"}, ValueError, r"reduction|avg"),
        "mse_weighted_unknown_reduction": ("mse", x, t, {"reduction": "avg", "weight": ones}, ValueError,
                                           r"reduction|avg"),
        "huber_weighted_unknown_reduction": ("huber", x, t, {"reduction": "avg", "weight": ones}, ValueError,
                                             r"reduction|avg"),
        "smooth_l1_negative_beta": ("smooth_l1", x, t, {"beta": -0.5}, (RuntimeError, ValueError), r"beta"),
        "huber_zero_delta": ("huber", x, t, {"delta": 0.0}, (RuntimeError, ValueError), r"delta"),
        "huber_negative_delta": ("huber", x, t, {"delta": -1.0}, (RuntimeError, ValueError), r"delta"),
        "huber_zero_delta_weighted": ("huber", x, t, {"delta": 0.0, "weight": ones}, (RuntimeError, ValueError),
                                      r"delta"),
        "mse_weight_wrong_size": ("mse", x, t, {"weight": torch.ones(4)}, ValueError, r"[Ww]eight"),
        "huber_weight_wrong_size": ("huber", x, t, {"weight": torch.ones(3, 5)}, ValueError, r"[Ww]eight"),
        "mse_integer": ("mse", x.long(), t.long(), {}, any_exc, r"dtype|Long|int64|float"),
        "huber_integer": ("huber", x.int(), t.int(), {}, any_exc, r"dtype|Int|int32|float"),
        "smooth_l1_integer": ("smooth_l1", x.long(), t.long(), {}, any_exc, r"dtype|Long|int64|float"),
    }


ERROR_CASES = list(_error_cases().keys())
OURS_FN = {"mse": torch_ext.mse_loss, "huber": torch_ext.huber_loss, "smooth_l1": torch_ext.smooth_l1_loss}
TORCH_FN = {"mse": F.mse_loss, "huber": F.huber_loss, "smooth_l1": F.smooth_l1_loss}


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_arguments(case, requires_grad):
    loss, a, b, kwargs, exc, match = _error_cases()[case]
    if requires_grad and a.is_floating_point():
        a, b = leaf(a), leaf(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(exc, match=match):
            OURS_FN[loss](a, b, **kwargs)


@pytest.mark.parametrize("case", ERROR_CASES)
def test_pytorch_raises_too(case):
    # A check of the cases themselves: PyTorch refuses each of them as well.
    loss, a, b, kwargs, _, _ = _error_cases()[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises((RuntimeError, ValueError)):
            TORCH_FN[loss](a, b, **kwargs)


@pytest.mark.parametrize("loss", LOSSES)
def test_mixed_float_dtypes_like_pytorch(loss):
    # PyTorch does not raise for input/target of different floating dtypes (mse promotes, huber and
    # smooth_l1 may keep input's dtype); torch_ext must give PyTorch's result, in PyTorch's dtype or
    # the promoted one, or refuse with a clear message about the dtypes.
    x, t = make_pair((3, 4))
    for a, b in ((x, t.double()), (x.double(), t), (x.bfloat16(), t)):
        ref = reference(loss, a, b)
        try:
            y = ours(loss, a, b)
        except (RuntimeError, ValueError, TypeError) as err:
            assert "dtype" in str(err) or "Float" in str(err) or "float" in str(err), str(err)
            continue
        allowed = (ref.dtype, torch.promote_types(a.dtype, b.dtype))
        assert y.dtype in allowed, f"{a.dtype} vs {b.dtype}: result {y.dtype}, PyTorch {ref.dtype}"
        assert_close(y, ref, dtype=torch.bfloat16 if torch.bfloat16 in (a.dtype, b.dtype) else ref.dtype,
                     check_dtype=False)


def _raw_error_cases():
    x, t = make_pair((3, 4))
    return {
        "shape_mismatch": ((x, torch.randn(4), None, "mse", 0.0, "mean"), r"same shape|shape|size"),
        "unknown_loss": ((x, t, None, "l2", 0.0, "mean"), r"loss|l2"),
        "unknown_reduction": ((x, t, None, "mse", 0.0, "avg"), r"reduction|avg"),
        "negative_beta": ((x, t, None, "smooth_l1", -1.0, "mean"), r"beta|param"),
        "zero_delta": ((x, t, None, "huber", 0.0, "mean"), r"delta|param"),
        "weight_shape": ((x, t, torch.ones(3), "mse", 0.0, "mean"), r"weight"),
        "dtype_mismatch": ((x, t.double(), None, "mse", 0.0, "mean"), r"dtype|Double|Float"),
        "weight_dtype": ((x, t, torch.ones(3, 4, dtype=torch.float64), "mse", 0.0, "mean"), r"weight|dtype|Double"),
    }


@pytest.mark.parametrize("case", list(_raw_error_cases().keys()))
def test_raw_op_bad_arguments(case):
    args, match = _raw_error_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match=match):
        FWD(*args, NO_GRADS)
    x = args[0]
    g = torch.randn(x.shape if args[5] == "none" else ())
    with pytest.raises((RuntimeError, ValueError), match=match):
        BWD(g, *args, [True, True])


def test_raw_bwd_bad_grad_shape():
    x, t = make_pair((3, 4))
    with pytest.raises((RuntimeError, ValueError), match=r"grad"):
        BWD(torch.randn(3, 5), x, t, None, "mse", 0.0, "none", [True, True])
    with pytest.raises((RuntimeError, ValueError), match=r"grad"):
        BWD(torch.randn(3, 4), x, t, None, "mse", 0.0, "mean", [True, True])
