"""Sample inputs of every public op, for the device-generic checks of test_common.py.

Each op family lists samples: a call of torch_ext's function and of PyTorch's own on the same
inputs, built for any device and dtype from one seeded generator (the same values on every
device). The family test files keep the cases only one op has (its options, its edge cases,
its saved-memory figures); what every op must do is checked once, here, on every device.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, FrozenSet, List, Tuple

import torch
import torch.nn.functional as F

import torch_ext
from utils import act_fn


@dataclass
class Sample:
    fn: Callable  # torch_ext's call: fn(*inputs) -> one tensor
    reference: Callable  # PyTorch's: reference(*inputs) -> the same
    inputs: List[torch.Tensor]  # floating ones are differentiable, except those in `fixed`
    fixed: FrozenSet[int] = frozenset()  # indices of floating inputs not differentiated (class weights)
    names: Tuple[str, ...] = ()  # each input's argument name in torch_ext's function


# family -> the names of its inputs in the order its samples list them (the public argument names)
INPUT_NAMES = {
    "fused_linear": ("input", "weight", "bias"),
    "fused_mlp": ("input", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
    "cross_entropy": ("input", "target", "weight"),
    "regression_loss": ("input", "target"),
    "triplet_margin_loss": ("anchor", "positive", "negative"),
    "linear_cross_entropy": ("input", "linear_weight", "target", "weight", "linear_bias"),
}


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _to(tensors, device, dtype):
    return [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in tensors]


# Each maker: (generator) -> (fn, reference, CPU float64 inputs[, fixed]). Smooth activations only: a
# relu kink flips with rounding, which the dense families' own tests handle.
def _dense(activation, shape, bias=True):
    def make(gen):
        x, w = _rand(gen, *shape), _rand(gen, 9, shape[-1]) / 3
        b = _rand(gen, 9) if bias else None

        def ours(x, w, *b):
            return torch_ext.fused_linear(x, w, b[0] if b else None, activation)

        def ref(x, w, *b):
            return act_fn(activation)(F.linear(x, w, b[0] if b else None))

        return ours, ref, [x, w] + ([b] if bias else [])

    return make


def _mlp(activation, gated):
    def make(gen):
        x = _rand(gen, 3, 5, 8)
        hidden = 12
        w1, b1 = _rand(gen, 2 * hidden if gated else hidden, 8) / 3, _rand(gen, 2 * hidden if gated else hidden)
        w2, b2 = _rand(gen, 6, hidden) / 3, _rand(gen, 6)
        name = {"silu": "swiglu", "gelu": "geglu"}[activation] if gated else activation

        def ours(x, w1, b1, w2, b2):
            return torch_ext.fused_mlp(x, w1, b1, w2, b2, name)

        def ref(x, w1, b1, w2, b2):
            pre = F.linear(x, w1, b1)
            if gated:
                u, v = pre.chunk(2, -1)
                return F.linear(act_fn(activation)(u) * v, w2, b2)
            return F.linear(act_fn(activation)(pre), w2, b2)

        return ours, ref, [x, w1, b1, w2, b2]

    return make


def _cross_entropy(shape, probabilities=False, weighted=False, **options):
    def make(gen):
        x = _rand(gen, *shape) * 2
        c = shape[1] if len(shape) > 1 else shape[0]
        if probabilities:
            t = torch.softmax(_rand(gen, *shape), 1 if len(shape) > 1 else 0)
        else:
            t = torch.randint(0, c, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=gen)
            if "ignore_index" in options and t.dim() > 0:
                t[0] = options["ignore_index"]
        ours_options = dict(options)
        z_loss = ours_options.pop("z_loss", 0.0)

        def ours(x, t, *w):
            return torch_ext.cross_entropy(x, t, *w, z_loss=z_loss, **ours_options)

        def ref(x, t, *w):
            loss = F.cross_entropy(x, t, *w, **ours_options)
            if z_loss:  # z_loss * logsumexp^2 per row, reduced like the loss (no weights, nothing ignored)
                lse = torch.logsumexp(x, 1 if x.dim() > 1 else 0)
                loss = loss + z_loss * (lse.square().mean() if options.get("reduction", "mean") == "mean" else
                                        lse.square().sum())
            return loss

        if weighted:
            return ours, ref, [x, t, torch.rand(c, generator=gen) + 0.5], frozenset({2})
        return ours, ref, [x, t]

    return make


def _regression(name, reduction, shape=(4, 7), **options):
    def make(gen):
        x, t = _rand(gen, *shape), _rand(gen, *shape)
        ours_fn, ref_fn = getattr(torch_ext, name), getattr(F, name)

        def ours(x, t):
            return ours_fn(x, t, reduction=reduction, **options)

        def ref(x, t):
            return ref_fn(x, t, reduction=reduction, **options)

        return ours, ref, [x, t]

    return make


def _triplet(reduction, swap=False, p=2.0):
    def make(gen):
        a, pos, neg = _rand(gen, 5, 16), _rand(gen, 5, 16), _rand(gen, 5, 16)

        def ours(a, pos, neg):
            return torch_ext.triplet_margin_loss(a, pos, neg, margin=1.5, p=p, swap=swap, reduction=reduction)

        def ref(a, pos, neg):
            return F.triplet_margin_loss(a, pos, neg, margin=1.5, p=p, swap=swap, reduction=reduction)

        return ours, ref, [a, pos, neg]

    return make


def _linear_cross_entropy(reduction, bias=True, probabilities=False, **options):
    def make(gen):
        x, w = _rand(gen, 2, 7, 16), _rand(gen, 23, 16) / 4
        b = _rand(gen, 23) if bias else None
        cw = torch.rand(23, generator=gen) + 0.5  # class weights: not differentiated
        if probabilities:
            t = torch.softmax(_rand(gen, 2, 7, 23), -1)
        else:
            t = torch.randint(0, 23, (2, 7), generator=gen)
            if "ignore_index" in options:
                t[0, 0] = options["ignore_index"]

        def ours(x, w, t, cw, *b):
            return torch_ext.linear_cross_entropy(x, w, t, linear_bias=b[0] if b else None, weight=cw,
                                                  reduction=reduction, chunk_size=5, **options)

        def ref(x, w, t, cw, *b):
            logits = F.linear(x, w, b[0] if b else None).flatten(0, -2)
            target = t.flatten(0, -2) if probabilities else t.flatten()
            loss = F.cross_entropy(logits, target, weight=cw, reduction=reduction, **options)
            return loss.reshape(x.shape[:-1]) if reduction == "none" else loss

        return ours, ref, [x, w, t, cw] + ([b] if bias else []), frozenset({3})

    return make


# family -> sample id -> maker. The first sample of each family is the one the slower checks
# (opcheck, torch.compile) take.
SAMPLES = {
    "fused_linear": {
        "gelu_3d": _dense("gelu", (2, 5, 11)),
        "silu_2d": _dense("silu", (6, 11)),
        "tanh_no_bias": _dense("tanh", (6, 11), bias=False),
        "none_1d": _dense("none", (11,)),
        "quick_gelu_2d": _dense("quick_gelu", (6, 11)),
    },
    "fused_mlp": {
        "gelu": _mlp("gelu", gated=False),
        "swiglu": _mlp("silu", gated=True),
    },
    "cross_entropy": {
        "mean": _cross_entropy((6, 10)),
        "sum_ignore_smoothing": _cross_entropy((6, 10), reduction="sum", ignore_index=2, label_smoothing=0.1),
        "none_4d": _cross_entropy((2, 5, 3, 2), reduction="none"),
        "probabilities": _cross_entropy((6, 10), probabilities=True, label_smoothing=0.2),
        "z_loss": _cross_entropy((6, 10), z_loss=1e-2),
        "one_row": _cross_entropy((10,)),
        "weighted_mean_ignore": _cross_entropy((6, 10), weighted=True, ignore_index=1, label_smoothing=0.1),
        "weighted_probabilities_none": _cross_entropy((4, 10, 3), probabilities=True, weighted=True, reduction="none"),
    },
    "regression_loss": {
        "mse_mean": _regression("mse_loss", "mean"),
        "mse_none_3d": _regression("mse_loss", "none", shape=(2, 3, 5)),
        "huber_sum": _regression("huber_loss", "sum", delta=0.5),
        "smooth_l1_mean": _regression("smooth_l1_loss", "mean", beta=0.7),
    },
    "triplet_margin_loss": {
        "mean": _triplet("mean"),
        "none_swap": _triplet("none", swap=True),
        "sum_p1": _triplet("sum", p=1.0),
    },
    "linear_cross_entropy": {
        "mean": _linear_cross_entropy("mean"),
        "sum_no_bias_ignore": _linear_cross_entropy("sum", bias=False, ignore_index=3),
        "none_smoothing": _linear_cross_entropy("none", label_smoothing=0.1),
        "probabilities_sum": _linear_cross_entropy("sum", probabilities=True, label_smoothing=0.1),
    },
}

CASES = [(family, sample_id) for family, samples in SAMPLES.items() for sample_id in samples]
FIRST_CASES = [(family, next(iter(samples))) for family, samples in SAMPLES.items()]


def sample(family: str, sample_id: str, device, dtype: torch.dtype) -> Sample:
    """The sample's inputs on `device` in `dtype` (class indices stay int64), the same values on
    every device (generated on the CPU in float64 from a fixed seed)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{family}/{sample_id}".encode()))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fn, reference, inputs, *fixed = SAMPLES[family][sample_id](gen)
    finally:
        torch.set_default_dtype(previous)
    return Sample(fn, reference, _to(inputs, device, dtype), fixed[0] if fixed else frozenset(),
                  INPUT_NAMES[family][:len(inputs)])
