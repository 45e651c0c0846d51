"""torch_ext's CPU output cache (csrc/cpu/runtime/allocator.h) against the allocators a user could pick
instead: glibc (PyTorch's default), PyTorch's THP_MEM_ALLOC_ENABLE=1, and jemalloc / tcmalloc
through LD_PRELOAD (Debian: libjemalloc2, libtcmalloc-minimal4).

    python benchmarks/bench_allocator.py                       # cross_entropy 512x32000, 100 steps
    python benchmarks/bench_allocator.py --shape 4096x32000 --steps 10000 --rounds 1
    python benchmarks/bench_allocator.py --steps 10000 --rounds 1 --configs ours   # ours only

Each configuration runs in its own process (an allocator is chosen per process): `--steps`
training steps of cross_entropy (forward + backward) after 20 warm-up steps, in the rounds'
random order (`--rounds`, each configuration once per round). Reports per configuration the
median over rounds of its median step time, the ratio to PyTorch's default (glibc), and the peak
RSS the process reached (its high-water mark, from getrusage) and its RSS after the last step.
A configuration whose library is missing is reported as such, not skipped silently.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

LIBS = {"jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}

# name -> (candidate, environment)
CONFIGS = {
    "eager, glibc": ("eager", {}),
    "eager, THP_MEM_ALLOC_ENABLE=1": ("eager", {"THP_MEM_ALLOC_ENABLE": "1"}),
    "eager, jemalloc": ("eager", {"LD_PRELOAD": LIBS["jemalloc"]}),
    "eager, tcmalloc": ("eager", {"LD_PRELOAD": LIBS["tcmalloc"]}),
    "ours, its cache (default)": ("ours", {}),
    "ours, cache off, glibc": ("ours", {"TORCH_EXT_CPU_CACHE_BYTES": "0"}),
    "ours, cache off, THP_MEM_ALLOC_ENABLE=1": ("ours", {"TORCH_EXT_CPU_CACHE_BYTES": "0",
                                                         "THP_MEM_ALLOC_ENABLE": "1"}),
    "ours, cache off, jemalloc": ("ours", {"TORCH_EXT_CPU_CACHE_BYTES": "0", "LD_PRELOAD": LIBS["jemalloc"]}),
    "ours, cache off, tcmalloc": ("ours", {"TORCH_EXT_CPU_CACHE_BYTES": "0", "LD_PRELOAD": LIBS["tcmalloc"]}),
}

WORKER = r"""
import json, resource, sys, time
import torch, torch.nn.functional as F
import torch_ext
rows, classes, steps, candidate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
loss_fn = torch_ext.cross_entropy if candidate == "ours" else F.cross_entropy
x = torch.randn(rows, classes, requires_grad=True)
t = torch.randint(classes, (rows,))
times = []
for i in range(20 + steps):
    t0 = time.perf_counter()
    loss_fn(x, t).backward()
    x.grad = None
    if i >= 20:
        times.append(time.perf_counter() - t0)
times.sort()
rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"ms": 1e3 * times[len(times) // 2], "peak_mb": peak, "end_mb": rss / 2**20}))
"""


def run_config(name, rows, classes, steps):
    candidate, extra = CONFIGS[name]
    lib = extra.get("LD_PRELOAD")
    if lib and not os.path.exists(lib):
        return {"missing": lib}
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "TORCH_EXT_CPU_CACHE_BYTES",
                                                           "LD_PRELOAD")}
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", WORKER, str(rows), str(classes), str(steps), candidate], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def shape(text: str):
    try:
        rows, classes = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCLASSES, e.g. 512x32000, got {text!r}") from None
    if rows < 1 or classes < 1:
        raise argparse.ArgumentTypeError(f"rows and classes must be at least 1, got {text!r}")
    return rows, classes


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=shape, default=(512, 32000),
                        help="rows x classes of the cross-entropy (default 512x32000)")
    parser.add_argument("--steps", type=positive, default=100, help="timed training steps per process (default 100)")
    parser.add_argument("--rounds", type=positive, default=3, help="processes per configuration (default 3)")
    parser.add_argument("--configs", default="", metavar="TEXT",
                        help="only the configurations whose name contains TEXT (e.g. 'ours'; default: all)")
    args = parser.parse_args(argv)
    rows, classes = args.shape
    names = [name for name in CONFIGS if args.configs in name]
    if not names:
        parser.error(f"--configs {args.configs!r} matches none of: {', '.join(CONFIGS)}")
    results = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in random.sample(names, len(names)):
            results[name].append(run_config(name, rows, classes, args.steps))
    # The ratio's base: eager under glibc when it ran, else the first configuration that ran.
    base_name = next((n for n in ["eager, glibc", *names] if n in results and "ms" in results[n][0]), None)
    base = statistics.median(r["ms"] for r in results[base_name]) if base_name else float("nan")
    print(f"cross_entropy {rows}x{classes} float32, forward + backward, {args.steps} steps x {args.rounds} rounds, "
          f"{os.cpu_count()} cores")
    print(f"| configuration | step ms | x {base_name} | peak RSS MB | RSS at end MB |\n|---|---|---|---|---|")
    for name, runs in results.items():
        if "missing" in runs[0]:
            print(f"| {name} | missing: {runs[0]['missing']} | | | |")
            continue
        ms = statistics.median(r["ms"] for r in runs)
        peak = max(r["peak_mb"] for r in runs)
        end = max(r["end_mb"] for r in runs)
        print(f"| {name} | {ms:.2f} | {base / ms:.2f} | {peak:.0f} | {end:.0f} |")


if __name__ == "__main__":
    main()
