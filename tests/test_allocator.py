"""Tests of the CPU output allocator (csrc/cpu/allocator.*): large outputs of the ops come from a
bounded cache of freed huge-page blocks, which torch_ext.empty_cache() releases and
TORCH_EXT_CPU_CACHE_BYTES bounds (0 disables)."""
from __future__ import annotations

import os
import re
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torch_ext
from utils import run_python

BIG = (2048, 4096)  # 32 MiB of float32: above the cache's threshold (kCachedOutputMinBytes, 16 MiB)
MEDIUM = (512, 4096)  # 8 MiB: under the threshold (16 MiB), at::empty's like any PyTorch tensor


def _grad_of_mse(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    torch_ext.mse_loss(x, torch.zeros_like(x), reduction="sum").backward()
    return x.grad


def test_freed_output_is_reused_and_released():
    torch_ext.empty_cache()
    assert torch_ext.cached_bytes() == 0
    x = torch.randn(BIG)
    g = _grad_of_mse(x)
    torch.testing.assert_close(g, 2 * x)
    ptr = g.data_ptr()
    assert ptr % (2 << 20) == 0, "large outputs are 2 MiB aligned (huge pages)"
    del g
    assert torch_ext.cached_bytes() >= x.numel() * 4
    g2 = _grad_of_mse(x)  # same size: the cached block comes back, with the right values
    assert g2.data_ptr() == ptr
    assert torch_ext.cached_bytes() == 0
    torch.testing.assert_close(g2, 2 * x)
    del g2
    released = torch_ext.empty_cache()
    assert released >= x.numel() * 4 and torch_ext.cached_bytes() == 0


def _mappings(ptr: int, end: int):
    """[start, end, VmFlags] of this process's mappings that overlap [ptr, end), from /proc/self/smaps."""
    found, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0] if line.strip() else ""
            if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", first):
                lo, hi = (int(v, 16) for v in first.split("-"))
                current = [lo, hi, set()] if lo < end and hi > ptr else None
                if current is not None:
                    found.append(current)
            elif current is not None and line.startswith("VmFlags:"):
                current[2] = set(line.split()[1:])
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/smaps"),
                    reason="Linux's /proc/self/smaps")
def test_last_partly_filled_huge_page_is_not_advised():
    # A 78.125 MiB output (cross_entropy 2048x10000's gradient) gets a block of 80 MiB: huge pages
    # for its first 78 MiB, 4 KiB pages past them, so that no more is resident than is used (a huge
    # page there would make it up to 2 MiB more than the tensor, and than PyTorch's allocator).
    torch_ext.empty_cache()
    mib = 1 << 20
    out = torch_ext.mse_loss(torch.randn(2048, 10000), torch.zeros(2048, 10000), reduction="none")
    ptr = out.data_ptr()
    assert ptr % (2 * mib) == 0
    maps = _mappings(ptr, ptr + 80 * mib)
    head = [m for m in maps if m[0] <= ptr < m[1]]
    tail = [m for m in maps if m[0] <= ptr + 78 * mib < m[1]]
    assert head and tail, maps
    assert "hg" in head[0][2] and head[0][1] == ptr + 78 * mib, maps
    assert "nh" in tail[0][2] and tail[0][0] == ptr + 78 * mib and tail[0][1] >= ptr + 80 * mib, maps
    del out
    torch_ext.empty_cache()


def test_small_outputs_do_not_use_the_cache():
    # Under 16 MiB, glibc reuses a freed block without page faults, and PyTorch's next tensor can
    # take it: a cached one would be out of PyTorch's reach.
    torch_ext.empty_cache()
    for shape in [(64, 64), MEDIUM]:
        g = _grad_of_mse(torch.randn(shape))
        del g
        assert torch_ext.cached_bytes() == 0


def test_cached_tensor_behaves_like_any_tensor():
    torch_ext.empty_cache()
    x = torch.randn(BIG)
    g = _grad_of_mse(x)
    g.resize_(16, 16)  # a resizable storage, like at::empty's
    g.add_(1)
    head = g.flatten().clone()
    torch.testing.assert_close(head, 2 * x.flatten()[:256] + 1)
    g.resize_(4096, 4096)  # grows through the same allocator
    assert g.shape == (4096, 4096)
    # Growing keeps the old elements; the new ones are uninitialized (any bits, NaN included),
    # so they are written before they are compared.
    torch.testing.assert_close(g.flatten()[:256], head)
    g.view(-1)[256:] = 3.0
    h = g.clone()
    torch.testing.assert_close(h, g)
    assert (h.view(-1)[256:] == 3.0).all()
    del g, h


def test_cache_bytes_env_zero_disables_caching():
    code = textwrap.dedent(
        """
        import torch, torch_ext
        x = torch.randn(2048, 4096, requires_grad=True)
        torch_ext.mse_loss(x, torch.zeros_like(x)).backward()
        x.grad = None
        print(torch_ext.cached_bytes())
        """
    )
    result = run_python(code, env={"TORCH_EXT_CPU_CACHE_BYTES": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_lowering_the_cache_bound_frees_the_blocks_beyond_it(set_config):
    # set_config(cpu_cache_bytes=...) at run time: a lower bound frees the cached blocks beyond
    # it at once; 0 then caches nothing; a higher bound caches again.
    torch_ext.empty_cache()
    x = torch.randn(BIG)
    _ = _grad_of_mse(x)
    del _
    held = torch_ext.cached_bytes()
    assert held >= x.numel() * 4
    before = torch_ext.get_config()["cpu_cache_bytes"]
    assert set_config(cpu_cache_bytes=held - 1) == {"cpu_cache_bytes": before}
    assert torch_ext.cached_bytes() == 0
    set_config(cpu_cache_bytes=0)
    _ = _grad_of_mse(x)
    del _
    assert torch_ext.cached_bytes() == 0
    set_config(cpu_cache_bytes=2 << 30)
    _ = _grad_of_mse(x)
    del _
    assert torch_ext.cached_bytes() >= x.numel() * 4
    torch_ext.empty_cache()


def test_gradients_stay_correct_across_reused_steps():
    # A training-loop pattern: the same gradient buffer is handed out each step, so a stale value
    # would show up as a wrong gradient in a later step.
    torch_ext.empty_cache()
    for _step in range(3):
        x = torch.randn(2048, 4096, requires_grad=True)  # a 32 MiB gradient: cached
        t = torch.randint(0, 4096, (2048,))
        torch_ext.cross_entropy(x, t).backward()
        expected = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
        torch.testing.assert_close(x.grad, expected)


def test_linear_cross_entropy_scratch_is_not_cached():
    # The chunk of logits (here 64 x 32000 float32 = 8 MiB) is scratch: given back to the system
    # when the op returns, not kept in the cache through the rest of a training step.
    torch_ext.empty_cache()
    x, w = torch.randn(64, 16), torch.randn(32000, 16)
    t = torch.randint(32000, (64,))
    with torch.no_grad():
        loss = torch_ext.linear_cross_entropy(x, w, t, chunk_size=64)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.T, t), rtol=1e-5, atol=1e-5)
    assert torch_ext.cached_bytes() == 0
    # The weight gradient (32000 x 16 float32 = 2 MiB) is under the cache's threshold; a wider
    # one (32000 x 272 float32, 33 MiB) is an output, cached when freed as before.
    w = torch.randn(32000, 272, requires_grad=True)
    torch_ext.linear_cross_entropy(torch.randn(64, 272), w, t, chunk_size=64).backward()
    assert torch_ext.cached_bytes() == 0
    w.grad = None
    assert torch_ext.cached_bytes() >= 32000 * 272 * 4
    torch_ext.empty_cache()
