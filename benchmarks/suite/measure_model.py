"""Measuring one model case: a full training step (zero_grad, forward with the loss, backward,
AdamW step) of the unfused model and of the fused one (torch_ext.fuse), each eager and under
torch.compile. Every candidate has its own copy of the model, built from the same seed, and the
same batch; their first-step losses are checked against the unfused eager model's before timing.
The steps run interleaved (timing.time_interleaved); speed-ups are medians of per-round ratios.
Peak memory is measured afterwards, in a fresh process per candidate (peak_job)."""
from __future__ import annotations

import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch

import torch_ext

from . import timing
from .measure_op import add_warnings, compare, error_message
from .models import MODELS

CANDIDATES = ("eager", "compile", "fused", "fused_compile")  # table order
DISPLAY = {"eager": "eager", "compile": "compile", "fused": "fused", "fused_compile": "fused+compile"}
MEMORY_SETUP = ("build the model and the batch, one warm-up step on the whole batch (every candidate alike: the "
                "compiled ones compile per shape; a first step at the measured size pays one-off set-up that a "
                "training loop's steps do not) that creates AdamW's state, drop the gradients")
MEMORY_SCOPE = "the model and AdamW's state are resident before the step; the gradients it makes count"


def candidates_for(cfg) -> Tuple[str, ...]:
    """--quick and --no-compile (cfg.compile False) leave the compiled models out."""
    return CANDIDATES if cfg.compile else tuple(n for n in CANDIDATES if not n.endswith("compile"))


def _to(batch, device: str, dtype: torch.dtype):
    """The batch on `device`, floating tensors in `dtype` (indices stay integers)."""
    def move(t):
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return {k: move(v) for k, v in batch.items()} if isinstance(batch, dict) else tuple(move(t) for t in batch)


def make_candidate(model_name: str, size: str, name: str, dtype: torch.dtype, device: str):
    """(step, fuse report or None, optimizer, batch) of candidate `name`; step() -> the detached
    loss of a step on the batch, step(other) of a step on another batch."""
    case = MODELS[model_name]
    torch.manual_seed(0)  # the same initial weights for every candidate
    model, batch = case.build(**case.sizes[size])
    model = model.to(device=device, dtype=dtype)
    batch = _to(batch, device, dtype)
    report = None
    if name.startswith("fused"):
        model, report = torch_ext.fuse(model, inplace=True, return_report=True)
    run = torch.compile(model) if name.endswith("compile") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(data=batch) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = case.loss(run, data)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, report, optimizer, batch


def _compile_note(display: str) -> Tuple[str, int]:
    """(what torch.compile made of the candidate that just compiled, its number of graphs), from
    Dynamo's counters since they were last cleared."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = {**counters["graph_break"], **counters["unimplemented"]}
    text = f"{display}: torch.compile made {graphs} graph(s)"
    if breaks:
        reasons = "; ".join(" ".join(r.split()[:40]) for r in breaks)  # a reason can run to many lines
        text += f", with graph breaks ({sum(breaks.values())}: {reasons})"
    return text, graphs


def run_model(model_name: str, size: str, cfg, progress) -> dict:
    """The record of one model case: step times, throughputs, speed-ups, fuse report, check."""
    case = MODELS[model_name]
    dims = case.sizes[size]
    record = {"model": model_name, "size": size, "case": case.describe(dims), "unit": case.unit,
              "units_per_step": case.units(dims), "dtype": cfg.dtype_name, "device": cfg.device, "notes": []}
    lap = timing.Laps(record.setdefault("stage_s", {}))

    from torch._dynamo.utils import counters  # (imports Dynamo, which torch.compile needs anyway)

    torch._dynamo.reset()
    steps: Dict[str, Callable[[], torch.Tensor]] = {}
    first_s: Dict[str, float] = {}
    losses: Dict[str, float] = {}
    check = "ok"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in candidates_for(cfg):
            progress.stage(f"{DISPLAY[name]}: first step" + (" (compiles)" if name.endswith("compile") else ""))
            try:
                counters.clear()  # for _compile_note
                step, report, _, _ = make_candidate(model_name, size, name, cfg.dtype, cfg.device)
                start = time.perf_counter()
                loss = step()
                timing.sync(cfg.device)
                first_s[name] = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 (a candidate that fails is reported, not fatal)
                if name in ("eager", "fused"):
                    record["error"] = f"{DISPLAY[name]} failed: {error_message(e)}"
                    return record
                record["notes"].append(f"{DISPLAY[name]} left out: {error_message(e)}")
                continue
            if report is not None and "fuse" not in record:
                record["fuse"] = {"replaced": list(report.replaced), "skipped": list(report.skipped)}
            if name.endswith("compile"):
                text, graphs = _compile_note(DISPLAY[name])
                if graphs == 0:  # it runs the model as written: timing it again would only measure noise
                    record["notes"].append(text + "; so it runs the model as written (its twin without compile) "
                                                  "and is neither timed nor measured")
                    record.setdefault("no_graph", []).append(name)
                    continue
                record["notes"].append(text)
            steps[name] = step
            losses[name] = loss.item()
            if name != "eager":
                diff = compare([torch.tensor(losses["eager"])], [torch.tensor(losses[name])], cfg.dtype)
                if diff and name.startswith("fused"):
                    check = f"FAIL {DISPLAY[name]} loss {losses[name]:.6g} vs eager {losses['eager']:.6g}"
                elif diff:
                    record["notes"].append(f"{DISPLAY[name]}'s loss {losses[name]:.6g} differs from eager's "
                                           f"{losses['eager']:.6g}")
        lap("first steps (compile included)")
        progress.stage("second steps")
        second = {name: timing.time_call(step, cfg.device) for name, step in steps.items()}
        rounds = timing.rounds_for(sum(second.values()), cfg.model_seconds, cfg.rounds)
        progress.stage(f"timing, {rounds} rounds")
        samples = timing.time_interleaved(
            steps, device=cfg.device, warmup=0, rounds=rounds, calls={name: 1 for name in steps},
            on_round=lambda r: progress.stage(f"timing, round {r + 1}/{rounds}"),
        )
        lap("timing")
        add_warnings(record["notes"], caught)
    names = list(steps)
    record.update(
        candidates=names, rounds=rounds, check=check, loss=losses,
        first_step_s={name: round(s, 2) for name, s in first_s.items()},
        time_ms={name: timing.summary_ms(samples[name]) for name in names},
        throughput={name: record["units_per_step"] / timing.median(samples[name]) for name in names},
        speedup={"vs_eager": {name: timing.ratio_of(samples["eager"], samples[name])
                              for name in names if name != "eager"}},
    )
    if "compile" in names and "fused_compile" in names:
        record["speedup"]["vs_compile"] = {
            "fused_compile": timing.ratio_of(samples["compile"], samples["fused_compile"])}
    del steps, samples  # (main._guarded then resets dynamo, collects and empties torch_ext's cache)
    return record


def peak_job(model_name: str, size: str, name: str, dtype_name: str, device: str) -> Callable[[], object]:
    """In a measuring process: build candidate `name`, one warm-up step, drop the gradients, and
    return the step (memory.step_peak measures it)."""
    step, _, optimizer, _ = make_candidate(model_name, size, name, getattr(torch, dtype_name), device)
    # At the measured size for every candidate: the compiled ones compile for the batch's shapes, and
    # a first step at a new size pays one-off set-up (see docs/benchmarks.md), which would otherwise
    # be measured for the eager candidates only.
    step()
    optimizer.zero_grad(set_to_none=True)
    return step


def jobs(records: List[dict]) -> List[tuple]:
    """(record, candidate, memory job) of every candidate of every model case that ran."""
    return [(r, name, (peak_job, (r["model"], r["size"], name, r["dtype"], r["device"])))
            for r in records if "error" not in r for name in r["candidates"]]
