// Fused triplet margin loss on CPU (csrc/cpu/kernels/triplet_margin_loss.h has the formulas).
//   forward : one read of anchor, positive and negative; saved for backward: the three row
//             distances (rows x 3 numbers), instead of the difference tensors eager keeps.
//             with grad_mask, the forward also writes the gradients for grad_output = 1 while
//             each row is in cache, which saves the backward's second read of the inputs.
//   backward: one read of the three inputs, one write of each requested gradient.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>
#include <vector>

#include "checks.h"
#include "cpu/runtime/allocator.h"
#include "cpu/runtime/kernel_table.h"
#include "loss.h"
#include "loss_checks.h"

namespace torch_ext {
namespace {

using at::Tensor;
using cpu::KernelsFor;

template <typename S>
cpu::TripletMarginArgs<S> kernel_args(const Tensor& a, const Tensor& p, const Tensor& n, double margin, double norm_p,
                                      double eps, bool swap, Tensor& dist) {
  using A = cpu::acc_t<S>;
  cpu::TripletMarginArgs<S> args{};
  args.rows = a.dim() == 2 ? a.size(0) : 1;
  args.dim = a.size(-1);
  args.anchor = a.const_data_ptr<S>();
  args.positive = p.const_data_ptr<S>();
  args.negative = n.const_data_ptr<S>();
  args.margin = A(margin);
  args.p = A(norm_p);
  args.eps = A(eps);
  args.swap = swap;
  args.dist = dist.data_ptr<A>();
  return args;
}

template <typename S>
void run_forward(const Tensor& a, const Tensor& p, const Tensor& n, double margin, double norm_p, double eps, bool swap,
                 Tensor& dist, Tensor& row_loss, double grad_scale, Tensor (&grads)[3]) {
  auto args = kernel_args<S>(a, p, n, margin, norm_p, eps, swap, dist);
  args.row_loss = row_loss.data_ptr<cpu::acc_t<S>>();
  args.scale = cpu::acc_t<S>(grad_scale);
  args.grad_anchor = grads[0].defined() ? grads[0].data_ptr<S>() : nullptr;
  args.grad_positive = grads[1].defined() ? grads[1].data_ptr<S>() : nullptr;
  args.grad_negative = grads[2].defined() ? grads[2].data_ptr<S>() : nullptr;
  KernelsFor<S>::triplet_margin_forward(cpu::cpu_kernels())(args);
}

template <typename S>
void run_backward(const Tensor& a, const Tensor& p, const Tensor& n, double margin, double norm_p, double eps,
                  bool swap, Tensor& dist, const Tensor& row_scale, double scale, Tensor (&grads)[3]) {
  using A = cpu::acc_t<S>;
  auto args = kernel_args<S>(a, p, n, margin, norm_p, eps, swap, dist);
  args.row_scale = row_scale.defined() ? row_scale.const_data_ptr<A>() : nullptr;
  args.scale = A(scale);
  args.grad_anchor = grads[0].defined() ? grads[0].data_ptr<S>() : nullptr;
  args.grad_positive = grads[1].defined() ? grads[1].data_ptr<S>() : nullptr;
  args.grad_negative = grads[2].defined() ? grads[2].data_ptr<S>() : nullptr;
  KernelsFor<S>::triplet_margin_backward(cpu::cpu_kernels())(args);
}

std::vector<int64_t> loss_shape(const Tensor& anchor) {
  return anchor.dim() == 2 ? std::vector<int64_t>{anchor.size(0)} : std::vector<int64_t>{};
}

// The forward, and when grad_mask asks for them, the gradients for grad_output = 1 in the same
// pass (triplet_margin_loss_fwd's grad_mask).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_impl(const char* op, const Tensor& anchor,
                                                                const Tensor& positive, const Tensor& negative,
                                                                double margin, double p, double eps, bool swap,
                                                                c10::string_view reduction,
                                                                std::array<bool, 3> grad_mask,
                                                                std::optional<at::ScalarType> loss_dtype) {
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  check_triplet_args(op, anchor, positive, negative, p);
  const at::ScalarType dtype = loss_dtype_or_input(op, anchor, loss_dtype);
  const Tensor a = anchor.contiguous(), pos = positive.contiguous(), neg = negative.contiguous();
  const int64_t rows = a.dim() == 2 ? a.size(0) : 1;
  const auto acc_options = anchor.options().dtype(accumulate_dtype(anchor));
  Tensor dist = at::empty({rows, 3}, acc_options);
  Tensor row_loss = at::empty({rows}, acc_options);
  Tensor grads[3];
  for (int i = 0; i < 3; ++i)
    if (grad_mask[i]) grads[i] = cpu::empty_cpu_output(anchor.sizes(), anchor.options());
  const double grad_scale = red == Reduction::Mean ? 1.0 / double(rows) : 1.0;
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, anchor.scalar_type(), "run_forward", [&] {
      run_forward<scalar_t>(a, pos, neg, margin, p, eps, swap, dist, row_loss, grad_scale, grads);
    });
  }
  const double total = row_loss.scalar_type() == at::kDouble ? sum_in_order(row_loss.const_data_ptr<double>(), rows)
                                                             : sum_in_order(row_loss.const_data_ptr<float>(), rows);
  Tensor loss;
  switch (red) {
    case Reduction::None: loss = row_loss.to(dtype).view(loss_shape(anchor)); break;
    case Reduction::Sum: loss = at::scalar_tensor(total, anchor.options().dtype(dtype)); break;
    case Reduction::Mean: loss = at::scalar_tensor(total / double(rows), anchor.options().dtype(dtype)); break;
  }
  return {loss, dist, grads[0], grads[1], grads[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> triplet_margin_loss_fwd_cpu(
    const Tensor& anchor, const Tensor& positive, const Tensor& negative, double margin, double p, double eps,
    bool swap, c10::string_view reduction, std::array<bool, 3> grad_mask, std::optional<at::ScalarType> loss_dtype) {
  return forward_impl("torch_ext.triplet_margin_loss", anchor, positive, negative, margin, p, eps, swap, reduction,
                      grad_mask, loss_dtype);
}

std::tuple<Tensor, Tensor, Tensor> triplet_margin_loss_bwd_cpu(const Tensor& grad_loss, const Tensor& anchor,
                                                               const Tensor& positive, const Tensor& negative,
                                                               const Tensor& dist, double margin, double p, double eps,
                                                               bool swap, c10::string_view reduction,
                                                               std::array<bool, 3> output_mask) {
  constexpr const char* op = "torch_ext.triplet_margin_loss_bwd";
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  check_triplet_args(op, anchor, positive, negative, p);
  const int64_t rows = anchor.dim() == 2 ? anchor.size(0) : 1;
  const auto acc = accumulate_dtype(anchor);
  check_row_stats(op, anchor, "anchor", dist, "dist", rows, acc, "triplet_margin_loss_fwd");
  check_same_device(op, anchor, "anchor", grad_loss, "grad_loss");
  Tensor row_scale;
  double scale = 0;
  check_grad_loss(op, grad_loss, red, reduction, at::IntArrayRef(loss_shape(anchor)));
  if (red == Reduction::None) {
    row_scale = grad_loss.to(acc).contiguous();
  } else {
    scale = grad_loss.item<double>() / (red == Reduction::Mean ? double(rows) : 1.0);
  }
  const Tensor a = anchor.contiguous(), pos = positive.contiguous(), neg = negative.contiguous();
  Tensor dist_c = dist.contiguous();
  Tensor grads[3];
  for (int i = 0; i < 3; ++i)
    if (output_mask[i]) grads[i] = cpu::empty_cpu_output(anchor.sizes(), anchor.options());
  if (rows > 0 && (output_mask[0] || output_mask[1] || output_mask[2])) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, anchor.scalar_type(), "run_backward", [&] {
      run_backward<scalar_t>(a, pos, neg, margin, p, eps, swap, dist_c, row_scale, scale, grads);
    });
  }
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("triplet_margin_loss_fwd", &triplet_margin_loss_fwd_cpu);
  m.impl("triplet_margin_loss_bwd", &triplet_margin_loss_bwd_cpu);
}

}  // namespace torch_ext
