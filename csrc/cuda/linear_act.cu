// Fused dense layer + activation on CUDA: act(x @ W.T + b); the same ops and saved tensors as
// csrc/cpu/linear_act.cpp (relu/leaky_relu: a 1-bit mask; gelu/gelu_tanh/silu: the
// pre-activation; sigmoid/tanh: the output).
//   forward : the GEMM through ATen (cuBLAS), then ONE pass over its output for bias +
//             activation, which also writes the mask or the pre-activation;
//   backward: ONE pass forming the pre-activation gradient, the bias gradient as its column sums
//             (ATen's deterministic reduction, float32 accumulation), then the two GEMMs.
// Not yet: cuBLASLt epilogues (bias / RELU_AUX_BIAS / GELU_AUX_BIAS forward, DRELU_BGRAD /
// DGELU_BGRAD backward), which would fold these passes into the GEMMs; they need a GPU to
// validate and measure.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>

#include "activation.h"
#include "checks.h"
#include "dense_checks.h"
#include "shapes.h"

namespace torch_ext {
namespace {

using at::Tensor;

// One thread per group of 8 columns of one row, so each relu/leaky_relu mask byte has one writer.
constexpr int kGroup = 8;

template <typename S>
struct EpilogueArgs {
  using A = at::acc_type<S, true>;
  int64_t rows, n;
  Activation act;
  A slope;
  const S* bias;      // or nullptr
  S* gemm;            // x @ W.T; rewritten as gemm + bias when it is the saved pre-activation
  bool pre_out;
  S* out;
  uint8_t* mask;      // (rows, ceil(n / 8)), or nullptr
};

template <typename S>
__global__ void forward_epilogue_kernel(EpilogueArgs<S> a) {
  using A = at::acc_type<S, true>;
  const int64_t groups = (a.n + kGroup - 1) / kGroup;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows * groups; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups, c0 = (i % groups) * kGroup;
    uint8_t bits = 0;
    for (int j = 0; j < kGroup && c0 + j < a.n; ++j) {
      const int64_t idx = r * a.n + c0 + j;
      A x = A(a.gemm[idx]);
      if (a.bias != nullptr) x += A(a.bias[c0 + j]);
      if (a.pre_out) a.gemm[idx] = S(x);
      // relu: set where x > 0 or NaN (ATen's relu backward lets NaN through); leaky_relu: x > 0
      const bool set = a.act == Activation::Relu ? !(x <= A(0)) : x > A(0);
      bits |= uint8_t(set) << j;
      a.out[idx] = S(activation_forward<A>(a.act, x, a.slope));
    }
    if (a.mask != nullptr) a.mask[r * groups + c0 / kGroup] = bits;
  }
}

template <typename S>
struct PrologueArgs {
  using A = at::acc_type<S, true>;
  int64_t rows, n;
  Activation act;
  A slope;
  const S* grad_out;
  int64_t ld_grad_out;
  const S* saved;          // pre-activation or output, or nullptr
  const uint8_t* mask;     // or nullptr
  S* grad_pre;             // (rows, n)
};

template <typename S>
__global__ void backward_prologue_kernel(PrologueArgs<S> a) {
  using A = at::acc_type<S, true>;
  const int64_t groups = (a.n + kGroup - 1) / kGroup;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows * groups; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups, c0 = (i % groups) * kGroup;
    const uint8_t bits = a.mask != nullptr ? a.mask[r * groups + c0 / kGroup] : 0;
    for (int j = 0; j < kGroup && c0 + j < a.n; ++j) {
      const A g = A(a.grad_out[r * a.ld_grad_out + c0 + j]);
      A d;
      switch (saved_for_backward(a.act)) {
        case SavedForBackward::PositiveMask:
          // Selected, not multiplied: relu's 0 stays 0 where grad_out is inf or NaN, as in ATen.
          d = ((bits >> j) & 1u) ? g : (a.act == Activation::Relu ? A(0) : g * a.slope);
          break;
        case SavedForBackward::Output:
          d = g * activation_derivative_from_output<A>(a.act, A(a.saved[r * a.n + c0 + j]));
          break;
        case SavedForBackward::PreActivation:
          d = g * activation_derivative_from_input<A>(a.act, A(a.saved[r * a.n + c0 + j]));
          break;
        default:
          d = g;
      }
      a.grad_pre[r * a.n + c0 + j] = S(d);
    }
  }
}

int64_t blocks_for(int64_t work, int threads) {
  return std::min<int64_t>(std::max<int64_t>((work + threads - 1) / threads, 1), int64_t(1) << 20);
}


std::tuple<Tensor, Tensor> linear_act_fwd_cuda(const Tensor& input, const Tensor& weight,
                                               const std::optional<Tensor>& bias, c10::string_view activation,
                                               double negative_slope) {
  constexpr const char* op = "torch_ext.linear_act_fwd";
  const c10::cuda::CUDAGuard guard(input.device());
  check_linear_args(op, input, weight, bias, check_floating);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const int64_t k = weight.size(1), n = weight.size(0), m = leading_rows(input);
  const Tensor x2d = input.reshape({m, k});
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  // Outputs are allocated in their final shape (*, n) and written through (m, n) views, so that
  // the op returns base tensors, not views (FSDP2 warns about module outputs that are views).
  Tensor out_full = at::empty(with_last_dim(input, n), input.options());
  Tensor out = out_full.view({m, n});
  Tensor saved, mask, gemm = out;
  switch (saved_for_backward(act)) {
    case SavedForBackward::PositiveMask:
      saved = at::empty(with_last_dim(input, (n + 7) / 8), input.options().dtype(at::kByte));
      mask = saved.view({m, (n + 7) / 8});
      break;
    case SavedForBackward::PreActivation:
      saved = at::empty(with_last_dim(input, n), input.options());
      gemm = saved.view({m, n});
      break;
    default:
      saved = at::empty({0}, input.options());
  }
  at::mm_out(gemm, x2d, weight.t());
  if (m * n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_act_fwd_cuda", [&] {
      EpilogueArgs<scalar_t> a{m, n, act, at::acc_type<scalar_t, true>(negative_slope),
                               bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                               gemm.data_ptr<scalar_t>(), !gemm.is_same(out), out.data_ptr<scalar_t>(),
                               mask.defined() ? mask.data_ptr<uint8_t>() : nullptr};
      const int threads = 256;
      forward_epilogue_kernel<scalar_t><<<blocks_for(m * ((n + kGroup - 1) / kGroup), threads), threads, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out_full, saved};
}

std::tuple<Tensor, Tensor, Tensor> linear_act_bwd_cuda(const Tensor& grad_output, const Tensor& input,
                                                       const Tensor& weight, const Tensor& saved,
                                                       c10::string_view activation, double negative_slope,
                                                       std::array<bool, 3> output_mask) {
  constexpr const char* op = "torch_ext.linear_act_bwd";
  const c10::cuda::CUDAGuard guard(input.device());
  check_linear_args(op, input, weight, std::nullopt, check_floating);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const int64_t k = weight.size(1), n = weight.size(0), m = leading_rows(input);
  check_same_device(op, input, "input", grad_output, "grad_output");
  check_same_dtype(op, input, "input", grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(with_last_dim(input, n)), op, ": grad_output must have shape ",
              at::IntArrayRef(with_last_dim(input, n)), ", got ", grad_output.sizes());
  const auto saved_views = saved_for_linear_act_bwd(op, act, saved, input, grad_output, m, n);
  const Tensor& mask2d = saved_views.first;
  const Tensor& saved2d = saved_views.second;
  const auto options = input.options();
  if (!output_mask[0] && !output_mask[1] && !output_mask[2])
    return {at::empty({0}, options), at::empty({0}, options), at::empty({0}, options)};
  const Tensor x2d = input.reshape({m, k});
  Tensor g2d = grad_output.reshape({m, n});
  if (n > 1 && g2d.stride(1) != 1) g2d = g2d.contiguous();
  Tensor grad_pre = at::empty({m, n}, options);
  if (m * n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_act_bwd_cuda", [&] {
      PrologueArgs<scalar_t> a{m, n, act, at::acc_type<scalar_t, true>(negative_slope),
                               g2d.const_data_ptr<scalar_t>(), g2d.stride(0),
                               saved2d.defined() ? saved2d.const_data_ptr<scalar_t>() : nullptr,
                               mask2d.defined() ? mask2d.const_data_ptr<uint8_t>() : nullptr,
                               grad_pre.data_ptr<scalar_t>()};
      const int threads = 256;
      backward_prologue_kernel<scalar_t><<<blocks_for(m * ((n + kGroup - 1) / kGroup), threads), threads, 0,
                                           c10::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor grad_input = output_mask[0] ? at::mm(grad_pre, weight).view(input.sizes()) : at::empty({0}, options);
  Tensor grad_weight = output_mask[1] ? at::mm(grad_pre.t(), x2d) : at::empty({0}, options);
  Tensor grad_bias = output_mask[2] ? grad_pre.sum(0, /*keepdim=*/false, acc).to(input.scalar_type())
                                    : at::empty({0}, options);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("linear_act_fwd", &linear_act_fwd_cuda);
  m.impl("linear_act_bwd", &linear_act_bwd_cuda);
}

}  // namespace torch_ext
