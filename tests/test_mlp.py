"""Tests of the fused Transformer feed-forward block (every device): ``torch_ext.fused_mlp``,
``torch_ext.FusedMLP``, ``torch_ext.FusedMLPFunction`` and the raw activation ops
``torch.ops.torch_ext.mlp_act_fwd`` / ``mlp_act_bwd``.

The reference is always PyTorch itself: ``act(input)`` / ``act(u) * v`` with torch.nn.functional
for the ops, ``F.linear(act(F.linear(x, w1, b1)), w2, b2)`` (gated: ``act(u) * v`` over the two
halves of fc1's output) with eager autograd for the block. Covered:

* the ops, every activation x gated/not x float32/float64/bfloat16/float16, 1-D..4-D, zero rows, 1x1,
  127x129 (gated 127x258), wide rows (bf16 segments), non-contiguous input, expanded/strided
  grad_output; the backward's gradient and its recomputed output (bit-for-bit the forward's);
  every output_mask; their registered autograd; NaN/inf; leaky_relu slopes;
* fused_mlp / FusedMLP for every activation of MLP_ACTIVATIONS x recompute x bias x dtype,
  shapes and layouts, every subset of tensors requiring grad (and that no gradient is returned
  for the others), recompute=True against recompute=False;
* gradcheck (float64) of fused_mlp and of the ops; torch.library.opcheck of both ops;
  torch.compile(fullgraph=True); torch.autocast; what is saved for backward (<= 55% of eager's
  activation bytes with recompute for gelu/gelu_tanh/silu/swiglu/geglu); the module's state_dict
  and init; retain_graph; double backward; argument errors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ext
from torch_ext import FusedMLP, FusedMLPFunction, fused_mlp
from utils import (
    BackwardOpMasks,
    SavedTensorBytes,
    act_fn,
    assert_close,
    default_device_type,
    leaf,
    reference_dtype,
    tolerance,
)

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "quick_gelu")
GATED = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
MLP_ACTIVATIONS = ACTIVATIONS + tuple(GATED)
MASK_ACTIVATIONS = ("relu", "leaky_relu")
# Activations whose recompute saves only the pre-activation (saved bytes <= 55% of eager's, the goal).
RECOMPUTED = ("gelu", "gelu_tanh", "silu", "quick_gelu", "swiglu", "geglu", "geglu_tanh")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ACT_FWD = torch.ops.torch_ext.mlp_act_fwd.default
ACT_BWD = torch.ops.torch_ext.mlp_act_bwd.default
MLP_BWD = torch.ops.torch_ext.mlp_bwd.default
LINEAR_FWD = torch.ops.torch_ext.linear_act_fwd.default
NAMES = ("input", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
SLOPE = 0.2


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def test_activation_lists():
    assert tuple(torch_ext.ACTIVATIONS) == ACTIVATIONS
    assert dict(torch_ext.GATED_ACTIVATIONS) == GATED
    assert tuple(torch_ext.MLP_ACTIVATIONS) == MLP_ACTIVATIONS


# ----------------------------------------------------------------------------------------------
# 1. The activation ops vs PyTorch
# ----------------------------------------------------------------------------------------------


def ref_act(x, activation, negative_slope=SLOPE, gated=False):
    """act(x), or act(x[..., :n]) * x[..., n:] for gated, with torch.nn.functional."""
    f = act_fn(activation, negative_slope)
    if gated:
        n = x.shape[-1] // 2
        return f(x[..., :n]) * x[..., n:]
    return f(x)


def sprinkle_zeros(t):
    """Exact +0.0 and -0.0 entries (the kink of relu/leaky_relu), in place on a fresh tensor."""
    flat = t.view(-1)
    flat[::7] = 0.0
    flat[3::11] = -0.0
    return t


def _op_case(name, dtype, gated):
    """(input, grad_output spec) for one shape/layout case: grad None = random contiguous,
    "sum" = the stride-0 grad of y.sum(), else a tensor of the output's shape."""
    k = 2 if gated else 1

    def rnd(*shape):
        return sprinkle_zeros(2 * torch.randn(*shape)).to(dtype)

    grad = None
    if name == "1d":
        x = rnd(5 * k)
    elif name == "2d":
        x = rnd(4, 10 * k)
    elif name == "3d":
        x = rnd(2, 3, 6 * k)
    elif name == "4d":
        x = rnd(2, 2, 3, 3 * k)
    elif name == "zero_rows":
        x = rnd(0, 4 * k)
    elif name == "zero_middle_dim":
        x = rnd(2, 0, 4 * k)
    elif name == "1x1":
        x = rnd(1, 1 * k)
    elif name == "127x129":
        x = rnd(127, 129 * k)
    elif name == "wide_rows":  # bfloat16 rows are converted in 1024-column segments
        x = rnd(3, 2100 * k)
    elif name == "many_rows":  # several parallel_for chunks (16384 elements of output each)
        x = rnd(3000, 40 * k)
    elif name == "input_transposed":
        x = rnd(9 * k, 5).t()
    elif name == "input_sliced":
        x = rnd(5, 18 * k)[:, ::2]
    elif name == "input_column_window":  # unit column stride, row stride > width
        x = rnd(5, 9 * k + 6)[:, 3 : 3 + 9 * k]
    elif name == "input_3d_permuted":
        x = rnd(2, 7 * k, 3).transpose(1, 2)
    elif name == "input_expanded":
        x = rnd(7 * k).expand(4, 7 * k)
    elif name == "grad_row_expanded":  # row stride 0
        x = rnd(5, 9 * k)
        grad = torch.randn(9).to(dtype).expand(5, 9)
    elif name == "grad_column_expanded":  # column stride 0
        x = rnd(5, 9 * k)
        grad = torch.randn(5, 1).to(dtype).expand(5, 9)
    elif name == "grad_transposed":
        x = rnd(5, 9 * k)
        grad = torch.randn(9, 5).to(dtype).t()
    elif name == "grad_3d_sliced":
        x = rnd(2, 3, 9 * k)
        grad = torch.randn(2, 3, 18).to(dtype)[..., ::2]
    elif name == "grad_from_sum":
        x = rnd(2, 3, 9 * k)
        grad = "sum"
    else:
        raise AssertionError(name)
    return x, grad


OP_CASES = [
    "1d", "2d", "3d", "4d", "zero_rows", "zero_middle_dim", "1x1", "127x129", "wide_rows",
    "many_rows", "input_transposed", "input_sliced", "input_column_window", "input_3d_permuted", "input_expanded",
    "grad_row_expanded", "grad_column_expanded", "grad_transposed", "grad_3d_sliced", "grad_from_sum",
]


def check_act_ops(x, activation, gated, grad=None, negative_slope=SLOPE, msg=""):
    """mlp_act_fwd / mlp_act_bwd (every output_mask) and the op's autograd vs PyTorch."""
    dtype = x.dtype
    tag = f"{msg} {activation} gated={gated} {dtype_id(dtype)}"
    n = x.shape[-1] // 2 if gated else x.shape[-1]
    out_shape = (*x.shape[:-1], n)

    out = ACT_FWD(x, activation, negative_slope, gated)
    assert out.shape == out_shape and out.dtype == dtype, tag
    xr = leaf(x, reference_dtype(dtype))
    ref = ref_act(xr, activation, negative_slope, gated)
    assert_close(out, ref, dtype=dtype, msg=f"{tag}: output")

    if grad is None:
        grad = torch.randn(out_shape).to(dtype)
    g = out.new_ones(()).expand(out_shape) if isinstance(grad, str) else grad
    (ref_grad,) = torch.autograd.grad(ref, xr, g.to(reference_dtype(dtype)))

    grad_input, formed = ACT_BWD(g, x, activation, negative_slope, gated, [True, True])
    assert grad_input.shape == x.shape and grad_input.dtype == dtype, tag
    assert_close(grad_input, ref_grad, dtype=dtype, msg=f"{tag}: grad_input")
    assert torch.equal(formed, out), f"{tag}: the output formed in backward differs from the forward's"

    gi_only, empty = ACT_BWD(g, x, activation, negative_slope, gated, [True, False])
    assert torch.equal(gi_only, grad_input) and empty is None, tag
    empty, out_only = ACT_BWD(g, x, activation, negative_slope, gated, [False, True])
    assert empty is None and torch.equal(out_only, out), tag
    e1, e2 = ACT_BWD(g, x, activation, negative_slope, gated, [False, False])
    assert e1 is None and e2 is None, tag

    # The op called directly is differentiable (its registered autograd).
    xl = leaf(x)
    y = torch.ops.torch_ext.mlp_act_fwd(xl, activation, negative_slope, gated)
    assert torch.equal(y, out), tag
    if isinstance(grad, str):
        y.sum().backward()
    else:
        y.backward(grad)
    assert torch.equal(xl.grad, grad_input), f"{tag}: autograd of mlp_act_fwd != mlp_act_bwd"


# Every case in float32 and bfloat16 (whose rows go through float32 segments); float64 takes the
# shape cases (strides are resolved in mlp_act.cpp before the dtype dispatch, the same for all).
OP_DTYPE_CASES = [
    pytest.param(d, c, id=f"{dtype_id(d)}-{c}")
    for d in DTYPES
    for c in OP_CASES
    if d != torch.float64 or not c.startswith(("input_", "grad_"))
]


@pytest.mark.parametrize("dtype,case", OP_DTYPE_CASES)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_ops_match_pytorch(activation, gated, dtype, case):
    x, grad = _op_case(case, dtype, gated)
    if case.startswith("input_"):
        assert not x.is_contiguous()
    check_act_ops(x, activation, gated, grad, msg=case)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("negative_slope", [0.0, 0.01, -0.5, 1.5])
def test_act_ops_leaky_relu_slopes(negative_slope, gated, dtype):
    x, _ = _op_case("3d", dtype, gated)
    check_act_ops(x, "leaky_relu", gated, negative_slope=negative_slope, msg=f"slope {negative_slope}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_act_ops_gradient_at_exact_zero(activation, gated, dtype):
    # At an input of exactly +-0: relu's gradient is 0, leaky_relu's the slope, as PyTorch's.
    n = 16
    u = torch.randn(4, n)
    u[:, ::2] = 0.0
    u[:, 1::4] = -0.0
    x = torch.cat([u, torch.randn(4, n)], -1) if gated else u
    x = x.to(dtype)
    g = torch.randn(4, n).to(dtype)
    grad_input, _ = ACT_BWD(g, x, activation, SLOPE, gated, [True, False])
    # float32/float64: PyTorch in the same dtype, bit for bit. bfloat16: PyTorch in float32 from
    # the same values (g * v is exact there), rounded once to bfloat16, as the op rounds.
    rd = reference_dtype(dtype)
    xr = leaf(x, rd)
    (ref,) = torch.autograd.grad(ref_act(xr, activation, SLOPE, gated), xr, g.to(rd))
    assert torch.equal(grad_input, ref.to(dtype)), f"{grad_input}\nvs\n{ref}"
    zero = u == 0
    gu = grad_input[..., :n]
    gv = g.to(rd) * x[..., n:].to(rd) if gated else g.to(rd)  # the gradient reaching act
    want = (torch.zeros_like(gv) if activation == "relu" else gv * SLOPE).to(dtype)
    assert torch.equal(gu[zero], want[zero])


# ----------------------------------------------------------------------------------------------
# 2. NaN / inf
# ----------------------------------------------------------------------------------------------

SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 3.0, -3.0, 0.5]


def _nonfinite_input(dtype, gated):
    """Rows whose activation inputs (and, gated, values) hit every special value."""
    s = torch.tensor(SPECIALS, dtype=torch.float64)
    u = torch.cat([s, s.flip(0)]).repeat(3, 1)
    if not gated:
        return u.to(dtype)
    v = torch.stack([s.roll(1).repeat(2), torch.zeros(2 * len(s)), torch.full((2 * len(s),), float("inf"))])
    return torch.cat([u, v], -1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_ops_nonfinite(activation, gated, dtype):
    x = _nonfinite_input(dtype, gated)
    out = ACT_FWD(x, activation, SLOPE, gated)
    # Forward reference in float64 (rounded to dtype): PyTorch's float32/bfloat16 F.gelu goes
    # through oneDNN, which gives gelu(+inf) = NaN, while float64 (and the math) give +inf.
    ref64 = ref_act(x.double(), activation, SLOPE, gated).to(dtype)
    # (scale=1: atol is not scaled by the 1e30 entries, so the O(1) values are checked too.)
    assert_close(out, ref64, equal_nan=True, scale=1.0, msg=f"{activation}: non-finite forward")
    # Gradients: NaN where PyTorch's eager autograd has NaN (same dtype; bf16 via float32).
    g = torch.randn(out.shape).to(dtype)
    grad_input, formed = ACT_BWD(g, x, activation, SLOPE, gated, [True, True])
    assert torch.equal(formed.isnan(), out.isnan()) and torch.equal(formed.nan_to_num(), out.nan_to_num())
    xr = leaf(x, reference_dtype(dtype))
    if activation == "quick_gelu":
        # Autograd of the x * sigmoid(1.702 x) composite applies the product rule, so at u = 0 with
        # v = inf it forms 0 * inf = NaN where the derivative (1/2) times v is inf. PyTorch's silu
        # op on the scaled input is the same function with a one-formula derivative, as ours.
        ref = F.silu(1.702 * xr[..., :x.shape[-1] // 2] if gated else 1.702 * xr) / 1.702
        ref = ref * xr[..., x.shape[-1] // 2:] if gated else ref
    else:
        ref = ref_act(xr, activation, SLOPE, gated)
    (ref_grad,) = torch.autograd.grad(ref, xr, g.to(xr.dtype))
    assert_close(
        grad_input, ref_grad, dtype=dtype, equal_nan=True, scale=1.0, msg=f"{activation}: non-finite grad_input"
    )
    if activation == "relu" and not gated:  # relu passes the gradient where its input is NaN
        nan_x = x.isnan()
        assert nan_x.any() and torch.equal(grad_input[nan_x], g[nan_x])


# ----------------------------------------------------------------------------------------------
# 3. fused_mlp / FusedMLP vs PyTorch
# ----------------------------------------------------------------------------------------------


def make_mlp_args(in_shape, hidden, out_features, activation, dtype=torch.float32, bias=True):
    """Input (*, K), fc1 (H or 2H, K), fc2 (O, H), scaled so activations are O(1)."""
    k = in_shape[-1]
    fc1_out = 2 * hidden if activation in GATED else hidden
    x = torch.randn(in_shape).to(dtype)
    w1 = (torch.randn(fc1_out, k) / math.sqrt(max(k, 1))).to(dtype)
    b1 = (0.5 * torch.randn(fc1_out)).to(dtype) if bias else None
    w2 = (torch.randn(out_features, hidden) / math.sqrt(max(hidden, 1))).to(dtype)
    b2 = (0.5 * torch.randn(out_features)).to(dtype) if bias else None
    return [x, w1, b1, w2, b2]


def reference_mlp(x, w1, b1, w2, b2, activation, negative_slope=SLOPE, positive=None):
    """F.linear(act(F.linear(x, w1, b1)), w2, b2); gated: act(u) * v. `positive`: relu/leaky_relu's
    side of the kink (see kink_side)."""
    pre = F.linear(x, w1, b1)
    if activation in GATED:
        u, v = pre.chunk(2, -1)
        hidden = act_fn(GATED[activation])(u) * v
    elif positive is not None:
        slope = 0.0 if activation == "relu" else negative_slope
        hidden = torch.where(positive, pre, pre * slope)
    else:
        hidden = act_fn(activation, negative_slope)(pre)
    return F.linear(hidden, w2, b2)


def unpack_mask(saved, n):
    """(*, ceil(N/8)) uint8 -> (*, N) bool, bit j of byte i = element 8 i + j."""
    bits = (saved.unsqueeze(-1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.flatten(-2)[..., :n].bool()


def kink_side(x, w1, b1, activation, negative_slope):
    """For relu/leaky_relu, the side of 0 that fc1's fused op took for each pre-activation.

    Pre-activations within rounding of 0 may land on either side (the op rounds x @ W.T to x's
    dtype before adding the bias; eager and a float32 reference round differently), and on the
    wrong side an element's gradient changes by a whole grad * weight: not a tolerance matter.
    So the side is checked against the float64 pre-activation wherever |pre| exceeds the rounding
    bound, and the reference differentiates where(side, pre, slope * pre) with PyTorch ops.
    """
    n = w1.shape[0]
    x, w1 = x.detach(), w1.detach()
    b1 = None if b1 is None else b1.detach()
    positive = unpack_mask(LINEAR_FWD(x, w1, b1, activation, float(negative_slope))[1], n)
    x64, w64 = x.double(), w1.double()
    pre = F.linear(x64, w64, None if b1 is None else b1.double())
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rel = 2 * torch.finfo(x.dtype).eps + (w1.shape[1] + 2) * torch.finfo(acc).eps
    bound = rel * F.linear(x64.abs(), w64.abs()) + 1e-30
    disagree = positive != (pre > 0)
    near = (pre.abs() <= bound) & (pre != 0)
    assert bool((near | ~disagree).all()), f"{activation}: kink side wrong at {pre[disagree & ~near][:10].tolist()}"
    return positive


def run_mlp(fn, tensors, requires, grad, dtype=None):
    """y = fn(*tensors) on fresh copies (cast to dtype), those named in `requires` requiring grad,
    and {name: gradient} for grad_output `grad` (a tensor, or "sum" for y.sum())."""
    args = []
    for name, t in zip(NAMES, tensors):
        if t is not None:
            t = t.detach()
            if dtype is not None and t.dtype != dtype:
                t = t.to(dtype)
            if name in requires:
                t.requires_grad_()
        args.append(t)
    y = fn(*args)
    names = [n for n, a in zip(NAMES, args) if a is not None and a.requires_grad]
    if not names:
        return y, {}
    leaves = [args[NAMES.index(n)] for n in names]
    if isinstance(grad, str):
        grads = torch.autograd.grad(y.sum(), leaves)
    else:
        grads = torch.autograd.grad(y, leaves, grad if dtype is None else grad.to(dtype))
    return y, dict(zip(names, grads))


def call_mlp(path, x, w1, b1, w2, b2, activation, negative_slope=SLOPE, recompute=True):
    """The block through one of its two autograd paths: fused_mlp (eager: the C++ node of
    csrc/autograd_node.h) or FusedMLPFunction (what torch.compile traces)."""
    if path == "functional":
        return fused_mlp(x, w1, b1, w2, b2, activation=activation, negative_slope=negative_slope, recompute=recompute)
    if path == "function":
        return FusedMLPFunction.apply(x, w1, b1, w2, b2, activation, float(negative_slope), recompute)[0]
    raise AssertionError(path)


PATHS = ("functional", "function")


def check_mlp(tensors, activation, recompute=True, grad=None, requires=NAMES, negative_slope=SLOPE, msg="",
              path="functional"):
    """Forward and every gradient of the block (through `path`) vs PyTorch (float32 from the
    same values for bfloat16, see utils.reference_dtype)."""
    x, w1, b1, w2, b2 = tensors
    dtype = x.dtype
    if grad is None:
        grad = torch.randn(*x.shape[:-1], w2.shape[0]).to(dtype)
    y, grads = run_mlp(
        lambda *a: call_mlp(path, *a, activation, negative_slope, recompute), tensors, requires, grad,
    )
    positive = kink_side(x, w1, b1, activation, negative_slope) if activation in MASK_ACTIVATIONS else None
    ref_y, ref_grads = run_mlp(
        lambda *a: reference_mlp(*a, activation, negative_slope, positive), tensors, requires, grad,
        reference_dtype(dtype),
    )
    tag = f"{msg} {path} {activation} recompute={recompute} {dtype_id(dtype)}"
    assert y.shape == (*x.shape[:-1], w2.shape[0]), tag
    assert_close(y, ref_y, dtype=dtype, msg=f"{tag}: output")
    assert grads.keys() == ref_grads.keys(), tag
    for name in grads:
        assert_close(grads[name], ref_grads[name], dtype=dtype, msg=f"{tag}: grad of {name}")
    return y, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
@pytest.mark.parametrize("path", PATHS)
def test_mlp_matches_pytorch(path, activation, recompute, bias, dtype):
    tensors = make_mlp_args((2, 5, 12), 20, 7, activation, dtype, bias)
    check_mlp(tensors, activation, recompute, path=path)


def _mlp_case(name, activation, dtype):
    """(tensors, grad spec) for one shape/layout case of the block (K=12, H=10, O=7)."""
    k, h, o = 12, 10, 7
    shapes = {"1d": (k,), "2d": (6, k), "3d": (2, 3, k), "4d": (2, 2, 2, k), "zero_batch": (0, k),
              "zero_middle_batch": (2, 0, k)}
    sizes = {"in_features_0": ((3, 0), h, o), "hidden_0": ((3, k), 0, o), "out_features_0": ((3, k), h, 0),
             "127x129": ((127, 129), 65, 33)}
    grad = None
    if name in shapes:
        return make_mlp_args(shapes[name], h, o, activation, dtype), grad
    if name in sizes:
        return make_mlp_args(*sizes[name], activation, dtype), grad
    tensors = make_mlp_args((6, k), h, o, activation, dtype)
    if name == "input_transposed":
        tensors[0] = torch.randn(k, 6).to(dtype).t()
    elif name == "input_sliced":
        tensors[0] = torch.randn(6, 2 * k).to(dtype)[:, ::2]
    elif name == "input_3d_permuted":
        tensors[0] = torch.randn(2, k, 3).to(dtype).transpose(1, 2)
    elif name == "input_expanded":
        tensors[0] = torch.randn(k).to(dtype).expand(6, k)
    elif name == "weights_strided":
        tensors[1] = tensors[1].t().contiguous().t()
        tensors[2] = torch.randn(2 * tensors[2].shape[0]).to(dtype)[::2]
        tensors[3] = torch.randn(o, 2 * h).to(dtype)[:, ::2] / math.sqrt(h)
        tensors[4] = tensors[4].t().contiguous().t()
    elif name == "grad_transposed":
        grad = torch.randn(o, 6).to(dtype).t()
    elif name == "grad_row_expanded":
        grad = torch.randn(o).to(dtype).expand(6, o)
    elif name == "grad_column_expanded":
        grad = torch.randn(6, 1).to(dtype).expand(6, o)
    elif name == "grad_from_sum":
        tensors[0] = torch.randn(2, 3, k).to(dtype)
        grad = "sum"
    else:
        raise AssertionError(name)
    return tensors, grad


MLP_CASES = [
    "1d", "2d", "3d", "4d", "zero_batch", "zero_middle_batch", "in_features_0", "hidden_0",
    "out_features_0", "127x129", "input_transposed",
    "input_sliced", "input_3d_permuted", "input_expanded", "weights_strided", "grad_transposed",
    "grad_row_expanded", "grad_column_expanded", "grad_from_sum",
]


@pytest.mark.parametrize("case", MLP_CASES)
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_mlp_shapes_and_layouts(activation, case):
    tensors, grad = _mlp_case(case, activation, torch.float32)
    if case.startswith("input_"):
        assert not tensors[0].is_contiguous()
    check_mlp(tensors, activation, recompute=True, grad=grad, msg=case)


@pytest.mark.parametrize("case", ["3d", "zero_batch", "input_transposed", "grad_row_expanded", "grad_from_sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "geglu_tanh"])
def test_mlp_shapes_other_dtypes(activation, dtype, case):
    tensors, grad = _mlp_case(case, activation, dtype)
    check_mlp(tensors, activation, recompute=True, grad=grad, msg=case)


@pytest.mark.parametrize("negative_slope", [0.0, -0.5, 1.5])
def test_mlp_leaky_relu_slope(negative_slope):
    tensors = make_mlp_args((3, 4, 12), 16, 5, "leaky_relu")
    check_mlp(tensors, "leaky_relu", negative_slope=negative_slope)
    module = FusedMLP(12, 16, 5, activation="leaky_relu", negative_slope=negative_slope)
    x = tensors[0]
    ref = module.fc2(F.leaky_relu(module.fc1(x), negative_slope))
    assert_close(module(x), ref)


REQUIRES_CASES = {
    "all": NAMES,
    "input_only": ("input",),
    "weights_only": ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
    "frozen_fc1": ("input", "fc2_weight", "fc2_bias"),
    "frozen_fc2": ("input", "fc1_weight", "fc1_bias"),
    "fc2_only": ("fc2_weight", "fc2_bias"),
    "fc1_only": ("fc1_weight", "fc1_bias"),
    "fc2_weight_only": ("fc2_weight",),
    "fc1_bias_only": ("fc1_bias",),
}


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize("requires", list(REQUIRES_CASES))
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
@pytest.mark.parametrize("path", PATHS)
def test_mlp_partial_requires_grad(path, activation, requires, recompute):
    subset = REQUIRES_CASES[requires]
    # Spy on the backward op (whichever autograd path calls it, the C++ node or the Python
    # Function): it is asked once, for exactly the gradients of the tensors requiring grad.
    tensors = make_mlp_args((2, 3, 12), 10, 7, activation)
    with BackwardOpMasks(MLP_BWD) as masks:
        _, grads = check_mlp(tensors, activation, recompute, requires=subset, msg=requires, path=path)
    assert set(grads) == set(subset)
    assert masks == [[name in subset for name in NAMES]]


def test_mlp_nothing_requires_grad():
    tensors = make_mlp_args((3, 12), 10, 7, "swiglu")
    y = fused_mlp(*tensors, activation="swiglu")
    assert not y.requires_grad
    assert_close(y, reference_mlp(*tensors, "swiglu"))
    with torch.no_grad():
        y = fused_mlp(*(leaf(t) for t in tensors), activation="swiglu")
    assert not y.requires_grad


def one_pass_rounds_bias_gradient(activation, dtype, name):
    """Whether gradient `name` may differ by rounding between recompute's one-pass CPU backward and
    the other paths: in 16-bit, non-gated, it sums the rounded 16-bit gradient of the pre-activation
    into fc1's bias, as eager PyTorch does; the others sum it unrounded."""
    return dtype in (torch.bfloat16, torch.float16) and name == "fc1_bias" and activation not in GATED


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_recompute_gives_the_gradients_of_saving(activation, dtype):
    # recompute forms the activation again in backward: the same gradients as saving it.
    tensors = make_mlp_args((4, 3, 12), 16, 9, activation, dtype)
    g = torch.randn(4, 3, 9).to(dtype)
    y1, g1 = run_mlp(lambda *a: fused_mlp(*a, activation=activation, recompute=True), tensors, NAMES, g)
    y0, g0 = run_mlp(lambda *a: fused_mlp(*a, activation=activation, recompute=False), tensors, NAMES, g)
    assert torch.equal(y1, y0)
    for name in NAMES:
        if dtype == torch.bfloat16 and name == "fc2_weight" and activation not in GATED:
            # (bfloat16, non-gated: forward's hidden is act of the float32 accumulator, rounded
            # once; the recomputed one is act of the bfloat16-rounded pre-activation.)
            assert_close(g1[name], g0[name], msg=name)
        elif one_pass_rounds_bias_gradient(activation, dtype, name):
            assert_close(g1[name], g0[name], msg=name)
        else:
            assert torch.equal(g1[name], g0[name]), name


# ----------------------------------------------------------------------------------------------
# 4. gradcheck (float64)
# ----------------------------------------------------------------------------------------------


def _gradcheck_mlp_args(in_shape, hidden, out_features, activation, bias=True):
    """float64 args with no pre-activation within 1e-2 of relu's kink."""
    for _ in range(200):
        t = make_mlp_args(in_shape, hidden, out_features, activation, torch.float64, bias)
        if (F.linear(t[0], t[1], t[2]).abs() > 1e-2).all():
            return t
    raise AssertionError("could not draw pre-activations away from 0")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_gradcheck_fused_mlp(activation, recompute, bias):
    in_shape = (2, 3, 4) if bias else (3, 4)
    tensors = [leaf(t) for t in _gradcheck_mlp_args(in_shape, 3, 2, activation, bias)]
    present = [i for i, t in enumerate(tensors) if t is not None]

    def fn(*args):
        full = [None] * 5
        for i, a in zip(present, args):
            full[i] = a
        return fused_mlp(*full, activation=activation, negative_slope=SLOPE, recompute=recompute)

    assert torch.autograd.gradcheck(fn, [tensors[i] for i in present])


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_gradcheck_function_apply(activation):
    tensors = [leaf(t) for t in _gradcheck_mlp_args((3, 4), 3, 2, activation)]

    def fn(*args):
        return FusedMLPFunction.apply(*args, activation, SLOPE, True)[0]

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_act_op(activation, gated):
    x = torch.randn(2, 3, 8 if gated else 5, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x + 0.1, x)  # away from the kink
    xl = leaf(x)
    assert torch.autograd.gradcheck(lambda t: torch.ops.torch_ext.mlp_act_fwd(t, activation, SLOPE, gated), (xl,))


# ----------------------------------------------------------------------------------------------
# 5. opcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_act_fwd(activation, gated, requires_grad):
    x = torch.randn(2, 3, 8)
    if requires_grad:
        x.requires_grad_()
    torch.library.opcheck(ACT_FWD, (x, activation, 0.1, gated))


BWD_SAMPLES = [
    ("plain_both", False, [True, True]),
    ("gated_both", True, [True, True]),
    ("gated_grad_only", True, [True, False]),
    ("plain_output_only", False, [False, True]),
]


@pytest.mark.parametrize("sample", BWD_SAMPLES, ids=[s[0] for s in BWD_SAMPLES])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_act_bwd(activation, sample):
    _, gated, mask = sample
    x = torch.randn(5, 8)
    g = torch.randn(5, 4 if gated else 8)
    torch.library.opcheck(ACT_BWD, (g, x, activation, 0.1, gated, mask))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_opcheck_act_bwd_requires_grad(activation, gated):
    # The backward op is differentiable once, by design: its outputs get a grad_fn whose backward
    # raises. Every opcheck utility runs but the one differentiating through it, which must fail
    # with that message.
    x = leaf(torch.randn(5, 8))
    g = leaf(torch.randn(5, 4 if gated else 8))
    args = (g, x, activation, 0.1, gated, [True, True])
    torch.library.opcheck(ACT_BWD, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="does not support double backward"):
        torch.library.opcheck(ACT_BWD, args, test_utils="test_aot_dispatch_dynamic")


def _mlp_bwd_args(activation, recompute, mask, requires_grad=False, dtype=torch.float32):
    """(arguments of torch_ext::mlp_bwd as the block's forward leaves them (3-D input), the
    block's tensors (x, w1, b1, w2, b2)). hidden is None (formed again) with recompute, for the
    activations that recompute."""
    gated = activation in GATED
    act = GATED.get(activation, activation)
    x, w1, b1, w2, b2 = make_mlp_args((2, 3, 6), 5, 4, activation, dtype)
    if gated:
        saved = LINEAR_FWD(x, w1, b1, "none", 0.0)[0]
        hidden = ACT_FWD(saved, act, SLOPE, True)
    else:
        hidden, saved = LINEAR_FWD(x, w1, b1, act, SLOPE)
        if act in ("sigmoid", "tanh"):
            saved = hidden
    g = torch.randn(2, 3, 4).to(dtype)
    block = (x, w1, b1, w2, b2)
    recompute = recompute and activation in RECOMPUTED  # the others' saved is not the pre-activation
    if requires_grad:
        x, w1, w2, g = (leaf(t) for t in (x, w1, w2, g))
    return (g, x, w1, w2, saved, None if recompute else hidden, act, SLOPE, gated, mask), block


MLP_BWD_MASKS = {"all": [True] * 5, "fc2_only": [False, False, False, True, True],
                 "input_only": [True, False, False, False, False], "weights": [False, True, False, True, False]}


@pytest.mark.parametrize("mask", list(MLP_BWD_MASKS))
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "swiglu"])
def test_opcheck_bwd_composites(activation, mask):
    # mlp_bwd_composite and mlp_act_bwd_composite (create_graph's backward): every opcheck utility,
    # differentiating through them included; their gradients are mlp_bwd's and mlp_act_bwd's.
    (g, x, w1, w2, saved, hidden, act, slope, gated, m), (_, _, b1, _, _) = _mlp_bwd_args(
        activation, False, MLP_BWD_MASKS[mask], dtype=torch.float64)
    g, x, w1, b1, w2 = (leaf(t) for t in (g, x, w1, b1, w2))
    args = (g, x, w1, b1, w2, act, slope, gated, m)
    torch.library.opcheck(torch.ops.torch_ext.mlp_bwd_composite.default, args)
    want = MLP_BWD(g.detach(), x.detach(), w1.detach(), w2.detach(), saved, hidden, act, slope, gated, m)
    for name, a, e in zip(NAMES, torch.ops.torch_ext.mlp_bwd_composite(*args), want):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_close(a, e, msg=f"grad_{name}")
    pre = leaf(LINEAR_FWD(x.detach(), w1.detach(), b1.detach(), "none", 0.0)[0])
    grad_hidden = leaf(torch.randn(*pre.shape[:-1], pre.shape[-1] // 2 if gated else pre.shape[-1], dtype=pre.dtype))
    act_args = (grad_hidden, pre, act, slope, gated)
    torch.library.opcheck(torch.ops.torch_ext.mlp_act_bwd_composite.default, act_args)
    assert_close(torch.ops.torch_ext.mlp_act_bwd_composite(*act_args),
                 ACT_BWD(grad_hidden.detach(), pre.detach(), act, slope, gated, [True, False])[0], msg="mlp_act")


@pytest.mark.parametrize("mask", list(MLP_BWD_MASKS))
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_opcheck_mlp_bwd(activation, recompute, mask):
    torch.library.opcheck(MLP_BWD, _mlp_bwd_args(activation, recompute, MLP_BWD_MASKS[mask])[0])


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_opcheck_mlp_bwd_requires_grad(activation):
    # Differentiable once, as mlp_act_bwd above: the utility differentiating through it must fail.
    args = _mlp_bwd_args(activation, True, [True] * 5, requires_grad=True)[0]
    torch.library.opcheck(MLP_BWD, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(Exception, match="does not support double backward"):
        torch.library.opcheck(MLP_BWD, args, test_utils="test_aot_dispatch_dynamic")


@pytest.mark.parametrize("mask", list(MLP_BWD_MASKS))
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_mlp_bwd_matches_the_block(activation, recompute, mask):
    """The op on its own: the block's gradients (eager autograd of reference_mlp, float64) for
    those in the mask, None for the others; recomputing the hidden activation or given it."""
    args, block = _mlp_bwd_args(activation, recompute, MLP_BWD_MASKS[mask], dtype=torch.float64)
    got = MLP_BWD(*args)
    leaves = [leaf(t) for t in block]
    positive = kink_side(*block[:3], activation, SLOPE) if activation in MASK_ACTIVATIONS else None
    ref = torch.autograd.grad(reference_mlp(*leaves, activation, SLOPE, positive), leaves, args[0])
    for name, g, r, asked in zip(NAMES, got, ref, MLP_BWD_MASKS[mask]):
        if asked:
            assert_close(g, r, msg=f"{activation} {mask}: grad of {name}")
        else:
            assert g is None, f"{name} was not asked for, got {g}"


@pytest.mark.parametrize("case", ["fc2_weight", "fc1_weight_width", "grad_output", "saved_not_pre_activation",
                                  "dtype"])
def test_mlp_bwd_bad_arguments(case):
    g, x, w1, w2, saved, hidden, act, slope, gated, mask = _mlp_bwd_args("gelu", True, [True] * 5)[0]
    if case == "fc2_weight":
        w2, match = torch.randn(4, 6), "fc1_weight .* does not match fc2_weight"
    elif case == "fc1_weight_width":
        w1, match = torch.randn(5, 7), r"fc1_weight .* does not match input.size\(-1\)"
    elif case == "grad_output":
        g, match = torch.randn(2, 3, 5), "grad_output .* does not match"
    elif case == "saved_not_pre_activation":
        saved, match = torch.empty(0), "hidden is None, so saved must be the pre-activation"
    else:
        w2, match = w2.double(), "fc2_weight has dtype Double but input has dtype Float"
    with pytest.raises(RuntimeError, match=match):
        MLP_BWD(g, x, w1, w2, saved, hidden, act, slope, gated, mask)


# ----------------------------------------------------------------------------------------------
# 6. torch.compile
# ----------------------------------------------------------------------------------------------


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp1 = FusedMLP(8, 16, activation="gelu")
        self.mlp2 = FusedMLP(8, 12, 6, activation="swiglu")

    def forward(self, x):
        return self.mlp2(x + self.mlp1(x))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(dynamo_reset, backend):
    model = _Model()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, 8)
    outs, grads = [], []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        xl = leaf(x)
        y = m(xl)
        g = torch.ones_like(y) * torch.arange(y.shape[-1], dtype=y.dtype)
        y.backward(g)
        outs.append(y.detach())
        grads.append([xl.grad] + [p.grad.clone() for p in model.parameters()])
    assert_close(outs[1], outs[0], msg="compiled output")
    assert len(grads[1]) == 1 + 8
    for a, e in zip(grads[1], grads[0]):
        assert_close(a, e, msg="compiled grad")


@pytest.mark.cpu_only("the CPU 16-bit GEMM route")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_compiled_second_layer_follows_the_16_bit_route(dynamo_reset, dtype):
    # Traced, fc2 is F.linear (ATen's GEMM) where ATen's 16-bit GEMM is fast, and the dense layer's
    # op without activation, which multiplies in float32, where it is slow (csrc/matmul.h), as
    # the eager path's fc2 does: either way the result is the float32 product rounded once.
    from torch_ext._common import cpu_products_in_float32

    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    mlp = FusedMLP(64, 96, activation="gelu").to(dtype)
    x = torch.randn(8, 64).to(dtype)
    with torch.no_grad():
        out = torch.compile(mlp, backend=backend, fullgraph=True)(x)
        eager = mlp(x)
    dense_ops = sum("linear_act_fwd" in t for t in targets)
    assert dense_ops == (2 if cpu_products_in_float32(dtype) else 1), targets
    assert_close(out, eager, msg="compiled output")


def test_compile_no_graph_breaks(dynamo_reset):
    model = _Model()

    def fn(x):
        return model(x) + ACT_FWD(x[..., :6], "silu", 0.0, False)

    explanation = torch._dynamo.explain(fn)(torch.randn(3, 8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ----------------------------------------------------------------------------------------------
# 7. autocast
# ----------------------------------------------------------------------------------------------


class _RefMLP(nn.Module):
    """Eager reference with FusedMLP's layout (fc1, fc2 nn.Linear)."""

    def __init__(self, in_features, hidden, out_features, activation, bias=True):
        super().__init__()
        gated = activation in GATED
        self.fc1 = nn.Linear(in_features, hidden * (2 if gated else 1), bias=bias)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias)
        self.activation = activation

    def forward(self, x):
        pre = self.fc1(x)
        if self.activation in GATED:
            u, v = pre.chunk(2, -1)
            return self.fc2(act_fn(GATED[self.activation])(u) * v)
        return self.fc2(act_fn(self.activation)(pre))


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "swiglu", "geglu"])
def test_autocast_bfloat16(activation):
    mlp = FusedMLP(16, 24, 10, activation=activation)
    ref = _RefMLP(16, 24, 10, activation)
    ref.load_state_dict(mlp.state_dict())
    x = torch.randn(4, 3, 16)
    g = torch.randn(4, 3, 10).to(torch.bfloat16)
    xl, xr = leaf(x), leaf(x)
    with torch.autocast(default_device_type(), dtype=torch.bfloat16):
        y = mlp(xl)
        y_ref = ref(xr)
    assert y_ref.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    assert_close(y, y_ref, dtype=torch.bfloat16, msg="autocast output vs eager autocast")
    y.backward(g)
    y_ref.backward(g)
    got = [xl.grad] + [p.grad for p in mlp.parameters()]
    eager = [xr.grad] + [p.grad for p in ref.parameters()]
    rtol, atol = tolerance(torch.bfloat16)
    for a, e in zip(got, eager):
        assert a.dtype == torch.float32  # back to the float32 leaves
        assert_close(a, e, rtol=2 * rtol, atol=2 * atol, msg="autocast grad vs eager autocast")
    # And vs the float32 computation from the same bfloat16-cast operands.
    params = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    tensors = [t.detach().to(torch.bfloat16) for t in (x, *params)]
    ref_y, _ = run_mlp(lambda *a: reference_mlp(*a, activation), tensors, (), g, torch.float32)
    assert_close(y, ref_y, dtype=torch.bfloat16, msg="autocast output vs float32 reference")


# ----------------------------------------------------------------------------------------------
# 8. What is saved for backward
# ----------------------------------------------------------------------------------------------


def _saved_bytes(fn, tensors):
    with SavedTensorBytes() as rec:
        y = fn(*tensors)
    return rec.bytes_excluding(tensors), y


@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_saved_bytes(activation):
    rows, hidden = 64, 48
    tensors = [leaf(t) for t in make_mlp_args((4, 16, 32), hidden, 32, activation)]
    eager, y_ref = _saved_bytes(lambda *a: reference_mlp(*a, activation), tensors)
    fused, y = _saved_bytes(lambda *a: fused_mlp(*a, activation, SLOPE, recompute=True), tensors)
    saving, _ = _saved_bytes(lambda *a: fused_mlp(*a, activation, SLOPE, recompute=False), tensors)
    hidden_bytes = rows * hidden * 4
    assert eager >= hidden_bytes
    if activation in RECOMPUTED:
        assert 0 < fused <= 0.55 * eager, (fused, eager)
        assert saving > fused, (saving, fused)
    else:
        mask = rows * ((hidden + 7) // 8) if activation in MASK_ACTIVATIONS else 0
        assert 0 < fused <= eager + mask, (fused, eager, mask)
        assert saving == fused
    # The saved tensors still give the right gradients.
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, tensors, g)
    want = torch.autograd.grad(y_ref, tensors, g)
    for a, e in zip(got, want):
        assert_close(a, e)


# ----------------------------------------------------------------------------------------------
# 9. The FusedMLP module
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "relu"])
def test_module_loads_reference_state_dict(activation, bias):
    ref = _RefMLP(12, 20, 7, activation, bias)
    mlp = FusedMLP(12, 20, 7, activation=activation, bias=bias)
    assert list(mlp.state_dict().keys()) == list(ref.state_dict().keys())
    if bias:
        assert list(ref.state_dict().keys()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    mlp.load_state_dict(ref.state_dict())  # strict
    x = torch.randn(3, 4, 12)
    assert_close(mlp(x), ref(x))
    back = _RefMLP(12, 20, 7, activation, bias)
    back.load_state_dict(mlp.state_dict())
    assert_close(back(x), ref(x))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_module_init_like_linear(activation, bias):
    gated = activation in GATED
    torch.manual_seed(123)
    fc1 = nn.Linear(33, 17 * (2 if gated else 1), bias=bias)
    fc2 = nn.Linear(17, 9, bias=bias)
    torch.manual_seed(123)
    mlp = FusedMLP(33, 17, 9, activation=activation, bias=bias)
    assert isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
    assert torch.equal(mlp.fc1.weight, fc1.weight) and torch.equal(mlp.fc2.weight, fc2.weight)
    if bias:
        assert torch.equal(mlp.fc1.bias, fc1.bias) and torch.equal(mlp.fc2.bias, fc2.bias)
    else:
        assert mlp.fc1.bias is None and mlp.fc2.bias is None
    assert mlp.fc1.in_features == 33 and mlp.fc2.out_features == 9


def test_module_out_features_default():
    mlp = FusedMLP(10, 24)
    assert mlp.fc1.weight.shape == (24, 10) and mlp.fc2.weight.shape == (10, 24)
    assert mlp.activation == "gelu" and mlp.recompute is True
    gated = FusedMLP(10, 24, activation="swiglu")
    assert gated.fc1.weight.shape == (48, 10) and gated.fc2.weight.shape == (10, 24)
    assert mlp(torch.randn(3, 10)).shape == (3, 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_module_factory_kwargs(dtype):
    mlp = FusedMLP(6, 8, 4, activation="geglu", device="cpu", dtype=dtype)
    for p in mlp.parameters():
        assert p.dtype == dtype and p.device.type == "cpu"
    x = torch.randn(2, 6).to(dtype)
    y = mlp(x)
    assert y.dtype == dtype
    rd = reference_dtype(dtype)
    params = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    ref = reference_mlp(x.to(rd), *(p.detach().to(rd) for p in params), "geglu")
    assert_close(y, ref, dtype=dtype)


def test_module_meta_device():
    mlp = FusedMLP(6, 8, activation="swiglu", device="meta")
    y = mlp(torch.empty(2, 3, 6, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3, 6)


def test_module_repr():
    r = repr(FusedMLP(6, 8, activation="leaky_relu", negative_slope=0.3, recompute=False))
    assert "leaky_relu" in r and "0.3" in r and "recompute=False" in r and "fc1" in r and "fc2" in r


# ----------------------------------------------------------------------------------------------
# 10. retain_graph, double backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_retain_graph_backward_twice(activation, recompute):
    tensors = [leaf(t) for t in make_mlp_args((2, 3, 8), 6, 5, activation)]
    y = fused_mlp(*tensors, activation=activation, recompute=recompute)
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, tensors, g, retain_graph=True)
    second = torch.autograd.grad(y, tensors, g, retain_graph=True)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    y.backward(g, retain_graph=True)
    y.backward(g)
    for t, a in zip(tensors, first):
        assert_close(t.grad, 2 * a)


@pytest.mark.cpu_only("the one-pass backward is CPU's (csrc/mlp.cpp)")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_recompute_backward_in_one_pass_when_handed_the_pre_activation(activation, dtype):
    # With recompute, a backward that is handed the saved pre-activation (graph not retained) forms
    # the activation's gradient and the hidden activation again in one pass over it, in place,
    # calling neither MLP activation op; a retained graph takes the two-pass path. Both give the
    # same gradients (but one_pass_rounds_bias_gradient's).
    tensors = make_mlp_args((3, 5, 24), 40, 9, activation, dtype)
    g = torch.randn(3, 5, 9).to(dtype)
    recomputes = torch_ext.mlp._recomputes(activation, True)  # (else the output is saved: no pass to save)

    def backward(retain_graph):
        leaves = [leaf(t) for t in tensors]
        y = fused_mlp(*leaves, activation=activation)
        with torch.profiler.profile() as prof:
            y.backward(g, retain_graph=retain_graph)
        names = {e.name for e in prof.events()}
        return [t.grad for t in leaves], bool(names & {"torch_ext::mlp_act_fwd", "torch_ext::mlp_act_bwd"})

    handed, act_ops_handed = backward(retain_graph=False)
    retained, act_ops_retained = backward(retain_graph=True)
    assert not act_ops_handed
    assert act_ops_retained is recomputes
    for name, a, b in zip(NAMES, handed, retained):
        if one_pass_rounds_bias_gradient(activation, dtype, name):
            assert_close(a, b, msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", MLP_ACTIVATIONS)
def test_gradgradcheck(activation, path, recompute):
    # Gradients of gradients (create_graph=True): a backward that records a graph forms the block's
    # gradients with PyTorch's differentiable ops (mlp_bwd_composite), so every second derivative
    # (in each tensor and in grad_output) is PyTorch's. (Before: "does not support double backward".)
    tensors = [leaf(t) for t in _gradcheck_mlp_args((2, 3, 4), 3, 2, activation, True)]
    assert torch.autograd.gradgradcheck(lambda *a: call_mlp(path, *a, activation, SLOPE, recompute), tensors)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck_act_op(activation, gated):
    # The activation op alone (fuse()'s gated MLPs call it): mlp_act_bwd_composite under create_graph.
    x = torch.randn(2, 3, 8 if gated else 5, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x + 0.1, x)  # away from the kink
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.torch_ext.mlp_act_fwd(t, activation, SLOPE, gated),
                                        (leaf(x),))


# Second-order gradients through one first-order gradient w.r.t. the tensors it depends on,
# including those the fused backward never reads (fc1's bias shapes fc2's weight gradient through
# the hidden activation): PyTorch's, not None (allow_unused) or without a term.
SECOND_ORDER_CASES = [
    ("gelu", "fc2_weight", "input"),
    ("gelu", "fc2_weight", "fc1_weight"),
    ("relu", "fc2_weight", "fc1_bias"),
    ("swiglu", "input", "input"),
    ("swiglu", "input", "fc1_weight"),
    ("gelu", "input", "input"),
]


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
@pytest.mark.parametrize(
    "activation,first,second", SECOND_ORDER_CASES, ids=["-".join(c) for c in SECOND_ORDER_CASES]
)
@pytest.mark.parametrize("path", PATHS)
def test_second_order_through_one_gradient(path, activation, first, second, recompute):
    tensors = make_mlp_args((3, 5), 4, 3, activation, torch.float64)
    g = torch.randn(3, 3, dtype=torch.float64)
    results = []
    for fn in (lambda *a: call_mlp(path, *a, activation, SLOPE, recompute),
               lambda *a: reference_mlp(*a, activation, SLOPE)):
        t = [leaf(v) for v in tensors]
        grads = dict(zip(NAMES, torch.autograd.grad(fn(*t), t, leaf(g), create_graph=True)))
        results.append(torch.autograd.grad(grads[first].pow(2).sum(), t[NAMES.index(second)], allow_unused=True)[0])
    assert results[0] is not None
    assert_close(results[0], results[1], msg=f"d(|grad {first}|^2)/d({second})")


# ----------------------------------------------------------------------------------------------
# 11. Argument errors
# ----------------------------------------------------------------------------------------------


def _error_cases():
    x = torch.randn(3, 4)
    w1, b1, w2, b2 = torch.randn(6, 4), torch.randn(6), torch.randn(5, 6), torch.randn(5)
    gw2 = torch.randn(5, 3)
    return {
        "unknown_activation": ((x, w1, b1, w2, b2, "swish"), ValueError, r"activation must be one of .*got 'swish'"),
        "fc1_weight_1d": ((x, torch.randn(4), b1, w2, b2, "gelu"), RuntimeError, r"fc1_weight must be 2-D"),
        "fc1_weight_3d": ((x, torch.randn(1, 6, 4), b1, w2, b2, "gelu"), RuntimeError, r"fc1_weight must be 2-D"),
        "fc2_weight_1d": ((x, w1, b1, torch.randn(6), b2, "gelu"), RuntimeError, r"fc2_weight must be 2-D"),
        "in_features_mismatch": (
            (torch.randn(3, 5), w1, b1, w2, b2, "gelu"), RuntimeError,
            r"input\.size\(-1\) is 5 but fc1_weight\.size\(1\) \(in_features\) is 4",
        ),
        "input_0d": ((torch.tensor(1.0), w1, b1, w2, b2, "gelu"), RuntimeError, r"input must have shape .*0-D"),
        "hidden_mismatch": (
            (x, w1, b1, torch.randn(5, 7), b2, "gelu"), RuntimeError,
            r"fc2_weight\.size\(1\) is 7 but the hidden width \(fc1_weight\.size\(0\)\) is 6",
        ),
        "gated_hidden_not_half": (
            (x, w1, b1, w2, b2, "swiglu"), RuntimeError,
            r"fc2_weight\.size\(1\) is 6 but the hidden width \(half of fc1_weight\.size\(0\).*\) is 3",
        ),
        "gated_odd_fc1": (
            (x, torch.randn(7, 4), torch.randn(7), gw2, b2, "geglu"), RuntimeError,
            r"gated activation \(geglu\) needs fc1_weight of shape \(2 \* hidden, in\), got \(7, 4\)",
        ),
        "fc1_bias_wrong_length": ((x, w1, torch.randn(5), w2, b2, "gelu"), RuntimeError,
            r"fc1_bias must have shape \(6,\)"),
        "fc1_bias_2d": ((x, w1, torch.randn(1, 6), w2, b2, "gelu"), RuntimeError, r"fc1_bias must have shape \(6,\)"),
        "fc2_bias_wrong_length": ((x, w1, b1, w2, torch.randn(6), "relu"), RuntimeError,
            r"fc2_bias must have shape \(5,\)"),
        "fc1_weight_dtype": ((x, w1.double(), b1, w2, b2, "gelu"), RuntimeError,
            r"fc1_weight has dtype torch\.float64 but input"),
        "fc2_weight_dtype": ((x, w1, b1, w2.double(), b2, "gelu"), RuntimeError,
            r"fc2_weight has dtype torch\.float64 but input"),
        "fc2_bias_dtype": ((x, w1, b1, w2, b2.bfloat16(), "gelu"), RuntimeError,
            r"fc2_bias has dtype torch\.bfloat16 but input"),
        "input_dtype": ((x.double(), w1, b1, w2, b2, "gelu"), RuntimeError,
            r"fc1_weight has dtype torch\.float32 but input has dtype torch\.float64"),
        "integer": ((x.long(), w1.long(), b1.long(), w2.long(), b2.long(), "relu"), RuntimeError,
            r"input must be float32, float64, bfloat16"),
    }


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", list(_error_cases()))
def test_bad_arguments(case, requires_grad):
    (x, w1, b1, w2, b2, activation), exc, match = _error_cases()[case]
    if requires_grad and x.is_floating_point():
        x, w1 = leaf(x), leaf(w1)
    with pytest.raises(exc, match=match):
        fused_mlp(x, w1, b1, w2, b2, activation=activation)


def test_module_bad_activation():
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'swish'"):
        FusedMLP(4, 8, activation="swish")


def test_module_wrong_input_width():
    with pytest.raises(RuntimeError, match=r"input\.size\(-1\) is 5 but fc1_weight\.size\(1\) \(in_features\) is 4"):
        FusedMLP(4, 8, activation="swiglu")(torch.randn(2, 5))


def _op_error_cases():
    x = torch.randn(3, 8)
    g = torch.randn(3, 4)
    return {
        "fwd_gated_odd": (lambda: ACT_FWD(torch.randn(3, 7), "silu", 0.0, True), RuntimeError,
                          r"mlp_act_fwd: a gated activation needs an even input\.size\(-1\).*got 7"),
        "bwd_gated_odd": (lambda: ACT_BWD(torch.randn(3, 3), torch.randn(3, 7), "silu", 0.0, True, [True, True]),
                          RuntimeError, r"mlp_act_bwd: a gated activation needs an even input\.size\(-1\).*got 7"),
        "fwd_unknown_activation": (lambda: ACT_FWD(x, "swish", 0.0, False), ValueError,
            r"activation must be one of .*got 'swish'"),
        "bwd_unknown_activation": (lambda: ACT_BWD(g, x, "swiglu", 0.0, True, [True, True]), ValueError,
                                   r"activation must be one of .*got 'swiglu'"),
        "fwd_0d": (lambda: ACT_FWD(torch.tensor(1.0), "gelu", 0.0, False), RuntimeError,
            r"mlp_act_fwd: input must have at least one dimension"),
        "fwd_integer": (lambda: ACT_FWD(x.long(), "relu", 0.0, False), RuntimeError,
            r"mlp_act_fwd: input must be float32, float64, bfloat16"),
        "bwd_grad_wrong_shape": (lambda: ACT_BWD(torch.randn(3, 3), x, "silu", 0.0, True, [True, True]), RuntimeError,
                                 r"mlp_act_bwd: grad_output must have shape \[3, 4\], got \[3, 3\]"),
        "bwd_grad_not_gated_shape": (lambda: ACT_BWD(g, x, "silu", 0.0, False, [True, True]), RuntimeError,
                                     r"mlp_act_bwd: grad_output must have shape \[3, 8\], got \[3, 4\]"),
        "bwd_grad_wrong_shape_mask_none": (lambda: ACT_BWD(torch.randn(4, 4), x, "silu", 0.0, True, [False, False]),
                                           RuntimeError, r"grad_output must have shape \[3, 4\]"),
        "bwd_grad_dtype": (lambda: ACT_BWD(g.double(), x, "silu", 0.0, True, [True, True]), RuntimeError,
                           r"mlp_act_bwd: grad_output has dtype Double but input has dtype Float"),
    }


@pytest.mark.parametrize("case", list(_op_error_cases()))
def test_op_bad_arguments(case):
    fn, exc, match = _op_error_cases()[case]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_eager_autograd_node_saves_what_backward_needs(activation):
    """Eager mode records a C++ node (csrc/autograd_node.h) whose saved tensors go through
    saved-tensor hooks, and whose gradients are PyTorch's."""
    tensors = [leaf(t) for t in make_mlp_args((6, 5), 4, 3, activation)]
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t):
        y = fused_mlp(*tensors, activation=activation)
    assert y.grad_fn.name() == "FusedMLPBackward"
    assert (6, 5) in packed and tuple(tensors[1].shape) in packed and (3, 4) in packed  # input, fc1 and fc2 weights
    g = torch.randn_like(y)
    y.backward(g)
    ref = [leaf(t) for t in tensors]
    reference_mlp(*ref, activation, SLOPE).backward(g)
    for name, t, r in zip(NAMES, tensors, ref):
        assert_close(t.grad, r.grad, msg=name)

