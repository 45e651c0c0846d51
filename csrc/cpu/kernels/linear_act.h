// Vectorized row kernels of the fused dense layer: the forward epilogue (bias + activation,
// plus the relu bit mask or the saved pre-activation) and the backward prologue (activation
// gradient, accumulated into the bias gradient). Compiled once per instruction set; included
// only from csrc/cpu/capability/kernels_impl.h, inside namespace torch_ext::cpu::CPU_CAPABILITY.
// The formulas are those of csrc/activation.h (and of ATen's own activation kernels).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>

#include "activation.h"
#include "cpu/kernels/common.h"
#include "cpu/runtime/kernel_table.h"

namespace torch_ext::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
using Vec = Vectorized<T>;

// Bit j set where lane j of x passes the gradient: x > 0, and for relu also NaN (ATen's relu
// backward is `out <= 0 ? 0 : grad`, which lets NaN through; leaky_relu's is `x > 0 ? ...`).
template <typename T, bool kNanIsSet>
inline uint32_t mask_bits(const Vec<T>& x, int64_t lanes) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), kNanIsSet ? _CMP_NLE_UQ : _CMP_GT_OQ) & ((1u << lanes) - 1u);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), kNanIsSet ? _CMP_NLE_UQ : _CMP_GT_OQ)) &
           ((1u << lanes) - 1u);
  }
#endif
  __at_align__ T values[Vec<T>::size()];
  x.store(values);
  uint32_t bits = 0;
  for (int64_t j = 0; j < lanes; ++j) {
    const bool set = kNanIsSet ? !(values[j] <= T(0)) : values[j] > T(0);
    bits |= uint32_t(set) << j;
  }
  return bits;
}

// Lane j = (bit j of bits) ? if_set : if_clear.
template <typename T>
inline Vec<T> select_by_bits(uint32_t bits, const Vec<T>& if_set, const Vec<T>& if_clear) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_mask_blend_ps(static_cast<__mmask16>(bits), if_clear, if_set);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane_bit), lane_bit);
    return _mm256_blendv_ps(if_clear, if_set, _mm256_castsi256_ps(set));
  }
#endif
  __at_align__ T a[Vec<T>::size()];
  __at_align__ T b[Vec<T>::size()];
  if_set.store(a);
  if_clear.store(b);
  for (int64_t j = 0; j < Vec<T>::size(); ++j) a[j] = ((bits >> j) & 1u) ? a[j] : b[j];
  return Vec<T>::loadu(a);
}

// 1 / d for float d >= 1: the reciprocal estimate refined by one Newton step (error ~1e-7
// relative, float's own rounding) rather than a division, whose throughput on AVX-512 bounded the
// erf below.
inline Vec<float> reciprocal_of_at_least_one(const Vec<float>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vec<float> r(_mm512_rcp14_ps(d));
#elif defined(CPU_CAPABILITY_AVX2)
  const Vec<float> r(_mm256_rcp_ps(d));
#else
  const Vec<float> r = Vec<float>(1.0f) / d;
#endif
  return r * (Vec<float>(2.0f) - d * r);
}

// The normal CDF Phi(x) and the exponential e = exp(-x^2 / 2) of the normal PDF, in float, for
// gelu and its gradient: Phi from erf's Abramowitz-Stegun 7.1.26 form (ATen's vectorized erf's),
// 1 - erf(z) = t P(t) exp(-z^2) with z = |x| / sqrt(2), t = 1 / (1 + p z), whose exp(-z^2) is e
// itself, so the backward takes one exponential for both (ATen's erf and pdf take two, on Sleef's
// exp, and a division): Phi = q for x < 0, 1 - q for x >= 0, q = t P(t) e / 2. The exponential is
// fast_exp (common.h; 0 for x^2 / 2 past 87, so t's argument is bounded to keep 0 * t finite);
// NaN stays NaN.
inline Vec<float> gelu_cdf(const Vec<float>& x, Vec<float>& e) {
  using V = Vec<float>;
  e = fast_exp(V(-0.5f) * x * x);
  const V z = at::vec::minimum(x.abs(), V(16.0f)) * V(float(kSqrt1_2));
  const V t = reciprocal_of_at_least_one(at::vec::fmadd(V(0.3275911f), z, V(1.0f)));
  V poly = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
  poly = at::vec::fmadd(poly, t, V(1.421413741f));
  poly = at::vec::fmadd(poly, t, V(-0.284496736f));
  poly = at::vec::fmadd(poly, t, V(0.254829592f));
  const V q = V(0.5f) * poly * t * e;
  return V::blendv(V::blendv(q, V(1.0f) - q, x >= V(0.0f)), x, x != x);  // NaN stays NaN
}

// sigmoid(z) = 1 / (1 + exp(-z)) in float from fast_exp and the refined reciprocal above, rather than
// Sleef's exp call and a division (silu, sigmoid, quick_gelu, gelu_tanh): exactly 0 below z = -87,
// where exp(-z) nears float's range and the reciprocal would be subnormal; NaN stays NaN.
inline Vec<float> sigmoid_of(const Vec<float>& z) {
  using V = Vec<float>;
  const V s = reciprocal_of_at_least_one(V(1.0f) + fast_exp(z.neg()));
  return V::blendv(V::blendv(s, V(0.0f), z < V(-87.0f)), z, z != z);
}

template <Activation A, typename T>
inline Vec<T> act_forward(const Vec<T>& x, const Vec<T>& slope) {
  const Vec<T> one(T(1));
  const Vec<T> half(T(0.5));
  if constexpr (A == Activation::None) {
    return x;
  } else if constexpr (A == Activation::Relu) {
    return at::vec::maximum(x, Vec<T>(T(0)));  // NaN-propagating, as F.relu
  } else if constexpr (A == Activation::LeakyRelu) {
    return Vec<T>::blendv(x * slope, x, x > Vec<T>(T(0)));
  } else if constexpr (A == Activation::Gelu) {
    if constexpr (std::is_same_v<T, float>) {
      Vec<T> e;
      return x * gelu_cdf(x, e);
    }
    return x * half * (one + (x * Vec<T>(T(kSqrt1_2))).erf());
  } else if constexpr (A == Activation::GeluTanh) {
    // x * sigmoid(2u), the same function as 0.5 x (1 + tanh(u)); see csrc/activation.h.
    // Float through sigmoid_of; otherwise fast_exp (exp_u20 off AVX-512) rather than Sleef's 1-ulp
    // exp: it made the backward prologue markedly faster; within float32 tolerance of F.gelu.
    const Vec<T> inner = Vec<T>(T(kGeluTanhBeta)) * (x + Vec<T>(T(kGeluTanhKappa)) * x * x * x);
    if constexpr (std::is_same_v<T, float>) return x * sigmoid_of(Vec<T>(T(2)) * inner);
    return x / (one + fast_exp(Vec<T>(T(-2)) * inner));
  } else if constexpr (A == Activation::Silu) {
    if constexpr (std::is_same_v<T, float>) return x * sigmoid_of(x);
    return x / (one + x.neg().exp());
  } else if constexpr (A == Activation::Sigmoid) {
    if constexpr (std::is_same_v<T, float>) return sigmoid_of(x);
    return one / (one + x.neg().exp());
  } else if constexpr (A == Activation::QuickGelu) {
    if constexpr (std::is_same_v<T, float>) return x * sigmoid_of(Vec<T>(T(kQuickGeluScale)) * x);
    return x / (one + (Vec<T>(T(-kQuickGeluScale)) * x).exp());
  } else {
    return x.tanh();
  }
}

// grad_out * act'(.) for the activations that save the pre-activation or the output.
template <Activation A, typename T>
inline Vec<T> act_backward(const Vec<T>& g, const Vec<T>& saved) {
  const Vec<T> one(T(1));
  const Vec<T> half(T(0.5));
  auto sigmoid = [&](const Vec<T>& z) {
    if constexpr (std::is_same_v<T, float>) {
      return sigmoid_of(z);
    } else {
      return one / (one + z.neg().exp());
    }
  };
  if constexpr (A == Activation::Gelu) {
    const Vec<T>& x = saved;
    if constexpr (std::is_same_v<T, float>) {
      Vec<T> e;
      const Vec<T> cdf = gelu_cdf(x, e);
      return g * (cdf + x * e * Vec<T>(T(kInvSqrt2Pi)));
    }
    const Vec<T> cdf = half * (one + (x * Vec<T>(T(kSqrt1_2))).erf());
    const Vec<T> pdf = (Vec<T>(T(-0.5)) * x * x).exp() * Vec<T>(T(kInvSqrt2Pi));
    return g * (cdf + x * pdf);
  } else if constexpr (A == Activation::GeluTanh) {
    const Vec<T>& x = saved;
    const Vec<T> x_sq = x * x;
    const Vec<T> inner = Vec<T>(T(kGeluTanhBeta)) * (x + Vec<T>(T(kGeluTanhKappa)) * x_sq * x);
    const Vec<T> s = sigmoid(Vec<T>(T(2)) * inner);
    const Vec<T> du = Vec<T>(T(kGeluTanhBeta)) * (one + Vec<T>(T(3 * kGeluTanhKappa)) * x_sq);
    return g * (s + Vec<T>(T(2)) * x * s * (one - s) * du);
  } else if constexpr (A == Activation::Silu) {
    const Vec<T>& x = saved;
    const Vec<T> s = sigmoid(x);
    return g * (s * (one + x * (one - s)));
  } else if constexpr (A == Activation::QuickGelu) {
    const Vec<T>& x = saved;
    const Vec<T> k = Vec<T>(T(kQuickGeluScale));
    const Vec<T> s = sigmoid(k * x);
    return g * (s * (one + k * x * (one - s)));
  } else if constexpr (A == Activation::Sigmoid) {
    return g * (one - saved) * saved;  // saved = output
  } else if constexpr (A == Activation::Tanh) {
    return g * (one - saved * saved);  // saved = output
  } else {
    return g;
  }
}

// One contiguous segment of a row, in the math type T (float or double). The segment starts
// at a multiple of 8 columns, so its mask bits start on a byte boundary.
template <Activation A, typename T>
inline void forward_segment(int64_t len, const T* gemm, const T* bias, T* pre_out, T* out, uint8_t* mask, T slope) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V slope_v(slope);
  // Whole mask bytes come straight from the vector compare when a vector holds 8k lanes.
  constexpr bool kBytewiseMask = (W % 8) == 0;
  if (mask != nullptr && !kBytewiseMask) std::memset(mask, 0, (len + 7) / 8);
  for (int64_t i = 0; i < len; i += W) {
    const int64_t lanes = std::min<int64_t>(W, len - i);
    V x = V::loadu(gemm + i, lanes);
    if (bias != nullptr) x = x + V::loadu(bias + i, lanes);
    if (pre_out != nullptr) x.store(pre_out + i, lanes);
    if (mask != nullptr) {
      const uint32_t bits = mask_bits<T, A == Activation::Relu>(x, lanes);
      if constexpr (kBytewiseMask) {
        for (int64_t b = 0; b < (lanes + 7) / 8; ++b) mask[i / 8 + b] = uint8_t(bits >> (8 * b));
      } else {
        for (int64_t j = 0; j < lanes; ++j) mask[(i + j) / 8] |= uint8_t(((bits >> j) & 1u) << ((i + j) % 8));
      }
    }
    act_forward<A, T>(x, slope_v).store(out + i, lanes);
  }
}

template <Activation A, typename T, typename Acc>
inline void backward_segment(int64_t len, const T* g, const T* saved, const uint8_t* mask, T* grad_pre, Acc* bias_grad,
                             T slope) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V zero(T(0));
  const V slope_v(slope);
  for (int64_t i = 0; i < len; i += W) {
    const int64_t lanes = std::min<int64_t>(W, len - i);
    const V gv = V::loadu(g + i, lanes);
    V r;
    if constexpr (A == Activation::Relu || A == Activation::LeakyRelu) {
      uint32_t bits = 0;
      if constexpr (W % 8 == 0) {
        for (int64_t j = 0; j < lanes; j += 8) bits |= uint32_t(mask[(i + j) / 8]) << j;
      } else {
        for (int64_t j = 0; j < lanes; ++j) bits |= uint32_t((mask[(i + j) / 8] >> ((i + j) % 8)) & 1u) << j;
      }
      // Selected, not multiplied: a 0 (relu) stays 0 where grad_out is inf or NaN, as in ATen.
      r = select_by_bits<T>(bits, gv, A == Activation::Relu ? zero : gv * slope_v);
    } else if constexpr (A == Activation::None) {
      r = gv;
    } else {
      r = act_backward<A, T>(gv, V::loadu(saved + i, lanes));
    }
    r.store(grad_pre + i, lanes);
    if (bias_grad != nullptr) (V::loadu(bias_grad + i, lanes) + r).store(bias_grad + i, lanes);
  }
}

// bfloat16 rows are processed in float, a segment of kSegment columns at a time on the stack.
constexpr int64_t kSegment = 1024;

template <Activation A, typename S, typename T>
void forward_rows(const LinearActForwardRows<S>& a, T slope) {
  for (int64_t r = 0; r < a.rows; ++r) {
    S* gemm = a.gemm + r * a.ld_gemm;
    S* out = a.out + r * a.ld_out;
    uint8_t* mask = a.mask ? a.mask + r * a.ld_mask : nullptr;
    if constexpr (std::is_same_v<S, T>) {
      forward_segment<A, T>(a.n, gemm, a.bias, a.pre_out ? gemm : nullptr, out, mask, slope);
    } else {
      T x[kSegment], b[kSegment], y[kSegment];
      for (int64_t c = 0; c < a.n; c += kSegment) {
        const int64_t len = std::min(kSegment, a.n - c);
        convert_values(gemm + c, x, len);
        if (a.bias) convert_values(a.bias + c, b, len);
        if (a.bias && a.pre_out) {
          // The activation of the pre-activation as saved (rounded to S), so that backward's
          // derivative and FusedMLP's recomputed output see the value the forward used.
          for (int64_t i = 0; i < len; ++i) x[i] = T(S(x[i] + b[i]));
          forward_segment<A, T>(len, x, nullptr, nullptr, y, mask ? mask + c / 8 : nullptr, slope);
          convert_values(x, gemm + c, len);
        } else {  // the pre-activation, if saved, is the GEMM's output as it stands
          forward_segment<A, T>(len, x, a.bias ? b : nullptr, nullptr, y, mask ? mask + c / 8 : nullptr, slope);
        }
        convert_values(y, out + c, len);
      }
    }
  }
}

template <Activation A, typename S, typename T>
void backward_rows(const LinearActBackwardRows<S>& a, T slope) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const S* g = a.grad_out + r * a.ld_grad_out;
    const S* saved = a.saved ? a.saved + r * a.ld_saved : nullptr;
    const uint8_t* mask = a.mask ? a.mask + r * a.ld_mask : nullptr;
    S* grad_pre = a.grad_pre + r * a.ld_grad_pre;
    if constexpr (std::is_same_v<S, T>) {
      backward_segment<A, T>(a.n, g, saved, mask, grad_pre, a.bias_grad, slope);
    } else {
      T gx[kSegment], sx[kSegment], rx[kSegment];
      for (int64_t c = 0; c < a.n; c += kSegment) {
        const int64_t len = std::min(kSegment, a.n - c);
        convert_values(g + c, gx, len);
        if (saved) convert_values(saved + c, sx, len);
        backward_segment<A, T>(len, gx, saved ? sx : nullptr, mask ? mask + c / 8 : nullptr, rx,
                               a.bias_grad ? a.bias_grad + c : nullptr, slope);
        convert_values(rx, grad_pre + c, len);
      }
    }
  }
}

// Activation is a template parameter of the loops above; pick the instance once per call.
template <typename S, typename T>
void linear_act_forward(Activation act, T slope, const LinearActForwardRows<S>& a) {
  with_activation(act, [&](auto A) { forward_rows<decltype(A)::value, S, T>(a, slope); });
}

template <typename S, typename T>
void linear_act_backward(Activation act, T slope, const LinearActBackwardRows<S>& a) {
  with_activation(act, [&](auto A) { backward_rows<decltype(A)::value, S, T>(a, slope); });
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
