// Fused elementwise regression losses on CPU: mse, huber, smooth_l1 (csrc/cpu/kernels/
// regression_loss.h has the formulas).
//   forward : one read of input and target (and weight); the loss per element, or sums over
//             fixed blocks that are added in order (results do not depend on the thread count).
//   backward: one read of input and target, one write of each requested gradient.
//   forward with gradients (regression_loss_fwd's grad_mask, the eager path for reductions mean
//             and sum): the forward pass also writes the gradients for grad_loss = 1.
//   loss_dtype float32 for 16-bit inputs (autocast): the loss is computed in float32 as always
//             and returned unrounded; the gradients stay in the inputs' dtype.
// Nothing is saved for backward besides the inputs. The op takes input and target of one
// shape; the Python functions broadcast them first, as torch.nn.functional does.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <string_view>

#include "checks.h"
#include "cpu/runtime/allocator.h"
#include "cpu/runtime/kernel_table.h"
#include "loss.h"
#include "loss_checks.h"

namespace torch_ext {
namespace {

using at::Tensor;
using cpu::KernelsFor;

constexpr int64_t kReductionBlock = 32768;  // elements per partial sum

template <typename S>
cpu::RegressionLossArgs<S> kernel_args(RegressionLoss kind, double param, const Tensor& x, const Tensor& t,
                                       const Tensor& w) {
  cpu::RegressionLossArgs<S> a{};
  a.numel = x.numel();
  a.block = kReductionBlock;
  a.input = x.const_data_ptr<S>();
  a.target = t.const_data_ptr<S>();
  a.weight = w.defined() ? w.const_data_ptr<S>() : nullptr;
  a.loss = kind;
  a.param = cpu::acc_t<S>(param);
  return a;
}

// The forward kernel; given (defined) grad_input / grad_target, it also writes the gradients for
// d(loss)/d(element loss) = scale in the same pass (regression_loss_fwd's grad_mask).
// A defined `out` holds the per-element loss in S or in acc_t<S>.
template <typename S>
void run_forward(RegressionLoss kind, double param, const Tensor& x, const Tensor& t, const Tensor& w, Tensor& out,
                 Tensor& loss_partials, Tensor& weight_partials, Tensor* grad_input = nullptr,
                 Tensor* grad_target = nullptr, double scale = 0) {
  using A = cpu::acc_t<S>;
  auto a = kernel_args<S>(kind, param, x, t, w);
  const bool out_in_input_dtype = out.defined() && out.scalar_type() == x.scalar_type();
  a.out = out_in_input_dtype ? out.data_ptr<S>() : nullptr;
  a.out_acc = out.defined() && !out_in_input_dtype ? out.data_ptr<A>() : nullptr;
  a.loss_partials = loss_partials.defined() ? loss_partials.data_ptr<A>() : nullptr;
  a.weight_partials = weight_partials.defined() ? weight_partials.data_ptr<A>() : nullptr;
  a.scale = A(scale);
  a.grad_input = grad_input != nullptr && grad_input->defined() ? grad_input->data_ptr<S>() : nullptr;
  a.grad_target = grad_target != nullptr && grad_target->defined() ? grad_target->data_ptr<S>() : nullptr;
  KernelsFor<S>::regression_loss_forward(cpu::cpu_kernels())(a);
}

template <typename S>
void run_backward(RegressionLoss kind, double param, const Tensor& x, const Tensor& t, const Tensor& w,
                  const Tensor& grad, double scale, Tensor& grad_input, Tensor& grad_target) {
  using A = cpu::acc_t<S>;
  auto a = kernel_args<S>(kind, param, x, t, w);
  const bool grad_in_input_dtype = grad.defined() && grad.scalar_type() == x.scalar_type();
  a.grad_loss = grad_in_input_dtype ? grad.const_data_ptr<S>() : nullptr;
  a.grad_loss_acc = grad.defined() && !grad_in_input_dtype ? grad.const_data_ptr<A>() : nullptr;
  a.scale = cpu::acc_t<S>(scale);
  a.grad_input = grad_input.defined() ? grad_input.data_ptr<S>() : nullptr;
  a.grad_target = grad_target.defined() ? grad_target.data_ptr<S>() : nullptr;
  KernelsFor<S>::regression_loss_backward(cpu::cpu_kernels())(a);
}

double sum_partials(const Tensor& partials) {
  return partials.scalar_type() == at::kDouble ? sum_in_order(partials.const_data_ptr<double>(), partials.numel())
                                               : sum_in_order(partials.const_data_ptr<float>(), partials.numel());
}

// The divisor of a mean's gradient: the sum of the weights (weighted mse) or the element count.
double mean_divisor(RegressionLoss kind, const std::optional<Tensor>& weight, const Tensor& w, int64_t numel) {
  return divides_by_weight_sum(kind, weight) ? w.sum(at::kDouble).item<double>() : double(numel);
}

// The sum of the block partials, divided for the mean by the weights' sum (weighted mse) or numel.
Tensor reduced_loss(Reduction red, const Tensor& loss_partials, const Tensor& weight_partials, int64_t numel,
                    const Tensor& input, at::ScalarType loss_dtype) {
  double total = sum_partials(loss_partials);
  if (red == Reduction::Mean) total /= weight_partials.defined() ? sum_partials(weight_partials) : double(numel);
  return at::scalar_tensor(total, input.options().dtype(loss_dtype));
}

std::tuple<Tensor, Tensor> regression_loss_bwd_cpu(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                                   const std::optional<Tensor>& weight, c10::string_view loss,
                                                   double param, c10::string_view reduction,
                                                   std::array<bool, 2> output_mask) {
  constexpr const char* op = "torch_ext.regression_loss_bwd";
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const RegressionLoss kind = check_regression_args(op, input, target, weight, loss, param);
  check_same_device(op, input, "input", grad_loss, "grad_loss");
  const Tensor x = input.contiguous(), t = target.contiguous();
  const Tensor w = weight.has_value() ? weight->contiguous() : Tensor();
  Tensor grad;
  double scale = 0;
  check_grad_loss(op, grad_loss, red, reduction, input.sizes());
  if (red == Reduction::None) {
    // A float32 incoming gradient of 16-bit inputs (a float32 loss under autocast) is read as it
    // is, so the product is rounded once, as autocast's float32 gradient is.
    grad = (grad_loss.scalar_type() == accumulate_dtype(input) ? grad_loss : grad_loss.to(input.scalar_type()))
               .contiguous();
  } else {
    scale = grad_loss.item<double>();
    if (red == Reduction::Mean) scale /= mean_divisor(kind, weight, w, x.numel());
  }
  Tensor grad_input = output_mask[0] ? cpu::empty_cpu_output(input.sizes(), input.options()) : Tensor();
  Tensor grad_target = output_mask[1] ? cpu::empty_cpu_output(input.sizes(), input.options()) : Tensor();
  if (x.numel() > 0 && (grad_input.defined() || grad_target.defined())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "run_backward", [&] {
      run_backward<scalar_t>(kind, param, x, t, w, grad, scale, grad_input, grad_target);
    });
  }
  return {grad_input, grad_target};
}

// The loss in one pass over input and target (and weight); with grad_mask, the same pass writes
// the gradients for grad_loss = 1 (the eager path for reductions mean and sum on every device;
// its backward hands them over).
std::tuple<Tensor, Tensor, Tensor> regression_loss_fwd_cpu(const Tensor& input, const Tensor& target,
                                                           const std::optional<Tensor>& weight, c10::string_view loss,
                                                           double param, c10::string_view reduction,
                                                           std::array<bool, 2> grad_mask,
                                                           std::optional<at::ScalarType> loss_dtype) {
  constexpr const char* op = "torch_ext.regression_loss";
  const bool any_grad = grad_mask[0] || grad_mask[1];
  const Reduction red = any_grad ? check_reduction_with_grad_in_forward(op, reduction)
                                 : parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const RegressionLoss kind = check_regression_args(op, input, target, weight, loss, param);
  const at::ScalarType out_dtype = loss_dtype_or_input(op, input, loss_dtype);
  const Tensor x = input.contiguous(), t = target.contiguous();
  const Tensor w = weight.has_value() ? weight->contiguous() : Tensor();
  const auto acc = accumulate_dtype(input);
  const int64_t blocks = (x.numel() + kReductionBlock - 1) / kReductionBlock;
  Tensor out, loss_partials, weight_partials;
  if (red == Reduction::None) {
    // In the input's dtype or, for another loss_dtype, in the accumulation dtype the kernel
    // computes in (converted below where that is not loss_dtype either).
    out =
        cpu::empty_cpu_output(input.sizes(), input.options().dtype(out_dtype == input.scalar_type() ? out_dtype : acc));
  } else {
    loss_partials = at::empty({blocks}, input.options().dtype(acc));
    if (red == Reduction::Mean && divides_by_weight_sum(kind, weight))
      weight_partials = at::empty({blocks}, input.options().dtype(acc));
  }
  // d(loss)/d(element loss), as the backward op's scale for grad_loss = 1 (the same bits).
  double scale = 1.0;
  if (any_grad && red == Reduction::Mean) scale /= mean_divisor(kind, weight, w, x.numel());
  Tensor grad_input = grad_mask[0] ? cpu::empty_cpu_output(input.sizes(), input.options()) : Tensor();
  Tensor grad_target = grad_mask[1] ? cpu::empty_cpu_output(input.sizes(), input.options()) : Tensor();
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "run_forward", [&] {
      run_forward<scalar_t>(kind, param, x, t, w, out, loss_partials, weight_partials, &grad_input, &grad_target,
                            scale);
    });
  }
  return {red == Reduction::None ? out.to(out_dtype)
                                 : reduced_loss(red, loss_partials, weight_partials, x.numel(), input, out_dtype),
          grad_input, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("regression_loss_fwd", &regression_loss_fwd_cpu);
  m.impl("regression_loss_bwd", &regression_loss_bwd_cpu);
}

}  // namespace torch_ext
