"""64-bit indexing: the losses over more than 2**31 elements, where an offset computed in 32 bits
wraps around (a peer's kernels once returned silently wrong results there).

CPU: cross_entropy over N x C > 2**31 logits in bfloat16 (half float32's memory), through both
autograd paths (reduction="none": forward op, then backward op; "mean": the gradient formed in
the forward op), and linear_cross_entropy in float32 with N x V > 2**31 (its logits exist one
chunk at a time, so it is the chunk offsets and the gradients' rows that pass 2**31). The reference is
PyTorch's own cross_entropy in float32, row block by row block (each block far below 2**31), on
every row's loss and on the gradient rows at both ends of the tensor (the last ones lie beyond
2**31 elements), computed once for both reductions. Each test needs several GB: they run one at
a time across pytest-xdist workers, and are skipped, saying how much, where the machine has less
available.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import torch_ext
from utils import assert_close, tolerance

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

# N x C = 65537 x 32771 = 2,147,713,027 > 2**31 = 2,147,483,648
ROWS, CLASSES = 2**16 + 1, 2**15 + 3
BLOCK = 4096  # rows per reference block
EDGE = 3  # gradient rows compared at each end


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def memory_for(gib: float):
    """Runs the body alone among this machine's test processes (pytest-xdist workers take a file
    lock in turn, so two tests of many GB never run at once), or skips it, saying how much memory
    it needs, where less is available."""
    with open(os.path.join(tempfile.gettempdir(), "torch_ext_tests_large_memory.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = available_bytes() / 2**30
        if have < gib:
            pytest.skip(f"needs {gib} GiB of available memory, {have:.1f} GiB here")
        yield


# The references, computed once for both reductions (the inputs are seeded, so the same).
_REFERENCE = {}


def big_logits() -> torch.Tensor:
    assert ROWS * CLASSES > 2**31
    torch.manual_seed(0)
    return torch.empty(ROWS, CLASSES, dtype=torch.bfloat16).uniform_(-4, 4)


def big_targets(classes: int) -> torch.Tensor:
    target = torch.randint(classes, (ROWS,))
    target[[1, ROWS // 2, ROWS - 2]] = -100  # ignored rows, at the start and the end too
    return target


def reference_row_losses(logits_of, target, n_rows: int) -> torch.Tensor:
    """Per-row float32 cross-entropy of rows [0, n_rows), block by block; logits_of(r0, r1) gives
    a block's logits in float32."""
    out = torch.empty(n_rows)
    for r0 in range(0, n_rows, BLOCK):
        r1 = min(r0 + BLOCK, n_rows)
        out[r0:r1] = F.cross_entropy(logits_of(r0, r1), target[r0:r1], reduction="none")
    return out


def reference_grad_rows(x32: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient of scale * sum of the rows' losses, for a few rows (float32)."""
    x32 = x32.clone().requires_grad_()
    (scale * F.cross_entropy(x32, target, reduction="sum")).backward()
    return x32.grad


def check_loss_then_backward(loss, ref_rows, target, reduction: str) -> float:
    """The loss against the reference rows' (each row's, or their mean over the rows not ignored),
    then its backward (ones for reduction="none"); returns the scale of each row's gradient."""
    rtol, atol = tolerance(loss.dtype)
    if reduction == "none":
        assert loss.shape == (ROWS,)
        assert_close(loss, ref_rows.to(loss.dtype), dtype=loss.dtype, msg="row losses")
        # The last row's loss sits past element 2**31: checked on its own too, in float32.
        torch.testing.assert_close(loss[-1].float(), ref_rows[-1], rtol=rtol, atol=atol)
        loss.backward(torch.ones(ROWS, dtype=loss.dtype))
        return 1.0
    kept = int((target != -100).sum())
    torch.testing.assert_close(loss.float(), ref_rows.sum() / kept, rtol=rtol, atol=atol)
    loss.backward()
    return 1.0 / kept


def edge_rows():
    return list(range(EDGE)) + list(range(ROWS - EDGE, ROWS))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_beyond_2_31_elements(reduction):
    with memory_for(14):
        check_cross_entropy_beyond_2_31_elements(reduction)


def check_cross_entropy_beyond_2_31_elements(reduction):
    x = big_logits().requires_grad_()
    target = big_targets(CLASSES)
    loss = torch_ext.cross_entropy(x, target, reduction=reduction)
    if "cross_entropy" not in _REFERENCE:
        _REFERENCE["cross_entropy"] = reference_row_losses(lambda r0, r1: x.detach()[r0:r1].float(), target, ROWS)
    ref_rows = _REFERENCE["cross_entropy"]
    scale = check_loss_then_backward(loss, ref_rows, target, reduction)
    rows = edge_rows()
    ref = reference_grad_rows(x.detach()[rows].float(), target[rows], scale)
    assert_close(x.grad[rows], ref.to(torch.bfloat16), dtype=torch.bfloat16, msg="gradient rows at both ends")
    assert x.grad[-1].float().abs().sum() > 0 and int(torch.isnan(x.grad[-1]).sum()) == 0


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy_beyond_2_31_logits(reduction):
    with memory_for(4):
        check_linear_cross_entropy_beyond_2_31_logits(reduction)


def check_linear_cross_entropy_beyond_2_31_logits(reduction):
    # float32: the logits exist one chunk at a time, so bfloat16 would save no memory here, and
    # ATen's bfloat16 GEMM at hidden=4 is many times slower on CPUs without AVX-512 BF16, too slow
    # for a test.
    # The offsets under test are the same in every dtype's kernel.
    hidden = 4
    torch.manual_seed(0)
    x = torch.randn(ROWS, hidden, requires_grad=True)
    w = torch.randn(CLASSES, hidden, requires_grad=True)
    target = big_targets(CLASSES)
    loss = torch_ext.linear_cross_entropy(x, w, target, reduction=reduction)
    # The reference, block by block (each far below 2**31 elements): F.cross_entropy's row losses,
    # and from the gradient of its logits the weight's gradient (which sums every row).
    scale = 1.0 if reduction == "none" else 1.0 / int((target != -100).sum())
    if "linear_cross_entropy" not in _REFERENCE:  # the weight's gradient for scale 1
        ref_rows, ref_w = torch.empty(ROWS), torch.zeros(CLASSES, hidden)
        for r0 in range(0, ROWS, BLOCK):
            r1 = min(r0 + BLOCK, ROWS)
            xb = x.detach()[r0:r1]
            logits = F.linear(xb, w.detach()).requires_grad_()
            rows_loss = F.cross_entropy(logits, target[r0:r1], reduction="none")
            rows_loss.backward(torch.ones_like(rows_loss))
            ref_rows[r0:r1] = rows_loss.detach()
            ref_w += logits.grad.t() @ xb
        _REFERENCE["linear_cross_entropy"] = ref_rows, ref_w
    ref_rows, ref_w = _REFERENCE["linear_cross_entropy"]
    ref_w = ref_w * scale
    assert check_loss_then_backward(loss, ref_rows, target, reduction) == scale
    # The input's gradient rows at both ends (the last ones come from the last chunk).
    rows = edge_rows()
    x_ref = x.detach()[rows].requires_grad_()
    (scale * F.cross_entropy(F.linear(x_ref, w.detach()), target[rows], reduction="sum")).backward()
    assert_close(x.grad[rows], x_ref.grad, dtype=x.dtype, msg="input gradient rows")
    assert_close(w.grad, ref_w, dtype=w.dtype, msg="weight gradient")
