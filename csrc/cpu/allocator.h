// Allocation of the large tensors the CPU ops return (gradients, unreduced losses, activations).
//
// A fresh multi-megabyte buffer from malloc is mapped 4 KiB page by page on first touch, and on
// the development machines each page fault costs ~2.5 us: writing a 512 MiB cross-entropy
// gradient took ~300 ms of faults against ~25 ms of memory traffic. empty_cpu_output backs
// buffers of kHugePageMinBytes or more with 2 MiB transparent huge pages (madvise
// MADV_HUGEPAGE, 512x fewer faults), as PyTorch's own allocator does for every allocation when
// THP_MEM_ALLOC_ENABLE=1 is set. Smaller buffers, and systems without THP, get at::empty's.
#pragma once

#include <ATen/core/Tensor.h>

namespace torch_ext::cpu {

constexpr size_t kHugePageMinBytes = size_t(4) << 20;

// at::empty(sizes, options) (contiguous) for a CPU tensor, in huge pages when it is large.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace torch_ext::cpu
