"""Fused dense + activation vs PyTorch eager and torch.compile, forward + backward.

    python benchmarks/bench_linear_act.py                 # the sizes of the project's goals
    python benchmarks/bench_linear_act.py --sizes 4096x512x512 --activations gelu relu

(benchmarks/run.py runs this family with the others, forward and backward apart, with memory;
it takes its sizes and workload from SCENARIOS and make_workload here.)

Reports median seconds per fwd+bwd step, speed-up ratios taken within each round, the floor
of the three bare GEMMs (x @ W.T, grad @ W, grad.T @ x, on ATen's GEMM) and the bytes saved
for backward beyond the input and weight (which every candidate keeps). On AMD CPUs float32
runs ours on torch_ext's own GEMM (torch_ext.cpu_gemm() == "ours"), faster than ATen's where
measured, so 'floor/ours' can pass 1; TORCH_EXT_CPU_GEMM=aten compares like with like.
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

# Representative sizes for benchmarks/run.py: name -> (M, K, N, activation).
SCENARIOS = {
    "cnn": (256, 2048, 1024, "relu"),  # CNN classifier head: pooled ResNet-50 features -> hidden, batch 256
    "rnn": (2048, 1024, 1024, "tanh"),  # RNN-style projection, 2048 tokens
    "ffn": (8192, 256, 256, "gelu_tanh"),  # Transformer FFN layer (the dense issue's goal), 8192 tokens
    "quick": (1024, 256, 256, "gelu_tanh"),
    "tiny": (64, 32, 48, "relu"),
}
DEFAULT_SCENARIOS = ("cnn", "ffn")


def make_eager(activation):
    act = EAGER_ACT[activation]

    def eager(x, w, b):
        return act(F.linear(x, w, b))

    return eager


def make_workload(m, k, n, activation, dtype=torch.float32, device="cpu") -> common.Workload:
    """act(x @ W.T + b) for x (M, K), W (N, K), b (N,), backward from a random (M, N) gradient.
    Floor: the three bare GEMMs (x @ W.T forward; grad @ W and grad.T @ x backward)."""
    if activation not in EAGER_ACT:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(EAGER_ACT)}")
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, n, device=device, dtype=dtype)
    xd, wd = x.detach(), w.detach()
    return common.Workload(
        label=f"{m}x{k}->{n} {activation}",
        inputs=(x, w, b),
        requires=(x, w, b),
        grad_output=g,
        exclude=(x, w, b),
        fns={
            "eager": make_eager(activation),
            "ours": lambda x, w, b: torch_ext.fused_linear(x, w, b, activation),
        },
        floor_fns=(lambda: xd @ wd.t(), lambda _: (g @ wd, g.t() @ xd)),
        floor_flops={"fwd": 2 * m * k * n, "bwd": 4 * m * k * n, "fwd+bwd": 6 * m * k * n},
    )


def bench_case(m, k, n, activation, dtype, device, rounds, compile_=True):
    wl = make_workload(m, k, n, activation, dtype, device)
    x, w, b = wl.inputs
    fns = dict(wl.fns)
    if compile_:
        fns["compile"] = torch.compile(fns["eager"])
    candidates = {name: (lambda fn=fn: wl.step(fn)) for name, fn in fns.items()}
    floor_fwd, floor_bwd = wl.floor_fns
    candidates["3 GEMMs"] = lambda: floor_bwd(floor_fwd())
    samples = common.time_interleaved(candidates, device=device, rounds=rounds)
    saved = {
        name: common.saved_bytes(lambda: fns[name](x, w, b), exclude=(x, w, b))
        for name in ("eager", "ours")
    }
    return {
        "case": wl.label,
        "dtype": str(dtype).replace("torch.", ""),
        "ms": {name: 1e3 * common.median(s) for name, s in samples.items()},
        "spread": {name: common.spread(s) for name, s in samples.items()},
        "vs_eager": common.ratio(samples, "eager", "ours"),
        "vs_compile": common.ratio(samples, "compile", "ours") if compile_ else None,
        "floor_fraction": common.ratio(samples, "3 GEMMs", "ours"),
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
              f"{ms['ours']:>10.2f}{ms['3 GEMMs']:>10.2f}{r['vs_eager']:>9.2f}"
              f"{(r['vs_compile'] or float('nan')):>10.2f}{r['floor_fraction']:>11.2f}"
              f"{r['saved_bytes']['eager'] / 2**20:>11.2f}MB{r['saved_bytes']['ours'] / 2**20:>10.2f}MB",
              flush=True)


if __name__ == "__main__":
    main()
