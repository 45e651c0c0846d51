// The eager autograd path of the losses whose forward op also forms their gradients (for
// grad_loss = 1, while the data is in cache), in C++: a Python autograd.Function costs ~25 us a
// call (apply, and the engine calling back into Python), more than a small loss's whole eager step
// (F.cross_entropy 32x10 fwd+bwd: ~40 us). The Python functions call it only in eager mode (not
// while compiling: compiled graphs take the forward/backward op pair and their Python autograd).
//
// The node holds the formed gradients as saved variables (saved-tensor hooks see them), and its
// backward does what torch_ext/_common.py's unit_grads_backward describes: the first backward
// hands them over, scaled in place by grad_loss (row by row for a loss per row) unless it is the
// CPU scalar 1; a later one (of a
// retained graph) recomputes them with the backward op for grad_loss = 1 first, so both give the
// same bits; with create_graph it calls the backward op through autograd (which refuses a second
// derivative with a clear error).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

namespace torch_ext {

struct GradInForwardCall {
  const char* name;  // the node's name, as grad_fn shows it
  // The backward op, called as backward(grad_loss, *saved, *options, output_mask) -> one
  // gradient per differentiable input, in `inputs` order.
  c10::OperatorHandle backward;
  std::vector<at::Tensor> inputs;      // the differentiable inputs (edges of the node)
  std::vector<at::Tensor> unit_grads;  // their gradients for grad_loss = 1; undefined: not formed
  std::vector<at::Tensor> saved;       // the backward op's tensor arguments (undefined: None)
  std::vector<c10::IValue> options;    // its other arguments
};

// Makes `loss` the output of a node that hands call.unit_grads to call.inputs in backward.
void set_grad_in_forward_history(const at::Tensor& loss, GradInForwardCall call);

// The eager training paths, one per op family (Python: torch_ext._C._<name>): the forward op
// with its gradients, below autograd, and the node above. Arguments as the forward op's.
at::Tensor cross_entropy_grad_in_forward(const at::Tensor& input, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                         c10::string_view reduction, double label_smoothing, double z_loss);
at::Tensor regression_loss_grad_in_forward(const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight, c10::string_view loss,
                                           double param, c10::string_view reduction);
at::Tensor triplet_margin_loss_grad_in_forward(const at::Tensor& anchor, const at::Tensor& positive,
                                               const at::Tensor& negative, double margin, double p, double eps,
                                               bool swap, c10::string_view reduction);

}  // namespace torch_ext
