#!/usr/bin/env python
"""torch_ext benchmark suite: every op family against PyTorch eager, torch.compile and peers.

    python benchmarks/run.py                          # the default run (under 3 minutes on 2 CPU cores)
    python benchmarks/run.py --quick                  # small sizes, 3 rounds (under 30 s)
    python benchmarks/run.py --ops cross_entropy linear_cross_entropy --sizes llm
    python benchmarks/run.py --sizes cross_entropy=8192x50257 linear_act=4096x512x2048:gelu
    python benchmarks/run.py --device cuda --dtype bfloat16

Each case is one training step of an op family at a representative size: forward (with autograd
recording, as in training), backward, and the two together, for
  eager          PyTorch's own functions (torch.nn.functional)
  compile        torch.compile of that same eager function (compiled before timing)
  torch chunked  F.linear_cross_entropy with LinearCrossEntropyOptions() (PyTorch >= 2.13)
  Liger          Liger-Kernel's fused ops (CUDA, when installed)
  ours           torch_ext
Timing: the candidates run interleaved, in a new random order each round; each figure is the
median over rounds, with its spread; speed-ups are taken within each round, then their median.
Floors: bytes that must move / measured copy bandwidth for the memory-bound losses; the bare
GEMMs (timed in each round at the same shapes) for dense, mlp and linear_cross_entropy.
Memory: bytes autograd saves for backward, and the peak memory of one forward+backward step
(CPU: peak RSS, each candidate in a fresh process; CUDA: peak allocated).

Sizes (--sizes NAME picks it for every op that has it; default: the starred ones):
  linear_act            cnn* 256x2048->1024 relu, rnn 2048x1024->1024 tanh, ffn* 8192x256->256 gelu_tanh
  cross_entropy         cnn* 256x1000, rnn* 2048x10000, llm* 4096x32000
  mse, huber, smooth_l1 cnn 32x150528, ffn* 4096x4096   (smooth_l1 only when named in --ops)
  triplet               cnn* 8192x512
  linear_cross_entropy  rnn 2048x512->10000, llm* 4096x512->32000   (N x H -> vocabulary V)
  mlp                   ffn* 4096x256->1024 gelu, llm* 2048x512->1376 swiglu   (M x K -> hidden H)
  every op: quick (the --quick size), tiny (for tests)
Explicit sizes: MxKxN[:activation] for linear_act, MxKxH[:activation] for mlp, NxHxV for linear_cross_entropy, NxD for the
others; prefix with OP= to apply to one op only.

Writes NAME.json (every figure, machine, versions, git commit, time, load), NAME.txt (the tables)
and NAME.png (chart of speed-ups and peak memory) to --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_linear_act  # noqa: E402
import bench_mlp  # noqa: E402
import bench_losses  # noqa: E402
import common  # noqa: E402
import torch_ext  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PHASES = common.PHASES
HAS_LCE = hasattr(torch_ext, "linear_cross_entropy")
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")

# Display names of the candidates, in table order; peers sit between compile and ours.
DISPLAY = {
    "eager": "eager",
    "compile": "compile",
    "torch_chunked": "torch chunked",
    "liger": "Liger",
    "ours": "ours",
}


class UsageError(Exception):
    """Bad command line: printed as one message, exit status 2."""


# --------------------------------------------------------------------------------------------
# Op families


@dataclasses.dataclass
class OpSpec:
    name: str
    kind: str  # "dense", "memory-bound", "gemm-bound": what floor applies
    kernel: str  # the torch_ext forward op, to see whether a device has a kernel for it
    dims: int  # numbers in an explicit size
    dim_names: str
    scenarios: Dict[str, tuple]
    defaults: Tuple[str, ...]
    build: Callable[..., common.Workload]  # build(params, dtype, device)


def _liger():
    """Liger-Kernel's functional ops, or None where it is not installed (it needs CUDA + Triton)."""
    try:
        from liger_kernel.transformers import functional as lf  # type: ignore
    except Exception:  # noqa: BLE001 (not installed, or broken: no peer)
        return None
    return lf


def _first(out):
    """Liger's functionals return (loss, z_loss) in some versions."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_peers(op: str, wl: common.Workload, device: str) -> common.Workload:
    """Add the peers of `op` that this machine has."""
    fns = {"eager": wl.fns["eager"]}
    if op == "linear_cross_entropy" and HAS_TORCH_LCE:
        options = torch.nn.LinearCrossEntropyOptions()
        fns["torch_chunked"] = lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)
    lf = _liger() if device.startswith("cuda") else None
    if lf is not None and op == "cross_entropy" and hasattr(lf, "liger_cross_entropy"):
        fns["liger"] = lambda x, t: _first(lf.liger_cross_entropy(x, t))
    if lf is not None and op == "linear_cross_entropy" and hasattr(lf, "liger_fused_linear_cross_entropy"):
        fns["liger"] = lambda x, w, t: _first(lf.liger_fused_linear_cross_entropy(x, w, t))
    fns["ours"] = wl.fns["ours"]
    wl.fns = fns
    return wl


LCE_SCENARIOS = {
    "rnn": (2048, 512, 10000),  # RNN language model head (PTB/WikiText-2-size vocabulary)
    "llm": (4096, 512, 32000),  # LLM vocabulary head (the goal of issue 5)
    "quick": (1024, 256, 8000),
    "tiny": (64, 32, 100),
}


def make_lce_workload(n: int, h: int, v: int, dtype=torch.float32, device="cpu") -> common.Workload:
    """cross_entropy(x @ W.T, target) for x (N, H), W (V, H); gradients of x and W.
    Floor: the three bare GEMMs at the same shapes (logits = x @ W.T; grad @ W; grad.T @ x), timed."""
    torch.manual_seed(0)
    x = torch.randn(n, h, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(v, h, dtype=dtype, device=device) / h**0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    xd, wd = x.detach(), w.detach()
    grad_logits = []  # made on first use: only the floor needs it

    def floor_fwd():
        if not grad_logits:
            grad_logits.append(torch.randn(n, v, dtype=dtype, device=device))
        return xd @ wd.t()

    def floor_bwd(_):
        g = grad_logits[0]
        return g @ wd, g.t() @ xd

    return common.Workload(
        label=f"{n}x{h}->{v}",
        inputs=(x, w, t),
        requires=(x, w),
        exclude=(x, w, t),
        fns={
            "eager": lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
            "ours": lambda x, w, t: torch_ext.linear_cross_entropy(x, w, t),
        },
        floor_fns=(floor_fwd, floor_bwd),
        floor_flops={"fwd": 2 * n * h * v, "bwd": 4 * n * h * v, "fwd+bwd": 6 * n * h * v},
    )


def _loss_spec(op: str, kernel: str) -> OpSpec:
    return OpSpec(
        name=op,
        kind="memory-bound",
        kernel=kernel,
        dims=2,
        dim_names="NxC" if op == "cross_entropy" else "NxD",
        scenarios=bench_losses.SCENARIOS[op],
        defaults=bench_losses.DEFAULT_SCENARIOS[op],
        build=lambda p, dtype, device: bench_losses.make_workload(op, p[0], p[1], dtype, device),
    )


def _dense_spec(op: str, kernel: str, dim_names: str, module) -> OpSpec:
    """A GEMM + activation family whose benchmark module has SCENARIOS, DEFAULT_SCENARIOS and
    make_workload(m, k, n, activation, dtype, device); floor: its bare GEMMs."""
    return OpSpec(
        name=op,
        kind="dense",
        kernel=kernel,
        dims=3,
        dim_names=dim_names,
        scenarios=module.SCENARIOS,
        defaults=module.DEFAULT_SCENARIOS,
        build=lambda p, dtype, device: module.make_workload(*p, dtype=dtype, device=device),
    )


OPS: Dict[str, OpSpec] = {
    "linear_act": _dense_spec("linear_act", "linear_act_fwd", "MxKxN[:activation]", bench_linear_act),
    "mlp": _dense_spec("mlp", "mlp_act_fwd", "MxKxH[:activation]", bench_mlp),
    "cross_entropy": _loss_spec("cross_entropy", "cross_entropy_fwd"),
    "mse": _loss_spec("mse", "regression_loss_fwd"),
    "huber": _loss_spec("huber", "regression_loss_fwd"),
    "smooth_l1": _loss_spec("smooth_l1", "regression_loss_fwd"),
    "triplet": _loss_spec("triplet", "triplet_margin_loss_fwd"),
}
if HAS_LCE:
    OPS["linear_cross_entropy"] = OpSpec(
        name="linear_cross_entropy",
        kind="gemm-bound",
        kernel="linear_cross_entropy_fwd",
        dims=3,
        dim_names="NxHxV",
        scenarios=LCE_SCENARIOS,
        defaults=("llm",),
        build=lambda p, dtype, device: make_lce_workload(*p, dtype=dtype, device=device),
    )
DEFAULT_OPS = [op for op in OPS if op != "smooth_l1"]  # smooth_l1 is huber / beta: same kernel
ALIASES = {
    "dense": "linear_act",
    "fused_linear": "linear_act",
    "mse_loss": "mse",
    "huber_loss": "huber",
    "smooth_l1_loss": "smooth_l1",
    "triplet_margin_loss": "triplet",
    "lce": "linear_cross_entropy",
    "fused_mlp": "mlp",
}
# Ops whose explicit sizes take an activation (":gelu"), and the ones each accepts.
ACTIVATION_OPS = {"linear_act": torch_ext.ACTIVATIONS, "mlp": torch_ext.MLP_ACTIVATIONS}
SCENARIO_NAMES = ("cnn", "rnn", "ffn", "llm", "quick", "tiny")


def build_workload(op: str, params: tuple, dtype: torch.dtype, device: str) -> common.Workload:
    return _with_peers(op, OPS[op].build(params, dtype, device), device)


def candidate_fns(wl: common.Workload, compile_: bool) -> Dict[str, Callable]:
    """name -> function of the workload's inputs, in table order."""
    fns = {"eager": wl.fns["eager"]}
    if compile_:
        fns["compile"] = torch.compile(wl.fns["eager"], dynamic=False)
    fns.update((k, v) for k, v in wl.fns.items() if k not in fns)
    return fns


# --------------------------------------------------------------------------------------------
# Command line


@dataclasses.dataclass
class Case:
    op: str
    scenario: str  # a scenario name, or "custom"
    params: tuple

    def label(self) -> str:
        p = self.params
        if self.op in ACTIVATION_OPS:
            text = f"{p[0]}x{p[1]}->{p[2]} {p[3]}"
        elif self.op == "linear_cross_entropy":
            text = f"{p[0]}x{p[1]}->{p[2]}"
        else:
            text = "x".join(str(v) for v in p)
        return text if self.scenario == "custom" else f"{self.scenario} {text}"


def resolve_ops(names: Optional[Sequence[str]]) -> List[str]:
    if not names:
        return list(DEFAULT_OPS)
    ops = []
    for name in names:
        for part in name.split(","):
            part = part.strip().lower()
            if not part:
                continue
            op = ALIASES.get(part, part)
            if op == "linear_cross_entropy" and not HAS_LCE:
                raise UsageError("op 'linear_cross_entropy': this torch_ext has no linear_cross_entropy (an older build?)")
            if op not in OPS:
                raise UsageError(f"unknown op {part!r}; ops are: {', '.join(OPS)}")
            if op not in ops:
                ops.append(op)
    if not ops:
        raise UsageError("--ops: no op given")
    return ops


def _parse_dims(spec: str, op: Optional[str]) -> Tuple[List[int], Optional[str]]:
    dims, _, activation = spec.partition(":")
    try:
        values = [int(v) for v in dims.lower().split("x")]
    except ValueError:
        raise UsageError(f"--sizes: {spec!r} is neither a size name ({', '.join(SCENARIO_NAMES)}) nor sizes like 4096x32000")
    if any(v <= 0 for v in values):
        raise UsageError(f"--sizes: sizes must be positive, got {spec!r}")
    if activation and activation not in torch_ext.MLP_ACTIVATIONS:
        raise UsageError(f"--sizes: unknown activation {activation!r} in {spec!r}; activations are {', '.join(torch_ext.MLP_ACTIVATIONS)}")
    if activation and op is not None and op not in ACTIVATION_OPS:
        raise UsageError(f"--sizes: an activation (':{activation}') applies to {' and '.join(ACTIVATION_OPS)} only, not {op}")
    if activation and op == "linear_act" and activation not in torch_ext.ACTIVATIONS:
        raise UsageError(f"--sizes: {activation!r} is a gated activation, for mlp only")
    return values, activation or None


def resolve_cases(ops: List[str], sizes: Optional[Sequence[str]], quick: bool) -> Tuple[List[Case], List[str]]:
    """Cases in op order, and notes about ops that got no size."""
    if not sizes:
        names = ["quick"] if quick else None
        cases = [Case(op, s, OPS[op].scenarios[s]) for op in ops for s in (names or OPS[op].defaults)]
        return cases, []
    per_op: Dict[str, List[Case]] = {op: [] for op in ops}
    for token in (t for s in sizes for t in s.split(",") if t.strip()):
        token = token.strip()
        name, sep, rest = token.partition("=")
        if sep:
            op = ALIASES.get(name.strip().lower(), name.strip().lower())
            if op not in OPS:
                raise UsageError(f"--sizes: unknown op {name!r} in {token!r}; ops are: {', '.join(OPS)}")
            if op not in per_op:
                raise UsageError(f"--sizes: {token!r} names op {op}, which --ops does not select")
            targets, spec = [op], rest.strip()
        else:
            targets, spec = list(ops), token
        if spec.lower() in SCENARIO_NAMES:
            hits = [op for op in targets if spec.lower() in OPS[op].scenarios]
            if sep and not hits:
                raise UsageError(f"--sizes: {targets[0]} has no size named {spec!r}; it has {', '.join(OPS[targets[0]].scenarios)}")
            for op in hits:
                per_op[op].append(Case(op, spec.lower(), OPS[op].scenarios[spec.lower()]))
            continue
        values, activation = _parse_dims(spec, targets[0] if sep else None)
        hits = [op for op in targets if OPS[op].dims == len(values)
                and (activation is None or activation in ACTIVATION_OPS.get(op, ()))]
        if not hits:
            wanted = "; ".join(f"{op}: {OPS[op].dim_names}" for op in targets)
            raise UsageError(f"--sizes: {token!r} fits none of the selected ops ({wanted})")
        for op in hits:
            params = tuple(values)
            if op in ACTIVATION_OPS:
                params = params + (activation or OPS[op].scenarios["quick"][3],)
            per_op[op].append(Case(op, "custom", params))
    cases = [c for op in ops for c in per_op[op]]
    notes = [f"{op}: none of --sizes applies (its sizes: {', '.join(OPS[op].scenarios)})" for op in ops if not per_op[op]]
    if not cases:
        raise UsageError("--sizes: no case to run; " + "; ".join(notes))
    return cases, notes


def resolve_device(name: str, ops: List[str]) -> Tuple[str, List[str], List[str]]:
    """(device, ops it can run, notes); UsageError when the device cannot run any."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}; use cpu or cuda (cuda:N)")
    if dev.type == "cpu":
        return "cpu", ops, []
    if dev.type != "cuda":
        raise UsageError(f"unsupported device {name!r}; use cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UsageError(f"--device {name}: no CUDA GPU is available (torch {torch.__version__}, {built}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_ext::{OPS[op].kernel}", "CUDA") for op in ops}
    if not any(has.values()):
        raise UsageError(
            f"--device {name}: this torch_ext was built without CUDA kernels; rebuild it on a machine with "
            "nvcc and a CUDA build of torch: TORCH_EXT_CUDA=1 pip install --no-build-isolation ."
        )
    notes = [f"{op}: no CUDA kernel in this build, skipped" for op in ops if not has[op]]
    return str(dev), [op for op in ops if has[op]], notes


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"op families to run (default: {' '.join(DEFAULT_OPS)})")
    p.add_argument("--sizes", nargs="+", metavar="SIZE", help="size names or explicit sizes, see above")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float64; float16 on CUDA")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="the quick sizes, 3 rounds: a check that everything runs")
    p.add_argument("--rounds", type=int, help="most timing rounds per case (default 10; 3 with --quick)")
    p.add_argument("--case-seconds", type=float, help="timing budget per case, which sets its rounds between 3 "
                   "and --rounds (default 10; 1.5 with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the results (default benchmarks/results)")
    p.add_argument("--name", help="file name of the results, without extension (default: the device, with _quick, "
                   "_<dtype> or _custom appended for such runs)")
    args = p.parse_args(argv)
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; use {', '.join(DTYPES)}")
    if args.rounds is not None and args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if args.case_seconds is not None and args.case_seconds <= 0:
        raise UsageError("--case-seconds must be positive")
    return args


# --------------------------------------------------------------------------------------------
# Measuring one case

TOLERANCES = {  # (rtol, atol relative to the largest |expected|), as tests/utils.py
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 2e-2),  # eager and ours each round to bfloat16: a few ulps apart
    torch.float16: (2e-3, 1e-3),
}


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


def first_call(wl: common.Workload, fn: Callable, device: str):
    """One timed step, also recording the bytes saved for backward: (results, (fwd s, bwd s), saved)."""
    excluded = {t.untyped_storage().data_ptr() for t in wl.exclude if isinstance(t, torch.Tensor)}
    seen: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and storage.nbytes() > 0:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    common.sync(device)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*wl.inputs)
    common.sync(device)
    t1 = time.perf_counter()
    grads = wl.backward(out)
    common.sync(device)
    t2 = time.perf_counter()
    return (out.detach(),) + tuple(grads), (t1 - t0, t2 - t1), sum(seen.values())


def run_case(case: Case, cfg, machine, progress) -> dict:
    spec = OPS[case.op]
    dtype, device = cfg.dtype, cfg.device
    record = {
        "op": case.op, "scenario": case.scenario, "params": list(case.params), "case": case.label(),
        "kind": spec.kind, "dtype": cfg.dtype_name, "device": device, "notes": [],
    }
    clock = time.perf_counter()
    stages = record["stage_s"] = {}

    def lap(stage):
        nonlocal clock
        now = time.perf_counter()
        stages[stage] = round(now - clock, 2)
        clock = now

    torch._dynamo.reset()  # each case compiles afresh, statically for its shapes
    wl = build_workload(case.op, case.params, dtype, device)
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
                message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                if name in ("eager", "ours"):
                    record["error"] = f"{DISPLAY[name]} failed: {message}"
                    return record
                record["notes"].append(f"{DISPLAY[name]} left out: {message}")
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
                t = common.time_step(f_fwd, f_bwd, device)
                first["floor"] = min(first.get("floor", t), t, key=sum)
                if sum(t) >= 0.5:
                    break
        del reference
        # Rounds: as many as fit the case budget, at least 3 (or --rounds if fewer).
        calls = {name: common.calls_per_round(sum(t), cfg.min_round_s) for name, t in first.items()}
        round_s = sum(calls[name] * sum(first[name]) for name in first)
        rounds = max(min(3, cfg.rounds), min(cfg.rounds, int(cfg.case_seconds / max(round_s, 1e-9))))
        candidates = {name: (wl.forward(fn), wl.backward) for name, fn in fns.items()}
        if wl.floor_fns is not None:
            candidates["floor"] = wl.floor_fns
        lap("warm-up")
        progress.stage(f"timing, {rounds} rounds")
        samples = common.time_phases(
            candidates, device=device, rounds=rounds, calls=calls, warmup=0, min_round_s=cfg.min_round_s,
            on_round=lambda r: progress.stage(f"timing, round {r + 1}/{rounds}"),
        )
        lap("timing")
        for w in caught:
            text = f"warning: {str(w.message).strip().splitlines()[0]}"
            if text not in record["notes"]:
                record["notes"].append(text)
    names = [n for n in fns]
    record["candidates"] = names
    record["rounds"] = rounds
    record["calls_per_round"] = calls
    record["check"] = check
    record["time_ms"] = {
        name: {
            phase: {
                "median": 1e3 * common.median(samples[name][phase]),
                "spread": common.spread(samples[name][phase]),
                "samples": [1e3 * s for s in samples[name][phase]],
            }
            for phase in PHASES
        }
        for name in samples
    }
    record["speedup"] = {
        f"vs_{name}": {phase: common.ratio_of(samples[name][phase], samples["ours"][phase]) for phase in PHASES}
        for name in names if name != "ours"
    }
    record["saved_bytes"] = {name: saved.get(name) for name in names}
    ours_ms = {phase: record["time_ms"]["ours"][phase]["median"] for phase in PHASES}
    if "floor" in samples:
        record["floor"] = {
            "kind": "bare GEMMs, timed", "flops": wl.floor_flops,
            "ms": {phase: record["time_ms"]["floor"][phase]["median"] for phase in PHASES},
        }
        record["floor_fraction"] = {phase: common.ratio_of(samples["floor"][phase], samples["ours"][phase]) for phase in PHASES}
    elif wl.floor_flops is not None:
        ms = {phase: 1e3 * wl.floor_flops[phase] / machine["gemm_flops"] for phase in PHASES}
        record["floor"] = {"kind": "FLOP / GEMM rate", "flops": wl.floor_flops, "ms": ms}
        record["floor_fraction"] = {phase: ms[phase] / ours_ms[phase] for phase in PHASES}
    elif wl.floor_bytes is not None:
        ms = {phase: 1e3 * wl.floor_bytes[phase] / machine["copy_bandwidth"] for phase in PHASES}
        record["floor"] = {"kind": "bytes / copy bandwidth", "bytes": wl.floor_bytes, "ms": ms}
        record["floor_fraction"] = {phase: ms[phase] / ours_ms[phase] for phase in PHASES}
    early = [DISPLAY[n] for n in names if record["time_ms"][n]["bwd"]["median"] < 0.05 * record["time_ms"][n]["fwd+bwd"]["median"]]
    if early:
        record["notes"].append(
            f"{', '.join(early)}: backward under 5% of the step (the gradients are formed in the forward pass): "
            "compare fwd+bwd, not the phases"
        )
    held = None  # the gradient ours forms in the forward pass and holds until backward
    if case.op == "triplet":
        held = "the anchor's gradient"
    elif case.op in ("cross_entropy", "mse", "huber", "smooth_l1"):
        held = "the input's gradient"
    if held is not None:
        n, d = case.params
        record["notes"].append(
            f"ours forms {held} in the forward pass and holds it until backward "
            f"({n * d * dtype.itemsize / 2**20:.1f} MB), which 'saved' does not count (peak does)"
        )
    del wl, fns, candidates, samples
    gc.collect()
    return record


# --------------------------------------------------------------------------------------------
# Peak memory of one step. CPU: in a fresh process per candidate, forked from a server process that
# has only imported torch and torch_ext, so that nothing another candidate allocated (nor
# torch_ext's cache of freed buffers, nor glibc's free lists) is reused. CUDA: in this process.

MEMORY_METHOD_CPU = (
    "peak RSS of one fwd+bwd step in a fresh process per candidate: build the inputs, one warm-up step "
    "(at the tiny size, to initialize libraries; at the measured size for torch.compile, which compiles "
    "per shape), torch_ext.empty_cache() and malloc_trim(0), reset the peak RSS (/proc/self/clear_refs), "
    "one step; peak RSS minus RSS before the step (inputs and parameters excluded, their gradients included)"
)
MEMORY_METHOD_CPU_NO_RESET = (
    "peak RSS of one fwd+bwd step in a fresh process per candidate (this kernel cannot reset the peak: "
    "the step's peak is known only when it exceeds the peak of building the inputs and the warm-up, else "
    "not reported); peak RSS minus RSS before the step"
)
MEMORY_METHOD_CUDA = (
    "peak allocated CUDA memory of one fwd+bwd step after a warm-up step: torch.cuda.reset_peak_memory_stats, "
    "max_memory_allocated minus memory_allocated before the step"
)


def _step_peak(case: Case, name: str, dtype: torch.dtype, device: str) -> dict:
    wl = build_workload(case.op, case.params, dtype, device)
    fn = candidate_fns(wl, name == "compile")[name]
    if name == "compile" or device.startswith("cuda"):
        wl.step(fn)
    else:
        tiny = build_workload(case.op, OPS[case.op].scenarios["tiny"], dtype, device)
        tiny.step(candidate_fns(tiny, False)[name])
        del tiny
    gc.collect()
    torch_ext.empty_cache()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = wl.step(fn)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del grads
        gc.collect()
        return {"peak": peak, "retained": torch.cuda.memory_allocated() - base, "method": MEMORY_METHOD_CUDA}
    common.release_free_memory()
    base = common.rss_bytes()
    if base is None:
        return {"error": "no /proc/self/status: peak RSS is measured on Linux only"}
    reset = common.reset_peak_rss()
    before = common.peak_rss_bytes()
    grads = wl.step(fn)
    peak = common.peak_rss_bytes()
    del grads
    gc.collect()
    retained = common.rss_bytes() - base
    if reset:  # (the counters are approximate: a step that allocates nothing new may read a hair under 0)
        return {"peak": max(0, peak - base), "retained": retained, "method": MEMORY_METHOD_CPU}
    if peak > before:
        return {"peak": peak - base, "retained": retained, "method": MEMORY_METHOD_CPU_NO_RESET}
    return {"peak": None, "retained": retained, "method": MEMORY_METHOD_CPU_NO_RESET,
            "error": "the step did not exceed the earlier peak"}


def _memory_child(conn, case: Case, name: str, dtype_name: str, device: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conn.send(_step_peak(case, name, DTYPES[dtype_name], device))
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


_FORKSERVER = None


def _forkserver(compile_: bool):
    global _FORKSERVER
    if _FORKSERVER is None:
        try:
            ctx = multiprocessing.get_context("forkserver")
        except ValueError:  # no fork on this platform: each child imports everything itself
            _FORKSERVER = multiprocessing.get_context("spawn")
            return _FORKSERVER
        main = sys.modules.get("__main__")
        preload = ["torch", "torch_ext", "common", "bench_linear_act", "bench_losses", "bench_mlp"]
        if compile_:  # importing torch.compile's machinery once here, not in each child, saves ~2 s a child
            preload += ["torch._dynamo", "torch._functorch.aot_autograd", "torch._inductor.compile_fx",
                        "torch._inductor.codecache"]
        if getattr(main, "__file__", None):
            preload.insert(0, "__main__")
        ctx.set_forkserver_preload(preload)
        _FORKSERVER = ctx
    return _FORKSERVER


def measure_memory(jobs: List[Tuple[Case, str]], cfg, on_done: Callable[[int, dict], None]) -> None:
    """Peak memory of each (case, candidate) job; on_done(job index, result) as each finishes.
    CPU: one fresh process per job, up to cfg.memory_jobs at a time (nothing else runs then, and
    peak RSS is per process). CUDA: one job after the other in this process."""
    if cfg.device.startswith("cuda"):
        for i, (case, name) in enumerate(jobs):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = _step_peak(case, name, cfg.dtype, cfg.device)
            except Exception as e:  # noqa: BLE001
                result = {"error": f"{type(e).__name__}: {e}"}
            gc.collect()
            torch.cuda.empty_cache()
            on_done(i, result)
        return
    ctx = _forkserver(any(name == "compile" for _, name in jobs))
    pending = list(enumerate(jobs))
    running = {}  # connection -> (index, process, start time)
    failed_once = set()  # a job whose process failed is run once more; a second failure is reported
    while pending or running:
        while pending and len(running) < cfg.memory_jobs:
            i, (case, name) = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_child, args=(child, case, name, cfg.dtype_name, cfg.device), daemon=True)
            proc.start()
            child.close()
            running[parent] = (i, proc, time.perf_counter())
        ready = multiprocessing.connection.wait(list(running), timeout=1.0)
        for conn in list(running):
            i, proc, start = running[conn]
            result = None
            if conn in ready:
                try:
                    result = conn.recv()
                except EOFError:
                    result = {"error": f"the measuring process ended without a result (exit code {proc.exitcode})"}
            elif time.perf_counter() - start > cfg.memory_timeout_s:
                result = {"error": f"the measuring process took over {cfg.memory_timeout_s:.0f} s"}
            if result is None:
                continue
            del running[conn]
            conn.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            if result.get("peak") is None and i not in failed_once:
                failed_once.add(i)
                pending.append((i, jobs[i]))
                continue
            on_done(i, result)


def run_memory(cases: List[Case], records: List[dict], cfg, progress) -> None:
    """Peak memory of every candidate of every case that ran, into the records."""
    jobs, where = [], []
    for case, r in zip(cases, records):
        if "error" in r:
            continue
        r["peak_bytes"], r["retained_bytes"] = {}, {}
        for name in r["candidates"]:
            if name == "compile" and cfg.quick:
                continue  # each would compile in its own process: not in the quick run
            jobs.append((case, name))
            where.append(r)
    if not jobs:
        return
    start = time.perf_counter()
    progress.begin_memory(len(jobs))

    def done(i, m):
        r, (case, name) = where[i], jobs[i]
        r["peak_bytes"][name] = m.get("peak")
        r["retained_bytes"][name] = m.get("retained")
        if m.get("error"):
            r["notes"].append(f"peak memory of {DISPLAY[name]} not measured: {m['error']}")
        if m.get("method"):
            r["memory_method"] = m["method"]
        progress.memory_done(f"{case.op} {case.label()}: {DISPLAY[name]}")

    measure_memory(jobs, cfg, done)
    for r in records:
        if "stage_s" in r:
            r["stage_s"]["memory (all cases)"] = round(time.perf_counter() - start, 1)


# --------------------------------------------------------------------------------------------
# Output


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
    peers = peers_in(records)
    others = ["eager", "compile"] + peers
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
        row = [r["op"], r["case"]] + [fmt_bytes(r["saved_bytes"].get(n)) if n in r["candidates"] else "-" for n in names]
        if has_peak:
            peak = r.get("peak_bytes", {})
            row += [fmt_bytes(peak.get(n)) if n in r["candidates"] else "-" for n in names]
            e, o = peak.get("eager"), peak.get("ours")
            row += [f"{o / e:.2f}" if e and o is not None and e > 0 else "-"]
        row += [r["check"]]
        rows.append(row)
    return render(headers, rows, left=2)


def notes_text(meta: dict, records: List[dict], extra: List[str]) -> List[str]:
    m = meta["machine"]
    lines = [
        f"Machine: {m.get('processor')}, {m.get('cores')} cores, {m.get('threads')} torch threads, "
        f"{m.get('cpu_capability')}"
        + (f", float32 GEMM: {m['cpu_gemm']}" if m.get("cpu_gemm") and meta["device"] == "cpu" else "")
        + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, torch_ext {m['torch_ext']}; git {str(meta['git_commit'])[:12]}"
        + (" (uncommitted changes)" if meta.get("git_dirty") else "") + f"; {meta['timestamp']}",
        f"Copy bandwidth {meta['copy_bandwidth'] / 1e9:.1f} GB/s (read + write), GEMM rate "
        f"{meta['gemm_flops'] / 1e9:.0f} GFLOP/s ({meta['gemm_shape']}, {meta['dtype']}), measured at start.",
        f"Load average (1, 5, 15 min) at start {meta['load_start']}, at end {meta['load_end']} (this run's own "
        f"threads included) on {m.get('cores')} cores"
        + (": other work was running, timings are noisy (the interleaved rounds keep the ratios fairer than the ms)."
           if meta["load_start"] and meta["load_start"][0] > 0.5 * (m.get("cores") or 1) else "."),
        "Timing: ms = median over rounds (candidates interleaved, in a new random order each round) ± spread "
        "(interquartile range / median; full range with < 4 rounds). 'ours x eager' = median over rounds of "
        "eager time / ours time (> 1: ours is faster). fwd runs with autograd recording, as in training.",
        "Floors, for the fwd+bwd step: memory-bound losses: the bytes a step must move (read the inputs once, "
        "write the gradient once) / copy bandwidth; linear_act and linear_cross_entropy: their three bare GEMMs "
        "(forward; the two gradients), mlp: its six, at the same shapes, on ATen's GEMM, timed in each round. '% of "
        "floor' = floor time / ours time (100% = at the floor; reads alone run faster than copies, so a loss can pass "
        "100%; ours can pass it where its float32 CPU GEMMs run on torch_ext's own, 'float32 GEMM: ours' above). "
        "The JSON also has per-phase floors, each phase starting from the inputs.",
        "Saved = bytes of the tensors autograd saves for backward, beyond the inputs and parameters (tensors an "
        "op keeps by other means, e.g. gradients formed in the forward pass, are not counted there; peak counts them).",
    ]
    if meta.get("memory_method"):
        lines.append("Peak = " + meta["memory_method"] + ".")
    if meta["device"] == "cpu":
        lines.append(
            "Allocator: torch_ext keeps freed large CPU output buffers for reuse (torch_ext.empty_cache() "
            "releases them), so in the back-to-back steps timed here ours writes to memory that is already "
            "mapped, while eager gets fresh pages from the OS for its large outputs and pays their page faults "
            "every step. The peak-memory measurement empties that cache first."
        )
    if any("torch_chunked" in r.get("candidates", []) for r in records):
        lines.append(
            "torch chunked: F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions()), PyTorch's "
            "chunked path with its default options; it computes the gradients during the forward pass (its "
            "backward only hands them over), so compare it on fwd+bwd."
        )
    lines += extra
    for r in records:
        for n in r.get("notes", []):
            lines.append(f"{r['op']} {r['case']}: {n}")
        if "error" in r:
            lines.append(f"{r['op']} {r['case']}: ERROR {r['error']}")
    return lines


def write_chart(path: str, meta: dict, records: List[dict]) -> Optional[str]:
    """PNG of ours' fwd+bwd speed-ups and of peak memory per case; the reason when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or .[bench]): no chart"
    ok = [r for r in records if "error" not in r]
    if not ok:
        return "no case ran: no chart"
    labels = [f"{r['op']}\n{r['case'].replace(' ', chr(10), 1)}" for r in ok]
    others = ["eager", "compile"] + peers_in(ok)
    colors = {"eager": "#4c72b0", "compile": "#dd8452", "torch_chunked": "#55a868", "liger": "#8172b3", "ours": "#c44e52"}
    has_peak = any(r.get("peak_bytes") for r in ok)
    fig, axes = plt.subplots(2 if has_peak else 1, 1, figsize=(max(8, 1.6 * len(ok) + 2), 10 if has_peak else 5.5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(others)
    xs = list(range(len(ok)))
    for i, n in enumerate(others):
        vals = [r["speedup"].get(f"vs_{n}", {}).get("fwd+bwd", float("nan")) for r in ok]
        bars = ax.bar([x + (i - (len(others) - 1) / 2) * width for x in xs], vals, width, label=f"vs {DISPLAY[n]}",
                      color=colors.get(n))
        for b, v in zip(bars, vals):
            if math.isfinite(v):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up of torch_ext (x, > 1: faster)")
    ax.set_title("fwd+bwd step: speed-up of torch_ext, median of per-round ratios")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    if has_peak:
        ax = axes[1][0]
        names = others + ["ours"]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [(r.get("peak_bytes", {}).get(n) or float("nan")) / 2**20 for r in ok]
            vals = [max(v, 0.01) if math.isfinite(v) else v for v in vals]
            bars = ax.bar([x + (i - (len(names) - 1) / 2) * width for x in xs], vals, width, label=DISPLAY[n],
                          color=colors.get(n))
            for b, v in zip(bars, vals):
                if math.isfinite(v):
                    text = f"{v / 1024:.1f}G" if v >= 1024 else f"{v:.0f}M" if v >= 10 else f"{v:.1f}M"
                    ax.annotate(text, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel("peak memory of the step (MB)")
        ax.set_title("peak memory of one fwd+bwd step beyond inputs and parameters (%s)"
                     % ("peak RSS, fresh process each" if meta["device"] == "cpu" else "peak CUDA allocated"))
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    m = meta["machine"]
    where = m.get("gpu") or f"{m.get('processor')}, {m.get('threads')} threads"
    fig.suptitle(f"torch_ext {m['torch_ext']} vs PyTorch {m['torch']}: {where}, {meta['dtype']}, "
                 f"{meta['timestamp'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A tqdm bar over the cases when tqdm is installed and stderr is a terminal, else one line per stage."""

    def __init__(self, total: int):
        self.total, self.done, self.case = total, 0, ""
        self.bar = None
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr, disable=None, dynamic_ncols=True)
            if self.bar.disable:
                self.bar = None
        except ImportError:
            pass
        self.last_line = 0.0

    def start(self, case: str) -> None:
        self.case = case
        if self.bar is not None:
            self.bar.set_description(case)
        else:
            print(f"[{self.done + 1}/{self.total}] {case}", file=sys.stderr, flush=True)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def finish_case(self, summary: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.write(summary)
            self.bar.update(1)
        else:
            print(f"    {summary}", file=sys.stderr, flush=True)

    def begin_memory(self, jobs: int) -> None:
        """Switch to counting the peak-memory processes."""
        if self.bar is not None:
            self.bar.close()
            from tqdm import tqdm

            self.bar = tqdm(total=jobs, unit="process", file=sys.stderr, dynamic_ncols=True, desc="peak memory")
        else:
            print(f"peak memory: {jobs} fresh processes", file=sys.stderr, flush=True)

    def memory_done(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    dtype: torch.dtype
    dtype_name: str
    device: str
    compile: bool
    memory: bool
    rounds: int
    case_seconds: float
    min_round_s: float
    quick: bool = False
    memory_jobs: int = 2
    memory_timeout_s: float = 600.0


def default_name(args, device: str) -> str:
    name = device.split(":")[0]
    if args.quick:
        name += "_quick"
    if args.dtype != "float32":
        name += f"_{args.dtype}"
    if args.ops or args.sizes or args.no_compile or args.no_memory:
        name += "_custom"
    return name


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv if argv is not None else sys.argv[1:])
    ops = resolve_ops(args.ops)
    device, ops, device_notes = resolve_device(args.device, ops)
    if args.dtype == "float16" and device == "cpu":
        raise UsageError("--dtype float16: torch_ext has no float16 CPU kernels (float32, bfloat16, float64 on CPU)")
    cases, size_notes = resolve_cases(ops, args.sizes, args.quick)
    dtype = DTYPES[args.dtype]
    cfg = Config(
        dtype=dtype, dtype_name=args.dtype, device=device, compile=not args.no_compile, memory=not args.no_memory,
        rounds=args.rounds or (3 if args.quick else 10),
        case_seconds=args.case_seconds or (1.5 if args.quick else 10.0),
        min_round_s=0.02 if args.quick else 0.05, quick=args.quick,
    )
    name = args.name or default_name(args, device)
    os.makedirs(args.out, exist_ok=True)

    load_start = common.load_average()
    machine = common.machine_info(device)
    print(f"torch_ext benchmarks: {len(cases)} cases on {device} ({machine.get('gpu') or machine.get('processor')}, "
          f"{machine['threads']} threads), {args.dtype}; measuring copy bandwidth and GEMM rate...", file=sys.stderr, flush=True)
    bandwidth = common.copy_bandwidth(device, rounds=3 if args.quick else 7)
    gemm_n = 2048
    gemm = common.gemm_rate(device, n=gemm_n, dtype=dtype, rounds=3 if args.quick else 5)
    gc.collect()
    commit, dirty = common.git_commit(ROOT)
    meta = {
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py"] + list(argv if argv is not None else sys.argv[1:])),
        "git_commit": commit, "git_dirty": dirty,
        "machine": machine, "device": device, "dtype": args.dtype,
        "copy_bandwidth": bandwidth, "gemm_flops": gemm, "gemm_shape": f"{gemm_n}x{gemm_n}x{gemm_n}",
        "load_start": load_start, "load_end": None,
        "compile": cfg.compile, "rounds_max": cfg.rounds, "case_seconds": cfg.case_seconds,
        "min_round_s": cfg.min_round_s,
        "timing_method": "common.time_phases: candidates interleaved in a new random order each round; each "
                         "call times forward and backward apart; ratios per round, then their median",
        "memory_method": None,
        "has_linear_cross_entropy": HAS_LCE, "has_torch_chunked_lce": HAS_TORCH_LCE,
    }
    machine_info = {"copy_bandwidth": bandwidth, "gemm_flops": gemm}

    records = []
    progress = Progress(len(cases))
    try:
        for case in cases:
            progress.start(f"{case.op} {case.label()}")
            try:
                r = run_case(case, cfg, machine_info, progress)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 (one case failing does not stop the others)
                r = {"op": case.op, "scenario": case.scenario, "params": list(case.params), "case": case.label(),
                     "kind": OPS[case.op].kind, "dtype": args.dtype, "device": device, "notes": [],
                     "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            records.append(r)
            gc.collect()
            torch_ext.empty_cache()
            if "error" in r:
                progress.finish_case(f"{case.op} {case.label()}: ERROR {r['error']}")
            else:
                sp = r["speedup"]
                text = ", ".join(f"x{DISPLAY[k[3:]]} {v['fwd+bwd']:.2f}" for k, v in sp.items())
                progress.finish_case(f"{case.op} {case.label()}: ours {fmt_ms(r['time_ms']['ours']['fwd+bwd'])} ms "
                                     f"fwd+bwd ({text}); check {r['check']}")
        if cfg.memory:
            run_memory(cases, records, cfg, progress)
            meta["memory_method"] = next((r["memory_method"] for r in records if r.get("memory_method")), None)
    finally:
        progress.close()
    torch._dynamo.reset()
    meta["load_end"] = common.load_average()
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    extra = device_notes + size_notes
    if cfg.quick and cfg.memory and cfg.compile:
        extra.append("--quick: the peak memory of torch.compile is not measured (each would compile in its own process).")
    notes = notes_text(meta, records, extra)
    text = "\n".join(
        [f"$ {meta['command']}", "", "Time per step (ms)", time_table(records), "",
         "Memory per step and correctness (check: ours' output and gradients against eager's)", memory_table(records),
         ""] + [f"- {n}" for n in notes] + [f"- Elapsed: {meta['elapsed_s']:.0f} s."]
    )
    print(text)
    base = os.path.join(args.out, name)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "notes": notes, "results": records}, f, indent=1)
        f.write("\n")
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    written = [base + ".json", base + ".txt"]
    why_not = write_chart(base + ".png", meta, records)
    if why_not:
        print(f"note: {why_not}", file=sys.stderr)
    else:
        written.append(base + ".png")
    print("wrote " + ", ".join(os.path.relpath(p) for p in written), file=sys.stderr)
    failed = [r for r in records if "error" in r or r.get("check", "ok") != "ok"]
    if failed:
        print(f"{len(failed)} case(s) failed or differ from eager: "
              + "; ".join(f"{r['op']} {r['case']}" for r in failed), file=sys.stderr)
        return 1
    return 0


def cli(argv=None) -> int:
    """main() with bad input turned into one message and exit status 2, never a traceback."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"benchmarks/run.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks/run.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
