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

// exp(x) on a vector in about half the instructions of ATen's exp_u20 on AVX-512, with its range
// (0 below ln(FLT_MIN) = -87.34, as exp_u20, and for NaN; inf above ln(FLT_MAX)) and a smaller error
// (at most 2.7 ulp against exp_u20's 6.6, every 7th float of [-86.5, 88.7] against double): 2^n exp(r),
// n = round(x / ln 2), r = x - n ln 2 in two steps (ln 2 split so that n times its high part is
// exact), exp(r) by exp_u20's polynomial, and 2^n applied by vscalefps rather than by integer
// exponent arithmetic and clamping. The softmax loops are bound by their exponentials where
// memory is not the limit (one thread, bfloat16; Zen 4 runs a 512-bit instruction in two halves).
// Elsewhere (AVX2, the default build, double) exp_u20 itself.
template <typename A>
inline at::vec::Vectorized<A> fast_exp(const at::vec::Vectorized<A>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __mmask16 in_range = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
    const __m512 v = _mm512_min_ps(x, _mm512_set1_ps(89.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), v);  // ln 2's high part: exact times n
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);      // and its low part
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(0.00828929059f), _mm512_set1_ps(0.0418978221f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.166676521f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.499991506f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(0.999999701f));
    p = _mm512_fmadd_ps(r, p, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(in_range, p, n);
  }
#endif
  return x.exp_u20();
}

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
