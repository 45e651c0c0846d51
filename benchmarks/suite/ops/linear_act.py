"""Op family linear_act: fused dense + activation, act(x @ W.T + b), against act(F.linear(x, W, b))."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_ext

from ..workload import Workload, gemm_operands
from .spec import OpSpec, dense_label

EAGER_ACT = {
    "none": lambda t: t,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),  # as transformers' QuickGELUActivation
}

# name -> (M rows, K in features, N out features, activation)
SCENARIOS = {
    "cnn": (256, 2048, 1024, "relu"),  # CNN classifier head: pooled ResNet-50 features -> hidden, batch 256
    "rnn": (2048, 1024, 1024, "tanh"),  # RNN-style projection, 2048 tokens
    "ffn": (8192, 256, 256, "gelu_tanh"),  # Transformer FFN layer (the fused dense layer's goal case), 8192 tokens
    "quick": (1024, 256, 256, "gelu_tanh"),
    "tiny": (64, 128, 128, "relu"),  # a small MLP's hidden layer: per-call cost, not arithmetic, decides
}


def make_eager(activation):
    act = EAGER_ACT[activation]

    def eager(x, w, b):
        return act(F.linear(x, w, b))

    return eager


def make_workload(m, k, n, activation, dtype=torch.float32, device="cpu") -> Workload:
    """act(x @ W.T + b) for x (M, K), W (N, K), b (N,), backward from a random (M, N) gradient.
    Floor: the three bare GEMMs (x @ W.T forward; grad @ W and grad.T @ x backward)."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, n, device=device, dtype=dtype)
    xd, wd, g_floor = gemm_operands(x.detach(), w.detach(), g)
    return Workload(
        label=f"{m}x{k}->{n} {activation}",
        inputs=(x, w, b),
        requires=(x, w, b),
        grad_output=g,
        exclude=(x, w, b),
        fns={
            "eager": make_eager(activation),
            "ours": lambda x, w, b: torch_ext.fused_linear(x, w, b, activation),
        },
        floor_fns=(lambda: xd @ wd.t(), lambda _: (g_floor @ wd, g_floor.t() @ xd)),
        floor_flops={"fwd": 2 * m * k * n, "bwd": 4 * m * k * n, "fwd+bwd": 6 * m * k * n},
    )


SPECS = [
    OpSpec(
        name="linear_act", kind="dense", kernel="linear_act_fwd", dims=3, dim_names="MxKxN[:activation]",
        scenarios=SCENARIOS, defaults=("tiny", "cnn", "ffn"), make=make_workload, aliases=("dense", "fused_linear"),
        activations=tuple(torch_ext.ACTIVATIONS), label=dense_label,
        floor_text="its three bare GEMMs (forward; the two gradients)",
    ),
]
