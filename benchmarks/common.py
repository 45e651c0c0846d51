"""Measurement helpers shared by the benchmarks.

Timing: candidates are run interleaved, in a new random order each round, so that drift on a
shared machine (frequency, the other core busy, a compiled candidate's after-effects) hits all
of them alike; each round times a few back-to-back calls per candidate (synchronizing on CUDA);
speed-up ratios are taken within each round, then summarized by their median.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    candidates: Dict[str, Callable[[], object]],
    *,
    device: str = "cpu",
    warmup: int = 2,
    rounds: int = 15,
    min_round_s: float = 0.1,
    seed: int = 0,
) -> Dict[str, List[float]]:
    """Seconds per call of each candidate, one sample per round."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    # Calls per round: enough that one sample lasts min_round_s for the slowest candidate.
    calls = {}
    for name, fn in candidates.items():
        start = time.perf_counter()
        fn()
        _sync(device)
        calls[name] = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-7)))
    rng = random.Random(seed)
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    order = list(candidates)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, n = candidates[name], calls[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def spread(xs: List[float]) -> float:
    """Interquartile range relative to the median."""
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def ratio(samples: Dict[str, List[float]], baseline: str, candidate: str) -> float:
    """Median over rounds of baseline_time / candidate_time (> 1: candidate is faster)."""
    return median(b / c for b, c in zip(samples[baseline], samples[candidate]))


def saved_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct storages that autograd saves for backward while `step` builds its graph,
    not counting the storages of `exclude` (inputs and parameters, which exist anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and storage.nbytes() > 0:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, rounds: int = 7) -> float:
    """Bytes per second that a large tensor copy moves, read + write both counted: the median
    over `rounds` of ``dst.copy_(src)`` on two `nbytes` buffers (much larger than any cache)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    samples = time_interleaved({"copy": lambda: dst.copy_(src)}, device=device, rounds=rounds)
    return 2 * nbytes / median(samples["copy"])


def machine_info(device: str = "cpu") -> dict:
    import platform

    import torch_ext

    info = {
        "torch": torch.__version__,
        "torch_ext": torch_ext.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch_ext.cpu_capability(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
