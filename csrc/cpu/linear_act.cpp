// Fused dense layer + activation on CPU: act(x @ W.T + b).
//
// The GEMMs go through ATen (MKL/oneDNN). What is fused is everything around them, and it is
// done per row panel while the panel's GEMM output is still in cache:
//   forward : GEMM of the panel, then ONE pass over it for bias + activation, which also writes
//             what backward needs (a 1-bit mask for relu/leaky_relu, the pre-activation for
//             gelu/gelu_tanh/silu; sigmoid/tanh backward uses the output, none needs nothing);
//   backward: ONE pass forming the panel's pre-activation gradient and its bias-gradient sums,
//             then the panel's two GEMMs (grad_input rows, and grad_weight accumulated).
// Panels are large (see panel_rows): measured here, 1 MiB panels cost more in GEMM efficiency
// than they saved in cache traffic, so what panels buy is a pre-activation-gradient buffer of
// panel size instead of M x N, and none where the op holds an M x N buffer alone (grad_output, or
// the saved pre-activation once autograd hands it over; see linear_act_bwd_cpu). bfloat16 uses one panel:
// accumulating grad_weight across panels would round it to bfloat16 after every panel, where
// one GEMM accumulates the whole reduction in float32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string_view>
#include <vector>

#include "activation.h"
#include "allocation.h"
#include "checks.h"
#include "cpu/runtime/allocator.h"
#include "cpu/runtime/kernel_table.h"
#include "dense_checks.h"
#include "matmul.h"
#include "runtime_config.h"
#include "shapes.h"

namespace torch_ext {
namespace {

using at::Tensor;
using cpu::KernelsFor;

constexpr int64_t kDefaultPanelBytes = 4 << 20;
constexpr int64_t kMinPanelRows = 1024;

Activation activation_from(c10::string_view name) {
  return parse_activation(std::string_view(name.data(), name.size()));
}

// Rows per panel: about kDefaultPanelBytes of input + output rows, but at least kMinPanelRows,
// since every panel re-reads and re-writes grad_weight (N x K) in its accumulating GEMM, and
// small GEMMs run below MKL's full rate. The config's panel_bytes (csrc/runtime_config.h, for
// tuning and tests) sets the panel size exactly, without the minimum.
int64_t panel_rows(int64_t m, int64_t n, int64_t k, const Tensor& like) {
  if (at::isReducedFloatingType(like.scalar_type()) || m == 0) return std::max<int64_t>(m, 1);
  const int64_t row_bytes = std::max<int64_t>(n + k, 1) * like.element_size();
  const int64_t override_bytes = runtime_config().get(Switch::PanelBytes);
  const int64_t rows = override_bytes > 0 ? std::max<int64_t>(1, override_bytes / row_bytes)
                                          : std::max(kMinPanelRows, kDefaultPanelBytes / row_bytes);
  return std::min(m, rows);
}

// Rows of one bias-gradient partial sum: a function of the shapes only, so the summation order
// (and the result) does not depend on the number of threads. At most kMaxBlocks partial rows
// per panel keeps the partials buffer small next to the panel.
int64_t reduction_block_rows(int64_t rows_per_panel, int64_t n) {
  constexpr int64_t kMaxBlocks = 64;
  const int64_t min_rows = std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1));
  return std::max(min_rows, (rows_per_panel + kMaxBlocks - 1) / kMaxBlocks);
}

template <typename S>
using MathT = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename S>
void forward_panels(Activation act, double negative_slope, const Tensor& x2d, const Tensor& weight, const Tensor& bias,
                    Tensor& gemm_dst, Tensor& out, Tensor& mask) {
  const int64_t m = x2d.size(0), k = x2d.size(1), n = weight.size(0);
  const bool pre_out = !gemm_dst.is_same(out);
  const auto kernel = KernelsFor<S>::forward(cpu::cpu_kernels());
  // bfloat16: the bias is added inside the GEMM, in float32 before its one rounding, as eager's
  // addmm does. Rounding the product first and adding the bias after moves the sign of
  // pre-activations near 0 (118 of 262144 at 256x2048->1024), and so relu's mask and gradient.
  constexpr bool kBiasInGemm = !std::is_same_v<S, MathT<S>>;
  const S* bias_ptr = bias.defined() && !kBiasInGemm ? bias.const_data_ptr<S>() : nullptr;
  const int64_t mask_ld = mask.defined() ? mask.size(1) : 0;
  const int64_t rows_per_panel = panel_rows(m, n, k, x2d);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  const Tensor weight_t = weight.t();
  for (int64_t r0 = 0; r0 < m; r0 += rows_per_panel) {
    const int64_t rows = std::min(rows_per_panel, m - r0);
    Tensor panel = gemm_dst.narrow(0, r0, rows);
    if (kBiasInGemm && bias.defined()) {
      addmm_into(panel, bias, x2d.narrow(0, r0, rows), weight_t);
    } else {
      matmul_into(panel, x2d.narrow(0, r0, rows), weight_t, /*accumulate=*/false);
    }
    // Nothing left to do after the GEMM (no activation, no bias to add, nothing to save): no pass
    // (bfloat16 "none", e.g. a gated MLP's fc1).
    if (act == Activation::None && bias_ptr == nullptr && !pre_out && !mask.defined()) continue;
    at::parallel_for(r0, r0 + rows, grain, [&](int64_t begin, int64_t end) {
      cpu::LinearActForwardRows<S> a{end - begin,
                                     n,
                                     gemm_dst.data_ptr<S>() + begin * n,
                                     n,
                                     bias_ptr,
                                     pre_out,
                                     out.data_ptr<S>() + begin * n,
                                     n,
                                     mask.defined() ? mask.data_ptr<uint8_t>() + begin * mask_ld : nullptr,
                                     mask_ld};
      kernel(act, MathT<S>(negative_slope), a);
    });
  }
}

std::tuple<Tensor, Tensor> linear_act_fwd_cpu(const Tensor& input, const Tensor& weight,
                                              const std::optional<Tensor>& bias, c10::string_view activation,
                                              double negative_slope, bool for_backward) {
  constexpr const char* op = "torch_ext.linear_act_fwd";
  check_linear_args(op, input, weight, bias);
  const Activation act = activation_from(activation);
  const int64_t k = weight.size(1), n = weight.size(0), m = leading_rows(input);
  const Tensor x2d = input.reshape({m, k});
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  // Outputs are allocated in their final shape (*, n) and written through (m, n) views, so that
  // the op returns base tensors, not views (FSDP2 warns about module outputs that are views).
  Tensor out_full = cpu::empty_cpu_output(with_last_dim(input, n), input.options());
  Tensor out = out_full.view({m, n});
  Tensor saved, mask, gemm_dst = out;
  switch (for_backward ? saved_for_backward(act) : SavedForBackward::Nothing) {
    case SavedForBackward::PositiveMask:
      saved = at::empty(with_last_dim(input, (n + 7) / 8), input.options().dtype(at::kByte));
      mask = saved.view({m, (n + 7) / 8});
      break;
    case SavedForBackward::PreActivation:
      saved = cpu::empty_cpu_output(with_last_dim(input, n), input.options());
      gemm_dst = saved.view({m, n});
      break;
    default:
      if (for_backward) saved = at::empty({0}, input.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "forward_panels", [&] {
    forward_panels<scalar_t>(act, negative_slope, x2d, weight, bias_c, gemm_dst, out, mask);
  });
  return {out_full, saved};
}

// own2d: an (m, n) contiguous buffer the op may overwrite (grad_output, or the saved pre-activation),
// where grad_pre is formed in place rather than in a panel buffer; or undefined.
template <typename S>
void backward_panels(Activation act, double negative_slope, const Tensor& g2d, const Tensor& x2d, const Tensor& weight,
                     const Tensor& saved2d, const Tensor& mask2d, Tensor& grad_input, Tensor& grad_weight,
                     Tensor& bias_grad, const Tensor& own2d) {
  using Acc = MathT<S>;
  const int64_t m = x2d.size(0), k = x2d.size(1), n = weight.size(0);
  const auto kernel = KernelsFor<S>::backward(cpu::cpu_kernels());
  const int64_t rows_per_panel = panel_rows(m, n, k, x2d);
  const int64_t block = reduction_block_rows(rows_per_panel, n);
  const int64_t blocks_per_panel = (rows_per_panel + block - 1) / block;
  const bool in_place = own2d.defined();
  const Tensor grad_pre = in_place ? own2d : cpu::empty_cpu_output({rows_per_panel, n}, x2d.options());
  const int64_t ld_pre = grad_pre.stride(0);
  Tensor partials;
  if (bias_grad.defined()) partials = at::empty({blocks_per_panel, n}, bias_grad.options());
  const int64_t ld_g = g2d.stride(0);
  const int64_t ld_saved = saved2d.defined() ? saved2d.stride(0) : 0;
  const int64_t ld_mask = mask2d.defined() ? mask2d.stride(0) : 0;
  for (int64_t r0 = 0; r0 < m; r0 += rows_per_panel) {
    const int64_t rows = std::min(rows_per_panel, m - r0);
    const int64_t blocks = (rows + block - 1) / block;
    if (partials.defined()) partials.zero_();
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t b = block_begin; b < block_end; ++b) {
        const int64_t first = r0 + b * block;
        const int64_t count = std::min(block, r0 + rows - first);
        cpu::LinearActBackwardRows<S> a{count,
                                        n,
                                        g2d.const_data_ptr<S>() + first * ld_g,
                                        ld_g,
                                        saved2d.defined() ? saved2d.const_data_ptr<S>() + first * ld_saved : nullptr,
                                        ld_saved,
                                        mask2d.defined() ? mask2d.const_data_ptr<uint8_t>() + first * ld_mask : nullptr,
                                        ld_mask,
                                        grad_pre.data_ptr<S>() + (first - (in_place ? 0 : r0)) * ld_pre,
                                        ld_pre,
                                        partials.defined() ? partials.data_ptr<Acc>() + b * n : nullptr};
        kernel(act, Acc(negative_slope), a);
      }
    });
    if (partials.defined()) {
      Acc* acc = bias_grad.data_ptr<Acc>();
      const Acc* part = partials.const_data_ptr<Acc>();
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t j = 0; j < n; ++j) acc[j] += part[b * n + j];
      // Given back before the last panel's GEMMs, which write the weight and input gradients: held
      // through them, the partials would add to the step's peak (one panel: every step of a small layer).
      if (r0 + rows >= m) partials.reset();
    }
    const Tensor panel_grad = grad_pre.narrow(0, in_place ? r0 : 0, rows);
    if (grad_input.defined()) {
      Tensor grad_input_rows = grad_input.narrow(0, r0, rows);
      matmul_into(grad_input_rows, panel_grad, weight, /*accumulate=*/false);
    }
    if (grad_weight.defined()) {
      const Tensor x_panel = x2d.narrow(0, r0, rows);
      matmul_into(grad_weight, panel_grad.t(), x_panel, /*accumulate=*/r0 > 0);
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> linear_act_bwd_cpu(const Tensor& grad_output, const Tensor& input,
                                                      const Tensor& weight, const Tensor& saved,
                                                      c10::string_view activation, double negative_slope,
                                                      std::array<bool, 3> output_mask) {
  constexpr const char* op = "torch_ext.linear_act_bwd";
  check_linear_args(op, input, weight, std::nullopt);
  const Activation act = activation_from(activation);
  const int64_t k = weight.size(1), n = weight.size(0), m = leading_rows(input);
  check_same_device(op, input, "input", grad_output, "grad_output");
  check_same_dtype(op, input, "input", grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(with_last_dim(input, n)), op, ": grad_output must have shape ",
              at::IntArrayRef(with_last_dim(input, n)), ", got ", grad_output.sizes());
  const GradPreIn grad_pre_at = grad_pre_in(act, grad_output, saved, m, n);  // before any view below
  const auto saved_views = saved_for_linear_act_bwd(op, act, saved, input, grad_output, m, n);
  const Tensor& mask2d = saved_views.first;
  const Tensor& saved2d = saved_views.second;
  const Tensor x2d = input.reshape({m, k});
  Tensor g2d = grad_output.reshape({m, n});
  // The kernels read rows with unit column stride; any row stride (0 too) is fine. Other layouts
  // (e.g. the all-zero strides of a grad expanded from a scalar) are made contiguous first.
  if (n > 1 && g2d.stride(1) != 1) g2d = g2d.contiguous();

  const auto options = input.options();
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor grad_input = output_mask[0] ? cpu::empty_cpu_output({m, k}, options) : Tensor();
  Tensor grad_weight = output_mask[1] ? cpu::empty_cpu_output({n, k}, options) : Tensor();
  Tensor bias_grad = output_mask[2] ? at::zeros({n}, options.dtype(acc_dtype)) : Tensor();
  if (m == 0 && grad_weight.defined()) grad_weight.zero_();
  const Tensor own2d = grad_pre_at == GradPreIn::GradOutput ? g2d
                       : grad_pre_at == GradPreIn::Saved    ? saved2d
                                                            : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "backward_panels", [&] {
    backward_panels<scalar_t>(act, negative_slope, g2d, x2d, weight, saved2d, mask2d, grad_input, grad_weight,
                              bias_grad, own2d);
  });
  // Gradients not asked for come back undefined (None).
  return {grad_input.defined() ? grad_input.view(input.sizes()) : Tensor(), grad_weight,
          bias_grad.defined() ? bias_grad.to(input.scalar_type()) : Tensor()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("linear_act_fwd", &linear_act_fwd_cpu);
  m.impl("linear_act_bwd", &linear_act_bwd_cpu);
}

}  // namespace torch_ext
