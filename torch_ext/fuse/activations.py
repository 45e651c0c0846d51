"""The activation table: which modules, functions and methods compute one of FusedLinear's
activations (torch.nn's here; other libraries' are added by torch_ext/integrations)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..linear_act import activation_function

Spec = Tuple[str, float]  # (FusedLinear activation, negative_slope)
_DEFAULT_SLOPE = 0.01


def _module_spec(module) -> Optional[Spec]:
    """The FusedLinear activation equal to this activation module (exact classes only: a subclass
    may change forward)."""
    kind = type(module)
    if kind is nn.ReLU:
        return ("relu", _DEFAULT_SLOPE)
    if kind is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope))
    if kind is nn.GELU:
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu", _DEFAULT_SLOPE)
    if kind is nn.SiLU:
        return ("silu", _DEFAULT_SLOPE)
    if kind is nn.Sigmoid:
        return ("sigmoid", _DEFAULT_SLOPE)
    if kind is nn.Tanh:
        return ("tanh", _DEFAULT_SLOPE)
    return None


def _callable_spec(fn) -> Optional[Spec]:
    """A Transformer layer's `activation`: F.relu / F.gelu (what its string options give), or a module."""
    if fn is F.relu or fn is torch.relu:
        return ("relu", _DEFAULT_SLOPE)
    if fn is F.gelu:
        return ("gelu", _DEFAULT_SLOPE)
    if isinstance(fn, nn.Module):
        return activation_spec(fn)
    return None


_FUNCTION_ACTIVATIONS: Dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu", F.gelu: "gelu", F.silu: "silu",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", torch.tanh: "tanh", torch.tanh_: "tanh",
}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "tanh": "tanh", "tanh_": "tanh"}


def _node_spec(node: torch.fx.Node, owner: nn.Module) -> Optional[Spec]:
    """The activation a traced node applies to its first argument, or None."""
    if node.op == "call_module":
        if len(node.args) + len(node.kwargs) != 1:
            return None
        return activation_spec(owner.get_submodule(node.target))
    if node.op == "call_method" and node.target in _METHOD_ACTIVATIONS and len(node.args) == 1 and not node.kwargs:
        return (_METHOD_ACTIVATIONS[node.target], _DEFAULT_SLOPE)
    if node.op != "call_function" or node.target not in _FUNCTION_ACTIVATIONS:
        return None
    name = _FUNCTION_ACTIVATIONS[node.target]
    extra = dict(node.kwargs)
    extra.pop("inplace", None)  # in place on a tensor nothing else reads: the same result
    if name == "leaky_relu":
        slope = node.args[1] if len(node.args) > 1 else extra.pop("negative_slope", _DEFAULT_SLOPE)
        if not isinstance(slope, (int, float)) or len(node.args) > 3 or extra:
            return None
        return ("leaky_relu", float(slope))
    if name == "gelu":
        approximate = node.args[1] if len(node.args) > 1 else extra.pop("approximate", "none")
        if approximate not in ("none", "tanh") or extra:
            return None
        return ("gelu_tanh" if approximate == "tanh" else "gelu", _DEFAULT_SLOPE)
    if len(node.args) > (2 if name in ("relu", "silu") else 1) or extra:
        return None
    return (name, _DEFAULT_SLOPE)


def _describe(spec: Spec) -> str:
    return f"{spec[0]}, negative_slope={spec[1]}" if spec[0] == "leaky_relu" else spec[0]



# --- other libraries' activation modules ------------------------------------------------------

def computes(module: nn.Module, spec: Spec) -> bool:
    """Whether `module` gives what FusedLinear's `spec` activation gives, to float32 rounding, on
    probe inputs (large and negative values, two shapes): a library class is taken by its name
    only together with this check, so that a changed formula is not fused silently."""
    gen = torch.Generator().manual_seed(0)
    probes = [
        torch.cat([torch.linspace(-12.0, 12.0, 241), torch.tensor([-1e4, -80.0, -30.0, 30.0, 80.0, 1e4, 0.0])]),
        torch.randn(3, 5, 16, generator=gen) * 4,
    ]
    try:
        with torch.no_grad():
            for x in probes:
                got = module(x.clone())
                if not (isinstance(got, torch.Tensor) and got.shape == x.shape and got.dtype == x.dtype):
                    return False
                if not torch.allclose(got, activation_function(*spec)(x), rtol=1e-5, atol=1e-6):
                    return False
    except Exception:  # noqa: BLE001 (a module that cannot run on a CPU float tensor is not ours)
        return False
    return True


def activation_spec(module) -> Optional[Spec]:
    """The FusedLinear activation an activation module computes: torch.nn's exact classes, or a
    class torch_ext/integrations knows by name (transformers, timm, open_clip) that passes `computes`."""
    spec = _module_spec(module)
    if spec is not None or not isinstance(module, nn.Module):
        return spec
    from ..integrations import library_activation_spec  # noqa: PLC0415 (libraries' tables, lazily)

    spec = library_activation_spec(module)
    return spec if spec is not None and computes(module, spec) else None
