"""Measuring one op case: check ours against eager, then time every candidate's forward and
backward, interleaved; its peak memory is measured afterwards, in fresh processes (peak_job)."""
from __future__ import annotations

import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import memory, timing
from .ops import DISPLAY, OPS, Case, build_workload, candidate_fns
from .timing import PHASES
from .workload import Workload

TOLERANCES = {  # (rtol, atol relative to the largest |expected|), as tests/utils.py
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 2e-2),  # eager and ours each round to bfloat16: a few ulps apart
    torch.float16: (8e-3, 5e-3),  # the same few ulps of float16 (2**-10)
}
MEMORY_SETUP = ("build the inputs, one warm-up step at the measured size (as for the whole models: one-off set-up, "
                "such as a GEMM library's buffers for the shape, is paid before the measured step, as in a training "
                "loop; where the peak cannot be reset, the warm-up runs at the tiny size)")
MEMORY_SCOPE = "inputs and parameters excluded, their gradients included"


def compare(expected, actual, dtype: torch.dtype) -> Optional[str]:
    """None when actual (output, then gradients) matches expected within the tolerance of `dtype`
    (|a - e| <= atol * max(1, max|e|) + rtol * |e|, as torch.testing.assert_close), else what differs."""
    rtol, atol = TOLERANCES[dtype]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    failed = []
    for i, (e, a) in enumerate(zip(expected, actual)):
        what = "output" if i == 0 else f"grad{i - 1}"
        if e.shape != a.shape:
            failed.append(f"{what} shape {tuple(a.shape)} != {tuple(e.shape)}")
            continue
        if e.numel() == 0:
            continue
        e, a = e.detach().to(work), a.detach().to(work)
        scale = max(1.0, e.abs().max().item())
        diff = (a - e).abs()
        bad = diff > atol * scale + rtol * e.abs()
        if bool(bad.any()) or bool(torch.isnan(a).any() != torch.isnan(e).any()):
            failed.append(f"{what} max|d|={diff.nan_to_num(float('inf')).max().item():.1e}")
    return ", ".join(failed) or None


def first_call(wl: Workload, fn: Callable, device: str):
    """One timed step, also recording the bytes saved for backward: (results, (fwd s, bwd s), saved)."""
    timing.sync(device)
    t0 = time.perf_counter()
    with memory.SavedTensors(wl.exclude) as saved:
        out = fn(*wl.inputs)
    timing.sync(device)
    t1 = time.perf_counter()
    grads = wl.backward(out)
    timing.sync(device)
    t2 = time.perf_counter()
    return (out.detach(),) + tuple(grads), (t1 - t0, t2 - t1), saved.bytes


def error_message(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def add_warnings(notes: List[str], caught) -> None:
    """The warnings a case raised, once each, into its notes; deprecation notices (libraries
    talking to their own users) are left out."""
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        text = f"warning: {str(w.message).strip().splitlines()[0]}"
        if text not in notes:
            notes.append(text)


def run_case(case: Case, cfg, machine: dict, progress) -> dict:
    """The record of one op case: times per phase, speed-ups, saved bytes, floor, check."""
    spec = OPS[case.op]
    dtype, device = cfg.dtype, cfg.device
    record = {
        "op": case.op, "scenario": case.scenario, "params": list(case.params), "case": case.label(),
        "kind": spec.kind, "dtype": cfg.dtype_name, "device": device, "notes": [],
    }
    lap = timing.Laps(record.setdefault("stage_s", {}))

    torch._dynamo.reset()  # each case compiles afresh, statically for its shapes
    wl = build_workload(case.op, case.params, dtype, device)
    # The inputs' own dtype where a case fixes it (cross_entropy_autocast's bfloat16 logits).
    record["dtype"] = str(wl.requires[0].dtype).removeprefix("torch.")
    fns = candidate_fns(wl, cfg.compile)
    first: Dict[str, Tuple[float, float]] = {}
    saved: Dict[str, Optional[int]] = {}
    reference = None
    check = "ok"
    progress.stage("warm-up and check")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in list(fns):
            try:
                if name == "compile":
                    wl.step(fns[name])  # compiles forward and backward; not timed
                results, first[name], saved[name] = first_call(wl, fns[name], device)
            except Exception as e:  # noqa: BLE001 (a candidate that fails is reported, not fatal)
                if name in ("eager", "ours"):
                    record["error"] = f"{DISPLAY[name]} failed: {error_message(e)}"
                    return record
                record["notes"].append(f"{DISPLAY[name]} left out: {error_message(e)}")
                del fns[name]
                continue
            if name == "eager":
                reference = results
            else:
                diff = compare(reference, results, dtype)
                if diff and name == "ours":
                    check = f"FAIL {diff}"
                elif diff:
                    record["notes"].append(f"{DISPLAY[name]} differs from eager: {diff}")
            del results
            if sum(first[name]) < 0.5:  # cheap: time a second call, the first may include one-off costs
                first[name] = min(first[name], first_call(wl, fns[name], device)[1], key=sum)
        if wl.floor_fns is not None:
            f_fwd, f_bwd = wl.floor_fns
            for _ in range(2):  # a second call only when cheap, as above
                t = timing.time_step(f_fwd, f_bwd, device)
                first["floor"] = min(first.get("floor", t), t, key=sum)
                if sum(t) >= 0.5:
                    break
        del reference
        calls = {name: timing.calls_per_round(sum(t), cfg.min_round_s) for name, t in first.items()}
        rounds = timing.rounds_for(sum(calls[n] * sum(first[n]) for n in first), cfg.case_seconds, cfg.rounds)
        candidates = {name: (wl.forward(fn), wl.backward) for name, fn in fns.items()}
        if wl.floor_fns is not None:
            candidates["floor"] = wl.floor_fns
        lap("warm-up")
        progress.stage(f"timing, {rounds} rounds")
        samples = timing.time_phases(
            candidates, device=device, rounds=rounds, calls=calls, warmup=0, min_round_s=cfg.min_round_s,
            on_round=lambda r: progress.stage(f"timing, round {r + 1}/{rounds}"),
        )
        lap("timing")
        add_warnings(record["notes"], caught)
    names = list(fns)
    record["candidates"] = names
    record["rounds"] = rounds
    record["calls_per_round"] = calls
    record["check"] = check
    record["time_ms"] = {name: {phase: timing.summary_ms(samples[name][phase]) for phase in PHASES} for name in samples}
    record["speedup"] = {
        f"vs_{name}": {phase: timing.ratio_of(samples[name][phase], samples["ours"][phase]) for phase in PHASES}
        for name in names if name != "ours"
    }
    record["saved_bytes"] = {name: saved.get(name) for name in names}
    ours_ms = {phase: record["time_ms"]["ours"][phase]["median"] for phase in PHASES}
    if "floor" in samples:
        record["floor"] = {
            "kind": "bare GEMMs, timed", "flops": wl.floor_flops,
            "ms": {phase: record["time_ms"]["floor"][phase]["median"] for phase in PHASES},
        }
        record["floor_fraction"] = {phase: timing.ratio_of(samples["floor"][phase], samples["ours"][phase])
                                    for phase in PHASES}
    elif wl.floor_flops is not None:
        ms = {phase: 1e3 * wl.floor_flops[phase] / machine["gemm_flops"] for phase in PHASES}
        record["floor"] = {"kind": "FLOP / GEMM rate", "flops": wl.floor_flops, "ms": ms}
        record["floor_fraction"] = {phase: ms[phase] / ours_ms[phase] for phase in PHASES}
    elif wl.floor_bytes is not None:
        ms = {phase: 1e3 * wl.floor_bytes[phase] / machine["copy_bandwidth"] for phase in PHASES}
        record["floor"] = {"kind": "bytes / copy bandwidth", "bytes": wl.floor_bytes, "ms": ms}
        record["floor_fraction"] = {phase: ms[phase] / ours_ms[phase] for phase in PHASES}
    times = record["time_ms"]
    early = [DISPLAY[n] for n in names if times[n]["bwd"]["median"] < 0.05 * times[n]["fwd+bwd"]["median"]]
    if early:
        record["notes"].append(
            f"{', '.join(early)}: backward under 5% of the step (the gradients are formed in the forward pass): "
            "compare fwd+bwd, not the phases"
        )
    if spec.held is not None:
        n, d = case.params
        record["notes"].append(
            f"ours forms {spec.held} in the forward pass and holds it until backward "
            f"({n * d * wl.requires[0].dtype.itemsize / 2**20:.1f} MB), as a saved tensor: 'saved' counts it"
        )
    del wl, fns, candidates, samples  # (main._guarded then collects them)
    return record


def peak_job(case: Case, name: str, dtype_name: str, device: str) -> Callable[[], object]:
    """In a measuring process: build the case, warm up, and return the step of candidate `name`
    (memory.step_peak measures it)."""
    dtype = getattr(torch, dtype_name)
    wl = build_workload(case.op, case.params, dtype, device)
    fn = candidate_fns(wl, name == "compile")[name]
    # At the measured size: a first step at a shape pays one-off set-up (torch.compile compiles;
    # on CPU the GEMM libraries keep ~5 MB of buffers for linear_act 256x2048->1024, which a
    # training loop's steps do not allocate again). Where the peak RSS cannot be reset (step_peak
    # resets it again before the step), the step's peak would hide under the warm-up's: a tiny
    # step then initializes the libraries without allocating at the measured size.
    if name == "compile" or device.startswith("cuda") or memory.reset_peak_rss():
        wl.step(fn)
    else:
        tiny = build_workload(case.op, OPS[case.op].scenarios["tiny"], dtype, device)
        tiny.step(candidate_fns(tiny, False)[name])
        del tiny
    return lambda: wl.step(fn)
