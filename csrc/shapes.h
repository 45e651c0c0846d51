// Shape helpers shared by the ops over (*, features) inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <vector>

namespace torch_ext {

// The number of rows of input viewed as (rows, input.size(-1)); right for zero-size dims too,
// where reshape(-1, n) cannot infer the row count.
inline int64_t leading_rows(const at::Tensor& input) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < input.dim(); ++d) m *= input.size(d);
  return m;
}

// input's sizes with the last one replaced by `last`.
inline std::vector<int64_t> with_last_dim(const at::Tensor& input, int64_t last) {
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = last;
  return sizes;
}

}  // namespace torch_ext
