"""One run of the suite: resolve what to run, measure the machine, run the op cases and the model
cases, then their peak memory, and write NAME.json, NAME.txt and NAME.png."""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import sys
import time
import traceback
from typing import List

import torch

import torch_ext

from . import machine, measure_model, measure_op, memory, select, timing
from .chart import write_chart
from .cli import HERE, default_name
from .models import MODELS
from .ops import DISPLAY, OPS
from .progress import Progress
from .report import memory_table, model_table, notes_text, time_table

ROOT = os.path.dirname(HERE)


@dataclasses.dataclass
class Config:
    dtype: torch.dtype
    dtype_name: str
    device: str
    compile: bool
    memory: bool
    rounds: int
    case_seconds: float
    model_seconds: float
    min_round_s: float
    quick: bool = False
    # One measuring process at a time: two at once, each with PyTorch's threads for every core,
    # oversubscribe the cores (one's OpenMP threads spin while the other's hold them) and made the
    # memory phase slower, not faster (docs/benchmarks.md).
    memory_jobs: int = 1
    # Peak memory of the "tiny" cases on CPU: peak RSS counts 4 KiB pages, coarser than what such a
    # step allocates (a few KB), so the default run leaves them out (their saved bytes are exact);
    # asking for them (--sizes tiny) measures them.
    tiny_peaks: bool = True
    memory_timeout_s: float = 600.0


def main(args, argv: List[str], thp_record: dict) -> int:
    started = time.perf_counter()
    ops = select.resolve_ops(args.ops)
    device, ops, device_notes = select.resolve_device(args.device, ops)
    cases, size_notes = select.resolve_cases(ops, args.sizes, args.quick)
    models, model_notes = select.resolve_models(args.models, args.ops, args.sizes)
    if not cases and not models:
        why = "; ".join(model_notes or ["--models none"])
        raise select.UsageError(f"nothing to run: --ops none and no model ({why})")
    # --quick leaves out the torch.compile candidates (PyTorch's own): compiling them for each case
    # would be most of a quick run (docs/benchmarks.md).
    cfg = Config(
        dtype=getattr(torch, args.dtype), dtype_name=args.dtype, device=device,
        compile=not (args.no_compile or args.quick),
        memory=not args.no_memory, rounds=args.rounds or (3 if args.quick else 10),
        case_seconds=args.case_seconds or (1.5 if args.quick else 10.0),
        model_seconds=args.model_seconds or (1.5 if args.quick else 3.0),
        min_round_s=0.02 if args.quick else 0.05, quick=args.quick,
        tiny_peaks=device != "cpu" or args.sizes is not None,
    )
    model_size = "quick" if args.quick else "full"
    name = args.name or default_name(args, device)
    os.makedirs(args.out, exist_ok=True)

    load_start = machine.load_average()
    info = machine.machine_info(device)
    print(f"torch_ext benchmarks: {len(cases)} op cases and {len(models)} models on {device} "
          f"({info.get('gpu') or info.get('processor')}, {info['threads']} threads), {args.dtype}, "
          f"THP_MEM_ALLOC_ENABLE={thp_record['THP_MEM_ALLOC_ENABLE']}, torch_ext from {info['torch_ext_path']}; "
          "measuring copy bandwidth and GEMM rate...",
          file=sys.stderr, flush=True)
    bandwidth = timing.copy_bandwidth(device, rounds=3 if args.quick else 7)
    gemm_n = timing.gemm_probe_size(device, cfg.dtype)  # 2048 unless the dtype's GEMM is very slow here
    gemm = timing.gemm_rate(device, n=gemm_n, dtype=cfg.dtype, rounds=3 if args.quick else 5)
    gc.collect()
    commit, dirty = machine.git_commit(ROOT)
    flipped = "off" if args.baseline_thp == "on" else "on"
    other = None if args.name else default_name(args, device, flipped)  # the name of the same run with it flipped
    meta = {
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py"] + list(argv)),
        "git_commit": commit, "git_dirty": dirty,
        "machine": info, "device": device, "dtype": args.dtype, "quick": args.quick,
        "thp": thp_record, "thp_other_name": other,
        "copy_bandwidth": bandwidth, "gemm_flops": gemm, "gemm_shape": f"{gemm_n}x{gemm_n}x{gemm_n}",
        "load_start": load_start, "load_end": None,
        "compile": cfg.compile, "rounds_max": cfg.rounds, "case_seconds": cfg.case_seconds,
        "model_seconds": cfg.model_seconds, "min_round_s": cfg.min_round_s,
        "timing_method": "timing.time_phases (op cases) and timing.time_interleaved (models): candidates "
                         "interleaved in a new random order each round; each round's sample of a candidate is the mean "
                         "of back-to-back calls lasting at least min_round_s (a sub-millisecond step is timed over "
                         "hundreds of calls, never one at a time); ratios per round, then their median",
        "memory_method": None, "model_memory_method": None,
        "models": {m: {"size": model_size, **MODELS[m].sizes[model_size]} for m in models},
        "has_linear_cross_entropy": "linear_cross_entropy" in OPS,
    }
    machine_figures = {"copy_bandwidth": bandwidth, "gemm_flops": gemm}

    records, model_records = [], []
    progress = Progress(len(cases) + len(models))
    try:
        for case in cases:
            progress.start(f"{case.op} {case.label()}")
            r = _guarded(lambda case=case: measure_op.run_case(case, cfg, machine_figures, progress),
                         {"op": case.op, "scenario": case.scenario, "params": list(case.params), "case": case.label(),
                          "kind": OPS[case.op].kind, "dtype": args.dtype, "device": device, "notes": []})
            records.append(r)
            progress.finish_case(f"{case.op} {case.label()}: " + _op_summary(r))
        for m in models:
            progress.start(f"model {m}")
            r = _guarded(lambda m=m: measure_model.run_model(m, model_size, cfg, progress),
                         {"model": m, "size": model_size, "case": MODELS[m].describe(MODELS[m].sizes[model_size]),
                          "dtype": args.dtype, "device": device, "notes": []})
            model_records.append(r)
            progress.finish_case(f"model {m}: " + _model_summary(r))
        if cfg.memory:
            run_memory(cases, records, model_records, cfg, meta, progress)
    finally:
        progress.close()
    torch._dynamo.reset()
    meta["load_end"] = machine.load_average()
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    extra = device_notes + size_notes + model_notes
    if cfg.memory and not cfg.tiny_peaks and any(c.scenario == "tiny" for c in cases):
        extra.append("The tiny cases' peak memory is not measured: peak RSS counts 4 KiB pages, coarser than what "
                     "their steps allocate (their saved bytes are exact); --sizes tiny measures it.")
    notes = notes_text(meta, records, model_records, extra)
    parts = [f"$ {meta['command']}", ""]
    if records:
        parts += ["Time per step (ms)", time_table(records), "",
                  "Memory per step and correctness (check: ours' output and gradients against eager's)",
                  memory_table(records), ""]
    if model_records:
        parts += ["Whole models: one training step (zero_grad, forward + loss, backward, AdamW step)",
                  model_table(model_records), ""]
    text = "\n".join(parts + [f"- {n}" for n in notes] + [f"- Elapsed: {meta['elapsed_s']:.0f} s."])
    print(text)
    base = os.path.join(args.out, name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "notes": notes, "results": records, "models": model_records}, f, indent=1)
        f.write("\n")
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    written = [base + ".json", base + ".txt"]
    why_not = write_chart(base + ".png", meta, records, model_records)
    if why_not:
        print(f"note: {why_not}", file=sys.stderr)
    else:
        written.append(base + ".png")
    print("wrote " + ", ".join(os.path.relpath(p) for p in written), file=sys.stderr)
    failed = [f"{r['op']} {r['case']}" for r in records if "error" in r or r.get("check", "ok") != "ok"]
    failed += [f"model {r['model']}" for r in model_records if "error" in r or r.get("check", "ok") != "ok"]
    if failed:
        print(f"{len(failed)} case(s) failed or differ from eager: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def _guarded(run, error_record: dict) -> dict:
    """run(), or error_record with the error: one case failing does not stop the others."""
    try:
        r = run()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        r = dict(error_record, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    torch._dynamo.reset()  # the case's compiled code: garbage now, before the freeze below
    gc.collect()
    # What outlives a case (modules imported on the way, caches) is there for good: freezing it
    # keeps every later gc.collect() from walking it again (a slow walk, and a run does dozens).
    gc.freeze()
    torch_ext.empty_cache()
    return r


def _op_summary(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    text = ", ".join(f"x{DISPLAY[k[3:]]} {v['fwd+bwd']:.2f}" for k, v in r["speedup"].items())
    return f"ours {r['time_ms']['ours']['fwd+bwd']['median']:.3g} ms fwd+bwd ({text}); check {r['check']}"


def _model_summary(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    text = ", ".join(f"{measure_model.DISPLAY[k]} x{v:.2f}" for k, v in r["speedup"]["vs_eager"].items())
    return f"eager step {r['time_ms']['eager']['median']:.0f} ms ({text} vs eager); check {r['check']}"


def run_memory(cases, records: List[dict], model_records: List[dict], cfg: Config, meta: dict, progress) -> None:
    """Peak memory of every candidate of every op case and model case that ran, into the records."""
    where = []  # (record, candidate) of each job
    jobs = []
    for case, r in zip(cases, records):
        if "error" in r or (case.scenario == "tiny" and not cfg.tiny_peaks):
            continue
        for name in r["candidates"]:
            where.append((r, name))
            jobs.append((measure_op.peak_job, (case, name, cfg.dtype_name, cfg.device)))
    for r, name, job in measure_model.jobs(model_records):
        where.append((r, name))
        jobs.append(job)
    if not jobs:
        return
    for r, _ in where:
        r.setdefault("peak_bytes", {})
        r.setdefault("retained_bytes", {})
    preload = [mod for m in meta["models"] for mod in MODELS[m].preload]
    if any(name.endswith("compile") for _, name in where):  # the compile machinery: slow to import per child
        preload += memory.COMPILE_PRELOAD
    start = time.perf_counter()
    progress.begin_memory(len(jobs))
    resets = {}
    not_preloaded = set()

    def done(i, result):
        r, name = where[i]
        r["peak_bytes"][name] = result.get("peak")
        r["retained_bytes"][name] = result.get("retained")
        # What each job cost (its process, compilation included), to see where the phase's time goes.
        r.setdefault("stage_s", {}).setdefault("memory jobs", {})[name] = result.get("seconds")
        is_model = "model" in r
        display = (measure_model.DISPLAY if is_model else DISPLAY)[name]
        if result.get("error"):
            r["notes"].append(f"peak memory of {display} not measured: {result['error']}")
        if "reset" in result:
            resets[is_model] = resets.get(is_model, True) and result["reset"]
        not_preloaded.update(result.get("not_preloaded", ()))
        progress.memory_done(f"{r.get('model') or r['op']} {'' if is_model else r['case']}: {display}")

    memory.measure(jobs, cfg.device, done, parallel=cfg.memory_jobs, timeout_s=cfg.memory_timeout_s, preload=preload)
    meta["memory_not_preloaded"] = sorted(not_preloaded)  # the slow path, if any: each process imported these
    if False in resets:
        meta["memory_method"] = memory.method(cfg.device, resets.get(False, True), "fwd+bwd step",
                                              measure_op.MEMORY_SETUP) + f" ({measure_op.MEMORY_SCOPE})"
    if True in resets:
        meta["model_memory_method"] = memory.method(cfg.device, resets[True], "training step",
                                                    measure_model.MEMORY_SETUP) + f" ({measure_model.MEMORY_SCOPE})"
    meta["memory_phase_s"] = round(time.perf_counter() - start, 1)

