// The check of class-index targets of the CUDA cross-entropy ops: a bad index is a Python
// IndexError, never a device-side assert. It costs one host synchronization, so it runs once
// where targets enter (the forward ops), not in the backward ops (their targets were checked by
// the forward) nor once per chunk of linear_cross_entropy (which checks all its targets once).
// The kernels never read out of bounds for a bad index they were handed unchecked: its row's loss
// and gradient are NaN.
// Plain C++ (no CUDA headers): included by csrc/linear_cross_entropy.cpp in CUDA builds.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torch_ext::cuda {

// Raises IndexError naming the first index that is neither ignore_index nor in [0, classes).
void check_class_targets(const char* op, const at::Tensor& target, int64_t classes, int64_t ignore_index);

// While one is alive on this thread, the CUDA cross-entropy forward ops skip their check: its
// creator has checked every target it will pass them (one synchronization for many calls).
class TargetsChecked {
 public:
  TargetsChecked();
  ~TargetsChecked();
  TargetsChecked(const TargetsChecked&) = delete;
  TargetsChecked& operator=(const TargetsChecked&) = delete;

 private:
  bool previous_;
};

}  // namespace torch_ext::cuda
