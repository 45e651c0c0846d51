// The MLP activation on CPU: act(x) over (*, n), or gated (swiglu, geglu, ...): act(u) * v over
// (*, 2n) rows [u | v], in one pass. Its backward forms the input gradient (both halves) and,
// when asked, the forward output again in the same pass, so FusedMLP saves the pre-activation
// alone and gets the hidden activation for fc2's weight gradient without another read.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string_view>

#include "activation.h"
#include "checks.h"
#include "cpu/mlp_act.h"
#include "cpu/runtime/allocator.h"
#include "cpu/runtime/kernel_table.h"
#include "dense_checks.h"
#include "shapes.h"

namespace torch_ext {
namespace {

using at::Tensor;
using cpu::KernelsFor;

template <typename S>
using MathT = std::conditional_t<std::is_same_v<S, double>, double, float>;

int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

template <typename S>
void run_rows(bool backward, Activation act, double slope, const cpu::MlpActRows<S>& all) {
  const auto kernel = backward ? KernelsFor<S>::mlp_act_backward(cpu::cpu_kernels())
                               : KernelsFor<S>::mlp_act_forward(cpu::cpu_kernels());
  at::parallel_for(0, all.rows, grain_rows(all.n), [&](int64_t begin, int64_t end) {
    cpu::MlpActRows<S> a = all;
    a.rows = end - begin;
    a.input += begin * a.ld_input;
    if (a.grad_out) a.grad_out += begin * a.ld_grad_out;
    if (a.out) a.out += begin * a.ld_out;
    if (a.grad_input) a.grad_input += begin * a.ld_grad_input;
    kernel(act, MathT<S>(slope), a);
  });
}

template <typename S>
void dispatch_rows(bool backward, Activation act, double slope, int64_t rows, int64_t n, bool gated, const Tensor& in2d,
                   const Tensor& g2d, const Tensor& out2d, const Tensor& grad2d) {
  cpu::MlpActRows<S> a{rows,
                       n,
                       gated,
                       in2d.const_data_ptr<S>(),
                       in2d.size(1),
                       g2d.defined() ? g2d.const_data_ptr<S>() : nullptr,
                       g2d.defined() ? g2d.stride(0) : 0,
                       out2d.defined() ? out2d.data_ptr<S>() : nullptr,
                       n,
                       grad2d.defined() ? grad2d.data_ptr<S>() : nullptr,
                       in2d.size(1)};
  run_rows<S>(backward, act, slope, a);
}

void run(bool backward, Activation act, double slope, int64_t rows, int64_t n, bool gated, const Tensor& in2d,
         const Tensor& g2d, const Tensor& out2d, const Tensor& grad2d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in2d.scalar_type(), "dispatch_rows", [&] {
    dispatch_rows<scalar_t>(backward, act, slope, rows, n, gated, in2d, g2d, out2d, grad2d);
  });
}

Tensor mlp_act_fwd_cpu(const Tensor& input, c10::string_view activation, double negative_slope, bool gated) {
  constexpr const char* op = "torch_ext.mlp_act_fwd";
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const int64_t n = mlp_act_output_width(op, input, gated);
  check_floating(op, input, "input");
  const int64_t rows = leading_rows(input);
  const Tensor in2d = input.reshape({rows, input.size(-1)}).contiguous();
  Tensor out_full = cpu::empty_cpu_output(with_last_dim(input, n), input.options());  // returned as a base tensor
  Tensor out = out_full.view({rows, n});
  run(false, act, negative_slope, rows, n, gated, in2d, Tensor(), out, Tensor());
  return out_full;
}

std::tuple<Tensor, Tensor> mlp_act_bwd_cpu(const Tensor& grad_output, const Tensor& input, c10::string_view activation,
                                           double negative_slope, bool gated, std::array<bool, 2> output_mask) {
  constexpr const char* op = "torch_ext.mlp_act_bwd";
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
  // Rows are read with unit column stride; any row stride (0 too, a grad expanded from a scalar
  // along the rows) is fine, other layouts are made contiguous first.
  Tensor g2d = grad_output.reshape({rows, n});
  if (n > 1 && g2d.stride(1) != 1) g2d = g2d.contiguous();
  Tensor grad_input = output_mask[0] ? cpu::empty_cpu_output({rows, width}, options) : Tensor();
  Tensor out = output_mask[1] ? cpu::empty_cpu_output({rows, n}, options) : Tensor();
  run(true, act, negative_slope, rows, n, gated, in2d, g2d, out, grad_input);
  return {grad_input.defined() ? grad_input.view(input.sizes()) : Tensor(),
          out.defined() ? out.view(out_sizes) : Tensor()};
}

}  // namespace

namespace cpu {

void mlp_act_bwd_in_place(const Tensor& grad_output, const Tensor& input, c10::string_view activation,
                          double negative_slope, bool gated) {
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const int64_t n = mlp_act_output_width("torch_ext.mlp_act_bwd", input, gated);
  const int64_t rows = leading_rows(input);
  TORCH_INTERNAL_ASSERT(input.is_contiguous() && grad_output.is_contiguous() && grad_output.numel() == rows * n &&
                        grad_output.scalar_type() == input.scalar_type());
  if (rows == 0 || n == 0) return;
  const Tensor in2d = input.view({rows, input.size(-1)});
  const Tensor g2d = grad_output.view({rows, n});
  // Each kernel step loads its vectors (a segment of them, in 16-bit types) of every operand before
  // it stores any result, so writing over the operands is safe.
  run(true, act, negative_slope, rows, n, gated, in2d, g2d, /*out2d=*/g2d, /*grad2d=*/in2d);
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("mlp_act_fwd", &mlp_act_fwd_cpu);
  m.impl("mlp_act_bwd", &mlp_act_bwd_cpu);
}

}  // namespace torch_ext
