"""Op family mlp: FusedMLP (the Transformer FFN, plain or gated), fc2(act(fc1(x))), against eager.

One step: forward and backward for x (M, K), fc1 (H or 2H for gated, K), fc2 (K, H). Floor: its
six bare GEMMs. Its "saved" bytes (beyond the input and the parameters) are what recompute=True
halves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_ext

from ..workload import Workload, gemm_operands
from .linear_act import EAGER_ACT
from .spec import OpSpec, dense_label

# name -> (M tokens, K model width, H hidden width, activation)
SCENARIOS = {
    "ffn": (4096, 256, 1024, "gelu"),      # ViT/BERT-style FFN (hidden = 4 x width), 4096 tokens
    "llm": (2048, 512, 1376, "swiglu"),    # LLaMA-style gated FFN (hidden = 8/3 x width)
    "quick": (1024, 128, 512, "gelu"),
    "tiny": (64, 128, 512, "gelu"),  # a small Transformer's feed-forward block: per-call cost decides
}


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


def make_workload(m, k, h, activation, dtype=torch.float32, device="cpu") -> Workload:
    torch.manual_seed(0)
    h1 = 2 * h if activation in torch_ext.GATED_ACTIVATIONS else h
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(h1, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    b1 = torch.randn(h1, device=device, dtype=dtype, requires_grad=True)
    w2 = (torch.randn(k, h, device=device, dtype=dtype) / h**0.5).requires_grad_()
    b2 = torch.randn(k, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(m, k, device=device, dtype=dtype)
    g_hidden = torch.randn(m, h1, device=device, dtype=dtype)
    xd, w1d, w2d, g_floor, g_hidden = gemm_operands(x.detach(), w1.detach(), w2.detach(), g, g_hidden)

    def floor_fwd():
        hidden = xd @ w1d.t()
        return hidden[:, :h] @ w2d.t(), hidden

    def floor_bwd(fwd):
        hidden = fwd[1][:, :h]
        return g_floor @ w2d, g_floor.t() @ hidden, g_hidden @ w1d, g_hidden.t() @ xd

    flops = 2 * m * k * (h1 + h)
    return Workload(
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


SPECS = [
    OpSpec(
        name="mlp", kind="dense", kernel="mlp_act_fwd", dims=3, dim_names="MxKxH[:activation]",
        scenarios=SCENARIOS, defaults=("tiny", "ffn", "llm"), make=make_workload, aliases=("fused_mlp",),
        activations=tuple(torch_ext.MLP_ACTIVATIONS), label=dense_label, floor_text="its six bare GEMMs",
    ),
]
