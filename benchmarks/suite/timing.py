"""Timing shared by every benchmark.

Candidates are run interleaved, in a new random order each round, so that drift on a shared
machine (frequency, the other core busy, a compiled candidate's after-effects) hits all of them
alike; each round times a few back-to-back calls per candidate (synchronizing on CUDA); speed-up
ratios are taken within each round, then summarized by their median.
time_interleaved times one callable per candidate (a model's training step, a GEMM);
time_phases times a forward and the backward of its output separately within each call, so one
run gives forward, backward and their sum (the op cases).
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

PHASES = ("fwd", "bwd", "fwd+bwd")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_step(fwd: Callable[[], object], bwd: Callable[[object], object], device: str = "cpu") -> Tuple[float, float]:
    """Seconds of one forward() and of backward(its output), synchronizing on CUDA around each."""
    sync(device)
    t0 = time.perf_counter()
    out = fwd()
    sync(device)
    t1 = time.perf_counter()
    bwd(out)
    del out
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def time_call(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds of one fn(), synchronizing on CUDA around it."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_interleaved(
    candidates: Dict[str, Callable[[], object]],
    *,
    device: str = "cpu",
    warmup: int = 2,
    rounds: int = 15,
    calls: Optional[Dict[str, int]] = None,
    min_round_s: float = 0.1,
    seed: int = 0,
    on_round: Optional[Callable[[int], None]] = None,
) -> Dict[str, List[float]]:
    """Seconds per call of each candidate, one sample per round; calls[name] back-to-back calls
    per round (default: enough that a round of the candidate lasts min_round_s, from one timed
    call after the warm-up)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync(device)
    if calls is None:
        calls = {name: calls_per_round(time_call(fn, device), min_round_s) for name, fn in candidates.items()}
    rng = random.Random(seed)
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    order = list(candidates)
    for r in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, n = candidates[name], calls[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / n)
        if on_round is not None:
            on_round(r)
    return samples


def time_phases(
    candidates: Dict[str, Tuple[Callable[[], object], Callable[[object], object]]],
    *,
    device: str = "cpu",
    rounds: int = 10,
    calls: Optional[Dict[str, int]] = None,
    warmup: int = 1,
    min_round_s: float = 0.1,
    seed: int = 0,
    on_round: Optional[Callable[[int], None]] = None,
) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per call of each candidate's forward, backward and both ('fwd', 'bwd',
    'fwd+bwd'), one sample of each per round.

    A candidate is (forward, backward): forward() builds the output (and the autograd graph),
    backward(output) differentiates it; each call times the two separately, synchronizing on
    CUDA before and after each. Rounds run the candidates in a new random order; each round
    makes calls[name] calls per candidate (default: enough that a round of the candidate lasts
    min_round_s, from one timed call after the warm-up)."""
    for fwd, bwd in candidates.values():
        for _ in range(warmup):
            bwd(fwd())
    sync(device)

    def one(name: str) -> Tuple[float, float]:
        return time_step(*candidates[name], device=device)

    if calls is None:
        calls = {name: calls_per_round(sum(one(name)), min_round_s) for name in candidates}
    rng = random.Random(seed)
    samples = {name: {phase: [] for phase in PHASES} for name in candidates}
    order = list(candidates)
    for r in range(rounds):
        rng.shuffle(order)
        for name in order:
            f = b = 0.0
            for _ in range(calls[name]):
                tf, tb = one(name)
                f, b = f + tf, b + tb
            n = calls[name]
            samples[name]["fwd"].append(f / n)
            samples[name]["bwd"].append(b / n)
            samples[name]["fwd+bwd"].append((f + b) / n)
        if on_round is not None:
            on_round(r)
    return samples


class Laps:
    """lap(stage): the seconds since the previous lap (or since creation) into `into[stage]`."""

    def __init__(self, into: Dict[str, float]):
        self.into, self.clock = into, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.into[stage] = round(now - self.clock, 2)
        self.clock = now


def calls_per_round(seconds_per_call: float, min_round_s: float) -> int:
    """Back-to-back calls that make one round's sample last about min_round_s."""
    return max(1, int(min_round_s / max(seconds_per_call, 1e-7)))


def rounds_for(seconds_per_round: float, budget_s: float, most: int) -> int:
    """Rounds that fit a case's timing budget: at least 3 (or `most` if fewer), at most `most`."""
    return max(min(3, most), min(most, int(budget_s / max(seconds_per_round, 1e-9))))


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def spread(xs: List[float]) -> float:
    """Interquartile range relative to the median; with fewer than 4 samples, the full range
    (max - min) relative to the median; 0 for a single sample."""
    if len(xs) < 2:
        return 0.0
    if len(xs) < 4:
        return (max(xs) - min(xs)) / statistics.median(xs)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def ratio_of(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    """Median over rounds of baseline[i] / candidate[i], i.e. the ratio taken within each round
    (> 1: candidate is faster)."""
    return median(b / c for b, c in zip(baseline, candidate))


def summary_ms(samples: List[float]) -> dict:
    """The JSON entry of one timed series (seconds per call): median and spread, samples in ms."""
    return {"median": 1e3 * median(samples), "spread": spread(samples), "samples": [1e3 * s for s in samples]}


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, rounds: int = 7) -> float:
    """Bytes per second that a large tensor copy moves, read + write both counted: the median
    over `rounds` of ``dst.copy_(src)`` on two `nbytes` buffers (much larger than any cache)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    samples = time_interleaved({"copy": lambda: dst.copy_(src)}, device=device, rounds=rounds)
    return 2 * nbytes / median(samples["copy"])


def gemm_probe_size(device: str = "cpu", dtype: torch.dtype = torch.float32, n_max: int = 2048,
                    budget_s: float = 0.5) -> int:
    """The largest power-of-two n <= n_max (at least 256) whose n x n x n matmul should take under
    `budget_s`, scaled as n^3 from one timed 256^3 call. Where the dtype's GEMM is a reference loop
    (bfloat16 on CPUs without AVX-512), a 2048^3 probe would run for minutes before any case."""
    a = torch.randn(256, 256, device=device).to(dtype)
    a @ a  # warm-up: library initialization
    sync(device)
    start = time.perf_counter()
    a @ a
    sync(device)
    seconds_256 = max(time.perf_counter() - start, 1e-9)
    n = 256
    while 2 * n <= n_max and seconds_256 * (2 * n / 256) ** 3 < budget_s:
        n *= 2
    return n


def gemm_rate(device: str = "cpu", n: int = 2048, dtype: torch.dtype = torch.float32, rounds: int = 5) -> float:
    """FLOP per second of an n x n x n matmul (2 n^3 FLOP), the median over `rounds`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    samples = time_interleaved({"mm": lambda: torch.mm(a, b, out=c)}, device=device, rounds=rounds)
    return 2 * n**3 / median(samples["mm"])
