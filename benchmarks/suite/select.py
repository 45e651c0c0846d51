"""From the command line to what runs: the op cases, the model cases, the device."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .cli import UsageError
from .models import MODELS
from .ops import ALIASES, DEFAULT_OPS, OPS, SCENARIO_NAMES, Case

NONE = "none"


def _names(values: Sequence[str]) -> List[str]:
    """Comma- or space-separated names, lower-cased."""
    return [part.strip().lower() for v in values for part in v.split(",") if part.strip()]


def resolve_ops(names: Optional[Sequence[str]]) -> List[str]:
    if not names:
        return list(DEFAULT_OPS)
    given = _names(names)
    if given == [NONE]:
        return []
    ops = []
    for part in given:
        op = ALIASES.get(part, part)
        if op == "linear_cross_entropy" and op not in OPS:
            raise UsageError("op 'linear_cross_entropy': this torch_ext has no linear_cross_entropy (an older build?)")
        if op not in OPS:
            raise UsageError(f"unknown op {part!r}; ops are: {', '.join(OPS)} (or none)")
        if op not in ops:
            ops.append(op)
    if not ops:
        raise UsageError("--ops: no op given")
    return ops


def resolve_models(names: Optional[Sequence[str]], op_names: Optional[Sequence[str]] = None,
                   sizes: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """(model cases to run, notes about those skipped) for --models `names`. Default: every
    model, unless --ops naming ops (not none) or --sizes narrowed the run to op cases."""
    narrowed = bool(sizes) or (bool(op_names) and _names(op_names) != [NONE])
    if not names:
        chosen = [] if narrowed else list(MODELS)
    else:
        chosen = []
        given = _names(names)
        if given != [NONE]:
            for name in given:
                if name not in MODELS:
                    raise UsageError(f"--models: unknown model {name!r}; models are: {', '.join(MODELS)} (or none)")
                if name not in chosen:
                    chosen.append(name)
    notes = []
    for name in list(chosen):
        why = MODELS[name].available()
        if why is not None:
            chosen.remove(name)
            notes.append(f"model {name}: skipped, it {why}")
    return chosen, notes


def _parse_dims(spec: str, op: Optional[str]) -> Tuple[List[int], Optional[str]]:
    dims, _, activation = spec.partition(":")
    try:
        values = [int(v) for v in dims.lower().split("x")]
    except ValueError:
        names = ", ".join(SCENARIO_NAMES)
        raise UsageError(f"--sizes: {spec!r} is neither a size name ({names}) nor sizes like 4096x32000") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"--sizes: sizes must be positive, got {spec!r}")
    activation_ops = [o for o in OPS if OPS[o].activations]
    every = sorted({a for o in activation_ops for a in OPS[o].activations})
    if activation and activation not in every:
        raise UsageError(f"--sizes: unknown activation {activation!r} in {spec!r}; activations are {', '.join(every)}")
    if activation and op is not None and not OPS[op].activations:
        raise UsageError(
            f"--sizes: an activation (':{activation}') applies to {' and '.join(activation_ops)} only, not {op}")
    if activation and op is not None and activation not in OPS[op].activations:
        raise UsageError(f"--sizes: {activation!r} is not an activation of {op} (a gated activation, for mlp only)")
    return values, activation or None


def resolve_cases(ops: List[str], sizes: Optional[Sequence[str]], quick: bool) -> Tuple[List[Case], List[str]]:
    """Cases in op order, and notes about ops that got no size."""
    if not ops:
        if sizes:
            raise UsageError("--sizes: --ops none selects no op to size")
        return [], []
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
                has = ", ".join(OPS[targets[0]].scenarios)
                raise UsageError(f"--sizes: {targets[0]} has no size named {spec!r}; it has {has}")
            for op in hits:
                per_op[op].append(Case(op, spec.lower(), OPS[op].scenarios[spec.lower()]))
            continue
        values, activation = _parse_dims(spec, targets[0] if sep else None)
        hits = [op for op in targets if OPS[op].dims == len(values)
                and (activation is None or activation in (OPS[op].activations or ()))]
        if not hits:
            wanted = "; ".join(f"{op}: {OPS[op].dim_names}" for op in targets)
            raise UsageError(f"--sizes: {token!r} fits none of the selected ops ({wanted})")
        for op in hits:
            params = tuple(values)
            if OPS[op].activations:
                params = params + (activation or OPS[op].scenarios["quick"][3],)
            per_op[op].append(Case(op, "custom", params))
    cases = [c for op in ops for c in per_op[op]]
    notes = [f"{op}: none of --sizes applies (its sizes: {', '.join(OPS[op].scenarios)})"
             for op in ops if not per_op[op]]
    if not cases:
        raise UsageError("--sizes: no case to run; " + "; ".join(notes))
    return cases, notes


def resolve_device(name: str, ops: List[str]) -> Tuple[str, List[str], List[str]]:
    """(device, ops it can run, notes); UsageError when the device cannot run any."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}; use cpu or cuda (cuda:N)") from None
    if dev.type == "cpu":
        return "cpu", ops, []
    if dev.type != "cuda":
        raise UsageError(f"unsupported device {name!r}; use cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UsageError(
            f"--device {name}: no CUDA GPU is available (torch {torch.__version__}, {built}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_ext::{OPS[op].kernel}", "CUDA") for op in OPS}
    if not any(has.values()):
        raise UsageError(
            f"--device {name}: this torch_ext was built without CUDA kernels; rebuild it on a machine with "
            "nvcc and a CUDA build of torch: TORCH_EXT_CUDA=1 pip install --no-build-isolation ."
        )
    notes = [f"{op}: no CUDA kernel in this build, skipped" for op in ops if not has[op]]
    return str(dev), [op for op in ops if has[op]], notes


