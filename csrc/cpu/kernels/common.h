// Small helpers shared by the vectorized kernel headers of csrc/cpu/kernels/. Included only from
// them, inside namespace torch_ext::cpu::CPU_CAPABILITY (compiled once per instruction set).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace torch_ext::cpu::CPU_CAPABILITY {

// Flush-to-zero on this thread for the guard's lifetime, the caller's setting restored after: a
// result below the normal range (|x| < 2^-126 in float) becomes 0 rather than subnormal. Intel CPUs
// form subnormal results in a microcode assist, ~100 times slower: a cross-entropy row of
// wide-ranging logits has many probabilities exp(x - lse) / N down there (4096 x 32000 logits of
// 30 * randn: 379 against 89 ms a step on one core). PyTorch's set_flush_denormal(True) sets it
// for the whole thread; kernels set it per parallel chunk, since the pool's threads do not inherit
// the caller's setting. x86-64 only (elsewhere nothing changes).
class FlushToZero {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushToZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | _MM_FLUSH_ZERO_ON); }
  ~FlushToZero() { _mm_setcsr(saved_); }
  FlushToZero(const FlushToZero&) = delete;
  FlushToZero& operator=(const FlushToZero&) = delete;

 private:
  unsigned int saved_;
#else
  FlushToZero() {}
#endif
};

// dst[i] = src[i] for n elements, converting the type. bfloat16 / float16 -> float is
// vectorized here: ATen's at::vec::convert has no vector path for it (one scalar conversion per
// element, which made bfloat16 epilogues several times slower than ATen's own bfloat16 kernels),
// while it has one for float -> bfloat16 and float16.
template <typename S, typename D>
inline void convert_values(const S* src, D* dst, int64_t n) {
  if constexpr (at::is_reduced_floating_point_v<S> && std::is_same_v<D, float>) {
    using VB = at::vec::Vectorized<S>;
    constexpr int64_t kFloats = at::vec::Vectorized<float>::size();
    int64_t i = 0;
    for (; i + VB::size() <= n; i += VB::size()) {
      const auto [lo, hi] = at::vec::convert_to_float<S>(VB::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + kFloats);
    }
    for (; i < n; ++i) dst[i] = float(src[i]);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// n elements from x as math-type A values: x itself when S is A, else converted into `buffer`
// (bfloat16 and float16 rows are processed in float a block at a time).
template <typename S, typename A>
inline const A* as_math(const S* x, int64_t n, A* buffer) {
  if constexpr (std::is_same_v<S, A>) {
    return x;
  } else {
    convert_values(x, buffer, n);
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
