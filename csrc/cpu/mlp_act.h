// What FusedMLP's backward (csrc/mlp.cpp) calls of the CPU MLP activation directly, rather than
// through the dispatcher: a form that writes over its operands, which no op schema of ours allows.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace torch_ext::cpu {

// mlp_act_bwd(grad_output, input, ..., output_mask = {true, true}) in place: input (*, n), or
// (*, 2n) when gated, becomes its gradient, and grad_output (*, n) the activation's output
// act(input) (times the gate's value half when gated). Both contiguous CPU tensors of one dtype
// that the caller holds alone.
void mlp_act_bwd_in_place(const at::Tensor& grad_output, const at::Tensor& input, c10::string_view activation,
                          double negative_slope, bool gated);

}  // namespace torch_ext::cpu
