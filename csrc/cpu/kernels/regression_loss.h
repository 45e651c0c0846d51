// Vectorized elementwise regression losses (mse, huber, smooth_l1): forward (per-element loss,
// or per-block sums; given grad_input / grad_target, the gradients for `scale` in the same pass)
// and backward (input and target gradients in one pass). Compiled once per
// instruction set; included only from csrc/cpu/capability/kernels_impl.h, inside namespace
// torch_ext::cpu::CPU_CAPABILITY. With d = input - target and an optional elementwise weight w:
//   mse      : d^2                                      grad  2 d
//   huber    : |d| < delta ? d^2 / 2 : delta (|d| - delta / 2)   grad  clamp(d, -delta, delta)
//   smooth_l1: |d| < beta ? d^2 / (2 beta) : |d| - beta / 2       grad  clamp(d / beta, -1, 1)
//              (beta == 0: |d|, grad sgn(d), 0 at d == 0 and d == NaN, as l1_loss)
// each times w; the target gradient is minus the input gradient. These are ATen's formulas
// (including which side of the boundary takes which branch).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "cpu/kernels/common.h"
#include "cpu/runtime/kernel_table.h"

namespace torch_ext::cpu::CPU_CAPABILITY {
namespace regression_loss_impl {

using at::vec::Vectorized;

// Elements converted to float at a time for bfloat16.
constexpr int64_t kChunk = 1024;

template <RegressionLoss K, typename A>
inline Vectorized<A> loss_of(const Vectorized<A>& d, A param) {
  using V = Vectorized<A>;
  if constexpr (K == RegressionLoss::Mse) {
    return d * d;
  } else {
    const V z = d.abs(), half(A(0.5)), p(param);
    if constexpr (K == RegressionLoss::Huber) {
      return V::blendv(p * (z - half * p), half * z * z, z < p);
    } else {
      if (param == 0) return z;
      return V::blendv(z - half * p, half * z * z / p, z < p);
    }
  }
}

// d(loss)/d(input) (before the weight and the incoming gradient).
template <RegressionLoss K, typename A>
inline Vectorized<A> grad_of(const Vectorized<A>& d, A param) {
  using V = Vectorized<A>;
  if constexpr (K == RegressionLoss::Mse) {
    return V(A(2)) * d;
  } else if constexpr (K == RegressionLoss::Huber) {
    const V p(param);
    // x < -delta ? -delta : (x > delta ? delta : x): NaN stays NaN.
    return V::blendv(V::blendv(d, p, d > p), p.neg(), d < p.neg());
  } else {
    const V one(A(1));
    if (param == 0) {  // l1_loss: sgn(d), which is 0 at 0 and at NaN
      return V::blendv(V::blendv(V(A(0)), one, d > V(A(0))), one.neg(), d < V(A(0)));
    }
    const V p(param);
    return V::blendv(V::blendv(d / p, one, d > p), one.neg(), d < p.neg());
  }
}

// The forward over [first, last) of a block with no weight and no per-element loss (the mean and
// sum reductions), in whole vectors of S straight from memory and back: bfloat16 and float16
// widened and narrowed in registers rather than through float buffers, and no per-vector test
// (the buffered loop below made the 16-bit step arithmetic-bound; docs/cpu.md). Adds each
// vector's loss to loss_sum in that loop's order and forms the gradients (for `scale`) with the
// same products, so the bits are the same; returns where it stopped (the rest, less than one
// vector, is left to that loop).
template <RegressionLoss K, typename S>
inline int64_t unweighted_vectors(const RegressionLossArgs<S>& a, int64_t first, int64_t last,
                                  Vectorized<acc_t<S>>& loss_sum) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  const V scale(a.scale);
  int64_t i = first;
  if constexpr (std::is_same_v<S, A>) {
    constexpr int64_t L = V::size();
    for (; i + L <= last; i += L) {
      const V d = V::loadu(a.input + i) - V::loadu(a.target + i);
      loss_sum += loss_of<K, A>(d, a.param);
      if (a.grad_input == nullptr && a.grad_target == nullptr) continue;
      const V r = grad_of<K, A>(d, a.param) * scale;
      if (a.grad_input != nullptr) r.store(a.grad_input + i);
      if (a.grad_target != nullptr) r.neg().store(a.grad_target + i);
    }
  } else {
    using VS = Vectorized<S>;
    constexpr int64_t L = VS::size();  // two float vectors
    for (; i + L <= last; i += L) {
      const auto [x0, x1] = at::vec::convert_to_float<S>(VS::loadu(a.input + i));
      const auto [t0, t1] = at::vec::convert_to_float<S>(VS::loadu(a.target + i));
      const V d0 = x0 - t0, d1 = x1 - t1;
      loss_sum += loss_of<K, A>(d0, a.param);
      loss_sum += loss_of<K, A>(d1, a.param);
      if (a.grad_input == nullptr && a.grad_target == nullptr) continue;
      const V r0 = grad_of<K, A>(d0, a.param) * scale, r1 = grad_of<K, A>(d1, a.param) * scale;
      if (a.grad_input != nullptr) at::vec::convert_from_float<S>(r0, r1).store(a.grad_input + i);
      if (a.grad_target != nullptr) at::vec::convert_from_float<S>(r0.neg(), r1.neg()).store(a.grad_target + i);
    }
  }
  return i;
}

template <RegressionLoss K, typename S>
void forward(const RegressionLossArgs<S>& a) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t blocks = (a.numel + a.block - 1) / a.block;
  // Given grad_input / grad_target, the forward also writes the gradients for `scale`
  // (regression_loss_fwd's grad_mask): the same products as backward's, so the same bits.
  const bool grads = a.grad_input != nullptr || a.grad_target != nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    __at_align__ A xb[kChunk], tb[kChunk], wb[kChunk], ob[kChunk], ib[kChunk], jb[kChunk];
    const V scale(a.scale);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * a.block, last = std::min(a.numel, first + a.block);
      V loss_sum(0), weight_sum(0);
      int64_t c = first;
      if (a.weight == nullptr && a.out == nullptr && a.out_acc == nullptr)
        c = unweighted_vectors<K, S>(a, first, last, loss_sum);
      for (; c < last; c += kChunk) {
        const int64_t n = std::min(kChunk, last - c);
        const A* x = as_math<S, A>(a.input + c, n, xb);
        const A* t = as_math<S, A>(a.target + c, n, tb);
        const A* w = a.weight ? as_math<S, A>(a.weight + c, n, wb) : nullptr;
        A* o = nullptr;
        if (a.out_acc != nullptr) {
          o = a.out_acc + c;
        } else if (a.out != nullptr) {
          if constexpr (std::is_same_v<S, A>)
            o = a.out + c;
          else
            o = ob;
        }
        A* gi = ib;
        A* gt = jb;
        if constexpr (std::is_same_v<S, A>) {
          gi = a.grad_input ? a.grad_input + c : nullptr;
          gt = a.grad_target ? a.grad_target + c : nullptr;
        }
        for (int64_t i = 0; i < n; i += L) {
          const int64_t k = std::min(L, n - i);
          const V d = V::loadu(x + i, k) - V::loadu(t + i, k);
          V l = loss_of<K, A>(d, a.param);
          if (w != nullptr) {
            const V wv = V::loadu(w + i, k);
            l = l * wv;
            weight_sum += wv;  // lanes past k loaded as 0
          }
          if (o != nullptr) {
            l.store(o + i, k);
          } else {
            loss_sum += V::set(V(0), l, k);
          }
          if (grads) {
            V r = grad_of<K, A>(d, a.param) * scale;
            if (w != nullptr) r = r * V::loadu(w + i, k);
            if (a.grad_input != nullptr) r.store(gi + i, k);
            if (a.grad_target != nullptr) r.neg().store(gt + i, k);
          }
        }
        if constexpr (!std::is_same_v<S, A>) {
          if (a.out != nullptr) convert_values(ob, a.out + c, n);
          if (a.grad_input != nullptr) convert_values(ib, a.grad_input + c, n);
          if (a.grad_target != nullptr) convert_values(jb, a.grad_target + c, n);
        }
      }
      if (a.loss_partials != nullptr) a.loss_partials[b] = reduce_sum(loss_sum);
      if (a.weight_partials != nullptr) a.weight_partials[b] = reduce_sum(weight_sum);
    }
  });
}

template <RegressionLoss K, typename S>
void backward(const RegressionLossArgs<S>& a) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t grain = 16384;
  at::parallel_for(0, a.numel, grain, [&](int64_t begin, int64_t end) {
    __at_align__ A xb[kChunk], tb[kChunk], wb[kChunk], gb[kChunk], ib[kChunk], jb[kChunk];
    const V scale(a.scale);
    for (int64_t c = begin; c < end; c += kChunk) {
      const int64_t n = std::min(kChunk, end - c);
      const A* x = as_math<S, A>(a.input + c, n, xb);
      const A* t = as_math<S, A>(a.target + c, n, tb);
      const A* w = a.weight ? as_math<S, A>(a.weight + c, n, wb) : nullptr;
      const A* g = a.grad_loss_acc ? a.grad_loss_acc + c
                   : a.grad_loss   ? as_math<S, A>(a.grad_loss + c, n, gb)
                                   : nullptr;
      A* gi = ib;
      A* gt = jb;
      if constexpr (std::is_same_v<S, A>) {
        gi = a.grad_input ? a.grad_input + c : nullptr;
        gt = a.grad_target ? a.grad_target + c : nullptr;
      }
      for (int64_t i = 0; i < n; i += L) {
        const int64_t k = std::min(L, n - i);
        V r = grad_of<K, A>(V::loadu(x + i, k) - V::loadu(t + i, k), a.param);
        r = r * (g != nullptr ? V::loadu(g + i, k) : scale);
        if (w != nullptr) r = r * V::loadu(w + i, k);
        if (a.grad_input != nullptr) r.store(gi + i, k);
        if (a.grad_target != nullptr) r.neg().store(gt + i, k);
      }
      if constexpr (!std::is_same_v<S, A>) {
        if (a.grad_input != nullptr) convert_values(ib, a.grad_input + c, n);
        if (a.grad_target != nullptr) convert_values(jb, a.grad_target + c, n);
      }
    }
  });
}

}  // namespace regression_loss_impl

template <typename S>
void regression_loss_forward(const RegressionLossArgs<S>& a) {
  using namespace regression_loss_impl;
  switch (a.loss) {
    case RegressionLoss::Mse: return forward<RegressionLoss::Mse, S>(a);
    case RegressionLoss::Huber: return forward<RegressionLoss::Huber, S>(a);
    case RegressionLoss::SmoothL1: return forward<RegressionLoss::SmoothL1, S>(a);
  }
}

template <typename S>
void regression_loss_backward(const RegressionLossArgs<S>& a) {
  using namespace regression_loss_impl;
  switch (a.loss) {
    case RegressionLoss::Mse: return backward<RegressionLoss::Mse, S>(a);
    case RegressionLoss::Huber: return backward<RegressionLoss::Huber, S>(a);
    case RegressionLoss::SmoothL1: return backward<RegressionLoss::SmoothL1, S>(a);
  }
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
