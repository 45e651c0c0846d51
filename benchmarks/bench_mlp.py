"""FusedMLP (the Transformer FFN, plain or gated) vs PyTorch eager and torch.compile: the
workloads that benchmarks/run.py times as op family `mlp`:

    python benchmarks/run.py --ops mlp
    python benchmarks/run.py --ops mlp --sizes 4096x512x1376:swiglu

One step: fc2(act(fc1(x))) forward and backward for x (M, K), fc1 (H or 2H for gated, K),
fc2 (K, H). Floor: its six bare GEMMs. The table's "saved" column is the bytes autograd keeps
for backward beyond the input and the parameters, which recompute=True halves.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_linear_act import EAGER_ACT  # noqa: E402

import torch_ext  # noqa: E402

# name -> (M tokens, K model width, H hidden width, activation)
SCENARIOS = {
    "ffn": (4096, 256, 1024, "gelu"),      # ViT/BERT-style FFN (hidden = 4 x width), 4096 tokens
    "llm": (2048, 512, 1376, "swiglu"),    # LLaMA-style gated FFN (hidden = 8/3 x width)
    "quick": (1024, 128, 512, "gelu"),
    "tiny": (64, 32, 48, "swiglu"),
}
DEFAULT_SCENARIOS = ("ffn", "llm")


def make_eager(activation):
    gate = torch_ext.GATED_ACTIVATIONS.get(activation)
    act = EAGER_ACT[gate or activation]

    def eager(x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        if gate:
            u, v = h.chunk(2, dim=-1)
            h = act(u) * v
        else:
            h = act(h)
        return F.linear(h, w2, b2)

    return eager


def make_workload(m, k, h, activation, dtype=torch.float32, device="cpu") -> common.Workload:
    if activation not in torch_ext.MLP_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(torch_ext.MLP_ACTIVATIONS)}")
    torch.manual_seed(0)
    h1 = 2 * h if activation in torch_ext.GATED_ACTIVATIONS else h
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(h1, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    b1 = torch.randn(h1, device=device, dtype=dtype, requires_grad=True)
    w2 = (torch.randn(k, h, device=device, dtype=dtype) / h**0.5).requires_grad_()
    b2 = torch.randn(k, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, k, device=device, dtype=dtype)
    xd, w1d, w2d = x.detach(), w1.detach(), w2.detach()
    g_hidden = torch.randn(m, h1, device=device, dtype=dtype)

    def floor_fwd():
        hidden = xd @ w1d.t()
        return hidden[:, :h] @ w2d.t(), hidden

    def floor_bwd(fwd):
        hidden = fwd[1][:, :h]
        return g @ w2d, g.t() @ hidden, g_hidden @ w1d, g_hidden.t() @ xd

    flops = 2 * m * k * (h1 + h)
    return common.Workload(
        label=f"{m}x{k}->{h} {activation}",
        inputs=(x, w1, b1, w2, b2),
        requires=(x, w1, b1, w2, b2),
        grad_output=g,
        exclude=(x, w1, b1, w2, b2),
        fns={
            "eager": make_eager(activation),
            "ours": lambda x, w1, b1, w2, b2: torch_ext.fused_mlp(x, w1, b1, w2, b2, activation),
        },
        floor_fns=(floor_fwd, floor_bwd),
        floor_flops={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops},
    )
