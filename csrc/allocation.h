// Allocation of the large tensors the ops return or use as scratch, for tensors of any device:
// on CPU from csrc/cpu/runtime/allocator.h (huge pages; outputs cached), elsewhere at::empty's (on CUDA
// PyTorch's caching allocator already keeps freed blocks).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "cpu/runtime/allocator.h"

namespace torch_ext {

// at::empty(sizes, options) (contiguous) for an op's output.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? cpu::empty_cpu_output(sizes, options) : at::empty(sizes, options);
}

// A scratch buffer an op frees before it returns (see cpu::empty_cpu_scratch).
inline at::Tensor empty_scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? cpu::empty_cpu_scratch(sizes, options) : at::empty(sizes, options);
}

// Whether an op may form a result in `t` instead of allocating: it holds the only reference to t and
// to t's memory (so no caller can see the write), t is contiguous and needs no gradient. The C++
// autograd node moves the engine's incoming gradient into the backward op, and hands over saved
// tensors when the graph is not retained (csrc/autograd_node.cpp).
inline bool held_alone(const at::Tensor& t) {
  return t.defined() && t.use_count() == 1 && t.storage().use_count() == 1 && t.is_contiguous() && !t.requires_grad();
}

}  // namespace torch_ext
