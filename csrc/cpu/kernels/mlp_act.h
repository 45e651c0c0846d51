// Vectorized row kernels of the MLP activation: act(x), or its gated form act(u) * v (swiglu,
// geglu, ...) where each input row is [u | v]. The backward pass also rewrites the activation's
// output when asked, so FusedMLP can recompute it instead of saving it. Compiled once per
// instruction set; included only from csrc/cpu/capability/kernels_impl.h. The formulas are
// those of the dense layer's kernels (act_forward / act_backward in linear_act.h).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>

#include "activation.h"
#include "cpu/kernels/common.h"
#include "cpu/kernels/linear_act.h"
#include "cpu/runtime/kernel_table.h"

namespace torch_ext::cpu::CPU_CAPABILITY {

// act(x) and g * act'(x) on one vector, with ATen's conventions at the kinks and for NaN:
// relu passes the gradient where x is NaN (its backward tests the output, `out <= 0`),
// leaky_relu takes the slope there (`x > 0 ? g : g * slope`).
template <Activation A, typename T>
inline void act_value_and_grad(const Vec<T>& x, const Vec<T>& g, const Vec<T>& slope, Vec<T>& value, Vec<T>& grad) {
  const Vec<T> zero(T(0));
  value = act_forward<A, T>(x, slope);
  if constexpr (A == Activation::Relu) {
    grad = Vec<T>::blendv(g, zero, x <= zero);
  } else if constexpr (A == Activation::LeakyRelu) {
    grad = Vec<T>::blendv(g * slope, g, x > zero);
  } else if constexpr (A == Activation::Sigmoid || A == Activation::Tanh) {
    grad = act_backward<A, T>(g, value);  // their derivative is a function of the output
  } else {
    grad = act_backward<A, T>(g, x);  // none, gelu, gelu_tanh, silu, quick_gelu
  }
}

// One contiguous segment of a row in the math type T. u: the activation's input; v: the gate's
// value half (gated only, else nullptr).
template <Activation A, typename T>
inline void mlp_act_forward_segment(int64_t len, const T* u, const T* v, T* out, T slope) {
  using V = Vec<T>;
  const V slope_v(slope);
  for (int64_t i = 0; i < len; i += V::size()) {
    const int64_t lanes = std::min<int64_t>(V::size(), len - i);
    V y = act_forward<A, T>(V::loadu(u + i, lanes), slope_v);
    if (v != nullptr) y = y * V::loadu(v + i, lanes);
    y.store(out + i, lanes);
  }
}

// grad_u = g * v * act'(u) and grad_v = g * act(u) (gated), or grad_u = g * act'(u); out (when
// not null) gets the forward output again.
template <Activation A, typename T>
inline void mlp_act_backward_segment(int64_t len, const T* g, const T* u, const T* v, T* grad_u, T* grad_v, T* out,
                                     T slope) {
  using V = Vec<T>;
  const V slope_v(slope);
  for (int64_t i = 0; i < len; i += V::size()) {
    const int64_t lanes = std::min<int64_t>(V::size(), len - i);
    const V gv = V::loadu(g + i, lanes);
    const V uv = V::loadu(u + i, lanes);
    V a, du;
    if (v != nullptr) {
      const V vv = V::loadu(v + i, lanes);
      act_value_and_grad<A, T>(uv, gv * vv, slope_v, a, du);
      if (grad_v != nullptr) (gv * a).store(grad_v + i, lanes);
      if (out != nullptr) (a * vv).store(out + i, lanes);
    } else {
      act_value_and_grad<A, T>(uv, gv, slope_v, a, du);
      if (out != nullptr) a.store(out + i, lanes);
    }
    if (grad_u != nullptr) du.store(grad_u + i, lanes);
  }
}

template <Activation A, typename S, typename T>
void mlp_act_forward_rows(const MlpActRows<S>& a, T slope) {
  const int64_t half = a.gated ? a.n : 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    const S* u = a.input + r * a.ld_input;
    const S* v = a.gated ? u + half : nullptr;
    S* out = a.out + r * a.ld_out;
    if constexpr (std::is_same_v<S, T>) {
      mlp_act_forward_segment<A, T>(a.n, u, v, out, slope);
    } else {
      T ut[kSegment], vt[kSegment], yt[kSegment];
      for (int64_t c = 0; c < a.n; c += kSegment) {
        const int64_t len = std::min(kSegment, a.n - c);
        convert_values(u + c, ut, len);
        if (v) convert_values(v + c, vt, len);
        mlp_act_forward_segment<A, T>(len, ut, v ? vt : nullptr, yt, slope);
        convert_values(yt, out + c, len);
      }
    }
  }
}

template <Activation A, typename S, typename T>
void mlp_act_backward_rows(const MlpActRows<S>& a, T slope) {
  const int64_t half = a.gated ? a.n : 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    const S* g = a.grad_out + r * a.ld_grad_out;
    const S* u = a.input + r * a.ld_input;
    const S* v = a.gated ? u + half : nullptr;
    S* grad_u = a.grad_input ? a.grad_input + r * a.ld_grad_input : nullptr;
    S* grad_v = grad_u && a.gated ? grad_u + half : nullptr;
    S* out = a.out ? a.out + r * a.ld_out : nullptr;
    if constexpr (std::is_same_v<S, T>) {
      mlp_act_backward_segment<A, T>(a.n, g, u, v, grad_u, grad_v, out, slope);
    } else {
      T gt[kSegment], ut[kSegment], vt[kSegment], gut[kSegment], gvt[kSegment], yt[kSegment];
      for (int64_t c = 0; c < a.n; c += kSegment) {
        const int64_t len = std::min(kSegment, a.n - c);
        convert_values(g + c, gt, len);
        convert_values(u + c, ut, len);
        if (v) convert_values(v + c, vt, len);
        mlp_act_backward_segment<A, T>(len, gt, ut, v ? vt : nullptr, grad_u ? gut : nullptr, grad_v ? gvt : nullptr,
                                       out ? yt : nullptr, slope);
        if (grad_u) convert_values(gut, grad_u + c, len);
        if (grad_v) convert_values(gvt, grad_v + c, len);
        if (out) convert_values(yt, out + c, len);
      }
    }
  }
}

// Activation is a template parameter of the loops above; pick the instance once per call.
template <typename S, typename T>
void mlp_act_forward(Activation act, T slope, const MlpActRows<S>& a) {
  with_activation(act, [&](auto A) { mlp_act_forward_rows<decltype(A)::value, S, T>(a, slope); });
}

template <typename S, typename T>
void mlp_act_backward(Activation act, T slope, const MlpActRows<S>& a) {
  with_activation(act, [&](auto A) { mlp_act_backward_rows<decltype(A)::value, S, T>(a, slope); });
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
