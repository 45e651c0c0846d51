// The dense layers' gradients written with PyTorch's differentiable ops, for backward with
// create_graph=True (gradients of gradients: gradient penalties, physics-informed losses, MAML).
// Registered as CompositeImplicitAutograd: autograd records the ATen ops they are made of, whose
// own derivatives (gelu_backward's, threshold_backward's, ...) are PyTorch's, so every higher
// derivative through a fused layer is PyTorch's. The fused backward ops (linear_act_bwd, mlp_bwd)
// read what the forward saved (a bit mask, a pre-activation with no history), which cannot be
// differentiated again; these form the pre-activation again instead (one more GEMM), and are
// taken only when the backward records a graph (csrc/autograd_node.cpp, torch_ext/linear_act.py,
// torch_ext/mlp.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "activation.h"

namespace torch_ext {
namespace {

using at::Tensor;

Activation activation_of(c10::string_view name) { return parse_activation(std::string_view(name.data(), name.size())); }

Tensor apply_activation(const Tensor& pre, Activation act, double negative_slope) {
  switch (act) {
    case Activation::None: return pre;
    case Activation::Relu: return at::relu(pre);
    case Activation::LeakyRelu: return at::leaky_relu(pre, negative_slope);
    case Activation::Gelu: return at::gelu(pre, "none");
    case Activation::GeluTanh: return at::gelu(pre, "tanh");
    case Activation::Silu: return at::silu(pre);
    case Activation::Sigmoid: return at::sigmoid(pre);
    case Activation::Tanh: return at::tanh(pre);
    case Activation::QuickGelu: return pre * at::sigmoid(pre * kQuickGeluScale);
  }
  TORCH_CHECK(false, "unreachable");
}

// grad * act'(pre), by ATen's activation backward ops (differentiable in grad and in pre), as
// PyTorch's derivatives of the activations form it under create_graph.
Tensor activation_backward(const Tensor& grad, const Tensor& pre, Activation act, double negative_slope) {
  switch (act) {
    case Activation::None: return grad;
    case Activation::Relu: return at::threshold_backward(grad, pre, 0);
    case Activation::LeakyRelu: return at::leaky_relu_backward(grad, pre, negative_slope, false);
    case Activation::Gelu: return at::gelu_backward(grad, pre, "none");
    case Activation::GeluTanh: return at::gelu_backward(grad, pre, "tanh");
    case Activation::Silu: {  // silu_backward has no derivative: PyTorch's own formula under create_graph
      const Tensor s = at::sigmoid(pre);
      return grad * s * (1 + pre * (1 - s));
    }
    case Activation::Sigmoid: return at::sigmoid_backward(grad, at::sigmoid(pre));
    case Activation::Tanh: return at::tanh_backward(grad, at::tanh(pre));
    case Activation::QuickGelu: {  // as autograd differentiates x * sigmoid(k x)
      const Tensor s = at::sigmoid(pre * kQuickGeluScale);
      return grad * s * (1 + kQuickGeluScale * pre * (1 - s));
    }
  }
  TORCH_CHECK(false, "unreachable");
}

// t viewed as (rows, t.size(-1)); a 1-D t as one row.
Tensor as_rows(const Tensor& t) { return t.dim() == 1 ? t.unsqueeze(0) : t.flatten(0, -2); }

// The gradients of F.linear(input, weight) for its output's gradient grad (*, out): input's,
// weight's and the bias's, those not in `mask` undefined.
std::array<Tensor, 3> linear_grads(const Tensor& grad, const Tensor& input, const Tensor& weight,
                                   std::array<bool, 3> mask) {
  std::array<Tensor, 3> grads;
  if (mask[0]) grads[0] = at::matmul(grad, weight);
  if (mask[1]) grads[1] = as_rows(grad).t().mm(as_rows(input));
  if (mask[2]) grads[2] = as_rows(grad).sum(0);
  return grads;
}

std::tuple<Tensor, Tensor, Tensor> linear_act_bwd_composite(const Tensor& grad_output, const Tensor& input,
                                                            const Tensor& weight, const std::optional<Tensor>& bias,
                                                            c10::string_view activation, double negative_slope,
                                                            std::array<bool, 3> output_mask) {
  const Activation act = activation_of(activation);
  const Tensor pre = at::linear(input, weight, bias);
  auto grads = linear_grads(activation_backward(grad_output, pre, act, negative_slope), input, weight, output_mask);
  return {grads[0], grads[1], grads[2]};
}

// The gradient of the MLP activation act(pre), or gated act(u) * v of pre = [u, v] (halves of its
// last dimension), for its output's gradient grad: mlp_act_bwd's input gradient.
Tensor mlp_act_bwd_composite(const Tensor& grad_output, const Tensor& input, c10::string_view activation,
                             double negative_slope, bool gated) {
  const Activation act = activation_of(activation);
  if (!gated) return activation_backward(grad_output, input, act, negative_slope);
  auto halves = input.chunk(2, -1);
  return at::cat({activation_backward(grad_output * halves[1], halves[0], act, negative_slope),
                  grad_output * apply_activation(halves[0], act, negative_slope)},
                 -1);
}

// fc2(act(fc1(input))), the activation as mlp_act_bwd_composite's. fc2's bias shapes no gradient
// but its own (the sum of grad_output).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_bwd_composite(const Tensor& grad_output, const Tensor& input,
                                                                     const Tensor& fc1_weight,
                                                                     const std::optional<Tensor>& fc1_bias,
                                                                     const Tensor& fc2_weight,
                                                                     c10::string_view activation, double negative_slope,
                                                                     bool gated, std::array<bool, 5> output_mask) {
  const Activation act = activation_of(activation);
  const Tensor pre = at::linear(input, fc1_weight, fc1_bias);
  Tensor hidden;
  if (gated) {
    auto halves = pre.chunk(2, -1);
    hidden = apply_activation(halves[0], act, negative_slope) * halves[1];
  } else {
    hidden = apply_activation(pre, act, negative_slope);
  }
  const bool fc1_grads = output_mask[0] || output_mask[1] || output_mask[2];
  auto fc2 = linear_grads(grad_output, hidden, fc2_weight, {fc1_grads, output_mask[3], output_mask[4]});
  std::array<Tensor, 3> fc1;
  if (fc1_grads) {
    const Tensor grad_pre = mlp_act_bwd_composite(fc2[0], pre, activation, negative_slope, gated);
    fc1 = linear_grads(grad_pre, input, fc1_weight, {output_mask[0], output_mask[1], output_mask[2]});
  }
  return {fc1[0], fc1[1], fc1[2], fc2[1], fc2[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CompositeImplicitAutograd, m) {
  m.impl("linear_act_bwd_composite", &linear_act_bwd_composite);
  m.impl("mlp_act_bwd_composite", &mlp_act_bwd_composite);
  m.impl("mlp_bwd_composite", &mlp_bwd_composite);
}

}  // namespace torch_ext
