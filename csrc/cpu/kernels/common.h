// Small helpers shared by the vectorized kernel headers of csrc/cpu/kernels/. Included only from
// them, inside namespace torch_ext::cpu::CPU_CAPABILITY (compiled once per instruction set).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace torch_ext::cpu::CPU_CAPABILITY {

// n elements from x as math-type A values: x itself when S is A, else converted into `buffer`
// (bfloat16 rows are processed in float a block at a time).
template <typename S, typename A>
inline const A* as_math(const S* x, int64_t n, A* buffer) {
  if constexpr (std::is_same_v<S, A>) {
    return x;
  } else {
    at::vec::convert(x, buffer, n);
    return buffer;
  }
}

// The sum of the lanes of v.
template <typename A>
inline A reduce_sum(const at::vec::Vectorized<A>& v) {
  __at_align__ A lanes[at::vec::Vectorized<A>::size()];
  v.store(lanes);
  A s = 0;
  for (int64_t j = 0; j < at::vec::Vectorized<A>::size(); ++j) s += lanes[j];
  return s;
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
