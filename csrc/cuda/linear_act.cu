// Fused dense layer + activation on CUDA: act(x @ W.T + b); the same ops and saved tensors as
// csrc/cpu/linear_act.cpp (relu/leaky_relu: a 1-bit mask; gelu/gelu_tanh/silu: the
// pre-activation; sigmoid/tanh: the output).
//   forward : one cuBLASLt GEMM whose epilogue adds the bias, applies the activation and writes
//             the pre-activation (cuda/cublaslt_gemm.h), where cuBLASLt has the function with
//             PyTorch's semantics: none, gelu_tanh in float16/bfloat16 (n % 8 == 0). relu: the
//             GEMM with the bias epilogue, then ONE in-place pass for relu and its mask (cuBLASLt's
//             RELU_AUX masks x >= 0 and maps NaN to 0; PyTorch masks x > 0 and keeps NaN).
//             Otherwise the GEMM through ATen, then ONE pass over its output for bias +
//             activation (+ mask or pre-activation).
//   backward: ONE pass forming the pre-activation gradient, then grad_weight by one cuBLASLt
//             GEMM whose BGRADB epilogue also forms the bias gradient (its column sums), and
//             grad_input by ATen's GEMM. float64 (and bias-only gradients) take ATen's GEMM and
//             its deterministic column sum.
// cuBLASLt's DRELU_BGRAD / DGELU_BGRAD epilogues apply an activation's gradient to the output of
// a GEMM, i.e. they belong to the grad-input GEMM of the layer *after* this one; linear_act_bwd
// receives grad_output already formed, so its activation gradient is the pass above.
// The config's cublaslt = false turns the cuBLASLt paths off (ATen GEMMs + own passes, as on CPU).
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

#include <optional>
#include <string>
#include <string_view>

#include "activation.h"
#include "allocation.h"
#include "checks.h"
#include "cuda/cublaslt_gemm.h"
#include "cuda/pack.cuh"
#include "dense_checks.h"
#include "shapes.h"

namespace torch_ext {
namespace {

using at::Tensor;

// One thread per group of 8 columns of one row, so each relu/leaky_relu mask byte has one writer.
// kPacked: every row of every operand starts aligned to a pack of 8 (n % 8 == 0), and the 8
// columns move as one vector (16 bytes in 16-bit types; a warp then reads 512 contiguous bytes).
constexpr int kGroup = 8;

template <typename S>
struct EpilogueArgs {
  using A = at::acc_type<S, true>;
  int64_t rows, n;
  Activation act;
  A slope;
  const S* bias;  // or nullptr
  S* gemm;        // x @ W.T; rewritten as gemm + bias when it is the saved pre-activation
  bool pre_out;
  S* out;
  uint8_t* mask;  // (rows, ceil(n / 8)), or nullptr
};

template <typename S, bool kPacked>
__global__ void forward_epilogue_kernel(EpilogueArgs<S> a) {
  using A = at::acc_type<S, true>;
  const int64_t groups = (a.n + kGroup - 1) / kGroup;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows * groups;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups, c0 = (i % groups) * kGroup;
    const int width = int(std::min<int64_t>(kGroup, a.n - c0));
    Pack<S, kGroup> pre = load_pack<kPacked, S, kGroup>(a.gemm + r * a.n + c0, width);
    Pack<S, kGroup> bias{};
    if (a.bias != nullptr) bias = load_pack<kPacked, S, kGroup>(a.bias + c0, width);
    Pack<S, kGroup> out;
    uint8_t bits = 0;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      A x = A(pre.v[j]);
      if (a.bias != nullptr) x += A(bias.v[j]);
      pre.v[j] = S(x);
      // relu: set where x > 0 or NaN (ATen's relu backward lets NaN through); leaky_relu: x > 0
      const bool set = a.act == Activation::Relu ? !(x <= A(0)) : x > A(0);
      bits |= uint8_t(set && j < width) << j;
      out.v[j] = S(activation_forward<A>(a.act, x, a.slope));
    }
    if (a.pre_out) store_pack<kPacked>(a.gemm + r * a.n + c0, pre, width);
    store_pack<kPacked>(a.out + r * a.n + c0, out, width);
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
  const S* saved;       // pre-activation or output, or nullptr
  const uint8_t* mask;  // or nullptr
  S* grad_pre;          // (rows, n)
};

template <typename S, bool kPacked>
__global__ void backward_prologue_kernel(PrologueArgs<S> a) {
  using A = at::acc_type<S, true>;
  const int64_t groups = (a.n + kGroup - 1) / kGroup;
  const SavedForBackward saved_kind = saved_for_backward(a.act);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows * groups;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups, c0 = (i % groups) * kGroup;
    const int width = int(std::min<int64_t>(kGroup, a.n - c0));
    const Pack<S, kGroup> g = load_pack<kPacked, S, kGroup>(a.grad_out + r * a.ld_grad_out + c0, width);
    Pack<S, kGroup> saved{};
    if (a.saved != nullptr) saved = load_pack<kPacked, S, kGroup>(a.saved + r * a.n + c0, width);
    const uint8_t bits = a.mask != nullptr ? a.mask[r * groups + c0 / kGroup] : 0;
    Pack<S, kGroup> d;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const A gj = A(g.v[j]);
      A dj;
      switch (saved_kind) {
        case SavedForBackward::PositiveMask:
          // Selected, not multiplied: relu's 0 stays 0 where grad_out is inf or NaN, as in ATen.
          dj = ((bits >> j) & 1u) ? gj : (a.act == Activation::Relu ? A(0) : gj * a.slope);
          break;
        case SavedForBackward::Output: dj = gj * activation_derivative_from_output<A>(a.act, A(saved.v[j])); break;
        case SavedForBackward::PreActivation:
          dj = gj * activation_derivative_from_input<A>(a.act, A(saved.v[j]));
          break;
        default: dj = gj;
      }
      d.v[j] = S(dj);
    }
    store_pack<kPacked>(a.grad_pre + r * a.n + c0, d, width);
  }
}

// The forward's cuBLASLt GEMM, if it has one (see the top of the file): its epilogue, and whether
// our pass then applies the activation (and writes the mask) in place, the bias already added.
struct ForwardPlan {
  cuda::LtEpilogue epilogue;
  bool activation_pass;
};

std::optional<ForwardPlan> forward_plan(Activation act, at::ScalarType dtype, int64_t n, bool for_backward) {
  if (!cuda::cublaslt_enabled() || !cuda::cublaslt_dtype(dtype)) return std::nullopt;
  switch (act) {
    case Activation::None: return ForwardPlan{cuda::LtEpilogue::None, false};
    case Activation::Relu: return ForwardPlan{cuda::LtEpilogue::None, true};
    // cuBLASLt's GELU is the tanh form. float32 keeps our epilogue: the accuracy of cuBLASLt's
    // tanh in float32 is not documented, and float32 results are compared at float32 tolerance.
    case Activation::GeluTanh:
      if (dtype == at::kFloat || n % 8 != 0) return std::nullopt;
      return ForwardPlan{for_backward ? cuda::LtEpilogue::GeluTanhAux : cuda::LtEpilogue::GeluTanh, false};
    default: return std::nullopt;
  }
}

void warn_no_algorithm(const char* what, int64_t m, int64_t n, int64_t k, at::ScalarType dtype,
                       const std::string& why) {
  TORCH_WARN_ONCE("torch_ext.fused_linear: cuBLASLt declined the ", what, " (", m, " x ", k, " @ ", k, " x ", n, ", ",
                  dtype, "): ", why,
                  "; using ATen's GEMM and a separate pass (slower). Contiguous, 16-byte aligned "
                  "operands with sizes that are multiples of 8 usually avoid this.");
}

int64_t blocks_for(int64_t work, int threads) {
  return std::min<int64_t>(std::max<int64_t>((work + threads - 1) / threads, 1), int64_t(1) << 20);
}

std::tuple<Tensor, Tensor> linear_act_fwd_cuda(const Tensor& input, const Tensor& weight,
                                               const std::optional<Tensor>& bias, c10::string_view activation,
                                               double negative_slope, bool for_backward) {
  constexpr const char* op = "torch_ext.linear_act_fwd";
  const c10::cuda::CUDAGuard guard(input.device());
  check_linear_args(op, input, weight, bias);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const int64_t k = weight.size(1), n = weight.size(0), m = leading_rows(input);
  Tensor x2d = input.reshape({m, k});
  // GEMM operands need unit stride in one dimension (ATen's GEMM would copy too).
  if (x2d.stride(0) != 1 && x2d.stride(1) != 1) x2d = x2d.contiguous();
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  // Outputs are allocated in their final shape (*, n) and written through (m, n) views, so that
  // the op returns base tensors, not views (FSDP2 warns about module outputs that are views).
  Tensor out_full = at::empty(with_last_dim(input, n), input.options());
  Tensor out = out_full.view({m, n});
  Tensor saved, mask, gemm = out;
  switch (for_backward ? saved_for_backward(act) : SavedForBackward::Nothing) {
    case SavedForBackward::PositiveMask:
      saved = at::empty(with_last_dim(input, (n + 7) / 8), input.options().dtype(at::kByte));
      mask = saved.view({m, (n + 7) / 8});
      break;
    case SavedForBackward::PreActivation:
      saved = at::empty(with_last_dim(input, n), input.options());
      gemm = saved.view({m, n});
      break;
    default:
      if (for_backward) saved = at::empty({0}, input.options());
  }
  bool fused = false, pass = true;
  if (m > 0 && n > 0 && k > 0) {
    if (const auto plan = forward_plan(act, input.scalar_type(), n, for_backward)) {
      cuda::LtEpilogueArgs args;
      args.kind = plan->epilogue;
      args.bias = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
      // The pre-activation (gelu_tanh, when saved), written by the epilogue; relu's mask is our pass's.
      args.aux = plan->epilogue == cuda::LtEpilogue::GeluTanhAux ? gemm.data_ptr() : nullptr;
      args.aux_ld = n;
      const Tensor w = weight.stride(0) != 1 && weight.stride(1) != 1 ? weight.contiguous() : weight;
      std::string why_not;
      fused = cuda::lt_gemm(x2d, w.t(), out, args, &why_not);
      if (!fused) warn_no_algorithm("forward GEMM with its epilogue", m, n, k, input.scalar_type(), why_not);
      pass = !fused || plan->activation_pass;
    }
  }
  if (!fused) at::mm_out(gemm, x2d, weight.t());
  if (pass && m * n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_act_fwd_cuda", [&] {
      // After a fused GEMM, out holds gemm + bias: the pass adds no bias and works in place.
      EpilogueArgs<scalar_t> a{m,
                               n,
                               act,
                               at::acc_type<scalar_t, true>(negative_slope),
                               bias_c.defined() && !fused ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                               gemm.data_ptr<scalar_t>(),
                               !gemm.is_same(out),
                               out.data_ptr<scalar_t>(),
                               mask.defined() ? mask.data_ptr<uint8_t>() : nullptr};
      const int threads = 256;
      const int64_t blocks = blocks_for(m * ((n + kGroup - 1) / kGroup), threads);
      const auto stream = c10::cuda::getCurrentCUDAStream();
      if (rows_fit_packs<scalar_t, kGroup>(a.gemm, n) && rows_fit_packs<scalar_t, kGroup>(a.out, n) &&
          rows_fit_packs<scalar_t, kGroup>(a.bias, kGroup)) {
        forward_epilogue_kernel<scalar_t, true><<<blocks, threads, 0, stream>>>(a);
      } else {
        forward_epilogue_kernel<scalar_t, false><<<blocks, threads, 0, stream>>>(a);
      }
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
  check_linear_args(op, input, weight, std::nullopt);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const int64_t k = weight.size(1), n = weight.size(0), m = leading_rows(input);
  check_same_device(op, input, "input", grad_output, "grad_output");
  check_same_dtype(op, input, "input", grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(with_last_dim(input, n)), op, ": grad_output must have shape ",
              at::IntArrayRef(with_last_dim(input, n)), ", got ", grad_output.sizes());
  const GradPreIn grad_pre_at = grad_pre_in(act, grad_output, saved, m, n);  // before any view below
  const auto saved_views = saved_for_linear_act_bwd(op, act, saved, input, grad_output, m, n);
  const Tensor& mask2d = saved_views.first;
  const Tensor& saved2d = saved_views.second;
  const auto options = input.options();
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {Tensor(), Tensor(), Tensor()};
  Tensor x2d = input.reshape({m, k});
  if (x2d.stride(0) != 1 && x2d.stride(1) != 1) x2d = x2d.contiguous();
  Tensor g2d = grad_output.reshape({m, n});
  if (n > 1 && g2d.stride(1) != 1) g2d = g2d.contiguous();
  Tensor grad_pre = grad_pre_at == GradPreIn::GradOutput ? g2d
                    : grad_pre_at == GradPreIn::Saved    ? saved2d
                                                         : at::empty({m, n}, options);
  if (m * n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_act_bwd_cuda", [&] {
      PrologueArgs<scalar_t> a{m,
                               n,
                               act,
                               at::acc_type<scalar_t, true>(negative_slope),
                               g2d.const_data_ptr<scalar_t>(),
                               g2d.stride(0),
                               saved2d.defined() ? saved2d.const_data_ptr<scalar_t>() : nullptr,
                               mask2d.defined() ? mask2d.const_data_ptr<uint8_t>() : nullptr,
                               grad_pre.data_ptr<scalar_t>()};
      const int threads = 256;
      const int64_t blocks = blocks_for(m * ((n + kGroup - 1) / kGroup), threads);
      const auto stream = c10::cuda::getCurrentCUDAStream();
      if (rows_fit_packs<scalar_t, kGroup>(a.grad_out, a.ld_grad_out) && rows_fit_packs<scalar_t, kGroup>(a.saved, n) &&
          rows_fit_packs<scalar_t, kGroup>(a.grad_pre, n)) {
        backward_prologue_kernel<scalar_t, true><<<blocks, threads, 0, stream>>>(a);
      } else {
        backward_prologue_kernel<scalar_t, false><<<blocks, threads, 0, stream>>>(a);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  Tensor grad_weight, grad_bias;
  if (output_mask[1] && output_mask[2] && m > 0 && n > 0 && k > 0 && cuda::cublaslt_enabled() &&
      cuda::cublaslt_dtype(input.scalar_type())) {
    // grad_weight (n, k) = grad_pre.T @ x, and in the same GEMM grad_bias = grad_pre.T.sum(1).
    grad_weight = at::empty({n, k}, options);
    grad_bias = at::empty({n}, options);
    cuda::LtEpilogueArgs args;
    args.kind = cuda::LtEpilogue::BiasGradOfA;
    args.bias_grad = grad_bias.data_ptr();
    std::string why_not;
    if (!cuda::lt_gemm(grad_pre.t(), x2d, grad_weight, args, &why_not)) {
      warn_no_algorithm("weight-gradient GEMM with the bias gradient", n, k, m, input.scalar_type(), why_not);
      grad_weight = grad_bias = Tensor();
    }
  }
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (output_mask[1] && !grad_weight.defined()) grad_weight = at::mm(grad_pre.t(), x2d);
  if (output_mask[2] && !grad_bias.defined())
    grad_bias = grad_pre.sum(0, /*keepdim=*/false, acc).to(input.scalar_type());
  Tensor grad_input = output_mask[0] ? at::mm(grad_pre, weight).view(input.sizes()) : Tensor();
  return {grad_input, output_mask[1] ? grad_weight : Tensor(), output_mask[2] ? grad_bias : Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("linear_act_fwd", &linear_act_fwd_cuda);
  m.impl("linear_act_bwd", &linear_act_bwd_cuda);
}

}  // namespace torch_ext
