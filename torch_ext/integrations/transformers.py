"""Hugging Face transformers: what torch_ext.fuse needs to know about its modules.

- ACTIVATIONS: the classes of ``transformers.activations`` (what ``ACT2FN[...]`` gives) that
  compute one of FusedLinear's activations. Taken by class name, and fused only if they also pass
  fuse's numerical check (fuse/activations.py ``computes``), so that a release that changes a
  formula (FastGELUActivation's rounded constant, say) is not fused silently.
- ``Conv1D`` (GPT-2): a Linear whose weight is stored (in, out); FusedConv1D keeps that Parameter
  and hands its transposed view to fused_linear (no copy).
- The causal-LM loss without logits: see torch_ext/integrations/transformers_lm_head.py.

Imported only when a model holds a transformers module.
"""
from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from ..linear_act import fused_linear

MODULE_PREFIX = "transformers."

_SLOPE = 0.01
ACTIVATIONS = {
    "GELUActivation": ("gelu", _SLOPE),  # "gelu", "gelu_python"
    "NewGELUActivation": ("gelu_tanh", _SLOPE),  # "gelu_new" (GPT-2, T5 v1.1)
    "GELUTanh": ("gelu_tanh", _SLOPE),  # "gelu_pytorch_tanh" (Gemma)
    "PytorchGELUTanh": ("gelu_tanh", _SLOPE),  # its name in older releases
    "FastGELUActivation": ("gelu_tanh", _SLOPE),  # "gelu_fast": fused only if it matches gelu_tanh
    "SiLUActivation": ("silu", _SLOPE),  # "silu" (Llama, Mistral, Qwen2)
    "SiLU": ("silu", _SLOPE),
    "ReLU": ("relu", _SLOPE),
}


def linear_like(module) -> bool:
    return type(module) is Conv1D


class FusedConv1D(Conv1D):
    """transformers' Conv1D (weight (in, out), bias (out,)) followed by an activation, fused: the
    same Parameters and state_dict keys; fused_linear gets ``weight.t()``, a view."""

    def __init__(self, nf: int, nx: int, activation: str, negative_slope: float = _SLOPE):
        super().__init__(nf, nx)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, x):
        return fused_linear(x, self.weight.t(), self.bias, activation=self.activation, negative_slope=self.negative_slope)

    def __repr__(self) -> str:
        return f"FusedConv1D(nf={self.nf}, nx={self.nx}, activation={self.activation!r})"


def fused_linear_like(module: Conv1D, spec) -> FusedConv1D:
    """A FusedConv1D holding `module`'s own weight and bias (built on meta: nothing allocated)."""
    with torch.device("meta"):
        fused = FusedConv1D(module.nf, module.nx, spec[0], spec[1])
    fused.weight, fused.bias = module.weight, module.bias
    return fused.train(module.training)
