// The MLP activation on CUDA: act(x) over (*, n), or gated act(u) * v over (*, 2n) rows [u | v];
// the same ops as csrc/cpu/mlp_act.cpp. Its backward forms the input gradient and, when asked,
// the forward output again in the same pass (FusedMLP's recompute). Elementwise, one thread per
// 8 output columns; the formulas are those of csrc/activation.h.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>

#include "activation.h"
#include "checks.h"
#include "cuda/pack.cuh"
#include "dense_checks.h"
#include "shapes.h"

namespace torch_ext {
namespace {

using at::Tensor;

template <typename S>
struct MlpActArgs {
  using A = at::acc_type<S, true>;
  int64_t rows, n;
  bool gated;
  Activation act;
  A slope;
  const S* input;     // (rows, n) or (rows, 2n)
  const S* grad_out;  // backward: rows of n with row stride ld_grad_out
  int64_t ld_grad_out;
  S* out;         // (rows, n), or nullptr in backward
  S* grad_input;  // input's shape, or nullptr
};

// One thread per group of 8 output columns of one row; kPacked: n % 8 == 0 and aligned rows, so
// each operand's 8 columns move as one vector (16 bytes in 16-bit types), coalesced across a warp.
constexpr int kGroup = 8;

template <typename S, bool kPacked>
__global__ void forward_kernel(MlpActArgs<S> a) {
  using A = at::acc_type<S, true>;
  const int64_t width = a.gated ? 2 * a.n : a.n, groups = (a.n + kGroup - 1) / kGroup;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows * groups;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups, c0 = (i % groups) * kGroup;
    const int count = int(std::min<int64_t>(kGroup, a.n - c0));
    const Pack<S, kGroup> u = load_pack<kPacked, S, kGroup>(a.input + r * width + c0, count);
    Pack<S, kGroup> v{};
    if (a.gated) v = load_pack<kPacked, S, kGroup>(a.input + r * width + a.n + c0, count);
    Pack<S, kGroup> out;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      A y = activation_forward<A>(a.act, A(u.v[j]), a.slope);
      if (a.gated) y *= A(v.v[j]);
      out.v[j] = S(y);
    }
    store_pack<kPacked>(a.out + r * a.n + c0, out, count);
  }
}

template <typename S, bool kPacked>
__global__ void backward_kernel(MlpActArgs<S> a) {
  using A = at::acc_type<S, true>;
  const int64_t width = a.gated ? 2 * a.n : a.n, groups = (a.n + kGroup - 1) / kGroup;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows * groups;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups, c0 = (i % groups) * kGroup;
    const int count = int(std::min<int64_t>(kGroup, a.n - c0));
    const Pack<S, kGroup> g = load_pack<kPacked, S, kGroup>(a.grad_out + r * a.ld_grad_out + c0, count);
    const Pack<S, kGroup> u = load_pack<kPacked, S, kGroup>(a.input + r * width + c0, count);
    Pack<S, kGroup> v{};
    if (a.gated) v = load_pack<kPacked, S, kGroup>(a.input + r * width + a.n + c0, count);
    Pack<S, kGroup> grad_u, grad_v, out;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const A gj = A(g.v[j]);
      A value, du;
      if (a.gated) {
        const A vj = A(v.v[j]);
        activation_value_and_grad<A>(a.act, A(u.v[j]), gj * vj, a.slope, value, du);
        grad_v.v[j] = S(gj * value);
        out.v[j] = S(value * vj);
      } else {
        activation_value_and_grad<A>(a.act, A(u.v[j]), gj, a.slope, value, du);
        out.v[j] = S(value);
      }
      grad_u.v[j] = S(du);
    }
    if (a.grad_input != nullptr) {
      store_pack<kPacked>(a.grad_input + r * width + c0, grad_u, count);
      if (a.gated) store_pack<kPacked>(a.grad_input + r * width + a.n + c0, grad_v, count);
    }
    if (a.out != nullptr) store_pack<kPacked>(a.out + r * a.n + c0, out, count);
  }
}

template <typename S>
void launch(bool backward, MlpActArgs<S>& a) {
  const int threads = 256;
  const int64_t groups = (a.n + kGroup - 1) / kGroup;
  const int64_t blocks =
      std::min<int64_t>(std::max<int64_t>((a.rows * groups + threads - 1) / threads, 1), int64_t(1) << 20);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Rows of the input are `width` long, the value half starts n in: n % 8 == 0 keeps both aligned.
  const bool packed = rows_fit_packs<S, kGroup>(a.input, a.n) && rows_fit_packs<S, kGroup>(a.out, a.n) &&
                      rows_fit_packs<S, kGroup>(a.grad_out, a.ld_grad_out) &&
                      rows_fit_packs<S, kGroup>(a.grad_input, a.n);
  if (backward && packed)
    backward_kernel<S, true><<<blocks, threads, 0, stream>>>(a);
  else if (backward)
    backward_kernel<S, false><<<blocks, threads, 0, stream>>>(a);
  else if (packed)
    forward_kernel<S, true><<<blocks, threads, 0, stream>>>(a);
  else
    forward_kernel<S, false><<<blocks, threads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor mlp_act_fwd_cuda(const Tensor& input, c10::string_view activation, double negative_slope, bool gated) {
  constexpr const char* op = "torch_ext.mlp_act_fwd";
  const c10::cuda::CUDAGuard guard(input.device());
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const int64_t n = mlp_act_output_width(op, input, gated);
  check_floating(op, input, "input");
  const int64_t rows = leading_rows(input);
  const Tensor in2d = input.reshape({rows, input.size(-1)}).contiguous();
  Tensor out_full = at::empty(with_last_dim(input, n), input.options());  // returned as a base tensor
  Tensor out = out_full.view({rows, n});
  if (rows * n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mlp_act_fwd_cuda", [&] {
      MlpActArgs<scalar_t> a{rows,
                             n,
                             gated,
                             act,
                             at::acc_type<scalar_t, true>(negative_slope),
                             in2d.const_data_ptr<scalar_t>(),
                             nullptr,
                             0,
                             out.data_ptr<scalar_t>(),
                             nullptr};
      launch<scalar_t>(false, a);
    });
  }
  return out_full;
}

std::tuple<Tensor, Tensor> mlp_act_bwd_cuda(const Tensor& grad_output, const Tensor& input, c10::string_view activation,
                                            double negative_slope, bool gated, std::array<bool, 2> output_mask) {
  constexpr const char* op = "torch_ext.mlp_act_bwd";
  const c10::cuda::CUDAGuard guard(input.device());
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const int64_t n = mlp_act_output_width(op, input, gated);
  check_floating(op, input, "input");
  check_same_device(op, input, "input", grad_output, "grad_output");
  check_same_dtype(op, input, "input", grad_output, "grad_output");
  const auto out_sizes = with_last_dim(input, n);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_sizes), op, ": grad_output must have shape ",
              at::IntArrayRef(out_sizes), ", got ", grad_output.sizes());
  const auto options = input.options();
  if (!output_mask[0] && !output_mask[1]) return {Tensor(), Tensor()};
  const int64_t rows = leading_rows(input), width = input.size(-1);
  const Tensor in2d = input.reshape({rows, width}).contiguous();
  Tensor g2d = grad_output.reshape({rows, n});
  if (n > 1 && g2d.stride(1) != 1) g2d = g2d.contiguous();
  Tensor grad_input = output_mask[0] ? at::empty({rows, width}, options) : Tensor();
  Tensor out = output_mask[1] ? at::empty({rows, n}, options) : Tensor();
  if (rows * n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mlp_act_bwd_cuda", [&] {
      MlpActArgs<scalar_t> a{rows,
                             n,
                             gated,
                             act,
                             at::acc_type<scalar_t, true>(negative_slope),
                             in2d.const_data_ptr<scalar_t>(),
                             g2d.const_data_ptr<scalar_t>(),
                             g2d.stride(0),
                             out.defined() ? out.data_ptr<scalar_t>() : nullptr,
                             grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr};
      launch<scalar_t>(true, a);
    });
  }
  return {grad_input.defined() ? grad_input.view(input.sizes()) : Tensor(),
          out.defined() ? out.view(out_sizes) : Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("mlp_act_fwd", &mlp_act_fwd_cuda);
  m.impl("mlp_act_bwd", &mlp_act_bwd_cuda);
}

}  // namespace torch_ext
