"""Op families cross_entropy, mse, huber, smooth_l1, triplet: the fused losses against F.*.

Each is one training step's loss: forward, then the gradient of the loss for the inputs that
require grad (cross_entropy: the logits, with class-index targets; mse, huber, smooth_l1: the
input, not the target; triplet: the anchor only). Memory-bound: the floor is the bytes a step
must move (bytes_per_phase) over the machine's copy bandwidth.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

import torch_ext

from ..workload import Workload
from .spec import OpSpec

SOFTCAP = 30.0  # Gemma 2's final_logit_softcapping


def _capped_eager(x, t):
    """Gemma 2's loss as eager PyTorch computes it, with the two numbers a trainer logs: the rows'
    logsumexp (z-loss monitoring) and the token accuracy."""
    capped = SOFTCAP * torch.tanh(x / SOFTCAP)
    loss = F.cross_entropy(capped, t)
    with torch.no_grad():
        lse = torch.logsumexp(capped, -1)
        accuracy = (capped.argmax(-1) == t).float().mean()
    del lse, accuracy
    return loss


def _capped_ours(x, t):
    loss, lse, accuracy = torch_ext.cross_entropy(x, t, softcap=SOFTCAP, return_lse=True, return_accuracy=True)
    return loss


def _under_autocast(loss: Callable) -> Callable:
    """`loss` under bfloat16 autocast, as a mixed-precision training step computes it: bfloat16
    logits or predictions (from autocast layers) go to the loss, which autocast runs in float32."""

    def run(x, t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return loss(x, t)

    return run


# op: (eager, ours)
FUNCTIONS: Dict[str, Tuple[Callable, Callable]] = {
    "cross_entropy": (lambda x, t: F.cross_entropy(x, t), lambda x, t: torch_ext.cross_entropy(x, t)),
    # softcap 30 plus the lse and accuracy outputs: what they add to the step (run it beside
    # cross_entropy: `--ops cross_entropy,cross_entropy_capped --sizes llm`)
    "cross_entropy_capped": (_capped_eager, _capped_ours),
    # bfloat16 logits under autocast (whatever --dtype): F.cross_entropy makes a float32 copy of
    # them; ours reads them as they are (`--ops cross_entropy_autocast --sizes llm`)
    "cross_entropy_autocast": (_under_autocast(F.cross_entropy), _under_autocast(torch_ext.cross_entropy)),
    "mse": (lambda x, y: F.mse_loss(x, y), lambda x, y: torch_ext.mse_loss(x, y)),
    # bfloat16 prediction and target under autocast (a diffusion model's noise prediction): F.mse_loss
    # makes float32 copies of both; ours reads them as they are (`--ops mse_autocast`)
    "mse_autocast": (_under_autocast(F.mse_loss), _under_autocast(torch_ext.mse_loss)),
    "huber": (lambda x, y: F.huber_loss(x, y), lambda x, y: torch_ext.huber_loss(x, y)),
    "smooth_l1": (lambda x, y: F.smooth_l1_loss(x, y), lambda x, y: torch_ext.smooth_l1_loss(x, y)),
    "triplet": (lambda a, p, n: F.triplet_margin_loss(a, p, n), lambda a, p, n: torch_ext.triplet_margin_loss(a, p, n)),
}

# op -> {name: (N, D)} (D: classes for cross_entropy).
REGRESSION_SCENARIOS = {
    "cnn": (32, 3 * 224 * 224),  # image reconstruction: a batch of 32 RGB 224x224 images
    "ffn": (4096, 4096),  # regression of Transformer hidden states
    "quick": (1024, 1024),
    "tiny": (32, 10),  # a small regression head
}
_CROSS_ENTROPY_SCENARIOS = {
    "cnn": (256, 1000),  # ImageNet classifier, batch 256
    "rnn": (2048, 10000),  # RNN language model (PTB/WikiText-2-size vocabulary), 2048 tokens
    "llm": (4096, 32000),  # LLM vocabulary, 4096 tokens
    "quick": (1024, 8000),
    "tiny": (32, 10),  # a CIFAR-10-sized classifier head: per-call cost decides
}
SCENARIOS: Dict[str, Dict[str, Tuple[int, int]]] = {
    "cross_entropy": _CROSS_ENTROPY_SCENARIOS,
    "cross_entropy_capped": _CROSS_ENTROPY_SCENARIOS,
    "cross_entropy_autocast": _CROSS_ENTROPY_SCENARIOS,
    "mse": REGRESSION_SCENARIOS,
    "mse_autocast": REGRESSION_SCENARIOS,
    "huber": REGRESSION_SCENARIOS,
    "smooth_l1": REGRESSION_SCENARIOS,
    "triplet": {
        "cnn": (8192, 512),  # CNN embeddings for metric learning
        "quick": (2048, 256),
        "tiny": (32, 128),
    },
}


def make_inputs(op: str, n: int, d: int, dtype: torch.dtype, device: str):
    """(all inputs, those that require grad), seeded."""
    torch.manual_seed(0)
    if op.endswith("_autocast"):
        dtype = torch.bfloat16
    if op.startswith("cross_entropy"):
        logits = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
        target = torch.randint(0, d, (n,), dtype=torch.int64, device=device)
        return (logits, target), (logits,)
    if op == "triplet":
        anchor = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
        positive = torch.randn(n, d, dtype=dtype, device=device)
        negative = torch.randn(n, d, dtype=dtype, device=device)
        return (anchor, positive, negative), (anchor,)
    x = torch.randn(n, d, dtype=dtype, device=device, requires_grad=True)
    y = torch.randn(n, d, dtype=dtype, device=device)  # |x - y| straddles delta = beta = 1: both branches run
    return (x, y), (x,)


def bytes_per_phase(op: str, n: int, d: int, dtype: torch.dtype) -> Dict[str, int]:
    """The least bytes each phase must move on its own ('fwd', 'bwd') and a fused step must move
    ('fwd+bwd'): every input read once, every gradient written once (a kernel that forms the
    gradient while the forward has the data in cache needs no more).
    cross_entropy: read the logits, write their gradient, read the targets: 2*N*C*e + N*8.
    mse / huber / smooth_l1: read input and target, write grad_input: 3*N*D*e.
    triplet: read anchor, positive, negative, write grad_anchor: 4*N*D*e.
    Forward alone reads the inputs; backward alone reads what the gradient needs and writes it.
    (e: the element size of `dtype`.)"""
    e = torch.finfo(dtype).bits // 8
    if op.startswith("cross_entropy"):
        fwd = n * d * e + n * 8
        return {"fwd": fwd, "bwd": fwd + n * d * e, "fwd+bwd": 2 * n * d * e + n * 8}
    if op == "triplet":
        fwd = 3 * n * d * e
        return {"fwd": fwd, "bwd": fwd + n * d * e, "fwd+bwd": 4 * n * d * e}
    return {"fwd": 2 * n * d * e, "bwd": 3 * n * d * e, "fwd+bwd": 3 * n * d * e}


def make_workload(op: str, n: int, d: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Workload:
    """The loss `op` at N x D: eager F.* and ours (torch_ext.*), gradients of the inputs that
    require grad, floor = bytes that must move / copy bandwidth."""
    eager, ours = FUNCTIONS[op]
    inputs, requires = make_inputs(op, n, d, dtype, device)
    dtype = inputs[0].dtype
    return Workload(
        label=f"{n}x{d} bf16 autocast" if op.endswith("_autocast") else f"{n}x{d}",
        inputs=inputs,
        requires=requires,
        exclude=inputs,
        fns={"eager": eager, "ours": ours},
        floor_bytes=bytes_per_phase(op, n, d, dtype),
    )


def _spec(op: str, kernel: str, defaults: Tuple[str, ...], aliases: Tuple[str, ...]) -> OpSpec:
    return OpSpec(
        name=op, kind="memory-bound", kernel=kernel, dims=2,
        dim_names="NxC" if op.startswith("cross_entropy") else "NxD",
        scenarios=SCENARIOS[op], defaults=defaults, make=functools.partial(make_workload, op), aliases=aliases,
        held="the anchor's gradient" if op == "triplet" else "the input's gradient",
    )


SPECS = [
    _spec("cross_entropy", "cross_entropy_fwd", ("tiny", "cnn", "rnn", "llm"), ()),
    _spec("cross_entropy_capped", "cross_entropy_fwd", (), ("ce_capped",)),
    _spec("cross_entropy_autocast", "cross_entropy_fwd", (), ("ce_autocast",)),
    _spec("mse", "regression_loss_fwd", ("tiny", "ffn"), ("mse_loss",)),
    _spec("mse_autocast", "regression_loss_fwd", (), ()),
    _spec("huber", "regression_loss_fwd", ("tiny", "ffn"), ("huber_loss",)),
    _spec("smooth_l1", "regression_loss_fwd", ("ffn",), ("smooth_l1_loss",)),
    _spec("triplet", "triplet_margin_loss_fwd", ("tiny", "cnn"), ("triplet_margin_loss",)),
]
