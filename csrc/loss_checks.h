// The argument checks of the loss ops (cross_entropy, regression_loss, triplet_margin_loss),
// shared by their CPU and CUDA files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "checks.h"
#include "loss.h"

namespace torch_ext {

// ---- backward ops

// A forward that also forms gradients for grad_loss = 1 (a loss op's grad_mask): the
// loss must be one number, so that the backward can scale the gradient by it.
inline Reduction check_reduction_with_grad_in_forward(const char* op, c10::string_view reduction) {
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  TORCH_CHECK_VALUE(red != Reduction::None, op,
                    ": reduction must be 'mean' or 'sum' (the gradient is formed for a "
                    "grad_loss of one value), got 'none'");
  return red;
}

// The dtype the kernels accumulate an input's values in: float64 for float64, else float32.
inline at::ScalarType accumulate_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype a loss op returns its loss in: loss_dtype (a floating dtype), or the input's.
inline at::ScalarType loss_dtype_or_input(const char* op, const at::Tensor& input,
                                          std::optional<at::ScalarType> loss_dtype) {
  if (!loss_dtype.has_value()) return input.scalar_type();
  TORCH_CHECK_VALUE(at::isFloatingType(*loss_dtype), op, ": loss_dtype must be a floating-point dtype, got ",
                    *loss_dtype);
  return *loss_dtype;
}

// grad_loss of a loss's backward: of the unreduced loss's shape for reduction="none", else one value.
inline void check_grad_loss(const char* op, const at::Tensor& grad_loss, Reduction red, c10::string_view reduction,
                            at::IntArrayRef loss_shape) {
  if (red == Reduction::None) {
    TORCH_CHECK(grad_loss.sizes() == loss_shape, op, ": grad_loss must have shape ", loss_shape,
                " for reduction='none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value for reduction='", std::string(reduction),
                "', got shape ", grad_loss.sizes());
  }
}

// The (rows, 3) per-row statistics a loss's forward saved (`name` from op `from`), in `acc`.
inline void check_row_stats(const char* op, const at::Tensor& input, const char* input_name, const at::Tensor& stats,
                            const char* name, int64_t rows, at::ScalarType acc, const char* from) {
  check_same_device(op, input, input_name, stats, name);
  TORCH_CHECK(stats.scalar_type() == acc && stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 3, op, ": ",
              name, " must be the (", rows, ", 3) ", acc, " tensor from ", from, ", got ", stats.scalar_type(),
              " of shape ", stats.sizes());
}

// ---- cross_entropy

struct CrossEntropyLayout {
  int64_t batch, classes, spatial;
  bool probabilities;               // class-probability targets (floating), else class indices
  std::vector<int64_t> loss_shape;  // of reduction="none": input's shape without the class dim
  int64_t rows() const { return batch * spatial; }
};

inline CrossEntropyLayout check_cross_entropy_args(const char* op, const at::Tensor& input, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                   double label_smoothing, double z_loss, double softcap) {
  TORCH_CHECK(input.dim() >= 1, op, ": input must have shape (C), (N, C) or (N, C, d1, ..., dk), got a 0-D tensor");
  check_floating(op, input, "input");
  check_same_device(op, input, "input", target, "target");
  CrossEntropyLayout layout;
  layout.classes = input.dim() == 1 ? input.size(0) : input.size(1);
  layout.batch = input.dim() == 1 ? 1 : input.size(0);
  layout.spatial = 1;
  for (int64_t d = 0; d < input.dim(); ++d) {
    if (d >= 2) layout.spatial *= input.size(d);
    if (d != (input.dim() == 1 ? 0 : 1)) layout.loss_shape.push_back(input.size(d));
  }
  layout.probabilities = at::isFloatingType(target.scalar_type());
  if (layout.probabilities) {
    TORCH_CHECK(target.sizes() == input.sizes(), op,
                ": a floating-point target holds class probabilities and must have "
                "input's shape ",
                input.sizes(), ", got ", target.sizes(),
                " (class indices must be int64 or uint8, of input's shape without the class dimension)");
    check_same_dtype(op, input, "input", target, "target");
    TORCH_CHECK_VALUE(ignore_index < 0, op,
                      ": ignore_index is not supported for class-probability (floating "
                      "point) targets; got ignore_index=",
                      ignore_index);
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte, op,
                ": target must hold class indices as int64 (or uint8), or class probabilities of input's "
                "floating dtype; got ",
                target.scalar_type());
    TORCH_CHECK(target.sizes() == at::IntArrayRef(layout.loss_shape), op, ": target of class indices must have shape ",
                at::IntArrayRef(layout.loss_shape), " (input's shape without the class dimension), got ",
                target.sizes());
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == layout.classes, op, ": weight must be a 1-D tensor of ",
                layout.classes, " class weights, got shape ", weight->sizes());
    check_same_device(op, input, "input", *weight, "weight");
    check_floating(op, *weight, "weight");
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be between 0.0 and 1.0, got ", label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(z_loss), op, ": z_loss must be finite, got ", z_loss);
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), op,
                    ": softcap must be a positive finite number (0: no softcap), got ", softcap);
  return layout;
}

// The incoming gradient of the rows' logsumexp (cross_entropy_bwd's grad_lse): one value per row.
inline void check_grad_lse(const char* op, const at::Tensor& input, const at::Tensor& grad_lse, int64_t rows) {
  check_same_device(op, input, "input", grad_lse, "grad_lse");
  TORCH_CHECK(at::isFloatingType(grad_lse.scalar_type()) && grad_lse.numel() == rows, op,
              ": grad_lse must be a floating tensor with one value per row (", rows, "), got ", grad_lse.scalar_type(),
              " of shape ", grad_lse.sizes());
}

// ---- regression_loss

inline RegressionLoss check_regression_args(const char* op, const at::Tensor& input, const at::Tensor& target,
                                            const std::optional<at::Tensor>& weight, c10::string_view loss,
                                            double param) {
  const RegressionLoss kind = parse_regression_loss(std::string_view(loss.data(), loss.size()));
  check_floating(op, input, "input");
  check_same_device(op, input, "input", target, "target");
  check_same_dtype(op, input, "input", target, "target");
  TORCH_CHECK(input.sizes() == target.sizes(), op,
              ": input and target must have the same shape (the functional API "
              "broadcasts them first), got ",
              input.sizes(), " and ", target.sizes());
  if (weight.has_value()) {
    check_same_device(op, input, "input", *weight, "weight");
    check_same_dtype(op, input, "input", *weight, "weight");
    TORCH_CHECK(weight->sizes() == input.sizes(), op, ": weight must have input's shape ", input.sizes(), ", got ",
                weight->sizes());
  }
  if (kind == RegressionLoss::Huber) {
    TORCH_CHECK_VALUE(param > 0, op, ": huber_loss needs delta > 0, got delta=", param);
  } else if (kind == RegressionLoss::SmoothL1) {
    TORCH_CHECK_VALUE(param >= 0, op, ": smooth_l1_loss needs beta >= 0, got beta=", param);
  }
  return kind;
}

// The mean's denominator: the sum of the weights for weighted mse (as F.mse_loss), else numel.
inline bool divides_by_weight_sum(RegressionLoss kind, const std::optional<at::Tensor>& weight) {
  return kind == RegressionLoss::Mse && weight.has_value();
}

// ---- triplet_margin_loss
inline void check_triplet_args(const char* op, const at::Tensor& anchor, const at::Tensor& positive,
                               const at::Tensor& negative, double p) {
  TORCH_CHECK(anchor.dim() == 1 || anchor.dim() == 2, op, ": anchor must have shape (D) or (N, D), got ",
              anchor.sizes());
  check_floating(op, anchor, "anchor");
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{positive, "positive"}, {negative, "negative"}}) {
    TORCH_CHECK(t.sizes() == anchor.sizes(), op, ": ", name, " must have anchor's shape ", anchor.sizes(), ", got ",
                t.sizes());
    check_same_device(op, anchor, "anchor", t, name);
    check_same_dtype(op, anchor, "anchor", t, name);
  }
  TORCH_CHECK_VALUE(p > 0 && std::isfinite(p), op,
                    ": p must be a positive finite number (torch_ext does not "
                    "implement the p=0 and p=inf distances), got p=",
                    p);
}

}  // namespace torch_ext
