"""The Transformer feed-forward block: ``fc2(act(fc1(x)))``, and its gated forms (swiglu, geglu).

Ops (csrc/ops.cpp): ``torch_ext::mlp_act_fwd`` / ``mlp_act_bwd``, the activation on its own
(or gated: ``act(u) * v`` over rows ``[u | v]``), whose backward also forms the activation's
output again in the same pass; ``torch_ext::mlp_bwd`` (csrc/mlp.cpp), the whole block's backward.
``FusedMLP`` builds on them and on the dense layer's ops:

- forward: fc1 with its bias and activation fused (``linear_act_fwd``; gated: fc1 with its bias,
  then one pass for ``act(u) * v``), then fc2;
- saved for backward with ``recompute=True``: the pre-activation only (what the activation's
  derivative needs); the activation's output, which fc2's weight gradient needs, is formed again
  in backward. Eager ``Linear -> act -> Linear`` saves both, and gated eager code also saves the
  gate's activation, so this saves 1/2 of eager's activation bytes.
- relu, leaky_relu, sigmoid, tanh and none need the output anyway (it is fc2's input and their
  derivative comes from it or from a 1-bit mask), so for them there is nothing to recompute
  and FusedMLP saves what two FusedLinear layers would.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _C
from ._common import (
    autocast_to_lower_precision,
    cpu_products_in_float32,
    direct_when_no_grad,
    fake_grads,
    forward_with_ctx,
    needs_autograd,
    register_no_double_backward,
    transforms_active,
)
from .linear_act import _SAVES_OUTPUT, _SAVES_PRE_ACTIVATION, ACTIVATIONS, _check_activation, activation_function

# Gated activations: name -> the activation applied to the gate half.
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
MLP_ACTIVATIONS = ACTIVATIONS + tuple(GATED_ACTIVATIONS)

_linear_fwd = direct_when_no_grad(torch.ops.torch_ext.linear_act_fwd.default)
_act_fwd = direct_when_no_grad(torch.ops.torch_ext.mlp_act_fwd.default)
_act_bwd = direct_when_no_grad(torch.ops.torch_ext.mlp_act_bwd.default)
_mlp_bwd = direct_when_no_grad(torch.ops.torch_ext.mlp_bwd.default)

# The 16-bit dtypes whose CPU products torch_ext runs in float32 here (csrc/matmul.h: ATen's GEMM of
# that dtype is slow on this CPU): a property of the machine, asked once.
_CPU_FLOAT32_PRODUCTS = {dtype for dtype in (torch.bfloat16, torch.float16) if cpu_products_in_float32(dtype)}


def _second_layer(hidden: Tensor, fc2_weight: Tensor, fc2_bias: Optional[Tensor]) -> Tensor:
    """fc2 as the traced forward runs it: F.linear (ATen's GEMM, which torch.compile can fuse
    around), except for 16-bit CPU tensors whose ATen GEMM is slow here, where the dense layer's op
    without activation multiplies in float32 (as the eager path's dense_linear does)."""
    if hidden.dtype in _CPU_FLOAT32_PRODUCTS and hidden.device.type == "cpu":
        return _linear_fwd(hidden, fc2_weight, fc2_bias, "none", 0.0, False)[0]
    return F.linear(hidden, fc2_weight, fc2_bias)


def _check_mlp_act_input(op: str, input: Tensor, gated: bool) -> int:
    """The checks of csrc/cpu/mlp_act.cpp for fake tensors; returns the output width."""
    torch._check(input.dim() >= 1, lambda: f"{op}: input must have at least one dimension, got a 0-D tensor")
    width = input.shape[-1]
    torch._check(
        not gated or width % 2 == 0,
        lambda: f"{op}: a gated activation needs an even input.size(-1) (the gate half, then the value half), "
        f"got {width}",
    )
    return width // 2 if gated else width


@torch.library.register_fake("torch_ext::mlp_act_fwd")
def _mlp_act_fwd_fake(input, activation, negative_slope, gated):
    _check_activation(activation)
    n = _check_mlp_act_input("torch_ext.mlp_act_fwd", input, gated)
    return input.new_empty((*input.shape[:-1], n))


@torch.library.register_fake("torch_ext::mlp_act_bwd")
def _mlp_act_bwd_fake(grad_output, input, activation, negative_slope, gated, output_mask):
    _check_activation(activation)
    n = _check_mlp_act_input("torch_ext.mlp_act_bwd", input, gated)
    return fake_grads(input, output_mask, (input.shape, (*input.shape[:-1], n)))


@torch.library.register_fake("torch_ext::mlp_bwd")
def _mlp_bwd_fake(grad_output, input, fc1_weight, fc2_weight, saved, hidden, activation, negative_slope, gated,
                  output_mask):
    _check_activation(activation)
    torch._check(
        fc1_weight.dim() == 2 and fc2_weight.dim() == 2,
        lambda: "torch_ext.mlp_bwd: fc1_weight and fc2_weight must be 2-D",
    )
    shapes = (input.shape, fc1_weight.shape, fc1_weight.shape[:1], fc2_weight.shape, fc2_weight.shape[:1])
    return fake_grads(input, output_mask, shapes)


def _act_setup_context(ctx, inputs, output):
    input, activation, negative_slope, gated = inputs
    ctx.args = (activation, negative_slope, gated)
    ctx.save_for_backward(input)


def _act_backward(ctx, grad_out):
    (input,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    if torch.is_grad_enabled():  # create_graph: PyTorch's differentiable ops (any order)
        return torch.ops.torch_ext.mlp_act_bwd_composite(grad_out, input, *ctx.args), None, None, None
    return _act_bwd(grad_out, input, *ctx.args, [True, False])[0], None, None, None


# Calling torch.ops.torch_ext.mlp_act_fwd directly is differentiable too.
torch.library.register_autograd("torch_ext::mlp_act_fwd", _act_backward, setup_context=_act_setup_context)
register_no_double_backward("torch_ext::mlp_act_bwd", "torch_ext.FusedMLP")
register_no_double_backward("torch_ext::mlp_bwd", "torch_ext.FusedMLP")


def _gated_by_pytorch(pre: Tensor, activation: str) -> Tensor:
    """act(u) * v of pre = [u, v] in PyTorch's ops (what mlp_act_fwd computes)."""
    gate, value = pre.chunk(2, -1)
    return activation_function(activation)(gate) * value


def gated_activation(pre: Tensor, activation: str) -> Tensor:
    """``act(u) * v`` of ``pre = [u, v]`` (the halves of its last dimension), ``activation`` the
    gate's (silu, gelu, gelu_tanh): the op mlp_act_fwd, differentiable through its registered
    autograd; under torch.func PyTorch's ops (docs/api.md). fuse()'s gated GEMM forward calls it."""
    if transforms_active():
        return _gated_by_pytorch(pre, activation)
    return torch.ops.torch_ext.mlp_act_fwd(pre, activation, 0.01, True)


def _check_mlp_activation(activation) -> None:
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(MLP_ACTIVATIONS)}; got {activation!r}")


def _check_mlp_args(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation) -> None:
    """Shapes, dtypes and devices, named as the user passed them (plain raises: torch.compile
    traces them as constant checks on static shapes)."""
    _check_mlp_activation(activation)
    gated = activation in GATED_ACTIVATIONS
    op = "torch_ext.fused_mlp"
    if fc1_weight.dim() != 2:
        raise RuntimeError(
            f"{op}: fc1_weight must be 2-D (out_features, in_features), got shape {tuple(fc1_weight.shape)}"
        )
    if fc2_weight.dim() != 2:
        raise RuntimeError(
            f"{op}: fc2_weight must be 2-D (out_features, in_features), got shape {tuple(fc2_weight.shape)}"
        )
    if input.dim() < 1:
        raise RuntimeError(f"{op}: input must have shape (*, in_features), got a 0-D tensor")
    if input.shape[-1] != fc1_weight.shape[1]:
        raise RuntimeError(
            f"{op}: input.size(-1) is {input.shape[-1]} but fc1_weight.size(1) (in_features) is {fc1_weight.shape[1]}"
        )
    fc1_out = fc1_weight.shape[0]
    if gated and fc1_out % 2 != 0:
        raise RuntimeError(
            f"{op}: a gated activation ({activation}) needs fc1_weight of shape (2 * hidden, in), "
            f"got {tuple(fc1_weight.shape)}"
        )
    hidden = fc1_out // 2 if gated else fc1_out
    if fc2_weight.shape[1] != hidden:
        what = "half of fc1_weight.size(0), for a gated activation" if gated else "fc1_weight.size(0)"
        raise RuntimeError(
            f"{op}: fc2_weight.size(1) is {fc2_weight.shape[1]} but the hidden width ({what}) is {hidden}"
        )
    for name, b, n in (("fc1_bias", fc1_bias, fc1_out), ("fc2_bias", fc2_bias, fc2_weight.shape[0])):
        if b is not None and (b.dim() != 1 or b.shape[0] != n):
            raise RuntimeError(f"{op}: {name} must have shape ({n},), got {tuple(b.shape)}")
    named = (("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias), ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias))
    for name, t in named:
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"{op}: {name} is on {t.device} but input is on {input.device}; they must be on the same device"
            )
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"{op}: {name} has dtype {t.dtype} but input has dtype {input.dtype}; they must match")


def _mlp_forward(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, negative_slope, recompute,
                 for_backward=True):
    if activation in GATED_ACTIVATIONS:
        pre = _linear_fwd(input, fc1_weight, fc1_bias, "none", 0.0, False)[0]
        hidden = _act_fwd(pre, GATED_ACTIVATIONS[activation], negative_slope, True)
        saved = pre
    else:
        hidden, saved = _linear_fwd(input, fc1_weight, fc1_bias, activation, negative_slope, for_backward)
    return _second_layer(hidden, fc2_weight, fc2_bias), hidden, saved


def _recomputes(activation: str, recompute: bool) -> bool:
    """Whether backward forms the hidden activation again rather than saving it: asked for, and
    its derivative needs the pre-activation (else the output is saved for the derivative anyway)."""
    return bool(recompute) and (activation in GATED_ACTIVATIONS or activation in _SAVES_PRE_ACTIVATION)


def _mlp_setup_context(ctx, inputs, output):
    input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, negative_slope, recompute = inputs
    _, hidden, saved = output
    ctx.activation = GATED_ACTIVATIONS.get(activation, activation)
    ctx.gated = activation in GATED_ACTIVATIONS
    ctx.negative_slope = negative_slope
    ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
    recompute = _recomputes(activation, recompute)
    if activation in _SAVES_OUTPUT:
        saved = hidden  # their derivative is a function of the output (see linear_act.py)
    # fc1's bias (a parameter: no extra memory) for create_graph's backward (mlp_bwd_composite).
    ctx.save_for_backward(input, fc1_weight, fc2_weight, saved, None if recompute else hidden, fc1_bias)
    ctx.mark_non_differentiable(hidden, saved)
    ctx.set_materialize_grads(False)  # no zero-filled (M, hidden) gradients for them in backward


class FusedMLPFunction(torch.autograd.Function):
    """autograd.Function of FusedMLP: ``apply(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
    activation, negative_slope, recompute) -> (out, hidden, saved)``; only ``out`` is
    differentiable (``hidden`` is fc2's input, ``saved`` what fc1's backward needs).

    Example::

        >>> x, w1, w2 = torch.randn(8, 16, requires_grad=True), torch.randn(64, 16), torch.randn(16, 64)
        >>> out, hidden, saved = torch_ext.FusedMLPFunction.apply(x, w1, None, w2, None, "gelu", 0.01, True)
        >>> out.sum().backward()
        >>> out.shape, hidden.shape, x.grad.shape
        (torch.Size([8, 16]), torch.Size([8, 64]), torch.Size([8, 16]))
    """

    forward = forward_with_ctx(_mlp_forward, _mlp_setup_context)

    @staticmethod
    def backward(ctx, grad_out, _grad_hidden, _grad_saved):
        if grad_out is None:  # only hidden / saved reached backward (materialize_grads is off)
            return (None,) * 8
        # One op (csrc/mlp.cpp), as the eager C++ node calls it; with create_graph, its form in
        # PyTorch's differentiable ops (gradients of any order are PyTorch's).
        input, fc1_weight, fc2_weight, saved, hidden, fc1_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias[0] and needs[2]), bool(needs[3]),
                bool(ctx.has_bias[1] and needs[4])]
        if torch.is_grad_enabled():
            grads = torch.ops.torch_ext.mlp_bwd_composite(grad_out, input, fc1_weight, fc1_bias, fc2_weight,
                                                          ctx.activation, ctx.negative_slope, ctx.gated, mask)
        else:
            grads = _mlp_bwd(grad_out, input, fc1_weight, fc2_weight, saved, hidden, ctx.activation,
                             ctx.negative_slope, ctx.gated, mask)
        return (*grads, None, None, None)


def fused_mlp(
    input: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    activation: str = "gelu",
    negative_slope: float = 0.01,
    recompute: bool = True,
) -> Tensor:
    """``F.linear(act(F.linear(input, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)``.

    Gated activations (``swiglu``: silu, ``geglu``: exact gelu, ``geglu_tanh``) split fc1's output
    ``(*, 2 * hidden)`` into the gate ``u`` (first half) and the value ``v`` and use ``act(u) * v``.
    With ``recompute`` the activation's output is formed again in backward rather than saved.
    Under ``torch.autocast`` the tensors are cast as for ``F.linear``.

    Example::

        >>> x, w1, w2 = torch.randn(8, 512), torch.randn(2 * 1376, 512), torch.randn(512, 1376)
        >>> torch_ext.fused_mlp(x, w1, None, w2, None, activation="swiglu").shape
        torch.Size([8, 512])
    """
    _check_mlp_args(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)
    input, fc1_weight, fc1_bias, fc2_weight, fc2_bias = autocast_to_lower_precision(
        input, fc1_weight, fc1_bias, fc2_weight, fc2_bias
    )
    args = (input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, float(negative_slope), bool(recompute))
    if transforms_active():  # torch.func: PyTorch's ops, which its transforms batch (docs/api.md)
        if activation in GATED_ACTIVATIONS:
            hidden = _gated_by_pytorch(F.linear(input, fc1_weight, fc1_bias), GATED_ACTIVATIONS[activation])
        else:
            hidden = activation_function(activation, negative_slope)(F.linear(input, fc1_weight, fc1_bias))
        return F.linear(hidden, fc2_weight, fc2_bias)
    if torch.compiler.is_compiling():
        if not needs_autograd(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias):  # inference
            return _mlp_forward(*args, for_backward=False)[0]
        return FusedMLPFunction.apply(*args)[0]
    # Eager: the same ops, under a C++ autograd node (csrc/autograd_node.h) when autograd records,
    # else the forward ops alone: cheaper per call than autograd.Function or the ops from Python.
    return _C._mlp_eager(
        input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, GATED_ACTIVATIONS.get(activation, activation),
        float(negative_slope), activation in GATED_ACTIVATIONS, _recomputes(activation, recompute),
    )


class FusedMLP(nn.Module):
    """The Transformer FFN ``fc2(act(fc1(x)))`` (timm's ``Mlp`` layout: submodules ``fc1`` and
    ``fc2``, both ``nn.Linear``), fused.

    activation: any of ``torch_ext.ACTIVATIONS``, or gated ``swiglu`` / ``geglu`` / ``geglu_tanh``,
    for which fc1 has ``2 * hidden_features`` outputs, the gate first. out_features defaults to
    in_features. recompute: save only the pre-activation for backward (see torch_ext/mlp.py).

    Example::

        >>> ffn = torch_ext.FusedMLP(512, 1376, activation="swiglu")
        >>> ffn.fc1.weight.shape, ffn.fc2.weight.shape
        (torch.Size([2752, 512]), torch.Size([512, 1376]))
        >>> ffn(torch.randn(8, 512)).shape
        torch.Size([8, 512])
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: Optional[int] = None,
        activation: str = "gelu",
        bias: bool = True,
        recompute: bool = True,
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        _check_mlp_activation(activation)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        gated = activation in GATED_ACTIVATIONS
        out_features = in_features if out_features is None else out_features
        self.fc1 = nn.Linear(in_features, hidden_features * (2 if gated else 1), bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)
        self.activation = activation
        self.negative_slope = negative_slope
        self.recompute = recompute

    def forward(self, input: Tensor) -> Tensor:
        return fused_mlp(
            input, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            self.activation, self.negative_slope, self.recompute,
        )

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"activation={self.activation!r}{slope}, recompute={self.recompute}"
