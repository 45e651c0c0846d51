"""Tests of linear + cross-entropy without materializing the logits (every device):
``torch_ext.linear_cross_entropy``, ``torch_ext.LinearCrossEntropyLoss`` and the raw ops
``torch.ops.torch_ext.linear_cross_entropy_fwd`` / ``linear_cross_entropy_bwd``.

The reference is always PyTorch itself: ``F.cross_entropy(F.linear(input, linear_weight,
linear_bias), target, ...)`` with eager autograd, the leading dims of input (*, H) flattened to
rows (so input (B, T, H) with target (B, T) is a language-model head), plus, for the keyword-only
``z_loss``, ``z_loss * reduce(row_weight * logsumexp(logits)**2)`` with the row weights and the
mean's denominator of the loss (as tests/test_cross_entropy.py). Covered:

* input (H), (N, H), (B, T, H); with and without linear_bias; class-index and class-probability
  targets; class weights, ignore_index (-100, a valid class, outside the class range, all rows
  ignored), label_smoothing 0 / 0.1 / 1.0, z_loss, reductions mean / sum / none; empty batches;
* float64 equal to the reference within 1e-8 (and tiny probabilities not thresholded away),
  float32, bfloat16 and float16 (vs the float32 computation from the same 16-bit values);
* chunk_size 1, 3, 7, larger than N and None give the same results;
* grad_output: random, scalar, implicit 1, expanded (stride 0), sliced, transposed;
* partial requires_grad (a frozen linear_weight gets no V x H gradient, input not requiring
  grad, only the bias), no grad at all (retain_graph and double backward: tests/test_common.py);
* the gradient of class-probability targets that require grad (as F.cross_entropy's, computed
  chunk by chunk in backward, and only when asked for);
* gradcheck (float64), torch.library.opcheck of both ops, the raw ops against autograd;
* what the graph holds between forward and backward (far below N x V);
* torch.compile(fullgraph=True) with aot_eager and inductor; torch.autocast (CPU, bfloat16);
* non-contiguous operands; large logits; agreement with PyTorch's F.linear_cross_entropy;
* the LinearCrossEntropyLoss module: torch.nn.LinearCrossEntropyLoss's interface (constructor,
  linear.weight / linear.bias, state_dict keys, forward(input, target), K-dim out_features) and
  values; the K-dimensional functional; argument errors naming the argument.
"""
from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_ext
from torch_ext import LinearCrossEntropyLoss, linear_cross_entropy
from utils import SavedTensorBytes, assert_close, default_device_type, leaf, reference_dtype, run_python, storage_key

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
FWD = torch.ops.torch_ext.linear_cross_entropy_fwd.default
BWD = torch.ops.torch_ext.linear_cross_entropy_bwd.default
ERRORS = (RuntimeError, ValueError, IndexError, TypeError)
NAMES = ("input", "linear_weight", "linear_bias")
NO_GRADS = [False, False, False]

# bfloat16 here rounds the logits of each chunk to bfloat16 before the loss (as the bf16 GEMM of
# F.linear does), then the logits' gradient, then the GEMMs of the gradients: a few more roundings
# than one fused op, compared with the float32 computation from the same bfloat16 values.
BF16_TOL = dict(rtol=3e-2, atol=2e-2)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------


def reference(input, linear_weight, target, linear_bias=None, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, chunk_size=None):
    """F.cross_entropy(F.linear(...)) over the rows of input's leading dims, + the z_loss term;
    differentiable. reduction="none" returns input's leading shape. (chunk_size: ignored.)"""
    vocab = linear_weight.shape[0]
    lead = input.shape[:-1]
    logits = F.linear(input, linear_weight, linear_bias).reshape(-1, vocab)
    prob = target.is_floating_point()
    t = target.reshape(-1, vocab) if prob else target.long().reshape(-1)
    loss = F.cross_entropy(logits, t, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss != 0:
        lse = torch.logsumexp(logits, 1)
        if prob:
            rw = torch.ones_like(lse)
        else:
            valid = t != ignore_index
            rw = valid.to(lse.dtype)
            if weight is not None:
                rw = rw * weight.to(lse.dtype)[t.masked_fill(~valid, 0)]
        z = z_loss * rw * lse.square()
        if reduction == "none":
            loss = loss + z
        elif reduction == "sum":
            loss = loss + z.sum()
        else:
            denom = torch.tensor(float(lse.numel()), dtype=lse.dtype) if prob else rw.sum()
            # (nothing to average: the loss is already NaN, the z term adds 0 and a zero gradient)
            denom = torch.where(denom == 0, torch.ones_like(denom), denom)
            loss = loss + z.sum() / denom
    if reduction == "none":
        loss = loss.reshape(lead)
    return loss


def make_args(lead, hidden, vocab, dtype=torch.float32, bias=True, logit_scale=1.0):
    """input (*lead, H), linear_weight (V, H) scaled so the logits are O(logit_scale), bias (V,)."""
    x = torch.randn(*lead, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) * logit_scale / math.sqrt(max(hidden, 1))).to(dtype)
    b = (0.5 * torch.randn(vocab)).to(dtype) if bias else None
    return x, w, b


def class_target(lead, vocab, ignored="none", ignore_index=-100):
    """Random class indices in [0, V) of shape `lead`; `ignored`: "none", "some" (about a third
    of the rows, at least one, and at least one kept when there are two or more) or "all"."""
    t = torch.randint(0, vocab, tuple(lead))
    if ignored == "some" and t.numel():
        mask = torch.rand(tuple(lead)) < 0.3
        flat = mask.view(-1)
        flat[0] = True
        if flat.numel() > 1:
            flat[-1] = False
        t[mask] = ignore_index
    elif ignored == "all":
        t.fill_(ignore_index)
    return t


def prob_target(lead, vocab, kind="softmax", dtype=torch.float32):
    """Class probabilities (*lead, V): "softmax" (normalized) or "nonneg" (not normalized, some
    exact zeros)."""
    if kind == "softmax":
        t = torch.softmax(torch.randn(*lead, vocab), -1)
    else:
        t = torch.rand(*lead, vocab) * 2
        t[t < 0.3] = 0
    return t.to(dtype)


def make_target(kind, lead, vocab, ignore_index=-100, dtype=torch.float32):
    if kind == "class":
        return class_target(lead, vocab, "some", ignore_index)
    return prob_target(lead, vocab, "softmax", dtype)


def make_weight(vocab, dtype=torch.float32):
    return (torch.rand(vocab) * 2 + 0.1).to(dtype)


def run_case(input, linear_weight, target, linear_bias=None, weight=None, *, grad="random", requires=NAMES,
             msg="", ref_dtype=None, rtol=None, atol=None, **opts):
    """The loss of torch_ext.linear_cross_entropy and the gradients of the operands named in
    `requires` (of "input", "linear_weight", "linear_bias") vs the reference, on fresh leaves.
    bfloat16 is compared with the float32 computation from the same bfloat16 values. grad:
    "random" (a random grad_output of the loss's shape), "sum" (y.sum(): stride 0), "backward"
    (y.backward() on a scalar: grad_output 1), None (no backward) or a tensor. Returns (loss,
    {name: grad})."""
    dtype = input.dtype
    rd = ref_dtype or reference_dtype(dtype)
    if dtype == torch.bfloat16 and rtol is None and atol is None:
        rtol, atol = BF16_TOL["rtol"], BF16_TOL["atol"]
    values = dict(zip(NAMES, (input, linear_weight, linear_bias)))
    ours = {n: (leaf(v) if n in requires else v.detach()) if v is not None else None for n, v in values.items()}
    refs = {n: (leaf(v, rd) if n in requires else v.detach().to(rd)) if v is not None else None
            for n, v in values.items()}
    tr = target.to(rd) if target.is_floating_point() else target
    wr = None if weight is None else weight.to(rd)
    y = linear_cross_entropy(ours["input"], ours["linear_weight"], target, linear_bias=ours["linear_bias"],
                             weight=weight, **opts)
    yr = reference(refs["input"], refs["linear_weight"], tr, refs["linear_bias"], wr, **opts)
    tag = f"{msg} {dtype_id(dtype)} {tuple(input.shape)} V={linear_weight.shape[0]} {opts}"
    assert y.dtype == dtype, f"{tag}: loss dtype {y.dtype}"
    assert y.shape == yr.shape, f"{tag}: loss shape {tuple(y.shape)} vs {tuple(yr.shape)}"
    assert_close(y, yr, dtype=dtype, rtol=rtol, atol=atol, equal_nan=True, msg=f"{tag}: loss")
    names = [n for n in NAMES if n in requires and values[n] is not None]
    if grad is None or not names:
        assert y.requires_grad == bool(names), f"{tag}: requires_grad {y.requires_grad}"
        return y, {}
    assert y.requires_grad, f"{tag}: the loss does not require grad"
    leaves = [ours[n] for n in names]
    ref_leaves = [refs[n] for n in names]
    if isinstance(grad, str) and grad == "sum":
        grads = torch.autograd.grad(y.sum(), leaves)
        ref_grads = torch.autograd.grad(yr.sum(), ref_leaves)
    elif isinstance(grad, str) and grad == "backward":
        y.backward()
        yr.backward()
        grads = [lf.grad for lf in leaves]
        ref_grads = [lf.grad for lf in ref_leaves]
        for n in NAMES:
            if n not in names and ours[n] is not None:
                assert ours[n].grad is None, f"{tag}: {n} does not require grad but got one"
    else:
        g = torch.randn(y.shape).to(dtype) if isinstance(grad, str) else grad
        grads = torch.autograd.grad(y, leaves, g)
        ref_grads = torch.autograd.grad(yr, ref_leaves, g.to(rd))
    out = {}
    for name, got, want, lf in zip(names, grads, ref_grads, leaves):
        assert got.shape == lf.shape, f"{tag}: {name} grad shape {tuple(got.shape)} vs {tuple(lf.shape)}"
        assert_close(got, want, dtype=dtype, rtol=rtol, atol=atol, equal_nan=True, msg=f"{tag}: grad of {name}")
        out[name] = got
    return y, out


OPTION_SETS = [
    # (weighted, ignore_index, ignored rows, label_smoothing, z_loss)
    (False, -100, "none", 0.0, 0.0),
    (True, -100, "some", 0.1, 1e-3),
    (True, 2, "some", 1.0, 0.5),
    (False, -100, "some", 0.0, 0.5),
]


class OpSpy(TorchDispatchMode):
    """Records every op that reaches the dispatcher below autograd (forward and backward), with
    its arguments by name and its outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        bound = dict(zip([a.name for a in func._schema.arguments], args))
        bound.update(kwargs)
        self.calls.append((func, bound, out))
        return out

    def masks(self):
        """[(op name, mask)] of the linear_cross_entropy ops called."""
        found = []
        for func, bound, _ in self.calls:
            if func is FWD:
                found.append(("fwd", list(bound["grad_mask"])))
            elif func is BWD:
                found.append(("bwd", list(bound["output_mask"])))
        return found

    def output_shapes(self):
        shapes = []
        for _, _, out in self.calls:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
        return shapes


# ----------------------------------------------------------------------------------------------
# 1. Values and gradients against PyTorch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(dtype, reduction, kind):
    vocab, hidden = 37, 16
    for i, (weighted, ii, ignored, ls, z) in enumerate(OPTION_SETS):
        if kind == "prob" and ii >= 0:
            ii = -100
        bias = i % 2 == 0
        lead = (6,) if i < 2 else (2, 5)
        x, w, b = make_args(lead, hidden, vocab, dtype, bias)
        t = class_target(lead, vocab, ignored, ii) if kind == "class" else prob_target(lead, vocab, "nonneg", dtype)
        cw = make_weight(vocab, dtype) if weighted else None
        run_case(x, w, t, b, cw, ignore_index=ii, reduction=reduction, label_smoothing=ls, z_loss=z, chunk_size=4,
                 msg=f"options {i}")


@pytest.mark.cpu_only("the CPU GEMMs (cpu_gemm)")
@pytest.mark.parametrize("cpu_gemm", ["ours", "aten"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_on_each_cpu_gemm(set_config, cpu_gemm, reduction, bias):
    # Chunks of 48 rows, hidden 40 and vocab 70: all three float32 GEMMs (logits, input rows,
    # weight-gradient accumulation) are large enough for torch_ext's CPU GEMM (32 rows or more).
    set_config(cpu_gemm=cpu_gemm)
    assert torch_ext.cpu_gemm() == ("aten" if torch_ext.cpu_capability() == "DEFAULT" else cpu_gemm)
    lead, hidden, vocab = (3, 50), 40, 70
    x, w, b = make_args(lead, hidden, vocab, torch.float32, bias)
    t = class_target(lead, vocab, "some", 3)
    run_case(x, w, t, b, make_weight(vocab), ignore_index=3, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
             chunk_size=48, msg=f"{cpu_gemm} GEMM")


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_exact(reduction, kind):
    # float64: the same math as the reference up to summation order, so within 1e-8 (relative,
    # and absolute at the scale of each tensor). The scalar reductions are checked with a random
    # grad_output and with y.backward() (grad_output 1).
    vocab, hidden = 29, 12
    grads = ("random", "backward") if reduction != "none" else ("random", "sum")
    for (weighted, ii, ignored, ls, z), (bias, chunk) in itertools.product(OPTION_SETS, ((True, 3), (False, None))):
        if kind == "prob" and ii >= 0:
            ii = -100
        x, w, b = make_args((2, 7), hidden, vocab, torch.float64, bias)
        t = class_target((2, 7), vocab, ignored, ii) if kind == "class" else prob_target((2, 7), vocab, "nonneg",
                                                                                         torch.float64)
        cw = make_weight(vocab, torch.float64) if weighted else None
        for grad in grads:
            run_case(x, w, t, b, cw, grad=grad, ignore_index=ii, reduction=reduction, label_smoothing=ls, z_loss=z,
                     chunk_size=chunk, rtol=1e-8, atol=1e-8, msg=f"exact grad={grad}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tiny_probabilities_not_thresholded(reduction):
    # Classes whose probability is ~1e-13 .. 1e-26 in every row still get their exact gradient:
    # their bias gradient is the (weighted) sum of those probabilities and their weight rows the
    # corresponding sums of p * x. A kernel that skips "negligible" exp terms gives 0 there.
    n, hidden, vocab = 8, 4, 12
    x, w, b = make_args((n,), hidden, vocab, torch.float64)
    tiny = torch.arange(8, 12)
    b = b.clone()
    b[tiny] = torch.tensor([-30.0, -40.0, -50.0, -60.0], dtype=torch.float64)
    t = torch.randint(0, 8, (n,))  # the tiny classes are never the target
    for ls, z in ((0.0, 0.0), (0.0, 1e-3)):
        xl, wl, bl = leaf(x), leaf(w), leaf(b)
        xr, wr, br = leaf(x), leaf(w), leaf(b)
        y = linear_cross_entropy(xl, wl, t, linear_bias=bl, reduction=reduction, z_loss=z, label_smoothing=ls,
                                 chunk_size=3)
        yr = reference(xr, wr, t, br, reduction=reduction, z_loss=z, label_smoothing=ls)
        g = torch.rand(y.shape, dtype=torch.float64) + 0.5
        gw, gb = torch.autograd.grad(y, (wl, bl), g)
        gwr, gbr = torch.autograd.grad(yr, (wr, br), g)
        assert (gbr[tiny] > 0).all() and (gbr[tiny] < 1e-12).all()
        for cls in tiny.tolist():
            # relative to each class's own (tiny) magnitude
            assert_close(gb[cls], gbr[cls], rtol=1e-8, atol=0, scale=1.0, msg=f"bias grad of class {cls}")
            assert_close(gw[cls], gwr[cls], rtol=1e-8, atol=1e-8, scale=gwr[cls].abs().max().item(),
                         msg=f"weight grad row of class {cls}")
        assert_close(gw, gwr, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_chunk_size_does_not_change_results(dtype, kind):
    # Results must not depend on chunk_size beyond float rounding: 1, 3, 7 (partial last
    # chunks), one chunk larger than N, and the default.
    lead, hidden, vocab = (2, 5), 8, 23
    x, w, b = make_args(lead, hidden, vocab, dtype)
    t = make_target(kind, lead, vocab, dtype=dtype)
    cw = make_weight(vocab, dtype)
    same = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for reduction in REDUCTIONS:
        opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        results = {}
        g = torch.randn(lead if reduction == "none" else ()).to(dtype)
        for chunk in (1, 3, 7, 10, 64, None):
            y, grads = run_case(x, w, t, b, cw, grad=g, chunk_size=chunk, msg=f"chunk_size={chunk}", **opts)
            results[chunk] = (y.detach(), grads)
        y1, g1 = results[1]
        for chunk, (y, grads) in results.items():
            assert_close(y, y1, **same, msg=f"{reduction}: loss, chunk_size={chunk} vs 1")
            for name in NAMES:
                assert_close(grads[name], g1[name], **same, msg=f"{reduction}: grad of {name}, chunk_size={chunk} vs 1")


@pytest.mark.cpu_only("the chunk rule's arithmetic, no tensors")
def test_default_chunk_size_rule():
    """chunk_size=None: the rows whose logits fit in the device type's CHUNK_BYTES (CPU 32 MiB,
    CUDA 512 MiB), a multiple of 8 when >= 8, at least 1, at most the rows."""
    import sys

    lce = sys.modules["torch_ext.linear_cross_entropy"]
    assert lce.CHUNK_BYTES == {"cpu": 32 << 20, "cuda": 512 << 20}
    rule = lce.default_chunk_size
    assert rule(4096, 32000, torch.float32) == 256  # (32 MiB // (32000 * 4)) = 262, down to a multiple of 8
    assert rule(4096, 32000, torch.float32, "cpu") == 256
    assert rule(8192, 128256, torch.bfloat16, "cuda") == 2088  # 512 MiB // (128256 * 2) = 2093
    assert rule(100, 128256, torch.bfloat16, "cuda") == 100  # at most the rows
    assert rule(10, 1 << 30, torch.float32) == 1  # at least 1
    assert rule(10, 2 << 20, torch.float32) == 4  # under 8: not rounded
    assert rule(0, 32000, torch.float32) == 1
    assert rule(4096, 32000, torch.float32, "mps") == 256  # other devices: the CPU budget
    # bfloat16/float16 on CPU: at least MIN_ROWS_16_BIT_CPU rows (each chunk adds its weight
    # gradient into a float32 sum, a pass whatever the chunk's rows), at most the rows.
    assert lce.MIN_ROWS_16_BIT_CPU == 1024
    assert rule(4096, 32000, torch.bfloat16) == 1024  # 32 MiB alone would give 520
    assert rule(4096, 128256, torch.float16, "cpu") == 1024
    assert rule(600, 32000, torch.bfloat16) == 600
    assert rule(1 << 20, 1000, torch.bfloat16) == 16776  # above the floor: the bytes rule
    assert rule(4096, 32000, torch.bfloat16, "mps") == 520
    assert rule(4096, 32000, torch.float64) == 128


@pytest.mark.cpu_only("the CPU 16-bit GEMM path")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
# "blocked": where the products run in float32, each of the three is cut along the vocabulary into
# several blocks (csrc/matmul.cpp, product_through_float32).
@pytest.mark.parametrize("shape", [(37, 13, 29, 8), (300, 40, 1003, 64), (160, 24, 12007, 64)],
                         ids=["odd", "wide", "blocked"])
def test_16_bit_weight_grad_sums_chunk_products_in_float32(dtype, shape):
    """Over several chunks, the 16-bit weight gradient is the chunks' products (each one 16-bit
    GEMM, or a float32 one of the widened operands where ATen's is slow) summed in float32 and
    rounded once: bit for bit what that sum written with PyTorch's ops gives where the products
    are ATen's 16-bit GEMMs (V x H odd, so the widening add's vector loop and its tail both run)."""
    from torch_ext._common import cpu_products_in_float32

    rows, hidden, vocab, chunk = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen, device="cpu").to(dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen, device="cpu").to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=gen, device="cpu")
    torch_ext.linear_cross_entropy(x, w, t, chunk_size=chunk, reduction="sum").backward()
    widened = cpu_products_in_float32(dtype)
    total = torch.zeros(vocab, hidden)
    for r0 in range(0, rows, chunk):
        xc = x.detach()[r0:r0 + chunk]
        logits = (xc.float() @ w.detach().float().t()).to(dtype) if widened else xc @ w.detach().t()
        logits.requires_grad_()
        torch_ext.cross_entropy(logits, t[r0:r0 + chunk], reduction="sum").backward()
        if widened:
            total.addmm_(logits.grad.t().float(), xc.float())
        else:
            total.add_(logits.grad.t() @ xc)
    if widened:  # float32 GEMMs (ours or ATen's, by CPU and size) may sum in another order: an ulp
        torch.testing.assert_close(w.grad, total.to(dtype), rtol=2**-7, atol=1e-6)
    else:
        assert torch.equal(w.grad, total.to(dtype))


@pytest.mark.cpu_only("CPU autocast")
def test_default_chunk_size_follows_autocast_dtype(monkeypatch):
    """Under autocast the rule sees the dtype the GEMMs run in (bfloat16), not the float32 input's."""
    import sys

    lce = sys.modules["torch_ext.linear_cross_entropy"]
    seen = []
    rule = lce.default_chunk_size
    monkeypatch.setattr(lce, "default_chunk_size", lambda *a: seen.append(a[2]) or rule(*a))
    x = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    t = torch.randint(0, 10, (12,))
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        loss = torch_ext.linear_cross_entropy(x, w, t)
    expected = F.cross_entropy(F.linear(x.bfloat16(), w.bfloat16()).float(), t)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    torch_ext.linear_cross_entropy(x, w, t)
    assert seen == [torch.bfloat16, torch.float32]


INPUT_SHAPES = [
    pytest.param((), id="1d"),
    pytest.param((1,), id="one_row"),
    pytest.param((9,), id="2d"),
    pytest.param((3, 4), id="3d"),
]


@pytest.mark.parametrize("lead", INPUT_SHAPES)
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_input_ranks(kind, lead):
    hidden, vocab = 6, 11
    for dtype, reduction, bias in itertools.product((torch.float32, torch.float64), REDUCTIONS, (True, False)):
        x, w, b = make_args(lead, hidden, vocab, dtype, bias)
        t = class_target(lead, vocab) if kind == "class" else prob_target(lead, vocab, dtype=dtype)
        y, _ = run_case(x, w, t, b, make_weight(vocab, dtype), reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                        chunk_size=2, msg=f"lead {lead}")
        assert y.shape == (lead if reduction == "none" else ())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_empty_batch(dtype, reduction):
    # No rows: mean is NaN, sum 0, none empty (as PyTorch); the input gradient is empty and the
    # weight and bias gradients are zeros.
    hidden, vocab = 5, 7
    x, w, b = make_args((0,), hidden, vocab, dtype)
    for kind in ("class", "prob"):
        t = class_target((0,), vocab) if kind == "class" else prob_target((0,), vocab, dtype=dtype)
        y, grads = run_case(x, w, t, b, reduction=reduction, z_loss=1e-3, msg=f"empty {kind}")
        if reduction == "mean":
            assert torch.isnan(y).item()
        elif reduction == "sum":
            assert y.item() == 0
        else:
            assert y.shape == (0,)
        assert grads["input"].shape == (0, hidden)
        assert (grads["linear_weight"] == 0).all() and (grads["linear_bias"] == 0).all()


# ----------------------------------------------------------------------------------------------
# 2. ignore_index, all-ignored batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ls,z_loss", [(0.0, 0.0), (0.1, 0.5), (1.0, 1e-3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_all_ignored(dtype, ls, z_loss):
    # Every row ignored: mean is NaN, sum 0, none all 0; every gradient is exactly 0 (PyTorch's
    # too, even for mean), never NaN, with any grad_output and through .backward().
    hidden, vocab = 5, 6
    x, w, b = make_args((4,), hidden, vocab, dtype)
    cw = make_weight(vocab, dtype)
    for ii, weight in ((-100, None), (2, cw), (-100, cw)):
        t = class_target((4,), vocab, "all", ii)
        for reduction, grad in itertools.product(REDUCTIONS, ("random", "backward")):
            if grad == "backward" and reduction == "none":
                continue
            y, grads = run_case(x, w, t, b, weight, grad=grad, ignore_index=ii, reduction=reduction,
                                label_smoothing=ls, z_loss=z_loss, chunk_size=3, msg=f"all ignored grad={grad}")
            if reduction == "mean":
                assert torch.isnan(y).item()
            else:
                assert (y == 0).all()
            for name, g in grads.items():
                assert (g == 0).all(), f"gradient of {name} for an all-ignored batch ({reduction}, {grad}): {g}"


def test_ignore_index_outside_class_range():
    # Targets equal to an ignore_index outside [0, V) are ignored, not out of range (PyTorch).
    x, w, b = make_args((6,), 4, 5, torch.float64)
    t = torch.tensor([7, 0, 7, 4, 1, 7])
    run_case(x, w, t, b, make_weight(5, torch.float64), ignore_index=7, label_smoothing=0.1, z_loss=1e-3,
             reduction="none")
    run_case(x, w, t, b, ignore_index=7, reduction="mean", grad="backward")
    t = torch.tensor([-1, 0, -1, 4, 1, 2])
    run_case(x, w, t, None, ignore_index=-1, z_loss=0.5, reduction="sum")


def test_ignore_index_none_means_minus_100():
    # As F.linear_cross_entropy: ignore_index=None is -100 for class indices.
    x, w, b = make_args((5,), 4, 6)
    t = torch.tensor([0, -100, 3, 5, -100])
    a = linear_cross_entropy(x, w, t, linear_bias=b, ignore_index=None)
    assert_close(a, reference(x, w, t, b))


def test_uint8_targets_equal_int64():
    x, w, b = make_args((2, 6), 8, 40)
    t = class_target((2, 6), 40, "some", 7)
    for reduction in REDUCTIONS:
        a = linear_cross_entropy(x, w, t, linear_bias=b, ignore_index=7, reduction=reduction, label_smoothing=0.1)
        c = linear_cross_entropy(x, w, t.to(torch.uint8), linear_bias=b, ignore_index=7, reduction=reduction,
                                 label_smoothing=0.1)
        assert_close(c, a)


# ----------------------------------------------------------------------------------------------
# 3. grad_output layouts, non-contiguous operands, large logits
# ----------------------------------------------------------------------------------------------


def test_reduction_none_grad_outputs():
    hidden, vocab = 6, 13
    cases = {
        "random": ((7,), lambda lead: torch.randn(lead, dtype=torch.float64)),
        "expanded": ((7,), lambda lead: torch.randn(1, dtype=torch.float64).expand(lead)),
        "sliced": ((7,), lambda lead: torch.randn(14, dtype=torch.float64)[::2]),
        "zeros": ((7,), lambda lead: torch.zeros(lead, dtype=torch.float64)),
        "3d_transposed": ((2, 5), lambda lead: torch.randn(5, 2, dtype=torch.float64).t()),
        "3d_expanded": ((2, 5), lambda lead: torch.randn(1, 5, dtype=torch.float64).expand(2, 5)),
        "3d_sum": ((2, 5), None),
    }
    for name, (lead, make_grad) in cases.items():
        x, w, b = make_args(lead, hidden, vocab, torch.float64)
        cw = make_weight(vocab, torch.float64)
        for kind in ("class", "prob"):
            t = make_target(kind, lead, vocab, dtype=torch.float64)
            grad = "sum" if make_grad is None else make_grad(lead)
            run_case(x, w, t, b, cw, grad=grad, reduction="none", label_smoothing=0.1, z_loss=1e-3, chunk_size=3,
                     rtol=1e-8, atol=1e-8, msg=f"grad_output {name} {kind}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scalar_grad_outputs(reduction):
    # The scalar reductions with grad_output 1 (y.backward()), 0, negative, and a 0-d tensor
    # expanded from a 1-element one.
    x, w, b = make_args((2, 4), 5, 9, torch.float64)
    t = class_target((2, 4), 9, "some")
    for g in (torch.tensor(1.0), torch.tensor(0.0), torch.tensor(-2.5), torch.tensor([0.75]).expand(1).view(()),
              "backward"):
        g = g.double() if isinstance(g, torch.Tensor) else g
        run_case(x, w, t, b, make_weight(9, torch.float64), grad=g, reduction=reduction, label_smoothing=0.1,
                 z_loss=1e-3, chunk_size=3, rtol=1e-8, atol=1e-8, msg=f"grad_output {g}")


def _layout_case(name):
    lead, hidden, vocab = (6,), 8, 13
    x, w, b = make_args(lead, hidden, vocab)
    t = class_target(lead, vocab, "some")
    cw = make_weight(vocab)
    if name == "input_transposed":
        x = torch.randn(hidden, 6).t()
    elif name == "input_sliced":
        x = torch.randn(12, 2 * hidden)[::2, ::2]
    elif name == "input_3d_transposed":  # (T, B, H) stored, (B, T, H) used
        x = torch.randn(3, 2, hidden).transpose(0, 1)
        t = class_target((2, 3), vocab, "some")
    elif name == "input_expanded":
        x = torch.randn(1, hidden).expand(6, hidden)
    elif name == "weight_transposed":  # e.g. a (H, V) parameter used as its transpose
        w = (torch.randn(hidden, vocab) / math.sqrt(hidden)).t()
    elif name == "weight_sliced":
        w = (torch.randn(vocab, 2 * hidden) / math.sqrt(hidden))[:, 1::2]
    elif name == "bias_sliced":
        b = torch.randn(2 * vocab)[::2]
    elif name == "target_expanded":
        t = torch.tensor(3).expand(6)
    elif name == "target_sliced":
        t = class_target((18,), vocab, "some")[::3]
    elif name == "prob_target_transposed":
        t = prob_target((vocab,), 6).t()
    elif name == "prob_target_expanded":
        t = prob_target((1,), vocab).expand(6, vocab)
    elif name == "class_weight_sliced":
        cw = make_weight(2 * vocab)[::2]
    else:
        raise AssertionError(name)
    return x, w, b, t, cw


LAYOUT_CASES = [
    "input_transposed", "input_sliced", "input_3d_transposed", "input_expanded", "weight_transposed",
    "weight_sliced", "bias_sliced", "target_expanded", "target_sliced", "prob_target_transposed",
    "prob_target_expanded", "class_weight_sliced",
]


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_noncontiguous(case):
    x, w, b, t, cw = _layout_case(case)
    for reduction in ("mean", "none"):
        run_case(x, w, t, b, cw, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=4, msg=case)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_logits(reduction):
    # Logits spread over ~1e3 and offset by 3e3 through the bias: finite, and close to the float64
    # result from the same float32 operands. (Rounding the float32 GEMM + bias at 3e3 moves each
    # logit by up to 1.2e-4, and the probabilities by as much relatively, in PyTorch too, so the
    # tolerance is 1e-3 here.)
    x, w, b = make_args((5,), 16, 40, logit_scale=3e2)
    b = b + 3e3
    for kind in ("class", "prob"):
        t = make_target(kind, (5,), 40)
        y, grads = run_case(x, w, t, b, make_weight(40), reduction=reduction, label_smoothing=0.1, z_loss=1e-6,
                            chunk_size=2, ref_dtype=torch.float64, rtol=1e-3, atol=1e-3, msg=f"large logits {kind}")
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_matches_torch_linear_cross_entropy():
    # The same function as PyTorch's own F.linear_cross_entropy (2-D input; no z_loss).
    assert hasattr(F, "linear_cross_entropy")
    ours = inspect.signature(linear_cross_entropy).parameters
    theirs = inspect.signature(F.linear_cross_entropy).parameters
    for name, p in theirs.items():
        if name == "options":
            continue
        assert name in ours, name
        assert ours[name].kind == p.kind, name
        if name not in ("ignore_index",):  # PyTorch's None means -100 for class indices
            assert ours[name].default == p.default, name
    assert list(ours)[:3] == ["input", "linear_weight", "target"]
    x, w, b = make_args((7,), 6, 10, torch.float64)
    cw = make_weight(10, torch.float64)
    for kind, reduction in itertools.product(("class", "prob"), REDUCTIONS):
        t = make_target(kind, (7,), 10, dtype=torch.float64)
        kw = dict(linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.1)
        assert_close(linear_cross_entropy(x, w, t, chunk_size=3, **kw), F.linear_cross_entropy(x, w, t, **kw),
                     rtol=1e-8, atol=1e-8, msg=f"{kind} {reduction}")


def reference_kdim(input, linear_weight, target, linear_bias=None, weight=None, ignore_index=-100, reduction="mean",
                   label_smoothing=0.0, z_loss=0.0):
    """The K-dimensional loss: logits (N, C, d1, ..., dK) from linear_weight (C, d1, ..., dK, H),
    F.cross_entropy over dim 1, plus the z_loss term weighted and reduced as `reference` does."""
    logits = torch.einsum("nh,c...h->nc...", input, linear_weight)
    if linear_bias is not None:
        logits = logits + linear_bias
    loss = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss == 0:
        return loss
    lse = torch.logsumexp(logits, 1)
    if target.is_floating_point():
        rw = torch.ones_like(lse)
    else:
        valid = target != ignore_index
        rw = valid.to(lse.dtype) * (1.0 if weight is None else weight[target.masked_fill(~valid, 0)])
    z = z_loss * rw * lse.square()
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss + z.sum()
    return loss + z.sum() / (lse.numel() if target.is_floating_point() else rw.sum())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_k_dimensional_linear_weight(reduction, kind):
    # linear_weight (C, d1, ..., dK, H) as F.linear_cross_entropy takes it: one chunked (C) problem
    # per output position; loss and gradients (input, weight, bias, a probability target) against
    # F.cross_entropy of the (N, C, d1, ..., dK) logits and PyTorch's F.linear_cross_entropy.
    for dims, bias, weighted, ls, z in [((3,), True, True, 0.1, 0.0), ((2, 3), False, False, 0.0, 1e-3),
                                        ((2, 1), True, True, 1.0, 0.5)]:
        n, hidden, classes = 5, 4, 6
        x = torch.randn(n, hidden, dtype=torch.float64)
        w = torch.randn(classes, *dims, hidden, dtype=torch.float64) / 2
        b = torch.randn(classes, *dims, dtype=torch.float64) if bias else None
        cw = make_weight(classes, torch.float64) if weighted else None
        if kind == "class":
            t = class_target((n, *dims), classes, "some")
        else:
            t = leaf(torch.softmax(torch.randn(n, classes, *dims, dtype=torch.float64), 1))
        ours = [leaf(v) for v in (x, w, b) if v is not None] + ([leaf(t)] if kind == "prob" else [])
        refs = [leaf(v) for v in (x, w, b) if v is not None] + ([leaf(t)] if kind == "prob" else [])
        to, tr = (ours[-1], refs[-1]) if kind == "prob" else (t, t)
        opts = dict(weight=cw, reduction=reduction, label_smoothing=ls)
        y = linear_cross_entropy(ours[0], ours[1], to, linear_bias=ours[2] if bias else None, z_loss=z, chunk_size=2,
                                 **opts)
        yr = reference_kdim(refs[0], refs[1], tr, refs[2] if bias else None, z_loss=z, **opts)
        tag = f"{kind} dims={dims} bias={bias} weighted={weighted} ls={ls} z={z} {reduction}"
        assert y.shape == yr.shape, tag
        assert_close(y, yr, rtol=1e-10, atol=1e-10, msg=f"{tag}: loss")
        if z == 0:
            assert_close(y, F.linear_cross_entropy(x, w, t.detach(), linear_bias=b, **opts), rtol=1e-10, atol=1e-10,
                         msg=f"{tag}: vs F.linear_cross_entropy")
        g = torch.randn(y.shape, dtype=torch.float64)
        for a, r in zip(torch.autograd.grad(y, ours, g), torch.autograd.grad(yr, refs, g)):
            assert_close(a, r, rtol=1e-10, atol=1e-10, msg=f"{tag}: gradient")


def test_k_dimensional_gradcheck_and_errors():
    x = leaf(torch.randn(3, 2, dtype=torch.float64))
    w = leaf(torch.randn(4, 2, 2, dtype=torch.float64))
    b = leaf(torch.randn(4, 2, dtype=torch.float64))
    p = leaf(torch.softmax(torch.randn(3, 4, 2, dtype=torch.float64), 1))
    t = class_target((3, 2), 4, "some")
    cw = make_weight(4, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b: linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1, z_loss=0.1),
        (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b, p: linear_cross_entropy(x, w, p, linear_bias=b, reduction="none", chunk_size=2), (x, w, b, p))
    with pytest.raises(ValueError, match="input"):
        linear_cross_entropy(torch.randn(2, 3, 2), w, t)
    with pytest.raises(ValueError, match="input"):
        linear_cross_entropy(torch.randn(2, dtype=torch.float64), w, t[0])
    with pytest.raises(ValueError, match="linear_bias"):
        linear_cross_entropy(x, w, t, linear_bias=torch.randn(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(x, w, t[:, 0])
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(x, w, p.detach().transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# 4. Autograd: partial requires_grad, frozen weight (retain_graph, double backward:
#    tests/test_common.py)
# ----------------------------------------------------------------------------------------------


def test_second_forward_after_backward():
    x, w, b = (leaf(v) for v in make_args((5,), 4, 9, torch.float64))
    t = class_target((5,), 9)
    linear_cross_entropy(x, w, t, linear_bias=b, z_loss=1e-3).backward()
    once = [v.grad.clone() for v in (x, w, b)]
    linear_cross_entropy(x, w, t, linear_bias=b, z_loss=1e-3).backward()
    for v, a in zip((x, w, b), once):
        assert_close(v.grad, 2 * a)
    refs = [leaf(v) for v in (x, w, b)]
    reference(refs[0], refs[1], t, refs[2], z_loss=1e-3).backward()
    for a, r in zip(once, refs):
        assert_close(a, r.grad)


REQUIRES_GRAD_SUBSETS = [s for r in (0, 1, 2, 3) for s in itertools.combinations(NAMES, r)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("subset", REQUIRES_GRAD_SUBSETS, ids=lambda s: "+".join(s) or "none")
def test_partial_requires_grad(subset, reduction):
    # Only the gradients needed are asked of the ops (their masks), only those are produced, the
    # others stay None; in particular a frozen linear_weight never gets a V x H gradient.
    n, hidden, vocab = 5, 3, 17  # N x H, V x H, V all distinct
    x, w, b = make_args((n,), hidden, vocab, torch.float64)
    named = dict(zip(NAMES, (x.clone(), w.clone(), b.clone())))
    for name in subset:
        named[name].requires_grad_()
    t = class_target((n,), vocab, "some")
    opts = dict(weight=make_weight(vocab, torch.float64), reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                chunk_size=2)
    with OpSpy() as spy:
        y = linear_cross_entropy(named["input"], named["linear_weight"], t, linear_bias=named["linear_bias"], **opts)
        if not subset:
            assert not y.requires_grad and y.grad_fn is None
        else:
            g = torch.randn(y.shape, dtype=torch.float64)
            grads = torch.autograd.grad(y, [named[s] for s in subset], g)
            y2 = linear_cross_entropy(named["input"], named["linear_weight"], t, linear_bias=named["linear_bias"],
                                      **opts)
            y2.backward(g)
    wanted = [name in subset for name in NAMES]
    masks = spy.masks()
    assert masks, "no linear_cross_entropy op was called"
    for op, mask in masks:
        assert all(m <= want for m, want in zip(mask, wanted)), f"{op} asked for {mask}, needed {wanted}"
    if "linear_weight" not in subset:
        assert (vocab, hidden) not in spy.output_shapes(), f"a V x H tensor was produced: {spy.output_shapes()}"
    if not subset:
        return
    refs = {k: (leaf(v) if k in subset else v.detach()) for k, v in named.items()}
    yr = reference(refs["input"], refs["linear_weight"], t, refs["linear_bias"], **opts)
    ref_grads = torch.autograd.grad(yr, [refs[s] for s in subset], g)
    for name, got, want in zip(subset, grads, ref_grads):
        assert_close(got, want, rtol=1e-8, atol=1e-8, msg=f"grad of {name}")
        assert_close(named[name].grad, want, rtol=1e-8, atol=1e-8, msg=f".grad of {name}")
    for name in NAMES:
        if name not in subset:
            assert named[name].grad is None, f"{name} does not require grad but got a gradient"


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_frozen_linear_weight(reduction):
    # A frozen output layer (e.g. tied or fine-tuning with the head frozen): gradients of the
    # input and bias only, its .grad stays None, and no V x H tensor is made by the step.
    hidden, vocab = 4, 50
    x, w, b = make_args((2, 3), hidden, vocab)
    xl, bl = leaf(x), leaf(b)
    t = class_target((2, 3), vocab, "some")
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    with OpSpy() as spy:
        y = linear_cross_entropy(xl, w, t, linear_bias=bl, **opts)
        g = torch.randn(y.shape)
        gx, gb = torch.autograd.grad(y, (xl, bl), g, retain_graph=True)
        y.backward(g)
    assert w.grad is None and not w.requires_grad
    assert all(not mask[1] for _, mask in spy.masks()), spy.masks()
    assert (vocab, hidden) not in spy.output_shapes()
    xr, br = leaf(x), leaf(b)
    gxr, gbr = torch.autograd.grad(reference(xr, w, t, br, **opts), (xr, br), g)
    assert_close(gx, gxr, msg="grad_input")
    assert_close(gb, gbr, msg="grad_bias")
    assert_close(xl.grad, gxr)
    assert_close(bl.grad, gbr)


def test_nothing_requires_grad():
    x, w, b = make_args((4,), 5, 7)
    t = class_target((4,), 7)
    y = linear_cross_entropy(x, w, t, linear_bias=b, z_loss=1e-3)
    assert_close(y, reference(x, w, t, b, z_loss=1e-3))
    assert not y.requires_grad and y.grad_fn is None
    with torch.no_grad():
        y2 = linear_cross_entropy(leaf(x), leaf(w), t, linear_bias=leaf(b))
    assert not y2.requires_grad
    assert_close(y2, reference(x, w, t, b))


def _target_grad_case(dtype, lead, hidden, vocab, bias, weighted, reduction, label_smoothing, z_loss, chunk_size,
                      requires=NAMES, tol=None):
    """The loss and the gradients of a class-probability target that requires grad (and of the
    operands in `requires`) against torch.autograd.grad of F.cross_entropy(F.linear(...)) (plus
    the z_loss term, which does not depend on the target), with a random grad_output."""
    x, w, b = make_args(lead, hidden, vocab, dtype, bias)
    t = prob_target(lead, vocab, "softmax", dtype)
    cw = make_weight(vocab, dtype) if weighted else None
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    values = dict(zip(NAMES, (x, w, b)))
    ours = {n: (leaf(v) if n in requires else v) if v is not None else None for n, v in values.items()}
    refs = {n: (leaf(v) if n in requires else v) if v is not None else None for n, v in values.items()}
    tl, tr = leaf(t), leaf(t)
    y = linear_cross_entropy(ours["input"], ours["linear_weight"], tl, linear_bias=ours["linear_bias"], weight=cw,
                             chunk_size=chunk_size, **opts)
    yr = reference(refs["input"], refs["linear_weight"], tr, refs["linear_bias"], cw, **opts)
    tag = f"{dtype_id(dtype)} {lead} bias={bias} weighted={weighted} {opts} chunk={chunk_size}"
    assert_close(y, yr, msg=f"{tag}: loss", **(tol or {}))
    names = [n for n in NAMES if n in requires and values[n] is not None]
    g = torch.randn(y.shape, dtype=dtype)
    got = torch.autograd.grad(y, [ours[n] for n in names] + [tl], g)
    want = torch.autograd.grad(yr, [refs[n] for n in names] + [tr], g)
    assert got[-1].shape == t.shape and got[-1].dtype == dtype, f"{tag}: target grad {got[-1].shape} {got[-1].dtype}"
    for name, a, r in zip(names + ["target"], got, want):
        assert_close(a, r, msg=f"{tag}: grad of {name}", **(tol or {}))
    return got[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_probability_target_gradient(dtype, reduction, label_smoothing):
    # d loss / d target as F.cross_entropy's: -(1 - label_smoothing) * weight * log_softmax(logits),
    # times grad_output (over the rows for mean); with class weights or not, bias or not, input
    # (H), (N, H), (B, T, H), several chunks or one, z_loss 0 and not (z does not depend on target).
    cases = [((7,), True, True, 0.0, 3), ((7,), False, False, 0.0, None), ((2, 5), True, False, 1e-3, 4),
             ((), True, True, 0.0, 1), ((3, 1), False, True, 0.5, 2)]
    for lead, bias, weighted, z, chunk in cases:
        _target_grad_case(dtype, lead, 6, 9, bias, weighted, reduction, label_smoothing, z, chunk)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("requires", [(), ("input",), ("linear_weight", "linear_bias"), NAMES],
                         ids=lambda r: "+".join(r) or "target_only")
def test_probability_target_gradient_with_partial_requires_grad(reduction, requires):
    # The target's gradient alone (nothing else requires grad: no fused gradient-in-forward) or
    # with any of the others (the eager mean/sum path forms theirs in forward, the target's in backward).
    _target_grad_case(torch.float64, (5,), 4, 7, True, True, reduction, 0.1, 1e-3, 2, requires=requires)


def test_probability_target_gradient_empty_and_large_logits():
    _target_grad_case(torch.float64, (0,), 4, 7, True, True, "sum", 0.1, 0.0, 2)
    _target_grad_case(torch.float64, (0,), 4, 7, True, False, "none", 0.0, 0.0, None)
    x, w, b = make_args((6,), 5, 8, torch.float64, logit_scale=300.0)
    t = leaf(prob_target((6,), 8, "softmax", torch.float64))
    tr = leaf(t)
    got = torch.autograd.grad(linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4), t)[0]
    want = torch.autograd.grad(reference(x, w, tr, b), tr)[0]
    assert torch.isfinite(got).all()
    assert_close(got, want, rtol=1e-8, atol=1e-8)


def _count_log_softmax(fn):
    """fn() under a dispatch mode counting aten._log_softmax calls (the target gradient's, one per chunk)."""
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._log_softmax.default:
                calls.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return calls


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_target_gradient_only_when_asked_and_by_chunks(reduction):
    # A target that does not require grad costs nothing more (no log-softmax anywhere); one that
    # does gets it computed chunk by chunk in backward: chunk_size x V at a time, never N x V.
    n, hidden, vocab, chunk = 10, 4, 7, 3
    x, w, b = (leaf(v) for v in make_args((n,), hidden, vocab))
    t = prob_target((n,), vocab)
    assert _count_log_softmax(lambda: linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                                          chunk_size=chunk).sum().backward()) == []
    assert x.grad is not None and t.grad is None
    tl = leaf(t)
    calls = _count_log_softmax(lambda: linear_cross_entropy(x, w, tl, linear_bias=b, reduction=reduction,
                                                            chunk_size=chunk).sum().backward())
    assert calls == [torch.Size([3, vocab])] * 3 + [torch.Size([1, vocab])], calls
    assert tl.grad is not None and tl.grad.shape == t.shape


def test_probability_target_gradient_retain_graph_and_compile(dynamo_reset):
    x, w, b = (leaf(v) for v in make_args((2, 3), 4, 6, torch.float64))
    t = leaf(prob_target((2, 3), 6, "softmax", torch.float64))
    cw = make_weight(6, torch.float64)
    y = linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1, chunk_size=2)
    first = torch.autograd.grad(y, (x, w, b, t), retain_graph=True)
    second = torch.autograd.grad(y, (x, w, b, t))
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    tr = leaf(t)
    want = torch.autograd.grad(reference(x, w, tr, b, cw, label_smoothing=0.1), tr)[0]
    assert_close(first[3], want, rtol=1e-8, atol=1e-8)

    def fn(x, w, b, t):
        return linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1, chunk_size=2)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, b, t), (x, w, b, t))
    for a, c in zip(got, first):
        assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_probability_target_gradient_autocast():
    # Under bfloat16 autocast, a float32 target gets a float32 gradient, as through F.linear + F.cross_entropy.
    x, w, b = make_args((4,), 16, 9)
    t, tr = leaf(prob_target((4,), 9)), leaf(prob_target((4,), 9))
    with torch.no_grad():
        tr.copy_(t)
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=3)
        yr = F.cross_entropy(F.linear(x, w, b), tr)
    got, want = torch.autograd.grad(y, t)[0], torch.autograd.grad(yr, tr)[0]
    assert got.dtype == torch.float32
    assert_close(got, want, dtype=torch.bfloat16, check_dtype=False, **BF16_TOL)


# ----------------------------------------------------------------------------------------------
# 5. gradcheck (float64)
# ----------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    # id, lead, target kind, bias, weighted, ignore_index, reduction, label_smoothing, z_loss, chunk
    ("class_mean", (3,), "class", True, False, -100, "mean", 0.0, 0.0, 2),
    ("class_all_options_none", (4,), "class_some", True, True, -100, "none", 0.1, 1e-3, 3),
    ("class_ii2_sum_ls1_nobias", (4,), "class_ii2", False, True, 2, "sum", 1.0, 0.5, 1),
    ("class_3d_mean_z", (2, 3), "class_some", True, True, -100, "mean", 0.1, 0.5, None),
    ("class_1d", (), "class", True, True, -100, "none", 0.1, 1e-3, None),
    ("prob_mean", (3,), "prob", True, False, -100, "mean", 0.0, 0.0, 2),
    ("prob_all_options", (2, 2), "nonneg", False, True, -100, "none", 0.1, 0.5, 3),
    ("prob_1d_sum", (), "prob", True, False, -100, "sum", 1.0, 1e-3, 1),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(case):
    _, lead, kind, bias, weighted, ii, reduction, ls, z, chunk = case
    hidden, vocab = 3, 5
    x, w, b = (leaf(v) for v in make_args(lead, hidden, vocab, torch.float64, bias))
    cw = make_weight(vocab, torch.float64) if weighted else None
    if kind.startswith("class"):
        t = class_target(lead, vocab, "some" if kind in ("class_some", "class_ii2") else "none", ii)
    else:
        t = prob_target(lead, vocab, "softmax" if kind == "prob" else "nonneg", torch.float64)
    opts = dict(weight=cw, ignore_index=ii, reduction=reduction, label_smoothing=ls, z_loss=z, chunk_size=chunk)
    inputs = (x, w, b) if bias else (x, w)

    def fn(*args):
        return linear_cross_entropy(args[0], args[1], t, linear_bias=args[2] if bias else None, **opts)

    assert torch.autograd.gradcheck(fn, inputs)
    if not kind.startswith("class"):  # the class-probability target requiring grad too

        def fn_target(*args):
            return linear_cross_entropy(args[0], args[1], args[-1], linear_bias=args[2] if bias else None, **opts)

        assert torch.autograd.gradcheck(fn_target, inputs + (leaf(t),))
    if len(lead) == 1:  # the raw op (2-D input), loss output only

        def op(*args):
            return FWD(args[0], args[1], args[2] if bias else None, t, cw, ii, reduction, ls, z, 2, NO_GRADS)[0]

        assert torch.autograd.gradcheck(op, inputs)


# ----------------------------------------------------------------------------------------------
# 6. What the graph holds between forward and backward
# ----------------------------------------------------------------------------------------------


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


def graph_held_bytes(recorder: SavedTensorBytes, output: torch.Tensor, exclude) -> int:
    """Storage bytes kept alive for backward: the tensors saved through saved-tensor hooks plus
    any tensor a custom Function's ctx holds as an attribute (which those hooks do not see), each
    storage once, those sharing storage with `exclude` (the operands) left out."""
    excluded = {storage_key(t) for t in exclude if t is not None}
    tensors = list(recorder.saved)
    seen_nodes, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            tensors.extend(_tensors_in(value))
        stack.extend(fn for fn, _ in node.next_functions)
    held = {}
    for t in tensors:
        key = storage_key(t)
        if key not in excluded and t.untyped_storage().nbytes():
            held[key] = t.untyped_storage().nbytes()
    return sum(held.values())


@pytest.mark.parametrize("case", ["mean", "none", "sum_options", "prob", "bf16", "frozen_weight", "3d"])
def test_graph_holds_far_below_logits(case):
    n, hidden, vocab = 256, 16, 2048
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    lead = (4, 64) if case == "3d" else (n,)
    x, w, b = make_args(lead, hidden, vocab, dtype)
    t = prob_target(lead, vocab, dtype=dtype) if case == "prob" else class_target(lead, vocab, "some")
    reduction = {"none": "none", "sum_options": "sum"}.get(case, "mean")
    opts = dict(reduction=reduction)
    cw = None
    if case == "sum_options":
        cw = make_weight(vocab)
        opts.update(weight=cw, label_smoothing=0.1, z_loss=1e-3)
    xl, bl = leaf(x), leaf(b)
    wl = w if case == "frozen_weight" else leaf(w)
    with SavedTensorBytes() as rec:
        y = linear_cross_entropy(xl, wl, t, linear_bias=bl, **opts)
    held = graph_held_bytes(rec, y, (xl, wl, bl, t, cw))
    with SavedTensorBytes() as eager_rec:
        yr = reference(xl, wl, t, bl, **opts)
    eager = graph_held_bytes(eager_rec, yr, (xl, wl, bl, t, cw))
    logits_bytes = n * vocab * x.element_size()
    assert eager >= logits_bytes  # eager keeps the N x V log-probabilities (or logits)
    # At most one gradient-sized copy of each operand that requires grad and a few floats per
    # row, never anything N x V.
    grad_bytes = sum(v.numel() for v in (xl, wl, bl) if v.requires_grad) * 4
    assert held <= grad_bytes + 64 * n + 4096, (held, grad_bytes, eager)
    assert held <= logits_bytes / 8, (held, logits_bytes, eager)
    # and the gradients are right
    rd = reference_dtype(dtype)
    names = [n for n, v in zip(NAMES, (xl, wl, bl)) if v.requires_grad]
    refs = {n: (leaf(v, rd) if n in names else v.detach().to(rd)) for n, v in zip(NAMES, (xl, wl, bl))}
    ref_y = reference(refs["input"], refs["linear_weight"], t.to(rd) if t.is_floating_point() else t,
                      refs["linear_bias"], **opts)
    g = torch.randn(y.shape).to(dtype)
    grads = torch.autograd.grad(y, [v for v in (xl, wl, bl) if v.requires_grad], g)
    ref_grads = torch.autograd.grad(ref_y, [refs[n] for n in names], g.to(rd))
    tol = BF16_TOL if dtype == torch.bfloat16 else {}
    for name, got, want in zip(names, grads, ref_grads):
        assert_close(got, want, dtype=dtype, msg=f"{case}: grad of {name}", **tol)


# ----------------------------------------------------------------------------------------------
# 7. opcheck and the raw ops
# ----------------------------------------------------------------------------------------------

OPCHECK_SAMPLES = [
    # id, rows, target kind, bias, weighted, ignore_index, reduction, ls, z, chunk, grad_mask, requires_grad
    ("mean_all_grads", 5, "class", True, True, -100, "mean", 0.1, 1e-3, 2, [True, True, True], True),
    ("sum_input_grad_nobias", 5, "class", False, False, 2, "sum", 0.0, 0.5, 3, [True, False, False], False),
    ("none_no_grads", 5, "class", True, True, -100, "none", 0.1, 1e-3, 2, NO_GRADS, True),
    ("none_nograd", 4, "class", False, False, -100, "none", 0.0, 0.0, 1, NO_GRADS, False),
    ("prob_mean_weight_bias", 4, "prob", True, True, -100, "mean", 0.1, 1e-3, 3, [False, True, True], False),
    ("prob_sum_chunk_larger", 3, "prob", True, False, -100, "sum", 0.0, 0.0, 8, NO_GRADS, True),
]


def _op_args(rows, kind, bias, weighted, ii, hidden=4, vocab=7, dtype=torch.float32):
    x, w, b = make_args((rows,), hidden, vocab, dtype, bias)
    t = class_target((rows,), vocab, "some" if ii == -100 else "none", ii) if kind == "class" else \
        prob_target((rows,), vocab, dtype=dtype)
    cw = make_weight(vocab, dtype) if weighted else None
    return x, w, b, t, cw


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=[s[0] for s in OPCHECK_SAMPLES])
def test_opcheck_fwd(sample):
    _, rows, kind, bias, weighted, ii, reduction, ls, z, chunk, mask, rg = sample
    x, w, b, t, cw = _op_args(rows, kind, bias, weighted, ii)
    if rg:
        x, w, b = leaf(x), leaf(w), leaf(b)
    torch.library.opcheck(FWD, (x, w, b, t, cw, ii, reduction, ls, z, chunk, mask))


BWD_SAMPLES = [
    # id, target kind, bias, reduction, output_mask
    ("mean_all", "class", True, "mean", [True, True, True]),
    ("none_input_only", "class", True, "none", [True, False, False]),
    ("sum_weight_bias", "prob", True, "sum", [False, True, True]),
    ("none_nobias", "prob", False, "none", [True, True, False]),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", BWD_SAMPLES, ids=[s[0] for s in BWD_SAMPLES])
def test_opcheck_bwd(sample, requires_grad):
    _, kind, bias, reduction, mask = sample
    x, w, b, t, cw = _op_args(5, kind, bias, True, -100)
    g = torch.randn(5 if reduction == "none" else ())
    if not requires_grad:
        torch.library.opcheck(BWD, (g, x, w, b, t, cw, -100, reduction, 0.1, 1e-3, 2, mask))
        return
    # The backward op is differentiable once, by design: differentiating through it raises. Every
    # opcheck utility runs except the one that differentiates through it, which must fail so.
    g, x, w, b = leaf(g), leaf(x), leaf(w), leaf(b)
    args = (g, x, w, b, t, cw, -100, reduction, 0.1, 1e-3, 2, mask)
    torch.library.opcheck(BWD, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="does not support double backward"):
        torch.library.opcheck(BWD, args, test_utils="test_aot_dispatch_dynamic")


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_raw_ops_match_autograd(dtype, reduction, kind):
    rows, hidden, vocab = 7, 5, 11
    x, w, b, t, cw = _op_args(rows, kind, True, True, -100, hidden, vocab, dtype)
    rd = reference_dtype(dtype)
    tol = BF16_TOL if dtype == torch.bfloat16 else {}
    xr, wr, br = leaf(x, rd), leaf(w, rd), leaf(b, rd)
    tr = t.to(rd) if kind == "prob" else t
    yr = reference(xr, wr, tr, br, cw.to(rd), reduction=reduction, label_smoothing=0.1, z_loss=0.5)
    g = torch.randn(yr.shape).to(dtype)
    ref = torch.autograd.grad(yr, (xr, wr, br), g.to(rd), retain_graph=True)
    gi, gw, gb = BWD(g, x, w, b, t, cw, -100, reduction, 0.1, 0.5, 3, [True, True, True])
    for name, got, want in zip(NAMES, (gi, gw, gb), ref):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
        assert_close(got, want, dtype=dtype, msg=f"bwd op: grad of {name}", **tol)
    # a mask leaves the others None
    gi, gw, gb = BWD(g, x, w, b, t, cw, -100, reduction, 0.1, 0.5, 3, [False, True, False])
    assert gi is None and gb is None
    assert_close(gw, ref[1], dtype=dtype, msg="bwd op: grad of linear_weight alone", **tol)
    # the forward op: the loss, and (mean / sum) the gradients for grad_output 1
    loss, stats, *grads = FWD(x, w, b, t, cw, -100, reduction, 0.1, 0.5, 3, NO_GRADS)
    assert_close(loss, yr, dtype=dtype, msg="fwd op: loss", **tol)
    assert all(v is None for v in grads)
    # stats: per row the max logit and log-sum (their sum the logsumexp; 0 for ignored rows)
    logits_ref = F.linear(xr, wr, br).detach()
    kept = (t != -100) if not t.is_floating_point() else torch.ones(t.shape[:-1], dtype=torch.bool)
    lse_ref = torch.logsumexp(logits_ref, -1).reshape(-1) * kept.reshape(-1)
    assert_close(stats[:, 0] + stats[:, 1], lse_ref, dtype=dtype, check_dtype=False, msg="fwd op: stats", **tol)
    if reduction != "none":
        ref1 = torch.autograd.grad(yr, (xr, wr, br))
        loss, _, *grads = FWD(x, w, b, t, cw, -100, reduction, 0.1, 0.5, 3, [True, True, True])
        assert_close(loss, yr, dtype=dtype, msg="fwd op with grads: loss", **tol)
        for name, got, want in zip(NAMES, grads, ref1):
            assert_close(got, want, dtype=dtype, msg=f"fwd op: grad of {name} for grad_output 1", **tol)
        loss, _, gi, gw, gb = FWD(x, w, b, t, cw, -100, reduction, 0.1, 0.5, 3, [True, False, False])
        assert gw is None and gb is None
        assert_close(gi, ref1[0], dtype=dtype, **tol)


def test_ops_reject_chunk_size_below_one():
    x, w, b, t, cw = _op_args(4, "class", True, False, -100)
    for chunk in (0, -1):
        with pytest.raises(ERRORS, match="chunk_size"):
            FWD(x, w, b, t, cw, -100, "mean", 0.0, 0.0, chunk, NO_GRADS)
        with pytest.raises(ERRORS, match="chunk_size"):
            BWD(torch.tensor(1.0), x, w, b, t, cw, -100, "mean", 0.0, 0.0, chunk, [True, True, True])


def test_ops_take_float32_probabilities_with_16_bit_input_only():
    """The ops read class probabilities in input's dtype, or in float32 with bfloat16/float16 input
    (autocast's targets: checked against F.cross_entropy in test_autocast_loss_not_rounded_to_16_bits);
    any other pair is refused, naming target."""
    x, w, b, t, cw = _op_args(4, "prob", True, False, -100, dtype=torch.bfloat16)
    loss = FWD(x, w, b, t.float(), cw, -100, "sum", 0.0, 0.0, 3, NO_GRADS)[0]
    rows = F.cross_entropy(F.linear(x, w, b).float(), t.float(), reduction="none")
    assert loss.dtype == torch.bfloat16  # (no autocast: the loss in input's dtype)
    assert_close(loss, rows.sum().to(loss.dtype), dtype=torch.bfloat16)
    for input_dtype, target_dtype in ((torch.bfloat16, torch.float64), (torch.float64, torch.float32),
                                      (torch.float32, torch.bfloat16)):
        x, w, b, t, cw = _op_args(4, "prob", True, False, -100, dtype=input_dtype)
        with pytest.raises(ERRORS, match="target"):
            FWD(x, w, b, t.to(target_dtype), cw, -100, "mean", 0.0, 0.0, 3, NO_GRADS)
        with pytest.raises(ERRORS, match="target"):
            BWD(torch.tensor(1.0, dtype=input_dtype), x, w, b, t.to(target_dtype), cw, -100, "mean", 0.0, 0.0, 3,
                [True, True, True])


# ----------------------------------------------------------------------------------------------
# 8. torch.compile
# ----------------------------------------------------------------------------------------------


def _loss_fn(x, w, t, b, cw):
    return linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1, z_loss=1e-3, chunk_size=4) + \
        0.5 * torch_ext.linear_cross_entropy(x, w, t, reduction="none", chunk_size=3).sum()


def _prob_loss_fn(x, w, t, b, cw):
    return linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction="sum", label_smoothing=0.1)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(dynamo_reset, backend):
    lead, hidden, vocab = (2, 5), 8, 11
    x, w, b = make_args(lead, hidden, vocab)
    cw = make_weight(vocab)
    for fn, t in ((_loss_fn, class_target(lead, vocab, "some")), (_prob_loss_fn, prob_target(lead, vocab))):
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        outs, grads = [], []
        for f in (fn, compiled):
            leaves = [leaf(v) for v in (x, w, b)]
            y = f(leaves[0], leaves[1], t, leaves[2], cw)
            grads.append(torch.autograd.grad(y, leaves))
            outs.append(y.detach())
        assert_close(outs[1], outs[0], msg=f"{backend} {fn.__name__}: loss")
        for name, got, want in zip(NAMES, grads[1], grads[0]):
            assert_close(got, want, msg=f"{backend} {fn.__name__}: grad of {name}")
        # and vs PyTorch
        refs = [leaf(v) for v in (x, w, b)]
        if fn is _loss_fn:
            yr = reference(refs[0], refs[1], t, refs[2], cw, label_smoothing=0.1, z_loss=1e-3) + \
                0.5 * reference(refs[0], refs[1], t, reduction="none").sum()
        else:
            yr = reference(refs[0], refs[1], t, refs[2], cw, reduction="sum", label_smoothing=0.1)
        assert_close(outs[1], yr.detach(), msg=f"{backend} {fn.__name__}: loss vs PyTorch")
        for name, got, want in zip(NAMES, grads[1], torch.autograd.grad(yr, refs)):
            assert_close(got, want, msg=f"{backend} {fn.__name__}: grad of {name} vs PyTorch")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_graph_forms_gradients_in_forward(dynamo_reset, reduction):
    # Compiled, as in eager: reductions mean and sum form the gradients in the forward op, chunk by
    # chunk, and the backward graph only scales them (no linear_cross_entropy_bwd, which would
    # compute every chunk's logits again); reduction none
    # recomputes in backward. Checked in the code inductor generated for both graphs, and the
    # gradients (for an incoming gradient that is not 1) against eager's.
    from torch._inductor.utils import run_and_get_code

    x, w, b = make_args((3, 5), 8, 13)
    t = class_target((3, 5), 13, "some")
    grad_out = torch.tensor(3.0) if reduction != "none" else torch.randn(3, 5)

    def fn(x, w, b):
        return linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, z_loss=1e-3, chunk_size=4)

    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [leaf(v) for v in (x, w, b)]

        def step():
            return torch.autograd.grad(f(*leaves), leaves, grad_out)

        if f is compiled:
            grads, code = run_and_get_code(step)
            code = "\n".join(code)
            assert "linear_cross_entropy_fwd" in code
            assert ("linear_cross_entropy_bwd" in code) == (reduction == "none"), reduction
        else:
            grads = step()
        results.append(grads)
    for name, got, want in zip(NAMES, *reversed(results)):
        assert_close(got, want, msg=f"{reduction}: grad of {name}")


def test_compile_frozen_weight_and_module(dynamo_reset):
    # A compiled step with the head's weight frozen, through the module.
    module = LinearCrossEntropyLoss(4, 9, bias=True, weight=make_weight(9), reduction="none", label_smoothing=0.1,
                                    z_loss=1e-3, chunk_size=2)
    module.linear.weight.requires_grad_(False)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x, _, _ = make_args((5,), 4, 9)
    t = class_target((5,), 9, "some")
    g = torch.randn(5)
    results = []
    for m in (module, compiled):
        xl = leaf(x)
        y = m(xl, t)
        results.append((y.detach(), torch.autograd.grad(y, (xl, module.linear.bias), g)))
    assert module.linear.weight.grad is None
    assert_close(results[1][0], results[0][0])
    for got, want in zip(results[1][1], results[0][1]):
        assert_close(got, want)


# ----------------------------------------------------------------------------------------------
# 9. autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bfloat16(reduction, kind):
    # As F.linear + F.cross_entropy under bf16 autocast: the linear in bfloat16 (operands
    # rounded to bfloat16), the loss in float32 and returned as float32; the gradients reach the
    # float32 leaves as float32.
    lead, hidden, vocab = (2, 4), 16, 23
    x, w, b = make_args(lead, hidden, vocab)
    t = make_target(kind, lead, vocab)
    cw = make_weight(vocab)
    opts = dict(weight=cw, reduction=reduction, label_smoothing=0.1)
    ours = [leaf(v) for v in (x, w, b)]
    refs = [leaf(v) for v in (x, w, b)]
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = linear_cross_entropy(ours[0], ours[1], t, linear_bias=ours[2], chunk_size=3, **opts)
        logits = F.linear(refs[0], refs[1], refs[2])
        assert logits.dtype == torch.bfloat16
        yr = F.cross_entropy(logits.reshape(-1, vocab), t.reshape(-1, vocab) if kind == "prob" else t.reshape(-1),
                             **opts)
        if reduction == "none":
            yr = yr.reshape(lead)
    assert yr.dtype == torch.float32
    assert y.dtype == torch.float32, y.dtype
    assert y.shape == yr.shape
    assert_close(y, yr, dtype=torch.bfloat16, check_dtype=False, msg="autocast loss")
    g = torch.randn(y.shape)
    for name, got, want, lf in zip(NAMES, torch.autograd.grad(y, ours, g), torch.autograd.grad(yr, refs, g), ours):
        assert got.dtype == torch.float32, f"{name}: {got.dtype}"
        assert got.shape == lf.shape
        assert_close(got, want, dtype=torch.bfloat16, check_dtype=False, msg=f"autocast grad of {name}", **BF16_TOL)


def test_autocast_float64_stays_float64():
    x, w, b = (leaf(v) for v in make_args((4,), 5, 6, torch.float64))
    t = class_target((4,), 6)
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = linear_cross_entropy(x, w, t, linear_bias=b, z_loss=1e-3)
    assert y.dtype == torch.float64
    assert_close(y, reference(x, w, t, b, z_loss=1e-3))
    y.backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float64


# (target kind, path): a target's gradient exists for probabilities only.
_AUTOCAST_PATHS = [(kind, path) for kind in ("class", "prob")
                   for path in ("eager", "no_grad", "target_grad", "compiled")
                   if not (kind == "class" and path == "target_grad")]


@pytest.mark.parametrize("kind,path", _AUTOCAST_PATHS, ids=[f"{k}-{p}" for k, p in _AUTOCAST_PATHS])
@pytest.mark.parametrize("chunk_size", [3, 1000], ids=["chunks", "one_chunk"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_loss_not_rounded_to_16_bits(dynamo_reset, reduction, chunk_size, kind, path):
    # Under bf16 autocast the loss is F.cross_entropy's of the bf16 logits: computed in float32 and
    # returned unrounded (a loss rounded to bfloat16 first is off by up to half its ulp, ~0.03 near
    # 10), reading float32 class probabilities as they are (rounded to bfloat16, they would move the
    # loss and a distillation gradient p - t by up to 2^-9 of each: ~3e-5 of the summed loss here).
    # Integer operands make every logit exact in bfloat16 whatever the GEMM's order, so the two
    # losses must agree to float32 rounding on every device and path.
    lead, hidden, vocab = (14,), 16, 50
    x, w, b = (torch.randint(-2, 3, shape).float() for shape in ((*lead, hidden), (vocab, hidden), (vocab,)))
    if kind == "prob":
        t = torch.softmax(torch.randn(*lead, vocab) * 2, -1)
        assert not torch.equal(t, t.bfloat16().float())
    else:
        t = make_target("class", lead, vocab)
    opts = dict(reduction=reduction, label_smoothing=0.1, weight=make_weight(vocab))
    if path == "target_grad":
        t.requires_grad_()
    if path != "no_grad":
        x.requires_grad_()

    def fn(x, w, b, t):
        return linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk_size, **opts)

    run = torch.compile(fn, fullgraph=True, backend="aot_eager") if path == "compiled" else fn
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = run(x, w, b, t)
        logits = F.linear(x, w, b)
        yr = F.cross_entropy(logits, t, **opts)
    assert torch.equal(logits.float(), F.linear(x, w, b).float()), "the logits are not exact in bfloat16"
    assert y.dtype == torch.float32
    assert_close(y, yr, rtol=2e-6, atol=1e-6, msg=f"{path}: autocast loss")
    if path != "no_grad":  # the backward takes the float32 incoming gradient
        g = torch.randn(y.shape)
        inputs = (x, t) if path == "target_grad" else (x,)
        for name, got, want in zip(("x", "t"), torch.autograd.grad(y, inputs, g), torch.autograd.grad(yr, inputs, g)):
            assert got.dtype == want.dtype == torch.float32
            assert_close(got, want, dtype=torch.bfloat16, check_dtype=False, msg=f"{path}: grad of {name}")


# ----------------------------------------------------------------------------------------------
# 10. The LinearCrossEntropyLoss module
# ----------------------------------------------------------------------------------------------


TorchLCELoss = getattr(nn, "LinearCrossEntropyLoss", None)
needs_torch_module = pytest.mark.skipif(TorchLCELoss is None, reason="torch.nn.LinearCrossEntropyLoss: PyTorch >= 2.13")


def _module_pair(in_features, num_classes, dtype=torch.float64, **kwargs):
    """torch_ext's module and PyTorch's from the same initial parameters (ours loads theirs, strict)."""
    ours_only = {k: kwargs.pop(k) for k in ("z_loss", "chunk_size") if k in kwargs}
    theirs = TorchLCELoss(in_features, num_classes, dtype=dtype, **kwargs)
    ours = LinearCrossEntropyLoss(in_features, num_classes, dtype=dtype, **kwargs, **ours_only)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_module_interface_is_torchs():
    # Same constructor as torch.nn.LinearCrossEntropyLoss (names, kinds, defaults) plus keyword-only
    # z_loss, chunk_size, softcap, return_lse and return_accuracy; forward(input, target).
    ours = inspect.signature(LinearCrossEntropyLoss.__init__).parameters
    assert list(ours)[:3] == ["self", "in_features", "num_classes"]
    extras = {"z_loss": 0.0, "chunk_size": None, "softcap": None, "return_lse": False, "return_accuracy": False}
    for name, default in extras.items():
        assert (ours[name].kind, ours[name].default) == (inspect.Parameter.KEYWORD_ONLY, default), name
    assert list(inspect.signature(LinearCrossEntropyLoss.forward).parameters) == [
        "self", "input", "target", "num_items_in_batch"
    ]
    if TorchLCELoss is not None:
        assert issubclass(LinearCrossEntropyLoss, TorchLCELoss)
        theirs = inspect.signature(TorchLCELoss.__init__).parameters
        assert [n for n in ours if n not in extras] == list(theirs)
        for name, p in theirs.items():
            assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name
    m = LinearCrossEntropyLoss(6, 10)
    assert (m.num_classes, m.out_features, m.reduction, m.ignore_index, m.label_smoothing, m.options) == \
        (10, (), "mean", None, 0.0, None)
    assert (m.z_loss, m.chunk_size, m.weight, m.linear.bias) == (0.0, None, None, None)
    assert m.linear.weight.shape == (10, 6) and m.linear.weight.requires_grad
    assert [n for n, _ in m.named_parameters()] == ["linear.weight"]
    assert list(m.state_dict()) == ["linear.weight"]
    m = LinearCrossEntropyLoss(6, 10, out_features=(2, 3), bias=True, weight=make_weight(10), dtype=torch.float64)
    assert list(m.state_dict()) == ["weight", "linear.weight", "linear.bias"]
    assert m.linear.weight.shape == (60, 6) and m.linear.bias.shape == (60,) and m.linear.weight.dtype == torch.float64
    assert [n for n, _ in m.named_buffers()] == ["weight"]


@needs_torch_module
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_module_matches_torch_module(reduction, kind):
    # Loss and gradients (input, linear.weight, linear.bias, a probability target) as PyTorch's
    # module, over bias, class weights, ignore_index (None, a valid class), label smoothing,
    # K-dimensional out_features, input (N, H) and (H).
    configs = [
        dict(),
        dict(bias=True, weight=make_weight(7, torch.float64), label_smoothing=0.1, ignore_index=2),
        dict(bias=True, out_features=(2, 3), weight=make_weight(7, torch.float64), label_smoothing=0.1),
        dict(out_features=(4,), ignore_index=0),
    ]
    for config in configs:
        if kind == "prob":  # ignore_index is for class indices only (both refuse it for probabilities)
            config = {k: v for k, v in config.items() if k != "ignore_index"}
        ours, theirs = _module_pair(5, 7, reduction=reduction, chunk_size=3, **config)
        dims = config.get("out_features", ())
        shapes = [(6,)] if dims else [(6,), ()]
        for lead in shapes:
            x = torch.randn(*lead, 5, dtype=torch.float64)
            if kind == "class":
                # (one row, (): class 3, never ignored here, else the mean is 0/0)
                t = class_target(lead + dims, 7, "some", config.get("ignore_index", -100)) if lead else torch.tensor(3)
            else:
                t = leaf(torch.softmax(torch.randn(*lead, 7, *dims, dtype=torch.float64), 1 if lead else 0))
            xo, xt = leaf(x), leaf(x)
            to, tt = (t, t) if kind == "class" else (leaf(t), leaf(t))
            y, yr = ours(xo, to), theirs(xt, tt)
            tag = f"{config} lead={lead} {kind} {reduction}"
            assert_close(y, yr, rtol=1e-10, atol=1e-10, msg=f"{tag}: loss")
            g = torch.randn(y.shape, dtype=torch.float64)
            extra = ((to,), (tt,)) if kind == "prob" else ((), ())
            got = torch.autograd.grad(y, (xo, *ours.parameters(), *extra[0]), g)
            want = torch.autograd.grad(yr, (xt, *theirs.parameters(), *extra[1]), g)
            for a, r in zip(got, want):
                assert_close(a, r, rtol=1e-10, atol=1e-10, msg=f"{tag}: gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_matches_functional(reduction):
    # The module is linear_cross_entropy on its own linear.weight / linear.bias (with z_loss,
    # chunk_size, and input of any rank (*, H), which PyTorch's module does not take).
    cw = make_weight(9)
    m = LinearCrossEntropyLoss(4, 9, bias=True, weight=cw, ignore_index=2, reduction=reduction, label_smoothing=0.1,
                               z_loss=1e-3, chunk_size=3)
    assert (m.ignore_index, m.reduction, m.label_smoothing, m.z_loss, m.chunk_size) == (2, reduction, 0.1, 1e-3, 3)
    x = torch.randn(2, 3, 4)
    t = class_target((2, 3), 9, "some", 2)
    xl = leaf(x)
    y = m(xl, t)
    w, b = leaf(m.linear.weight.detach()), leaf(m.linear.bias.detach())
    xr = leaf(x)
    yr = reference(xr, w, t, b, cw, ignore_index=2, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    assert_close(y, yr)
    assert_close(y, linear_cross_entropy(x, m.linear.weight, t, linear_bias=m.linear.bias, weight=cw, ignore_index=2,
                                         reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=3))
    g = torch.randn(y.shape)
    for a, r in zip(torch.autograd.grad(y, (xl, m.linear.weight, m.linear.bias), g),
                    torch.autograd.grad(yr, (xr, w, b), g)):
        assert_close(a, r)


def test_module_options_and_chunk_size(monkeypatch):
    # options is kept (attribute, repr) but the loss always runs chunked: only its batch_chunk_size
    # counts, as rows per chunk, when chunk_size is None and chunking_method is None (as in PyTorch).
    import sys

    lce = sys.modules[LinearCrossEntropyLoss.__module__]  # (torch_ext.linear_cross_entropy is the function)

    seen = []
    real = lce.linear_cross_entropy

    def spy(*args, **kwargs):  # the rows per chunk the function resolves from what the module passes
        seen.append(lce.rows_per_chunk(kwargs["chunk_size"], kwargs.get("options")))
        return real(*args, **kwargs)

    monkeypatch.setattr(lce, "linear_cross_entropy", spy)
    x, t = torch.randn(7, 4), class_target((7,), 5)
    Options = getattr(nn, "LinearCrossEntropyOptions", None)
    cases = [(None, None, None), (None, 3, 3)]
    if Options is not None:
        cases += [(Options(), None, None), (Options(batch_chunk_size=2, chunking_method=None), None, 2),
                  (Options(batch_chunk_size=2, chunking_method=None), 5, 5)]
    y0 = None
    for options, chunk_size, expected in cases:
        m = LinearCrossEntropyLoss(4, 5, options=options, chunk_size=chunk_size)
        assert m.options is options
        if options is not None:
            assert f"options={options}" in repr(m)
        torch.manual_seed(0)
        with torch.no_grad():
            m.linear.weight.copy_(torch.linspace(-1, 1, 20).view(5, 4))
        y = m(x, t)
        assert seen[-1] == expected, (options, chunk_size, seen)
        y0 = y if y0 is None else y0
        assert_close(y, y0)


def test_module_repr_dtype_device_and_state_dict():
    m = LinearCrossEntropyLoss(4, 5, bias=True, weight=make_weight(5), reduction="sum", label_smoothing=0.1,
                               z_loss=1e-3, chunk_size=64)
    r = repr(m)
    assert r.startswith("LinearCrossEntropyLoss(")
    for part in ("in_features=4", "num_classes=5", "out_features=()", "bias=True", "reduction=sum",
                 "ignore_index=None", "label_smoothing=0.1", "options=None", "z_loss=0.001", "chunk_size=64",
                 "(linear): Linear(in_features=4, out_features=5, bias=True)"):
        assert part in r, (part, r)
    if TorchLCELoss is not None:  # PyTorch's repr, then ours
        theirs = TorchLCELoss(4, 5, bias=True, weight=make_weight(5), reduction="sum", label_smoothing=0.1)
        assert m.extra_repr().startswith(theirs.extra_repr())
    m64 = m.double()
    assert m64.weight.dtype == m64.linear.weight.dtype == torch.float64
    x, t = torch.randn(3, 4, dtype=torch.float64), class_target((3,), 5)
    assert_close(m64(x, t), reference(x, m64.linear.weight, t, m64.linear.bias, m64.weight, reduction="sum",
                                      label_smoothing=0.1, z_loss=1e-3))
    m2 = LinearCrossEntropyLoss(4, 5, bias=True, weight=torch.ones(5))
    m2.load_state_dict(m.float().state_dict())
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), m.state_dict().values()))
    meta = LinearCrossEntropyLoss(4, 5, device="meta", dtype=torch.bfloat16)
    assert meta.linear.weight.device.type == "meta" and meta.linear.weight.dtype == torch.bfloat16


def test_module_argument_errors():
    # The older interface (class weight first, head weight passed to forward) gets a
    # TypeError that names the new one and the functional form.
    with pytest.raises(TypeError, match=r"in_features.*LinearCrossEntropyLoss\(in_features, num_classes.*"
                                        r"torch_ext\.linear_cross_entropy\(input, linear_weight, target"):
        LinearCrossEntropyLoss(make_weight(5), -100)
    with pytest.raises(TypeError, match="num_classes"):
        LinearCrossEntropyLoss(4, 5.0)
    with pytest.raises(TypeError):
        LinearCrossEntropyLoss()
    m = LinearCrossEntropyLoss(4, 5)
    with pytest.raises(TypeError):
        m(torch.randn(3, 4), torch.randn(5, 4), class_target((3,), 5))
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropyLoss(4, 5, reduction="avg")
    with pytest.raises(RuntimeError, match="weight"):
        LinearCrossEntropyLoss(4, 5, weight=torch.ones(4))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        LinearCrossEntropyLoss(4, 5, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        LinearCrossEntropyLoss(4, 5, chunk_size=0)
    m = LinearCrossEntropyLoss(4, 5, out_features=(2,))
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(3, 2, 4), torch.zeros(3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        m(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


@pytest.mark.cpu_only("a subprocess, no tensors on a device")
def test_module_without_torch_module():
    # PyTorch < 2.13 has no nn.LinearCrossEntropyLoss: the module is then an nn.Module with the same
    # constructor, keys and forward (simulated by removing the class before importing torch_ext).
    code = """
import torch
from torch import nn
del nn.LinearCrossEntropyLoss
import torch_ext
from torch_ext.linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
assert LinearCrossEntropyLoss.__mro__[1] is nn.modules.loss._WeightedLoss
torch.manual_seed(0)
cw = torch.rand(5) + 0.1
m = LinearCrossEntropyLoss(4, 5, bias=True, weight=cw, ignore_index=1, label_smoothing=0.1, reduction="sum")
assert list(m.state_dict()) == ["weight", "linear.weight", "linear.bias"], list(m.state_dict())
assert (m.num_classes, m.out_features, m.options, m.ignore_index) == (5, (), None, 1)
x, t = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 1])
ref = torch.nn.functional.cross_entropy(m.linear(x), t, cw, ignore_index=1, label_smoothing=0.1, reduction="sum")
torch.testing.assert_close(m(x, t), ref)
k = LinearCrossEntropyLoss(4, 5, out_features=(2,), bias=True)
assert k.linear.weight.shape == (10, 4)
t2 = torch.randint(0, 5, (6, 2))
logits = k.linear(x).view(6, 5, 2)
torch.testing.assert_close(k(x, t2), torch.nn.functional.cross_entropy(logits, t2))
for bad in (dict(weight=torch.ones(4)), dict(label_smoothing=2.0)):
    try:
        LinearCrossEntropyLoss(4, 5, **bad)
    except RuntimeError:
        pass
    else:
        raise AssertionError(bad)
print("ok")
"""
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------
# 11. Argument errors
# ----------------------------------------------------------------------------------------------


def _error_cases():
    x = torch.randn(4, 6)
    w = torch.randn(5, 6)
    b = torch.randn(5)
    t = torch.tensor([0, 1, 2, 3])
    p = prob_target((4,), 5)
    x20 = torch.randn(20, 6)
    t20 = class_target((20,), 5)
    t20[-1] = 5  # in the last chunk of 3 rows
    x3 = torch.randn(2, 3, 6)
    return {
        # id: (input, linear_weight, target, linear_bias, weight, options, match)
        "linear_weight_1d": (x, torch.randn(30), t, None, None, {}, r"linear_weight"),
        "linear_weight_3d": (x, torch.randn(5, 2, 3), t, None, None, {}, r"linear_weight"),
        "linear_weight_0d": (x, torch.tensor(1.0), t, None, None, {}, r"linear_weight"),
        "hidden_mismatch": (x, torch.randn(5, 7), t, b, None, {}, r"linear_weight|input"),
        "hidden_mismatch_3d": (x3, torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long), None, None, {},
                               r"linear_weight|input"),
        "linear_weight_dtype": (x, w.double(), t, None, None, {}, r"linear_weight|dtype"),
        "bias_too_short": (x, w, t, torch.randn(4), None, {}, r"linear_bias"),
        "bias_too_long": (x, w, t, torch.randn(6), None, {}, r"linear_bias"),
        "bias_2d": (x, w, t, torch.randn(1, 5), None, {}, r"linear_bias"),
        "chunk_size_zero": (x, w, t, b, None, dict(chunk_size=0), r"chunk_size"),
        "chunk_size_negative": (x, w, t, b, None, dict(chunk_size=-3), r"chunk_size"),
        "target_too_large": (x, w, torch.tensor([0, 1, 5, 3]), b, None, {}, r"(?i)target"),
        "target_much_too_large": (x, w, torch.tensor([0, 1, 1 << 40, 3]), b, None, dict(reduction="none"),
                                  r"(?i)target"),
        "target_negative": (x, w, torch.tensor([0, -1, 2, 3]), b, None, dict(reduction="sum"), r"(?i)target"),
        "target_negative_ignore_elsewhere": (x, w, torch.tensor([0, -100, 2, 3]), b, None,
                                             dict(ignore_index=2, label_smoothing=0.1), r"(?i)target"),
        "target_too_large_last_chunk": (x20, w, t20, b, make_weight(5), dict(chunk_size=3), r"(?i)target"),
        "class_target_wrong_rows": (x, w, torch.tensor([0, 1, 2]), b, None, {}, r"(?i)target"),
        "class_target_wrong_rank": (x, w, t.view(4, 1), b, None, {}, r"(?i)target"),
        "class_target_3d_flattened": (x3, w, torch.zeros(6, dtype=torch.long), b, None, {}, r"(?i)target"),
        "class_target_int32": (x, w, t.int(), b, None, {}, r"(?i)target"),
        "class_target_bool": (x, w, t.bool(), b, None, {}, r"(?i)target"),
        "class_target_float": (x, w, t.float(), b, None, {}, r"(?i)target"),
        "prob_target_wrong_classes": (x, w, torch.rand(4, 6), b, None, {}, r"(?i)target"),
        "prob_target_wrong_rows": (x, w, torch.rand(3, 5), b, None, {}, r"(?i)target"),
        "class_weight_wrong_length": (x, w, t, b, make_weight(4), {}, r"(?i)weight"),
        "unknown_reduction": (x, w, t, b, None, dict(reduction="avg"), r"reduction"),
        "unknown_reduction_prob": (x, w, p, b, None, dict(reduction="batchmean"), r"reduction"),
        "label_smoothing_negative": (x, w, t, b, None, dict(label_smoothing=-0.1), r"label_smoothing"),
        "label_smoothing_above_one": (x, w, t, b, None, dict(label_smoothing=1.1), r"label_smoothing"),
        "label_smoothing_above_one_prob": (x, w, p, b, None, dict(label_smoothing=1.5), r"label_smoothing"),
        "input_0d": (torch.tensor(1.0), w, torch.tensor(0), b, None, {}, r"(?i)input"),
    }


ERROR_CASES = list(_error_cases().keys())


def _call(path, x, w, t, b, cw, options):
    opts = dict(ignore_index=-100, reduction="mean", label_smoothing=0.0, chunk_size=None)
    opts.update(options)
    if path == "functional":
        return linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, **opts)
    if path == "module":  # the module holds w and b as linear.weight and linear.bias
        m = LinearCrossEntropyLoss(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, weight=cw,
                                   ignore_index=opts["ignore_index"], reduction=opts["reduction"],
                                   label_smoothing=opts["label_smoothing"], chunk_size=opts["chunk_size"])
        with torch.no_grad():
            m.linear.weight.copy_(w)
            if b is not None:
                m.linear.bias.copy_(b)
        m.linear.weight.requires_grad_(w.requires_grad)
        return m(x, t)
    if path == "op":
        chunk = 2 if opts["chunk_size"] is None else opts["chunk_size"]
        return FWD(x, w, b, t, cw, opts["ignore_index"], opts["reduction"], opts["label_smoothing"], 0.0, chunk,
                   NO_GRADS)
    raise AssertionError(path)


# The module builds its own linear.weight (C, H) and linear.bias (C,): the cases of a malformed
# head weight or bias cannot be given to it.
NOT_FOR_MODULE = {"linear_weight_1d", "linear_weight_3d", "linear_weight_0d", "bias_too_short", "bias_too_long",
                  "bias_2d"}
ERROR_CALLS = [(case, path) for case in ERROR_CASES for path in ("functional", "module", "op")
               if not (path == "module" and case in NOT_FOR_MODULE)]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case,path", ERROR_CALLS, ids=[f"{c}-{p}" for c, p in ERROR_CALLS])
def test_bad_arguments(case, path, requires_grad):
    x, w, t, b, cw, options, match = _error_cases()[case]
    if path == "module" and "reduction" in options:
        with pytest.raises(ERRORS, match=match):  # the module refuses it when built
            _call(path, x, w, t, b, cw, options)
        return
    if requires_grad:
        x, w = leaf(x), leaf(w)
    with pytest.raises(ERRORS, match=match):
        y = _call(path, x, w, t, b, cw, options)
        if requires_grad and path != "op":
            y.sum().backward()


def test_bad_grad_loss_shape_for_bwd_op():
    x, w, b, t, cw = _op_args(4, "class", True, False, -100)
    with pytest.raises(ERRORS, match="grad_loss"):
        BWD(torch.randn(3), x, w, b, t, cw, -100, "none", 0.0, 0.0, 2, [True, True, True])
    with pytest.raises(ERRORS, match="grad_loss"):
        BWD(torch.randn(4), x, w, b, t, cw, -100, "mean", 0.0, 0.0, 2, [True, True, True])


@pytest.mark.parametrize("target_kind", ["index", "probability_requiring_grad"])
def test_gradients_formed_in_forward_are_saved_tensors_that_hooks_see(target_kind):
    """Eager, reductions mean/sum: the gradients formed in the forward op are saved tensors, so
    saved-tensor hooks (save_on_cpu, activation offloading) pack them with the inputs: a target
    that takes no gradient through the C++ node (csrc/autograd_node.h), a probability target that
    requires grad through LinearCrossEntropyFunction. Each input-shaped tensor is packed twice (the
    input and its gradient); then the gradients match PyTorch's for grad_output 1 and 2.5, and a
    retained graph's second backward gives the same."""
    x, w = leaf(torch.randn(6, 5)), leaf(torch.randn(11, 5))
    if target_kind == "index":
        t, node = torch.randint(11, (6,)), "LinearCrossEntropyBackward"
    else:
        t, node = leaf(torch.softmax(torch.randn(6, 11), -1)), "LinearCrossEntropyFunctionBackward"
    packed = []

    def pack(s):
        packed.append(tuple(s.shape))
        return s.clone()  # as an offloading hook does: backward sees a copy

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        loss = torch_ext.linear_cross_entropy(x, w, t)
    assert loss.grad_fn.name() == node
    assert packed.count((6, 5)) == 2 and packed.count((11, 5)) == 2, packed
    leaves = (x, w) if target_kind == "index" else (x, w, t)
    refs = tuple(leaf(v) for v in leaves)
    want = F.cross_entropy(refs[0] @ refs[1].T, t if target_kind == "index" else refs[2])
    for scale in (1.0, 2.5):
        g = torch.tensor(scale)
        got_first = torch.autograd.grad(loss, leaves, g, retain_graph=True)
        got_second = torch.autograd.grad(loss, leaves, g, retain_graph=True)
        ref = torch.autograd.grad(want, refs, g, retain_graph=True)
        for a, b, r in zip(got_first, got_second, ref):
            assert_close(a, r)
            assert torch.equal(a, b)
