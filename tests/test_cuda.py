"""Every op on every device, against PyTorch's own ops on the same device.

Parametrized over device: "cpu" always runs (so this file's checks are exercised on every
machine), "cuda" is skipped with a reason where no GPU is present. The op-family test files
cover each op in depth, on every device (tests/devices.py); this file adds the cases where a GPU
kernel differs from a CPU one: float16,
non-contiguous inputs, stride-0 gradients, rows > 65535, C > 65536, N x C > 2**31 elements,
determinism, and bad input that must be a Python error rather than a device-side assert.

TORCH_EXT_TEST_DEVICES (default "cpu,cuda"; tests/devices.py) picks the devices of the
device-parametrized tests: scripts/gpu_check.sh sets it to "cuda", so a GPU's time goes to the
CUDA cases only (`-k cuda` would select every test of this file, whose name holds "cuda").
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_ext
from devices import DEVICES, cuda_only, dtypes_for
from utils import act_fn, assert_close


def ref_dtype(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def grads_of(fn, inputs, grad_output=None):
    inputs = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*inputs)
    wrt = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_output if grad_output is not None else torch.ones_like(out))
    return out.detach(), grads


def check_against_reference(ours, reference, inputs, dtype, grad_output=None, **tol):
    """ours(*inputs) vs reference(*inputs upcast to the reference dtype): output and gradients."""
    out, grads = grads_of(ours, inputs, grad_output)
    up = [t.to(ref_dtype(dtype)) if t.is_floating_point() else t for t in inputs]
    go = grad_output.to(ref_dtype(dtype)) if grad_output is not None else None
    ref_out, ref_grads = grads_of(reference, up, go)
    # equal_nan: a mean over only ignored targets is NaN in both
    assert_close(out, ref_out, dtype=dtype, check_dtype=False, equal_nan=True, msg="output", **tol)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype=dtype, check_dtype=False, equal_nan=True, msg=f"gradient {i}", **tol)


# ---- cross_entropy ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 5), (3, 1000), (4, 4096), (2, 5, 3, 3), (5,)])
@pytest.mark.parametrize(
    "options",
    [
        {}, {"label_smoothing": 0.1}, {"reduction": "sum"}, {"reduction": "none"}, {"ignore_index": 1},
        {"weighted": True},
    ],
)
def test_cross_entropy(device, shape, options, grad_in_forward):
    options = dict(options)
    weighted = options.pop("weighted", False)
    classes = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    for dtype in dtypes_for(device):
        x = (torch.randn(shape, device=device) * 3).to(dtype)
        t = torch.randint(0, classes, target_shape, device=device)
        w = torch.rand(classes, device=device).to(dtype) if weighted else None
        check_against_reference(
            lambda x: torch_ext.cross_entropy(x, t, weight=w, **options),
            lambda x: F.cross_entropy(x, t, weight=None if w is None else w.to(x.dtype), **options),
            [x],
            dtype,
        )


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_probabilities_and_z_loss(device, grad_in_forward):
    for dtype in dtypes_for(device):
        x = torch.randn(6, 37, device=device).to(dtype)
        p = torch.softmax(torch.randn(6, 37, device=device), -1).to(dtype)
        check_against_reference(
            lambda x, p: torch_ext.cross_entropy(x, p, label_smoothing=0.2),
            lambda x, p: F.cross_entropy(x, p, label_smoothing=0.2),
            [x, p],
            dtype,
        )
        t = torch.randint(0, 37, (6,), device=device)
        z = 1e-3
        check_against_reference(
            lambda x: torch_ext.cross_entropy(x, t, z_loss=z),
            lambda x: F.cross_entropy(x, t) + z * torch.logsumexp(x.float(), -1).pow(2).mean().to(x.dtype),
            [x],
            dtype,
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 5), (4, 4096), (3, 1030), (2, 5, 3, 3), (5,)])
@pytest.mark.parametrize("prob", [False, True], ids=["class", "prob"])
def test_cross_entropy_softcap_lse_accuracy(device, shape, prob, grad_in_forward):
    """softcap, the lse output (and its gradient, ignored rows included) and accuracy, on every
    layout the CUDA kernels have (rows with and without 16-byte packs, positions)."""
    cd = 0 if len(shape) == 1 else 1
    classes = shape[cd]
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    cap = 2.0
    for dtype in dtypes_for(device):
        x = (torch.randn(shape, device=device) * 3).to(dtype)
        if prob:
            t = torch.softmax(torch.randn(shape, device=device), cd).to(dtype)
        else:
            t = torch.randint(0, classes, target_shape, device=device)
            if t.dim() > 0:
                t.view(-1)[0] = -100
        extras = dict(return_lse=True, return_accuracy=not prob)

        def ours(x, t=t):
            loss, lse, *acc = torch_ext.cross_entropy(x, t, softcap=cap, z_loss=1e-3, label_smoothing=0.1, **extras)
            return loss + 0.3 * lse.float().pow(2).sum()

        def reference(x, t=t):
            xc = cap * torch.tanh(x / cap)
            t = t.to(xc.dtype) if prob else t
            rows = F.cross_entropy(xc, t, label_smoothing=0.1, reduction="none")
            lse = torch.logsumexp(xc, cd)
            kept = torch.ones_like(rows) if prob else (t != -100).to(rows.dtype)
            return (rows + 1e-3 * lse.pow(2) * kept).sum() / kept.sum() + 0.3 * lse.float().pow(2).sum()

        check_against_reference(ours, reference, [x], dtype)
        if not prob:
            acc = torch_ext.cross_entropy(x, t, softcap=cap, return_accuracy=True)[1]
            capped = cap * torch.tanh(x.float() / cap)
            kept = t != -100
            want = ((capped.argmax(cd) == t) & kept).sum() / kept.sum()
            assert_close(acc, want.to(acc.dtype), msg=f"accuracy {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_softcap_lse_accuracy(device, reduction, cublaslt):
    for dtype in dtypes_for(device):
        x = torch.randn(37, 24, device=device).to(dtype)
        w = (torch.randn(301, 24, device=device)).to(dtype)
        t = torch.randint(0, 301, (37,), device=device)
        t[3] = -100
        check_against_reference(
            lambda x, w: torch_ext.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=8, softcap=3.0),
            lambda x, w: F.cross_entropy(3.0 * torch.tanh(F.linear(x, w) / 3.0), t, reduction=reduction),
            [x, w],
            dtype,
        )
        _, lse, acc = torch_ext.linear_cross_entropy(x, w, t, chunk_size=8, softcap=3.0, return_lse=True,
                                                      return_accuracy=True)
        capped = 3.0 * torch.tanh(F.linear(x.float(), w.float()) / 3.0)
        assert_close(lse, torch.logsumexp(capped, -1), dtype=dtype, check_dtype=False, msg=f"lse {dtype}")
        assert not lse.requires_grad and 0.0 <= acc.item() <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_noncontiguous_and_stride0_grad(device, grad_in_forward):
    x = torch.randn(40, 9, device=device).t()  # (9, 40): a transposed view
    t = torch.randint(0, 40, (9,), device=device)
    check_against_reference(lambda x: torch_ext.cross_entropy(x, t), lambda x: F.cross_entropy(x, t), [x],
                            torch.float32)
    g = torch.ones((), device=device).expand(9)  # stride 0
    check_against_reference(
        lambda x: torch_ext.cross_entropy(x, t, reduction="none"),
        lambda x: F.cross_entropy(x, t, reduction="none"),
        [x],
        torch.float32,
        grad_output=g,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_bad_target_is_a_python_error(device):
    x = torch.randn(4, 5, device=device)
    with pytest.raises(IndexError, match="out of bounds"):
        torch_ext.cross_entropy(x, torch.tensor([0, 1, 7, 2], device=device))
    with pytest.raises(IndexError, match="out of bounds"):
        torch_ext.cross_entropy(x, torch.tensor([0, -3, 1, 2], device=device))
    # The device is still usable (no device-side assert poisoned the context).
    assert torch.isfinite(torch_ext.cross_entropy(x, torch.tensor([0, 1, 2, 3], device=device)))


@cuda_only
def test_cross_entropy_cpu_target_for_cuda_input():
    x = torch.randn(4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="target is on cpu but input is on cuda"):
        torch_ext.cross_entropy(x, torch.tensor([0, 1, 2, 3]))


def non_finite_logits(rows_layout, device, dtype):
    """(logits, class targets, probability targets) with every kind of non-finite row that
    F.cross_entropy treats apart. "wide" rows (3000 classes) put the special values 2997 classes
    apart: in different threads' and warps' partial maxima on CUDA (two +inf maxima merged:
    exp(inf - inf)), in different 1024-class blocks on CPU. "spatial": the rows as positions of
    an (8, C, 2) input."""
    inf, nan = float("inf"), float("nan")
    classes = 3000 if rows_layout == "wide" else 5
    p, q = 1, classes - 2
    x = torch.randn(16, classes) * 2
    t = torch.zeros(16, dtype=torch.long)
    x[1, p] = inf                                      # +inf max
    x[2, p] = x[2, q] = inf                            # two +inf maxima
    x[3, p], t[3] = -inf, p                            # target's logit -inf: loss inf
    x[4, p] = -inf                                     # a -inf logit: probability 0
    x[5] = -inf                                        # all -inf
    x[6, q] = nan
    x[7, p], x[7, q], t[7] = inf, -inf, q
    x[8, p], x[8, q], t[8] = inf, nan, p
    x[9], x[9, q], t[9] = -inf, 3.0, q                 # one finite logit
    x[10, p], t[10] = inf, -100                        # ignored rows: loss 0, gradient NaN ...
    x[11, q], t[11] = nan, -100
    x[12], t[12] = -inf, -100
    x[13, p], t[13] = -inf, -100                       # ... or 0
    t[14] = -100
    x[15, p], x[15, q], t[15] = 3e38, -3e38, p         # huge but finite (inf in float16)
    prob = torch.softmax(torch.randn(16, classes), -1)
    prob[4, p] = 0.0                                   # 0 * log(0): NaN in F.cross_entropy
    x, t, prob = x.to(device=device, dtype=dtype), t.to(device), prob.to(device=device, dtype=dtype)
    if rows_layout == "spatial":
        x = x.view(8, 2, classes).transpose(1, 2).contiguous()
        prob = prob.view(8, 2, classes).transpose(1, 2).contiguous()
        t = t.view(8, 2)
    return x, t, prob


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows_layout", ["rows", "wide", "spatial"])
@pytest.mark.parametrize(
    "options",
    [{"reduction": "none"}, {}, {"reduction": "sum"}, {"label_smoothing": 0.1, "reduction": "none"},
     {"weighted": True, "reduction": "none"}, {"weighted": True}, {"probabilities": True, "reduction": "none"},
     {"probabilities": True, "label_smoothing": 0.1}],
)
def test_cross_entropy_non_finite_logits(device, rows_layout, options, grad_in_forward):
    """+inf, -inf and NaN logits give F.cross_entropy's loss and gradient, NaN and inf where it
    has them, on every device and path (ignored rows included)."""
    options = dict(options)
    weighted, probabilities = options.pop("weighted", False), options.pop("probabilities", False)
    for dtype in dtypes_for(device):
        x, t, prob = non_finite_logits(rows_layout, device, dtype)
        w = torch.rand(x.shape[1], device=device).to(dtype) if weighted else None
        if probabilities:
            ours = lambda x, p: torch_ext.cross_entropy(x, p, **options)  # noqa: E731
            ref = lambda x, p: F.cross_entropy(x, p, **options)  # noqa: E731
            check_against_reference(ours, ref, [x, prob], dtype)
        else:
            ours = lambda x: torch_ext.cross_entropy(x, t, weight=w, **options)  # noqa: E731
            ref = lambda x: F.cross_entropy(x, t, weight=None if w is None else w.to(x.dtype), **options)  # noqa: E731
            check_against_reference(ours, ref, [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_deterministic(device, grad_in_forward):
    x = torch.randn(300, 5000, device=device, requires_grad=True)
    t = torch.randint(0, 5000, (300,), device=device)
    runs = []
    for _ in range(2):
        loss = torch_ext.cross_entropy(x, t, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, x)
        runs.append((loss, g))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@cuda_only
@pytest.mark.parametrize("shape", [(70000, 10), (3, 70000), (2, 3, 70000)])
def test_cross_entropy_large_dims_cuda(shape):
    """rows > 65535 (a grid's y/z limit), C > 65536 (more classes than one block's threads)."""
    x = torch.randn(shape, device="cuda")
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), device="cuda")
    check_against_reference(lambda x: torch_ext.cross_entropy(x, t), lambda x: F.cross_entropy(x, t), [x],
                            torch.float32)


@cuda_only
def test_cross_entropy_more_than_2_31_elements_cuda():
    """N x C > 2**31 (int32 offsets would overflow): bfloat16 (4.3 GB of logits)."""
    n, c = 16500, 131072
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, c, (n,), device="cuda")
    loss = torch_ext.cross_entropy(x, t, reduction="none")
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    ref = F.cross_entropy(x[rows].float(), t[rows], reduction="none")
    assert_close(loss[rows], ref, dtype=torch.bfloat16, check_dtype=False)
    # The gradient (formed by the forward kernel for reduction mean) at the same rows, times n:
    # softmax - one_hot(target).
    xg = x.requires_grad_()
    (g,) = torch.autograd.grad(torch_ext.cross_entropy(xg, t), xg)
    want = torch.softmax(x[rows].float(), -1)
    want[torch.arange(3, device="cuda"), t[rows]] -= 1
    torch.testing.assert_close(g[rows].float() * n, want, rtol=2e-2, atol=1e-7)


# ---- regression losses ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["mse", "huber", "smooth_l1"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_regression_losses(device, loss, reduction, grad_in_forward):
    ours = {"mse": torch_ext.mse_loss, "huber": torch_ext.huber_loss, "smooth_l1": torch_ext.smooth_l1_loss}[loss]
    ref = {"mse": F.mse_loss, "huber": F.huber_loss, "smooth_l1": F.smooth_l1_loss}[loss]
    for dtype in dtypes_for(device):
        # float16 holds at most 65504: the (5000, 3) sum of squares of 2*randn - randn is ~76,600,
        # so halved inputs there (~19,000). Every other case stays far below it.
        scale = 0.5 if dtype == torch.float16 else 1.0
        for shape in [(0,), (7,), (33, 17), (2, 3, 5, 7), (5000, 3)]:
            x = (torch.randn(shape, device=device) * 2 * scale).to(dtype)
            y = (torch.randn(shape, device=device) * scale).to(dtype)
            check_against_reference(
                lambda x, y: ours(x, y, reduction=reduction),
                lambda x, y: ref(x, y, reduction=reduction),
                [x, y],
                dtype,
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore:Using a target size")  # broadcasting on purpose
def test_regression_broadcast_and_stride0_grad(device, grad_in_forward):
    x = torch.randn(6, 1, 5, device=device)
    y = torch.randn(4, 5, device=device).t().contiguous().t()  # non-contiguous
    check_against_reference(
        lambda x, y: torch_ext.mse_loss(x, y), lambda x, y: F.mse_loss(x, y), [x, y], torch.float32
    )
    g = torch.ones((), device=device).expand(6, 4, 5)
    check_against_reference(
        lambda x, y: torch_ext.huber_loss(x, y, reduction="none", delta=0.5),
        lambda x, y: F.huber_loss(x, y, reduction="none", delta=0.5),
        [x, y],
        torch.float32,
        grad_output=g,
    )


# ---- triplet ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triplet(device, p, swap, reduction):
    for dtype in dtypes_for(device):
        for shape in [(7,), (9, 31), (300, 128)]:
            a, q, n = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
            check_against_reference(
                lambda a, q, n: torch_ext.triplet_margin_loss(a, q, n, margin=0.5, p=p, swap=swap, reduction=reduction),
                lambda a, q, n: F.triplet_margin_loss(a, q, n, margin=0.5, p=p, swap=swap, reduction=reduction),
                [a, q, n],
                dtype,
            )


# ---- dense + activation, MLP --------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", torch_ext.ACTIVATIONS)
def test_fused_linear(device, activation):
    for dtype in dtypes_for(device):
        for shape, (k, n) in [((5, 16), (16, 12)), ((2, 3, 33), (33, 17)), ((0, 8), (8, 4)), ((8,), (8, 9))]:
            x = torch.randn(shape, device=device).to(dtype)
            w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
            b = torch.randn(n, device=device).to(dtype)
            check_against_reference(
                lambda x, w, b: torch_ext.fused_linear(x, w, b, activation),
                lambda x, w, b: act_fn(activation)(F.linear(x, w, b)),
                [x, w, b],
                dtype,
            )


# On CUDA, none / gelu_tanh (float16, bfloat16; % 8 == 0) take cuBLASLt GEMMs whose epilogues add
# the bias, apply the activation and write the saved pre-activation; relu takes the bias epilogue
# and our pass for relu and its mask (cuBLASLt's RELU_AUX masks x >= 0 and zeroes NaN); the weight
# gradient's GEMM forms the bias gradient (csrc/cuda/linear_act.cu). Each case runs with cuBLASLt
# on and off (set_config(cublaslt=False), as TORCH_EXT_CUBLASLT=0 at import), on shapes that take it.
@pytest.fixture(params=["1", "0"], ids=["cublaslt", "no_cublaslt"])
def cublaslt(request, set_config):
    set_config(cublaslt=request.param == "1")
    return request.param


def grid_values(shape, denominator, device, dtype):
    """Integers in [-2, 2] / denominator."""
    return (torch.randint(-2, 3, shape, device=device) / denominator).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh"])
def test_fused_linear_cublaslt_shapes(device, activation, cublaslt):
    for dtype in dtypes_for(device):
        for shape, (k, n), layout in [
            ((64, 48), (48, 256), "contiguous"),
            ((3, 7, 40), (40, 128), "contiguous"),
            ((1, 24), (24, 384), "contiguous"),
            ((72, 40), (40, 128), "transposed"),   # x.t() of a (40, 72) tensor: column-major
            ((33, 40), (40, 136), "contiguous"),
        ]:
            # Values on a grid that float16/bfloat16 hold exactly, and pre-activations too (k <= 48):
            # no relu mask bit can flip between our rounding and the float32 reference's.
            x = grid_values(shape, 2, device, dtype)
            if layout == "transposed":
                x = x.t().contiguous().t()
            w = grid_values((n, k), 4, device, dtype)
            for b in (grid_values((n,), 8, device, dtype), None):
                inputs = [x, w] + ([b] if b is not None else [])
                check_against_reference(
                    lambda x, w, *b: torch_ext.fused_linear(x, w, b[0] if b else None, activation),
                    lambda x, w, *b: act_fn(activation)(F.linear(x, w, b[0] if b else None)),
                    inputs,
                    dtype,
                )


@pytest.mark.parametrize("device", DEVICES)
def test_relu_mask_layout(device, cublaslt):
    """The saved relu mask is bit j of byte c = (pre-activation of column 8c + j) > 0 (not >= 0:
    ~2-3% of these pre-activations are exactly 0), on every path: after cuBLASLt's bias epilogue
    or ATen's GEMM. Integer-valued inputs make the GEMM exact, so the reference mask is exact
    too, and the backward passes the gradient where the mask says, as F.relu's does."""
    for dtype in dtypes_for(device):
        for m, k, n in [(37, 16, 256), (5, 8, 128), (9, 8, 24)]:
            x = torch.randint(-3, 4, (m, k), device=device).to(dtype)
            w = torch.randint(-3, 4, (n, k), device=device).to(dtype)
            b = torch.randint(-3, 4, (n,), device=device).to(dtype)
            out, mask = torch.ops.torch_ext.linear_act_fwd(x, w, b, "relu", 0.0)
            pre = F.linear(x.double(), w.double(), b.double())
            bits = (pre > 0).to(torch.uint8).view(m, n // 8, 8)
            expected = (bits << torch.arange(8, device=device, dtype=torch.uint8)).sum(-1).to(torch.uint8)
            assert torch.equal(mask, expected), f"{dtype} {(m, k, n)}: mask bits differ"
            assert torch.equal(out.double(), pre.clamp_min(0)), f"{dtype} {(m, k, n)}: output"
            if n == 256:  # 9472 pre-activations: some hundreds of exact zeros
                assert (pre == 0).any(), "the inputs must hold exact zeros, where >= 0 and > 0 differ"
            g = torch.randint(1, 4, (m, n), device=device).to(dtype)
            grad_input = torch.ops.torch_ext.linear_act_bwd(g, x, w, mask, "relu", 0.0, [True, False, False])[0]
            want = (g.double() * (pre > 0)) @ w.double()
            if dtype in (torch.float32, torch.float64):  # integers below 2**24: exact
                assert torch.equal(grad_input.double(), want), f"{dtype} {(m, k, n)}: input gradient"
            else:
                assert_close(grad_input, want, dtype=dtype, check_dtype=False,
                             msg=f"{dtype} {(m, k, n)}: input gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh"])
def test_fused_linear_nan_inf_propagate(device, activation, cublaslt):
    """NaN and inf in the input come out where F.linear + the activation puts them."""
    for dtype in dtypes_for(device):
        x = torch.randn(6, 32, device=device).to(dtype)
        x[1, 3] = float("nan")
        x[4, 0] = float("inf")
        w = torch.randn(128, 32, device=device).to(dtype)
        b = torch.randn(128, device=device).to(dtype)
        ours = torch_ext.fused_linear(x, w, b, activation).float()
        ref = act_fn(activation)(F.linear(x.float(), w.float(), b.float()))
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{dtype}: NaN positions differ"
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), f"{dtype}: inf positions differ"


def test_cublaslt_epilogue_alignment_decision():
    """lt_gemm's decision to leave the epilogue's vectors to cuBLASLt (csrc/cuda/cublaslt_gemm.h):
    only when bias, aux and bias_grad are each absent (0) or 16-byte aligned. The same function
    in every build, so it is tested here on CPU; test_fused_linear_misaligned_bias runs it on CUDA."""
    decide = torch_ext._C._cublaslt_epilogue_aligned
    flat = torch.empty(64, dtype=torch.bfloat16)  # a flat buffer, sliced at every 2-byte offset
    addresses = [flat[i:].data_ptr() for i in range(16)]
    assert any(a % 16 == 0 for a in addresses) and any(a % 16 for a in addresses)
    for a in addresses:
        aligned = a % 16 == 0
        assert decide(a, 0, 0) == aligned, hex(a)
        assert decide(0, a, 0) == aligned, hex(a)
        assert decide(0, 0, a) == aligned, hex(a)
    assert decide(0, 0, 0)
    good = next(a for a in addresses if a % 16 == 0)
    bad = next(a for a in addresses if a % 16)
    assert decide(good, good, good) and not decide(good, bad, good) and not decide(good, good, bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh"])
def test_fused_linear_misaligned_bias(device, activation, cublaslt):
    """A bias sliced at an odd offset of a flat parameter buffer is not 16-byte aligned: cuBLASLt's
    epilogue must not read it (that can fault and poison the CUDA context); the unfused path
    gives F.linear's results, and the device stays usable."""
    for dtype in dtypes_for(device):
        k, n = 48, 256
        flat = grid_values((n + 1,), 8, device, dtype)
        b = flat[1:]
        assert b.data_ptr() % 16 != 0
        x = grid_values((64, k), 2, device, dtype)
        w = grid_values((n, k), 4, device, dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*cuBLASLt declined")  # once per process: not asserted
            check_against_reference(
                lambda x, w, b: torch_ext.fused_linear(x, w, b, activation),
                lambda x, w, b: act_fn(activation)(F.linear(x, w, b)),
                [x, w, b],
                dtype,
            )
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu_tanh"])
def test_fused_linear_single_row_or_column(device, activation, cublaslt):
    """in_features = 1, out_features = 1 and one row: operands of a single row or column, for which
    cuBLASLt's heuristic may answer INVALID_VALUE rather than NOT_SUPPORTED; either way the op
    takes its unfused path (a warning at most) and matches F.linear, gradients included."""
    for dtype in dtypes_for(device):
        for shape, (k, n) in [((64, 1), (1, 256)), ((64, 48), (48, 1)), ((64, 48), (48, 8)), ((1, 48), (48, 256)),
                              ((64, 1), (1, 1)), ((1, 1), (1, 8))]:
            x = grid_values(shape, 2, device, dtype)
            w = grid_values((n, k), 4, device, dtype)
            b = grid_values((n,), 8, device, dtype)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*cuBLASLt declined")
                check_against_reference(
                    lambda x, w, b: torch_ext.fused_linear(x, w, b, activation),
                    lambda x, w, b: act_fn(activation)(F.linear(x, w, b)),
                    [x, w, b],
                    dtype,
                )


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_backward_deterministic(device, cublaslt):
    x = torch.randn(4099, 64, device=device, requires_grad=True)
    w = torch.randn(256, 64, device=device, requires_grad=True)
    b = torch.randn(256, device=device, requires_grad=True)
    g = torch.randn(4099, 256, device=device)
    grads = [torch.autograd.grad(torch_ext.fused_linear(x, w, b, "relu"), (x, w, b), g) for _ in range(2)]
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu", "geglu"])
def test_fused_mlp(device, activation):
    gate = torch_ext.GATED_ACTIVATIONS.get(activation)
    act = act_fn(gate or activation)

    def reference(x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        if gate:
            u, v = h.chunk(2, -1)
            h = act(u) * v
        else:
            h = act(h)
        return F.linear(h, w2, b2)

    for dtype in dtypes_for(device):
        h1 = 2 * 24 if gate else 24
        x = torch.randn(3, 5, 16, device=device).to(dtype)
        w1 = (torch.randn(h1, 16, device=device) / 4).to(dtype)
        b1 = torch.randn(h1, device=device).to(dtype)
        w2 = (torch.randn(16, 24, device=device) / 5).to(dtype)
        b2 = torch.randn(16, device=device).to(dtype)
        check_against_reference(
            lambda *t: torch_ext.fused_mlp(*t, activation=activation), reference, [x, w1, b1, w2, b2], dtype
        )


# ---- linear + cross-entropy ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy(device, reduction, cublaslt):
    # CUDA, float16/bfloat16: cuBLASLt sums the chunks' weight gradients in float32.
    for dtype in dtypes_for(device):
        x = torch.randn(37, 24, device=device).to(dtype)
        w = (torch.randn(301, 24, device=device) / 5).to(dtype)
        t = torch.randint(0, 301, (37,), device=device)
        t[3] = -100
        check_against_reference(
            lambda x, w: torch_ext.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=8),
            lambda x, w: F.cross_entropy(F.linear(x, w), t, reduction=reduction),
            [x, w],
            dtype,
        )


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_hidden_or_vocab_1(device, cublaslt):
    """H = 1 or V = 1: the float32-accumulated weight-gradient GEMM (cuBLASLt on CUDA, for
    float16/bfloat16) has an operand of a single column; it falls back rather than throwing."""
    for dtype in dtypes_for(device):
        for hidden, vocab in [(1, 301), (24, 1)]:
            x = torch.randn(37, hidden, device=device).to(dtype)
            w = (torch.randn(vocab, hidden, device=device) / 5).to(dtype)
            t = torch.randint(0, vocab, (37,), device=device)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*cuBLASLt declined")
                check_against_reference(
                    lambda x, w: torch_ext.linear_cross_entropy(x, w, t, chunk_size=8),
                    lambda x, w: F.cross_entropy(F.linear(x, w), t),
                    [x, w],
                    dtype,
                )


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_bad_target_is_a_python_error(device):
    x = torch.randn(20, 8, device=device)
    w = torch.randn(11, 8, device=device)
    t = torch.randint(0, 11, (20,), device=device)
    t[13] = 11  # in the second chunk
    with pytest.raises(IndexError, match="^torch_ext.linear_cross_entropy: target 11 is out of bounds"):
        torch_ext.linear_cross_entropy(x, w, t, chunk_size=8)
    with pytest.raises(IndexError, match="^torch_ext.linear_cross_entropy: target 11 is out of bounds"):
        torch_ext.linear_cross_entropy(x, w, t.to(torch.uint8), chunk_size=8)
    t[13] = -100
    assert torch.isfinite(torch_ext.linear_cross_entropy(x, w, t, chunk_size=8))


def _syncs(fn):
    """How many host synchronizations fn() makes on CUDA (torch.cuda.set_sync_debug_mode), once
    warmed up (a first call may create library handles and workspaces)."""
    fn()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing" in str(w.message) for w in caught)


@cuda_only
def test_host_synchronizations_cuda():
    """One host synchronization where targets enter (the class-index check of the forward ops;
    for linear_cross_entropy once, whatever the number of chunks), none in the backward ops:
    they would stall the CPU's queueing of kernels and break CUDA-graph capture."""
    ops = torch.ops.torch_ext
    x = torch.randn(64, 50, device="cuda")
    t = torch.randint(0, 50, (64,), device="cuda")
    t[3] = -100
    w = torch.rand(50, device="cuda")
    torch.cuda.synchronize()
    for weight in (None, w):
        assert _syncs(lambda: ops.cross_entropy_fwd(x, t, weight, -100, "mean", 0.1, 0.0, [False, False])) == 1
        assert _syncs(lambda: ops.cross_entropy_fwd(x, t, weight, -100, "mean", 0.1, 0.0, [True, False])) == 1
        _, stats, *_ = ops.cross_entropy_fwd(x, t, weight, -100, "mean", 0.1, 0.0, [False, False])
        g = torch.ones((), device="cuda")
        assert _syncs(lambda: ops.cross_entropy_bwd(g, x, t, weight, stats, -100, "mean", 0.1, 0.0, [True, False])) == 0
        assert _syncs(
            lambda: ops.cross_entropy_bwd_inplace(g, x.clone(), t, weight, stats, -100, "mean", 0.1, 0.0)
        ) == 0
    h = torch.randn(64, 16, device="cuda")
    lw = torch.randn(50, 16, device="cuda")
    for reduction in ("mean", "sum", "none"):
        mask = [True, True, False] if reduction != "none" else [False, False, False]
        assert _syncs(lambda: ops.linear_cross_entropy_fwd(h, lw, None, t, w, -100, reduction, 0.0, 0.0, 8, mask)) == 1
        g = torch.ones((64,) if reduction == "none" else (), device="cuda")
        assert _syncs(
            lambda: ops.linear_cross_entropy_bwd(g, h, lw, None, t, w, -100, reduction, 0.0, 0.0, 8,
                                                 [True, True, False])
        ) == 0


@cuda_only
def test_cross_entropy_backward_unchecked_bad_target_is_nan_cuda():
    """The backward ops do not check targets (their forward did): a bad index handed to one
    directly gives its row NaN instead of a read out of bounds; the device stays usable."""
    x = torch.randn(4, 5, device="cuda")
    good = torch.tensor([0, 1, 2, 3], device="cuda")
    w = torch.rand(5, device="cuda")
    for weight in (None, w):
        _, stats, *_ = torch.ops.torch_ext.cross_entropy_fwd(x, good, weight, -100, "sum", 0.0, 0.0, [False, False])
        bad = torch.tensor([0, 1, 7, 3], device="cuda")
        g = torch.ops.torch_ext.cross_entropy_bwd(torch.ones((), device="cuda"), x, bad, weight, stats, -100, "sum",
                                                  0.0, 0.0, [True, False])[0]
        assert torch.isnan(g[2]).all() and torch.isfinite(g[[0, 1, 3]]).all()
    torch.cuda.synchronize()


# ---- registration -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    x = torch.randn(6, 10, device=device, requires_grad=True)
    w = torch.randn(7, 10, device=device, requires_grad=True)
    b = torch.randn(7, device=device, requires_grad=True)
    t = torch.randint(0, 10, (6,), device=device)
    ops = torch.ops.torch_ext
    samples = [
        (ops.linear_act_fwd.default, (x, w, b, "gelu", 0.01)),
        (ops.mlp_act_fwd.default, (torch.randn(6, 8, device=device, requires_grad=True), "silu", 0.01, True)),
        (ops.cross_entropy_fwd.default, (x, t, None, -100, "mean", 0.1, 0.0, [False, False])),
        (ops.cross_entropy_fwd.default, (x, t, None, -100, "mean", 0.1, 1e-3, [True, False])),
        (ops.cross_entropy_fwd.default, (x, t, None, -100, "mean", 0.1, 1e-3, [False, False], 5.0, True)),
        (ops.cross_entropy_fwd.default, (x, t, None, -100, "sum", 0.0, 0.0, [True, False], 5.0, True)),
        (ops.cross_entropy_fwd.default, (x, torch.softmax(torch.randn(6, 10, device=device), -1).requires_grad_(),
                                         None, -100, "mean", 0.1, 0.0, [True, True])),
        (ops.regression_loss_fwd.default,
         (x, torch.randn(6, 10, device=device), None, "huber", 1.0, "mean", [False, False])),
        (ops.regression_loss_fwd.default,
         (x, torch.randn(6, 10, device=device), torch.rand(6, 10, device=device), "mse", 0.0, "mean", [True, True])),
        (ops.triplet_margin_loss_fwd.default, (x, torch.randn(6, 10, device=device), torch.randn(6, 10, device=device),
                                               1.0, 2.0, 1e-6, False, "mean", [False, False, False])),
        (ops.triplet_margin_loss_fwd.default, (x, torch.randn(6, 10, device=device), torch.randn(6, 10, device=device),
                                               1.0, 2.0, 1e-6, False, "none", [True, False, True])),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)
