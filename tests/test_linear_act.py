"""Tests of the fused dense layer + activation (every device): ``torch_ext.fused_linear``,
``torch_ext.FusedLinear``, ``torch_ext.FusedLinearFunction`` and the raw ops
``torch.ops.torch_ext.linear_act_fwd`` / ``linear_act_bwd``.

The reference is always PyTorch itself: ``act(F.linear(input, weight, bias))`` and its eager
autograd (``nn.Linear`` + activation module for the module). Covered:

* forward and the input/weight/bias gradients (random grad_output) for every activation in
  float32, float64, bfloat16 and float16;
* shapes: 1-D..4-D input, empty batches, in_features=0, odd and mask-tail out_features, 1x1,
  127x129->65, bias None, and a size spanning several row panels of the blocked CPU path
  (default panel, and a tiny panel set through TORCH_EXT_PANEL_BYTES);
* non-contiguous, sliced, transposed and expanded input/weight/bias/grad_output;
* leaky_relu slopes (0, negative, > 1); NaN/inf propagation (forward and gradients); the
  gradient at a pre-activation of exactly 0;
* what is saved for backward: the relu/leaky_relu bit mask (bits, layout, <= 1/8 of eager's
  saved bytes), the pre-activation, nothing;
* gradcheck (float64) through the functional, the autograd.Function and the raw op, with any
  subset of input/weight/bias requiring grad;
* torch.library.opcheck of both ops; torch.compile (aot_eager, inductor, dynamic shapes, no
  graph breaks); torch.autocast; the FusedLinear module (state_dict, init, factory kwargs,
  repr); argument errors; double backward; retain_graph;
* the same checks in subprocesses under ATEN_CPU_CAPABILITY=default, avx2 and avx512;
* the layer on torch_ext's float32 CPU GEMM and on ATen's (TORCH_EXT_CPU_GEMM), at sizes across
  the GEMM's blocking, every layout case and several thread counts (tests/test_cpu_gemm.py
  tests the GEMM itself).
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_ext
from torch_ext import FusedLinear, FusedLinearFunction, fused_linear
from utils import (
    CPU_CAPABILITY_LEVELS,
    BackwardOpMasks,
    SavedTensorBytes,
    act_fn,
    act_module,
    assert_close,
    cpu_supports,
    default_device_type,
    leaf,
    reference_dtype,
    run_python,
    tolerance,
)

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "quick_gelu")
MASK_ACTIVATIONS = ("relu", "leaky_relu")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FWD = torch.ops.torch_ext.linear_act_fwd.default
BWD = torch.ops.torch_ext.linear_act_bwd.default
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# Reference and helpers
# ----------------------------------------------------------------------------------------------


def reference(x, w, b, activation, negative_slope=0.01):
    return act_fn(activation, negative_slope)(F.linear(x, w, b))


def call(path: str, x, w, b, activation, negative_slope=0.01):
    """The fused forward through one of its three entry points."""
    if path == "functional":
        return fused_linear(x, w, b, activation, negative_slope)
    if path == "function":
        return FusedLinearFunction.apply(x, w, b, activation, float(negative_slope))[0]
    if path == "op":
        return torch.ops.torch_ext.linear_act_fwd(x, w, b, activation, float(negative_slope))[0]
    raise AssertionError(path)


PATHS = ("functional", "function", "op")


def make_args(in_shape, out_features, dtype=torch.float32, bias=True):
    """Random input (*, K), weight (N, K) scaled so pre-activations are O(1), bias (N,)."""
    k = in_shape[-1]
    x = torch.randn(in_shape).to(dtype)
    w = (torch.randn(out_features, k) / math.sqrt(max(k, 1))).to(dtype)
    b = (0.5 * torch.randn(out_features)).to(dtype) if bias else None
    return x, w, b


def forward_backward(fn, x, w, b, grad, dtype=None):
    """y = fn(x, w, b) on fresh leaves (cast to dtype), and the grads of (x, w, b) for grad_output
    `grad` (a tensor, or "sum" for the stride-0 grad of y.sum())."""
    xl, wl, bl = leaf(x, dtype), leaf(w, dtype), leaf(b, dtype)
    y = fn(xl, wl, bl)
    leaves = [t for t in (xl, wl, bl) if t is not None]
    if isinstance(grad, str):
        assert grad == "sum"
        grads = torch.autograd.grad(y.sum(), leaves)
    else:
        g = grad if dtype is None or grad.dtype == dtype else grad.to(dtype)
        grads = torch.autograd.grad(y, leaves, g)
    grads = list(grads) + [None] * (3 - len(grads))
    return y, grads


def check_against_pytorch(x, w, b, activation, negative_slope=0.01, grad=None, path="functional", msg=""):
    """Forward and the three gradients of the fused op vs act(F.linear) with eager autograd.

    float32/float64 are compared with PyTorch in the same dtype. bfloat16 is compared with the
    float32 computation from the same bfloat16 values (see utils.reference_dtype for why).
    relu/leaky_relu: see kink_resolved_reference (their gradients at pre-activations within
    rounding of 0 follow the op's mask, which is checked there; exact zeros and the mask bits
    themselves are checked against eager PyTorch by the tests of sections 5 and 6)."""
    dtype = x.dtype
    if grad is None:
        out_shape = (*x.shape[:-1], w.shape[0])
        grad = torch.randn(out_shape).to(dtype)
    y, grads = forward_backward(lambda a, c, d: call(path, a, c, d, activation, negative_slope), x, w, b, grad)
    ref_fn = (
        kink_resolved_reference(x, w, b, activation, negative_slope)
        if activation in MASK_ACTIVATIONS
        else lambda a, c, d: reference(a, c, d, activation, negative_slope)
    )
    ref_y, ref_grads = forward_backward(ref_fn, x, w, b, grad, reference_dtype(dtype))
    tag = f"{msg} {activation} {dtype_id(dtype)}"
    assert_close(y, ref_y, dtype=dtype, msg=f"{tag}: output")
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(got, want, dtype=dtype, msg=f"{tag}: {name}")
    return y, grads


def unpack_mask(saved: torch.Tensor, n: int) -> torch.Tensor:
    """(*, ceil(N/8)) uint8 -> (*, N) bool, bit j of byte i = element 8 i + j."""
    bits = (saved.unsqueeze(-1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.flatten(-2)[..., :n].bool()


def kink_resolved_reference(x, w, b, activation, negative_slope):
    """PyTorch reference for relu/leaky_relu whose side of the kink is the op's own, where that
    is within rounding of 0.

    A pre-activation within rounding error of 0 can land on either side of it: the op rounds
    x @ W.T to x's dtype before adding the bias (bfloat16: 2**-8 relative), eager uses addmm, and
    a float32 reference rounds differently again. On the wrong side, the gradient of that element
    changes by a whole grad_output * weight: not a tolerance matter. So: check that the op's
    mask (which side it took) equals sign(pre) of the exact-ish float64 pre-activation wherever
    |pre| exceeds the rounding bound (and wherever pre is exactly 0), and differentiate
    where(mask, pre, slope * pre) -- PyTorch ops -- as the reference.
    """
    n = w.shape[0]
    pos = unpack_mask(FWD(x, w, b, activation, float(negative_slope))[1], n)
    x64, w64 = x.detach().double(), w.detach().double()
    pre = F.linear(x64, w64, None if b is None else b.detach().double())
    # Rounding of the result to x's dtype, plus a worst-case bound of the GEMM's accumulation
    # error (float32 accumulators for float32/bfloat16).
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = w.shape[1]
    rel = 2 * torch.finfo(x.dtype).eps + (k + 2) * torch.finfo(acc).eps
    bound = rel * F.linear(x64.abs(), w64.abs()) + 1e-30
    disagree = pos != (pre > 0)
    ok = (pre.abs() <= bound) & (pre != 0)
    assert bool((ok | ~disagree).all()), (
        f"{activation} mask wrong at pre-activations away from 0: {pre[disagree & ~ok][:10].tolist()}"
    )
    slope = 0.0 if activation == "relu" else float(negative_slope)

    def fn(a, c, d):
        p = F.linear(a, c, d)
        return torch.where(pos, p, p * slope)

    return fn


def packbits_lsb_first(bits: torch.Tensor) -> torch.Tensor:
    """(*, N) bool -> (*, ceil(N/8)) uint8, bit j of byte i = element 8 i + j."""
    n = bits.shape[-1]
    nbytes = (n + 7) // 8
    padded = torch.zeros((*bits.shape[:-1], nbytes * 8), dtype=torch.int32)
    padded[..., :n] = bits.to(torch.int32)
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (padded.view(*bits.shape[:-1], nbytes, 8) * weights).sum(-1).to(torch.uint8)


def integer_args(in_shape, out_features, dtype=torch.float32, bias=True, low=-2, high=3):
    """Small-integer input/weight/bias: every GEMM result is exact in any dtype (bf16 too), so
    pre-activations are known exactly, and many are exactly 0."""
    k = in_shape[-1]
    x = torch.randint(low, high, in_shape).to(dtype)
    w = torch.randint(low, high, (out_features, k)).to(dtype)
    b = torch.randint(low, high, (out_features,)).to(dtype) if bias else None
    return x, w, b


def test_activation_list():
    assert tuple(torch_ext.ACTIVATIONS) == ACTIVATIONS


@pytest.mark.cpu_only("the CPU's instruction set")
def test_cpu_capability_follows_aten():
    assert torch_ext.cpu_capability() in CPU_CAPABILITY_LEVELS
    assert torch_ext.cpu_capability() == torch.backends.cpu.get_cpu_capability()


# ----------------------------------------------------------------------------------------------
# 1. Forward and gradients vs PyTorch, every activation x dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_pytorch(activation, dtype):
    x, w, b = make_args((2, 5, 37), 45, dtype)
    check_against_pytorch(x, w, b, activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_output_dtype_and_shape(activation, dtype):
    x, w, b = make_args((3, 4, 6), 5, dtype)
    out, saved = FWD(x, w, b, activation, 0.01)
    assert out.dtype == dtype and out.shape == (3, 4, 5)
    assert out.is_contiguous()


# ----------------------------------------------------------------------------------------------
# 2. Shapes
# ----------------------------------------------------------------------------------------------

SHAPES = [
    pytest.param((7,), 5, id="1d"),
    pytest.param((4, 6), 5, id="2d"),
    pytest.param((2, 3, 6), 7, id="3d"),
    pytest.param((2, 2, 3, 6), 9, id="4d"),
    pytest.param((0, 6), 5, id="zero_batch"),
    pytest.param((2, 0, 6), 5, id="zero_middle_batch"),
    pytest.param((4, 0), 5, id="in_features_0"),
    pytest.param((3, 4), 0, id="out_features_0"),
    pytest.param((1, 1), 1, id="1x1"),
    pytest.param((127, 129), 65, id="127x129_65"),
    pytest.param((5, 11), 1, id="n1"),
    pytest.param((5, 11), 7, id="n7"),
    pytest.param((5, 11), 9, id="n9"),
    pytest.param((5, 11), 17, id="n17"),
    pytest.param((5, 11), 33, id="n33"),
    pytest.param((3, 13), 45, id="n45_odd"),
    pytest.param((3, 16), 2100, id="n2100_wide"),  # bfloat16 rows go in 1024-column segments
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("in_shape,out_features", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_shapes(activation, in_shape, out_features, bias):
    x, w, b = make_args(in_shape, out_features, torch.float32, bias)
    y, _ = check_against_pytorch(x, w, b, activation, msg=f"{in_shape}->{out_features}")
    assert y.shape == (*in_shape[:-1], out_features)


@pytest.mark.parametrize("in_shape,out_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("activation", ["leaky_relu", "gelu_tanh"])
def test_shapes_other_dtypes(activation, dtype, in_shape, out_features):
    x, w, b = make_args(in_shape, out_features, dtype)
    check_against_pytorch(x, w, b, activation, msg=f"{in_shape}->{out_features}")


PANEL_CASES = [(a, d) for d in (torch.float32, torch.float64) for a in ACTIVATIONS] + [
    # bfloat16 runs as one panel by design; it is here for the long reductions.
    (a, torch.bfloat16) for a in ("relu", "gelu")
]


@pytest.mark.parametrize("activation,dtype", PANEL_CASES, ids=[f"{a}-{dtype_id(d)}" for a, d in PANEL_CASES])
def test_many_row_panels(activation, dtype):
    # 3000 rows of (300 + 200) float32 = 2 KB: ~6 panels of the default 1 MiB (float64: ~12);
    # the backward panels are whole bias-reduction blocks (40 rows at N=200).
    x, w, b = make_args((3000, 300), 200, dtype)
    check_against_pytorch(x, w, b, activation, msg="3000x300->200")


@pytest.mark.cpu_only("the CPU GEMM's row panels (panel_bytes)")
@pytest.mark.parametrize("in_shape,out_features", [((130, 30), 200), ((37, 5), 9), ((2, 41, 7), 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_tiny_row_panels(set_config, activation, dtype, in_shape, out_features):
    # The config's panel_bytes shrinks the panels: forward panels of a few rows, and several
    # backward panels (whose grad_weight is accumulated with addmm_).
    set_config(panel_bytes=4096)
    x, w, b = make_args(in_shape, out_features, dtype)
    check_against_pytorch(x, w, b, activation, msg=f"panel 4096 {in_shape}->{out_features}")


# ----------------------------------------------------------------------------------------------
# 3. Non-contiguous and expanded tensors
# ----------------------------------------------------------------------------------------------

M, K, N = 6, 10, 9


def _layout_case(name, dtype, m=M, k=K, n=N):
    """(x, w, b, grad) for one layout case at (m, k) -> n; grad None = random contiguous, "sum" =
    y.sum()."""
    c = lambda t: t.to(dtype)  # noqa: E731
    x, w, b = make_args((m, k), n, dtype)
    grad = None
    if name == "input_transposed":
        x = c(torch.randn(k, m)).t()
    elif name == "input_sliced":
        x = c(torch.randn(m, 2 * k))[:, ::2]
    elif name == "input_3d_permuted":
        x = c(torch.randn(2, k, 3)).transpose(1, 2)
    elif name == "input_expanded":
        x = c(torch.randn(k)).expand(m, k)
    elif name == "input_3d_expanded":
        x = c(torch.randn(1, 3, k)).expand(2, 3, k)
    elif name == "weight_sliced":
        w = c(torch.randn(n, 2 * k) / math.sqrt(k))[:, ::2]
    elif name == "weight_transposed":
        w = c(torch.randn(n, k) / math.sqrt(k)).t().contiguous().t()
    elif name == "bias_sliced":
        b = c(torch.randn(2 * n))[::2]
    elif name == "grad_transposed":
        grad = c(torch.randn(n, m)).t()
    elif name == "grad_row_expanded":  # strides (0, 1): rows read with a row stride of 0
        grad = c(torch.randn(n)).expand(m, n)
    elif name == "grad_column_expanded":  # strides (1, 0)
        grad = c(torch.randn(m, 1)).expand(m, n)
    elif name == "grad_3d_sliced":
        x = c(torch.randn(2, 3, k))
        grad = c(torch.randn(2, 3, 2 * n))[..., ::2]
    elif name == "grad_from_sum":  # y.sum() backward: strides (0, 0)
        grad = "sum"
    elif name == "grad_from_sum_3d":
        x = c(torch.randn(2, 3, k))
        grad = "sum"
    elif name == "all_strided":
        x = c(torch.randn(k, m)).t()
        w = c(torch.randn(n, 2 * k) / math.sqrt(k))[:, ::2]
        b = c(torch.randn(3 * n))[::3]
        grad = c(torch.randn(n, m)).t()
    else:
        raise AssertionError(name)
    return x, w, b, grad


LAYOUT_CASES = [
    "input_transposed", "input_sliced", "input_3d_permuted", "input_expanded", "input_3d_expanded",
    "weight_sliced", "weight_transposed", "bias_sliced", "grad_transposed", "grad_row_expanded",
    "grad_column_expanded", "grad_3d_sliced", "grad_from_sum", "grad_from_sum_3d", "all_strided",
]


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_noncontiguous(activation, dtype, case):
    x, w, b, grad = _layout_case(case, dtype)
    if case.startswith("input"):
        assert not x.is_contiguous()
    check_against_pytorch(x, w, b, activation, grad=grad, msg=case)


def test_grad_from_backward_of_sum_reaches_leaves():
    # The literal y.sum().backward() path (stride-0 grad_output into the op), through .grad.
    x, w, b = (leaf(t) for t in make_args((4, 3, K), N))
    fused_linear(x, w, b, "gelu").sum().backward()
    rx, rw, rb = (leaf(t) for t in (x, w, b))
    F.gelu(F.linear(rx, rw, rb)).sum().backward()
    for got, want in ((x.grad, rx.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        assert_close(got, want)


# ----------------------------------------------------------------------------------------------
# 4. leaky_relu slopes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("negative_slope", [0.01, 0.2, 0.0, -0.5, 1.5])
def test_leaky_relu_slopes(negative_slope, dtype):
    x, w, b = make_args((7, 13), 17, dtype)
    check_against_pytorch(x, w, b, "leaky_relu", negative_slope)
    x, w, b = make_args((2, 3, 13), 17, dtype)
    check_against_pytorch(x, w, b, "leaky_relu", negative_slope, path="op")


@pytest.mark.parametrize("negative_slope", [0.2, -0.5, 1.5])
def test_leaky_relu_slope_reaches_module(negative_slope):
    layer = FusedLinear(13, 17, activation="leaky_relu", negative_slope=negative_slope)
    x = torch.randn(7, 13)
    ref = F.leaky_relu(F.linear(x, layer.weight, layer.bias), negative_slope)
    assert_close(layer(x), ref)


# ----------------------------------------------------------------------------------------------
# 5. NaN / inf, and the gradient at a pre-activation of exactly 0
# ----------------------------------------------------------------------------------------------


def _nonfinite_args(dtype, in_bias):
    x, w, b = make_args((6, 5), 19, dtype)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    x[2, 3] = -float("inf")
    x[3, 0] = float("inf")
    x[3, 4] = -float("inf")  # inf - inf: a NaN row
    if in_bias:
        b[3], b[5], b[7] = float("inf"), -float("inf"), float("nan")
    return x, w, b


@pytest.mark.parametrize("in_bias", [False, True], ids=["input", "input_and_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nonfinite_forward(activation, dtype, in_bias):
    x, w, b = _nonfinite_args(dtype, in_bias)
    y = fused_linear(x, w, b, activation, 0.01)
    # The reference is PyTorch in float64 (rounded to dtype): PyTorch's float32/bfloat16 F.gelu
    # goes through oneDNN, which gives gelu(+inf) = NaN, while its float64 and scalar paths (and
    # the math) give +inf; everything else is the same in every dtype.
    ref = reference(x.double(), w.double(), b.double(), activation).to(dtype)
    assert torch.isnan(ref).any() and torch.isinf(F.linear(x, w, b)).any()
    assert_close(y, ref, equal_nan=True, msg="non-finite forward")
    # In-dtype PyTorch agrees too, apart from that gelu(+inf).
    if activation != "gelu":
        ref_same = reference(x, w, b, activation)
        if dtype == torch.bfloat16:
            ref_same = reference(x.float(), w.float(), b.float(), activation)
        assert_close(y, ref_same, dtype=dtype, equal_nan=True, msg="non-finite forward, same dtype")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nonfinite_gradients(activation, dtype):
    # Gradients where input has NaN/inf, vs PyTorch's eager autograd in the same dtype (bfloat16:
    # float32 from the same values). NaN positions must match; the rest within tolerance.
    x, w, b = _nonfinite_args(dtype, False)
    g = torch.randn(6, 19).to(dtype)
    _, grads = forward_backward(lambda a, c, d: fused_linear(a, c, d, activation), x, w, b, g)
    _, ref_grads = forward_backward(lambda a, c, d: reference(a, c, d, activation), x, w, b, g, reference_dtype(dtype))
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(got, want, dtype=dtype, equal_nan=True, msg=f"{activation}: {name}")


ZERO_GRAD_CASES = [("relu", 0.01), ("leaky_relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.5), ("leaky_relu", 1.5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation,negative_slope", ZERO_GRAD_CASES)
def test_gradient_at_exact_zero(activation, negative_slope, dtype):
    # weight = identity and bias = 0, so pre-activation == input exactly, with +0.0 and -0.0
    # entries; grad_input is then exactly grad_output * act'(pre) (0 for relu at 0, the slope
    # for leaky_relu, as PyTorch), and grad_bias its column sums.
    n = 24
    x = torch.randn(5, n).to(dtype)
    x[:, ::3] = 0.0
    x[:, 1::6] = -0.0
    w = torch.eye(n, dtype=dtype)
    b = torch.zeros(n, dtype=dtype)
    g = torch.randn(5, n).to(dtype)
    _, (gx, gw, gb) = forward_backward(lambda a, c, d: fused_linear(a, c, d, activation, negative_slope), x, w, b, g)
    _, (rx, rw, rb) = forward_backward(lambda a, c, d: reference(a, c, d, activation, negative_slope), x, w, b, g)
    assert torch.equal(gx, rx), f"grad_input at exact zeros:\n{gx}\nvs\n{rx}"
    zero = x == 0
    expected_at_zero = torch.zeros_like(g) if activation == "relu" else g * negative_slope
    assert torch.equal(gx[zero], expected_at_zero[zero].to(dtype))
    assert_close(gb, rb, dtype=dtype)
    assert_close(gw, rw, dtype=dtype)
    # And with a general weight whose GEMM is exact (small integers): many exact-zero
    # pre-activations inside a real GEMM.
    x, w, b = integer_args((4, 3, 5), 17, dtype)
    assert (F.linear(x, w, b) == 0).sum() > 5
    check_against_pytorch(x, w, b, activation, negative_slope, msg="integer GEMM with zeros")


# ----------------------------------------------------------------------------------------------
# 6. What is saved for backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 33, 64, 100, 1100])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", MASK_ACTIVATIONS)
def test_saved_mask_bits(activation, dtype, n):
    x, w, b = integer_args((3, 4, 6), n, dtype)
    pre = F.linear(x.double(), w.double(), b.double())  # exact
    expected = packbits_lsb_first(pre > 0)
    out, saved = FWD(x, w, b, activation, -0.5)
    assert saved.dtype == torch.uint8
    assert saved.shape == (3, 4, (n + 7) // 8)
    assert torch.equal(saved, expected), f"mask bits:\n{saved}\nexpected\n{expected}"
    out2, saved2 = FusedLinearFunction.apply(x, w, b, activation, -0.5)
    assert torch.equal(saved2, expected)
    assert not saved2.requires_grad


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "quick_gelu"])
def test_saved_pre_activation(activation):
    x, w, b = make_args((2, 3, 6), 11)
    out, saved = FWD(x, w, b, activation, 0.01)
    assert saved.shape == out.shape and saved.dtype == out.dtype
    assert_close(saved, F.linear(x, w, b))


@pytest.mark.parametrize("activation", ["none", "sigmoid", "tanh"])
def test_saved_nothing(activation):
    x, w, b = make_args((2, 3, 6), 11)
    _, saved = FWD(x, w, b, activation, 0.01)
    assert saved.numel() == 0


@pytest.mark.parametrize("in_shape", [(64, 32), (4, 16, 32)], ids=["2d", "3d"])
@pytest.mark.parametrize("activation", MASK_ACTIVATIONS)
def test_saved_bytes_at_most_one_eighth_of_eager(activation, in_shape):
    x, w, b = (leaf(t) for t in make_args(in_shape, 48))
    with SavedTensorBytes() as fused_rec:
        y = fused_linear(x, w, b, activation)
    with SavedTensorBytes() as eager_rec:
        y_ref = reference(x, w, b, activation)
    fused_bytes = fused_rec.bytes_excluding((x, w, b))
    eager_bytes = eager_rec.bytes_excluding((x, w, b))
    m = math.prod(in_shape[:-1])
    assert eager_bytes >= m * 48 * 4  # eager keeps the float32 activation (or its input)
    assert 0 < fused_bytes <= eager_bytes / 8, (fused_bytes, eager_bytes)
    assert fused_bytes == m * 6  # exactly the bit mask
    # The saved tensors still give the right gradients.
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


def _grads_through(x, w, b, activation, grad, owned, retain_graph=False):
    """fused_linear's gradients for the incoming `grad`: handed to the backward as a tensor the
    caller keeps (backward(grad)), or (owned) as the fresh product of a multiply's backward, which
    the backward op then holds alone and may overwrite. Unless retain_graph, the autograd node also
    hands over the saved pre-activation (gelu, gelu_tanh, silu), which the op may overwrite too."""
    leaves = [leaf(t) for t in (x, w, b)]
    y = fused_linear(*leaves, activation)
    if owned:
        (y * grad).sum().backward(retain_graph=retain_graph)
    else:
        y.backward(grad, retain_graph=retain_graph)
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_formed_in_an_incoming_gradient_held_alone(activation, dtype):
    # The backward forms grad_output * act'(pre) in grad_output itself when it holds it alone, else
    # in the saved pre-activation when the graph is not retained (csrc/cpu/linear_act.cpp): the
    # same bits as with a buffer of its own (a retained graph), and the gradient the caller keeps
    # is left as it was.
    x, w, b = make_args((3, 7, 37), 45, dtype)
    grad = torch.randn(3, 7, 45).to(dtype)
    kept = grad.clone()
    owned = _grads_through(x, w, b, activation, grad, owned=True)
    held = _grads_through(x, w, b, activation, grad, owned=False)
    retained = _grads_through(x, w, b, activation, grad, owned=False, retain_graph=True)
    assert torch.equal(grad, kept)
    for name, got, got_held, want in zip(("input", "weight", "bias"), owned, held, retained):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{activation}: grad of {name}")
        torch.testing.assert_close(got_held, want, rtol=0, atol=0, msg=f"{activation}: grad of {name}")
    check_against_pytorch(x, w, b, activation, grad=grad)


def test_gradient_shared_or_hooked_is_not_overwritten():
    # One incoming gradient shared by two layers (AddBackward hands both the same tensor), or kept
    # by a hook, is not the backward's alone: both layers get the right gradients, and the hook's
    # tensor keeps its values.
    x, w, b = make_args((64, 32), 48)
    x2, w2, b2 = make_args((64, 32), 48)
    c = torch.randn(64, 48)
    for hooked in (False, True):
        leaves = [leaf(t) for t in (x, w, b, x2, w2, b2)]
        y1 = fused_linear(*leaves[:3], "gelu")
        y2 = fused_linear(*leaves[3:], "silu")
        kept = []
        if hooked:
            y1.register_hook(kept.append)
        ((y1 + y2) * c).sum().backward()
        refs = [leaf(t) for t in (x, w, b, x2, w2, b2)]
        ((F.gelu(F.linear(*refs[:3])) + F.silu(F.linear(*refs[3:]))) * c).sum().backward()
        for got, want in zip(leaves, refs):
            assert_close(got.grad, want.grad, msg=f"hooked={hooked}")
        if hooked:
            torch.testing.assert_close(kept[0], c, rtol=0, atol=0)


@pytest.mark.cpu_only("the CPU cache (cached_bytes)")
def test_gradient_formed_in_place_needs_no_buffer():
    # Which path ran, seen from torch_ext's output cache: the product's own buffer (a panel of
    # 1024 x 4608 float32, 18 MiB: cached when freed) is allocated only when the backward holds
    # no (rows, N) buffer alone: the caller keeps the incoming gradient, and the saved
    # pre-activation is kept for a second backward (retain_graph) or is not there (relu's mask).
    x, w, _ = make_args((1024, 8), 4608)

    def cached_after_backward(activation, owned, retain_graph=False):
        torch_ext.empty_cache()
        _grads_through(x, w, None, activation, torch.ones(1024, 4608), owned, retain_graph)
        return torch_ext.cached_bytes()

    panel = 1024 * 4608 * 4
    alone = {activation: cached_after_backward(activation, owned=True) for activation in ("gelu", "relu")}
    for activation, cached in alone.items():
        assert cached_after_backward(activation, owned=False, retain_graph=True) - cached >= panel, activation
    # gelu's saved pre-activation takes the product: no panel
    assert abs(cached_after_backward("gelu", owned=False) - alone["gelu"]) < panel
    assert cached_after_backward("relu", owned=False) - alone["relu"] >= panel


# ----------------------------------------------------------------------------------------------
# 7. gradcheck
# ----------------------------------------------------------------------------------------------


def _gradcheck_args(in_shape, out_features, bias):
    """float64 args with no pre-activation within 1e-2 of relu's kink (gradcheck's finite
    differences would straddle it)."""
    for _ in range(100):
        x, w, b = make_args(in_shape, out_features, torch.float64, bias)
        if (F.linear(x, w, b).abs() > 1e-2).all():
            return x, w, b
    raise AssertionError("could not draw pre-activations away from 0")


@pytest.mark.parametrize("in_shape", [(3, 5), (2, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation, path, bias, in_shape):
    x, w, b = (leaf(t) for t in _gradcheck_args(in_shape, 4, bias))
    inputs = (x, w) if b is None else (x, w, b)

    def fn(*args):
        xx, ww = args[:2]
        bb = args[2] if len(args) == 3 else None
        return call(path, xx, ww, bb, activation, 0.2)

    assert torch.autograd.gradcheck(fn, inputs)


REQUIRES_GRAD_SUBSETS = [s for r in (0, 1, 2) for s in itertools.combinations(("input", "weight", "bias"), r)]


@pytest.mark.parametrize("subset", REQUIRES_GRAD_SUBSETS, ids=lambda s: "+".join(s) or "none")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_partial_requires_grad(monkeypatch, activation, path, subset):
    x, w, b = _gradcheck_args((2, 3, 5), 4, True)
    named = {"input": x, "weight": w, "bias": b}
    for name in subset:
        named[name].requires_grad_()
    x_, w_, b_ = named["input"], named["weight"], named["bias"]
    y = call(path, x_, w_, b_, activation)
    if not subset:
        assert not y.requires_grad
        return
    # Spy on the backward op (whichever autograd path calls it, Python or C++): it is asked for
    # exactly the gradients that are needed.
    g = torch.randn_like(y)
    with BackwardOpMasks(torch.ops.torch_ext.linear_act_bwd.default) as masks:
        y.backward(g)
    assert masks == [[n in subset for n in ("input", "weight", "bias")]]
    ref = {k: leaf(v) if k in subset else v.detach() for k, v in named.items()}
    reference(ref["input"], ref["weight"], ref["bias"], activation).backward(g)
    for name, t in named.items():
        if name in subset:
            assert t.grad is not None, name
            assert_close(t.grad, ref[name].grad, msg=name)
        else:
            assert t.grad is None, f"{name} does not require grad but got a gradient"
    # gradcheck on exactly the tensors that require grad.
    required = [named[n] for n in subset]

    def fn(*args):
        vals = dict(named)
        vals.update(zip(subset, args))
        return call(path, vals["input"], vals["weight"], vals["bias"], activation)

    assert torch.autograd.gradcheck(fn, required)


# ----------------------------------------------------------------------------------------------
# 8. opcheck
# ----------------------------------------------------------------------------------------------

OPCHECK_SAMPLES = [
    # id, input shape, bias, requires_grad
    ("2d_bias_grad", (5, 7), True, True),
    ("2d_nobias_nograd", (5, 7), False, False),
    ("3d_bias_nograd", (2, 3, 7), True, False),
    ("3d_nobias_grad", (2, 3, 7), False, True),
]


def _opcheck_args(in_shape, bias, requires_grad):
    x, w, b = make_args(in_shape, 9, torch.float32, bias)
    if requires_grad:
        x, w, b = (leaf(t) for t in (x, w, b))
    return x, w, b


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES, ids=[s[0] for s in OPCHECK_SAMPLES])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_fwd(activation, sample):
    _, in_shape, bias, requires_grad = sample
    x, w, b = _opcheck_args(in_shape, bias, requires_grad)
    torch.library.opcheck(FWD, (x, w, b, activation, 0.1))
    if not requires_grad:  # inference: nothing kept for backward
        torch.library.opcheck(FWD, (x, w, b, activation, 0.1, False))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_for_backward_false_gives_the_same_output_and_keeps_nothing(activation, dtype):
    for in_shape in [(5, 7), (2, 3, 7), (7,), (0, 7), (70, 7)]:
        x, w, b = make_args(in_shape, 19, dtype)
        out, saved = FWD(x, w, b, activation, 0.1)
        inference_out, nothing = FWD(x, w, b, activation, 0.1, False)
        assert nothing is None, f"{in_shape}: for_backward=False returned a saved tensor"
        assert torch.equal(inference_out, out), f"{in_shape}: the output differs without the saved tensor"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_for_backward_false_then_backward(activation):
    # Called directly with for_backward=False on inputs requiring grad, the op's backward gives the
    # right gradients where the output is all it needs, and otherwise a clear error.
    x, w, b = (leaf(t) for t in make_args((4, 7), 9))
    out, _ = FWD(x, w, b, activation, 0.1, False)
    if activation in ("none", "sigmoid", "tanh"):
        got = torch.autograd.grad(out.sum(), (x, w, b))
        _, want = forward_backward(lambda a, c, d: reference(a, c, d, activation, 0.1), x, w, b, "sum")
        for name, g, r in zip(("input", "weight", "bias"), got, want):
            assert_close(g, r, msg=name)
    else:
        with pytest.raises(RuntimeError, match="for_backward=False, so it kept nothing"):
            out.sum().backward()


class _ForBackwardOfLinearAct(TorchDispatchMode):
    """Records the for_backward argument of every linear_act_fwd call."""

    def __init__(self):
        super().__init__()
        self.for_backward = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is FWD:
            self.for_backward.append(args[5] if len(args) > 5 else kwargs.get("for_backward", True))
        return func(*args, **kwargs)


@pytest.mark.parametrize("case", ["no_grad", "no_input_requires_grad", "training"])
def test_inference_keeps_nothing_for_backward(case):
    # fused_linear and fused_mlp ask linear_act_fwd for what backward needs only when autograd
    # records: in inference the pre-activation or mask is neither allocated nor written.
    x, w, b = make_args((6, 8), 12)
    w2 = torch.randn(5, 12)
    if case == "training":
        w.requires_grad_()
    context = torch.no_grad() if case == "no_grad" else contextlib.nullcontext()
    recorder = _ForBackwardOfLinearAct()
    with context, recorder:
        fused_linear(x, w, b, "gelu")
        torch_ext.fused_mlp(x, w, b, w2, None, "gelu")
    assert recorder.for_backward == [case == "training"] * 2


@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh"])
def test_compiled_inference_matches_eager(dynamo_reset, activation):
    # Compiled code under no_grad takes the for_backward=False op (fake kernel: no saved tensor).
    x, w, b = make_args((6, 8), 12)
    w2 = torch.randn(5, 12)

    def fn(x, w, b, w2):
        return fused_linear(x, w, b, activation) + torch_ext.fused_mlp(x, w, b, w2, None, activation).sum()

    with torch.no_grad():
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        assert_close(compiled(x, w, b, w2), fn(x, w, b, w2))


BWD_SAMPLES = [
    # id, input shape, output_mask
    ("2d_all", (5, 7), [True, True, True]),
    ("3d_input_weight", (2, 3, 7), [True, True, False]),
    ("3d_weight_bias", (2, 3, 7), [False, True, True]),
    ("2d_input_only", (5, 7), [True, False, False]),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", BWD_SAMPLES, ids=[s[0] for s in BWD_SAMPLES])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_bwd(activation, sample, requires_grad):
    _, in_shape, output_mask = sample
    x, w, b = make_args(in_shape, 9, torch.float32, True)
    out, saved = FWD(x, w, b, activation, 0.1)
    if activation in ("sigmoid", "tanh"):
        saved = out  # these derive their gradient from the output (see the schema comment)
    g = torch.randn_like(out)
    if not requires_grad:
        torch.library.opcheck(BWD, (g, x, w, saved, activation, 0.1, output_mask))
        return
    # The backward op is differentiable once, by design: its autograd kernel gives its outputs a
    # grad_fn whose backward raises (no double backward). So every opcheck utility runs except the
    # one that differentiates through the op, and that one must fail with our message.
    g, x, w = leaf(g), leaf(x), leaf(w)
    args = (g, x, w, saved, activation, 0.1, output_mask)
    torch.library.opcheck(BWD, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="does not support double backward"):
        torch.library.opcheck(BWD, args, test_utils="test_aot_dispatch_dynamic")


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_bwd_composite(activation, requires_grad):
    # linear_act_bwd_composite (create_graph's backward): every opcheck utility, differentiating
    # through it included; its gradients are linear_act_bwd's.
    x, w, b = _gradcheck_args((2, 3, 5), 4, True)
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    if requires_grad:
        g, x, w, b = (leaf(t) for t in (g, x, w, b))
    args = (g, x, w, b, activation, 0.1, [True, True, True])
    torch.library.opcheck(torch.ops.torch_ext.linear_act_bwd_composite.default, args)
    out, saved = FWD(x.detach(), w.detach(), b.detach(), activation, 0.1)
    saved = out if activation in ("sigmoid", "tanh") else saved
    want = BWD(g.detach(), x.detach(), w.detach(), saved, activation, 0.1, [True, True, True])
    got = torch.ops.torch_ext.linear_act_bwd_composite(*args)
    for name, a, e in zip(("input", "weight", "bias"), got, want):
        assert_close(a, e, msg=f"grad_{name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bwd_op_matches_autograd(activation):
    # The raw backward op, called directly, gives eager autograd's gradients; and gradients not
    # asked for in output_mask come back as None.
    x, w, b = make_args((2, 3, 7), 9)
    out, saved = FWD(x, w, b, activation, 0.1)
    if activation in ("sigmoid", "tanh"):
        saved = out
    g = torch.randn_like(out)
    gi, gw, gb = BWD(g, x, w, saved, activation, 0.1, [True, True, True])
    _, (ri, rw, rb) = forward_backward(lambda a, c, d: reference(a, c, d, activation, 0.1), x, w, b, g)
    assert_close(gi, ri, msg="grad_input")
    assert_close(gw, rw, msg="grad_weight")
    assert_close(gb, rb, msg="grad_bias")
    gi, gw, gb = BWD(g, x, w, saved, activation, 0.1, [False, True, False])
    assert gi is None and gb is None
    assert_close(gw, rw, msg="grad_weight alone")


# ----------------------------------------------------------------------------------------------
# 9. torch.compile
# ----------------------------------------------------------------------------------------------


def _small_model():
    return nn.Sequential(FusedLinear(8, 16, activation="gelu"), FusedLinear(16, 6, activation="relu"))


def _eager_and_compiled(model, compiled, x):
    outs, grads = [], []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        xl = leaf(x)
        y = m(xl)
        g = torch.ones_like(y) * torch.arange(y.shape[-1], dtype=y.dtype)  # deterministic, non-uniform
        y.backward(g)
        outs.append(y.detach())
        grads.append([xl.grad] + [p.grad.clone() for p in model.parameters()])
    return outs, grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(dynamo_reset, backend):
    model = _small_model()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    (y, yc), (g, gc) = _eager_and_compiled(model, compiled, torch.randn(5, 8))
    assert_close(yc, y)
    for a, e in zip(gc, g):
        assert_close(a, e)


def test_compile_dynamic_shapes(dynamo_reset):
    model = _small_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    shapes = [(3, 8), (5, 8), (11, 8), (2, 4, 8), (3, 7, 8)]
    for i, shape in enumerate(shapes):
        # One graph per input rank; within a rank, other batch sizes must reuse it.
        reuse = i not in (0, 3)
        with torch.compiler.set_stance("fail_on_recompile" if reuse else "default"):
            (y, yc), (g, gc) = _eager_and_compiled(model, compiled, torch.randn(shape))
        assert_close(yc, y, msg=str(shape))
        for a, e in zip(gc, g):
            assert_close(a, e, msg=str(shape))


def test_compile_no_graph_breaks(dynamo_reset):
    layers = [FusedLinear(6, 6, activation=a, negative_slope=0.3) for a in ACTIVATIONS]
    model = nn.Sequential(*layers)

    def fn(x):
        return fused_linear(model(x), layers[0].weight, None, "silu") + FWD(x, layers[1].weight, None, "tanh", 0.0)[0]

    explanation = torch._dynamo.explain(fn)(torch.randn(3, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    code = "\n".join(m.code for gm in explanation.graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
    assert code.count("linear_act_fwd") >= len(ACTIVATIONS) + 2, code


# ----------------------------------------------------------------------------------------------
# 10. autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_autocast_bfloat16(activation):
    layer = FusedLinear(16, 12, activation=activation, negative_slope=0.2)
    ref_layer = nn.Sequential(nn.Linear(16, 12), act_module(activation, 0.2))
    ref_layer[0].load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 16)
    g = torch.randn(4, 3, 12).to(torch.bfloat16)
    xl, xr = leaf(x), leaf(x)
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = layer(xl)
        y_ref = ref_layer(xr)
        y_plain = F.linear(x, layer.weight, layer.bias)
    assert y_plain.dtype == torch.bfloat16
    assert y.dtype == y_ref.dtype == torch.bfloat16
    # Both are bfloat16 results from the same bfloat16-cast operands.
    assert_close(y, y_ref, dtype=torch.bfloat16, msg="autocast output")
    y.backward(g)
    y_ref.backward(g)
    grads = {"input": xl.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}
    eager = {"input": xr.grad, "weight": ref_layer[0].weight.grad, "bias": ref_layer[0].bias.grad}
    for name, got in grads.items():
        assert got.dtype == torch.float32, name  # cast back to the float32 leaves
    # Values: the float32 computation from the same bfloat16-cast operands and grad_output.
    xb, wb, bb = (t.detach().to(torch.bfloat16) for t in (x, layer.weight, layer.bias))
    ref_fn = (
        kink_resolved_reference(xb, wb, bb, activation, 0.2)
        if activation in MASK_ACTIVATIONS
        else lambda a, c, d: reference(a, c, d, activation)
    )
    _, ref_grads = forward_backward(ref_fn, xb, wb, bb, g, torch.float32)
    rtol, atol = tolerance(torch.bfloat16)
    for (name, got), want in zip(grads.items(), ref_grads):
        assert_close(got, want, rtol=rtol, atol=atol, msg=f"autocast grad {name}")
        if activation not in MASK_ACTIVATIONS:  # (relu's kink side may differ from eager's)
            assert_close(got, eager[name], rtol=2 * rtol, atol=2 * atol, msg=f"autocast grad {name} vs eager")


# ----------------------------------------------------------------------------------------------
# 11. The FusedLinear module
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_module_state_dict_interchangeable_with_linear(bias):
    linear = nn.Linear(7, 5, bias=bias)
    fused = FusedLinear(7, 5, bias=bias, activation="relu")
    assert isinstance(fused, nn.Linear)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == [
        (k, v.shape) for k, v in linear.state_dict().items()
    ]
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in linear.named_parameters()]
    fused.load_state_dict(linear.state_dict())  # strict
    for k, v in linear.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v)
    other = FusedLinear(7, 5, bias=bias, activation="tanh")
    linear2 = nn.Linear(7, 5, bias=bias)
    linear2.load_state_dict(other.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(linear2.state_dict()[k], v)


@pytest.mark.parametrize("bias", [True, False])
def test_module_init_like_linear(bias):
    torch.manual_seed(123)
    linear = nn.Linear(33, 17, bias=bias)
    torch.manual_seed(123)
    fused = FusedLinear(33, 17, bias=bias, activation="gelu")
    assert torch.equal(fused.weight, linear.weight)
    assert (fused.bias is None) == (not bias)
    if bias:
        assert torch.equal(fused.bias, linear.bias)
    assert fused.in_features == 33 and fused.out_features == 17


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_matches_sequential(activation):
    fused = FusedLinear(12, 10, activation=activation, negative_slope=0.2)
    seq = nn.Sequential(nn.Linear(12, 10), act_module(activation, 0.2))
    seq[0].load_state_dict(fused.state_dict())
    x = torch.randn(3, 4, 12)
    g = torch.randn(3, 4, 10)
    xf, xs = leaf(x), leaf(x)
    yf, ys = fused(xf), seq(xs)
    assert_close(yf, ys)
    yf.backward(g)
    ys.backward(g)
    assert_close(xf.grad, xs.grad)
    assert_close(fused.weight.grad, seq[0].weight.grad)
    assert_close(fused.bias.grad, seq[0].bias.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_module_factory_kwargs(device, dtype):
    layer = FusedLinear(6, 4, activation="silu", device=device, dtype=dtype)
    for p in layer.parameters():
        assert p.dtype == dtype and p.device.type == "cpu"
    x = torch.randn(2, 6).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert_close(y, F.silu(F.linear(x.to(reference_dtype(dtype)), layer.weight.to(reference_dtype(dtype)),
                                     layer.bias.to(reference_dtype(dtype)))), dtype=dtype)


def test_module_meta_device():
    # Parameters on the meta device, and a shape-only forward, as nn.Linear supports.
    layer = FusedLinear(6, 4, activation="relu", device="meta")
    assert layer.weight.device.type == "meta"
    y = layer(torch.empty(2, 3, 6, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3, 4)


def test_module_repr():
    r = repr(FusedLinear(6, 4, activation="gelu_tanh"))
    assert "in_features=6" in r and "out_features=4" in r and "gelu_tanh" in r
    r = repr(FusedLinear(6, 4, bias=False, activation="leaky_relu", negative_slope=0.3))
    assert "leaky_relu" in r and "0.3" in r and "bias=False" in r


# ----------------------------------------------------------------------------------------------
# 12. Argument errors
# ----------------------------------------------------------------------------------------------


def _error_cases():
    x, w, b = make_args((3, 4), 5)
    return {
        "in_features_mismatch": ((x, torch.randn(5, 6), b, "relu"), RuntimeError,
                                 r"input\.size\(-1\) is 4 but weight\.size\(1\) \(in_features\) is 6"),
        "weight_1d": ((x, torch.randn(4), None, "relu"), RuntimeError, r"weight must be 2-D"),
        "weight_3d": ((x, torch.randn(2, 5, 4), None, "relu"), RuntimeError, r"weight must be 2-D"),
        "bias_wrong_length": ((x, w, torch.randn(4), "relu"), RuntimeError,
                              r"bias must have shape \(out_features,\) = \(5,\)"),
        "bias_2d": ((x, w, torch.randn(1, 5), "relu"), RuntimeError, r"bias must have shape \(out_features,\)"),
        "weight_dtype": ((x, w.double(), b, "relu"), RuntimeError,
                         r"weight has dtype Double but input has dtype Float"),
        "bias_dtype": ((x, w, b.double(), "relu"), RuntimeError, r"bias has dtype Double but input has dtype Float"),
        "unknown_activation": ((x, w, b, "swish"), ValueError, r"activation must be one of .*got 'swish'"),
        "integer": ((x.long(), w.long(), b.long(), "relu"), RuntimeError, r"input must be float32, float64, bfloat16"),
        "input_0d": ((torch.tensor(1.0), w, b, "relu"), RuntimeError,
                     r"input must have shape \(\*, in_features\), got a 0-D"),
    }


ERROR_CASES = list(_error_cases().keys())


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_arguments(case, path, requires_grad):
    (x, w, b, activation), exc, match = _error_cases()[case]
    if requires_grad and x.is_floating_point():
        x, w = leaf(x), leaf(w)
    with pytest.raises(exc, match=match):
        call(path, x, w, b, activation)


def test_module_unknown_activation():
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'swish'"):
        FusedLinear(4, 5, activation="swish")


def _bwd_error_cases():
    x, w, b = make_args((3, 4), 10)
    g = torch.randn(3, 10)
    out, pre = FWD(x, w, b, "gelu", 0.01)
    _, mask = FWD(x, w, b, "relu", 0.01)
    return {
        "mask_wrong_shape": ((g, x, w, mask[:, :1], "relu"), r"saved must be the uint8 mask of shape \(\*, 2\)"),
        "mask_wrong_dtype": ((g, x, w, mask.float(), "leaky_relu"), r"saved must be the uint8 mask"),
        "mask_for_gelu": ((g, x, w, mask, "gelu"), r"saved must have shape"),
        "pre_wrong_shape": ((g, x, w, pre[:, :5], "silu"), r"saved must have shape \[3, 10\]"),
        "pre_wrong_dtype": ((g, x, w, pre.double(), "gelu_tanh"), r"saved has dtype Double but input has dtype Float"),
        "output_missing": ((g, x, w, torch.empty(0), "tanh"), r"saved must have shape"),
        "grad_wrong_shape": ((g[:, :9], x, w, mask, "relu"), r"grad_output must have shape \[3, 10\]"),
        "grad_wrong_dtype": ((g.double(), x, w, mask, "relu"), r"grad_output has dtype Double"),
        "weight_mismatch": ((g, x, torch.randn(10, 5), mask, "relu"), r"input\.size\(-1\) is 4"),
        "unknown_activation": ((g, x, w, mask, "swish"), r"activation must be one of"),
    }


@pytest.mark.parametrize("case", list(_bwd_error_cases().keys()))
def test_bwd_op_bad_arguments(case):
    (g, x, w, saved, activation), match = _bwd_error_cases()[case]
    exc = ValueError if case == "unknown_activation" else RuntimeError
    with pytest.raises(exc, match=match):
        BWD(g, x, w, saved, activation, 0.01, [True, True, True])


# ----------------------------------------------------------------------------------------------
# 13-14. Double backward, retain_graph
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck(activation, path, bias):
    # Gradients of gradients (create_graph=True: gradient penalties, physics-informed losses):
    # a backward that records a graph forms the gradients with PyTorch's differentiable ops
    # (linear_act_bwd_composite), so second derivatives in every input and in grad_output are
    # PyTorch's. (Before: a clear "does not support double backward" error.)
    x, w, b = (leaf(t) for t in _gradcheck_args((2, 3, 5), 4, bias))
    inputs = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradgradcheck(lambda *a: call(path, a[0], a[1], a[2] if bias else None, activation, 0.2),
                                        inputs)


@pytest.mark.parametrize("grad_requires_grad", [False, True], ids=["plain_grad", "grad_requires_grad"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_gradient_penalty_matches_pytorch(activation, path, grad_requires_grad):
    # A gradient penalty's second backward, whether or not grad_output itself requires grad
    # (y.sum()'s does not), gives PyTorch's gradients.
    x, w, b = _gradcheck_args((3, 5), 4, True)
    g = torch.randn(3, 4, dtype=torch.float64)
    results = []
    for fn in (lambda *a: call(path, *a, activation), lambda *a: reference(*a, activation)):
        xl, wl, bl = leaf(x), leaf(w), leaf(b)
        y = fn(xl, wl, bl)
        if grad_requires_grad:
            grads = torch.autograd.grad(y, (xl, wl, bl), leaf(g), create_graph=True)
        else:
            grads = torch.autograd.grad(y.sum(), (xl, wl, bl), create_graph=True)
        results.append(torch.autograd.grad(sum(t.square().sum() for t in grads), (xl, wl, bl)))
    for name, got, want in zip(("input", "weight", "bias"), *results):
        assert_close(got, want, msg=f"second-order gradient of {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_retain_graph_backward_twice(activation, path):
    x, w, b = (leaf(t) for t in make_args((2, 3, 7), 9))
    y = call(path, x, w, b, activation)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, w, b), g, retain_graph=True)
    second = torch.autograd.grad(y, (x, w, b), g, retain_graph=True)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    y.backward(g, retain_graph=True)
    y.backward(g)
    for t, a in zip((x, w, b), first):
        assert_close(t.grad, 2 * a)
    _, ref = forward_backward(lambda a, c, d: reference(a, c, d, activation), x, w, b, g)
    for a, r in zip(first, ref):
        assert_close(a, r)


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
    import test_linear_act as T  # the same reference and checks as the in-process tests

    assert got == want, (got, want)
    assert torch_ext.cpu_capability() == want, (torch_ext.cpu_capability(), want)
    torch_ext.set_config(cpu_gemm="ours")  # the default only on AMD AVX-512 CPUs: test it on any
    assert torch_ext.cpu_gemm() == ("aten" if want == "DEFAULT" else "ours"), torch_ext.cpu_gemm()
    failures = []

    def check(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except AssertionError as err:
            failures.append(f"{want}: {err}")

    torch.manual_seed(0)
    for dtype in T.DTYPES:
        for act in T.ACTIVATIONS:
            for shape, bias, slope, grad in (((19, 37), True, 0.01, None), ((2, 19, 37), False, -0.5, "sum")):
                x, w, b = T.make_args(shape, 45, dtype, bias)
                check(T.check_against_pytorch, x, w, b, act, slope, grad=grad, msg=f"{want} {shape}")
            x, w, b = T.make_args((37, 19), 45, dtype)
            check(T.check_against_pytorch, x.t().contiguous().t()[:, :19], w, b, act, 0.2, msg=f"{want} strided")
    # Shapes our GEMM takes (32 rows or more): its tiles, tails, packed A and k split.
    for shape, n in (((70, 45), 38), ((250, 1024), 70), ((1500, 64), 48), ((40, 64), 300)):
        x, w, b = T.make_args(shape, n)
        check(T.check_against_pytorch, x, w, b, "gelu", msg=f"{want} GEMM {shape}->{n}")
        check(T.check_against_pytorch, x.t().contiguous().t(), w, b, "relu", msg=f"{want} GEMM strided {shape}->{n}")
    for dtype in T.DTYPES:
        # The relu mask bits, exactly (integer operands: exact pre-activations), every tail.
        for n in (1, 7, 8, 9, 17, 33, 45):
            x, w, b = T.integer_args((2, 5, 6), n, dtype)
            expected = T.packbits_lsb_first(torch.nn.functional.linear(x.double(), w.double(), b.double()) > 0)
            for act in T.MASK_ACTIVATIONS:
                saved = T.FWD(x, w, b, act, 0.1)[1]
                if not torch.equal(saved, expected):
                    failures.append(f"{want} {dtype} {act} N={n}: mask {saved.tolist()} != {expected.tolist()}")
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
# 16. The float32 GEMM of our own (csrc/cpu/kernels/gemm.h), against ATen's and float64
# ----------------------------------------------------------------------------------------------

GEMM_PATHS = ("ours", "aten")


def amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


@pytest.fixture(params=GEMM_PATHS)
def cpu_gemm(request, set_config):
    """Runs a test with float32 products on our GEMM and on ATen's (the config's cpu_gemm)."""
    set_config(cpu_gemm=request.param)
    want = request.param if torch_ext.cpu_capability() != "DEFAULT" else "aten"
    assert torch_ext.cpu_gemm() == want
    return request.param


# (input shape, out_features): every edge of the kernel's blocking. Rows: tiles of 12 (AVX-512)
# or 6 (AVX2), 32 rows at least (fewer go to ATen). Columns: micro-panels of 32 / 16 and blocks
# of 512. k: blocks of 256 (64 when threads split k). The forward multiplies (M, K) by W.T, the
# backward (M, N) by W and grad.T (N, M) by x (M, K): each shape tests three layouts.
GEMM_SHAPES = [
    pytest.param((32, 1), 1, id="32x1->1"),
    pytest.param((33, 7), 33, id="row_and_column_tails"),
    pytest.param((37, 300), 31, id="k_tail"),
    pytest.param((48, 257), 65, id="k_block_plus_one"),
    pytest.param((61, 513), 100, id="two_k_blocks"),
    pytest.param((40, 64), 1100, id="column_blocks"),
    pytest.param((250, 1024), 70, id="A_packed_4KiB_rows"),  # rows 4 KiB apart: A is packed
    pytest.param((241, 2048), 97, id="A_packed_2_blocks"),
    pytest.param((1500, 64), 48, id="k_split"),  # grad_W: 48 x 64 from 1500 rows, split over k
    pytest.param((2, 300, 40), 36, id="3d"),
    pytest.param((300, 40), 300, id="wide"),  # n > m: threads split columns in backward
]


@pytest.mark.cpu_only("the CPU GEMMs (cpu_gemm)")
@pytest.mark.parametrize("in_shape,out_features", GEMM_SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh"])
def test_gemm_shapes(cpu_gemm, activation, in_shape, out_features):
    x, w, b = make_args(in_shape, out_features)
    check_against_pytorch(x, w, b, activation, msg=f"{cpu_gemm} GEMM {in_shape}->{out_features}")


@pytest.mark.cpu_only("the CPU GEMMs (cpu_gemm)")
@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_gemm_layouts(cpu_gemm, case):
    # The layout cases at a size our GEMM takes: every operand stride pattern through it.
    x, w, b, grad = _layout_case(case, torch.float32, 70, 45, 38)
    check_against_pytorch(x, w, b, "gelu", grad=grad, msg=f"{cpu_gemm} GEMM {case}")


@pytest.mark.cpu_only("the CPU GEMMs' thread splits")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_thread_counts(cpu_gemm, threads):
    # Each split (rows, columns, k) with 1 thread, the machine's, and more than k blocks allow.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for in_shape, out_features in (((300, 40), 24), ((40, 64), 300), ((1500, 64), 48)):
            x, w, b = make_args(in_shape, out_features)
            check_against_pytorch(x, w, b, "relu", msg=f"{cpu_gemm} {threads} threads {in_shape}->{out_features}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.cpu_only("the CPU GEMMs (cpu_gemm)")
@pytest.mark.parametrize("in_shape,out_features", [((300, 40), 24), ((250, 1024), 70), ((1500, 64), 48)])
def test_gemm_paths_agree(set_config, in_shape, out_features):
    # Ours and ATen's differ only by float32 rounding (a different summation order).
    if torch_ext.cpu_capability() == "DEFAULT":
        pytest.skip("the DEFAULT instruction set has no GEMM of ours")
    x, w, b = make_args(in_shape, out_features)
    g = torch.randn(*in_shape[:-1], out_features)
    results = {}
    for path in GEMM_PATHS:
        set_config(cpu_gemm=path)
        results[path] = forward_backward(lambda a, c, d: fused_linear(a, c, d, "gelu"), x, w, b, g)
    (y0, g0), (y1, g1) = results["ours"], results["aten"]
    k = in_shape[-1]
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5 * math.sqrt(k))
    for a, c in zip(g0, g1):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5 * math.sqrt(max(k, in_shape[0])))


@pytest.mark.cpu_only("the CPU GEMMs (cpu_gemm)")
def test_gemm_nonfinite(cpu_gemm):
    # NaN and inf reach exactly the outputs they reach in PyTorch (no padding value leaks).
    x, w, b = make_args((40, 50), 45)
    x[3, 7] = float("nan")
    x[10, 2] = float("inf")
    w[5, 1] = float("-inf")
    y = fused_linear(x, w, b)
    ref = F.linear(x, w, b)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert_close(y[finite], ref[finite])


@pytest.mark.cpu_only("the CPU GEMM switch (cpu_gemm)")
def test_gemm_switch(set_config, monkeypatch):
    ours_available = torch_ext.cpu_capability() != "DEFAULT"
    set_config(cpu_gemm="aten")
    assert torch_ext.cpu_gemm() == "aten"
    set_config(cpu_gemm="ours")
    assert torch_ext.cpu_gemm() == ("ours" if ours_available else "aten")
    # ours by default on AMD CPUs running the AVX-512 kernels only
    default = "ours" if torch_ext.cpu_capability() == "AVX512" and amd_cpu() else "aten"
    set_config(cpu_gemm="auto")
    assert torch_ext.cpu_gemm() == default
    with pytest.raises(ValueError, match="cpu_gemm must be auto, ours or aten; got 'mkl'"):
        set_config(cpu_gemm="mkl")
    assert torch_ext.get_config()["cpu_gemm"] == "auto"
    # The environment is read once, at import: a change after it does nothing.
    monkeypatch.setenv("TORCH_EXT_CPU_GEMM", "aten")
    assert torch_ext.cpu_gemm() == default


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_bfloat16_bias_is_added_before_rounding(activation):
    # The bias is added to the float32 product before its rounding to bfloat16, as eager's addmm
    # does: rounding first moved the sign of pre-activations near 0 (118 of these 262144), and
    # relu's gradient with it (weight gradient 15% off the float64 one).
    torch.manual_seed(0)
    m, k, n = 256, 2048, 1024
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, dtype=torch.bfloat16) / k**0.5).requires_grad_()
    b = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, dtype=torch.bfloat16)
    act = getattr(F, activation)
    out = torch_ext.fused_linear(x, w, b, activation)
    eager_pre = F.linear(x, w, b)
    assert torch.equal(out > 0, eager_pre > 0)
    out.backward(g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    act(F.linear(xd, wd, bd)).backward(g.double())
    for ours, ref in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(ours.double(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid", "tanh"])
def test_eager_autograd_node_saves_what_backward_needs(activation):
    """Eager mode records a C++ node (csrc/autograd_node.h) whose saved tensors go through
    saved-tensor hooks."""
    x = leaf(torch.randn(6, 5))
    w = leaf(torch.randn(4, 5))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t):
        y = torch_ext.fused_linear(x, w, None, activation)
    assert y.grad_fn.name() == "FusedLinearBackward"
    assert (6, 5) in packed and (4, 5) in packed  # input and weight
    y.sum().backward()
    xr, wr = leaf(x), leaf(w)
    reference(xr, wr, None, activation).sum().backward()
    assert_close(x.grad, xr.grad)
    assert_close(w.grad, wr.grad)


@pytest.mark.cpu_only("seen through the CPU cache (cached_bytes)")
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_eager_autograd_node_does_not_keep_its_output_alive(activation):
    """sigmoid and tanh save the output for backward; a graph that is dropped without a backward
    must free it (no reference cycle output -> node -> output). The output is large enough
    (16 MiB) to go back to torch_ext's cache when freed, which tells that it was."""
    x = torch.randn(2048, 64)
    w = leaf(torch.randn(2048, 64))
    torch_ext.empty_cache()
    y = torch_ext.fused_linear(x, w, None, activation)
    assert y.grad_fn is not None and torch_ext.cached_bytes() == 0
    del y
    gc.collect()
    assert torch_ext.cached_bytes() >= 2048 * 2048 * 4
    torch_ext.empty_cache()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_second_order_through_the_bias(activation, path):
    """The weight's gradient depends on the bias through the pre-activation, though the fused
    backward never reads the bias: with create_graph, its derivative through the bias is PyTorch's,
    not None (allow_unused)."""
    x, w, b = _gradcheck_args((3, 5), 4, True)
    g = torch.randn(3, 4, dtype=torch.float64)
    results = []
    for fn in (lambda *a: call(path, *a, activation), lambda *a: reference(*a, activation)):
        xl, wl, bl = leaf(x), leaf(w), leaf(b)
        _, grad_w, _ = torch.autograd.grad(fn(xl, wl, bl), (xl, wl, bl), leaf(g), create_graph=True)
        results.append(torch.autograd.grad(grad_w.pow(2).sum(), bl, allow_unused=True)[0])
    assert results[0] is not None
    assert_close(results[0], results[1], msg="d(|grad_weight|^2)/d(bias)")

