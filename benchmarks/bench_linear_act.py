"""Fused dense + activation vs PyTorch eager and torch.compile, forward + backward.

    python benchmarks/bench_linear_act.py                 # the sizes of the project's goals
    python benchmarks/bench_linear_act.py --sizes 4096x512x512 --activations gelu relu

Reports median seconds per fwd+bwd step, speed-up ratios taken within each round, the floor
of the three bare GEMMs (x @ W.T, grad @ W, grad.T @ x) and the bytes saved for backward
beyond the input and weight (which every candidate keeps).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch_ext  # noqa: E402

EAGER_ACT = {
    "none": lambda t: t,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

DEFAULT_CASES = [  # (M, K, N, activation): the goals of the dense issue
    (8192, 256, 256, "gelu_tanh"),
    (8192, 256, 256, "relu"),
    (2048, 1024, 1024, "gelu"),
]


def make_eager(activation):
    act = EAGER_ACT[activation]

    def eager(x, w, b):
        return act(F.linear(x, w, b))

    return eager


def bench_case(m, k, n, activation, dtype, device, rounds, compile_=True):
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, n, device=device, dtype=dtype)
    eager = make_eager(activation)
    fns = {
        "eager": eager,
        "torch_ext": lambda x, w, b: torch_ext.fused_linear(x, w, b, activation),
    }
    if compile_:
        fns["compile"] = torch.compile(eager)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), g)

    candidates = {name: step(fn) for name, fn in fns.items()}
    xd, wd, gd = x.detach(), w.detach(), g
    candidates["3 GEMMs"] = lambda: (xd @ wd.t(), gd @ wd, gd.t() @ xd)
    samples = common.time_interleaved(candidates, device=device, rounds=rounds)
    saved = {
        name: common.saved_bytes(lambda: fns[name](x, w, b), exclude=(x, w, b))
        for name in ("eager", "torch_ext")
    }
    return {
        "case": f"{m}x{k}->{n} {activation}",
        "dtype": str(dtype).replace("torch.", ""),
        "ms": {name: 1e3 * common.median(s) for name, s in samples.items()},
        "spread": {name: common.spread(s) for name, s in samples.items()},
        "vs_eager": common.ratio(samples, "eager", "torch_ext"),
        "vs_compile": common.ratio(samples, "compile", "torch_ext") if compile_ else None,
        "floor_fraction": common.ratio(samples, "3 GEMMs", "torch_ext"),
        "saved_bytes": saved,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", help="MxKxN, e.g. 8192x256x256")
    p.add_argument("--activations", nargs="*", choices=torch_ext.ACTIVATIONS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.sizes or args.activations:
        sizes = [tuple(int(v) for v in s.split("x")) for s in (args.sizes or ["8192x256x256"])]
        cases = [(m, k, n, a) for (m, k, n) in sizes for a in (args.activations or ["gelu"])]
    else:
        cases = DEFAULT_CASES
    print(common.machine_info(args.device))
    header = f"{'case':<28}{'dtype':<10}{'eager ms':>10}{'compile':>10}{'ours':>10}{'3 GEMMs':>10}" \
             f"{'x eager':>9}{'x compile':>10}{'floor/ours':>11}{'saved eager':>13}{'saved ours':>12}"
    print(header)
    for m, k, n, a in cases:
        r = bench_case(m, k, n, a, dtype, args.device, args.rounds, compile_=not args.no_compile)
        ms = r["ms"]
        print(f"{r['case']:<28}{r['dtype']:<10}{ms['eager']:>10.2f}{ms.get('compile', float('nan')):>10.2f}"
              f"{ms['torch_ext']:>10.2f}{ms['3 GEMMs']:>10.2f}{r['vs_eager']:>9.2f}"
              f"{(r['vs_compile'] or float('nan')):>10.2f}{r['floor_fraction']:>11.2f}"
              f"{r['saved_bytes']['eager'] / 2**20:>11.2f}MB{r['saved_bytes']['torch_ext'] / 2**20:>10.2f}MB",
              flush=True)


if __name__ == "__main__":
    main()
