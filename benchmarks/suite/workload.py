"""Workload: one op case's inputs and the candidates that compute the same thing from them."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import torch


@dataclasses.dataclass
class Workload:
    """One op case: inputs, the candidates that compute the same thing from them, and what bounds
    their speed. Built by each op family's make_workload (suite/ops/); measure_op.py times it.

    fns: name -> function of *inputs (at least "eager", PyTorch's own, and "ours", torch_ext's;
      peers are added by suite/ops/peers.py). torch.compile of "eager" is added by the runner.
    requires: the tensors among the inputs (or parameters) that gradients are taken for.
    grad_output: the gradient fed to backward for a non-scalar output; None for a scalar loss.
    exclude: storages that exist anyway (inputs, parameters), not counted as saved for backward.
    floor_fns: a timed floor as (forward, backward) callables (the bare GEMMs of a GEMM-bound op).
    floor_bytes / floor_flops: per phase ("fwd", "bwd", "fwd+bwd"), the bytes that must move
      (floor = bytes / copy bandwidth) or the FLOP that must be done (floor = FLOP / GEMM rate).
    """

    label: str
    inputs: Tuple[object, ...]
    requires: Tuple[torch.Tensor, ...]
    fns: Dict[str, Callable[..., torch.Tensor]]
    grad_output: Optional[torch.Tensor] = None
    exclude: Tuple[torch.Tensor, ...] = ()
    floor_fns: Optional[Tuple[Callable[[], object], Callable[[object], object]]] = None
    floor_bytes: Optional[Dict[str, int]] = None
    floor_flops: Optional[Dict[str, int]] = None

    def forward(self, fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        return lambda: fn(*self.inputs)

    def backward(self, out: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return torch.autograd.grad(out, self.requires, self.grad_output)

    def step(self, fn: Callable[..., torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """One training step of `fn`: forward, then the gradients of `requires`."""
        return self.backward(fn(*self.inputs))


def gemm_operands(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The operands a floor's bare GEMMs multiply: the tensors as they are, or float32 copies of
    16-bit CPU ones where torch_ext multiplies such matrices in float32 (ATen's GEMM of that dtype
    runs far below the float32 one there: csrc/matmul.h), so that the floor is the faster GEMM
    this machine has for the step, not the slow one. The copies are made here, once, untimed."""
    from torch_ext._common import cpu_products_in_float32

    first = tensors[0]
    if first.device.type == "cpu" and cpu_products_in_float32(first.dtype):
        return tuple(t.float() for t in tensors)
    return tensors
