"""Helpers shared by the op families."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_to_lower_precision(*tensors: Optional[Tensor]):
    """Cast as autocast casts the inputs of F.linear: floating tensors other than float64 go to
    the autocast dtype of their device when autocast is enabled there; others pass unchanged."""
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    device_type = first.device.type
    # "meta" and other devices without autocast raise in is_autocast_enabled.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )
