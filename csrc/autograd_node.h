// C++ autograd nodes for the eager training paths of the ops: a Python autograd.Function costs
// more per call (apply, and the engine calling back into Python) than a small loss's whole eager
// step (F.cross_entropy 32x10 fwd+bwd; docs/api.md has the figures) or a small layer's. The
// Python functions call these paths in eager mode only; while compiling, they take the same
// forward/backward ops through their Python autograd (torch.library.register_autograd /
// autograd.Function), which dynamo traces.
//
// One node kind, two modes:
//   - forward/backward pair: backward calls the backward op with the output's gradient;
//   - gradients formed in forward (the losses, reductions mean and sum): the forward op also
//     formed the inputs' gradients for grad_loss = 1, held as saved variables (saved-tensor hooks
//     see them). The first backward hands them over, scaled in place by grad_loss (row by row for
//     a loss per row) unless it is the CPU scalar 1; a later one (of a retained graph) recomputes
//     them with the backward op for grad_loss = 1 first, so both give the same bits.
// With create_graph, the dense layers', cross-entropy's and the regression losses' nodes call their
// graph_backward op (PyTorch's differentiable ops: gradients of any order are PyTorch's); the
// others call the backward op through autograd, which refuses a second derivative with a clear
// error (torch_ext/_common.py's register_no_double_backward).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

namespace torch_ext {

struct NodeSpec {
  const char* name;  // the node's name, as grad_fn shows it
  // The backward op, called as backward(grad, *saved, *options, output_mask) -> one gradient per
  // differentiable input, in `inputs` order (those not in output_mask: undefined).
  c10::OperatorHandle backward;
  std::vector<at::Tensor> inputs;       // the differentiable inputs (undefined: None), the node's edges
  std::vector<bool> mask;               // which of them get a gradient
  std::vector<at::Tensor> unit_grads;   // gradients formed in forward (for grad = 1), or empty: a pair
  std::vector<at::Tensor> saved;        // the backward op's tensor arguments (undefined: None)
  int saved_output = -1;                // index in `saved` of the node's output, if saved
  std::vector<c10::IValue> options;     // the backward op's other arguments
  std::vector<c10::IValue> after_mask;  // its arguments after output_mask, if any
  // For a backward that records a graph (create_graph): an op forming the gradients with PyTorch's
  // differentiable ops, called as graph_backward(grad, *args, *options, output_mask, *after_mask),
  // args picked by graph_args from `saved` followed by `graph_saved`. Without one, such gradients
  // refuse a second derivative (NoDoubleBackward).
  std::optional<c10::OperatorHandle> graph_backward;
  std::vector<at::Tensor> graph_saved;
  std::vector<int> graph_args;
};

// Makes `output` the output of a node as `spec` says.
void set_node_history(const at::Tensor& output, NodeSpec spec);

// The eager training paths, one per op family (Python: torch_ext._C._<name>): the forward op
// (with the gradients, for the losses) below autograd, and the node above. Arguments as the
// forward op's. The losses over classes return (loss, the rows' stats as their forward op gives them).
// Each serves calls without autograd too (grad mode off, or no input requiring grad): the
// forward op alone, with no gradient formed and no node, at less cost per call than the op
// called from Python.
std::tuple<at::Tensor, at::Tensor> cross_entropy_eager(const at::Tensor& input, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                       c10::string_view reduction, double label_smoothing,
                                                       double z_loss, double softcap, bool ignored_row_stats,
                                                       std::optional<at::ScalarType> loss_dtype);
at::Tensor regression_loss_eager(const at::Tensor& input, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, c10::string_view loss, double param,
                                 c10::string_view reduction, std::optional<at::ScalarType> loss_dtype);
at::Tensor triplet_margin_loss_eager(const at::Tensor& anchor, const at::Tensor& positive, const at::Tensor& negative,
                                     double margin, double p, double eps, bool swap, c10::string_view reduction,
                                     std::optional<at::ScalarType> loss_dtype);
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_eager(
    const at::Tensor& input, const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index, c10::string_view reduction,
    double label_smoothing, double z_loss, int64_t chunk_size, double softcap, bool ignored_row_stats,
    std::optional<at::ScalarType> loss_dtype);
at::Tensor linear_act_eager(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::string_view activation, double negative_slope);
// activation: the (gate's) activation; recompute: form act(fc1(input)) again in backward rather
// than save it (torch_ext/mlp.py decides where that applies).
at::Tensor mlp_eager(const at::Tensor& input, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
                     const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias,
                     c10::string_view activation, double negative_slope, bool gated, bool recompute);

}  // namespace torch_ext
