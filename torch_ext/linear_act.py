"""Fused dense layer + activation: ``act(input @ weight.T + bias)``.

Ops (csrc/ops.cpp): ``torch_ext::linear_act_fwd`` and ``torch_ext::linear_act_bwd``. This file
gives them their fake kernels, their autograd (``FusedLinearFunction``, also registered on the
forward op itself), the functional ``fused_linear`` and the module ``FusedLinear``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C
from ._common import (
    autocast_to_lower_precision,
    direct_when_no_grad,
    fake_grads,
    forward_with_ctx,
    needs_autograd,
    register_no_double_backward,
    transforms_active,
)

ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "quick_gelu")
# What the forward op saves for backward (besides input and weight); see csrc/activation.h.
_SAVES_MASK = frozenset({"relu", "leaky_relu"})
_SAVES_OUTPUT = frozenset({"sigmoid", "tanh"})
_SAVES_PRE_ACTIVATION = frozenset({"gelu", "gelu_tanh", "silu", "quick_gelu"})

_fwd_op = direct_when_no_grad(torch.ops.torch_ext.linear_act_fwd.default)
_bwd_op = direct_when_no_grad(torch.ops.torch_ext.linear_act_bwd.default)


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")


def activation_function(activation: str, negative_slope: float = 0.01):
    """PyTorch's own function of an activation: what the fused kernels compute."""
    return {
        "none": lambda x: x, "relu": F.relu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
        "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "leaky_relu": lambda x: F.leaky_relu(x, negative_slope),
        "quick_gelu": quick_gelu,
    }[activation]


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's QuickGELU, ``x * sigmoid(1.702 * x)``, as transformers and timm write it (PyTorch has no
    function of its own for it)."""
    return x * torch.sigmoid(1.702 * x)


def _check_linear_args(op: str, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """The checks of csrc/cpu/linear_act.cpp, for fake tensors (torch.compile tracing)."""
    torch._check(
        weight.dim() == 2,
        lambda: f"{op}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}",
    )
    torch._check(input.dim() >= 1, lambda: f"{op}: input must have shape (*, in_features), got a 0-D tensor")
    torch._check(
        input.shape[-1] == weight.shape[1],
        lambda: f"{op}: input.size(-1) is {input.shape[-1]} but weight.size(1) (in_features) is {weight.shape[1]}; "
        "they must be equal",
    )
    tensors = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        torch._check(
            t.device == input.device,
            lambda name=name, t=t: f"{op}: {name} is on {t.device} but input is on {input.device}; "
            "they must be on the same device",
        )
        torch._check(
            t.dtype == input.dtype,
            lambda name=name, t=t: f"{op}: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
            "they must match",
        )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"{op}: bias must have shape (out_features,) = ({weight.shape[0]},), got {tuple(bias.shape)}",
        )


@torch.library.register_fake("torch_ext::linear_act_fwd")
def _linear_act_fwd_fake(input, weight, bias, activation, negative_slope, for_backward=True):
    _check_linear_args("torch_ext.linear_act_fwd", input, weight, bias)
    _check_activation(activation)
    n = weight.shape[0]
    out = input.new_empty((*input.shape[:-1], n))
    if not for_backward:
        saved = None
    elif activation in _SAVES_MASK:
        saved = input.new_empty((*input.shape[:-1], (n + 7) // 8), dtype=torch.uint8)
    elif activation in _SAVES_PRE_ACTIVATION:
        saved = input.new_empty(out.shape)
    else:
        saved = input.new_empty((0,))
    return out, saved


@torch.library.register_fake("torch_ext::linear_act_bwd")
def _linear_act_bwd_fake(grad_output, input, weight, saved, activation, negative_slope, output_mask):
    _check_linear_args("torch_ext.linear_act_bwd", input, weight, None)
    _check_activation(activation)
    return fake_grads(input, output_mask, (input.shape, weight.shape, weight.shape[:1]))


def _setup_context(ctx, inputs, output):
    input, weight, bias, activation, negative_slope = inputs[:5]  # [5]: for_backward, if given
    out, saved = output
    ctx.num_inputs = len(inputs)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.has_bias = bias is not None
    # sigmoid/tanh derive their gradient from the output; the others from the op's `saved`.
    # The bias (a parameter: no extra memory) for create_graph's backward (linear_act_bwd_composite).
    ctx.save_for_backward(input, weight, out if activation in _SAVES_OUTPUT else saved, bias)
    if saved is not None:
        ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for `saved` in backward


def _backward(ctx, grad_out, _grad_saved):
    options = (None,) * (ctx.num_inputs - 3)  # activation, negative_slope[, for_backward]
    if grad_out is None:  # only `saved` reached backward (materialize_grads is off)
        return (None, None, None, *options)
    input, weight, saved, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2])]
    if not any(mask):
        return (None, None, None, *options)
    if saved is None:  # the forward ran with for_backward=False
        if ctx.activation != "none":
            raise RuntimeError(
                f"torch_ext.linear_act_fwd was called with for_backward=False, so it kept nothing for the "
                f"{ctx.activation} backward; call it with for_backward=True (the default) to differentiate it"
            )
        saved = input.new_empty((0,))  # none's backward needs nothing
    if torch.is_grad_enabled():  # create_graph: PyTorch's differentiable ops (any order)
        grads = torch.ops.torch_ext.linear_act_bwd_composite(grad_out, input, weight, bias, ctx.activation,
                                                             ctx.negative_slope, mask)
    else:
        grads = _bwd_op(grad_out, input, weight, saved, ctx.activation, ctx.negative_slope, mask)
    return (*grads, *options)


# Calling torch.ops.torch_ext.linear_act_fwd directly is differentiable too.
torch.library.register_autograd("torch_ext::linear_act_fwd", _backward, setup_context=_setup_context)


register_no_double_backward("torch_ext::linear_act_bwd", "torch_ext.fused_linear")


class FusedLinearFunction(torch.autograd.Function):
    """autograd.Function over the fused ops: ``apply(input, weight, bias, activation,
    negative_slope) -> (out, saved)``; ``saved`` is what backward uses and is not differentiable.

    Example::

        >>> x, w, b = torch.randn(8, 16, requires_grad=True), torch.randn(32, 16), torch.randn(32)
        >>> out, saved = torch_ext.FusedLinearFunction.apply(x, w, b, "gelu", 0.01)
        >>> out.sum().backward()
        >>> out.shape, x.grad.shape
        (torch.Size([8, 32]), torch.Size([8, 16]))
    """

    forward = forward_with_ctx(_fwd_op, _setup_context)
    backward = staticmethod(_backward)


def fused_linear(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "none",
    negative_slope: float = 0.01,
) -> Tensor:
    """``act(F.linear(input, weight, bias))`` in one fused op.

    activation: none, relu, leaky_relu (with ``negative_slope``), gelu (exact erf), gelu_tanh
    (``F.gelu(approximate="tanh")``), silu, sigmoid, tanh, quick_gelu (CLIP's
    ``x * sigmoid(1.702 * x)``). Input ``(*, in_features)``, weight
    ``(out_features, in_features)``, bias ``(out_features,)`` or None. Under ``torch.autocast``
    the tensors are cast as for ``F.linear``.

    Example::

        >>> x, weight, bias = torch.randn(8, 512), torch.randn(2048, 512), torch.randn(2048)
        >>> y = torch_ext.fused_linear(x, weight, bias, activation="gelu")
        >>> y.shape
        torch.Size([8, 2048])
    """
    _check_activation(activation)
    input, weight, bias = autocast_to_lower_precision(input, weight, bias)
    if transforms_active():  # torch.func: PyTorch's ops, which its transforms batch (docs/api.md)
        return activation_function(activation, negative_slope)(F.linear(input, weight, bias))
    if torch.compiler.is_compiling():
        if not needs_autograd(input, weight, bias):  # inference: nothing kept for a backward
            return _fwd_op(input, weight, bias, activation, float(negative_slope), False)[0]
        return FusedLinearFunction.apply(input, weight, bias, activation, float(negative_slope))[0]
    # Eager: the same ops, under a C++ autograd node (csrc/autograd_node.h) when autograd records,
    # else the forward op alone: cheaper per call than autograd.Function or the op from Python.
    return _C._linear_act_eager(input, weight, bias, activation, float(negative_slope))


class FusedLinear(nn.Linear):
    """``nn.Sequential(nn.Linear(in_features, out_features, bias), act)`` as one fused module.

    Same parameters, initialization and state_dict keys as ``nn.Linear``.

    Example::

        >>> layer = torch_ext.FusedLinear(512, 2048, activation="relu")
        >>> layer.load_state_dict(torch.nn.Linear(512, 2048).state_dict())
        <All keys matched successfully>
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 2048])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "none",
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        _check_activation(activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, input: Tensor) -> Tensor:
        return fused_linear(input, self.weight, self.bias, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"
