"""Whole-model training steps: the unfused model against the same model through torch_ext.fuse().

    python benchmarks/bench_models.py                    # every case whose libraries are installed
    python benchmarks/bench_models.py --cases llama --rounds 7 --save

A step is what a training loop does: zero the gradients, forward (with the loss), backward,
AdamW step. The candidates run interleaved, in a new random order each round
(common.time_interleaved), so drift on a shared machine hits both alike; the figures are medians
over rounds, with their spread (interquartile range / median), and the speed-up is the median of
the ratios taken within each round. Peak memory is measured in a fresh process per
candidate (spawned): build the model, one warm-up step (optimizer state exists after it), return freed
memory (torch_ext.empty_cache, malloc_trim), reset the peak RSS, one step; the peak minus the
resident size before the step. Before timing, the fused model's loss is checked against the
unfused one's on the same batch.

Cases:
- llama: transformers' LlamaForCausalLM from a config (random init, nothing downloaded), 2
  layers, hidden 256, intermediate 688, 4 heads, vocabulary 32000, 4 x 512 tokens, labels = the
  inputs (HF shifts them). fuse() turns each LlamaMLP into a gated FusedMLP and computes the loss
  from the hidden states with linear_cross_entropy instead of the 2048 x 32000 logits.

Run it with THP_MEM_ALLOC_ENABLE=1 for PyTorch's best-configured baseline (the script sets it
before importing torch unless told otherwise, and records the setting).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: PyTorch's huge-page knob

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch_ext  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class ModelCase:
    """A model family's training step: build(seed) -> (model, batch: dict of forward kwargs),
    with `tokens` tokens (or samples) per step; `requires` names the import it needs."""

    name: str
    description: str
    build: Callable[[int], tuple]
    tokens: int
    unit: str
    requires: Optional[str] = None


def _llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(seed))
    return model, {"input_ids": ids, "labels": ids}


CASES: Dict[str, ModelCase] = {
    "llama": ModelCase("llama", "Llama causal LM, 2 layers, hidden 256, vocab 32000, 4x512 tokens",
                       _llama, 4 * 512, "tokens", requires="transformers"),
}


def available(case: ModelCase) -> bool:
    if case.requires is None:
        return True
    try:
        __import__(case.requires)
    except ImportError:
        return False
    return True


def make_candidate(case: ModelCase, fused: bool, seed: int = 0):
    """(step function, model, batch, fuse report or None) of one candidate."""
    model, batch = case.build(seed)
    report = None
    if fused:
        model, report = torch_ext.fuse(model, inplace=True, return_report=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        return loss

    return step, model, batch, report


def _peak_child(case_name: str, fused: bool, queue) -> None:
    step, *_ = make_candidate(CASES[case_name], fused)
    step()
    torch_ext.empty_cache()
    common.release_free_memory()
    before = common.rss_bytes()
    ok = common.reset_peak_rss()
    step()
    peak = common.peak_rss_bytes()
    queue.put(max(0, peak - before) if ok and peak is not None and before is not None else None)


def peak_step_bytes(case_name: str, fused: bool) -> Optional[int]:
    """Peak RSS of one training step above the resident size before it, in a fresh process
    (spawned: a fork of this process, whose OpenMP threads have run, can hang in the child)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(case_name, fused, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 and not queue.empty() else None


def run_case(case: ModelCase, rounds: int) -> dict:
    unfused, model_u, batch, _ = make_candidate(case, fused=False)
    fused, model_f, _, report = make_candidate(case, fused=True)
    # Same initial weights (same seed), same batch: the losses must agree before timing means anything.
    with torch.no_grad():
        lu, lf = model_u(**batch).loss.item(), model_f(**batch).loss.item()
    if abs(lu - lf) > 1e-4 * max(1.0, abs(lu)):
        raise SystemExit(f"{case.name}: fused loss {lf} differs from unfused {lu}")
    samples = common.time_interleaved({"eager": unfused, "fused": fused}, warmup=1, rounds=rounds, min_round_s=0.0)
    result = {
        "case": case.name,
        "description": case.description,
        "unit": case.unit,
        "tokens_per_step": case.tokens,
        "loss": {"eager": lu, "fused": lf},
        "replaced": len(report.replaced),
        "left_alone": len(report.skipped),
        "seconds": {k: common.median(v) for k, v in samples.items()},
        "spread": {k: common.spread(v) for k, v in samples.items()},
        "speedup": common.ratio(samples, "eager", "fused"),
        "peak_bytes": {"eager": peak_step_bytes(case.name, False), "fused": peak_step_bytes(case.name, True)},
    }
    result["throughput"] = {k: case.tokens / s for k, s in result["seconds"].items()}
    return result


def render(results: List[dict], meta: dict) -> str:
    lines = [f"# bench_models {meta['time']}  torch {meta['torch']}  torch_ext {meta['torch_ext']}  "
             f"THP_MEM_ALLOC_ENABLE={meta['thp']}  threads {meta['threads']}  load {meta['load']}"]
    for r in results:
        pe, pf = r["peak_bytes"]["eager"], r["peak_bytes"]["fused"]
        mem = (f"peak {pe / 2**20:.0f} MB -> {pf / 2**20:.0f} MB ({pf / pe:.2f}x)" if pe and pf else "peak n/a")
        lines.append(
            f"{r['case']:<8} {r['description']}: fuse() replaced {r['replaced']}, left alone {r['left_alone']}; "
            f"step eager {r['seconds']['eager'] * 1e3:.0f} ms ±{r['spread']['eager']:.0%}, "
            f"fused {r['seconds']['fused'] * 1e3:.0f} ms ±{r['spread']['fused']:.0%}: {r['speedup']:.2f}x "
            f"({r['throughput']['eager']:.0f} -> {r['throughput']['fused']:.0f} {r['unit']}/s); {mem}; "
            f"loss {r['loss']['eager']:.6f} vs {r['loss']['fused']:.6f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), help=f"cases (default all: {' '.join(CASES)})")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default %(default)s)")
    p.add_argument("--save", action="store_true", help="append the table to benchmarks/results/models_cpu.txt "
                   "and write models_cpu.json")
    args = p.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    results = []
    for name in args.cases:
        case = CASES[name]
        if not available(case):
            print(f"{name}: skipped, needs {case.requires} (pip install {case.requires})")
            continue
        results.append(run_case(case, args.rounds))
    meta = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "torch_ext": torch_ext.__version__, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "threads": torch.get_num_threads(), "load": common.load_average(), **common.machine_info()}
    text = render(results, meta)
    print(text)
    if args.save and results:
        with open(os.path.join(RESULTS, "models_cpu.txt"), "a") as f:
            f.write(text + "\n\n")
        with open(os.path.join(RESULTS, "models_cpu.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
