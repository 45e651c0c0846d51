"""Fused losses vs PyTorch eager and torch.compile, forward + backward, fp32 on CPU.

    python benchmarks/bench_losses.py                     # the sizes of the goals of issue 3
    python benchmarks/bench_losses.py --ops cross_entropy mse --rounds 10
    python benchmarks/bench_losses.py --sizes cross_entropy=8192x50257 2048x2048
    python benchmarks/bench_losses.py --save              # also write benchmarks/results/losses_cpu.txt

(benchmarks/run.py runs these with the other op families, forward and backward apart, with peak
memory; it takes its sizes and workloads from SCENARIOS and make_workload here.)

Each op is timed as one training step's loss: forward, then torch.autograd.grad of the loss for
the inputs that require grad (cross_entropy: the logits, with class-index targets; mse, huber,
smooth_l1: the input, not the target; triplet: the anchor only). Candidates: PyTorch eager
(F.*), torch.compile of that same eager function (compiled and warmed before timing) and ours
(torch_ext.*), interleaved in a new random order each round (common.time_interleaved).

Reports per op: median ms per step and its spread (interquartile range / median), speed-ups of
ours taken within each round (common.ratio), the bytes each candidate saves for backward beyond
the inputs (common.saved_bytes), and the memory-bandwidth floor: the bytes a fwd+bwd step must
move (see BYTES_MOVED) divided by the machine's copy bandwidth (common.copy_bandwidth), with
ours as a fraction of it (floor ms / ours ms; 1.00 = at the floor). Once per op, ours' loss and
gradient are checked against eager's at fp32 tolerance.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch_ext  # noqa: E402

DTYPE = torch.float32
RTOL, ATOL = 1e-4, 1e-5  # fp32, as tests/utils.py TOLERANCES
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "losses_cpu.txt")

# op: (default size = the goal of issue 3, eager function, ours)
OPS: Dict[str, Tuple[Tuple[int, int], Callable, Callable]] = {
    "cross_entropy": ((4096, 32000), lambda x, t: F.cross_entropy(x, t), lambda x, t: torch_ext.cross_entropy(x, t)),
    "mse": ((4096, 4096), lambda x, y: F.mse_loss(x, y), lambda x, y: torch_ext.mse_loss(x, y)),
    "huber": ((4096, 4096), lambda x, y: F.huber_loss(x, y), lambda x, y: torch_ext.huber_loss(x, y)),
    "smooth_l1": ((4096, 4096), lambda x, y: F.smooth_l1_loss(x, y), lambda x, y: torch_ext.smooth_l1_loss(x, y)),
    "triplet": (
        (8192, 512),
        lambda a, p, n: F.triplet_margin_loss(a, p, n),
        lambda a, p, n: torch_ext.triplet_margin_loss(a, p, n),
    ),
}


# Representative sizes for benchmarks/run.py: op -> {name: (N, D)} (D: classes for cross_entropy).
SCENARIOS: Dict[str, Dict[str, Tuple[int, int]]] = {
    "cross_entropy": {
        "cnn": (256, 1000),  # ImageNet classifier, batch 256
        "rnn": (2048, 10000),  # RNN language model (PTB/WikiText-2-size vocabulary), 2048 tokens
        "llm": (4096, 32000),  # LLM vocabulary (the goal of issue 3), 4096 tokens
        "quick": (1024, 8000),
        "tiny": (64, 100),
    },
    **{
        op: {
            "cnn": (32, 3 * 224 * 224),  # image reconstruction: a batch of 32 RGB 224x224 images
            "ffn": (4096, 4096),  # regression of Transformer hidden states (the goal of issue 3)
            "quick": (1024, 1024),
            "tiny": (64, 64),
        }
        for op in ("mse", "huber", "smooth_l1")
    },
    "triplet": {
        "cnn": (8192, 512),  # CNN embeddings for metric learning (the goal of issue 3)
        "quick": (2048, 256),
        "tiny": (64, 32),
    },
}
DEFAULT_SCENARIOS = {
    "cross_entropy": ("cnn", "rnn", "llm"),
    "mse": ("ffn",),
    "huber": ("ffn",),
    "smooth_l1": ("ffn",),
    "triplet": ("cnn",),
}


def make_inputs(
    op: str, n: int, d: int, dtype: torch.dtype = DTYPE, device: str = "cpu"
) -> Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]:
    """(all inputs, those that require grad), seeded."""
    torch.manual_seed(0)
    if op == "cross_entropy":
        logits = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
        target = torch.randint(0, d, (n,), dtype=torch.int64, device=device)
        return (logits, target), (logits,)
    if op == "triplet":
        anchor = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
        positive = torch.randn(n, d, dtype=dtype, device=device)
        negative = torch.randn(n, d, dtype=dtype, device=device)
        return (anchor, positive, negative), (anchor,)
    x = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
    y = torch.randn(n, d, dtype=dtype, device=device)  # |x - y| straddles delta = beta = 1: both branches run
    return (x, y), (x,)


def bytes_per_phase(op: str, n: int, d: int, dtype: torch.dtype = DTYPE) -> Dict[str, int]:
    """The least bytes each phase must move on its own ('fwd', 'bwd') and a fused step must move
    ('fwd+bwd' = bytes_moved). Forward: read the inputs once. Backward: read what the gradient
    needs and write it (cross_entropy: the logits and the targets; mse/huber/smooth_l1: input and
    target; triplet: anchor, positive and negative). A step may be cheaper than the sum, since
    the gradient can be formed while the forward has the inputs in cache."""
    e = torch.finfo(dtype).bits // 8
    if op == "cross_entropy":
        fwd = n * d * e + n * 8
        return {"fwd": fwd, "bwd": fwd + n * d * e, "fwd+bwd": bytes_moved(op, n, d, dtype)}
    if op == "triplet":
        fwd = 3 * n * d * e
        return {"fwd": fwd, "bwd": fwd + n * d * e, "fwd+bwd": bytes_moved(op, n, d, dtype)}
    return {"fwd": 2 * n * d * e, "bwd": 3 * n * d * e, "fwd+bwd": bytes_moved(op, n, d, dtype)}


def make_workload(op: str, n: int, d: int, dtype: torch.dtype = DTYPE, device: str = "cpu") -> common.Workload:
    """The loss `op` at N x D as a benchmark case: eager F.* and ours (torch_ext.*), gradients of
    the inputs that require grad, floor = bytes that must move / copy bandwidth."""
    _, eager, ours = OPS[op]
    inputs, requires = make_inputs(op, n, d, dtype, device)
    return common.Workload(
        label=f"{n}x{d}",
        inputs=inputs,
        requires=requires,
        exclude=inputs,
        fns={"eager": eager, "ours": ours},
        floor_bytes=bytes_per_phase(op, n, d, dtype),
    )


def bytes_moved(op: str, n: int, d: int, dtype: torch.dtype = DTYPE) -> int:
    """Bytes a fwd+bwd step must move at the least: every input read once, every gradient written
    once (a kernel that forms the gradient while the forward has the data in cache needs no more).
    cross_entropy: read the logits, write their gradient, read the targets: 2*N*C*4 + N*8
      (ours reads the logits twice, in forward and in backward: 3*N*C*4 moved).
    mse / huber / smooth_l1: read input and target, write grad_input: 3*N*D*4
      (ours: 5*N*D*4, forward and backward each read both).
    triplet: read anchor, positive, negative, write grad_anchor: 4*N*D*4
      (ours forms the gradient in the forward pass: 4*N*D*4).
    (Element size 4 for float32; `dtype` sets it.)"""
    e = torch.finfo(dtype).bits // 8
    if op == "cross_entropy":
        return 2 * n * d * e + n * 8
    if op == "triplet":
        return 4 * n * d * e
    return 3 * n * d * e


NOTES = {
    "triplet": "triplet, ours: in eager mode the gradient is formed in the forward pass and held until "
    "backward (N*D*4 bytes per input that requires grad, here {held}), which saved-tensor hooks do not "
    "count in 'saved ours'.",
}


def check(eager: Callable, ours: Callable, inputs, requires) -> str:
    """'ok', or what differs between ours and eager (loss / gradients) beyond fp32 tolerance."""
    results = []
    for fn in (eager, ours):
        loss = fn(*inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, requires)))
    failed = []
    (loss_e, grads_e), (loss_o, grads_o) = results
    pairs = [("loss", loss_e, loss_o)] + [(f"grad{i}", ge, go) for i, (ge, go) in enumerate(zip(grads_e, grads_o))]
    for what, expected, actual in pairs:
        try:
            torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
        except AssertionError:
            diff = (actual.double() - expected.double()).abs().max().item() if actual.shape == expected.shape else float("nan")
            failed.append(f"{what}(max|d|={diff:.1e})")
    return "ok" if not failed else "FAIL " + ",".join(failed)


def bench_op(op: str, n: int, d: int, rounds: int, bandwidth: float, compile_: bool = True) -> dict:
    _, eager, ours = OPS[op]
    inputs, requires = make_inputs(op, n, d)
    fns = {"eager": eager, "ours": ours}
    if compile_:
        torch._dynamo.reset()  # each op and size compiles afresh, statically for its shapes
        fns["compile"] = torch.compile(eager, dynamic=False)

    def step(fn):
        return lambda: torch.autograd.grad(fn(*inputs), requires)

    candidates = {name: step(fn) for name, fn in fns.items()}
    status = check(eager, ours, inputs, requires)
    if compile_:
        for _ in range(2):  # compile forward and backward, and warm, before any timing
            candidates["compile"]()
    samples = common.time_interleaved(candidates, device="cpu", rounds=rounds)
    saved: Dict[str, Optional[int]] = {}
    for name, fn in fns.items():
        try:
            saved[name] = common.saved_bytes(lambda: fn(*inputs), exclude=inputs)
        except Exception:  # noqa: BLE001 (a candidate that rejects saved-tensor hooks: not measured)
            saved[name] = None
    moved = bytes_moved(op, n, d)
    floor_s = moved / bandwidth
    ours_s = common.median(samples["ours"])
    return {
        "op": op,
        "size": f"{n}x{d}",
        "ms": {name: 1e3 * common.median(s) for name, s in samples.items()},
        "spread": {name: common.spread(s) for name, s in samples.items()},
        "vs_eager": common.ratio(samples, "eager", "ours"),
        "vs_compile": common.ratio(samples, "compile", "ours") if compile_ else None,
        "moved": moved,
        "floor_ms": 1e3 * floor_s,
        "floor_fraction": floor_s / ours_s,
        "saved": saved,
        "check": status,
    }


COLUMNS = [  # (title, width)
    ("op", 15), ("size", 12), ("eager ms", 15), ("compile ms", 15), ("ours ms", 15), ("x eager", 9),
    ("x compile", 10), ("moved MB", 10), ("floor ms", 10), ("floor/ours", 11), ("saved eager", 13),
    ("saved compile", 15), ("saved ours", 12), ("  check", 0),
]


def _cell(text: str, width: int, left: bool = False) -> str:
    return f"{text:<{width}}" if left else f"{text:>{width}}"


def header() -> str:
    return "".join(_cell(t, w, left=i < 2 or w == 0) for i, (t, w) in enumerate(COLUMNS)).rstrip()


def format_row(r: dict) -> str:
    def ms(name):
        if name not in r["ms"]:
            return "n/a"
        return f"{r['ms'][name]:.2f} ±{100 * r['spread'][name]:.0f}%"

    def mb(nbytes):
        if nbytes is None:
            return "n/a"
        return f"{nbytes / 2**20:.2f}MB" if nbytes >= 2**20 or nbytes == 0 else f"{nbytes / 2**10:.2f}KB"

    def x(v):
        return "n/a" if v is None else f"{v:.2f}"

    cells = [
        r["op"], r["size"], ms("eager"), ms("compile"), ms("ours"), x(r["vs_eager"]), x(r["vs_compile"]),
        f"{r['moved'] / 2**20:.0f}", f"{r['floor_ms']:.2f}", f"{r['floor_fraction']:.2f}",
        mb(r["saved"].get("eager")), mb(r["saved"].get("compile")), mb(r["saved"].get("ours")), "  " + r["check"],
    ]
    return "".join(_cell(c, w, left=i < 2 or w == 0) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))


def parse_sizes(specs: Optional[List[str]], ops: List[str]) -> List[Tuple[str, int, int]]:
    """Cases (op, N, D). A spec 'NxD' applies to every selected op, 'op=NxD' to that op only;
    ops no spec names run at their default size."""
    if not specs:
        return [(op, *OPS[op][0]) for op in ops]
    per_op: Dict[str, List[Tuple[int, int]]] = {op: [] for op in ops}
    for spec in specs:
        name, _, dims = spec.rpartition("=")
        try:
            n, d = (int(v) for v in dims.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: expected NxD or op=NxD, got {spec!r}")
        if name and name not in OPS:
            raise SystemExit(f"--sizes: unknown op {name!r} in {spec!r}; ops are {', '.join(OPS)}")
        for op in ops if not name else [name] if name in per_op else []:
            per_op[op].append((n, d))
    return [(op, n, d) for op in ops for (n, d) in (per_op[op] or [OPS[op][0]])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="*", choices=list(OPS), default=list(OPS))
    p.add_argument("--sizes", nargs="*", help="NxD for every op, or op=NxD, e.g. cross_entropy=4096x32000")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    p.add_argument("--save", action="store_true", help=f"also write the table to {os.path.relpath(RESULTS)}")
    args = p.parse_args(argv if argv is not None else sys.argv[1:])
    cases = parse_sizes(args.sizes, args.ops)

    lines: List[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    emit(str(common.machine_info("cpu")))
    bandwidth = common.copy_bandwidth("cpu")
    emit(f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s (read + write, 256 MB buffers); dtype float32; "
         f"{args.rounds} rounds; ms = median per fwd+bwd step ± spread (IQR/median)")
    emit(header())
    failed = []
    for op, n, d in cases:
        r = bench_op(op, n, d, args.rounds, bandwidth, compile_=not args.no_compile)
        emit(format_row(r))
        if r["check"] != "ok":
            failed.append(f"{op} {n}x{d}: {r['check']}")
    for op in dict.fromkeys(op for op, _, _ in cases):
        if op in NOTES:
            n, d = next((n, d) for o, n, d in cases if o == op)
            emit(NOTES[op].format(held=f"{n * d * 4 / 2**20:.0f} MB"))
    if failed:
        emit("ours differs from eager (loss / gradient beyond rtol=1e-4, atol=1e-5): " + "; ".join(failed))
    if args.save:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        command = " ".join(["python", "benchmarks/bench_losses.py"] + [a for a in sys.argv[1:] if a != "--save"])
        with open(RESULTS, "w") as f:
            f.write(f"$ {command}   # {datetime.date.today().isoformat()}\n")
            f.write("\n".join(lines) + "\n")
        print(f"wrote {os.path.relpath(RESULTS)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
