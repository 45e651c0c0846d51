"""Op family linear_cross_entropy: cross_entropy(x @ W.T, target) without the N x V logits,
against F.cross_entropy(F.linear(x, W), target) (and PyTorch's chunked path, a peer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_ext

from ..workload import Workload, gemm_operands
from .spec import OpSpec, head_label

SCENARIOS = {  # name -> (N rows, H hidden, V vocabulary)
    "rnn": (2048, 512, 10000),  # RNN language model head (PTB/WikiText-2-size vocabulary)
    # LLM vocabulary head, 2048 tokens. Its goal case has 4096 (--sizes linear_cross_entropy=4096x512x32000):
    # the same work per token and so the same ratios, where 4096 made it by far the default run's longest case.
    "llm": (2048, 512, 32000),
    "quick": (1024, 256, 8000),
    "tiny": (64, 128, 1000),  # a small classifier head with its loss
}


def make_workload(n: int, h: int, v: int, dtype=torch.float32, device="cpu") -> Workload:
    """cross_entropy(x @ W.T, target) for x (N, H), W (V, H); gradients of x and W.
    Floor: the three bare GEMMs at the same shapes (logits = x @ W.T; grad @ W; grad.T @ x), timed."""
    torch.manual_seed(0)
    x = torch.randn(n, h, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(v, h, dtype=dtype, device=device) / h**0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    xd, wd = gemm_operands(x.detach(), w.detach())
    grad_logits = []  # made on first use: only the floor needs it

    def floor_fwd():
        if not grad_logits:
            grad_logits.append(torch.randn(n, v, dtype=xd.dtype, device=device))
        return xd @ wd.t()

    def floor_bwd(_):
        g = grad_logits[0]
        return g @ wd, g.t() @ xd

    return Workload(
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


# An older torch_ext build may lack the op: then the family is not offered.
SPECS = [
    OpSpec(
        name="linear_cross_entropy", kind="gemm-bound", kernel="linear_cross_entropy_fwd", dims=3,
        dim_names="NxHxV", scenarios=SCENARIOS, defaults=("tiny", "llm"), make=make_workload, aliases=("lce",),
        label=head_label, floor_text="its three bare GEMMs (forward; the two gradients)",
    ),
] if hasattr(torch_ext, "linear_cross_entropy") else []
