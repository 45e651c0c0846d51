// Vectorized triplet margin loss: forward (the row distances and the loss per row, one read of
// the three inputs; optionally also the gradients for grad_output = 1, from cache) and backward
// (the requested gradients in one pass over the rows). Compiled once per instruction set; included only from
// csrc/cpu/capability/kernels_impl.h, inside namespace torch_ext::cpu::CPU_CAPABILITY.
//
// As torch.nn.functional.triplet_margin_loss: d(x, y) = ||x - y + eps||_p (pairwise_distance),
// d_neg = d(a, n), or min(d(a, n), d(p, n)) with swap; loss = max(margin + d(a, p) - d_neg, 0).
// The gradient of d(x, y) w.r.t. x is u = sign(v) |v|^(p-1) / d^(p-1) with v = x - y + eps
// (0 where v == 0 or d == 0, as ATen's norm backward), and -u w.r.t. y. clamp_min passes the
// gradient where its input is >= 0, and a tie of torch.minimum splits it in halves.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>

#include "cpu/kernels/common.h"
#include "cpu/runtime/kernel_table.h"

namespace torch_ext::cpu::CPU_CAPABILITY {
namespace triplet_impl {

using at::vec::Vectorized;

constexpr int64_t kChunk = 1024;  // elements of a bfloat16 row converted to float at a time

enum class Norm { L1, L2, General };

template <Norm N, typename A>
inline Vectorized<A> norm_term(const Vectorized<A>& v, const Vectorized<A>& p) {
  if constexpr (N == Norm::L1)
    return v.abs();
  else if constexpr (N == Norm::L2)
    return v * v;
  else
    return v.abs().pow(p);
}

template <Norm N, typename A>
inline A finish_norm(A sum, A p) {
  if constexpr (N == Norm::L1)
    return sum;
  else if constexpr (N == Norm::L2)
    return std::sqrt(sum);
  else
    return std::pow(sum, A(1) / p);
}

// u(v) = coef * sign(v) |v|^(p-1), coef = 1 / d^(p-1) (0 when d == 0).
template <Norm N, typename A>
inline Vectorized<A> norm_grad(const Vectorized<A>& v, const Vectorized<A>& coef, const Vectorized<A>& pm1) {
  using V = Vectorized<A>;
  const V zero(A(0));
  if constexpr (N == Norm::L1) {
    // sign(v): 0 at 0, NaN stays NaN
    return coef * V::blendv(V::blendv(v * zero, V(A(1)), v > zero), V(A(-1)), v < zero);
  } else if constexpr (N == Norm::L2) {
    return coef * v;
  } else {
    const V sign = V::blendv(V::blendv(v * zero, V(A(1)), v > zero), V(A(-1)), v < zero);
    return V::blendv(coef * sign * v.abs().pow(pm1), zero, v == zero);
  }
}

template <Norm N, typename S>
inline void backward_row(const TripletMarginArgs<S>& a, int64_t r, acc_t<S> d_ap, acc_t<S> d_an, acc_t<S> d_pn,
                         acc_t<S> g, const acc_t<S>* const* converted);

template <Norm N, typename S>
void forward(const TripletMarginArgs<S>& a) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t D = a.dim;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  const bool with_grads = a.grad_anchor || a.grad_positive || a.grad_negative;
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    __at_align__ A ab[kChunk], pb[kChunk], nb[kChunk];
    const V eps(a.eps), p(a.p);
    for (int64_t r = begin; r < end; ++r) {
      V s_ap(0), s_an(0), s_pn(0);
      for (int64_t c = 0; c < D; c += kChunk) {
        const int64_t n = std::min(kChunk, D - c);
        const A* x = as_math<S, A>(a.anchor + r * D + c, n, ab);
        const A* y = as_math<S, A>(a.positive + r * D + c, n, pb);
        const A* z = as_math<S, A>(a.negative + r * D + c, n, nb);
        for (int64_t i = 0; i < n; i += L) {
          const int64_t k = std::min(L, n - i);
          const V xv = V::loadu(x + i, k), yv = V::loadu(y + i, k), zv = V::loadu(z + i, k);
          s_ap += V::set(V(0), norm_term<N, A>(xv - yv + eps, p), k);
          s_an += V::set(V(0), norm_term<N, A>(xv - zv + eps, p), k);
          if (a.swap) s_pn += V::set(V(0), norm_term<N, A>(yv - zv + eps, p), k);
        }
      }
      const A d_ap = finish_norm<N, A>(reduce_sum(s_ap), a.p);
      const A d_an = finish_norm<N, A>(reduce_sum(s_an), a.p);
      const A d_pn = a.swap ? finish_norm<N, A>(reduce_sum(s_pn), a.p) : A(0);
      // torch.minimum, NaN-propagating
      const A d_neg = !a.swap ? d_an : (d_an != d_an || d_pn != d_pn) ? d_an + d_pn : std::min(d_an, d_pn);
      const A x = a.margin + d_ap - d_neg;
      a.row_loss[r] = x != x ? x : std::max(x, A(0));
      a.dist[3 * r] = d_ap;
      a.dist[3 * r + 1] = d_an;
      a.dist[3 * r + 2] = d_pn;
      // Gradients asked of the forward (grad_output = 1): the row is still in cache, and a
      // bfloat16 row of one chunk is still converted in the buffers.
      if (with_grads) {
        const A* const converted[3] = {ab, pb, nb};
        const bool reuse = !std::is_same_v<S, A> && D <= kChunk;
        backward_row<N, S>(a, r, d_ap, d_an, d_pn, a.scale, reuse ? converted : nullptr);
      }
    }
  });
}

// The gradients of row r, given its distances and its incoming gradient g, into the requested
// outputs. Inputs are read once more (from cache when called right after the forward sums);
// `converted`: the whole row's three inputs already in float (a bfloat16 row of at most kChunk
// elements the forward just converted), else nullptr.
template <Norm N, typename S>
inline void backward_row(const TripletMarginArgs<S>& a, int64_t r, acc_t<S> d_ap, acc_t<S> d_an, acc_t<S> d_pn,
                         acc_t<S> g, const acc_t<S>* const* converted) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t D = a.dim;
  const auto coef_of = [&](A d) -> A {
    if (d == 0) return A(0);
    if constexpr (N == Norm::L1)
      return A(1);
    else if constexpr (N == Norm::L2)
      return A(1) / d;
    else
      return A(1) / std::pow(d, a.p - A(1));
  };
  A w_an = 1, w_pn = 0;  // how d_neg depends on d(a, n) and d(p, n)
  if (a.swap) {
    if (d_pn < d_an) {
      w_an = 0;
      w_pn = 1;
    } else if (d_pn == d_an) {
      w_an = w_pn = A(0.5);
    }
  }
  const A d_neg = w_an * d_an + w_pn * d_pn;
  if (!(a.margin + d_ap - d_neg >= 0)) g = 0;  // clamp_min passes the gradient where x >= 0
  S* out_a = a.grad_anchor ? a.grad_anchor + r * D : nullptr;
  S* out_p = a.grad_positive ? a.grad_positive + r * D : nullptr;
  S* out_n = a.grad_negative ? a.grad_negative + r * D : nullptr;
  if (g == 0) {  // inactive triplet (or a zero incoming gradient): zero rows, as clamp_min
    if (out_a) std::fill(out_a, out_a + D, S(0));
    if (out_p) std::fill(out_p, out_p + D, S(0));
    if (out_n) std::fill(out_n, out_n + D, S(0));
    return;
  }
  __at_align__ A ab[kChunk], pb[kChunk], nb[kChunk], ga[kChunk], gp[kChunk], gn[kChunk];
  const V eps(a.eps), pm1(a.p - A(1));
  const V c_ap(g * coef_of(d_ap)), c_an(g * w_an * coef_of(d_an)), c_pn(g * w_pn * coef_of(d_pn));
  const bool use_pn = w_pn != 0;
  for (int64_t c = 0; c < D; c += kChunk) {
    const int64_t n = std::min(kChunk, D - c);
    const A* x = converted ? converted[0] : as_math<S, A>(a.anchor + r * D + c, n, ab);
    const A* y = converted ? converted[1] : as_math<S, A>(a.positive + r * D + c, n, pb);
    const A* z = converted ? converted[2] : as_math<S, A>(a.negative + r * D + c, n, nb);
    A *oa = ga, *op = gp, *on = gn;
    if constexpr (std::is_same_v<S, A>) {
      oa = out_a ? out_a + c : nullptr;
      op = out_p ? out_p + c : nullptr;
      on = out_n ? out_n + c : nullptr;
    }
    for (int64_t i = 0; i < n; i += L) {
      const int64_t k = std::min(L, n - i);
      const V xv = V::loadu(x + i, k), yv = V::loadu(y + i, k), zv = V::loadu(z + i, k);
      const V u_ap = norm_grad<N, A>(xv - yv + eps, c_ap, pm1);
      const V u_an = w_an != 0 ? norm_grad<N, A>(xv - zv + eps, c_an, pm1) : V(0);
      const V u_pn = use_pn ? norm_grad<N, A>(yv - zv + eps, c_pn, pm1) : V(0);
      if (out_a) (u_ap - u_an).store(oa + i, k);
      if (out_p) (u_ap.neg() - u_pn).store(op + i, k);
      if (out_n) (u_an + u_pn).store(on + i, k);
    }
    if constexpr (!std::is_same_v<S, A>) {
      if (out_a) convert_values(ga, out_a + c, n);
      if (out_p) convert_values(gp, out_p + c, n);
      if (out_n) convert_values(gn, out_n + c, n);
    }
  }
}

template <Norm N, typename S>
void backward(const TripletMarginArgs<S>& a) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.dim, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      backward_row<N, S>(a, r, a.dist[3 * r], a.dist[3 * r + 1], a.dist[3 * r + 2],
                         a.row_scale ? a.row_scale[r] : a.scale, nullptr);
    }
  });
}

template <typename S>
Norm norm_of(const TripletMarginArgs<S>& a) {
  return a.p == 1 ? Norm::L1 : a.p == 2 ? Norm::L2 : Norm::General;
}

}  // namespace triplet_impl

template <typename S>
void triplet_margin_forward(const TripletMarginArgs<S>& a) {
  using namespace triplet_impl;
  switch (norm_of(a)) {
    case Norm::L1: return forward<Norm::L1, S>(a);
    case Norm::L2: return forward<Norm::L2, S>(a);
    case Norm::General: return forward<Norm::General, S>(a);
  }
}

template <typename S>
void triplet_margin_backward(const TripletMarginArgs<S>& a) {
  using namespace triplet_impl;
  switch (norm_of(a)) {
    case Norm::L1: return backward<Norm::L1, S>(a);
    case Norm::L2: return backward<Norm::L2, S>(a);
    case Norm::General: return backward<Norm::General, S>(a);
  }
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
