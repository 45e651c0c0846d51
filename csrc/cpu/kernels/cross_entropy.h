// Vectorized cross-entropy kernels: forward (logsumexp, loss per row) and backward (the
// gradient of a row in one read-write pass). The (N, C) forward also writes each row's gradient
// right after its statistics, while the row is in L2, when given grad_input (cross_entropy_fwd's grad_mask). Compiled
// once per instruction set; included only from csrc/cpu/capability/kernels_impl.h, inside namespace
// torch_ext::cpu::CPU_CAPABILITY.
//
// Per row with logits x, lse = logsumexp(x), smoothing e, C classes, class weights w (1 when
// absent), W = sum_c w_c, row weight r = w[y] (0 for ignored rows) and z = z_loss:
//   class target y : loss = r ((1 - e)(lse - x_y) + z lse^2) + e/C sum_c w_c (lse - x_c)
//                    grad = (r (1 - e) + 2 r z lse + e W / C) p_c - e/C w_c - r (1 - e) [c == y]
//   probabilities t: t'_c = (1 - e) t_c + e/C, T = sum_c w_c t'_c
//                    loss = sum_c w_c t'_c (lse - x_c) + z lse^2
//                    grad = (T + 2 z lse) p_c - w_c t'_c,  d/dt_c = (1 - e) w_c (lse - x_c)
// with p_c = exp(x_c - lse), each gradient times the row's incoming gradient (row_scale), plus
// grad_lse_r p_c when the row's logsumexp gets a gradient too (an ignored row: that term only).
// softcap s > 0: x is the capped logit s tanh(x_in / s) throughout (see cap_vector), and the
// gradient is then taken through the cap, d/dx_in = d/dx (1 - (x / s)^2). The forward that forms
// the gradient keeps each exponential times that derivative, so each logit is capped once per
// step and its gradient pass is the uncapped one. For class targets the forward also records
// whether the row's argmax (first index of its max) is y.
// lse is kept as max + log(sum exp(x - max)) in two numbers and never rounded as one: near
// |x| = 1e4 a float32 lse is off by half a float step (5e-4), which lse - x_y would inherit.
// Non-finite rows follow F.cross_entropy (log_softmax, then nll): a row whose max is +inf or NaN,
// or whose logits are all -inf, has log-probabilities NaN everywhere, so its loss and its whole
// gradient are NaN (row_is_nan); -inf logits in a row with a finite max are probability 0. An
// ignored row's loss is 0 and its gradient 0, but NaN for such a row (log_softmax's backward
// multiplies its NaN probabilities by the zero gradient), so the gradient pass reads it.
//
// Two layouts. spatial == 1 ((N, C) input, class stride 1): each row is read once, in blocks of
// kBlock classes that stay in L1 while the block max, the rescaled sum of exponentials (online
// across blocks) and the linear sums are taken. Each block's exponentials are taken against the
// running max M_b after that block, exp(x - M_b), and a probability is exp(x - M_b) times the
// block's factor exp(M_b - lse): the forward that also forms the gradient keeps them (in the
// gradient's row; for bfloat16 in a float row) and the gradient pass only multiplies (one exponential an element,
// not two: the step is bound by them, not by memory); the backward op takes the block maxima
// again (a max pass) and the same exponentials, so both give the same bits. spatial > 1 ((N, C, d...) input): a tile of
// one vector of adjacent positions is processed at once, lanes = positions, looping over classes (stride `spatial`);
// the tile is read from memory once (max), then again from cache (sums).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels/common.h"
#include "cpu/runtime/kernel_table.h"

namespace torch_ext::cpu::CPU_CAPABILITY {
namespace cross_entropy_impl {

using at::vec::Vectorized;

constexpr int64_t kBlock = 1024;

// NaN-propagating max, as at::vec::maximum.
template <typename A>
inline A max_nan(A a, A b) {
  return (a != a || a > b) ? a : b;
}

template <typename A>
inline A reduce_max(const Vectorized<A>& v) {
  __at_align__ A lanes[Vectorized<A>::size()];
  v.store(lanes);
  A m = lanes[0];
  for (int64_t j = 1; j < Vectorized<A>::size(); ++j) m = max_nan(m, lanes[j]);
  return m;
}

// Lanes [0, count) of x, the others `fill`.
template <typename A>
inline Vectorized<A> load_or(const A* x, int64_t count, A fill) {
  using V = Vectorized<A>;
  if (count == V::size()) return V::loadu(x);
  return V::set(V(fill), V::loadu(x, count), count);
}

// Whether every lane of v is below `limit` (false where a lane is NaN), tested on the comparison's
// mask (Vectorized's `<` then zero_mask() take four instructions on AVX-512).
template <typename A>
inline bool all_below(const Vectorized<A>& v, A limit) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) return _mm512_cmp_ps_mask(v, _mm512_set1_ps(limit), _CMP_LT_OQ) == 0xFFFF;
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>)
    return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(limit), _CMP_LT_OQ)) == 0xFF;
#endif
  return (v < Vectorized<A>(limit)).zero_mask() == 0;
}

// softcap * tanh(x / softcap) on a vector. float: with u = x / softcap, tanh(u) is u P(u^2) for
// |u| < 1/4, P of degree 3 fitted for the least relative error there (2.5e-9; x P(u^2) in float
// within 1.5 float steps of the exact value, as the Taylor polynomial to u^9 was, in one fused
// multiply-add less), else (e - 1) / (e + 1), e = exp(2u), u clamped to [-9, 9] (where tanh is
// +-1 in float32, and so is this ratio, exactly); NaN kept. A vector whose lanes all lie below
// 1/4 (typical logits under a softcap of 30) takes the polynomial alone: no exponential, no
// division. The exponential is fast_exp (common.h), as in the softmax. double: PyTorch's own
// division and tanh.
template <typename A>
inline Vectorized<A> cap_vector(const Vectorized<A>& x, A softcap) {
  using V = Vectorized<A>;
  if constexpr (std::is_same_v<A, float>) {
    const V u = x * V(A(1) / softcap);
    const V u2 = u * u;
    auto polynomial = [&] {  // x tanh(u) / u
      const V p = at::vec::fmadd(u2, V(A(-0.051327724068608443)), V(A(0.13323132846881897)));
      return x * at::vec::fmadd(u2, at::vec::fmadd(u2, p, V(A(-0.33333206446532165))), V(A(1)));
    };
    if (all_below(u2, A(1.0 / 16))) return polynomial();  // |u| < 1/4
    const V clamped = at::vec::clamp(u, V(A(-9)), V(A(9)));
    const V e = fast_exp(clamped + clamped);
    V capped = (e - V(A(1))) / (e + V(A(1))) * V(softcap);
    // (no test per lane: mixed vectors are common, a branch mispredicts)
    capped = V::blendv(capped, polynomial(), u2 < V(A(1.0 / 16)));
    return V::blendv(capped, x, x != x);
  } else {
    return (x / V(softcap)).tanh() * V(softcap);
  }
}

// The max of n logits (NaN if one is NaN), in four running maxima: at::vec::maximum (NaN kept) is
// a chain of four dependent instructions, and one running max made the pass latency-bound.
template <typename A>
inline A block_max_of(const A* x, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const V lowest(-std::numeric_limits<A>::infinity());
  V m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    m0 = at::vec::maximum(m0, V::loadu(x + i));
    m1 = at::vec::maximum(m1, V::loadu(x + i + L));
    m2 = at::vec::maximum(m2, V::loadu(x + i + 2 * L));
    m3 = at::vec::maximum(m3, V::loadu(x + i + 3 * L));
  }
  for (; i < n; i += L)
    m0 = at::vec::maximum(m0, load_or(x + i, std::min(L, n - i), -std::numeric_limits<A>::infinity()));
  return reduce_max(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// softcap * tanh(x / softcap) of n values from src into dst (which may be src); returns their max
// (NaN if one is NaN), taken as they are written rather than in a pass of its own, in two running
// maxima (see block_max_of).
template <typename A>
inline A cap_values(const A* src, A* dst, int64_t n, A softcap) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const V lowest(-std::numeric_limits<A>::infinity());
  V m0 = lowest, m1 = lowest;
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {  // full vectors with no per-vector test, then the rest
    const V c0 = cap_vector(V::loadu(src + i), softcap);
    const V c1 = cap_vector(V::loadu(src + i + L), softcap);
    c0.store(dst + i);
    c1.store(dst + i + L);
    m0 = at::vec::maximum(m0, c0);
    m1 = at::vec::maximum(m1, c1);
  }
  for (; i < n; i += L) {
    const int64_t k = std::min(L, n - i);
    const V c = cap_vector(V::loadu(src + i, k), softcap);
    c.store(dst + i, k);
    m0 = at::vec::maximum(m0, k == L ? c : V::set(lowest, c, k));
  }
  return reduce_max(at::vec::maximum(m0, m1));
}

// One logit capped by the same vector code as a block's (so a target logit compares equal to the
// block's copy of it); x itself when softcap is 0.
template <typename A>
inline A capped(A x, A softcap) {
  if (softcap == 0) return x;
  __at_align__ A lanes[Vectorized<A>::size()];
  cap_vector(Vectorized<A>(x), softcap).store(lanes);
  return lanes[0];
}

// A block of n logits as A values, capped when softcap > 0: the input itself (float/double, no
// cap) or in buf. max_out (when given) gets the block's max (NaN if one is NaN), taken in the
// cap's pass where there is one.
template <typename S>
inline const acc_t<S>* logits_block(const S* x, int64_t n, acc_t<S>* buf, acc_t<S> softcap,
                                    acc_t<S>* max_out = nullptr) {
  using A = acc_t<S>;
  const A* v = as_math<S, A>(x, n, buf);
  if (softcap == 0) {
    if (max_out != nullptr) *max_out = block_max_of(v, n);
    return v;
  }
  const A m = cap_values(v, buf, n, softcap);
  if (max_out != nullptr) *max_out = m;
  return buf;
}

// d(capped)/dx = 1 - (capped / softcap)^2, the chain rule through the cap, given 1 / softcap;
// applied as each gradient value is formed (no pass of its own).
template <typename A>
inline Vectorized<A> cap_derivative(const Vectorized<A>& capped_x, const Vectorized<A>& inv_softcap) {
  const Vectorized<A> u = capped_x * inv_softcap;
  return Vectorized<A>(A(1)) - u * u;
}

// The same for one value.
template <typename A>
inline A cap_derivative_at(A capped_x, A softcap) {
  const A u = capped_x / softcap;
  return A(1) - u * u;
}

// Whether two row maxima are the same (NaN counts as equal to NaN: torch.argmax takes a NaN as the
// max).
template <typename A>
inline bool same_max(A a, A b) {
  return a == b || (a != a && b != b);
}

// Running statistics of one row over its blocks (spatial == 1).
template <typename A>
struct RowState {
  A max = -std::numeric_limits<A>::infinity();
  A sum_exp = 0;
  A shift = 0;           // subtracted from x in the linear sums (the first block's max), so logits of
  bool shifted = false;  // large magnitude do not cancel catastrophically against lse
  A sum_wx = 0;          // sum_c w_c (x_c - shift)     (class targets with smoothing)
  A sum_wt = 0;          // sum_c w_c t'_c              (probability targets)
  A sum_wtx = 0;         // sum_c w_c t'_c (x_c - shift)
};

// The running max after a block of max block_max (NaN stays NaN: the row's result is NaN).
template <typename A>
inline A running_max_after(A running, A block_max) {
  if (block_max > running || block_max != block_max) return block_max;
  return running;
}

// exp(x - m) of a block's n logits (its k-th vector), 0 where m is -inf (a row all -inf so far:
// x - m would be NaN).
template <typename A>
inline Vectorized<A> exp_against(const A* x, int64_t i, int64_t n, A m) {
  using V = Vectorized<A>;
  if (m == -std::numeric_limits<A>::infinity()) return V(0);
  return fast_exp(load_or(x + i, std::min<int64_t>(V::size(), n - i), -std::numeric_limits<A>::infinity()) - V(m));
}

// Folds classes [c0, c0 + n) of a row into `st`. x, t: the block (float/double), block_max: the
// max of x (from logits_block), w: the full weight vector or nullptr. exps (or nullptr) gets
// exp(x - st.max) of the block, st.max being the running max after it, times the cap's derivative
// at x when inv_cap (1 / softcap) is not 0: the gradient's factor of each element but its
// row's coefficients, so the gradient pass has no cap to undo. next: where the next block's
// logits start in memory (possibly past the input's end), prefetched while this block's
// exponentials are taken: the step is bound by the exponentials, and the next block's first
// pass would otherwise wait on memory.
template <typename S>
inline void accumulate_block(RowState<acc_t<S>>& st, const acc_t<S>* x, acc_t<S> block_max, const acc_t<S>* t,
                             const acc_t<S>* w, int64_t c0, int64_t n, acc_t<S> smoothing, acc_t<S> inv_classes,
                             bool linear_sums, acc_t<S>* exps, acc_t<S> inv_cap, const S* next) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  if (!st.shifted) {
    st.shift = std::isfinite(block_max) ? block_max : A(0);
    st.shifted = true;
  }
  const A new_max = running_max_after(st.max, block_max);
  if (new_max > st.max) st.sum_exp *= std::exp(st.max - new_max);
  st.max = new_max;
  V s(0);
  const V vinv_cap(inv_cap);
  auto kept = [&](const V& ev, const V& xv) { return inv_cap != 0 ? ev * cap_derivative(xv, vinv_cap) : ev; };
  const int64_t full = n - n % L;
  // The full vectors with no per-vector test (what is kept is a template choice).
  auto full_vectors = [&](auto keep_exps, auto capped) {
    const V m(st.max);
    for (int64_t i = 0; i < full; i += L) {
      __builtin_prefetch(next + i);
      const V xv = V::loadu(x + i);
      const V ev = fast_exp(xv - m);
      s += ev;
      if constexpr (decltype(capped)::value) {
        (ev * cap_derivative(xv, vinv_cap)).store(exps + i);
      } else if constexpr (decltype(keep_exps)::value) {
        ev.store(exps + i);
      }
    }
  };
  if (st.max == -std::numeric_limits<A>::infinity()) {  // all -inf so far: exp_against gives 0
    if (exps != nullptr) std::fill(exps, exps + n, A(0));
  } else {
    if (exps == nullptr) {
      full_vectors(std::false_type{}, std::false_type{});
    } else if (inv_cap == 0) {
      full_vectors(std::true_type{}, std::false_type{});
    } else {
      full_vectors(std::true_type{}, std::true_type{});
    }
    if (full < n) {
      const V ev = exp_against(x, full, n, st.max);
      s += ev;
      if (exps != nullptr) kept(ev, V::loadu(x + full, n - full)).store(exps + full, n - full);
    }
  }
  st.sum_exp += reduce_sum(s);
  if (!linear_sums) return;
  const V shift(st.shift);
  if (t == nullptr) {
    V s(0);
    for (int64_t i = 0; i < n; i += L) {
      const int64_t k = std::min(L, n - i);
      V d = V::set(V(0), V::loadu(x + i, k) - shift, k);
      if (w != nullptr) d = d * V::loadu(w + c0 + i, k);
      s += d;
    }
    st.sum_wx += reduce_sum(s);
  } else {
    const V keep(A(1) - smoothing), spread(smoothing * inv_classes);
    V swt(0), swtx(0);
    for (int64_t i = 0; i < n; i += L) {
      const int64_t k = std::min(L, n - i);
      V wt = V::set(V(0), V::loadu(t + i, k) * keep + spread, k);
      if (w != nullptr) wt = wt * V::loadu(w + c0 + i, k);
      swt += wt;
      swtx += wt * V::set(V(0), V::loadu(x + i, k) - shift, k);
    }
    st.sum_wt += reduce_sum(swt);
    st.sum_wtx += reduce_sum(swtx);
  }
}

// Whether a (not ignored) row's loss and gradient are NaN, from its max: see the top of the file.
// Checked explicitly, since the exponential (fast_exp) does not propagate NaN.
template <typename A>
inline bool row_is_nan(A row_max) {
  return !std::isfinite(row_max);
}

template <typename A>
inline bool ignored(const int64_t* target, int64_t row, int64_t ignore_index) {
  return target != nullptr && target[row] == ignore_index;
}

// The max of C logits (NaN if one is NaN), read in blocks through xbuf.
template <typename S>
inline acc_t<S> logits_max(const S* x, int64_t C, acc_t<S>* xbuf, acc_t<S> softcap) {
  using A = acc_t<S>;
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    A bm;
    logits_block<S>(x + c0, std::min(kBlock, C - c0), xbuf, softcap, &bm);
    m = max_nan(m, bm);
  }
  return m;
}

// The running max after each block of a row (see the top of the file), into block_max.
template <typename S>
inline void running_block_maxima(const S* x, int64_t C, acc_t<S>* xbuf, acc_t<S>* block_max, acc_t<S> softcap) {
  using A = acc_t<S>;
  A running = -std::numeric_limits<A>::infinity();
  for (int64_t c0 = 0, b = 0; c0 < C; c0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - c0);
    A bm;
    logits_block<S>(x + c0, n, xbuf, softcap, &bm);
    running = running_max_after(running, bm);
    block_max[b] = running;
  }
}

// Row r's gradients (grad_input, and grad_target for probability targets) from its stats, for
// the incoming gradient row_scale[r] or scale (and grad_lse[r] of its logsumexp). Buffers: kBlock
// values each. block_max: the row's running block maxima (maxima_known: the forward's; else taken
// here, into it); exps: the row's exp(x - M_b), times the cap's derivative with a softcap, as the
// forward left them (in grad_input's row, or a float row for bfloat16), or nullptr to take them
// here.
template <typename S>
inline void gradient_row(const CrossEntropyArgs<S>& a, int64_t r, acc_t<S>* xbuf, acc_t<S>* tbuf, acc_t<S>* gbuf,
                         acc_t<S>* gtbuf, acc_t<S>* block_max, bool maxima_known, const acc_t<S>* exps) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t C = a.classes;
  const A e = a.label_smoothing, inv_c = A(1) / A(C), cap = a.softcap;
  const bool prob = a.target_prob != nullptr;
  const A grad_lse = a.grad_lse ? a.grad_lse[r] : A(0);
  S* gi = a.grad_input ? a.grad_input + r * C : nullptr;  // null: only the target's gradient
  const bool is_ignored = ignored<A>(a.target, r, a.ignore_index);
  if (is_ignored && grad_lse == 0) {
    if (gi != nullptr) {
      const bool nan_row = row_is_nan(logits_max<S>(a.input + r * C, C, xbuf, cap));
      std::fill(gi, gi + C, nan_row ? S(std::numeric_limits<A>::quiet_NaN()) : S(0));
    }
    return;
  }
  const S* x = a.input + r * C;
  const S* t = prob ? a.target_prob + r * C : nullptr;
  S* gt = a.grad_target ? a.grad_target + r * C : nullptr;
  const A sc = a.row_scale ? a.row_scale[r] : a.scale;
  const A row_max = a.stats[3 * r], log_sum = a.stats[3 * r + 1];
  if (row_is_nan(row_max)) {
    if (gi != nullptr) std::fill(gi, gi + C, S(std::numeric_limits<A>::quiet_NaN()));
    if (gt != nullptr) std::fill(gt, gt + C, S(std::numeric_limits<A>::quiet_NaN()));
    return;
  }
  const A lse = row_max + log_sum;
  const A z_term = a.z_loss != 0 ? A(2) * a.z_loss * lse : A(0);
  if (!maxima_known) running_block_maxima<S>(x, C, xbuf, block_max, cap);
  int64_t y = -1;
  A coef_p, coef_w, coef_y = 0;  // grad = coef_p p_c - coef_w w_c [t'_c] - coef_y [c == y]
  if (is_ignored) {              // only its logsumexp's gradient
    coef_p = grad_lse;
    coef_w = 0;
  } else if (prob) {
    coef_p = sc * (a.stats[3 * r + 2] + z_term) + grad_lse;
    coef_w = sc;
  } else {
    y = a.target[r];
    const A rw = a.weight ? a.weight[y] : A(1);
    coef_p = sc * (rw * (A(1) - e + z_term) + (e > 0 ? e * inv_c * a.weight_sum : A(0))) + grad_lse;
    coef_w = sc * e * inv_c;
    coef_y = sc * rw * (A(1) - e);
  }
  const bool smoothing_term = !is_ignored && e > 0;
  const V vp(coef_p), vw(coef_w), vmax(row_max), vlog(log_sum), keep(A(1) - e), spread(e * inv_c), vt(sc * (A(1) - e));
  const V inv_cap(cap != 0 ? A(1) / cap : A(0));
  // The target's term goes through the cap too (d/d(capped logit) -> d/dx).
  const A y_derivative = y >= 0 && cap != 0 ? cap_derivative_at(capped<A>(A(x[y]), cap), cap) : A(1);
  // Whether terms other than the exponentials' are formed per element (they need the logits).
  const bool per_element_terms = t != nullptr || smoothing_term;
  for (int64_t c0 = 0, b = 0; c0 < C; c0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, C - c0);
    // The block's (capped) logits: not needed when the exponentials are known and no term but
    // theirs is formed per element.
    const A* xb = exps != nullptr && !per_element_terms ? nullptr : logits_block<S>(x + c0, n, xbuf, cap);
    const A* tb = t ? as_math<S, A>(t + c0, n, tbuf) : nullptr;
    A* gb = gbuf;
    if constexpr (std::is_same_v<S, A>) gb = gi ? gi + c0 : gbuf;
    const A mb = block_max[b];
    // p = exp(x - M_b) exp(M_b - lse); 0 for blocks whose running max is still -inf.
    const V factor(mb == -std::numeric_limits<A>::infinity() ? A(0) : std::exp((mb - row_max) - log_sum));
    // The common case first (the exponentials known, the cap's derivative in them, and no
    // per-element term): the block's full vectors with no per-vector test; the rest below.
    int64_t i0 = 0;
    if (exps != nullptr && !per_element_terms) {
      for (; i0 + L <= n; i0 += L) (vp * (V::loadu(exps + c0 + i0) * factor)).store(gb + i0);
    }
    for (int64_t i = i0; i < n; i += L) {
      const int64_t k = std::min(L, n - i);
      // d(capped)/dx, the chain rule through the cap: in the exponentials already when the
      // forward left them, here for the terms formed per element.
      const V d = cap != 0 && xb != nullptr ? cap_derivative(V::loadu(xb + i, k), inv_cap) : V(1);
      const V ev = exps != nullptr ? V::loadu(exps + c0 + i, k) : exp_against(xb, i, n, mb) * d;
      const V wv = a.weight ? V::loadu(a.weight + c0 + i, k) : V(1);
      V g = vp * (ev * factor);
      if (tb != nullptr) {
        const V tv = V::loadu(tb + i, k);
        g = g - vw * wv * (tv * keep + spread) * d;
        if (gt != nullptr) (vt * wv * ((vmax - V::loadu(xb + i, k)) + vlog)).store(gtbuf + i, k);
      } else if (smoothing_term) {
        g = g - vw * wv * d;
      }
      g.store(gb + i, k);
    }
    if (y >= c0 && y < c0 + n) gb[y - c0] -= coef_y * y_derivative;
    if constexpr (!std::is_same_v<S, A>) {
      if (gi != nullptr) convert_values(gbuf, gi + c0, n);
    }
    if (gt != nullptr) convert_values(gtbuf, gt + c0, n);
  }
}

// Whether the row's argmax (the first index of its max, as torch.argmax) is y, from its running
// block maxima: the first occurrence of the max is in the first block whose running max reached
// it, so y must be in that block with no earlier class of the block equal to the max. Reads at
// most one block, and only for rows whose target logit is the max.
template <typename S>
inline bool argmax_is(const S* x, int64_t C, int64_t y, acc_t<S> y_logit, acc_t<S> row_max, const acc_t<S>* block_max,
                      acc_t<S>* xbuf, acc_t<S> softcap) {
  using A = acc_t<S>;
  if (!same_max(y_logit, row_max)) return false;
  const int64_t yb = y / kBlock;
  if (yb > 0 && same_max(block_max[yb - 1], row_max)) return false;  // reached in an earlier block
  const int64_t c0 = yb * kBlock, n = y - c0;
  const A* xb = logits_block<S>(x + c0, n, xbuf, softcap);
  for (int64_t i = 0; i < n; ++i)
    if (same_max(xb[i], row_max)) return false;
  return true;
}

template <typename S>
void forward_contiguous_rows(const CrossEntropyArgs<S>& a) {
  using A = acc_t<S>;
  const int64_t C = a.classes;
  const A e = a.label_smoothing, inv_c = A(1) / A(C), cap = a.softcap;
  const A inv_cap = cap != 0 ? A(1) / cap : A(0);
  const bool prob = a.target_prob != nullptr;
  const bool linear_sums = prob || e > 0;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
    const FlushToZero flush_to_zero;  // (common.h: subnormal probabilities)
    __at_align__ A xbuf[kBlock];
    __at_align__ A tbuf[kBlock];
    __at_align__ A gbuf[kBlock];
    __at_align__ A gtbuf[kBlock];
    std::vector<A> block_max((C + kBlock - 1) / kBlock);
    std::vector<A> row_exps(std::is_same_v<S, A> || a.grad_input == nullptr ? 0 : C);
    for (int64_t r = begin; r < end; ++r) {
      const bool is_ignored = ignored<A>(a.target, r, a.ignore_index);
      if (is_ignored && !a.ignored_row_stats) {
        a.row_loss[r] = 0;
        a.stats[3 * r] = a.stats[3 * r + 1] = a.stats[3 * r + 2] = 0;
        if (a.grad_input != nullptr)
          gradient_row<S>(a, r, xbuf, tbuf, gbuf, gtbuf, block_max.data(), false, nullptr);  // zeros
        continue;
      }
      const S* x = a.input + r * C;
      const S* t = prob ? a.target_prob + r * C : nullptr;
      RowState<A> st;
      // Where the row's exponentials wait for its gradient pass: the gradient's row itself, or
      // for bfloat16 a float row of this thread's (both stay in L2 with the row).
      A* exps = nullptr;
      if (a.grad_input != nullptr && !is_ignored) {
        if constexpr (std::is_same_v<S, A>) {
          exps = a.grad_input + r * C;
        } else {
          exps = row_exps.data();
        }
      }
      for (int64_t c0 = 0, b = 0; c0 < C; c0 += kBlock, ++b) {
        const int64_t n = std::min(kBlock, C - c0);
        A xb_max;
        const A* xb = logits_block<S>(x + c0, n, xbuf, cap, &xb_max);
        accumulate_block<S>(st, xb, xb_max, t ? as_math<S, A>(t + c0, n, tbuf) : nullptr, a.weight, c0, n, e, inv_c,
                            linear_sums && !is_ignored, exps ? exps + c0 : nullptr, inv_cap, x + c0 + n);
        block_max[b] = st.max;
      }
      const A log_sum = std::log(st.sum_exp);
      a.stats[3 * r] = st.max;
      a.stats[3 * r + 1] = log_sum;
      if (is_ignored) {  // ignored_row_stats: its logsumexp only
        a.row_loss[r] = 0;
        a.stats[3 * r + 2] = 0;
        if (a.grad_input != nullptr) gradient_row<S>(a, r, xbuf, tbuf, gbuf, gtbuf, block_max.data(), false, nullptr);
        continue;
      }
      const A lse = st.max + log_sum;                       // for z_loss only
      const A lse_shifted = (st.max - st.shift) + log_sum;  // lse - shift
      A loss;
      if (prob) {
        loss = st.sum_wt * lse_shifted - st.sum_wtx;
        if (a.z_loss != 0) loss += a.z_loss * lse * lse;
        a.stats[3 * r + 2] = st.sum_wt;
      } else {
        const int64_t y = a.target[r];
        const A rw = a.weight ? a.weight[y] : A(1);
        const A x_y = capped<A>(A(x[y]), cap);
        loss = (A(1) - e) * ((st.max - x_y) + log_sum);
        if (a.z_loss != 0) loss += a.z_loss * lse * lse;
        loss *= rw;
        if (e > 0) loss += e * inv_c * (a.weight_sum * lse_shifted - st.sum_wx);
        a.stats[3 * r + 2] = argmax_is<S>(x, C, y, x_y, st.max, block_max.data(), xbuf, cap) ? A(1) : A(0);
      }
      if (row_is_nan(st.max)) loss = std::numeric_limits<A>::quiet_NaN();
      a.row_loss[r] = loss;
      // grad_mask[0] of cross_entropy_fwd: the row's gradient now, while the row is in L2.
      if (a.grad_input != nullptr) gradient_row<S>(a, r, xbuf, tbuf, gbuf, gtbuf, block_max.data(), true, exps);
    }
  });
}

template <typename S>
void backward_contiguous_rows(const CrossEntropyArgs<S>& a) {
  using A = acc_t<S>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.classes, 1));
  at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
    const FlushToZero flush_to_zero;  // (common.h: subnormal probabilities)
    __at_align__ A xbuf[kBlock];
    __at_align__ A tbuf[kBlock];
    __at_align__ A gbuf[kBlock];
    __at_align__ A gtbuf[kBlock];
    std::vector<A> block_max((a.classes + kBlock - 1) / kBlock);
    for (int64_t r = begin; r < end; ++r)
      gradient_row<S>(a, r, xbuf, tbuf, gbuf, gtbuf, block_max.data(), false, nullptr);
  });
}

// ---- spatial > 1: tiles of up to one vector of adjacent positions ----------------------------

// A tile's logits as A values with class stride `ld`: the input itself when S is A and there is
// no cap (ld = spatial), else converted (and capped, softcap > 0) into `buffer` (ld = lanes).
// Probability targets come through here with softcap 0.
template <typename S, typename A>
inline const A* tile_as_math(const S* base, int64_t classes, int64_t spatial, int64_t lanes, std::vector<A>& buffer,
                             int64_t& ld, A softcap) {
  if (std::is_same_v<S, A> && softcap == 0) {
    ld = spatial;
    return reinterpret_cast<const A*>(base);
  }
  ld = Vectorized<A>::size();
  buffer.resize(classes * ld);
  for (int64_t c = 0; c < classes; ++c) {
    for (int64_t l = 0; l < lanes; ++l) buffer[c * ld + l] = A(base[c * spatial + l]);
    if (softcap != 0) cap_values(buffer.data() + c * ld, buffer.data() + c * ld, lanes, softcap);
  }
  return buffer.data();
}

template <typename S>
void forward_spatial_tiles(const CrossEntropyArgs<S>& a) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t C = a.classes, HW = a.spatial;
  const int64_t tiles_per_image = (HW + L - 1) / L;
  const A e = a.label_smoothing, inv_c = A(1) / A(C), inf = std::numeric_limits<A>::infinity();
  const bool prob = a.target_prob != nullptr;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(C * L, 1));
  at::parallel_for(0, a.batch * tiles_per_image, grain, [&](int64_t begin, int64_t end) {
    const FlushToZero flush_to_zero;  // (common.h: subnormal probabilities)
    std::vector<A> xbuf, tbuf;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / tiles_per_image, s0 = (tile % tiles_per_image) * L;
      const int64_t lanes = std::min(L, HW - s0);
      const int64_t offset = n * C * HW + s0;
      int64_t ld = 0, ldt = 0;
      const A* x = tile_as_math<S, A>(a.input + offset, C, HW, lanes, xbuf, ld, a.softcap);
      const A* t = prob ? tile_as_math<S, A>(a.target_prob + offset, C, HW, lanes, tbuf, ldt, A(0)) : nullptr;
      V m(-inf);
      for (int64_t c = 0; c < C; ++c) m = at::vec::maximum(m, V::loadu(x + c * ld, lanes));
      V s(0), swx(0), swt(0), swtx(0);
      const V keep(A(1) - e), spread(e * inv_c);
      for (int64_t c = 0; c < C; ++c) {
        const V xv = V::loadu(x + c * ld, lanes);
        s += fast_exp(xv - m);
        const V wv(a.weight ? a.weight[c] : A(1));
        if (prob) {
          const V wt = wv * (V::loadu(t + c * ldt, lanes) * keep + spread);
          swt += wt;
          swtx += wt * (xv - m);
        } else if (e > 0) {
          swx += wv * (xv - m);
        }
      }
      __at_align__ A max_l[L], sum_l[L], swx_l[L], swt_l[L], swtx_l[L];
      m.store(max_l);
      s.store(sum_l);
      swx.store(swx_l);
      swt.store(swt_l);
      swtx.store(swtx_l);
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t r = n * HW + s0 + l;
        const bool is_ignored = ignored<A>(a.target, r, a.ignore_index);
        const A log_sum = std::log(sum_l[l]);
        a.stats[3 * r] = is_ignored && !a.ignored_row_stats ? A(0) : max_l[l];
        a.stats[3 * r + 1] = is_ignored && !a.ignored_row_stats ? A(0) : log_sum;
        a.stats[3 * r + 2] = 0;
        if (is_ignored) {
          a.row_loss[r] = 0;
          continue;
        }
        const A lse = max_l[l] + log_sum;  // for z_loss only
        A loss;
        if (prob) {
          loss = swt_l[l] * log_sum - swtx_l[l];
          if (a.z_loss != 0) loss += a.z_loss * lse * lse;
          a.stats[3 * r + 2] = swt_l[l];
        } else {
          const int64_t y = a.target[r];
          const A rw = a.weight ? a.weight[y] : A(1);
          loss = (A(1) - e) * ((max_l[l] - x[y * ld + l]) + log_sum);
          if (a.z_loss != 0) loss += a.z_loss * lse * lse;
          loss *= rw;
          if (e > 0) loss += e * inv_c * (a.weight_sum * log_sum - swx_l[l]);
          // argmax (first index of the max) == y: only rows whose target logit is the max scan
          // the classes before it.
          bool hit = same_max(x[y * ld + l], max_l[l]);
          for (int64_t c = 0; hit && c < y; ++c) hit = !same_max(x[c * ld + l], max_l[l]);
          a.stats[3 * r + 2] = hit ? A(1) : A(0);
        }
        if (row_is_nan(max_l[l])) loss = std::numeric_limits<A>::quiet_NaN();
        a.row_loss[r] = loss;
      }
    }
  });
}

template <typename S>
void backward_spatial_tiles(const CrossEntropyArgs<S>& a) {
  using A = acc_t<S>;
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  const int64_t C = a.classes, HW = a.spatial;
  const int64_t tiles_per_image = (HW + L - 1) / L;
  const A e = a.label_smoothing, inv_c = A(1) / A(C);
  const bool prob = a.target_prob != nullptr;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(C * L, 1));
  at::parallel_for(0, a.batch * tiles_per_image, grain, [&](int64_t begin, int64_t end) {
    const FlushToZero flush_to_zero;  // (common.h: subnormal probabilities)
    std::vector<A> xbuf, tbuf, gbuf, gtbuf;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / tiles_per_image, s0 = (tile % tiles_per_image) * L;
      const int64_t lanes = std::min(L, HW - s0);
      const int64_t offset = n * C * HW + s0;
      int64_t ld = 0, ldt = 0;
      const A* x = tile_as_math<S, A>(a.input + offset, C, HW, lanes, xbuf, ld, a.softcap);
      const A* t = prob ? tile_as_math<S, A>(a.target_prob + offset, C, HW, lanes, tbuf, ldt, A(0)) : nullptr;
      // Per-lane coefficients, as in backward_contiguous_rows; ignored lanes are masked to 0.
      __at_align__ A cp[L], cw[L], cy[L], max_l[L], log_l[L], keep_l[L], sc_l[L];
      int64_t y_l[L];
      bool nan_l[L], ignored_l[L];
      bool any_nan = false, any_ignored = false;
      for (int64_t l = 0; l < L; ++l) {
        cp[l] = cw[l] = cy[l] = max_l[l] = log_l[l] = sc_l[l] = 0;
        keep_l[l] = 0;
        y_l[l] = -1;
        nan_l[l] = ignored_l[l] = false;
        if (l >= lanes) continue;
        const int64_t r = n * HW + s0 + l;
        const A grad_lse = a.grad_lse ? a.grad_lse[r] : A(0);
        const bool is_ignored = ignored<A>(a.target, r, a.ignore_index);
        if (is_ignored && grad_lse == 0) {  // NaN after the loop if its max is not finite
          ignored_l[l] = any_ignored = true;
          continue;
        }
        const A sc = a.row_scale ? a.row_scale[r] : a.scale;
        max_l[l] = a.stats[3 * r];
        log_l[l] = a.stats[3 * r + 1];
        if (row_is_nan(max_l[l])) {  // filled with NaN after the vector loop
          nan_l[l] = any_nan = true;
          max_l[l] = log_l[l] = 0;
          continue;
        }
        const A lse = max_l[l] + log_l[l];
        const A z_term = a.z_loss != 0 ? A(2) * a.z_loss * lse : A(0);
        keep_l[l] = 1;
        if (is_ignored) {  // only its logsumexp's gradient
          cp[l] = grad_lse;
        } else if (prob) {
          sc_l[l] = sc;
          cp[l] = sc * (a.stats[3 * r + 2] + z_term) + grad_lse;
          cw[l] = sc;
        } else {
          y_l[l] = a.target[r];
          const A rw = a.weight ? a.weight[y_l[l]] : A(1);
          cp[l] = sc * (rw * (A(1) - e + z_term) + (e > 0 ? e * inv_c * a.weight_sum : A(0))) + grad_lse;
          cw[l] = sc * e * inv_c;
          cy[l] = sc * rw * (A(1) - e);
        }
      }
      const V vp = V::loadu(cp), vw = V::loadu(cw), vmax = V::loadu(max_l), vlog = V::loadu(log_l);
      const V vsc = V::loadu(sc_l);
      const V live = V::loadu(keep_l) != V(0);
      const V keep(A(1) - e), spread(e * inv_c), inv_cap(a.softcap != 0 ? A(1) / a.softcap : A(0));
      S* gi = a.grad_input ? a.grad_input + offset : nullptr;
      S* gt = a.grad_target ? a.grad_target + offset : nullptr;
      // In place when S is A and the input gradient is wanted; else through tile buffers.
      const bool direct = std::is_same_v<S, A> && gi != nullptr;
      A* g_out;
      A* gt_out = nullptr;
      int64_t ldg;
      if (direct) {
        g_out = reinterpret_cast<A*>(gi);
        gt_out = reinterpret_cast<A*>(gt);
        ldg = HW;
      } else {
        gbuf.resize(C * L);
        g_out = gbuf.data();
        if (gt) {
          gtbuf.resize(C * L);
          gt_out = gtbuf.data();
        }
        ldg = L;
      }
      V lane_max(-std::numeric_limits<A>::infinity());  // of the ignored lanes
      for (int64_t c = 0; c < C; ++c) {
        const V xv = V::loadu(x + c * ld, lanes);
        if (any_ignored) lane_max = at::vec::maximum(lane_max, xv);
        const V wv(a.weight ? a.weight[c] : A(1));
        V g = vp * fast_exp((xv - vmax) - vlog);
        if (prob) {
          g = g - vw * wv * (V::loadu(t + c * ldt, lanes) * keep + spread);
          if (gt_out) (vsc * keep * wv * ((vmax - xv) + vlog)).store(gt_out + c * ldg, lanes);
        } else if (e > 0) {
          g = g - vw * wv;
        }
        // d/d(capped logit) -> d/dx (x here is capped)
        if (a.softcap != 0) g = g * cap_derivative(xv, inv_cap);
        V::blendv(V(0), g, live).store(g_out + c * ldg, lanes);
      }
      for (int64_t l = 0; l < lanes; ++l) {
        if (y_l[l] >= 0)
          g_out[y_l[l] * ldg + l] -= cy[l] * (a.softcap != 0 ? cap_derivative_at(x[y_l[l] * ld + l], a.softcap) : A(1));
      }
      if (any_ignored) {
        __at_align__ A lane_max_l[L];
        lane_max.store(lane_max_l);
        for (int64_t l = 0; l < lanes; ++l) {
          if (ignored_l[l] && row_is_nan(lane_max_l[l])) nan_l[l] = any_nan = true;
        }
      }
      for (int64_t l = 0; any_nan && l < lanes; ++l) {
        if (!nan_l[l]) continue;
        for (int64_t c = 0; c < C; ++c) {
          g_out[c * ldg + l] = std::numeric_limits<A>::quiet_NaN();
          if (gt_out) gt_out[c * ldg + l] = std::numeric_limits<A>::quiet_NaN();
        }
      }
      if (!direct) {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t l = 0; l < lanes; ++l) {
            if (gi) gi[c * HW + l] = S(g_out[c * ldg + l]);
            if (gt) gt[c * HW + l] = S(gt_out[c * ldg + l]);
          }
      }
    }
  });
}

}  // namespace cross_entropy_impl

template <typename S>
void cross_entropy_forward(const CrossEntropyArgs<S>& a) {
  if (a.spatial == 1) {
    cross_entropy_impl::forward_contiguous_rows<S>(a);
  } else {
    cross_entropy_impl::forward_spatial_tiles<S>(a);
  }
}

template <typename S>
void cross_entropy_backward(const CrossEntropyArgs<S>& a) {
  if (a.spatial == 1) {
    cross_entropy_impl::backward_contiguous_rows<S>(a);
  } else {
    cross_entropy_impl::backward_spatial_tiles<S>(a);
  }
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
