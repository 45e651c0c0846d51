"""OpSpec: what the suite needs to know about one op family."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch

from ..workload import Workload


def plain_label(params: tuple) -> str:
    return "x".join(str(v) for v in params)


def dense_label(params: tuple) -> str:
    m, k, n, activation = params
    return f"{m}x{k}->{n} {activation}"


def head_label(params: tuple) -> str:
    n, h, v = params
    return f"{n}x{h}->{v}"


@dataclasses.dataclass
class OpSpec:
    """An op family: its sizes and how to build its Workload at one of them.

    kind: which floor applies ("dense" and "gemm-bound": timed bare GEMMs; "memory-bound": bytes
      / copy bandwidth). kernel: the torch_ext forward op, to see whether a device has a kernel.
    dims, dim_names: the numbers of an explicit --sizes value, and how the help names them.
    scenarios: size name -> params (the names of suite.ops.SCENARIO_NAMES, plus "quick" for
      --quick and "tiny", a small model's layer or head where the per-call cost decides, also the
      memory children's warm-up); defaults: the names the default run takes.
    make(*params, dtype=, device=) -> Workload. activations: the activations an explicit size
      may name (":gelu"), for the families whose params end in one. held: what ours forms in the
      forward pass and holds until backward, for the notes. floor_text: the floor, for the notes.
    """

    name: str
    kind: str
    kernel: str
    dims: int
    dim_names: str
    scenarios: Dict[str, tuple]
    defaults: Tuple[str, ...]
    make: Callable[..., Workload]
    aliases: Tuple[str, ...] = ()
    activations: Optional[Tuple[str, ...]] = None
    label: Callable[[tuple], str] = plain_label
    held: Optional[str] = None
    floor_text: Optional[str] = None

    def build(self, params: tuple, dtype: torch.dtype, device: str) -> Workload:
        return self.make(*params, dtype=dtype, device=device)
