// Fused elementwise regression losses on CUDA: mse, huber, smooth_l1; the same ops and formulas
// as csrc/cpu/regression_loss.cpp (the scalar formulas are in csrc/loss.h).
//   forward : one read of input and target (and weight); the loss per element, or one partial
//             sum per CUDA block of a fixed number of elements, added by ATen's deterministic
//             sum (no atomics: the result does not depend on scheduling).
//   backward: one read of input and target, one write of each requested gradient.
//   forward with gradients (regression_loss_fwd's grad_mask, the eager path for reductions mean and
//             sum): the forward kernel also writes the gradients for grad_loss = 1, so a
//             training step reads input and target once; the backward hands them over.
//   loss_dtype float32 for 16-bit inputs (autocast): the loss is computed in float32 as always
//             and returned unrounded; the gradients stay in the inputs' dtype.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>

#include "checks.h"
#include "cuda/reduce.cuh"
#include "loss.h"
#include "loss_checks.h"

namespace torch_ext {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 8;
constexpr int64_t kElementsPerBlock = int64_t(kThreads) * kItemsPerThread;

template <typename S>
struct RegressionLossArgs {
  using A = at::acc_type<S, true>;
  int64_t numel;
  const S* input;
  const S* target;
  const S* weight;  // or nullptr
  RegressionLoss loss;
  A param;
  S* out;                  // forward, reduction none: in S, or
  A* out_acc;              // in A (autocast's float32 loss of 16-bit inputs, unrounded)
  A* loss_partials;        // forward, reductions: one per block
  A* weight_partials;      // weighted mse mean, or nullptr
  const S* grad_loss;      // backward, reduction none: per element in S, or
  const A* grad_loss_acc;  // in A (the gradient of a float32 loss of 16-bit inputs), or
  const A* scale;          // a device scalar for every element
  S* grad_input;           // or nullptr
  S* grad_target;          // or nullptr
};

// Block b covers elements [b * kElementsPerBlock, (b + 1) * kElementsPerBlock), read with unit
// stride by consecutive threads.
// kWithGrad (regression_loss_fwd's grad_mask): each element's gradient for grad_loss = 1 (times *scale)
// is written while its input and target are in registers.
template <typename S, bool kWithGrad>
__global__ void forward_kernel(RegressionLossArgs<S> a) {
  using A = at::acc_type<S, true>;
  __shared__ A partial_loss[32];
  __shared__ A partial_weight[32];
  const int64_t first = int64_t(blockIdx.x) * kElementsPerBlock;
  A loss_sum = 0, weight_sum = 0;
  A scale = 0;
  if constexpr (kWithGrad) scale = *a.scale;
#pragma unroll
  for (int k = 0; k < kItemsPerThread; ++k) {
    const int64_t i = first + int64_t(k) * kThreads + threadIdx.x;
    if (i >= a.numel) break;
    const A diff = A(a.input[i]) - A(a.target[i]);
    A l = regression_loss_value<A>(a.loss, diff, a.param);
    A g = 0;
    if constexpr (kWithGrad) g = regression_loss_derivative<A>(a.loss, diff, a.param) * scale;
    if (a.weight != nullptr) {
      const A w = A(a.weight[i]);
      l *= w;
      weight_sum += w;
      if constexpr (kWithGrad) g *= w;
    }
    if constexpr (kWithGrad) {
      if (a.grad_input != nullptr) a.grad_input[i] = S(g);
      if (a.grad_target != nullptr) a.grad_target[i] = S(-g);
    }
    if (a.out_acc != nullptr) {
      a.out_acc[i] = l;
    } else if (a.out != nullptr) {
      a.out[i] = S(l);
    } else {
      loss_sum += l;
    }
  }
  if (a.loss_partials == nullptr) return;
  loss_sum = block_sum(loss_sum, partial_loss);
  if (a.weight_partials != nullptr) weight_sum = block_sum(weight_sum, partial_weight);
  if (threadIdx.x == 0) {
    a.loss_partials[blockIdx.x] = loss_sum;
    if (a.weight_partials != nullptr) a.weight_partials[blockIdx.x] = weight_sum;
  }
}

template <typename S>
__global__ void backward_kernel(RegressionLossArgs<S> a) {
  using A = at::acc_type<S, true>;
  const A scale = a.scale != nullptr ? *a.scale : A(0);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel; i += int64_t(gridDim.x) * blockDim.x) {
    A g = regression_loss_derivative<A>(a.loss, A(a.input[i]) - A(a.target[i]), a.param);
    g *= a.grad_loss_acc != nullptr ? a.grad_loss_acc[i] : a.grad_loss != nullptr ? A(a.grad_loss[i]) : scale;
    if (a.weight != nullptr) g *= A(a.weight[i]);
    if (a.grad_input != nullptr) a.grad_input[i] = S(g);
    if (a.grad_target != nullptr) a.grad_target[i] = S(-g);
  }
}

template <typename S>
RegressionLossArgs<S> kernel_args(RegressionLoss kind, double param, const Tensor& x, const Tensor& t,
                                  const Tensor& w) {
  RegressionLossArgs<S> a{};
  a.numel = x.numel();
  a.input = x.const_data_ptr<S>();
  a.target = t.const_data_ptr<S>();
  a.weight = w.defined() ? w.const_data_ptr<S>() : nullptr;
  a.loss = kind;
  a.param = at::acc_type<S, true>(param);
  return a;
}

// The forward kernel; given `scale` (a device scalar), it also writes the defined ones of
// grad_input / grad_target for d(loss)/d(element loss) = scale in the same pass. A defined `out`
// holds the per-element loss in the input's dtype or in its accumulation dtype.
void run_forward(RegressionLoss kind, double param, const Tensor& x, const Tensor& t, const Tensor& w,
                 const Tensor& out, const Tensor& loss_partials, const Tensor& weight_partials,
                 const Tensor& scale = Tensor(), const Tensor& grad_input = Tensor(),
                 const Tensor& grad_target = Tensor()) {
  const int64_t blocks = (x.numel() + kElementsPerBlock - 1) / kElementsPerBlock;
  if (blocks == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "regression_loss_fwd_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    auto a = kernel_args<scalar_t>(kind, param, x, t, w);
    const bool out_in_input_dtype = out.defined() && out.scalar_type() == x.scalar_type();
    a.out = out_in_input_dtype ? out.data_ptr<scalar_t>() : nullptr;
    a.out_acc = out.defined() && !out_in_input_dtype ? out.data_ptr<A>() : nullptr;
    a.loss_partials = loss_partials.defined() ? loss_partials.data_ptr<A>() : nullptr;
    a.weight_partials = weight_partials.defined() ? weight_partials.data_ptr<A>() : nullptr;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (scale.defined()) {
      a.scale = scale.const_data_ptr<A>();
      a.grad_input = grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr;
      a.grad_target = grad_target.defined() ? grad_target.data_ptr<scalar_t>() : nullptr;
      forward_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(a);
    } else {
      forward_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The sum of the block partials, divided for the mean by weight_sum (weighted mse) or numel.
Tensor reduced_loss(Reduction red, const Tensor& loss_partials, const Tensor& weight_sum, int64_t numel,
                    at::ScalarType loss_dtype) {
  Tensor total = loss_partials.sum();
  if (red == Reduction::Mean) total = weight_sum.defined() ? total.div(weight_sum) : total.div(double(numel));
  return total.to(loss_dtype);
}

// The loss in one kernel; with grad_mask, the same kernel writes the gradients for grad_loss = 1:
// a training step reads input and target once (reductions mean and sum; the backward hands the
// gradients over).
std::tuple<Tensor, Tensor, Tensor> regression_loss_fwd_cuda(const Tensor& input, const Tensor& target,
                                                            const std::optional<Tensor>& weight, c10::string_view loss,
                                                            double param, c10::string_view reduction,
                                                            std::array<bool, 2> grad_mask,
                                                            std::optional<at::ScalarType> loss_dtype) {
  constexpr const char* op = "torch_ext.regression_loss";
  const c10::cuda::CUDAGuard guard(input.device());
  const bool any_grad = grad_mask[0] || grad_mask[1];
  const Reduction red = any_grad ? check_reduction_with_grad_in_forward(op, reduction)
                                 : parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const RegressionLoss kind = check_regression_args(op, input, target, weight, loss, param);
  const at::ScalarType out_dtype = loss_dtype_or_input(op, input, loss_dtype);
  const Tensor x = input.contiguous(), t = target.contiguous();
  const Tensor w = weight.has_value() ? weight->contiguous() : Tensor();
  const int64_t blocks = (x.numel() + kElementsPerBlock - 1) / kElementsPerBlock;
  const auto acc = input.options().dtype(accumulate_dtype(input));
  const Tensor empty;  // the gradients not asked for: undefined (None in Python)
  if (!any_grad) {
    Tensor out, loss_partials, weight_partials;
    if (red == Reduction::None) {
      // In the input's dtype or, for another loss_dtype, in the accumulation dtype the kernel
      // computes in (converted below where that is not loss_dtype either).
      out = at::empty(input.sizes(), out_dtype == input.scalar_type() ? input.options() : acc);
    } else {
      loss_partials = at::empty({blocks}, acc);
      if (red == Reduction::Mean && divides_by_weight_sum(kind, weight)) weight_partials = at::empty({blocks}, acc);
    }
    run_forward(kind, param, x, t, w, out, loss_partials, weight_partials);
    if (red == Reduction::None) return {out.to(out_dtype), empty, empty};
    return {reduced_loss(red, loss_partials, weight_partials.defined() ? weight_partials.sum() : Tensor(), x.numel(),
                         out_dtype),
            empty, empty};
  }
  Tensor loss_partials = at::empty({blocks}, acc);
  // d(loss)/d(element loss): 1 for sum; for mean 1 / numel, or 1 / sum(weight) for weighted mse
  // (taken before the pass, which needs it).
  const Tensor weight_sum =
      red == Reduction::Mean && divides_by_weight_sum(kind, weight) ? w.sum(accumulate_dtype(input)) : Tensor();
  const Tensor scale =
      weight_sum.defined()
          ? weight_sum.reciprocal()
          : at::scalar_tensor(red == Reduction::Mean ? 1.0 / double(std::max<int64_t>(x.numel(), 1)) : 1.0, acc);
  Tensor grad_input = grad_mask[0] ? at::empty(input.sizes(), input.options()) : Tensor();
  Tensor grad_target = grad_mask[1] ? at::empty(input.sizes(), input.options()) : Tensor();
  run_forward(kind, param, x, t, w, Tensor(), loss_partials, Tensor(), scale, grad_input, grad_target);
  return {reduced_loss(red, loss_partials, weight_sum, x.numel(), out_dtype), grad_input, grad_target};
}

std::tuple<Tensor, Tensor> regression_loss_bwd_cuda(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                                    const std::optional<Tensor>& weight, c10::string_view loss,
                                                    double param, c10::string_view reduction,
                                                    std::array<bool, 2> output_mask) {
  constexpr const char* op = "torch_ext.regression_loss_bwd";
  const c10::cuda::CUDAGuard guard(input.device());
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const RegressionLoss kind = check_regression_args(op, input, target, weight, loss, param);
  check_same_device(op, input, "input", grad_loss, "grad_loss");
  const Tensor x = input.contiguous(), t = target.contiguous();
  const Tensor w = weight.has_value() ? weight->contiguous() : Tensor();
  Tensor grad, scale;
  check_grad_loss(op, grad_loss, red, reduction, input.sizes());
  if (red == Reduction::None) {
    // A float32 incoming gradient of 16-bit inputs (a float32 loss under autocast) is read as it
    // is, so the product is rounded once, as autocast's float32 gradient is.
    grad = (grad_loss.scalar_type() == accumulate_dtype(input) ? grad_loss : grad_loss.to(input.scalar_type()))
               .contiguous();
  } else {
    scale = grad_loss.reshape({}).to(accumulate_dtype(input));
    if (red == Reduction::Mean) {
      scale = divides_by_weight_sum(kind, weight) ? scale.div(w.sum(accumulate_dtype(input)))
                                                  : scale.div(double(x.numel()));
    }
  }
  Tensor grad_input = output_mask[0] ? at::empty(input.sizes(), input.options()) : Tensor();
  Tensor grad_target = output_mask[1] ? at::empty(input.sizes(), input.options()) : Tensor();
  if (x.numel() > 0 && (grad_input.defined() || grad_target.defined())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regression_loss_bwd_cuda", [&] {
      using A = at::acc_type<scalar_t, true>;
      auto a = kernel_args<scalar_t>(kind, param, x, t, w);
      const bool grad_in_input_dtype = grad.defined() && grad.scalar_type() == x.scalar_type();
      a.grad_loss = grad_in_input_dtype ? grad.const_data_ptr<scalar_t>() : nullptr;
      a.grad_loss_acc = grad.defined() && !grad_in_input_dtype ? grad.const_data_ptr<A>() : nullptr;
      a.scale = scale.defined() ? scale.const_data_ptr<A>() : nullptr;
      a.grad_input = grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr;
      a.grad_target = grad_target.defined() ? grad_target.data_ptr<scalar_t>() : nullptr;
      const int64_t blocks = std::min<int64_t>((x.numel() + kThreads - 1) / kThreads, int64_t(1) << 20);
      backward_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_input, grad_target};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("regression_loss_fwd", &regression_loss_fwd_cuda);
  m.impl("regression_loss_bwd", &regression_loss_bwd_cuda);
}

}  // namespace torch_ext
