"""Rewriting modules: FusedLinear from a Linear's own Parameters, setting a submodule, and the
subclass of a module's class that carries a rewritten forward (fused_subclass), with how it
pickles."""
from __future__ import annotations

import copy
import inspect
import threading
from typing import Callable, Optional, Tuple

import torch
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


# --- the rewritten classes ----------------------------------------------------------------------
#
# A rewritten forward is new Python code (a trace, or a class's own source with statements
# replaced), a function that no module holds, so pickle cannot refer to it by name. Its class
# pickles instead as the recipe: the original class (by reference, as pickle stores any class),
# what fuse() changed (plain data: names, indices) and the module's state. Loading builds the
# subclass again with a forward that, on the module's first call, generates the code from the
# original class's forward and that recipe, as fuse() did: no source text travels in the pickle,
# and unpickling executes none. (torch.fx.GraphModule's own pickling would carry the generated
# source and exec it while loading.) A deep copy keeps the class, as it keeps any module's.

_BUILDING = threading.RLock()


def fused_subclass(cls, doc: str, rebuild: Callable, recipe: Tuple, forward: Optional[Callable] = None,
                   build: Optional[Callable[[nn.Module], Callable]] = None, **attrs):
    """A subclass of cls named as cls (isinstance, its other methods and state_dict stay) whose
    forward is `forward`, or, where that is None (a module being unpickled), `build(module)`
    made on the first call. It pickles as ``rebuild(cls, *recipe, state)``."""

    def __reduce_ex__(self, protocol):
        return (rebuild, (cls, *recipe, self.__getstate__()))

    def __deepcopy__(self, memo):
        # What copy.deepcopy does for any module (a new instance of its class, the state
        # deep-copied), without going through __reduce_ex__: the copy keeps the built forward.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    __reduce_ex__._torch_ext_plumbing = __deepcopy__._torch_ext_plumbing = True  # not the class's code (source.py)
    if forward is None:
        def forward(self, *args, **kwargs):
            return _built_forward(fused, build, self)(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(cls.forward)
        except (TypeError, ValueError):
            pass
        attrs["_torch_ext_pending"] = True
    fused = type(cls.__name__, (cls,), {
        "forward": forward,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__reduce_ex__": __reduce_ex__,
        "__deepcopy__": __deepcopy__,
        "__doc__": doc,
        **attrs,
    })
    return fused


def rebuilt(fused_cls, state) -> nn.Module:
    """A module of the class fused_subclass made, with the pickled state (what a `rebuild` gives)."""
    module = fused_cls.__new__(fused_cls)
    module.__setstate__(state)
    return module


def _built_forward(fused, build: Callable[[nn.Module], Callable], module: nn.Module) -> Callable:
    """fused's forward, built from `module` and set on the class on its first call."""
    if torch.compiler.is_compiling():  # generating code is no part of a graph: run it as it is
        return torch.compiler.disable(_built_forward)(fused, build, module)
    with _BUILDING:
        if fused.__dict__.get("_torch_ext_pending"):
            fused.forward = build(module)
            fused._torch_ext_pending = False
    return fused.__dict__["forward"]


def _deepcopy(model: nn.Module) -> nn.Module:
    copied = copy.deepcopy(model)
    # nn.TransformerDecoderLayer.__setstate__ puts F.relu in the copy's __dict__ when its
    # activation is a module, which then hides the module: take the module again.
    for module in copied.modules():
        if "activation" in module._modules and "activation" in module.__dict__:
            del module.__dict__["activation"]
    return copied


def _rebuild_traced(cls, *args):
    """What pickles of traced forwards made by earlier torch_ext versions call (they carry the
    generated source and an import block to exec): refused, with what to do instead."""
    raise RuntimeError(
        f"torch_ext.fuse: this pickle of a {cls.__name__} rewritten by fuse() comes from an earlier torch_ext, "
        "whose pickles carry Python source to execute while loading, which this version does not do; load it "
        "with that version and save its state_dict(), which loads into the original class (then fuse it again)"
    )
