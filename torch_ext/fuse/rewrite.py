"""Rewriting modules: FusedLinear from a Linear's own Parameters, setting a submodule, a traced
forward as a subclass of the module's class."""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.fx
from torch import nn

from ..linear_act import FusedLinear
from .activations import Spec


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))



def _identity_like(module: nn.Module) -> nn.Identity:
    return nn.Identity().train(module.training)



def _fused_linear_from(linear: nn.Linear, spec: Spec) -> FusedLinear:
    """A FusedLinear holding linear's own Parameter objects (built on meta: nothing allocated)."""
    fused = FusedLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        activation=spec[0], negative_slope=spec[1], device="meta")
    fused.weight = linear.weight
    if linear.bias is not None:
        fused.bias = linear.bias
    fused.train(linear.training)
    return fused


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, key = path.rpartition(".")
    setattr(model.get_submodule(parent_path), key, module)


def _traced_class(cls, src: str, scope: Dict[str, object]):
    """A subclass of cls whose forward is the traced source (run with the globals torch.fx
    generated it with); pickled as cls, that source and an import block for those globals."""
    forward = torch.fx.graph_module._forward_from_src(src, dict(scope))

    def __reduce_ex__(self, protocol):
        from torch.package import sys_importer

        try:
            imports = torch.fx.graph_module._format_import_block(scope, sys_importer)
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"{cls.__name__} rewritten by torch_ext.fuse cannot be pickled whole ({e}); save its state_dict() "
                "instead, which loads into the original class"
            ) from e
        return (_rebuild_traced, (cls, src, imports, self.__getstate__()))

    return type(cls.__name__, (cls,), {
        "forward": forward,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__reduce_ex__": __reduce_ex__,
        "__doc__": f"{cls.__name__} with its forward traced by torch_ext.fuse (activations fused into FusedLinear).",
    })


def _rebuild_traced(cls, src, imports, state):
    scope: Dict[str, object] = {}
    exec(imports, scope)  # noqa: S102 (the import block torch.fx wrote for this forward)
    module = cls.__new__(_traced_class(cls, src, scope))
    module.__setstate__(state)
    return module


def _deepcopy(model: nn.Module) -> nn.Module:
    copied = copy.deepcopy(model)
    # nn.TransformerDecoderLayer.__setstate__ puts F.relu in the copy's __dict__ when its
    # activation is a module, which then hides the module: take the module again.
    for module in copied.modules():
        if "activation" in module._modules and "activation" in module.__dict__:
            del module.__dict__["activation"]
    return copied

