"""torch_ext's float32 CPU GEMM (csrc/cpu/kernels/gemm.h) against ATen's, at the dense layer's shapes.

    python benchmarks/bench_cpu_gemm.py                  # the shapes of benchmarks/run.py's dense cases
    python benchmarks/bench_cpu_gemm.py --sizes 4096x512x2048 --rounds 15

Each size M x K -> N is a dense layer's three products: forward x @ W.T (M x N), grad_input
grad @ W (M x K) and grad_weight grad.T @ x (N x K), with the operands in the layouts the layer
passes them. Both GEMMs write into the same preallocated result through the private
torch_ext._C._cpu_matmul_into (the CPU ops' matrix product), switched with torch_ext.set_config;
they run interleaved, in a new random order each round (suite/timing.py). Reports the
median ms of each, ATen's time / ours (the median of the per-round ratios; > 1: ours is
faster) and ours' GFLOP/s.

A guard: a product where ours runs below --min-ratio of ATen's speed (default 0.8; ours measured
0.93-1.16x on AVX2, 1.0-1.2x on AVX-512) is reported as a regression and the exit status is 1.
A change that stops GCC inlining the micro-kernel halves its speed, and shows here.

--peers adds the GEMMs a user could pick instead, timed in the same interleaved rounds: oneDNN's
(torch.ops.mkldnn._linear_pointwise, shipped with PyTorch; its weight made contiguous once,
outside the timing) and OpenBLAS's (numpy.matmul into the same result, on numpy's own
OpenBLAS), each as its time / ours.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_ext  # noqa: E402
from suite import machine, timing  # noqa: E402

DEFAULT_SIZES = [  # M x K -> N: the dense, MLP and linear_cross_entropy shapes of benchmarks/run.py
    (8192, 256, 256), (256, 2048, 1024), (2048, 1024, 1024), (4096, 256, 1024), (4096, 1024, 256),
    (2048, 512, 1376), (2048, 1376, 512), (512, 512, 32000),
]


def products(m, k, n):
    """name -> (out, a, b) for a layer M x K -> N."""
    x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    return {
        "x @ W.T": (torch.empty(m, n), x, w.t()),
        "grad @ W": (torch.empty(m, k), g, w),
        "grad.T @ x": (torch.empty(n, k), g.t(), x),
    }


def run_gemm(path, out, a, b):
    # The C++ setter itself (it checks the value): set_config's argument checks and config
    # snapshot would run inside every timed call.
    torch_ext._C._set_config({"cpu_gemm": path})
    torch_ext._C._cpu_matmul_into(out, a, b, False)


def peer_calls(out, a, b):
    """name -> a call of each peer GEMM forming out = a @ b (see --peers), where it is installed."""
    calls = {}
    if torch.backends.mkldnn.is_available():
        weight = b.t().contiguous()  # linear(a, weight) = a @ weight.T = a @ b
        calls["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")
    try:
        import numpy
    except ImportError:
        return calls
    a_np, b_np, out_np = a.numpy(), b.numpy(), out.numpy()
    calls["OpenBLAS"] = lambda: numpy.matmul(a_np, b_np, out=out_np)
    return calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", help="MxKxN layer sizes (default: the dense shapes of run.py)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--min-ratio", type=float, default=0.8,
                   help="report a regression (exit status 1) where ATen's time / ours falls below this")
    p.add_argument("--peers", action="store_true", help="also time oneDNN's and OpenBLAS's GEMMs (see above)")
    args = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes] if args.sizes else DEFAULT_SIZES
    if torch_ext.cpu_capability() == "DEFAULT":
        sys.exit("this CPU runs the DEFAULT instruction set, which has no GEMM of ours")
    print(machine.machine_info())
    peer_names = list(peer_calls(*products(32, 8, 8)["x @ W.T"])) if args.peers else []
    print(f"{'layer':<20}{'product':<13}{'ATen ms':>9}{'ours ms':>9}{'ATen/ours':>11}{'ours GFLOP/s':>14}"
          + "".join(f"{name + '/ours':>15}" for name in peer_names))
    saved = torch_ext.get_config()["cpu_gemm"]
    slow = []
    try:
        for m, k, n in sizes:
            for name, (out, a, b) in products(m, k, n).items():
                candidates = {path: functools.partial(run_gemm, path, out, a, b) for path in ("aten", "ours")}
                if peer_names:
                    candidates.update(peer_calls(out, a, b))
                samples = timing.time_interleaved(candidates, rounds=args.rounds)
                ours = timing.median(samples["ours"])
                flop = 2 * out.shape[0] * out.shape[1] * a.shape[1]
                aten = timing.median(samples["aten"])
                ratio = timing.ratio_of(samples["aten"], samples["ours"])
                peers = "".join(f"{timing.ratio_of(samples[p], samples['ours']):>15.2f}" for p in peer_names)
                print(f"{f'{m}x{k}->{n}':<20}{name:<13}{aten * 1e3:>9.2f}{ours * 1e3:>9.2f}"
                      f"{ratio:>11.2f}{flop / ours / 1e9:>14.0f}{peers}", flush=True)
                if ratio < args.min_ratio:
                    slow.append(f"{m}x{k}->{n} {name}: {ratio:.2f}x")
    finally:
        torch_ext.set_config(cpu_gemm=saved)
    if slow:
        print(f"REGRESSION: ours below {args.min_ratio}x ATen's speed at " + "; ".join(slow))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
