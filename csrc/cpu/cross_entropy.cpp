// Fused cross-entropy on CPU, with every option of F.cross_entropy plus z_loss and softcap, and
// what the lse and accuracy outputs need (stats: each row's logsumexp, whether its argmax is its
// target; grad_lse in backward).
//
//   forward : one read of the logits: per row the logsumexp (online over blocks, or over a tile
//             of positions for (N, C, d...) input) and the loss; no log-probabilities are
//             stored. Saved for backward: `stats`, three numbers per row (the max logit and
//             log(sum exp(x - max)), whose sum is the logsumexp, and for probability targets the
//             row's target mass sum_c w_c t'_c, for class targets whether its argmax is its target).
//   backward: one read of the logits and one write of the gradient, per row.
//   forward with gradient (cross_entropy_fwd's grad_mask, the eager path for reductions mean and
//             sum): each (N, C) row's gradient for grad_loss = 1 is written right after its
//             statistics, while the row is in L2: one read of the logits per training step.
// The formulas are in csrc/cpu/kernels/cross_entropy.h. Reductions add per-row losses in row
// order (sum_in_order), so results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>
#include <vector>

#include "checks.h"
#include "cpu/cross_entropy_targets.h"
#include "cpu/runtime/allocator.h"
#include "cpu/runtime/kernel_table.h"
#include "loss.h"
#include "loss_checks.h"

namespace torch_ext {
namespace {

using at::Tensor;
using cpu::KernelsFor;

// Checks every class index (ignore_index aside) and returns the denominator of the mean: the sum
// of the weights of the rows not ignored (their count without weight).
double check_targets(const char* op, const Tensor& target, int64_t classes, int64_t ignore_index,
                     const Tensor& weight) {
  const int64_t* y = target.const_data_ptr<int64_t>();
  const int64_t rows = target.numel();
  double denominator = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (y[r] == ignore_index) continue;
    TORCH_CHECK_INDEX(y[r] >= 0 && y[r] < classes, op, ": target ", y[r],
                      " is out of bounds: class indices must be in [0, ", classes - 1, "] or equal ignore_index (",
                      ignore_index, ")");
    if (!weight.defined()) {
      denominator += 1;
    } else if (weight.scalar_type() == at::kDouble) {
      denominator += weight.const_data_ptr<double>()[y[r]];
    } else {
      denominator += weight.const_data_ptr<float>()[y[r]];
    }
  }
  return denominator;
}

// The inputs of both ops, prepared for the kernels: contiguous, targets as int64, weight in the
// accumulation type, and the mean's denominator.
struct CrossEntropyInputs {
  CrossEntropyLayout layout;
  Tensor input, target, weight;
  double weight_sum, denominator;
  double softcap;
};

CrossEntropyInputs prepare(const char* op, const Tensor& input, const Tensor& target,
                           const std::optional<Tensor>& weight, int64_t ignore_index, double label_smoothing,
                           double z_loss, double softcap) {
  CrossEntropyInputs in;
  in.layout = check_cross_entropy_args(op, input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  in.softcap = softcap;
  in.input = input.contiguous();
  in.weight = weight.has_value() ? weight->to(accumulate_dtype(input)).contiguous() : Tensor();
  if (in.layout.probabilities) {
    in.target = target.contiguous();
    in.denominator = double(in.layout.rows());
  } else {
    in.target = target.to(at::kLong).contiguous();
    in.denominator = check_targets(op, in.target, in.layout.classes, ignore_index, in.weight);
  }
  in.weight_sum = !in.weight.defined() ? double(in.layout.classes)
                  : in.weight.scalar_type() == at::kDouble
                      ? sum_in_order(in.weight.const_data_ptr<double>(), in.weight.numel())
                      : sum_in_order(in.weight.const_data_ptr<float>(), in.weight.numel());
  return in;
}

template <typename S>
cpu::CrossEntropyArgs<S> kernel_args(const CrossEntropyInputs& in, int64_t ignore_index, double label_smoothing,
                                     double z_loss, Tensor& stats) {
  using A = cpu::acc_t<S>;
  cpu::CrossEntropyArgs<S> a{};
  a.batch = in.layout.batch;
  a.classes = in.layout.classes;
  a.spatial = in.layout.spatial;
  a.input = in.input.const_data_ptr<S>();
  a.target = in.layout.probabilities ? nullptr : in.target.const_data_ptr<int64_t>();
  a.target_prob = in.layout.probabilities ? in.target.const_data_ptr<S>() : nullptr;
  a.weight = in.weight.defined() ? in.weight.const_data_ptr<A>() : nullptr;
  a.ignore_index = ignore_index;
  a.label_smoothing = A(label_smoothing);
  a.z_loss = A(z_loss);
  a.softcap = A(in.softcap);
  a.weight_sum = A(in.weight_sum);
  a.stats = stats.data_ptr<A>();
  return a;
}

// The forward kernel; with grad_input, also the input's gradient for d(loss)/d(row loss) = scale:
// (N, C) rows in the same pass (each row's gradient while it is in L2), (N, C, d...) tiles by
// the backward kernel right after.
template <typename S>
void run_forward(const CrossEntropyInputs& in, int64_t ignore_index, double label_smoothing, double z_loss,
                 bool ignored_row_stats, Tensor& stats, Tensor& row_loss, Tensor* grad_input = nullptr,
                 double scale = 0) {
  auto a = kernel_args<S>(in, ignore_index, label_smoothing, z_loss, stats);
  a.row_loss = row_loss.data_ptr<cpu::acc_t<S>>();
  a.ignored_row_stats = ignored_row_stats;
  if (grad_input != nullptr) {
    a.scale = cpu::acc_t<S>(scale);
    a.grad_input = grad_input->data_ptr<S>();
  }
  KernelsFor<S>::cross_entropy_forward(cpu::cpu_kernels())(a);
  if (grad_input != nullptr && in.layout.spatial > 1) KernelsFor<S>::cross_entropy_backward(cpu::cpu_kernels())(a);
}

template <typename S>
void run_backward(const CrossEntropyInputs& in, int64_t ignore_index, double label_smoothing, double z_loss,
                  Tensor& stats, const Tensor& row_scale, double scale, const Tensor& grad_lse, Tensor& grad_input,
                  Tensor& grad_target) {
  using A = cpu::acc_t<S>;
  auto a = kernel_args<S>(in, ignore_index, label_smoothing, z_loss, stats);
  a.row_scale = row_scale.defined() ? row_scale.const_data_ptr<A>() : nullptr;
  a.grad_lse = grad_lse.defined() ? grad_lse.const_data_ptr<A>() : nullptr;
  a.scale = A(scale);
  a.grad_input = grad_input.defined() ? grad_input.data_ptr<S>() : nullptr;
  a.grad_target = grad_target.defined() ? grad_target.data_ptr<S>() : nullptr;
  KernelsFor<S>::cross_entropy_backward(cpu::cpu_kernels())(a);
}

double sum_rows(const Tensor& row_loss) {
  return row_loss.scalar_type() == at::kDouble ? sum_in_order(row_loss.const_data_ptr<double>(), row_loss.numel())
                                               : sum_in_order(row_loss.const_data_ptr<float>(), row_loss.numel());
}

Tensor reduced_loss(Reduction red, const Tensor& row_loss, const CrossEntropyInputs& in, at::ScalarType dtype) {
  switch (red) {
    case Reduction::None: return row_loss.to(dtype).view(in.layout.loss_shape);
    case Reduction::Sum: return at::scalar_tensor(sum_rows(row_loss), row_loss.options().dtype(dtype));
    default: return at::scalar_tensor(sum_rows(row_loss) / in.denominator, row_loss.options().dtype(dtype));
  }
}

// The gradients into grad_input / grad_target (either may be undefined); grad_input may be the
// input itself (the kernels read each block before writing it).
void backward_into(const char* op, const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                   const std::optional<Tensor>& weight, const Tensor& stats, int64_t ignore_index,
                   c10::string_view reduction, double label_smoothing, double z_loss, double softcap,
                   const std::optional<Tensor>& grad_lse, Tensor& grad_input, Tensor& grad_target) {
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const CrossEntropyInputs in = prepare(op, input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  const int64_t rows = in.layout.rows();
  TORCH_CHECK(!grad_target.defined() || in.layout.probabilities, op,
              ": output_mask[1] asks for the target's gradient, which exists only for class-probability targets");
  check_row_stats(op, input, "input", stats, "stats", rows, accumulate_dtype(input), "cross_entropy_fwd");
  check_same_device(op, input, "input", grad_loss, "grad_loss");
  Tensor row_scale;
  double scale = 0;
  check_grad_loss(op, grad_loss, red, reduction, at::IntArrayRef(in.layout.loss_shape));
  if (red == Reduction::None) {
    row_scale = grad_loss.to(accumulate_dtype(input)).contiguous();
  } else {
    scale = grad_loss.item<double>() / (red == Reduction::Mean ? in.denominator : 1.0);
  }
  Tensor lse_grad;
  if (grad_lse.has_value()) {
    check_grad_lse(op, input, *grad_lse, rows);
    lse_grad = grad_lse->to(accumulate_dtype(input)).contiguous();
  }
  Tensor stats_c = stats.contiguous();
  if (rows > 0 && in.layout.classes > 0 && (grad_input.defined() || grad_target.defined())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "run_backward", [&] {
      run_backward<scalar_t>(in, ignore_index, label_smoothing, z_loss, stats_c, row_scale, scale, lse_grad, grad_input,
                             grad_target);
    });
  }
}

std::tuple<Tensor, Tensor> cross_entropy_bwd_cpu(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                                 const std::optional<Tensor>& weight, const Tensor& stats,
                                                 int64_t ignore_index, c10::string_view reduction,
                                                 double label_smoothing, double z_loss, std::array<bool, 2> output_mask,
                                                 double softcap, const std::optional<Tensor>& grad_lse) {
  Tensor grad_input = output_mask[0] ? cpu::empty_cpu_output(input.sizes(), input.options()) : Tensor();
  Tensor grad_target = output_mask[1] ? cpu::empty_cpu_output(input.sizes(), input.options()) : Tensor();
  backward_into("torch_ext.cross_entropy_bwd", grad_loss, input, target, weight, stats, ignore_index, reduction,
                label_smoothing, z_loss, softcap, grad_lse, grad_input, grad_target);
  return {grad_input, grad_target};
}

// The input's gradient written over the input (linear_cross_entropy's chunk logits, which are
// not needed afterwards): no second chunk-sized buffer.
void cross_entropy_bwd_inplace_cpu(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                   const std::optional<Tensor>& weight, const Tensor& stats, int64_t ignore_index,
                                   c10::string_view reduction, double label_smoothing, double z_loss, double softcap) {
  constexpr const char* op = "torch_ext.cross_entropy_bwd_inplace";
  TORCH_CHECK(input.is_contiguous(), op, ": input must be contiguous to take its gradient in place");
  Tensor grad_input = input;
  Tensor no_target_grad;
  backward_into(op, grad_loss, input, target, weight, stats, ignore_index, reduction, label_smoothing, z_loss, softcap,
                std::nullopt, grad_input, no_target_grad);
}

// The loss and the stats in one read of the logits; with grad_mask[0], each row's gradient for
// grad_loss = 1 is written right after its statistics, while the row is in L2 (the eager path of
// torch_ext.cross_entropy for reductions mean and sum; its backward hands it over). A probability
// target's gradient (grad_mask[1]) is taken by the backward kernel afterwards.
std::tuple<Tensor, Tensor, Tensor, Tensor> cross_entropy_fwd_cpu(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight, int64_t ignore_index,
    c10::string_view reduction, double label_smoothing, double z_loss, std::array<bool, 2> grad_mask, double softcap,
    bool ignored_row_stats, std::optional<at::ScalarType> loss_dtype) {
  constexpr const char* op = "torch_ext.cross_entropy";
  const bool any_grad = grad_mask[0] || grad_mask[1];
  const Reduction red = any_grad ? check_reduction_with_grad_in_forward(op, reduction)
                                 : parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const at::ScalarType dtype = loss_dtype_or_input(op, input, loss_dtype);
  const CrossEntropyInputs in = prepare(op, input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  TORCH_CHECK(!grad_mask[1] || in.layout.probabilities, op,
              ": grad_mask[1] asks for the target's gradient, which exists only for class-probability targets");
  const int64_t rows = in.layout.rows();
  const auto acc_options = input.options().dtype(accumulate_dtype(input));
  Tensor stats = at::zeros({rows, 3}, acc_options);
  Tensor row_loss = at::zeros({rows}, acc_options);
  Tensor grad_input = grad_mask[0] ? cpu::empty_cpu_output(input.sizes(), input.options()) : Tensor();
  // d(loss)/d(row loss), as the backward op's scale for grad_loss = 1.
  const double scale = red == Reduction::Mean ? 1.0 / in.denominator : 1.0;
  // No classes: every row is ignored (a class index would be out of bounds) or has an empty
  // probability sum, so the loss of each row is 0, as in PyTorch.
  if (rows > 0 && in.layout.classes > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "run_forward", [&] {
      run_forward<scalar_t>(in, ignore_index, label_smoothing, z_loss, ignored_row_stats, stats, row_loss,
                            grad_mask[0] ? &grad_input : nullptr, scale);
    });
  }
  Tensor grad_target;
  if (grad_mask[1]) {
    Tensor no_input_grad;
    grad_target = cpu::empty_cpu_output(input.sizes(), input.options());
    backward_into(op, at::scalar_tensor(1.0, input.options()), input, target, weight, stats, ignore_index, reduction,
                  label_smoothing, z_loss, softcap, std::nullopt, no_input_grad, grad_target);
  }
  return {reduced_loss(red, row_loss, in, dtype), stats, grad_input, grad_target};
}

}  // namespace

void cpu::check_class_targets(const char* op, const Tensor& target, int64_t classes, int64_t ignore_index) {
  check_targets(op, target.to(at::kLong).contiguous(), classes, ignore_index, Tensor());
}

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace_cpu);
}

}  // namespace torch_ext
