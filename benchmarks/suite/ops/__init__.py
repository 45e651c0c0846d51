"""The op cases: one file per op family, each with its sizes and a make_workload; this file
gathers them. Adding a family: a file like losses.py whose SPECS lists its OpSpec(s) (spec.py
says what each field is for), then its module in FAMILIES below. Adding a peer: peers.py."""
from __future__ import annotations

from typing import Callable, Dict

import torch

from ..workload import Workload
from . import linear_act, linear_cross_entropy, losses, mlp, peers
from .spec import OpSpec

FAMILIES = (linear_act, mlp, losses, linear_cross_entropy)  # table order
OPS: Dict[str, OpSpec] = {spec.name: spec for family in FAMILIES for spec in family.SPECS}
# smooth_l1 is huber / beta: same kernel; cross_entropy_capped (with options),
# cross_entropy_autocast and mse_autocast (bfloat16 inputs under autocast) are cross_entropy's and
# mse's kernels, run on request.
ON_REQUEST = ("smooth_l1", "cross_entropy_capped", "cross_entropy_autocast", "mse_autocast")
DEFAULT_OPS = [op for op in OPS if op not in ON_REQUEST]
ALIASES = {alias: spec.name for spec in OPS.values() for alias in spec.aliases}
SCENARIO_NAMES = ("cnn", "rnn", "ffn", "llm", "quick", "tiny")

# Candidate names -> display names, in table order; peers sit between compile and ours.
DISPLAY = {"eager": "eager", "compile": "compile", **{k: v[0] for k, v in peers.PEERS.items()}, "ours": "ours"}


def build_workload(op: str, params: tuple, dtype: torch.dtype, device: str) -> Workload:
    return peers.add_peers(op, OPS[op].build(params, dtype, device), device)


def candidate_fns(wl: Workload, compile_: bool) -> Dict[str, Callable]:
    """name -> function of the workload's inputs, in table order."""
    fns = {"eager": wl.fns["eager"]}
    if compile_:
        fns["compile"] = torch.compile(wl.fns["eager"], dynamic=False)
    fns.update((k, v) for k, v in wl.fns.items() if k not in fns)
    return fns


class Case:
    """One op case: an op family at one size (a scenario name, or "custom" for explicit sizes)."""

    def __init__(self, op: str, scenario: str, params: tuple):
        self.op, self.scenario, self.params = op, scenario, tuple(params)

    def label(self) -> str:
        text = OPS[self.op].label(self.params)
        return text if self.scenario == "custom" else f"{self.scenario} {text}"

    def __repr__(self) -> str:
        return f"Case({self.op!r}, {self.scenario!r}, {self.params!r})"
