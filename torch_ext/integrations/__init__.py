"""What torch_ext.fuse knows about other libraries' modules, one file per library.

Each file is imported only when a model holds a module of that library (its class's
``__module__`` names it), so torch_ext imports without those libraries installed. To support one
more library: add a file with an ``ACTIVATIONS`` table (class name -> FusedLinear activation)
and, if it has them, ``linear_like`` / ``fused_linear_like`` for its Linear variants and
``fuse_whole_model`` for rewrites of a whole model, and name it in ``_LIBRARIES``.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

from torch import nn

# The top-level package of a module's class -> the file here that knows it.
_LIBRARIES = {"transformers": "transformers", "timm": "timm", "open_clip": "open_clip"}


def _top_package(cls) -> str:
    return (cls.__module__ or "").partition(".")[0]


def _library(obj):
    """This package's file for the library `obj`'s class (or the nearest base class, for a user's
    subclass of a library model) comes from, or None."""
    for cls in type(obj).__mro__:
        name = _LIBRARIES.get(_top_package(cls))
        if name:
            return importlib.import_module(f"{__name__}.{name}")
        if cls is nn.Module:
            break
    return None


def is_library_module(module: nn.Module) -> bool:
    """A module of a library known here, whose forward fuse() may rewrite on its own from its source."""
    return _top_package(type(module)) in _LIBRARIES


def library_activation_spec(module: nn.Module) -> Optional[Tuple[str, float]]:
    """The activation a library's activation module claims by its class name (exact class: a
    subclass may change forward); the caller checks it numerically (fuse.activations.computes)."""
    lib = _library(module)
    if lib is None:
        return None
    for cls_name, spec in lib.ACTIVATIONS.items():
        if type(module).__name__ == cls_name and type(module).__module__.startswith(lib.MODULE_PREFIX):
            return spec
    return None


def linear_like(module: nn.Module) -> bool:
    """A library's Linear variant fuse() can swap for a fused one (transformers' Conv1D)."""
    lib = _library(module)
    return lib is not None and hasattr(lib, "linear_like") and lib.linear_like(module)


def framework_class(cls) -> bool:
    """A library's base class of every model (transformers' PreTrainedModel and its mixins), whose
    methods fuse() need not read for code that may call a layer (see the library's file)."""
    name = _LIBRARIES.get(_top_package(cls))
    if name is None:
        return False
    lib = importlib.import_module(f"{__name__}.{name}")
    return hasattr(lib, "framework_class") and lib.framework_class(cls)


def fused_linear_like(module: nn.Module, spec) -> nn.Module:
    """The fused replacement of a `linear_like` module, holding its Parameter objects."""
    return _library(module).fused_linear_like(module, spec)


def fuse_whole_models(model: nn.Module, report) -> None:
    """What a library rewrites on a whole model (transformers: the causal-LM loss from the hidden
    states), for `model` and each of its submodules of a known library; reported either way."""
    for where, module in list(model.named_modules()):
        lib = _library(module)
        if lib is None or not hasattr(lib, "fuse_whole_model"):
            continue
        replaced, why = lib.fuse_whole_model(module, where or "model")
        if replaced:
            report.replaced.append(replaced)
        elif why:
            report.skipped.append(why)
