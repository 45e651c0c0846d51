"""NAME.png: ours' fwd+bwd speed-ups and the peak memory per op case, and a panel for the models
(training-step speed-up against the unfused eager model, and peak memory, per candidate)."""
from __future__ import annotations

import math
from typing import List, Optional

from . import measure_model
from .ops import DISPLAY
from .report import peers_in

COLORS = {"eager": "#4c72b0", "compile": "#dd8452", "torch_chunked": "#55a868", "liger": "#8172b3", "ours": "#c44e52",
          "fused": "#c44e52", "fused_compile": "#937860"}


def _bars(ax, labels: List[str], series: List[tuple], ylabel: str, title: str, fmt, log: bool = True,
          one: bool = False) -> None:
    """Grouped bars, series = [(name, display, values)], one value per label; `one`: a line at 1."""
    width = 0.8 / max(1, len(series))
    xs = list(range(len(labels)))
    for i, (name, display, vals) in enumerate(series):
        bars = ax.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], vals, width, label=display,
                      color=COLORS.get(name))
        for b, v in zip(bars, vals):
            if math.isfinite(v):
                ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
    if one:
        ax.axhline(1.0, color="black", linewidth=0.8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend(fontsize=7)
    ax.grid(axis="y", which="both", alpha=0.3)


def _speedup(v: float) -> str:
    return f"{v:.2f}"


def _megabytes(v: float) -> str:
    return f"{v / 1024:.1f}G" if v >= 1024 else f"{v:.0f}M" if v >= 10 else f"{v:.1f}M"


def _mb(value: Optional[int]) -> float:
    """MB for a log axis (NaN where not measured; 0 drawn as 0.01)."""
    v = (value if value is not None else float("nan")) / 2**20
    return max(v, 0.01) if math.isfinite(v) else v


def write_chart(path: str, meta: dict, records: List[dict], model_records: List[dict]) -> Optional[str]:
    """Write the PNG; the reason when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or .[bench]): no chart"
    ok = [r for r in records if "error" not in r]
    models = [r for r in model_records if "error" not in r]
    if not ok and not models:
        return "no case ran: no chart"
    has_peak = any(r.get("peak_bytes") for r in ok)
    op_rows = (2 if has_peak else 1) if ok else 0
    rows = op_rows + (1 if models else 0)
    fig = plt.figure(figsize=(max(10, 1.6 * len(ok) + 2), 5 * rows))
    grid = fig.add_gridspec(rows, 2)
    if ok:
        labels = [f"{r['op']}\n{r['case'].replace(' ', chr(10), 1)}" for r in ok]
        others = ["eager", "compile"] + peers_in(ok)
        _bars(fig.add_subplot(grid[0, :]), labels,
              [(n, f"vs {DISPLAY[n]}", [r["speedup"].get(f"vs_{n}", {}).get("fwd+bwd", float("nan")) for r in ok])
               for n in others],
              "speed-up of torch_ext (x, > 1: faster)", "op cases, fwd+bwd step: speed-up of torch_ext, median of "
              "per-round ratios", _speedup, one=True)
        if has_peak:
            _bars(fig.add_subplot(grid[1, :]), labels,
                  [(n, DISPLAY[n], [_mb(r.get("peak_bytes", {}).get(n)) for r in ok]) for n in others + ["ours"]],
                  "peak memory of the step (MB)",
                  "op cases: peak memory of one fwd+bwd step beyond inputs and parameters (%s)"
                  % ("peak RSS, fresh process each" if meta["device"] == "cpu" else "peak CUDA allocated"), _megabytes)
    if models:
        labels = [f"{r['model']}\n{r['units_per_step']} {r['unit']}" for r in models]
        names = [n for n in measure_model.CANDIDATES if any(n in r["candidates"] for r in models)]
        _bars(fig.add_subplot(grid[op_rows, 0]), labels,
              [(n, measure_model.DISPLAY[n],
                [1.0 if n == "eager" else r["speedup"]["vs_eager"].get(n, float("nan")) for r in models])
               for n in names],
              "throughput / unfused eager (x)", "models, training step: speed-up against the unfused eager model",
              _speedup, log=False, one=True)
        if any(r.get("peak_bytes") for r in models):
            _bars(fig.add_subplot(grid[op_rows, 1]), labels,
                  [(n, measure_model.DISPLAY[n], [_mb(r.get("peak_bytes", {}).get(n)) for r in models]) for n in names],
                  "peak memory of the step (MB)", "models: peak memory of one training step", _megabytes)
    m = meta["machine"]
    where = m.get("gpu") or f"{m.get('processor')}, {m.get('threads')} threads"
    thp_text = f", THP_MEM_ALLOC_ENABLE={meta['thp']['THP_MEM_ALLOC_ENABLE']}" if meta.get("thp") else ""
    fig.suptitle(f"torch_ext {m['torch_ext']} vs PyTorch {m['torch']}: {where}, {meta['dtype']}{thp_text}, "
                 f"{meta['timestamp'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
