"""Peers: other libraries' implementations of an op family, timed beside eager, compile and ours.

A peer is one entry of PEERS: its key (the JSON name), its display name, and a function
(op, device) -> the peer's function of the workload's inputs, or None where the peer does not
exist here (library missing, wrong device, op it lacks). Adding a peer = one entry below.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..workload import Workload

HAS_TORCH_CHUNKED_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def _torch_chunked(op: str, device: str) -> Optional[Callable]:
    """PyTorch's chunked F.linear_cross_entropy with its default options (PyTorch >= 2.13)."""
    if op != "linear_cross_entropy" or not HAS_TORCH_CHUNKED_LCE:
        return None
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


def _liger(op: str, device: str) -> Optional[Callable]:
    """Liger-Kernel's functional ops (they need CUDA + Triton), where installed."""
    if not device.startswith("cuda"):
        return None
    try:
        from liger_kernel.transformers import functional as lf  # type: ignore
    except Exception:  # noqa: BLE001 (not installed, or broken: no peer)
        return None

    def first(out):  # Liger's functionals return (loss, z_loss) in some versions
        return out[0] if isinstance(out, (tuple, list)) else out

    if op == "cross_entropy" and hasattr(lf, "liger_cross_entropy"):
        return lambda x, t: first(lf.liger_cross_entropy(x, t))
    if op == "linear_cross_entropy" and hasattr(lf, "liger_fused_linear_cross_entropy"):
        return lambda x, w, t: first(lf.liger_fused_linear_cross_entropy(x, w, t))
    return None


# key -> (display name, finder, note for the report or None)
PEERS: Dict[str, tuple] = {
    "torch_chunked": ("torch chunked", _torch_chunked,
                      "torch chunked: F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions()), "
                      "PyTorch's chunked path with its default options; it computes the gradients during the forward "
                      "pass (its backward only hands them over), so compare it on fwd+bwd."),
    "liger": ("Liger", _liger, None),
}


def add_peers(op: str, wl: Workload, device: str) -> Workload:
    """wl with the peers of `op` that this machine has, between eager and ours (table order)."""
    fns = {"eager": wl.fns["eager"]}
    for key, (_, find, _) in PEERS.items():
        fn = find(op, device)
        if fn is not None:
            fns[key] = fn
    fns["ours"] = wl.fns["ours"]
    wl.fns = fns
    return wl
