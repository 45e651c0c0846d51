#!/usr/bin/env python
"""Vocab-parallel linear + cross-entropy: one training step's loss of an LM head
(4096 tokens, hidden 512, vocabulary 32000, float32 by default) with the vocabulary sharded over
--world CPU processes (gloo), against the same loss unsharded in one process and against
PyTorch's own tensor-parallel loss (torch.distributed.tensor.parallel.loss_parallel on DTensor
logits sharded on the class dim, which materializes each rank's logits).

    python benchmarks/bench_vocab_parallel.py
    python benchmarks/bench_vocab_parallel.py --world 2 --tokens 2048 --steps 3

Each candidate runs in its own fresh processes (spawned), THP_MEM_ALLOC_ENABLE=1 as in the suite.
Time: median of --steps forward+backward steps after one warm-up (rank 0's clock; the ranks wait on
each other in every collective). Peak: peak RSS of one step minus RSS before it, per rank
(benchmarks/suite/memory.py's method), the largest over ranks. The processes share this machine's
cores: each rank gets cores / world threads, the unsharded process all of them. Results:
benchmarks/results/vocab_parallel_cpu.{txt,json}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from suite import thp  # noqa: E402  (no torch import: the knob must be set before it)

CANDIDATES = ("unsharded", "ours", "loss_parallel")
LABELS = {
    "unsharded": "torch_ext.linear_cross_entropy, one process, whole vocabulary",
    "ours": "torch_ext.linear_cross_entropy(process_group=...), vocabulary sharded",
    "loss_parallel": "PyTorch loss_parallel: F.cross_entropy on DTensor logits sharded on the class dim",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(args, torch):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(dtype)
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(dtype)
    t = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    return x, w, t


def _rank(rank: int, world: int, port: int, candidate: str, args, out_path: str) -> None:
    thp.apply("on")
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import torch_ext
    from suite.memory import step_peak

    threads = max(1, (os.cpu_count() or 1) // (world if candidate != "unsharded" else 1))
    torch.set_num_threads(threads)
    if candidate != "unsharded":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    x, w_full, t = _inputs(args, torch)
    if candidate == "unsharded":
        w = w_full.clone().requires_grad_()
    else:
        w = w_full.chunk(world)[rank].clone().requires_grad_()  # DTensor's Shard(0) layout (torch.chunk)
    del w_full
    x.requires_grad_()

    if candidate == "loss_parallel":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.parallel import loss_parallel

        mesh = init_device_mesh("cpu", (world,))

        def step():
            local = F.linear(x, w)
            logits = DTensor.from_local(local, mesh, [Shard(1)], shape=(args.tokens, args.vocab),
                                        stride=(args.vocab, 1))
            with loss_parallel():
                loss = F.cross_entropy(logits, t)
                loss.backward()
            return loss
    else:
        group = dist.group.WORLD if candidate == "ours" else None

        def step():
            loss = torch_ext.linear_cross_entropy(x, w, t, process_group=group)
            loss.backward()
            return loss

    def clean():
        x.grad = None
        w.grad = None

    def warmed_up():
        step()
        clean()
        return step

    memory = step_peak(warmed_up, "cpu")  # (the suite's method: torch_ext's cache emptied, malloc_trim)
    peak = memory.get("peak")
    clean()
    times = []
    for _ in range(args.steps):
        if candidate != "unsharded":
            dist.barrier()
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        clean()
    loss = loss.detach()
    record = {"rank": rank, "loss": float(loss.to_local() if hasattr(loss, "to_local") else loss),
              "times_s": times, "peak_bytes": peak, "threads": threads}
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump(record, f)
    if candidate != "unsharded":
        dist.destroy_process_group()


def _run(candidate: str, args, tmp: str) -> dict:
    import multiprocessing as mp

    world = 1 if candidate == "unsharded" else args.world
    ctx = mp.get_context("spawn")
    port = _free_port()
    out_path = os.path.join(tmp, candidate)
    procs = [ctx.Process(target=_rank, args=(r, world, port, candidate, args, out_path)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"{candidate}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    ranks = []
    for r in range(world):
        with open(f"{out_path}.rank{r}") as f:
            ranks.append(json.load(f))
    times = sorted(ranks[0]["times_s"])
    peaks = [r["peak_bytes"] for r in ranks]
    return {"world": world, "threads_per_process": ranks[0]["threads"], "loss": ranks[0]["loss"],
            "median_ms": 1e3 * times[len(times) // 2], "times_ms": [1e3 * s for s in ranks[0]["times_s"]],
            "peak_bytes_per_rank": peaks, "peak_bytes": None if None in peaks else max(peaks)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/bench_vocab_parallel.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes the vocabulary is sharded over (default 2)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per candidate (default 5)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma-separated, of {', '.join(CANDIDATES)}")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vocab_parallel_cpu"),
                   help="results path without extension (.txt and .json are written)")
    args = p.parse_args(argv)
    if args.world < 2:
        p.error("--world must be at least 2")
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = set(candidates) - set(CANDIDATES)
    if unknown:
        p.error(f"--candidates: unknown {sorted(unknown)}; choose from {', '.join(CANDIDATES)}")
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in candidates:
            results[c] = _run(c, args, tmp)
            r = results[c]
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MB"
            print(f"  {c}: {r['median_ms']:.0f} ms, peak {peak} per rank, loss {r['loss']:.6f}", flush=True)
    base = results.get("unsharded")
    lines = [f"$ python benchmarks/bench_vocab_parallel.py --world {args.world} --tokens {args.tokens} "
             f"--hidden {args.hidden} --vocab {args.vocab} --dtype {args.dtype} --steps {args.steps}", "",
             f"LM-head loss, {args.tokens} tokens x hidden {args.hidden} -> vocabulary {args.vocab}, {args.dtype}, "
             f"fwd+bwd; {os.cpu_count()} CPU cores shared by the processes; THP_MEM_ALLOC_ENABLE=1", "",
             "| candidate | processes x threads | ms per step | x unsharded time | peak per rank | x unsharded peak "
             "| loss |",
             "|---|---|---|---|---|---|---|"]
    for c, r in results.items():
        peak = r["peak_bytes"]
        rel_t = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "-"
        rel_m = f"{peak / base['peak_bytes']:.2f}" if base and peak and base["peak_bytes"] else "-"
        lines.append(f"| {c} | {r['world']} x {r['threads_per_process']} | {r['median_ms']:.0f} | {rel_t} | "
                     f"{'-' if peak is None else f'{peak / 2**20:.1f} MB'} | {rel_m} | {r['loss']:.6f} |")
    lines += ["", "- " + "\n- ".join(f"{c}: {LABELS[c]}" for c in results),
              "- ms per step: median of rank 0's steps ('x unsharded time' > 1: faster than one process with every "
              "core); peak per rank: peak RSS of one step above the RSS before it, the largest over the ranks "
              "('x unsharded peak': the goal is <= 0.55 at 2 ranks)."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".txt", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
