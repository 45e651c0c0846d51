"""Tests of the CPU ops' matrix product (csrc/cpu/runtime/gemm.h) and of torch_ext's float32 GEMM
(csrc/cpu/kernels/gemm.h), called directly through the private torch_ext._C._cpu_matmul_into.

Each test runs on our GEMM (forced with TORCH_EXT_CPU_GEMM=ours: it is the default on AMD CPUs
with AVX-512 only) and on ATen's, against the product in float64: shapes across every edge of the kernel's
blocking, operand layouts (transposed, sliced, expanded), accumulation into an existing result,
a strided result, k = 0 and empty products, thread counts, NaN/inf, the cases that go to ATen
(fewer than 32 rows, other dtypes) and bad arguments. The dense layer's tests
(tests/test_linear_act.py, section 16) run the same GEMM through the ops.
"""
from __future__ import annotations

import math

import pytest
import torch

import torch_ext
from torch_ext._common import cpu_products_in_float32

matmul_into = torch_ext._C._cpu_matmul_into
HAS_OURS = torch_ext.cpu_capability() != "DEFAULT"


@pytest.fixture(params=["ours", "aten"])
def gemm(request, set_config):
    set_config(cpu_gemm=request.param)
    assert torch_ext.cpu_gemm() == (request.param if HAS_OURS else "aten")
    return request.param


def operand(rows, cols, layout, dtype=torch.float32):
    """A (rows, cols) matrix in the given memory layout, values O(1)."""
    if layout == "contiguous":
        return torch.randn(rows, cols, dtype=dtype)
    if layout == "transposed":  # column-major
        return torch.randn(cols, rows, dtype=dtype).t()
    if layout == "sliced":  # every other column of a wider matrix
        return torch.randn(rows, 2 * cols, dtype=dtype)[:, ::2]
    if layout == "expanded":  # one row repeated: row stride 0
        return torch.randn(1, cols, dtype=dtype).expand(rows, cols)
    raise AssertionError(layout)


def check(out, a, b, before=None, msg=""):
    want = a.double() @ b.double()
    if before is not None:
        want = want + before.double()
    k = a.shape[1]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * math.sqrt(max(k, 1)),
                               msg=lambda m: f"{msg}: {m}")


# (m, k, n): row tiles of 12 (AVX-512) / 6 (AVX2) and their tails; 32 rows at least (fewer go
# to ATen); micro-panels of 32 / 16 columns and blocks of 512; k blocks of 256 (64 when
# threads split k); rows 4 KiB apart (A packed); k split (grad_W-like: small m x n, long k).
SHAPES = [
    (32, 1, 1), (33, 7, 33), (37, 300, 31), (48, 257, 65), (61, 513, 100), (40, 64, 1100),
    (250, 1024, 70), (241, 2048, 97), (48, 1500, 64), (300, 40, 300), (245, 256, 515),
]


@pytest.mark.parametrize("b_layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("a_layout", ["contiguous", "transposed", "sliced", "expanded"])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_matches_float64(gemm, m, k, n, a_layout, b_layout):
    torch.manual_seed(m * 7 + k * 3 + n)
    a, b = operand(m, k, a_layout), operand(k, n, b_layout)
    out = torch.full((m, n), float("nan"))  # never read: accumulate is off
    matmul_into(out, a, b, False)
    check(out, a, b, msg=f"{gemm} {m}x{k}x{n} a {a_layout} b {b_layout}")


@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_accumulate(gemm, m, k, n):
    a, b = torch.randn(m, k), torch.randn(n, k).t()
    before = torch.randn(m, n)
    out = before.clone()
    matmul_into(out, a, b, True)
    check(out, a, b, before, msg=f"{gemm} accumulate {m}x{k}x{n}")


def test_strided_out(gemm):
    # out is every row of a wider buffer's left columns: the columns right of it stay untouched.
    a, b = torch.randn(70, 45), torch.randn(45, 38)
    buffer = torch.full((70, 50), 7.0)
    out = buffer[:, :38]
    matmul_into(out, a, b, False)
    check(out, a, b, msg=f"{gemm} strided out")
    assert torch.equal(buffer[:, 38:], torch.full((70, 12), 7.0))


def test_k_zero_and_empty(gemm):
    a, b = torch.randn(40, 0), torch.randn(0, 33)
    out = torch.full((40, 33), float("nan"))
    matmul_into(out, a, b, False)
    assert torch.equal(out, torch.zeros(40, 33))
    out = torch.ones(40, 33)
    matmul_into(out, a, b, True)
    assert torch.equal(out, torch.ones(40, 33))
    for m, n in ((0, 33), (40, 0)):
        out = torch.empty(m, n)
        matmul_into(out, torch.randn(m, 5), torch.randn(5, n), False)
        assert out.shape == (m, n)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_thread_counts(gemm, threads):
    # Rows split (m >= n), columns split (n > m), k split, with fewer and more threads than
    # the machine has and than a split has units.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, k, n in ((300, 40, 24), (40, 64, 300), (48, 1500, 64), (33, 600, 40)):
            a, b = torch.randn(m, k), torch.randn(k, n)
            out = torch.empty(m, n)
            matmul_into(out, a, b, False)
            check(out, a, b, msg=f"{gemm} {threads} threads {m}x{k}x{n}")
    finally:
        torch.set_num_threads(before)


def test_nonfinite(gemm):
    # NaN and inf reach exactly the results they reach in float64 (no padding leaks them).
    a, b = torch.randn(45, 70), torch.randn(70, 40)
    a[3, 7] = float("nan")
    a[10, 2] = float("inf")
    b[5, 33] = float("-inf")
    out = torch.empty(45, 40)
    matmul_into(out, a, b, False)
    want = a.double() @ b.double()
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(out.double()[finite], want[finite], rtol=1e-5, atol=1e-4)


def test_paths_agree(set_config):
    # Ours and ATen's differ only by float32 rounding (another summation order).
    if not HAS_OURS:
        pytest.skip("the DEFAULT instruction set has no GEMM of ours")
    a, b = torch.randn(250, 1024), torch.randn(70, 1024).t()
    results = {}
    for path in ("ours", "aten"):
        set_config(cpu_gemm=path)
        results[path] = torch.empty(250, 70)
        matmul_into(results[path], a, b, False)
    torch.testing.assert_close(results["ours"], results["aten"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "m,dtype", [(31, torch.float32), (1, torch.float32), (64, torch.float64)], ids=["31_rows", "1_row", "float64"],
)
def test_cases_that_go_to_aten(gemm, m, dtype):
    # Fewer than 32 rows, and float64, run ATen's GEMM: its very bits.
    a, b = torch.randn(m, 70).to(dtype), torch.randn(70, 50).to(dtype)
    out = torch.empty(m, 50, dtype=dtype)
    matmul_into(out, a, b, False)
    assert torch.equal(out, torch.mm(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_16_bit_products(gemm, accumulate, dtype):
    # bfloat16 / float16 run ATen's GEMM where that is oneDNN's at full speed (bfloat16: AVX512-BF16;
    # float16: AVX-512 FP16), else (emulated dot products or a reference loop there) the float32
    # product of the values, rounded once: csrc/matmul.h.
    a = torch.randn(64, 70).to(dtype)
    b = torch.randn(50, 70).to(dtype).t()  # a transposed view, as the dense layers pass weights
    start = torch.randn(64, 50).to(dtype)
    out = start.clone()
    matmul_into(out, a, b, accumulate)
    if not cpu_products_in_float32(dtype):
        want = torch.addmm(start, a, b) if accumulate else torch.mm(a, b)
    else:
        want32 = start.float() if accumulate else torch.empty(64, 50)
        matmul_into(want32, a.float(), b.float(), accumulate)
        want = want32.to(dtype)
    assert torch.equal(out, want)
    # Both ways agree to the dtype's rounding with the float64 product.
    exact = (start.double() if accumulate else 0) + a.double() @ b.double()
    torch.testing.assert_close(out.double(), exact, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("mkn", [(600, 1500, 600), (1500, 600, 600), (600, 600, 1500)],
                         ids=["cut-k", "cut-rows", "cut-columns"])
def test_16_bit_products_in_blocks(mkn, accumulate, dtype):
    # Where 16-bit products run in float32 (csrc/matmul.cpp, product_through_float32), the larger
    # operand is widened a block at a time, cut along the largest of m, k and n: at these sizes
    # every cut makes several blocks. Each block is the float32 product rounded once (the k cut
    # sums in float32 in another order), so the result is within one rounding of the whole float32
    # product; ATen's 16-bit GEMM, where it runs instead, too.
    m, k, n = mkn
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, k, generator=gen).to(dtype).t()
    start = torch.randn(m, n, generator=gen).to(dtype)
    out = start.clone()
    matmul_into(out, a, b, accumulate)
    want = torch.addmm(start.float(), a.float(), b.float()) if accumulate else a.float() @ b.float()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(out.float(), want, rtol=ulp, atol=1e-3)
    # Not a block left out or written twice: far from right anywhere shows here.
    assert (out.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("rows_out", [(1500, 600), (300, 1500)], ids=["cut-rows", "cut-columns"])
def test_16_bit_dense_layer_bias_in_blocks(rows_out, dtype):
    # fused_linear's 16-bit forward adds the bias inside the product (addmm_into), block by block
    # where the product runs in float32: each block takes its own slice of the bias.
    rows, out_features = rows_out
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 600, generator=gen).to(dtype)
    w = (torch.randn(out_features, 600, generator=gen) / 600**0.5).to(dtype)
    bias = torch.linspace(-50, 50, out_features).to(dtype)  # a slice in the wrong place shows
    out = torch_ext.fused_linear(x, w, bias, "none")
    want = torch.addmm(bias.float(), x.float(), w.float().t())
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(out.float(), want, rtol=ulp, atol=1e-3)


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="shapes do not multiply"):
        matmul_into(torch.empty(4, 5), torch.randn(4, 3), torch.randn(2, 5), False)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        matmul_into(torch.empty(4, 5), torch.randn(4, 3, 1), torch.randn(3, 5), False)
    with pytest.raises(RuntimeError, match="one dtype"):
        matmul_into(torch.empty(4, 5), torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5), False)
    with pytest.raises(TypeError, match="must be tensors"):
        matmul_into(torch.empty(4, 5), [[1.0]], torch.randn(3, 5), False)


def test_benchmark_script_runs(capsys, set_config):
    # benchmarks/bench_cpu_gemm.py at a small size: one line per product, both GEMMs timed, and
    # the config's cpu_gemm as it was.
    if not HAS_OURS:
        pytest.skip("the DEFAULT instruction set has no GEMM of ours")
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "bench_cpu_gemm.py")
    spec = importlib.util.spec_from_file_location("bench_cpu_gemm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    set_config(cpu_gemm="aten")
    # 512x256x192: large enough that no time prints as 0.00 ms.
    status = module.main(["--sizes", "512x256x192", "--rounds", "2", "--min-ratio", "1e9"])
    assert torch_ext.get_config()["cpu_gemm"] == "aten"
    out = capsys.readouterr().out
    # The regression guard: no GEMM runs 1e9x ATen's speed, so every product is reported.
    assert status == 1 and "REGRESSION: ours below 1000000000.0x ATen's speed at 512x256->192 x @ W.T: " in out
    assert module.main(["--sizes", "256x64x64", "--rounds", "1", "--min-ratio", "0"]) == 0
    lines = [line for line in out.splitlines() if line.startswith("512x256->192")]
    assert [line.split()[1] for line in lines] == ["x", "grad", "grad.T"]
    for line in lines:
        aten_ms, ours_ms, ratio, gflops = (float(v) for v in line.split()[-4:])
        assert aten_ms > 0 and ours_ms > 0 and ratio > 0 and gflops > 0
