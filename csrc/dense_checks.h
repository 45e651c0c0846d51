// The argument checks of the dense-layer ops (linear_act, mlp_act), shared by their CPU and CUDA
// files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

#include "activation.h"
#include "allocation.h"
#include "checks.h"
#include "shapes.h"

namespace torch_ext {

inline void check_linear_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ", weight.sizes());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have shape (*, in_features), got a 0-D tensor");
  TORCH_CHECK(input.size(-1) == weight.size(1), op, ": input.size(-1) is ", input.size(-1),
              " but weight.size(1) (in_features) is ", weight.size(1), "; they must be equal");
  check_same_device(op, input, "input", weight, "weight");
  check_same_dtype(op, input, "input", weight, "weight");
  check_floating(op, input, "input");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (out_features,) = (",
                weight.size(0), ",), got ", bias->sizes());
    check_same_device(op, input, "input", *bias, "bias");
    check_same_dtype(op, input, "input", *bias, "bias");
  }
}

// linear_act_bwd's `saved` as the kernels read it: (mask (m, ceil(n/8)), undefined) for
// relu/leaky_relu, (undefined, pre-activation or output (m, n)) for the others that save one.
inline std::pair<at::Tensor, at::Tensor> saved_for_linear_act_bwd(const char* op, Activation act,
                                                                  const at::Tensor& saved, const at::Tensor& input,
                                                                  const at::Tensor& grad_output, int64_t m, int64_t n) {
  check_same_device(op, input, "input", saved, "saved");
  at::Tensor mask2d, saved2d;
  switch (saved_for_backward(act)) {
    case SavedForBackward::PositiveMask:
      TORCH_CHECK(saved.scalar_type() == at::kByte && saved.numel() == m * ((n + 7) / 8), op,
                  ": saved must be the uint8 mask of shape (*, ", (n + 7) / 8, ") from linear_act_fwd, got ",
                  saved.scalar_type(), " of shape ", saved.sizes());
      mask2d = saved.reshape({m, (n + 7) / 8}).contiguous();
      break;
    case SavedForBackward::Output:
    case SavedForBackward::PreActivation:
      TORCH_CHECK(saved.sizes() == grad_output.sizes(), op, ": saved must have shape ", grad_output.sizes(), " (the ",
                  saved_for_backward(act) == SavedForBackward::Output ? "output" : "pre-activation",
                  " from linear_act_fwd), got ", saved.sizes());
      check_same_dtype(op, input, "input", saved, "saved");
      saved2d = saved.reshape({m, n}).contiguous();
      break;
    default: break;
  }
  return {mask2d, saved2d};
}

// Where linear_act_bwd forms grad_output * act'(pre): in a tensor the op holds alone (held_alone:
// no caller can see the write), grad_output first (the C++ autograd node moves the engine's
// gradient in; FusedMLP's backward passes a temporary of its own), else the saved pre-activation
// (the node hands it over when the graph is not retained); else (None) in a buffer of its own.
// That saves an (m, n) buffer at the step's peak, where eager PyTorch has freed grad_output, or its
// saved pre-activation, by the time its GEMMs run. Call it before any view adds a reference.
enum class GradPreIn { None, GradOutput, Saved };
inline GradPreIn grad_pre_in(Activation act, const at::Tensor& grad_output, const at::Tensor& saved, int64_t m,
                             int64_t n) {
  if (m == 0 || n == 0) return GradPreIn::None;
  if (held_alone(grad_output)) return GradPreIn::GradOutput;
  if (saved_for_backward(act) == SavedForBackward::PreActivation && held_alone(saved)) return GradPreIn::Saved;
  return GradPreIn::None;
}

// Output columns of the MLP activation over `input`: its width, or half of it when gated.
inline int64_t mlp_act_output_width(const char* op, const at::Tensor& input, bool gated) {
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension, got a 0-D tensor");
  const int64_t width = input.size(-1);
  TORCH_CHECK(!gated || width % 2 == 0, op,
              ": a gated activation needs an even input.size(-1) "
              "(the gate half, then the value half), got ",
              width);
  return gated ? width / 2 : width;
}

}  // namespace torch_ext
