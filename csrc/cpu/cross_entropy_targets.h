// The check of class-index targets of the CPU cross-entropy ops, for callers that pass the
// targets on in pieces (linear_cross_entropy's chunks), so that a bad index is reported under the
// caller's name. The CUDA counterpart: csrc/cuda/cross_entropy_targets.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torch_ext::cpu {

// Raises IndexError, naming `op`, at the first index that is neither ignore_index nor in
// [0, classes). target: class indices (int64 or uint8), any shape.
void check_class_targets(const char* op, const at::Tensor& target, int64_t classes, int64_t ignore_index);

}  // namespace torch_ext::cpu
