// Parsing of the loss options shared by the CPU and CUDA loss kernels: the reduction, and which
// elementwise regression loss. Messages name the argument as torch.nn.functional does.
#pragma once

#include <c10/macros/Macros.h>
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

// The elementwise loss of d = input - target, and its derivative in input (before the weight and
// the incoming gradient), on one element: ATen's formulas, including which side of a boundary
// takes which branch and what NaN gives. The CPU kernels (csrc/cpu/kernels/regression_loss.h)
// compute the same on SIMD registers; the CUDA kernels call these.
template <typename T>
C10_HOST_DEVICE inline T regression_loss_value(RegressionLoss kind, T d, T param) {
  const T z = d < T(0) ? -d : d;
  switch (kind) {
    case RegressionLoss::Mse: return d * d;
    case RegressionLoss::Huber: return z < param ? T(0.5) * z * z : param * (z - T(0.5) * param);
    case RegressionLoss::SmoothL1:
      if (param == T(0)) return z;  // l1_loss (NaN stays NaN)
      return z < param ? T(0.5) * z * z / param : z - T(0.5) * param;
  }
  return d;
}

template <typename T>
C10_HOST_DEVICE inline T regression_loss_derivative(RegressionLoss kind, T d, T param) {
  switch (kind) {
    case RegressionLoss::Mse: return T(2) * d;
    case RegressionLoss::Huber: return d < -param ? -param : (d > param ? param : d);  // NaN stays NaN
    case RegressionLoss::SmoothL1:
      if (param == T(0)) return d > T(0) ? T(1) : (d < T(0) ? T(-1) : T(0));  // sgn: 0 at 0 and NaN
      return d < -param ? T(-1) : (d > param ? T(1) : d / param);
  }
  return d;
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
