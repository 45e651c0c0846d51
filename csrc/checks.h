// Argument checks shared by the op implementations. Each message names the op and the
// argument, so a user can tell which of their tensors is wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace torch_ext {

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", b_name, " is on ", b.device(), " but ", a_name, " is on ", a.device(),
              "; they must be on the same device");
}

inline void check_same_dtype(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " has dtype ", b.scalar_type(), " but ", a_name,
              " has dtype ", a.scalar_type(), "; they must match");
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ",
              name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

}  // namespace torch_ext
