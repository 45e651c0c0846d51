// Allocation of the large tensors the CPU ops return (gradients, unreduced losses, activations).
//
// A fresh multi-megabyte buffer is mapped page by page on first touch, and on the development
// machines (virtual machines) those faults dominate memory-bound ops: faulting in the gradient of
// a large cross-entropy takes several times as long as the op's whole memory traffic (docs/cpu.md
// has the figures); memory the process gave back to the system costs as much again when it is
// touched anew, even in 2 MiB pages. glibc keeps a freed block for reuse only below its mmap
// threshold, which grows to at most 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; less the 2 MiB
// of alignment with THP_MEM_ALLOC_ENABLE=1), and measured here its reuse is unreliable well before
// that: a cross-entropy's 24 MiB gradient from at::empty took markedly longer than a cached one,
// an 8 MiB one the same time. So outputs of kCachedOutputMinBytes or more
//   - are 2 MiB-aligned with MADV_HUGEPAGE (transparent huge pages: 512x fewer faults), as
//     PyTorch's own allocator does for all tensors when THP_MEM_ALLOC_ENABLE=1 is set (the last,
//     partly filled 2 MiB of a block in 4 KiB pages, so that no more is resident than is used), and
//   - are kept when freed, up to a bounded total (the config's cpu_cache_bytes, csrc/runtime_config.h:
//     TORCH_EXT_CPU_CACHE_BYTES or torch_ext.set_config; default 2 GiB, 0 disables), and handed to the next request of
//     about the same size: a training loop reuses the same gradient buffers each step, as PyTorch's CUDA caching
//     allocator does. torch_ext.empty_cache() returns them to the system.
// Smaller outputs get at::empty's, as every ATen tensor does: glibc reuses them without faults,
// and a block freed there can serve PyTorch's next tensor. (A cache of smaller blocks kept them
// from PyTorch: a Transformer encoder's fused feed-forward activations, 8 MiB each, raised its
// training step's peak memory above eager's.)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace torch_ext::cpu {

constexpr size_t kCachedOutputMinBytes = size_t(16) << 20;
// Scratch buffers (below) of this size or more are mapped and unmapped on their own.
constexpr size_t kScratchMinBytes = size_t(4) << 20;

// at::empty(sizes, options) (contiguous) for a CPU tensor, from the cache above when large.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// (Ops for any device call csrc/allocation.h's empty_output / empty_scratch, which come here for
// CPU tensors.)
//
// A scratch buffer an op uses and frees before it returns: huge pages like the outputs, but
// given back to the system when freed rather than cached, since a cached scratch block would sit
// idle (counted in the process's memory) through the rest of a training step until the op's
// next call. For ops whose point is to save memory (linear_cross_entropy's chunk of logits).
// at::empty's for small sizes, other devices and systems without mmap.
at::Tensor empty_cpu_scratch(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached block; returns the bytes released.
size_t empty_cache();

// Bytes held in cached (free) blocks.
size_t cached_bytes();

// Frees the cached blocks beyond the config's cpu_cache_bytes (after torch_ext.set_config lowered
// it); returns the bytes released.
size_t trim_cache();

}  // namespace torch_ext::cpu
