// The backward of the MLP block fc2(act(fc1(x))) (torch_ext/mlp.py) as one op, so that the
// eager C++ autograd node (csrc/autograd_node.h) and the Python autograd under torch.compile
// call the same code.
//
// Device-neutral: ATen GEMMs plus torch_ext's dense-layer and activation ops through the
// dispatcher, registered for CPU here and for CUDA when it is built (as linear_cross_entropy);
// on CPU, one in-place pass of the activation (csrc/cpu/mlp_act.h) where the node hands it the
// saved pre-activation.
//
// hidden: the activation's output act(fc1(x)), fc2's input; when it was not saved (recompute),
// it is formed again from `saved` (the pre-activation), in the same pass as the activation's
// gradient where that is needed anyway. Ordered for peak memory: the hidden activation is
// dropped as soon as fc2's weight gradient has used it, before fc1's gradients are formed.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "allocation.h"
#include "checks.h"
#include "cpu/mlp_act.h"
#include "matmul.h"
#include "shapes.h"

namespace torch_ext {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd(const Tensor& grad_output, const Tensor& input,
                                                           const Tensor& fc1_weight, const Tensor& fc2_weight,
                                                           const Tensor& saved, const std::optional<Tensor>& hidden,
                                                           c10::string_view activation, double negative_slope,
                                                           bool gated, std::array<bool, 5> output_mask) {
  constexpr const char* op = "torch_ext.mlp_bwd";
  for (const auto& [t, name] :
       {std::pair{&grad_output, "grad_output"}, {&fc1_weight, "fc1_weight"}, {&fc2_weight, "fc2_weight"}}) {
    check_same_device(op, input, "input", *t, name);
    check_same_dtype(op, input, "input", *t, name);
  }
  check_same_device(op, input, "input", saved, "saved");  // (relu's saved is a uint8 bit mask)
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension, got a 0-D tensor");
  TORCH_CHECK(fc1_weight.dim() == 2 && fc2_weight.dim() == 2, op, ": fc1_weight and fc2_weight must be 2-D, got ",
              fc1_weight.sizes(), " and ", fc2_weight.sizes());
  const int64_t in_features = input.size(-1), hidden_width = fc2_weight.size(1), out_features = fc2_weight.size(0);
  TORCH_CHECK(fc1_weight.size(1) == in_features, op, ": fc1_weight ", fc1_weight.sizes(),
              " does not match input.size(-1) = ", in_features);
  TORCH_CHECK(fc1_weight.size(0) == (gated ? 2 : 1) * hidden_width, op, ": fc1_weight ", fc1_weight.sizes(),
              " does not match fc2_weight ", fc2_weight.sizes(), gated ? " (gated: fc1 has 2 * hidden outputs)" : "");
  const int64_t rows = leading_rows(input);
  TORCH_CHECK(
      grad_output.dim() >= 1 && grad_output.size(-1) == out_features && grad_output.numel() == rows * out_features, op,
      ": grad_output ", grad_output.sizes(), " does not match input ", input.sizes(), " and fc2_weight ",
      fc2_weight.sizes());
  const bool recompute = !hidden.has_value() || !hidden->defined();
  if (recompute) {
    TORCH_CHECK(saved.sizes() == at::IntArrayRef(with_last_dim(input, fc1_weight.size(0))) &&
                    saved.scalar_type() == input.scalar_type(),
                op, ": hidden is None, so saved must be the pre-activation fc1(input) (shape ",
                at::IntArrayRef(with_last_dim(input, fc1_weight.size(0))), ", dtype ", input.scalar_type(), "), got ",
                saved.sizes(), " ", saved.scalar_type());
  } else {
    check_same_device(op, input, "input", *hidden, "hidden");
  }

  static const auto linear_act_bwd =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::linear_act_bwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    c10::string_view, double, std::array<bool, 3>)>();
  static const auto mlp_act_fwd = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("torch_ext::mlp_act_fwd", "")
                                      .typed<Tensor(const Tensor&, c10::string_view, double, bool)>();
  static const auto mlp_act_bwd = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("torch_ext::mlp_act_bwd", "")
                                      .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::string_view,
                                                                        double, bool, std::array<bool, 2>)>();

  const bool need_fc1 = output_mask[0] || output_mask[1] || output_mask[2];
  const bool need_w2 = output_mask[3];
  const Tensor g2d = grad_output.reshape({rows, out_features});
  auto fc2_weight_grad = [&](const Tensor& h) { return dense_product(g2d.t(), h.reshape({rows, hidden_width})); };
  auto hidden_grad = [&] { return dense_product(g2d, fc2_weight).view(with_last_dim(input, hidden_width)); };

  Tensor grad_input, grad_w1, grad_b1, grad_w2, grad_b2;
  auto gated_fc1_grads = [&](const Tensor& grad_pre) {
    const Tensor pre2d = grad_pre.reshape({rows, fc1_weight.size(0)});
    if (output_mask[0]) grad_input = dense_product(pre2d, fc1_weight).view(input.sizes());
    if (output_mask[1]) grad_w1 = dense_product(pre2d.t(), input.reshape({rows, in_features}));
    if (output_mask[2]) grad_b1 = pre2d.sum(0);
  };
  // On CPU, where the node handed the saved pre-activation over (recompute, graph not retained), one
  // pass forms the activation's gradient over the pre-activation and the hidden activation again over
  // hidden_grad: no new (rows, hidden) buffer, and one read of the pre-activation and one evaluation of
  // the activation fewer than the two-pass path below, which other devices and retained graphs take.
  if (recompute && need_fc1 && need_w2 && input.is_cpu() && held_alone(saved)) {
    Tensor hidden_now = hidden_grad();
    cpu::mlp_act_bwd_in_place(hidden_now, saved, activation, negative_slope, gated);
    grad_w2 = fc2_weight_grad(hidden_now);
    hidden_now.reset();  // before fc1's products, for the step's peak
    if (gated) {
      gated_fc1_grads(saved);
    } else {  // saved holds grad_pre: fc1's products on the dense layer's GEMMs, as below
      std::tie(grad_input, grad_w1, grad_b1) =
          linear_act_bwd.call(saved, input, fc1_weight, at::empty({0}, input.options()), "none", 0.0,
                              {output_mask[0], output_mask[1], output_mask[2]});
    }
  } else if (gated) {
    Tensor grad_pre;
    if (need_fc1) {
      // One pass: the gate's gradient and (recompute) the hidden activation again.
      Tensor formed;
      std::tie(grad_pre, formed) =
          mlp_act_bwd.call(hidden_grad(), saved, activation, negative_slope, true, {true, need_w2 && recompute});
      if (need_w2) grad_w2 = fc2_weight_grad(recompute ? formed : *hidden);
    } else if (need_w2) {
      grad_w2 = fc2_weight_grad(recompute ? mlp_act_fwd.call(saved, activation, negative_slope, true) : *hidden);
    }
    if (grad_pre.defined()) gated_fc1_grads(grad_pre);
  } else {
    if (need_w2)
      grad_w2 = fc2_weight_grad(recompute ? mlp_act_fwd.call(saved, activation, negative_slope, false) : *hidden);
    if (need_fc1)
      std::tie(grad_input, grad_w1, grad_b1) =
          linear_act_bwd.call(hidden_grad(), input, fc1_weight, saved, activation, negative_slope,
                              {output_mask[0], output_mask[1], output_mask[2]});
  }
  if (output_mask[4]) grad_b2 = g2d.sum(0);
  return {grad_input, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) { m.impl("mlp_bwd", &mlp_bwd); }

#ifdef TORCH_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) { m.impl("mlp_bwd", &mlp_bwd); }
#endif

}  // namespace torch_ext
