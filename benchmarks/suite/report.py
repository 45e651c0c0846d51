"""The text report: the op tables (time per phase; memory and check), the model table, the notes."""
from __future__ import annotations

import math
from typing import List, Optional

from . import measure_model, thp
from .ops import DISPLAY, OPS
from .ops.peers import PEERS
from .timing import PHASES


def fmt_ms(entry: Optional[dict]) -> str:
    if not entry:
        return "-"
    v = entry["median"]
    text = f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"
    return f"{text} ±{100 * entry['spread']:.0f}%"


def fmt_x(v: Optional[float]) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def fmt_bytes(v: Optional[int]) -> str:
    if v is None:
        return "-"
    if abs(v) >= 2**30:
        return f"{v / 2**30:.2f} GB"
    if abs(v) >= 2**20:
        return f"{v / 2**20:.1f} MB"
    return f"{v / 2**10:.0f} KB"


def fmt_ratio(num: Optional[int], den: Optional[int]) -> str:
    return f"{num / den:.2f}" if den and num is not None and den > 0 else "-"


def render(headers: List[str], rows: List[List[str]], left: int) -> str:
    """A table: with tabulate when installed (GitHub markdown style), else plain columns; the first
    `left` columns aligned left, the others right."""
    try:
        from tabulate import tabulate
    except ImportError:
        tabulate = None
    align = ["left"] * left + ["right"] * (len(headers) - left)
    if tabulate is not None:
        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, colalign=align)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if a == "left" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def peers_in(records: List[dict]) -> List[str]:
    seen = []
    for r in records:
        for name in r.get("candidates", []):
            if name not in ("eager", "compile", "ours") and name not in seen:
                seen.append(name)
    return seen


def time_table(records: List[dict]) -> str:
    others = ["eager", "compile"] + peers_in(records)
    headers = ["op", "case", "phase"] + [f"{DISPLAY[n]} ms" for n in others] + ["ours ms"]
    headers += [f"ours x {DISPLAY[n]}" for n in others] + ["floor ms", "% of floor"]
    rows: List[List[str]] = []
    for r in records:
        if "error" in r:
            rows.append([r["op"], r["case"], "ERROR"] + ["-"] * (len(headers) - 3))
            continue
        for phase in PHASES:
            t = r["time_ms"]
            row = [r["op"], r["case"], phase]
            row += [fmt_ms(t.get(n, {}).get(phase)) for n in others] + [fmt_ms(t["ours"][phase])]
            row += [fmt_x(r["speedup"].get(f"vs_{n}", {}).get(phase)) for n in others]
            floor = r.get("floor") if phase == "fwd+bwd" else None
            row += [f"{floor['ms'][phase]:.3g}" if floor else "-",
                    f"{100 * r['floor_fraction'][phase]:.0f}%" if floor else "-"]
            rows.append(row)
    return render(headers, rows, left=3)


def memory_table(records: List[dict]) -> str:
    names = ["eager", "compile"] + peers_in(records) + ["ours"]
    has_peak = any("peak_bytes" in r for r in records)
    headers = ["op", "case"] + [f"saved {DISPLAY[n]}" for n in names]
    if has_peak:
        headers += [f"peak {DISPLAY[n]}" for n in names] + ["peak ours/eager"]
    headers += ["check"]
    rows: List[List[str]] = []
    for r in records:
        if "error" in r:
            rows.append([r["op"], r["case"]] + ["-"] * (len(headers) - 3) + ["ERROR"])
            continue
        row = [r["op"], r["case"]] + [fmt_bytes(r["saved_bytes"].get(n)) if n in r["candidates"] else "-"
                                      for n in names]
        if has_peak:
            peak = r.get("peak_bytes", {})
            row += [fmt_bytes(peak.get(n)) if n in r["candidates"] else "-" for n in names]
            row += [fmt_ratio(peak.get("ours"), peak.get("eager"))]
        row += [r["check"]]
        rows.append(row)
    return render(headers, rows, left=2)


def model_table(records: List[dict]) -> str:
    """One row per model and candidate: step time, throughput, speed-up and peak memory against
    the unfused eager model, first-step loss (the check) and first-step time (compile included)."""
    headers = ["model", "case", "candidate", "step ms", "throughput", "x eager", "peak", "peak / eager",
               "first-step loss", "first step s"]
    rows: List[List[str]] = []
    for r in records:
        if "error" in r:
            rows.append([r["model"], r["case"], "ERROR"] + ["-"] * (len(headers) - 3))
            continue
        peak = r.get("peak_bytes", {})
        for name in measure_model.CANDIDATES:
            if name in r.get("no_graph", ()):
                twin = measure_model.DISPLAY[name.rpartition("_")[0] or "eager"]
                rows.append([r["model"], r["case"], measure_model.DISPLAY[name], f"= {twin} (no graph)"]
                            + ["-"] * (len(headers) - 4))
            if name not in r["candidates"]:
                continue
            rows.append([
                r["model"], r["case"], measure_model.DISPLAY[name], fmt_ms(r["time_ms"][name]),
                f"{r['throughput'][name]:.0f} {r['unit']}/s",
                "1.00x" if name == "eager" else fmt_x(r["speedup"]["vs_eager"].get(name)),
                fmt_bytes(peak.get(name)), fmt_ratio(peak.get(name), peak.get("eager")),
                f"{r['loss'][name]:.6f}", f"{r['first_step_s'][name]:.1f}",
            ])
    return render(headers, rows, left=3)


def _sixteen_bit_gemm_text(meta: dict) -> str:
    """For a CPU run in a 16-bit dtype whose products torch_ext runs in float32 (csrc/matmul.h), the
    machine line's note saying so; else empty."""
    dtype = str(meta.get("dtype", "")).removeprefix("torch.")
    route = (meta["machine"].get("cpu_16bit_gemm") or {}).get(dtype)
    if meta["device"] != "cpu" or route != "float32":
        return ""
    return (f", {dtype} GEMM: float32 products of the {dtype} values (ATen's {dtype} GEMM runs far below "
            "its float32 one here)")


def notes_text(meta: dict, records: List[dict], model_records: List[dict], extra: List[str]) -> List[str]:
    m = meta["machine"]
    lines = [
        f"Machine: {m.get('processor')}, {m.get('cores')} cores, {m.get('threads')} torch threads, "
        f"{m.get('cpu_capability')}"
        + (f", float32 GEMM: {m['cpu_gemm']}" if m.get("cpu_gemm") and meta["device"] == "cpu" else "")
        + _sixteen_bit_gemm_text(meta)
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, torch_ext {m['torch_ext']}; git {str(meta['git_commit'])[:12]}"
        + (" (uncommitted changes)" if meta.get("git_dirty") else "") + f"; {meta['timestamp']}",
        f"Copy bandwidth {meta['copy_bandwidth'] / 1e9:.1f} GB/s (read + write), GEMM rate "
        f"{meta['gemm_flops'] / 1e9:.0f} GFLOP/s ({meta['gemm_shape']}, {meta['dtype']}), measured at start.",
        f"Load average (1, 5, 15 min) at start {meta['load_start']}, at end {meta['load_end']} (this run's own "
        f"threads included) on {m.get('cores')} cores"
        + (": other work was running, timings are noisy (the interleaved rounds keep the ratios fairer than the ms)."
           if meta["load_start"] and meta["load_start"][0] > 0.5 * (m.get("cores") or 1) else "."),
    ]
    if meta["device"] == "cpu":
        lines += thp.notes(meta["thp"], meta["thp_other_name"])
    if records:
        floors = "; ".join(f"{s.name}: {s.floor_text}" for s in OPS.values() if s.floor_text
                           and any(r["op"] == s.name for r in records))
        lines += [
            "Timing: ms = median over rounds (candidates interleaved, in a new random order each round) ± spread "
            "(interquartile range / median; full range with < 4 rounds). 'ours x eager' = median over rounds of "
            "eager time / ours time (> 1: ours is faster). fwd runs with autograd recording, as in training.",
            "Floors, for the fwd+bwd step: memory-bound losses: the bytes a step must move (read the inputs once, "
            "write the gradient once) / copy bandwidth"
            + (f"; {floors}, at the same shapes, on ATen's GEMM, timed in each round" if floors else "")
            + (" (in float32, on float32 copies of the operands, where torch_ext's 16-bit CPU products run that "
               "way: see the machine line)" if floors and _sixteen_bit_gemm_text(meta) else "")
            + ". '% of floor' = floor time / ours time (100% = at the floor; "
            "reads alone run faster than copies, so a loss can pass 100%; ours can pass it where its float32 CPU GEMMs "
            "run on torch_ext's own, 'float32 GEMM: ours' above). The JSON also has per-phase floors, each phase "
            "starting from the inputs.",
            "Saved = bytes of the tensors autograd saves for backward, beyond the inputs and parameters (tensors an "
            "op keeps by other means, e.g. gradients formed in the forward pass, are not counted there; peak counts "
            "them).",
        ]
        if meta.get("memory_method"):
            lines.append("Peak = " + meta["memory_method"] + ".")
        if meta["device"] == "cpu":
            lines.append(
                "Allocator: torch_ext keeps freed large CPU output buffers for reuse (torch_ext.empty_cache() "
                "releases them), so in the back-to-back steps timed here ours writes to memory that is already "
                "mapped, while eager gets fresh pages from the system for its large outputs every step (in 2 MiB "
                "pages with the baseline THP on, 4 KiB pages with it off). The peak-memory measurement empties "
                "that cache first."
            )
        used = {n for r in records for n in r.get("candidates", [])}
        lines += [note for key, (_, _, note) in PEERS.items() if note and key in used]
    if model_records:
        lines += model_notes(meta, model_records)
    if meta.get("memory_not_preloaded"):
        lines.append("The memory-measuring processes' server did not preload "
                     f"{', '.join(meta['memory_not_preloaded'])}: each process imported them itself (the same figures, "
                     "a slower memory phase).")
    lines += extra
    for r in records:
        for n in r.get("notes", []):
            lines.append(f"{r['op']} {r['case']}: {n}")
        if "error" in r:
            lines.append(f"{r['op']} {r['case']}: ERROR {r['error']}")
    for r in model_records:
        for n in r.get("notes", []):
            lines.append(f"model {r['model']}: {n}")
        if "error" in r:
            lines.append(f"model {r['model']}: ERROR {r['error']}")
    return lines


def model_notes(meta: dict, records: List[dict]) -> List[str]:
    lines = [
        "Models: one training step = zero_grad, forward with the loss, backward, AdamW step. Candidates: the "
        "model as written (eager), torch.compile(model) (compile), torch_ext.fuse(model) (fused) and "
        "torch.compile(torch_ext.fuse(model)) (fused+compile), each with its own copy of the model from the same "
        "seed and the same batch; 'first-step loss' is each one's loss before any update (the check: the fused "
        "ones must equal eager's). 'first step s' includes compiling. step ms = median over interleaved rounds ± "
        "spread; 'x eager' = median of the per-round ratios eager step / candidate step (> 1: faster); "
        "throughput = samples or tokens per step / median step.",
    ]
    if meta.get("model_memory_method"):
        lines.append("Model peak = " + meta["model_memory_method"] + ".")
    if meta.get("quick"):
        lines.append("--quick: the models are small (the 'quick' sizes of suite/models.py) and run without their "
                     "torch.compile candidates (compiling a model takes tens of seconds on 2 cores).")
    for r in records:
        against_compile = r.get("speedup", {}).get("vs_compile", {}).get("fused_compile")
        if against_compile is not None:
            lines.append(f"model {r['model']}: fused+compile against compile (both compiled): {fmt_x(against_compile)} "
                         "(median of the per-round ratios)")
        fuse = r.get("fuse")
        if fuse is not None:
            lines.append(f"model {r['model']}: fuse() replaced {len(fuse['replaced'])} "
                         + (f"({'; '.join(fuse['replaced'])})" if fuse["replaced"] else "")
                         + f", left alone {len(fuse['skipped'])}"
                         + (f" ({'; '.join(fuse['skipped'])})" if fuse["skipped"] else ""))
    return lines
