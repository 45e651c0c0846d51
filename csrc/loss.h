// Parsing of the loss options shared by the CPU and CUDA loss kernels: the reduction, and which
// elementwise regression loss. Messages name the argument as torch.nn.functional does.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace torch_ext {

enum class Reduction : int8_t { None = 0, Mean, Sum };

inline Reduction parse_reduction(std::string_view name) {
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  if (name == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction must be 'mean', 'sum' or 'none'; got '", std::string(name), "'");
}

// The elementwise losses of csrc/cpu/regression_loss.cpp; `param` is delta (huber) or beta
// (smooth_l1).
enum class RegressionLoss : int8_t { Mse = 0, Huber, SmoothL1 };

inline RegressionLoss parse_regression_loss(std::string_view name) {
  if (name == "mse") return RegressionLoss::Mse;
  if (name == "huber") return RegressionLoss::Huber;
  if (name == "smooth_l1") return RegressionLoss::SmoothL1;
  TORCH_CHECK_VALUE(false, "loss must be 'mse', 'huber' or 'smooth_l1'; got '", std::string(name), "'");
}

// Sum of n values in index order, in double: the reductions add fixed per-row or per-block
// partial results with this, so a loss does not depend on the number of threads.
template <typename A>
inline double sum_in_order(const A* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]);
  return s;
}

}  // namespace torch_ext
