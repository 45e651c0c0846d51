"""Tests of the fused cross-entropy (every device): ``torch_ext.cross_entropy``,
``torch_ext.CrossEntropyLoss`` and the raw ops ``torch.ops.torch_ext.cross_entropy_fwd`` /
``cross_entropy_bwd``.

The reference is always PyTorch itself: ``F.cross_entropy`` (and its eager autograd), plus, for
the keyword-only ``z_loss``, ``z_loss * reduce(row_weight * torch.logsumexp(input, class_dim)**2)``
with the row weights and the mean's denominator of the loss (see ``reference``). Covered:

* input (C), (N, C), (N, C, d1), (N, C, d1, d2), (N, C, d1, d2, d3); class counts from 1 to 5000
  (vector tails, several internal blocks); empty batches and empty spatial dims; one row;
* class-index targets (int64, uint8) and class-probability targets (normalized or not), class
  weights, ignore_index (-100, a valid class, some or all rows ignored, an out-of-range value),
  label_smoothing 0 / 0.1 / 1.0, reductions mean / sum / none, z_loss 0 / 1e-3 / 0.5, in every
  combination, float32 / float64 / bfloat16 / float16, loss and gradients (input, and probability targets);
* all-ignored batches (mean is NaN, sum is 0, as PyTorch) and their gradients;
* numerical stability: logits at 1e4 / 3e4 scale and offset, -inf logits in non-target classes;
* non-contiguous, sliced, transposed, channels_last, permuted and expanded input / target /
  weight / grad_output (stride 0 included);
* a second forward, inputs that do not require grad, gradcheck (float64); (retain_graph and
  double backward, as for every op: tests/test_common.py)
* what is saved for backward (no N x C tensor besides the input);
* torch.library.opcheck of both ops, the raw backward op against autograd;
* torch.compile (aot_eager, inductor, dynamic shapes, no graph breaks); torch.autocast;
* the CrossEntropyLoss module (vs nn.CrossEntropyLoss, state_dict, repr); the deprecated
  size_average / reduce arguments; argument errors from the functional, the module and the op.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ext
from torch_ext import CrossEntropyLoss, cross_entropy
from utils import (
    SavedTensorBytes,
    assert_close,
    check_reads_16_bit_under_autocast,
    cpu_supports,
    default_device_type,
    leaf,
    reference_dtype,
    run_python,
    tolerance,
)

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
Z_LOSSES = (0.0, 1e-3, 0.5)
LABEL_SMOOTHINGS = (0.0, 0.1, 1.0)
FWD = torch.ops.torch_ext.cross_entropy_fwd.default
BWD = torch.ops.torch_ext.cross_entropy_bwd.default
NO_GRADS = [False, False]  # the forward op's grad_mask: no gradient formed
ERRORS = (RuntimeError, ValueError, IndexError, TypeError)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------


def class_dim(input: torch.Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def target_shape(input_shape) -> tuple:
    """The shape of class-index targets for input of `input_shape` (the class dim dropped)."""
    input_shape = tuple(input_shape)
    return () if len(input_shape) == 1 else (input_shape[0], *input_shape[2:])


def row_weights(input, target, weight, ignore_index):
    """Per-row weight of the loss (and of the z_loss term): weight[target] (1 without weight) for
    class-index targets, 0 for ignored rows; 1 for probability targets."""
    lse_shape = target_shape(input.shape)
    if target.is_floating_point():
        return torch.ones(lse_shape, dtype=input.dtype)
    t = target.long()
    valid = t != ignore_index
    rw = valid.to(input.dtype)
    if weight is not None:
        rw = rw * weight.to(input.dtype)[t.masked_fill(~valid, 0)]
    return rw


def reference(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    """F.cross_entropy + z_loss * reduce(row_weight * logsumexp(input)**2), differentiable.
    uint8 class indices go to PyTorch as int64 (its label smoothing path rejects uint8)."""
    if not target.is_floating_point():
        target = target.long()
    loss = F.cross_entropy(
        input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    if z_loss == 0:
        return loss
    lse = torch.logsumexp(input, class_dim(input))
    rw = row_weights(input, target, weight, ignore_index)
    # (rw * lse**2 with rw == 0 where a row is ignored; lse is finite in every test)
    z = z_loss * rw * lse.square()
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss + z.sum()
    denom = rw.sum() if not target.is_floating_point() else torch.tensor(float(lse.numel()), dtype=lse.dtype)
    # No rows (or all ignored): the loss is already NaN (F.cross_entropy's mean over nothing);
    # the z term adds 0 and, like the nll term's, a gradient of 0 (not 0/0).
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    return loss + z.sum() / denom


def make_input(shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape) * scale).to(dtype)


def class_target(input_shape, n_classes, ignored="none", ignore_index=-100, dtype=torch.int64):
    """Random class indices in [0, C); `ignored`: "none", "some" (about a third of the rows, at
    least one, and at least one kept when there are two or more) or "all" set to ignore_index."""
    shape = target_shape(input_shape)
    t = torch.randint(0, max(n_classes, 1), shape)
    if ignored == "some" and t.numel():
        mask = torch.rand(shape) < 0.3
        flat = mask.view(-1)
        flat[0] = True
        if flat.numel() > 1:
            flat[-1] = False
        t[mask] = ignore_index
    elif ignored == "all":
        t.fill_(ignore_index)
    return t.to(dtype)


def prob_target(input_shape, kind="softmax", dtype=torch.float32):
    """Class-probability targets: "softmax" (normalized) or "nonneg" (arbitrary non-negative
    values, not normalized, some exact zeros)."""
    if kind == "softmax":
        t = torch.softmax(torch.randn(input_shape), class_dim(torch.empty(input_shape)))
    else:
        t = torch.rand(input_shape) * 2
        t[t < 0.3] = 0
    return t.to(dtype)


def make_weight(n_classes, dtype=torch.float32):
    return (torch.rand(n_classes) * 2 + 0.1).to(dtype)


def reference_leaves(input, target, weight, rd, input_grad, target_grad):
    """(input, target, weight) for the reference in dtype rd: fresh leaves where they take a
    gradient, class indices as they are."""
    xr = leaf(input, rd) if input_grad else input.detach().to(rd)
    if target.is_floating_point():
        tr = leaf(target, rd) if target_grad else target.detach().to(rd)
    else:
        tr = target
    wr = None if weight is None else weight.detach().to(rd)
    return xr, tr, wr


def run_case(input, target, weight=None, *, grad="random", input_grad=True, target_grad=False, msg="", ref_dtype=None,
             **opts):
    """The loss of torch_ext.cross_entropy and its gradients (input, and target when
    target_grad) vs the reference, on fresh leaves. bfloat16 is compared with the float32
    computation from the same bfloat16 values. grad: "random" (a random grad_output of the
    loss's shape), "sum" (y.sum().backward(): a stride-0 grad_output), None (no backward) or a
    tensor. ref_dtype: the reference's dtype, if not reference_dtype(input.dtype). Returns
    (loss, grads)."""
    dtype = input.dtype
    rd = ref_dtype or reference_dtype(dtype)
    x = leaf(input) if input_grad else input.detach()
    t = leaf(target) if target_grad else target.detach()
    y = cross_entropy(x, t, weight, **opts)

    xr, tr, wr = reference_leaves(input, target, weight, rd, input_grad, target_grad)
    yr = reference(xr, tr, wr, **opts)

    tag = f"{msg} {dtype_id(dtype)} {opts}"
    assert y.shape == yr.shape, f"{tag}: loss shape {tuple(y.shape)} vs {tuple(yr.shape)}"
    assert_close(y, yr, dtype=dtype, equal_nan=True, msg=f"{tag}: loss")
    if grad is None or not (input_grad or target_grad):
        return y, []
    assert y.requires_grad, f"{tag}: the loss does not require grad"
    leaves = [v for v, r in ((x, input_grad), (t, target_grad)) if r]
    ref_leaves = [v for v, r in ((xr, input_grad), (tr, target_grad)) if r]
    if isinstance(grad, str) and grad == "sum":
        grads = torch.autograd.grad(y.sum(), leaves)
        ref_grads = torch.autograd.grad(yr.sum(), ref_leaves)
    else:
        g = torch.randn(y.shape).to(dtype) if isinstance(grad, str) else grad
        grads = torch.autograd.grad(y, leaves, g)
        ref_grads = torch.autograd.grad(yr, ref_leaves, g.to(rd))
    names = [n for n, r in (("grad_input", input_grad), ("grad_target", target_grad)) if r]
    for name, got, want, lf in zip(names, grads, ref_grads, leaves):
        assert got.shape == lf.shape, f"{tag}: {name} shape {tuple(got.shape)} vs {tuple(lf.shape)}"
        assert_close(got, want, dtype=dtype, equal_nan=True, msg=f"{tag}: {name}")
    return y, grads


# ----------------------------------------------------------------------------------------------
# 0. Signature
# ----------------------------------------------------------------------------------------------


def test_signature_mirrors_functional():
    ours = inspect.signature(cross_entropy).parameters
    theirs = inspect.signature(F.cross_entropy).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
        assert ours[name].kind == p.kind, name
    extras = {"z_loss": 0.0, "softcap": None, "return_lse": False, "return_accuracy": False,
              "num_items_in_batch": None}
    assert list(ours)[len(theirs):] == list(extras)
    for name, default in extras.items():
        assert ours[name].kind == inspect.Parameter.KEYWORD_ONLY and ours[name].default == default, name
    assert ours["num_items_in_batch"].kind == inspect.Parameter.KEYWORD_ONLY
    assert ours["num_items_in_batch"].default is None
    mod = inspect.signature(CrossEntropyLoss.__init__).parameters
    ref_mod = inspect.signature(nn.CrossEntropyLoss.__init__).parameters
    for name, p in ref_mod.items():
        if name != "self":
            assert name in mod and mod[name].default == p.default, name
    for name in ("z_loss", "softcap", "return_lse", "return_accuracy"):
        assert mod[name].kind == inspect.Parameter.KEYWORD_ONLY and mod[name].default == extras[name], name


# ----------------------------------------------------------------------------------------------
# 1. Every option combination vs PyTorch
# ----------------------------------------------------------------------------------------------

MATRIX_SHAPES = [(5,), (4, 5), (3, 6, 2), (2, 3, 2, 3), (2, 4, 1, 2, 2)]
# (ignored, ignore_index) of class-index targets; uint8 targets cannot hold -100.
IGNORE_CASES_INT64 = [("none", -100), ("some", -100), ("some", 2), ("all", -100), ("all", 2)]
IGNORE_CASES_UINT8 = [("none", -100), ("some", 2), ("all", 2)]
TARGET_KINDS = ("int64", "uint8", "softmax", "nonneg")


def _target(kind, shape, dtype, ignored, ignore_index):
    c = shape[class_dim(torch.empty(shape))]
    if kind in ("softmax", "nonneg"):
        return prob_target(shape, kind, dtype)
    return class_target(shape, c, ignored, ignore_index, torch.int64 if kind == "int64" else torch.uint8)


@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("z_loss", Z_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_pytorch(dtype, reduction, z_loss, kind, grad_in_forward):
    # Every combination of weight x ignore_index case x label_smoothing (x the parameters of the
    # test): loss, the input gradient for a random grad_output, and the target's gradient for
    # probability targets. Each combination runs on one of the shapes, rotating with the test's
    # parameters, so that every shape meets every combination across the parametrization.
    prob = kind in ("softmax", "nonneg")
    if prob:
        ignore_cases = [("none", -100)]
    else:
        ignore_cases = IGNORE_CASES_INT64 if kind == "int64" else IGNORE_CASES_UINT8
    offset = DTYPES.index(dtype) + 3 * REDUCTIONS.index(reduction) + Z_LOSSES.index(z_loss)
    combos = itertools.product(ignore_cases, (False, True), LABEL_SMOOTHINGS)
    for i, ((ignored, ii), weighted, ls) in enumerate(combos):
        shape = MATRIX_SHAPES[(i + offset) % len(MATRIX_SHAPES)]
        c = shape[class_dim(torch.empty(shape))]
        x = make_input(shape, dtype)
        target = _target(kind, shape, dtype, ignored, ii)
        w = make_weight(c, dtype) if weighted else None
        y, _ = run_case(
            x, target, w, target_grad=prob, ignore_index=ii, reduction=reduction, label_smoothing=ls, z_loss=z_loss,
            msg=f"{shape} {kind} ignored={ignored} weighted={weighted}",
        )
        assert y.shape == (target_shape(shape) if reduction == "none" else ())
        assert y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_output_dtype_shape_and_stats(dtype):
    x = make_input((2, 7, 3), dtype)
    t = class_target(x.shape, 7)
    for reduction in REDUCTIONS:
        loss, stats, *_ = FWD(x, t, None, -100, reduction, 0.0, 0.0, NO_GRADS)
        assert loss.dtype == dtype
        assert loss.shape == ((2, 3) if reduction == "none" else ())
        assert stats.shape == (6, 3)
        assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(loss, reference(x.to(reference_dtype(dtype)), t, reduction=reduction), dtype=dtype)
    loss, stats, *_ = FWD(x, prob_target(x.shape, dtype=dtype), None, -100, "none", 0.1, 1e-3, NO_GRADS)
    assert loss.shape == (2, 3) and stats.shape == (6, 3)
    loss, stats, *_ = FWD(make_input((9,), dtype), torch.tensor(3), None, -100, "none", 0.0, 0.0, NO_GRADS)
    assert loss.shape == () and stats.shape == (1, 3)


# ----------------------------------------------------------------------------------------------
# 2. Shapes: class counts, rows, empty tensors
# ----------------------------------------------------------------------------------------------

CLASS_COUNTS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 1000, 1003, 1031, 2048, 5000]


@pytest.mark.parametrize("c", CLASS_COUNTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_class_counts(dtype, c):
    # Vectorized bodies and tails of every length; C = 5000 spans several internal blocks.
    x = make_input((3, c), dtype)
    w = make_weight(c, dtype)
    run_case(x, class_target(x.shape, c), msg=f"C={c} plain")
    run_case(x, class_target(x.shape, c, "some", -100), w, reduction="none", label_smoothing=0.1, z_loss=1e-3,
             msg=f"C={c} all options")
    run_case(x, class_target(x.shape, c, "none", 2), w, reduction="mean", ignore_index=2, label_smoothing=1.0,
             z_loss=0.5, msg=f"C={c} ls=1")
    run_case(x, prob_target(x.shape, "softmax", dtype), w, target_grad=True, reduction="sum", label_smoothing=0.1,
             z_loss=1e-3, msg=f"C={c} probabilities")
    run_case(x, prob_target(x.shape, "nonneg", dtype), None, target_grad=True, reduction="none", msg=f"C={c} nonneg")


SHAPE_CASES = [
    pytest.param((1, 5), id="one_row"),
    pytest.param((1, 5, 1), id="one_row_3d"),
    pytest.param((1, 1), id="1x1"),
    pytest.param((1,), id="1d_one_class"),
    pytest.param((257, 37), id="257x37"),
    pytest.param((700, 3), id="many_rows_c3"),
    pytest.param((2, 7, 16, 16), id="segmentation_4d"),
    pytest.param((2, 19, 33, 5), id="segmentation_odd"),
    pytest.param((2, 3, 5, 4, 3), id="volumetric_5d"),
    pytest.param((2, 1100, 3), id="wide_spatial"),
    pytest.param((2, 5000, 2), id="c5000_spatial"),
    pytest.param((1033,), id="1d_1033"),
    pytest.param((4096, 17), id="parallel_rows"),  # several at::parallel_for chunks
    pytest.param((4, 9, 32, 32), id="parallel_spatial"),
]


@pytest.mark.parametrize("shape", SHAPE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_shapes(dtype, shape, grad_in_forward):
    c = shape[class_dim(torch.empty(shape))]
    x = make_input(shape, dtype)
    w = make_weight(c, dtype)
    for reduction in REDUCTIONS:
        run_case(x, class_target(shape, c), reduction=reduction, msg=f"{shape}")
        run_case(x, class_target(shape, c, "some", 2), w, ignore_index=2, reduction=reduction, label_smoothing=0.1,
                 z_loss=1e-3, msg=f"{shape} options")
        run_case(x, prob_target(shape, "softmax", dtype), w, target_grad=True, reduction=reduction,
                 label_smoothing=0.1, z_loss=0.5, msg=f"{shape} probabilities")


EMPTY_SHAPES = [
    pytest.param((0, 5), id="n0"),
    pytest.param((0, 5, 3), id="n0_3d"),
    pytest.param((2, 5, 0), id="spatial0"),
    pytest.param((2, 5, 3, 0), id="spatial0_4d"),
    pytest.param((0, 1100), id="n0_wide"),
]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("z_loss", [0.0, 0.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_empty(dtype, reduction, z_loss, shape, grad_in_forward):
    # mean over no rows is NaN, sum is 0, none is empty, as PyTorch; gradients are empty.
    c = shape[1]
    x = make_input(shape, dtype)
    w = make_weight(c, dtype)
    for target, tg in ((class_target(shape, c), False), (prob_target(shape, "softmax", dtype), True)):
        for weight, ls in ((None, 0.0), (w, 0.1)):
            y, grads = run_case(x, target, weight, target_grad=tg, reduction=reduction, label_smoothing=ls,
                                z_loss=z_loss, msg=f"empty {shape}")
            if reduction == "mean":
                assert torch.isnan(y).item()
            elif reduction == "sum":
                assert y.item() == 0
            else:
                assert y.numel() == 0
            for g in grads:
                assert g.numel() == 0


# ----------------------------------------------------------------------------------------------
# 3. ignore_index, weights, label smoothing details
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("z_loss", [0.0, 0.5])
@pytest.mark.parametrize("ls", LABEL_SMOOTHINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_all_ignored(dtype, ls, z_loss, grad_in_forward):
    # Every row ignored: mean is NaN, sum 0, none all 0; the gradient is exactly 0 (PyTorch's
    # too, even for mean), never NaN.
    x = make_input((4, 6, 2), dtype)
    w = make_weight(6, dtype)
    for ii, weight in ((-100, None), (2, w), (-100, w)):
        t = class_target(x.shape, 6, "all", ii)
        for reduction in REDUCTIONS:
            y, (gx,) = run_case(x, t, weight, ignore_index=ii, reduction=reduction, label_smoothing=ls,
                                z_loss=z_loss, msg="all ignored")
            if reduction == "mean":
                assert torch.isnan(y).item()
            else:
                assert (y == 0).all()
            assert (gx == 0).all(), f"gradient of an all-ignored batch ({reduction}): {gx}"
    # The same through .backward() (grad_output 1 of the NaN mean).
    xl = leaf(x)
    cross_entropy(xl, class_target(x.shape, 6, "all"), label_smoothing=ls, z_loss=z_loss).backward()
    assert (xl.grad == 0).all()


def test_ignore_index_outside_class_range():
    # Targets equal to an ignore_index outside [0, C) are ignored, not out of range (PyTorch).
    x = make_input((6, 5))
    t = torch.tensor([7, 0, 7, 4, 1, 7])
    run_case(x, t, make_weight(5), ignore_index=7, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    run_case(x, t, ignore_index=7, reduction="mean")
    t = torch.tensor([-1, 0, -1, 4, 1, 2])
    run_case(x, t, ignore_index=-1, z_loss=0.5, reduction="sum")
    # uint8 targets with ignore_index 255
    t = torch.tensor([255, 0, 3, 255, 1, 2], dtype=torch.uint8)
    run_case(x, t, make_weight(5), ignore_index=255, label_smoothing=0.1, reduction="mean")


def test_probability_targets_negative_ignore_index_accepted():
    # A negative ignore_index is accepted with probability targets (and has no effect), as in
    # PyTorch; only ignore_index >= 0 is an error.
    x = make_input((4, 5))
    t = prob_target(x.shape)
    for ii in (-100, -1, -7):
        run_case(x, t, make_weight(5), target_grad=True, ignore_index=ii, label_smoothing=0.1, z_loss=1e-3)


def test_uint8_targets_equal_int64():
    x = make_input((3, 200, 2))
    t = class_target(x.shape, 200, "some", 7)
    w = make_weight(200)
    for reduction in REDUCTIONS:
        a = cross_entropy(x, t, w, ignore_index=7, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        b = cross_entropy(x, t.to(torch.uint8), w, ignore_index=7, reduction=reduction, label_smoothing=0.1,
                          z_loss=1e-3)
        assert_close(b, a)
    run_case(x, t.to(torch.uint8), w, ignore_index=7, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_z_loss_values(dtype):
    # z_loss alone, explicitly: the difference of the losses with and without z_loss is
    # z * reduce(row_weight * lse**2), for each reduction and target kind.
    x = make_input((5, 7), dtype)
    xr = x.to(reference_dtype(dtype))
    lse2 = torch.logsumexp(xr, 1).square()
    w = make_weight(7, dtype)
    t = torch.tensor([0, 3, -100, 6, 3])
    rw = torch.stack([w[0], w[3], torch.zeros((), dtype=dtype), w[6], w[3]]).to(xr.dtype)
    for reduction in REDUCTIONS:
        with_z = cross_entropy(x, t, w, reduction=reduction, z_loss=0.5)
        without = cross_entropy(x, t, w, reduction=reduction)
        expected = 0.5 * rw * lse2
        expected = {"none": expected, "sum": expected.sum(), "mean": expected.sum() / rw.sum()}[reduction]
        ref_total = reference(xr, t, w.to(xr.dtype), reduction=reduction, z_loss=0.5)
        assert_close(with_z, ref_total, dtype=dtype)
        assert_close(with_z.to(xr.dtype) - without.to(xr.dtype), expected, dtype=dtype, check_dtype=False,
                     scale=max(1.0, ref_total.abs().max().item()), msg=f"z term {reduction}")
    p = prob_target(x.shape, dtype=dtype)
    for reduction in REDUCTIONS:
        with_z = cross_entropy(x, p, w, reduction=reduction, z_loss=1e-3)
        ref_total = reference(xr, p.to(xr.dtype), w.to(xr.dtype), reduction=reduction, z_loss=1e-3)
        assert_close(with_z, ref_total, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# 4. Numerical stability
# ----------------------------------------------------------------------------------------------

BIG_CASES = [
    pytest.param(1e4, "spread", id="1e4_spread"),
    pytest.param(3e4, "spread", id="3e4_spread"),
    pytest.param(1e4, "offset", id="+1e4_offset"),
    pytest.param(-1e4, "offset", id="-1e4_offset"),
    pytest.param(3e4, "offset", id="+3e4_offset"),
    pytest.param(-3e4, "offset", id="-3e4_offset"),
]


def _big_logits(shape, scale, how, dtype):
    if how == "spread":  # logits of magnitude up to a few times `scale`, both signs
        return make_input(shape, dtype, scale)
    # all logits near +-scale: the row's spread is O(1) (fp32) but every value is huge
    return (scale + torch.randn(shape) * 3).to(dtype)


@pytest.mark.parametrize("scale,how", BIG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_large_logits(dtype, scale, how):
    for shape in ((6, 37), (2, 19, 3), (3, 1100)):
        c = shape[1]
        x = _big_logits(shape, scale, how, dtype)
        w = make_weight(c, dtype)
        for reduction, ls, z in (("none", 0.0, 0.0), ("mean", 0.1, 1e-3), ("sum", 1.0, 0.5), ("none", 0.1, 1e-3)):
            # A float64 reference: PyTorch's float32 z_loss gradient (through torch.logsumexp)
            # rounds lse near 1e4 to a float32 step (5e-4) and is itself off by more than the
            # float32 tolerance; the float64 result is the exact answer the kernel must meet.
            y, grads = run_case(x, class_target(shape, c, "some", -100), w, reduction=reduction, label_smoothing=ls,
                                z_loss=z, msg=f"{how} {scale} {shape}", ref_dtype=torch.float64)
            assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
            y, grads = run_case(x, prob_target(shape, "softmax", dtype), None, target_grad=True, reduction=reduction,
                                label_smoothing=ls, z_loss=z, msg=f"{how} {scale} {shape} probabilities",
                                ref_dtype=torch.float64)
            assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.cpu_only("the CPU kernels' flush-to-zero (csrc/cpu/kernels/common.h)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_subnormal_probabilities_flush_to_zero(dtype):
    # Logits of 30 * randn put many probabilities / N below float's normal range: PyTorch returns
    # them subnormal, the CPU kernels 0 (Intel CPUs form subnormals ~100x slower). Every other entry
    # matches the float64 answer, and the caller's thread still forms subnormals afterwards.
    tiny = torch.finfo(torch.float32).tiny
    for shape in ((64, 3000), (4, 1500, 2)):
        x = (30 * torch.randn(shape)).to(dtype)
        t = class_target(shape, shape[1])
        for reduction in REDUCTIONS:  # (label smoothing would lift every entry to ~smoothing / C)
            xo, xr = leaf(x), leaf(x, torch.float64)
            g = torch.rand(shape[:1] + shape[2:]) if reduction == "none" else torch.tensor(1.0)
            (cross_entropy(xo, t, reduction=reduction) * g).sum().backward()
            (F.cross_entropy(xr, t, reduction=reduction) * g.double()).sum().backward()
            ours, ref = xo.grad, xr.grad
            subnormal = (ref != 0) & (ref.abs() < tiny)
            assert subnormal.any(), "the case must reach subnormal gradients"
            assert not ((ours != 0) & (ours.float().abs() < tiny)).any(), f"{shape} {reduction}"
            # (4 * tiny: ATen's exp_u20, which runs where AVX-512 does not, gives 0 below 2^-125)
            assert_close(ours, ref, dtype=dtype, check_dtype=False, atol=4 * tiny, msg=f"{shape} {reduction}")
            assert (ours[ref.abs() > 4 * tiny] != 0).all()
    assert torch.tensor(1e-30) * torch.tensor(1e-10) != 0  # this thread's flush-to-zero left as it was


def test_probabilities_keep_float_accuracy_across_the_exponent_range():
    # The softmax's exponentials (csrc/cpu/kernels/common.h's fast_exp on AVX-512) over the whole
    # range a probability can take in float: each gradient entry p_c of a sum-reduced loss is
    # within a few float steps of the float64 answer, relative to itself, from p ~ 1 down to
    # p ~ 2^-120 (2^n times the polynomial: an error in the range reduction grows with |n|).
    for shape in ((8, 4000), (2, 4000, 3)):
        x = torch.empty(shape).uniform_(-83.0, 0.0)
        x.select(1, 0).fill_(0.0)  # the max: every row's lse is within log(C) of 0
        t = torch.ones(shape[:1] + shape[2:], dtype=torch.long)
        xo, xr = leaf(x), leaf(x, torch.float64)
        cross_entropy(xo, t, reduction="sum").backward()
        F.cross_entropy(xr, t, reduction="sum").backward()
        ref, ours = xr.grad.narrow(1, 2, shape[1] - 2), xo.grad.narrow(1, 2, shape[1] - 2).double()
        normal = ref.abs() > 2.0**-124  # (exp_u20, off AVX-512, gives 0 below 2^-125)
        ref, ours = ref[normal], ours[normal]
        assert ref.abs().min() < 2.0**-120  # the case spans the range
        # 1e-6: a few float steps; the (N, C, d) kernels take exp(x - lse) in one exponential, and
        # inherit the float rounding of lse and of x - lse (up to a step of |log p|)
        bound = 1e-6 if len(shape) == 2 else 2e-6 + ref.abs().log().abs() * 2.0**-23
        rel = ((ours - ref) / ref).abs()
        worst = (rel / bound).argmax()
        assert (rel < bound).all(), f"{shape}: relative error {rel[worst]:.3g} at p = {ref[worst]:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_minus_inf_logits(dtype):
    # -inf in non-target classes: finite loss and gradient (0 at the -inf logits), as PyTorch.
    for shape in ((4, 9), (2, 9, 3), (3, 1100)):
        c = shape[1]
        x = make_input(shape, dtype)
        t = class_target(shape, c)
        tc = t.unsqueeze(1)
        mask = torch.rand(shape) < 0.4
        mask.scatter_(1, tc, False)  # never the target class
        x = x.masked_fill(mask, float("-inf"))
        w = make_weight(c, dtype)
        for reduction, z in itertools.product(REDUCTIONS, (0.0, 0.5)):
            for weight in (None, w):
                y, (gx,) = run_case(x, t, weight, reduction=reduction, z_loss=z, msg=f"-inf {shape}")
                assert torch.isfinite(y).all() and torch.isfinite(gx).all()
                assert (gx[mask] == 0).all()
            # Label smoothing puts weight on the -inf logits: the loss is +inf (PyTorch's too),
            # the gradient stays finite.
            y, (gx,) = run_case(x, t, w, reduction=reduction, z_loss=z, label_smoothing=0.1,
                                msg=f"-inf {shape} smoothing")
            assert torch.isinf(y).any() and torch.isfinite(gx).all()


def test_ill_conditioned_rows_bf16_vs_fp32_reference():
    # bfloat16 logits spanning the bf16 range of a row: exp underflows for most classes.
    x = torch.cat([torch.full((3, 10), -3e4), torch.randn(3, 10) * 50, torch.full((3, 10), 3e4)], 1)
    x = x[:, torch.randperm(30)].to(torch.bfloat16)
    run_case(x, class_target(x.shape, 30), reduction="none", z_loss=1e-3)
    run_case(x, prob_target(x.shape, dtype=torch.bfloat16), target_grad=True, reduction="none", label_smoothing=0.1)


# ----------------------------------------------------------------------------------------------
# 5. Non-contiguous and expanded tensors
# ----------------------------------------------------------------------------------------------


def _layout_case(name, dtype):
    """(input, target, weight, grad_output or "random"/"sum", prob) with one odd layout each."""
    n, c = 6, 13
    x = make_input((n, c), dtype)
    t = class_target((n, c), c, "some", -100)
    w = make_weight(c, dtype)
    grad = "random"
    prob = False
    if name == "input_transposed":
        x = make_input((c, n), dtype).t()
    elif name == "input_sliced_classes":
        x = make_input((n, 2 * c), dtype)[:, ::2]
    elif name == "input_sliced_rows":
        x = make_input((2 * n, c), dtype)[::2]
    elif name == "input_expanded_rows":  # stride (0, 1)
        x = make_input((1, c), dtype).expand(n, c)
    elif name == "input_expanded_classes":  # stride (1, 0): every class the same logit
        x = make_input((n, 1), dtype).expand(n, c)
    elif name == "input_channels_last":
        x = make_input((2, c, 3, 4), dtype).contiguous(memory_format=torch.channels_last)
        t = class_target(x.shape, c, "some", -100)
    elif name == "input_3d_permuted":  # (N, C, d) with the class dim innermost in memory
        x = make_input((2, 5, c), dtype).permute(0, 2, 1)
        t = class_target(x.shape, c, "some", -100)
    elif name == "input_3d_sliced":
        x = make_input((2, c, 9), dtype)[:, :, 1::3]
        t = class_target(x.shape, c, "some", -100)
    elif name == "input_1d_sliced":
        x = make_input((3 * c,), dtype)[::3]
        t = torch.tensor(4)
    elif name == "target_sliced":
        t = class_target((3 * n, c), c, "some", -100)[::3]
    elif name == "target_expanded":
        t = torch.tensor(3).expand(n)
    elif name == "target_3d_transposed":
        x = make_input((2, c, 5), dtype)
        t = class_target((2, c, 5), c, "some", -100).t().contiguous().t()  # (2, 5), strides (1, 2)
    elif name == "prob_target_transposed":
        t = prob_target((c, n), dtype=dtype).t()
        prob = True
    elif name == "prob_target_expanded":
        t = prob_target((1, c), dtype=dtype).expand(n, c)
        prob = True
    elif name == "prob_both_channels_last":
        x = make_input((2, c, 3, 4), dtype).contiguous(memory_format=torch.channels_last)
        t = prob_target((2, c, 3, 4), dtype=dtype).contiguous(memory_format=torch.channels_last)
        prob = True
    elif name == "weight_sliced":
        w = make_weight(2 * c, dtype)[::2]
    elif name == "weight_expanded":
        w = make_weight(1, dtype).expand(c)
    elif name == "grad_expanded":  # stride 0
        grad = torch.randn(1).to(dtype).expand(n)
    elif name == "grad_sliced":
        grad = torch.randn(2 * n).to(dtype)[::2]
    elif name == "grad_from_sum":
        grad = "sum"
    elif name == "grad_3d_transposed":
        x = make_input((2, c, 5), dtype)
        t = class_target(x.shape, c, "some", -100)
        grad = torch.randn(5, 2).to(dtype).t()
    elif name == "grad_3d_expanded":
        x = make_input((2, c, 5), dtype)
        t = class_target(x.shape, c, "some", -100)
        grad = torch.randn(1, 5).to(dtype).expand(2, 5)
    elif name == "grad_3d_from_sum":
        x = make_input((2, c, 3, 4), dtype)
        t = class_target(x.shape, c, "some", -100)
        grad = "sum"
    elif name == "all_strided":
        x = make_input((c, 2 * n), dtype).t()[::2]
        t = class_target((2 * n, c), c, "some", -100)[::2]
        w = make_weight(2 * c, dtype)[::2]
        grad = torch.randn(1).to(dtype).expand(n)
    else:
        raise AssertionError(name)
    return x, t, w, grad, prob


LAYOUT_CASES = [
    "input_transposed", "input_sliced_classes", "input_sliced_rows", "input_expanded_rows",
    "input_expanded_classes", "input_channels_last", "input_3d_permuted", "input_3d_sliced",
    "input_1d_sliced", "target_sliced", "target_expanded", "target_3d_transposed",
    "prob_target_transposed", "prob_target_expanded", "prob_both_channels_last", "weight_sliced",
    "weight_expanded", "grad_expanded", "grad_sliced", "grad_from_sum", "grad_3d_transposed",
    "grad_3d_expanded", "grad_3d_from_sum", "all_strided",
]


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_noncontiguous(dtype, case, grad_in_forward):
    x, t, w, grad, prob = _layout_case(case, dtype)
    if case.startswith("input"):
        assert not x.is_contiguous()
    for z, ls in ((0.0, 0.0), (1e-3, 0.1)):
        ii = -100
        run_case(x, t, w, grad=grad, target_grad=prob, reduction="none", label_smoothing=ls, z_loss=z,
                 ignore_index=ii, msg=case)
        if not isinstance(grad, torch.Tensor):
            run_case(x, t, w, grad=grad, target_grad=prob, reduction="mean", label_smoothing=ls, z_loss=z, msg=case)


def test_noncontiguous_gives_same_bits_as_contiguous():
    # The kernel reads strided input correctly: results equal the contiguous copy's closely.
    x = make_input((2, 37, 3, 4)).contiguous(memory_format=torch.channels_last)
    t = class_target(x.shape, 37, "some", -100)
    a = cross_entropy(x, t, reduction="none", z_loss=1e-3, label_smoothing=0.1)
    b = cross_entropy(x.contiguous(), t, reduction="none", z_loss=1e-3, label_smoothing=0.1)
    assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# 6. Autograd behaviour: second forward, partial requires_grad (retain_graph, double backward:
#    tests/test_common.py)
# ----------------------------------------------------------------------------------------------


def test_second_forward_after_backward(grad_in_forward):
    w = make_weight(9)
    for i in range(3):
        x = make_input((4, 9))
        t = class_target(x.shape, 9, "some", -100)
        run_case(x, t, w, reduction="none", label_smoothing=0.1, z_loss=0.5, msg=f"round {i}")
    # Same leaf, two forwards, two backwards.
    x = leaf(make_input((4, 9)))
    t = class_target(x.shape, 9)
    cross_entropy(x, t, z_loss=1e-3).backward()
    g1 = x.grad.clone()
    cross_entropy(x, t, z_loss=1e-3).backward()
    assert_close(x.grad, 2 * g1)
    xr = leaf(x)
    reference(xr, t, z_loss=1e-3).backward()
    assert_close(g1, xr.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_only_target_requires_grad(reduction):
    x = make_input((2, 7, 3))
    t = prob_target(x.shape)
    y, (gt,) = run_case(x, t, make_weight(7), input_grad=False, target_grad=True, reduction=reduction,
                        label_smoothing=0.1, z_loss=1e-3)
    assert gt.shape == t.shape
    xx, tl = x.clone(), leaf(t)
    cross_entropy(xx, tl, reduction=reduction).sum().backward()
    assert xx.grad is None and tl.grad is not None


def test_nothing_requires_grad():
    x = make_input((4, 5))
    t = class_target(x.shape, 5)
    y = cross_entropy(x, t, z_loss=1e-3)
    assert_close(y, reference(x, t, z_loss=1e-3))
    assert not y.requires_grad and y.grad_fn is None
    y2 = cross_entropy(x, prob_target(x.shape))
    assert not y2.requires_grad
    with torch.no_grad():
        y3 = cross_entropy(leaf(x), class_target(x.shape, 5))
    assert not y3.requires_grad


def test_input_grad_only_with_prob_target_not_requiring_grad():
    x = leaf(make_input((4, 5)))
    t = prob_target(x.shape)
    cross_entropy(x, t, label_smoothing=0.1).backward()
    assert t.grad is None and x.grad is not None
    xr = leaf(x)
    F.cross_entropy(xr, t, label_smoothing=0.1).backward()
    assert_close(x.grad, xr.grad)


# ----------------------------------------------------------------------------------------------
# 7. gradcheck (float64)
# ----------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    # id, shape, target kind, weighted, ignore_index, reduction, label_smoothing, z_loss
    ("class_mean", (3, 4), "class", False, -100, "mean", 0.0, 0.0),
    ("class_all_options", (3, 4), "class_some", True, -100, "none", 0.1, 1e-3),
    ("class_ii2_sum_ls1", (4, 5), "class_ii2", True, 2, "sum", 1.0, 0.5),
    ("class_3d_mean_z", (2, 4, 3), "class_some", True, -100, "mean", 0.1, 0.5),
    ("class_1d", (5,), "class", True, -100, "none", 0.1, 1e-3),
    ("prob_mean", (3, 4), "prob", False, -100, "mean", 0.0, 0.0),
    ("prob_all_options", (3, 4), "prob", True, -100, "none", 0.1, 0.5),
    ("prob_3d_sum", (2, 4, 3), "nonneg", True, -100, "sum", 0.1, 1e-3),
    ("prob_1d", (5,), "prob", False, -100, "mean", 1.0, 1e-3),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(case, grad_in_forward):
    _, shape, kind, weighted, ii, reduction, ls, z = case
    c = shape[class_dim(torch.empty(shape))]
    x = leaf(make_input(shape, torch.float64))
    w = make_weight(c, torch.float64) if weighted else None
    opts = dict(ignore_index=ii, reduction=reduction, label_smoothing=ls, z_loss=z)
    if kind.startswith("class"):
        ignored = "some" if kind in ("class_some", "class_ii2") else "none"
        t = class_target(shape, c, ignored, ii)
        assert torch.autograd.gradcheck(lambda a: cross_entropy(a, t, w, **opts), (x,))
    else:
        t = leaf(prob_target(shape, "softmax" if kind == "prob" else "nonneg", torch.float64))
        assert torch.autograd.gradcheck(lambda a, b: cross_entropy(a, b, w, **opts), (x, t))
        # target alone, and through the raw op (loss output only)
        assert torch.autograd.gradcheck(lambda b: cross_entropy(x.detach(), b, w, **opts), (t,))
        assert torch.autograd.gradcheck(lambda a, b: FWD(a, b, w, -100, reduction, ls, z, NO_GRADS)[0], (x, t))


def test_gradcheck_raw_op_class_targets():
    x = leaf(make_input((2, 5, 3), torch.float64))
    t = class_target(x.shape, 5, "some", 1)
    w = make_weight(5, torch.float64)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda a: FWD(a, t, w, 1, reduction, 0.1, 1e-3, NO_GRADS)[0], (x,))


# ----------------------------------------------------------------------------------------------
# 8. What is saved for backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["class", "class_options", "prob", "bf16", "segmentation"])
def test_saved_bytes_far_below_eager(case, grad_in_forward):
    """The forward/backward pair saves a few floats per row where eager saves the N x C
    log-probabilities; the gradient-in-forward path holds the input's gradient instead (N x C,
    as a saved tensor: hooks see it), and nothing else of that size."""
    n, c = 64, 1000
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    shape = (4, c, 4, 4) if case == "segmentation" else (n, c)
    rows = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    x = leaf(make_input(shape, dtype))
    w = make_weight(c, dtype)
    if case == "prob":
        t = leaf(prob_target(shape, dtype=dtype))
    else:
        t = class_target(shape, c, "some", -100)
    opts = dict(label_smoothing=0.1, z_loss=1e-3) if case != "class" else {}
    weight = w if case != "class" else None
    with SavedTensorBytes() as fused_rec:
        y = cross_entropy(x, t, weight, **opts)
    with SavedTensorBytes() as eager_rec:
        y_ref = reference(x, t, weight, **opts)
    fused_bytes = fused_rec.bytes_excluding((x, t, weight))
    eager_bytes = eager_rec.bytes_excluding((x, t, weight))
    elem = x.element_size()
    assert eager_bytes >= rows * c * elem  # eager keeps the log-probabilities (N x C)
    held = rows * c * elem if grad_in_forward and case != "prob" else 0  # the gradient, formed in forward
    # No other N x C tensor besides the input: a few floats per row at most.
    assert held <= fused_bytes <= held + rows * 64, (fused_bytes, eager_bytes)
    if not held:
        assert fused_bytes <= eager_bytes / 32, (fused_bytes, eager_bytes)
    leaves = (x, t) if case == "prob" else (x,)
    grads = torch.autograd.grad(y, leaves)
    ref_grads = torch.autograd.grad(y_ref, leaves)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, dtype=dtype, rtol=tolerance(dtype)[0] * 2, atol=tolerance(dtype)[1] * 2)


# ----------------------------------------------------------------------------------------------
# 9. opcheck and the raw backward op
# ----------------------------------------------------------------------------------------------

OPCHECK_SAMPLES = [
    # id, input shape, target kind, weighted, ignore_index, reduction, label_smoothing, z_loss, requires_grad
    ("2d_class_mean_grad", (5, 7), "class", False, -100, "mean", 0.0, 0.0, True),
    ("2d_class_options_nograd", (5, 7), "class", True, 2, "none", 0.1, 1e-3, False),
    ("3d_class_sum_grad", (2, 7, 3), "class", True, -100, "sum", 1.0, 0.5, True),
    ("1d_class_none_grad", (7,), "class", False, -100, "none", 0.1, 1e-3, True),
    ("2d_prob_mean_grad", (5, 7), "prob", True, -100, "mean", 0.1, 1e-3, True),
    ("3d_prob_none_nograd", (2, 7, 3), "prob", False, -100, "none", 0.0, 0.5, False),
    ("uint8_class_none", (4, 7), "uint8", False, 3, "none", 0.0, 0.0, True),
]


def _opcheck_args(shape, kind, weighted, ii, requires_grad):
    c = shape[class_dim(torch.empty(shape))]
    x = make_input(shape)
    w = make_weight(c) if weighted else None
    if kind == "prob":
        t = prob_target(shape)
        if requires_grad:
            t = leaf(t)
    else:
        t = class_target(shape, c, "some" if ii == -100 and shape[0] > 1 else "none", ii,
                         torch.uint8 if kind == "uint8" else torch.int64)
    if requires_grad:
        x = leaf(x)
    return x, t, w


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=[s[0] for s in OPCHECK_SAMPLES])
def test_opcheck_fwd(sample):
    _, shape, kind, weighted, ii, reduction, ls, z, rg = sample
    x, t, w = _opcheck_args(shape, kind, weighted, ii, rg)
    torch.library.opcheck(FWD, (x, t, w, ii, reduction, ls, z, NO_GRADS))


BWD_SAMPLES = [
    # id, input shape, target kind, reduction, output_mask
    ("2d_class_mean", (5, 7), "class", "mean", [True, False]),
    ("3d_class_none", (2, 7, 3), "class", "none", [True, False]),
    ("2d_prob_none_both", (5, 7), "prob", "none", [True, True]),
    ("3d_prob_sum_target_only", (2, 7, 3), "prob", "sum", [False, True]),
]


def _bwd_args(shape, kind, reduction, weighted=True, ls=0.1, z=1e-3):
    c = shape[class_dim(torch.empty(shape))]
    x = make_input(shape)
    w = make_weight(c) if weighted else None
    t = prob_target(shape) if kind == "prob" else class_target(shape, c, "some", -100)
    loss, stats, *_ = FWD(x, t, w, -100, reduction, ls, z, NO_GRADS)
    g = torch.randn(loss.shape)
    return g, x, t, w, stats


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", BWD_SAMPLES, ids=[s[0] for s in BWD_SAMPLES])
def test_opcheck_bwd(sample, requires_grad):
    _, shape, kind, reduction, mask = sample
    g, x, t, w, stats = _bwd_args(shape, kind, reduction)
    if not requires_grad:
        torch.library.opcheck(BWD, (g, x, t, w, stats, -100, reduction, 0.1, 1e-3, mask))
        return
    # The backward op is differentiable once, by design: its autograd raises on double backward.
    # Every opcheck utility runs except the one that differentiates through it, which must fail
    # with that message.
    g, x = leaf(g), leaf(x)
    if kind == "prob":
        t = leaf(t)
    args = (g, x, t, w, stats, -100, reduction, 0.1, 1e-3, mask)
    torch.library.opcheck(BWD, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="does not support double backward"):
        torch.library.opcheck(BWD, args, test_utils="test_aot_dispatch_dynamic")


@pytest.mark.parametrize("softcap", [0.0, 3.0], ids=["uncapped", "softcap"])
@pytest.mark.parametrize("sample", BWD_SAMPLES, ids=[s[0] for s in BWD_SAMPLES])
def test_bwd_composite_matches_bwd_op(sample, softcap):
    # cross_entropy_bwd_composite (create_graph's backward: the loss in PyTorch's ops, differentiated)
    # gives cross_entropy_bwd's gradients, with every option; every opcheck utility passes on it,
    # differentiating through it included.
    _, shape, kind, reduction, mask = sample
    c = shape[class_dim(torch.empty(shape))]
    x = make_input(shape, torch.float64, scale=3.0)
    w = make_weight(c, torch.float64)
    t = prob_target(shape, dtype=torch.float64) if kind == "prob" else class_target(shape, c, "some", -100)
    loss, stats, *_ = FWD(x, t, w, -100, reduction, 0.1, 1e-2, NO_GRADS, softcap)
    g = torch.randn(loss.shape, dtype=torch.float64)
    want = BWD(g, x, t, w, stats, -100, reduction, 0.1, 1e-2, mask, softcap)
    args = (leaf(g), leaf(x), leaf(t) if kind == "prob" else t, w, -100, reduction, 0.1, 1e-2, mask, softcap)
    got = torch.ops.torch_ext.cross_entropy_bwd_composite(*args)
    for name, a, e, m in zip(("input", "target"), got, want, mask):
        assert (a is None) == (not m), name
        if m:
            assert_close(a, e, msg=f"grad_{name}")
    torch.library.opcheck(torch.ops.torch_ext.cross_entropy_bwd_composite.default, args)


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck(kind, reduction):
    # Second derivatives through the loss with every option at once (softcap, z_loss, label
    # smoothing, class weights, ignored rows): gradgradcheck in float64.
    x = make_input((4, 6), torch.float64)
    t = prob_target((4, 6), dtype=torch.float64) if kind == "prob" else class_target((4, 6), 6, "some", -100)
    w = make_weight(6, torch.float64)
    xl = leaf(x)
    inputs = (xl, leaf(t)) if kind == "prob" else (xl,)

    def fn(*a):
        return cross_entropy(a[0], a[1] if kind == "prob" else t, w, reduction=reduction, label_smoothing=0.1,
                             z_loss=1e-2, softcap=3.0)

    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bwd_op_matches_autograd(dtype, reduction, kind):
    shape = (3, 11, 2)
    x = make_input(shape, dtype)
    w = make_weight(11, dtype)
    t = prob_target(shape, dtype=dtype) if kind == "prob" else class_target(shape, 11, "some", -100)
    loss, stats, *_ = FWD(x, t, w, -100, reduction, 0.1, 0.5, NO_GRADS)
    g = torch.randn(loss.shape).to(dtype)
    prob = kind == "prob"
    mask = [True, prob]
    gi, gt = BWD(g, x, t, w, stats, -100, reduction, 0.1, 0.5, mask)
    rd = reference_dtype(dtype)
    xr = leaf(x, rd)
    tr = leaf(t, rd) if prob else t
    yr = reference(xr, tr, w.to(rd), reduction=reduction, label_smoothing=0.1, z_loss=0.5)
    ref = torch.autograd.grad(yr, (xr, tr) if prob else (xr,), g.to(rd))
    assert_close(loss, yr, dtype=dtype, msg="loss")
    assert_close(gi, ref[0], dtype=dtype, msg="grad_input")
    if prob:
        assert_close(gt, ref[1], dtype=dtype, msg="grad_target")
        gi2, gt2 = BWD(g, x, t, w, stats, -100, reduction, 0.1, 0.5, [False, True])
        assert gi2 is None
        assert_close(gt2, ref[1], dtype=dtype, msg="grad_target alone")
    else:
        assert gt is None


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(6, 11), (3, 11, 2), (11,), (0, 11)], ids=str)
def test_fwd_grad_mask_equals_fwd_then_bwd(shape, dtype, reduction, kind):
    """cross_entropy_fwd with grad_mask = (the loss and stats without, the backward op's gradients
    for grad 1): the input's formed in the forward pass, a probability target's after it."""
    c = shape[class_dim(torch.empty(shape))]
    x = make_input(shape, dtype)
    w = make_weight(c, dtype)
    t = (prob_target(shape, dtype=dtype) if kind == "prob"
         else class_target(shape, c, "some" if shape[0] > 1 else "none", -100))
    mask = [True, kind == "prob"]
    loss, stats, grad, grad_target = FWD(x, t, w, -100, reduction, 0.1, 0.5, mask)
    loss_ref, stats_ref, no_grad, no_grad_target = FWD(x, t, w, -100, reduction, 0.1, 0.5, NO_GRADS)
    assert no_grad is None and no_grad_target is None
    grad_ref, grad_target_ref = BWD(torch.ones(()).to(dtype), x, t, w, stats_ref, -100, reduction, 0.1, 0.5, mask)
    same = dict(rtol=0, atol=0, equal_nan=True)  # a mean over only ignored rows is NaN in both
    torch.testing.assert_close(loss, loss_ref, **same)
    torch.testing.assert_close(stats, stats_ref, **same)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    torch.testing.assert_close(grad, grad_ref, **same)
    if kind == "prob":
        assert grad_target.shape == x.shape and grad_target.dtype == x.dtype
        torch.testing.assert_close(grad_target, grad_target_ref, **same)
        # The target's gradient alone.
        _, _, grad_alone, grad_target_alone = FWD(x, t, w, -100, reduction, 0.1, 0.5, [False, True])
        assert grad_alone is None
        torch.testing.assert_close(grad_target_alone, grad_target_ref, **same)
    else:
        assert grad_target is None


def test_fwd_grad_mask_refuses_reduction_none_and_a_class_targets_gradient():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = make_input((4, 5))
    t = class_target(x.shape, 5)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        FWD(x, t, None, -100, "none", 0.0, 0.0, [True, False])
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        FWD(mode.from_tensor(x), mode.from_tensor(t), None, -100, "none", 0.0, 0.0, [True, False])
    for mode in (None, FakeTensorMode()):
        with mode or contextlib.nullcontext():
            args = (x, t) if mode is None else (mode.from_tensor(x), mode.from_tensor(t))
            with pytest.raises(ERRORS, match=r"grad_mask\[1\].*class-probability"):
                FWD(*args, None, -100, "mean", 0.0, 0.0, [True, True])


@pytest.mark.parametrize("sample", [s for s in OPCHECK_SAMPLES if s[5] != "none"], ids=lambda s: s[0])
def test_opcheck_fwd_grad_mask(sample):
    _, shape, kind, weighted, ii, reduction, ls, z, rg = sample
    x, t, w = _opcheck_args(shape, kind, weighted, ii, rg)
    torch.library.opcheck(FWD, (x, t, w, ii, reduction, ls, z, [True, kind == "prob"]))


def test_fwd_grad_mask_op_is_differentiable_directly():
    x = leaf(make_input((5, 7)))
    t = class_target(x.shape, 7, "some", -100)
    loss, *_ = FWD(x, t, None, -100, "mean", 0.1, 1e-3, [True, False])
    (gx,) = torch.autograd.grad(loss * 3.0, x)
    xr = leaf(x)
    (gr,) = torch.autograd.grad(reference(xr, t, label_smoothing=0.1, z_loss=1e-3) * 3.0, xr)
    assert_close(gx, gr)


@pytest.mark.parametrize("mask", [[True, False], [False, True], [True, True]], ids=str)
def test_fwd_grad_mask_op_gives_the_gradients_it_did_not_form_through_the_backward_op(mask):
    x, t = leaf(make_input((4, 7))), leaf(prob_target((4, 7)))
    loss, *_ = FWD(x, t, None, -100, "sum", 0.1, 0.0, mask)
    gx, gt = torch.autograd.grad(loss * 2.0, (x, t))
    xr, tr = leaf(x), leaf(t)
    want = torch.autograd.grad(reference(xr, tr, reduction="sum", label_smoothing=0.1) * 2.0, (xr, tr))
    assert_close(gx, want[0])
    assert_close(gt, want[1])


def test_grad_in_forward_path_is_taken_only_where_it_applies(monkeypatch):
    """The eager C++ node (csrc/autograd_node.h): input requiring grad, target not requiring grad,
    grad mode on (reductions mean/sum: the gradient formed in forward; none: the node calls the
    backward op); a target requiring grad: the Python autograd.Function; else no graph at all."""
    on_this_device = frozenset({default_device_type()})
    monkeypatch.setattr(sys.modules["torch_ext.cross_entropy"], "GRAD_IN_FORWARD_DEVICES", on_this_device)
    x = leaf(make_input((4, 6)))
    t = class_target(x.shape, 6)
    assert cross_entropy(x, t).grad_fn.name() == "CrossEntropyBackward"
    assert cross_entropy(x, t, reduction="sum").grad_fn.name() == "CrossEntropyBackward"
    assert cross_entropy(x, t, reduction="none").grad_fn.name() == "CrossEntropyBackward"
    assert cross_entropy(x, leaf(prob_target(x.shape))).grad_fn.name() == "CrossEntropyFunctionBackward"
    assert cross_entropy(x.detach(), t).grad_fn is None
    with torch.no_grad():
        assert cross_entropy(x, t).grad_fn is None
    monkeypatch.undo()
    assert sys.modules["torch_ext.cross_entropy"].GRAD_IN_FORWARD_DEVICES == {"cpu", "cuda"}


def test_grad_in_forward_gradient_is_seen_by_saved_tensor_hooks():
    """The gradient formed in the forward op is held for backward as a saved tensor: saved-tensor
    hooks (torch.autograd.graph.saved_tensors_hooks, save_on_cpu) pack and unpack it."""
    x = leaf(make_input((5, 7)))
    t = class_target(x.shape, 7)
    packed = []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = cross_entropy(x, t)
    assert tuple(x.shape) in [tuple(s) for s in packed]
    loss.backward()
    xr = leaf(x)
    reference(xr, t).backward()
    assert_close(x.grad, xr.grad)
    x.grad = None
    with torch.autograd.graph.save_on_cpu():
        cross_entropy(x, t).backward()
    assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("grad_scale", [1.0, 2.5, 0.0])
def test_grad_in_forward_scales_by_grad_output(grad_scale, grad_in_forward):
    x = leaf(make_input((6, 9)))
    t = class_target(x.shape, 9, "some", -100)
    w = make_weight(9)
    y = cross_entropy(x, t, w, label_smoothing=0.1)
    y.backward(torch.tensor(grad_scale))
    xr = leaf(x)
    reference(xr, t, w, label_smoothing=0.1).backward(torch.tensor(grad_scale))
    assert_close(x.grad, xr.grad)


# ----------------------------------------------------------------------------------------------
# 10. torch.compile
# ----------------------------------------------------------------------------------------------


def _loss_fn(x, t, w):
    return torch_ext.cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-3) + torch_ext.cross_entropy(
        x * 2, t, reduction="sum"
    )


def _prob_loss_fn(x, t, w):
    return torch_ext.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1, z_loss=0.5).sum()


def _eager_and_compiled(fn, compiled, x, t, w, target_grad=False):
    outs, grads = [], []
    for f in (fn, compiled):
        xl = leaf(x)
        tl = leaf(t) if target_grad else t
        y = f(xl, tl, w)
        leaves = (xl, tl) if target_grad else (xl,)
        grads.append(torch.autograd.grad(y, leaves))
        outs.append(y.detach())
    return outs, grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(dynamo_reset, backend, grad_in_forward):
    x = make_input((6, 9))
    t = class_target(x.shape, 9, "some", -100)
    w = make_weight(9)
    compiled = torch.compile(_loss_fn, fullgraph=True, backend=backend)
    (y, yc), (g, gc) = _eager_and_compiled(_loss_fn, compiled, x, t, w)
    assert_close(yc, y)
    for a, e in zip(gc, g):
        assert_close(a, e)
    # and vs PyTorch
    xr = leaf(x)
    yr = reference(xr, t, w, label_smoothing=0.1, z_loss=1e-3) + F.cross_entropy(xr * 2, t, reduction="sum")
    assert_close(yc, yr.detach())
    assert_close(gc[0], torch.autograd.grad(yr, xr)[0])
    # probability targets with the target requiring grad
    tp = prob_target((2, 9, 3))
    xp = make_input((2, 9, 3))
    compiled = torch.compile(_prob_loss_fn, fullgraph=True, backend=backend)
    (y, yc), (g, gc) = _eager_and_compiled(_prob_loss_fn, compiled, xp, tp, w, target_grad=True)
    assert_close(yc, y)
    for a, e in zip(gc, g):
        assert_close(a, e)


def test_compile_dynamic_shapes(dynamo_reset):
    compiled = torch.compile(_loss_fn, fullgraph=True, backend="aot_eager", dynamic=True)
    shapes = [(3, 9), (5, 9), (11, 9), (7, 13), (2, 9, 4), (3, 9, 5)]
    for i, shape in enumerate(shapes):
        # One graph per input rank; other sizes of the same rank must reuse it.
        reuse = i not in (0, 4)
        c = shape[1]
        x = make_input(shape)
        t = class_target(shape, c, "some", -100)
        w = make_weight(c)
        with torch.compiler.set_stance("fail_on_recompile" if reuse else "default"):
            (y, yc), (g, gc) = _eager_and_compiled(_loss_fn, compiled, x, t, w)
        assert_close(yc, y, msg=str(shape))
        for a, e in zip(gc, g):
            assert_close(a, e, msg=str(shape))


def test_compile_no_graph_breaks(dynamo_reset, grad_in_forward):
    module = CrossEntropyLoss(weight=make_weight(6), reduction="none", z_loss=0.5)

    def fn(x, t, p, w):
        return (
            torch_ext.cross_entropy(x, t, w, z_loss=1e-3)
            + torch_ext.cross_entropy(x, p, label_smoothing=0.2, reduction="sum")
            + FWD(x, t, None, -100, "mean", 0.0, 0.0, NO_GRADS)[0]
            + module(x, t).sum()
        )

    x = make_input((4, 6))
    explanation = torch._dynamo.explain(fn)(x, class_target(x.shape, 6), prob_target(x.shape), make_weight(6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = "\n".join(m.code for gm in explanation.graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
    assert code.count("cross_entropy_fwd") >= 4, code


# ----------------------------------------------------------------------------------------------
# 11. autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [False, True], ids=["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bfloat16(reduction, prob):
    # Under bf16 autocast, F.cross_entropy computes in float32 and returns float32, for
    # float32 and for bfloat16 logits (e.g. the output of an autocast linear layer).
    w = make_weight(9)
    for in_dtype in (torch.float32, torch.bfloat16):
        x = make_input((5, 9), in_dtype)
        t = prob_target(x.shape) if prob else class_target(x.shape, 9, "some", -100)
        xl, xr = leaf(x), leaf(x)
        opts = dict(reduction=reduction, label_smoothing=0.1)
        with torch.autocast(default_device_type(), dtype=torch.bfloat16):
            y = cross_entropy(xl, t, w, **opts)
            y_ref = F.cross_entropy(xr, t, w, **opts)
            y_z = cross_entropy(x, t, w, z_loss=1e-3, **opts)
        assert y_ref.dtype == torch.float32
        assert y.dtype == torch.float32, f"{in_dtype}: {y.dtype}"
        assert y_z.dtype == torch.float32
        # Both are float32 computations from the same values.
        assert_close(y, y_ref, msg=f"autocast {in_dtype}")
        assert_close(y_z, reference(x.float(), t, w, z_loss=1e-3, **opts), msg=f"autocast z {in_dtype}")
        g = torch.randn(y.shape)
        y.backward(g)
        y_ref.backward(g)
        assert xl.grad.dtype == in_dtype
        assert_close(xl.grad, xr.grad, dtype=in_dtype, msg=f"autocast grad {in_dtype}")


@pytest.mark.parametrize("path", ["eager", "no_grad", "lse", "compiled"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_reads_16_bit_logits_as_they_are(dynamo_reset, reduction, path):
    # Under bf16 autocast, bfloat16 logits with class-index targets reach the kernel as they are,
    # not as a float32 copy (8 bytes per logit with its gradient): the op gets the bfloat16 input
    # and loss_dtype float32. The loss is F.cross_entropy's (float32 from the same values), and
    # the gradient, formed in bfloat16, is eager's (float32, then rounded) within a bfloat16 ulp.
    x = make_input((6, 11, 3), torch.bfloat16, scale=3.0)
    t = class_target(x.shape, 11, "some", -100)
    w = make_weight(11).bfloat16()  # autocast makes it float32 for F.cross_entropy; so do we
    opts = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    xl, xr = leaf(x), leaf(x)
    fn = cross_entropy
    if path == "lse":
        fn = lambda *a, **k: cross_entropy(*a, return_lse=True, **k)[0]  # noqa: E731
    check_reads_16_bit_under_autocast("cross_entropy_fwd", 10, path, fn, F.cross_entropy, (xl, t), (xr, t), [xl],
                                      [xr], **opts)


def test_autocast_after_linear():
    lin = nn.Linear(8, 10)
    x = torch.randn(6, 8)
    t = class_target((6, 10), 10)
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        y = cross_entropy(logits, t, label_smoothing=0.1)
        y_ref = F.cross_entropy(logits, t, label_smoothing=0.1)
    assert y.dtype == y_ref.dtype == torch.float32
    assert_close(y, y_ref)


# ----------------------------------------------------------------------------------------------
# 12. The CrossEntropyLoss module
# ----------------------------------------------------------------------------------------------

MODULE_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none", label_smoothing=0.1),
    dict(ignore_index=2, label_smoothing=1.0),
    dict(weighted=True),
    dict(weighted=True, ignore_index=1, reduction="none", label_smoothing=0.3),
]


@pytest.mark.parametrize("prob", [False, True], ids=["class", "prob"])
@pytest.mark.parametrize("case", range(len(MODULE_CASES)))
def test_module_matches_nn(case, prob):
    opts = dict(MODULE_CASES[case])
    weight = make_weight(7) if opts.pop("weighted", False) else None
    if prob and opts.get("ignore_index", -100) >= 0:
        opts.pop("ignore_index")
    ours = CrossEntropyLoss(weight=weight, **opts)
    ref = nn.CrossEntropyLoss(weight=weight, **opts)
    for attr in ("reduction", "ignore_index", "label_smoothing"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    x = make_input((4, 7, 3))
    t = prob_target(x.shape) if prob else class_target(x.shape, 7, "some", opts.get("ignore_index", -100))
    xl, xr = leaf(x), leaf(x)
    tl, tr = (leaf(t), leaf(t)) if prob else (t, t)
    y, y_ref = ours(xl, tl), ref(xr, tr)
    assert_close(y, y_ref)
    g = torch.randn(y.shape)
    y.backward(g)
    y_ref.backward(g)
    assert_close(xl.grad, xr.grad)
    if prob:
        assert_close(tl.grad, tr.grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_z_loss(reduction):
    w = make_weight(7)
    m = CrossEntropyLoss(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=0.5)
    x = make_input((4, 7))
    t = class_target(x.shape, 7, "some", -100)
    xl, xr = leaf(x), leaf(x)
    y = m(xl, t)
    yr = reference(xr, t, w, reduction=reduction, label_smoothing=0.1, z_loss=0.5)
    assert_close(y, yr)
    g = torch.randn(y.shape)
    y.backward(g)
    yr.backward(g)
    assert_close(xl.grad, xr.grad)


def test_module_state_dict_like_nn():
    w = make_weight(5)
    ours, ref = CrossEntropyLoss(weight=w), nn.CrossEntropyLoss(weight=w)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    assert torch.equal(ours.state_dict()["weight"], w)
    assert [n for n, _ in ours.named_buffers()] == ["weight"]
    assert list(ours.parameters()) == []
    # interchangeable both ways (strict)
    ours2 = CrossEntropyLoss(weight=torch.ones(5))
    ours2.load_state_dict(ref.state_dict())
    assert torch.equal(ours2.weight, w)
    ref2 = nn.CrossEntropyLoss(weight=torch.zeros(5))
    ref2.load_state_dict(ours.state_dict())
    assert torch.equal(ref2.weight, w)
    # the loaded weight is used
    x = make_input((3, 5))
    t = class_target(x.shape, 5)
    assert_close(ours2(x, t), F.cross_entropy(x, t, w))
    # no weight: empty state_dict, like nn
    assert list(CrossEntropyLoss().state_dict()) == list(nn.CrossEntropyLoss().state_dict()) == []
    assert CrossEntropyLoss().weight is None
    # .double() converts the buffer, and the float64 module works
    m = CrossEntropyLoss(weight=w).double()
    assert m.weight.dtype == torch.float64
    x64 = x.double()
    assert_close(m(x64, t), F.cross_entropy(x64, t, w.double()))


def test_module_repr():
    r = repr(CrossEntropyLoss())
    assert r.startswith("CrossEntropyLoss(") and r.endswith(")") and "\n" not in r
    r2 = repr(CrossEntropyLoss(weight=make_weight(3), reduction="sum", label_smoothing=0.1, z_loss=1e-3))
    assert r2.startswith("CrossEntropyLoss(") and len(r2) < 300


def test_module_legacy_arguments():
    for sa, rd in itertools.product((None, True, False), repeat=2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = CrossEntropyLoss(size_average=sa, reduce=rd)
            ref = nn.CrossEntropyLoss(size_average=sa, reduce=rd)
        assert ours.reduction == ref.reduction, (sa, rd)
        x = make_input((4, 5))
        t = class_target(x.shape, 5)
        assert_close(ours(x, t), ref(x, t))


# ----------------------------------------------------------------------------------------------
# 13. Deprecated size_average / reduce
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_legacy_size_average_reduce(reduction):
    # Given size_average or reduce, the reduction comes from them (PyTorch's
    # _Reduction.legacy_get_string) and the `reduction` argument is ignored.
    x = make_input((4, 5, 2))
    t = class_target(x.shape, 5, "some", -100)
    w = make_weight(5)
    for sa, rd in itertools.product((None, True, False), repeat=2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = cross_entropy(leaf(x), t, w, size_average=sa, reduce=rd, reduction=reduction, label_smoothing=0.1)
            y_ref = F.cross_entropy(x, t, w, size_average=sa, reduce=rd, reduction=reduction, label_smoothing=0.1)
            # positional, as in F.cross_entropy's signature
            y_pos = cross_entropy(x, t, w, sa, -100, rd, reduction, 0.1)
        assert y.shape == y_ref.shape, (sa, rd, reduction)
        assert_close(y, y_ref, msg=f"size_average={sa} reduce={rd} reduction={reduction}")
        assert_close(y_pos, y_ref)
    # z_loss follows the mapped reduction.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = cross_entropy(x, t, w, size_average=False, reduction="mean", z_loss=0.5)
    assert_close(y, reference(x, t, w, reduction="sum", z_loss=0.5))


# ----------------------------------------------------------------------------------------------
# 14. Argument errors
# ----------------------------------------------------------------------------------------------


def _error_cases():
    x = make_input((4, 5))
    x3 = make_input((2, 5, 3))
    t = torch.tensor([0, 1, 2, 3])
    p = prob_target(x.shape)
    return {
        # id: (input, target, weight, ignore_index, reduction, label_smoothing, match)
        "target_too_large": (x, torch.tensor([0, 1, 5, 3]), None, -100, "mean", 0.0, r"(?i)target"),
        "target_much_too_large": (x, torch.tensor([0, 1, 1 << 40, 3]), None, -100, "none", 0.0, r"(?i)target"),
        "target_negative": (x, torch.tensor([0, -1, 2, 3]), None, -100, "sum", 0.0, r"(?i)target"),
        "target_negative_ignore_elsewhere": (x, torch.tensor([0, -100, 2, 3]), None, 2, "mean", 0.1, r"(?i)target"),
        "target_too_large_3d": (x3, torch.tensor([[0, 1, 2], [3, 5, 4]]), None, -100, "none", 0.0, r"(?i)target"),
        "target_uint8_too_large": (x, torch.tensor([0, 1, 200, 3], dtype=torch.uint8), None, -100, "mean", 0.0,
                                   r"(?i)target"),
        "target_too_large_weighted": (x, torch.tensor([0, 1, 5, 3]), make_weight(5), -100, "mean", 0.1,
                                      r"(?i)target"),
        "prob_target_wrong_classes": (x, torch.rand(4, 6), None, -100, "mean", 0.0, r"(?i)target"),
        "prob_target_wrong_batch": (x, torch.rand(3, 5), None, -100, "mean", 0.0, r"(?i)target"),
        "prob_target_3d_wrong_spatial": (x3, torch.rand(2, 5, 4), None, -100, "none", 0.0, r"(?i)target"),
        "class_target_wrong_batch": (x, torch.tensor([0, 1, 2]), None, -100, "mean", 0.0, r"(?i)target"),
        "class_target_wrong_rank": (x, t.view(4, 1), None, -100, "mean", 0.0, r"(?i)target"),
        "class_target_3d_wrong_spatial": (x3, torch.zeros(2, 4, dtype=torch.long), None, -100, "none", 0.0,
                                          r"(?i)target"),
        "class_target_1d_input_wrong_rank": (make_input((5,)), torch.zeros(2, 1, dtype=torch.long), None, -100,
                                             "none", 0.0, r"(?i)target"),
        "weight_wrong_length": (x, t, make_weight(4), -100, "mean", 0.0, r"(?i)weight"),
        "weight_too_long": (x, t, make_weight(6), -100, "mean", 0.0, r"(?i)weight"),
        "weight_2d": (x, t, make_weight(5).view(1, 5), -100, "mean", 0.0, r"(?i)weight"),
        "weight_0d": (x, t, torch.tensor(1.0), -100, "mean", 0.0, r"(?i)weight"),
        "weight_prob_wrong_length": (x, p, make_weight(3), -100, "mean", 0.0, r"(?i)weight"),
        "unknown_reduction": (x, t, None, -100, "avg", 0.0, r"reduction"),
        "unknown_reduction_prob": (x, p, None, -100, "average", 0.0, r"reduction"),
        "label_smoothing_negative": (x, t, None, -100, "mean", -0.1, r"label_smoothing"),
        "label_smoothing_above_one": (x, t, None, -100, "mean", 1.1, r"label_smoothing"),
        "label_smoothing_above_one_prob": (x, p, None, -100, "mean", 1.5, r"label_smoothing"),
        "ignore_index_with_prob": (x, p, None, 2, "mean", 0.0, r"ignore_index"),
        "ignore_index_zero_with_prob": (x, p, None, 0, "none", 0.0, r"ignore_index"),
        "input_0d": (torch.tensor(1.0), torch.tensor(0), None, -100, "mean", 0.0, r"(?i)input"),
        "input_0d_prob": (torch.tensor(1.0), torch.tensor(0.5), None, -100, "mean", 0.0, r"(?i)input"),
        "float_class_indices": (x, t.float(), None, -100, "mean", 0.0, r"(?i)target"),
        "int32_target": (x, t.int(), None, -100, "mean", 0.0, r"(?i)target"),
        "int16_target": (x, t.short(), None, -100, "mean", 0.0, r"(?i)target"),
        "bool_target": (x, t.bool(), None, -100, "mean", 0.0, r"(?i)target"),
        "int32_target_3d": (x3, torch.zeros(2, 3, dtype=torch.int32), None, -100, "none", 0.0, r"(?i)target"),
    }


ERROR_CASES = list(_error_cases().keys())


def _call(path, x, t, w, ii, reduction, ls):
    if path == "functional":
        return cross_entropy(x, t, w, ignore_index=ii, reduction=reduction, label_smoothing=ls)
    if path == "module":
        return CrossEntropyLoss(weight=w, ignore_index=ii, reduction=reduction, label_smoothing=ls)(x, t)
    if path == "op":
        return FWD(x, t, w, ii, reduction, ls, 0.0, NO_GRADS)
    raise AssertionError(path)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("path", ["functional", "module", "op"])
@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_arguments(case, path, requires_grad):
    x, t, w, ii, reduction, ls, match = _error_cases()[case]
    if requires_grad:
        x = leaf(x)
    with pytest.raises(ERRORS, match=match):
        _call(path, x, t, w, ii, reduction, ls)


@pytest.mark.parametrize("path", ["functional", "module"])
def test_bad_arguments_with_z_loss(path):
    # The same checks with z_loss on (a separate branch of the kernels).
    x = make_input((4, 5))
    bad_target = torch.tensor([0, 1, 5, 3])
    with pytest.raises(ERRORS, match=r"(?i)target"):
        if path == "functional":
            cross_entropy(leaf(x), bad_target, z_loss=1e-3)
        else:
            CrossEntropyLoss(z_loss=1e-3)(leaf(x), bad_target)
    with pytest.raises(ERRORS, match=r"(?i)target"):
        FWD(x, bad_target, None, -100, "none", 0.1, 0.5, NO_GRADS)


def test_out_of_range_target_in_a_large_batch():
    # One bad target among many rows (the check must not be limited to the first rows/blocks).
    x = make_input((300, 33))
    t = class_target(x.shape, 33)
    t[-1] = 33
    for path in ("functional", "module", "op"):
        with pytest.raises(ERRORS, match=r"(?i)target"):
            _call(path, x, t, None, -100, "none", 0.0)
    x4 = make_input((2, 7, 8, 8))
    t4 = class_target(x4.shape, 7)
    t4[1, 7, 7] = -3
    with pytest.raises(ERRORS, match=r"(?i)target"):
        cross_entropy(x4, t4)


# ----------------------------------------------------------------------------------------------
# 15. Every compiled instruction set
# ----------------------------------------------------------------------------------------------

ISA_SCRIPT = textwrap.dedent(
    r"""
    import os, sys
    import torch

    LEVELS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
    want = os.environ["ATEN_CPU_CAPABILITY"].upper()
    got = torch.backends.cpu.get_cpu_capability()
    if LEVELS.get(got, -1) < LEVELS[want]:
        print(f"UNSUPPORTED: asked for {want}, this CPU runs {got}")
        sys.exit(3)
    sys.path.insert(0, os.environ["TORCH_EXT_TESTS_DIR"])
    import torch_ext
    import test_cross_entropy as T  # the same reference and checks as the in-process tests

    assert got == want, (got, want)
    assert torch_ext.cpu_capability() == want, (torch_ext.cpu_capability(), want)
    failures = []

    def check(*args, **kwargs):
        try:
            T.run_case(*args, **kwargs)
        except AssertionError as err:
            failures.append(f"{want}: {err}")

    torch.manual_seed(0)
    for dtype in T.DTYPES:
        # every vector tail of the 8/16/32-lane bodies, and several blocks
        for c in (1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 1003, 5000):
            x = T.make_input((3, c), dtype)
            w = T.make_weight(c, dtype)
            check(x, T.class_target(x.shape, c, "some", -100), w, reduction="none", label_smoothing=0.1,
                  z_loss=1e-3, msg=f"{want} C={c}")
            check(x, T.prob_target(x.shape, "nonneg", dtype), w, target_grad=True, reduction="mean",
                  label_smoothing=0.1, z_loss=0.5, msg=f"{want} C={c} probabilities")
        for shape in ((2, 19, 5, 3), (2, 37, 4)):
            x = T.make_input(shape, dtype)
            check(x, T.class_target(shape, shape[1], "some", 2), ignore_index=2, reduction="sum", z_loss=1e-3,
                  msg=f"{want} {shape}")
        x = T.make_input((4, 1100), dtype, 1e4)
        check(x, T.class_target(x.shape, 1100), reduction="none", z_loss=1e-3, msg=f"{want} 1e4 logits")
    try:  # each instruction set's exponential (AVX-512's own, exp_u20 elsewhere)
        T.test_probabilities_keep_float_accuracy_across_the_exponent_range()
    except AssertionError as err:
        failures.append(f"{want}: {err}")
    for f in failures:
        print(f)
    print(f"{want}: {len(failures)} failures")
    sys.exit(1 if failures else 0)
    """
)


@pytest.mark.cpu_only("a subprocess per CPU instruction set")
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_cpu_capability(capability):
    if not cpu_supports(capability):
        pytest.skip(f"this CPU does not execute {capability.upper()} instructions")
    proc = run_python(ISA_SCRIPT, env={"ATEN_CPU_CAPABILITY": capability, "TORCH_EXT_TESTS_DIR": TESTS_DIR})
    if proc.returncode == 3 and "UNSUPPORTED" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{proc.stdout}\n{proc.stderr}"
    assert f"{capability.upper()}: 0 failures" in proc.stdout


# ----------------------------------------------------------------------------------------------
# The in-place backward (linear_cross_entropy writes each chunk's gradient over its logits)
# ----------------------------------------------------------------------------------------------

BWD_INPLACE = torch.ops.torch_ext.cross_entropy_bwd_inplace.default


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 37), (3, 1500), (2, 5, 3), (9,)], ids=str)
def test_bwd_inplace_equals_bwd(dtype, reduction, shape):
    c = shape[0] if len(shape) == 1 else shape[1]
    x = make_input(shape, dtype)
    t = class_target(shape, c, "some", 2)
    w = make_weight(c, dtype)
    loss, stats, *_ = FWD(x, t, w, 2, reduction, 0.1, 1e-3, NO_GRADS)
    g = torch.randn(loss.shape, dtype=dtype) if reduction == "none" else torch.tensor(0.7, dtype=dtype)
    want = BWD(g, x, t, w, stats, 2, reduction, 0.1, 1e-3, [True, False])[0]
    y = x.clone()
    assert BWD_INPLACE(g, y, t, w, stats, 2, reduction, 0.1, 1e-3) is None
    assert torch.equal(y, want)  # the same kernel, reading each block before writing it


def test_bwd_inplace_needs_contiguous_input():
    x = make_input((7, 6)).t()  # (6, 7), not contiguous
    t = class_target((6, 7), 7)
    loss, stats, *_ = FWD(x, t, None, -100, "mean", 0.0, 0.0, NO_GRADS)
    with pytest.raises(RuntimeError, match="input must be contiguous"):
        BWD_INPLACE(torch.tensor(1.0), x, t, None, stats, -100, "mean", 0.0, 0.0)


@pytest.mark.parametrize("shape", [(5, 11), (2, 4, 3)], ids=str)
def test_opcheck_bwd_inplace(shape):
    c = shape[1]
    x = make_input(shape)
    t = class_target(shape, c)
    loss, stats, *_ = FWD(x, t, None, -100, "sum", 0.0, 0.0, NO_GRADS)
    # A mutating op without autograd (only called below it): schema (the mutation annotation)
    # and fake tensor checks.
    torch.library.opcheck(BWD_INPLACE, (torch.tensor(1.0), x.clone(), t, None, stats, -100, "sum", 0.0, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
