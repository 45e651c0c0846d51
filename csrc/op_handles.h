// Typed dispatcher handles of the torch_ext ops that C++ code calls from more than one file, one
// definition each (an inline function's static is shared by every file that includes it).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace torch_ext {

// torch_ext::cross_entropy_fwd (schema in csrc/ops.cpp): -> (loss, stats, grad_input, grad_target).
inline const auto& cross_entropy_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torch_ext::cross_entropy_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, c10::string_view, double,
              double, std::array<bool, 2>, double, bool, std::optional<at::ScalarType>)>();
  return op;
}

}  // namespace torch_ext
