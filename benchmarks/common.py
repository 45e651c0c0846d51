"""Measurement helpers shared by the benchmarks.

Timing: candidates are run interleaved, in a new random order each round, so that drift on a
shared machine (frequency, the other core busy, a compiled candidate's after-effects) hits all
of them alike; each round times a few back-to-back calls per candidate (synchronizing on CUDA);
speed-up ratios are taken within each round, then summarized by their median.
time_interleaved times one callable per candidate; time_phases times a forward and the backward
of its output separately within each call, so one run gives forward, backward and their sum.

Memory: saved_bytes counts what autograd saves for backward; peak_rss_* (CPU) read the peak
resident set size of this process, which run.py measures in a fresh process per candidate.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import random
import statistics
import subprocess
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

PHASES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass
class Workload:
    """One benchmark case: inputs, the candidates that compute the same thing from them, and
    what bounds their speed. Built by each benchmark file's make_workload; run.py times it.

    fns: name -> function of *inputs (at least "eager", PyTorch's own, and "ours", torch_ext's;
      others are peers such as PyTorch's chunked linear_cross_entropy). torch.compile of "eager"
      is added by the runner.
    requires: the tensors among the inputs (or parameters) that gradients are taken for.
    grad_output: the gradient fed to backward for a non-scalar output; None for a scalar loss.
    exclude: storages that exist anyway (inputs, parameters), not counted as saved for backward.
    floor_fns: a timed floor as (forward, backward) callables (the bare GEMMs of a GEMM-bound op).
    floor_bytes / floor_flops: per phase ("fwd", "bwd", "fwd+bwd"), the bytes that must move
      (floor = bytes / copy bandwidth) or the FLOP that must be done (floor = FLOP / GEMM rate).
    """

    label: str
    inputs: Tuple[object, ...]
    requires: Tuple[torch.Tensor, ...]
    fns: Dict[str, Callable[..., torch.Tensor]]
    grad_output: Optional[torch.Tensor] = None
    exclude: Tuple[torch.Tensor, ...] = ()
    floor_fns: Optional[Tuple[Callable[[], object], Callable[[object], object]]] = None
    floor_bytes: Optional[Dict[str, int]] = None
    floor_flops: Optional[Dict[str, int]] = None

    def forward(self, fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: fn(*self.inputs)

    def backward(self, out: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return torch.autograd.grad(out, self.requires, self.grad_output)

    def step(self, fn: Callable[..., torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """One training step of `fn`: forward, then the gradients of `requires`."""
        return self.backward(fn(*self.inputs))


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
    sync(device)
    # Calls per round: enough that one sample lasts min_round_s for the slowest candidate.
    calls = {}
    for name, fn in candidates.items():
        start = time.perf_counter()
        fn()
        sync(device)
        calls[name] = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-7)))
    rng = random.Random(seed)
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    order = list(candidates)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, n = candidates[name], calls[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / n)
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


def calls_per_round(seconds_per_call: float, min_round_s: float) -> int:
    """Back-to-back calls that make one round's sample last about min_round_s."""
    return max(1, int(min_round_s / max(seconds_per_call, 1e-7)))


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


def ratio(samples: Dict[str, List[float]], baseline: str, candidate: str) -> float:
    """Median over rounds of baseline_time / candidate_time (> 1: candidate is faster)."""
    return ratio_of(samples[baseline], samples[candidate])


def ratio_of(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    """Median over rounds of baseline[i] / candidate[i], i.e. the ratio taken within each round."""
    return median(b / c for b, c in zip(baseline, candidate))


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


def gemm_rate(device: str = "cpu", n: int = 2048, dtype: torch.dtype = torch.float32, rounds: int = 5) -> float:
    """FLOP per second of an n x n x n matmul (2 n^3 FLOP), the median over `rounds`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    samples = time_interleaved({"mm": lambda: torch.mm(a, b, out=c)}, device=device, rounds=rounds)
    return 2 * n**3 / median(samples["mm"])


# Peak resident set size (CPU memory). Linux keeps the peak in /proc/self/status (VmHWM) and resets
# it to the current resident size when "5" is written to /proc/self/clear_refs (Linux >= 4.0).


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> Optional[int]:
    """Resident set size of this process now (VmRSS), None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size of this process (VmHWM) since it started or since the last
    reset_peak_rss()."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Set the peak resident set size to the current one; False where the kernel does not allow it."""
    if _status_kib("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    peak, now = _status_kib("VmHWM"), _status_kib("VmRSS")
    # Reset when the peak now sits at the resident size. The kernel's RSS counters are per-CPU
    # approximations and other threads may fault or free pages between the reads, so "at" is
    # within 2 MiB; a kernel that ignored the write would leave the old peak (where that peak is
    # within 2 MiB of the resident size anyway, the difference does not matter). Comparing with
    # the peak before the reset failed in CI when the process sat at its peak: the approximate
    # counters read the same peak after the reset.
    return peak is not None and now is not None and peak <= now + 2048


def release_free_memory() -> None:
    """Give freed heap memory back to the system (glibc malloc_trim), so that the resident size
    counts live memory only. A no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def git_commit(path: str) -> Tuple[Optional[str], Optional[bool]]:
    """(commit hash, whether the work tree has uncommitted changes) of the git checkout holding
    `path`; (None, None) outside one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages (runnable processes; compare with the core count)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str = "cpu") -> dict:
    import platform

    import torch_ext

    info = {
        "torch": torch.__version__,
        "torch_ext": torch_ext.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch_ext.cpu_capability(),
        "cpu_gemm": torch_ext.cpu_gemm(),
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
