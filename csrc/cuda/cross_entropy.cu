// Fused cross-entropy on CUDA, with every option of F.cross_entropy plus z_loss and softcap (and
// the stats of the lse and accuracy outputs, grad_lse in backward); the same ops,
// formulas and saved statistics as csrc/cpu/cross_entropy.cpp (see csrc/cpu/kernels/cross_entropy.h
// for the formulas).
//
//   forward : (N, C) input: one block per row, an online max / sum-exp per thread over strided
//             (vectorized) classes, then a block reduction in a fixed order (deterministic, no
//             atomics). (N, C, d...) input: one thread per position, looping over classes, so
//             adjacent threads read adjacent positions.
//   backward: the same layouts, one read of the logits and one write of the gradient.
//   forward with gradient (cross_entropy_fwd's grad_mask, the eager path for reductions mean and sum):
//             the forward kernel writes each row's gradient for grad_loss = 1 right after the
//             row's statistics (the row is still in L2), so a training step reads the logits from
//             memory once; the backward then only scales it, unless grad_loss is 1.
// Target validation runs on the device and is reported by the host (one synchronization, in the
// forward ops only: cuda/cross_entropy_targets.h), so a bad class index is a Python error, never a
// device-side assert; a bad index that reaches the kernels unchecked gives NaN, not a fault.
// Non-finite logits give what F.cross_entropy gives (csrc/cpu/kernels/cross_entropy.h): a row
// whose max is +inf or NaN, or whose logits are all -inf, has a NaN loss and a NaN gradient; an
// ignored one, loss 0 and a NaN gradient (other ignored rows: 0), so the gradient reads it.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>

#include "checks.h"
#include "cuda/cross_entropy_targets.h"
#include "cuda/pack.cuh"
#include "cuda/reduce.cuh"
#include "loss.h"
#include "loss_checks.h"

namespace torch_ext {
namespace {

using at::Tensor;

template <typename S>
struct CrossEntropyArgs {
  using A = at::acc_type<S, true>;
  int64_t rows, classes, spatial;
  const S* input;
  const int64_t* target;  // or nullptr (probabilities)
  const S* target_prob;   // or nullptr
  const A* weight;        // or nullptr
  int64_t ignore_index;
  A label_smoothing, z_loss;
  A softcap;               // > 0: every logit x is taken as softcap * tanh(x / softcap); 0: off
  const A* weight_sum;     // device scalar: sum of weight (classes without weight)
  A* stats;                // (rows, 3): max, log(sum exp(x - max)), target mass (probabilities) or
                           // whether the row's argmax is its target (class indices)
  A* row_loss;             // forward
  bool ignored_row_stats;  // forward: also the max and log-sum of ignored rows
  const A* row_scale;      // backward: per row (reduction none), or
  const A* scale;          // a device scalar for every row
  const A* grad_lse;       // backward: per row, the incoming gradient of its logsumexp, or nullptr
  S* grad_input;           // or nullptr
  S* grad_target;          // or nullptr
};

// The logit as the loss sees it: softcap * tanh(x / softcap), or x when softcap is 0.
template <typename A>
__device__ __forceinline__ A capped(A x, A softcap) {
  return softcap == A(0) ? x : softcap * ::tanh(x / softcap);
}

// A row's running statistics: max and sum of exp(x - max) (online), the first index of the max
// (torch.argmax's: a NaN counts as the max; -1 before any class), and the linear sums of the
// smoothing and probability terms, taken relative to `shift` (the row's first finite logit) so
// that large logits do not cancel against lse.
template <typename A>
struct RowPartial {
  A max, sum_exp, sum_wx, sum_wt, sum_wtx;
  int64_t arg;

  __device__ static RowPartial empty() { return {-INFINITY, A(0), A(0), A(0), A(0), -1}; }

  // Classes come in increasing order per thread, so an equal max keeps the earlier index.
  __device__ void add_logit(A x, int64_t c) {
    if (arg < 0 || x > max || (x != x && max == max)) arg = c;
    if (x > max) {
      sum_exp = (max == -INFINITY ? A(0) : sum_exp * ::exp(max - x)) + A(1);
      max = x;
    } else if (x != x) {
      max = x;
      sum_exp = x;
    } else if (x == max) {
      if (x != -INFINITY) sum_exp += A(1);  // exp(0), also for +inf (exp(inf - inf) would be NaN)
    } else if (x != -INFINITY) {
      sum_exp += ::exp(x - max);
    }
  }

  // sum_exp rescaled from max `from` to max `to` >= from: equal maxima need no exp (two +inf
  // maxima would give exp(inf - inf) = NaN), an all -inf part adds nothing.
  __device__ static A rescaled(A sum, A from, A to) {
    return from == -INFINITY ? A(0) : (from == to ? sum : sum * ::exp(from - to));
  }

  __device__ void merge(const RowPartial& o) {
    if (o.arg >= 0) {
      const bool o_nan = o.max != o.max, nan = max != max;
      if (arg < 0 || (o_nan && !nan) || (!nan && o.max > max)) {
        arg = o.arg;
      } else if ((o_nan && nan) || o.max == max) {
        arg = o.arg < arg ? o.arg : arg;
      }
    }
    const A m = max != max ? max : ((o.max != o.max || o.max > max) ? o.max : max);  // NaN-propagating
    const A s = m != m ? m : rescaled(sum_exp, max, m) + rescaled(o.sum_exp, o.max, m);
    max = m;
    sum_exp = s;
    sum_wx += o.sum_wx;
    sum_wt += o.sum_wt;
    sum_wtx += o.sum_wtx;
  }
};

template <typename A>
struct MergeRowPartial {
  __device__ RowPartial<A> operator()(RowPartial<A> a, const RowPartial<A>& b) const {
    a.merge(b);
    return a;
  }
};

template <typename A>
__device__ __forceinline__ RowPartial<A> shfl_down(const RowPartial<A>& p, int offset) {
  return {__shfl_down_sync(0xffffffffu, p.max, offset),
          __shfl_down_sync(0xffffffffu, p.sum_exp, offset),
          __shfl_down_sync(0xffffffffu, p.sum_wx, offset),
          __shfl_down_sync(0xffffffffu, p.sum_wt, offset),
          __shfl_down_sync(0xffffffffu, p.sum_wtx, offset),
          static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(p.arg), offset))};
}

// One class of one row: x, and t (probability targets) at class c.
template <typename S>
__device__ __forceinline__ void accumulate_class(RowPartial<at::acc_type<S, true>>& p, const CrossEntropyArgs<S>& a,
                                                 at::acc_type<S, true> x, const S* t_row, int64_t c, int64_t stride,
                                                 at::acc_type<S, true> shift, bool linear_sums) {
  using A = at::acc_type<S, true>;
  p.add_logit(x, c);
  if (!linear_sums) return;
  const A w = a.weight ? a.weight[c] : A(1);
  if (t_row == nullptr) {
    p.sum_wx += w * (x - shift);
  } else {
    const A wt = w * (A(t_row[c * stride]) * (A(1) - a.label_smoothing) + a.label_smoothing / A(a.classes));
    p.sum_wt += wt;
    p.sum_wtx += wt * (x - shift);
  }
}

template <typename S>
__device__ __forceinline__ bool row_ignored(const CrossEntropyArgs<S>& a, int64_t r) {
  return a.target != nullptr && a.target[r] == a.ignore_index;
}

// A class index the kernels may use; the others (only where the host check was skipped) make
// the row NaN instead of reading out of bounds.
template <typename S>
__device__ __forceinline__ bool class_in_range(const CrossEntropyArgs<S>& a, int64_t y) {
  return y >= 0 && y < a.classes;
}

// The row's loss and statistics from its reduced partial (x_row: the row's first logit, with
// class stride `stride`). An ignored row gets here only for ignored_row_stats: loss 0, its
// logsumexp's two numbers.
template <typename S>
__device__ void finish_forward_row(const CrossEntropyArgs<S>& a, int64_t r, const RowPartial<at::acc_type<S, true>>& p,
                                   const S* x_row, int64_t stride, at::acc_type<S, true> shift) {
  using A = at::acc_type<S, true>;
  const A e = a.label_smoothing, inv_c = A(1) / A(a.classes);
  const A log_sum = ::log(p.sum_exp);
  if (row_ignored(a, r)) {
    a.row_loss[r] = 0;
    a.stats[3 * r] = p.max;
    a.stats[3 * r + 1] = log_sum;
    a.stats[3 * r + 2] = 0;
    return;
  }
  const A lse = p.max + log_sum;
  const A lse_shifted = (p.max - shift) + log_sum;
  A loss;
  if (a.target_prob != nullptr) {
    loss = p.sum_wt * lse_shifted - p.sum_wtx;
    if (a.z_loss != 0) loss += a.z_loss * lse * lse;
  } else if (class_in_range(a, a.target[r])) {
    const int64_t y = a.target[r];
    const A rw = a.weight ? a.weight[y] : A(1);
    loss = (A(1) - e) * ((p.max - capped(A(x_row[y * stride]), a.softcap)) + log_sum);
    if (a.z_loss != 0) loss += a.z_loss * lse * lse;
    loss *= rw;
    if (e > 0) loss += e * inv_c * (*a.weight_sum * lse_shifted - p.sum_wx);
  } else {
    loss = NAN;
  }
  // +inf or NaN max, or all -inf: F.cross_entropy's log-probabilities are all NaN.
  if (!::isfinite(p.max)) loss = NAN;
  a.row_loss[r] = loss;
  a.stats[3 * r] = p.max;
  a.stats[3 * r + 1] = log_sum;
  a.stats[3 * r + 2] = a.target_prob != nullptr ? p.sum_wt : A(p.arg == a.target[r] ? 1 : 0);
}

template <typename S>
__device__ __forceinline__ at::acc_type<S, true> row_shift(const S* x_row, at::acc_type<S, true> softcap) {
  using A = at::acc_type<S, true>;
  const A first = capped(A(x_row[0]), softcap);
  return ::isfinite(first) ? first : A(0);
}

// Per row: grad_c = coef_p p_c - coef_w w_c [t'_c] - coef_y [c == y] (see the CPU kernel).
template <typename A>
struct RowGradient {
  A coef_p, coef_w, coef_y, row_max, log_sum, scale;
  int64_t y;
};

template <typename S>
__device__ __forceinline__ RowGradient<at::acc_type<S, true>> row_gradient(const CrossEntropyArgs<S>& a, int64_t r) {
  using A = at::acc_type<S, true>;
  const A e = a.label_smoothing, inv_c = A(1) / A(a.classes);
  const A sc = a.row_scale ? a.row_scale[r] : *a.scale;
  const A grad_lse = a.grad_lse ? a.grad_lse[r] : A(0);
  RowGradient<A> g;
  g.row_max = a.stats[3 * r];
  g.log_sum = a.stats[3 * r + 1];
  g.scale = sc;
  const A lse = g.row_max + g.log_sum;
  const A z_term = a.z_loss != 0 ? A(2) * a.z_loss * lse : A(0);
  if (row_ignored(a, r)) {  // only its logsumexp's gradient (ignored_row_stats' stats)
    g.coef_p = grad_lse;
    g.coef_w = g.coef_y = 0;
    g.y = -1;
  } else if (a.target_prob != nullptr) {
    g.coef_p = sc * (a.stats[3 * r + 2] + z_term) + grad_lse;
    g.coef_w = sc;
    g.coef_y = 0;
    g.y = -1;
  } else {
    const bool valid = class_in_range(a, a.target[r]);
    g.y = valid ? a.target[r] : -1;
    const A rw = !valid ? A(NAN) : a.weight ? a.weight[g.y] : A(1);
    g.coef_p = sc * (rw * (A(1) - e + z_term) + (e > 0 ? e * inv_c * *a.weight_sum : A(0))) + grad_lse;
    g.coef_w = sc * e * inv_c;
    g.coef_y = sc * rw * (A(1) - e);
    if (!valid) g.row_max = NAN;
  }
  // A NaN row max makes every exp, so every gradient of the row (the target's too), NaN, as
  // F.cross_entropy's for a row with a +inf or NaN max or all -inf.
  if (!::isfinite(g.row_max)) g.row_max = NAN;
  return g;
}

template <typename S>
__device__ __forceinline__ void gradient_class(const CrossEntropyArgs<S>& a,
                                               const RowGradient<at::acc_type<S, true>>& g, at::acc_type<S, true> x,
                                               const S* t_row, S* gi_row, S* gt_row, int64_t c, int64_t stride) {
  using A = at::acc_type<S, true>;
  const A e = a.label_smoothing;
  const A w = a.weight ? a.weight[c] : A(1);
  A grad = g.coef_p * ::exp((x - g.row_max) - g.log_sum);
  if (t_row != nullptr) {
    const A t = A(t_row[c * stride]);
    grad -= g.coef_w * w * (t * (A(1) - e) + e / A(a.classes));
    if (gt_row != nullptr) gt_row[c * stride] = S(g.scale * (A(1) - e) * w * ((g.row_max - x) + g.log_sum));
  } else if (e > 0) {
    grad -= g.coef_w * w;
  }
  if (c == g.y) grad -= g.coef_y;
  if (a.softcap != A(0)) {  // x is the capped logit: through the cap, d/dx = d/dx' (1 - (x' / softcap)^2)
    const A u = x / a.softcap;
    grad *= A(1) - u * u;
  }
  if (gi_row != nullptr) gi_row[c * stride] = S(grad);
}

// fn(c, x_c) for every class of a row read by the block: thread i takes packs i, i + blockDim.x,
// ... in that order (so the per-thread order, and the result, is fixed), kUnroll packs loaded
// before any is used, to keep enough loads in flight per multiprocessor to stream from memory.
template <typename S, int kVec, typename Fn>
__device__ __forceinline__ void for_each_class(const S* x, int64_t C, Fn fn) {
  constexpr int kUnroll = 4;
  const int64_t step = int64_t(blockDim.x) * kVec;
  int64_t c0 = int64_t(threadIdx.x) * kVec;
  for (; c0 + (kUnroll - 1) * step < C; c0 += kUnroll * step) {
    Pack<S, kVec> packs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) packs[u] = *reinterpret_cast<const Pack<S, kVec>*>(x + c0 + u * step);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < kVec; ++j) fn(c0 + u * step + j, packs[u].v[j]);
  }
  for (; c0 < C; c0 += step) {
    const Pack<S, kVec> pack = *reinterpret_cast<const Pack<S, kVec>*>(x + c0);
#pragma unroll
    for (int j = 0; j < kVec; ++j) fn(c0 + j, pack.v[j]);
  }
}

// A row's gradients by the block, from its stats (not an ignored row).
template <typename S, int kVec>
__device__ __forceinline__ void write_row_gradient(const CrossEntropyArgs<S>& a, int64_t r) {
  using A = at::acc_type<S, true>;
  const int64_t C = a.classes;
  const S* x = a.input + r * C;
  const S* t = a.target_prob ? a.target_prob + r * C : nullptr;
  S* gi = a.grad_input ? a.grad_input + r * C : nullptr;
  S* gt = a.grad_target ? a.grad_target + r * C : nullptr;
  const RowGradient<A> g = row_gradient(a, r);
  // Packs are read before they are written: grad_input may be the input itself (in place), and
  // each thread writes only the classes it read.
  for_each_class<S, kVec>(x, C,
                          [&](int64_t c, S xc) { gradient_class(a, g, capped(A(xc), a.softcap), t, gi, gt, c, 1); });
}

// Whether one logit makes its row's log-probabilities NaN (+inf, NaN), and whether it keeps an
// all -inf row from doing so (> -inf); see the top of the file.
template <typename A>
__device__ __forceinline__ void note_non_finite(A x, bool& nan_or_inf, bool& above_minus_inf) {
  nan_or_inf |= x != x || x == A(INFINITY);
  above_minus_inf |= x > A(-INFINITY);
}

// An ignored row's gradient by the block: 0, or NaN where F.cross_entropy's is. Every read of
// the row comes before the barrier and every write after it (gi may be the row itself).
template <typename S, int kVec>
__device__ __forceinline__ void write_ignored_row_gradient(const S* x, S* gi, int64_t C,
                                                           at::acc_type<S, true> softcap) {
  using A = at::acc_type<S, true>;
  bool nan_or_inf = false, above_minus_inf = false;
  for_each_class<S, kVec>(x, C,
                          [&](int64_t, S xc) { note_non_finite(capped(A(xc), softcap), nan_or_inf, above_minus_inf); });
  const bool nan_row = __syncthreads_or(nan_or_inf) || !__syncthreads_or(above_minus_inf);
  const S value = nan_row ? S(NAN) : S(0);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) gi[c] = value;
}

// The same for a position of (N, C, d...) input, by its thread (class stride HW).
template <typename S>
__device__ __forceinline__ void write_ignored_position_gradient(const S* x, S* gi, int64_t C, int64_t HW,
                                                                at::acc_type<S, true> softcap) {
  using A = at::acc_type<S, true>;
  bool nan_or_inf = false, above_minus_inf = false;
  for (int64_t c = 0; c < C; ++c) note_non_finite(capped(A(x[c * HW]), softcap), nan_or_inf, above_minus_inf);
  const S value = nan_or_inf || !above_minus_inf ? S(NAN) : S(0);
  for (int64_t c = 0; c < C; ++c) gi[c * HW] = value;
}

// (N, C): one block per row; kVec classes per load (1, or a 16-byte pack when C is a multiple).
// kWithGrad: after the row's statistics, the same block writes the row's gradient for the scale
// in a.scale (cross_entropy_fwd's grad_mask), re-reading the row while it is still in L2.
template <typename S, int kVec, bool kWithGrad>
__global__ void forward_rows_kernel(CrossEntropyArgs<S> a) {
  using A = at::acc_type<S, true>;
  __shared__ RowPartial<A> warp_partials[32];
  const int64_t C = a.classes;
  const bool linear_sums = a.target_prob != nullptr || a.label_smoothing > 0;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const bool ignored = row_ignored(a, r);
    if (ignored && !a.ignored_row_stats) {
      if (threadIdx.x == 0) {
        a.row_loss[r] = 0;
        a.stats[3 * r] = a.stats[3 * r + 1] = a.stats[3 * r + 2] = 0;
      }
      if constexpr (kWithGrad) write_ignored_row_gradient<S, kVec>(a.input + r * C, a.grad_input + r * C, C, a.softcap);
      continue;
    }
    const S* x = a.input + r * C;
    const S* t = a.target_prob ? a.target_prob + r * C : nullptr;
    const A shift = row_shift(x, a.softcap);
    const bool sums = linear_sums && !ignored;
    RowPartial<A> p = RowPartial<A>::empty();
    for_each_class<S, kVec>(
        x, C, [&](int64_t c, S xc) { accumulate_class(p, a, capped(A(xc), a.softcap), t, c, 1, shift, sums); });
    p = block_reduce(
        p, MergeRowPartial<A>(), warp_partials, [](const RowPartial<A>& v, int o) { return shfl_down(v, o); },
        RowPartial<A>::empty());
    if (threadIdx.x == 0) finish_forward_row(a, r, p, x, 1, shift);
    __syncthreads();  // warp_partials is reused by the next row; the row's stats are visible
    if constexpr (kWithGrad) {
      if (ignored) {
        write_ignored_row_gradient<S, kVec>(x, a.grad_input + r * C, C, a.softcap);
      } else {
        write_row_gradient<S, kVec>(a, r);
      }
    }
  }
}

// (N, C, d...): one thread per position r = n * spatial + s; class c at offset c * spatial.
// kWithGrad: the thread then writes its position's gradient (cross_entropy_fwd's grad_mask).
template <typename S, bool kWithGrad>
__global__ void forward_positions_kernel(CrossEntropyArgs<S> a) {
  using A = at::acc_type<S, true>;
  const int64_t C = a.classes, HW = a.spatial;
  const bool linear_sums = a.target_prob != nullptr || a.label_smoothing > 0;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.rows; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t offset = (r / HW) * C * HW + r % HW;
    const bool ignored = row_ignored(a, r);
    if (ignored && !a.ignored_row_stats) {
      a.row_loss[r] = 0;
      a.stats[3 * r] = a.stats[3 * r + 1] = a.stats[3 * r + 2] = 0;
      if constexpr (kWithGrad)
        write_ignored_position_gradient(a.input + offset, a.grad_input + offset, C, HW, a.softcap);
      continue;
    }
    const S* x = a.input + offset;
    const S* t = a.target_prob ? a.target_prob + offset : nullptr;
    const A shift = row_shift(x, a.softcap);
    RowPartial<A> p = RowPartial<A>::empty();
    for (int64_t c = 0; c < C; ++c)
      accumulate_class(p, a, capped(A(x[c * HW]), a.softcap), t, c, HW, shift, linear_sums && !ignored);
    finish_forward_row(a, r, p, x, HW, shift);
    if constexpr (kWithGrad) {
      if (ignored) {
        write_ignored_position_gradient(x, a.grad_input + offset, C, HW, a.softcap);
      } else {
        const RowGradient<A> g = row_gradient(a, r);
        for (int64_t c = 0; c < C; ++c)
          gradient_class(a, g, capped(A(x[c * HW]), a.softcap), t, a.grad_input + offset, static_cast<S*>(nullptr), c,
                         HW);
      }
    }
  }
}

template <typename S, int kVec>
__global__ void backward_rows_kernel(CrossEntropyArgs<S> a) {
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    // An ignored row without a logsumexp gradient: 0 (or NaN); with one, from its stats.
    if (row_ignored(a, r) && (a.grad_lse == nullptr || a.grad_lse[r] == 0)) {
      if (a.grad_input != nullptr)
        write_ignored_row_gradient<S, kVec>(a.input + r * a.classes, a.grad_input + r * a.classes, a.classes,
                                            a.softcap);
      continue;
    }
    write_row_gradient<S, kVec>(a, r);
  }
}

template <typename S>
__global__ void backward_positions_kernel(CrossEntropyArgs<S> a) {
  using A = at::acc_type<S, true>;
  const int64_t C = a.classes, HW = a.spatial;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.rows; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t offset = (r / HW) * C * HW + r % HW;
    S* gi = a.grad_input ? a.grad_input + offset : nullptr;
    if (row_ignored(a, r) && (a.grad_lse == nullptr || a.grad_lse[r] == 0)) {
      if (gi != nullptr) write_ignored_position_gradient(a.input + offset, gi, C, HW, a.softcap);
      continue;
    }
    const S* x = a.input + offset;
    const S* t = a.target_prob ? a.target_prob + offset : nullptr;
    S* gt = a.grad_target ? a.grad_target + offset : nullptr;
    const RowGradient<A> g = row_gradient(a, r);
    for (int64_t c = 0; c < C; ++c) gradient_class(a, g, capped(A(x[c * HW]), a.softcap), t, gi, gt, c, HW);
  }
}

// ---- host side -------------------------------------------------------------------------------

struct CrossEntropyInputs {
  CrossEntropyLayout layout;
  Tensor input, target, weight;
  Tensor weight_sum, denominator;  // device scalars in the accumulation type
  double softcap;
};

thread_local bool targets_checked_by_caller = false;

// The forward ops check their targets (one synchronization) unless a TargetsChecked is alive;
// the backward ops never do: autograd hands them the targets their forward checked.
enum class TargetCheck { Forward, Backward };

// Contiguous inputs, targets as int64, weight in the accumulation type, and the mean's
// denominator (sum of the kept rows' weights) as a device scalar, summed by ATen's deterministic
// reduction: no host synchronization besides the forward's target check.
CrossEntropyInputs prepare(const char* op, const Tensor& input, const Tensor& target,
                           const std::optional<Tensor>& weight, int64_t ignore_index, double label_smoothing,
                           double z_loss, double softcap, TargetCheck check) {
  CrossEntropyInputs in;
  in.layout = check_cross_entropy_args(op, input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
  in.softcap = softcap;
  const auto acc = input.options().dtype(accumulate_dtype(input));
  in.input = input.contiguous();
  in.weight = weight.has_value() ? weight->to(accumulate_dtype(input)).contiguous() : Tensor();
  in.weight_sum = in.weight.defined() ? in.weight.sum() : at::scalar_tensor(double(in.layout.classes), acc);
  if (in.layout.probabilities) {
    in.target = target.contiguous();
    in.denominator = at::scalar_tensor(double(in.layout.rows()), acc);
    return in;
  }
  in.target = target.to(at::kLong).contiguous();
  const int64_t classes = in.layout.classes;
  if (check == TargetCheck::Forward && !targets_checked_by_caller)
    cuda::check_class_targets(op, in.target, classes, ignore_index);
  const Tensor kept = in.target.ne(ignore_index);
  if (in.weight.defined()) {
    // Clamped: an unchecked bad index must not reach index_select's device-side assert.
    const Tensor safe =
        in.target.masked_fill(kept.logical_not(), 0).clamp(0, std::max<int64_t>(classes - 1, 0)).reshape(-1);
    in.denominator = in.weight.index_select(0, safe).mul(kept.reshape(-1).to(accumulate_dtype(input))).sum();
  } else {
    in.denominator = kept.sum().to(accumulate_dtype(input));
  }
  return in;
}

template <typename S>
CrossEntropyArgs<S> kernel_args(const CrossEntropyInputs& in, int64_t ignore_index, double label_smoothing,
                                double z_loss, const Tensor& stats) {
  using A = at::acc_type<S, true>;
  CrossEntropyArgs<S> a{};
  a.rows = in.layout.rows();
  a.classes = in.layout.classes;
  a.spatial = in.layout.spatial;
  a.input = in.input.const_data_ptr<S>();
  a.target = in.layout.probabilities ? nullptr : in.target.const_data_ptr<int64_t>();
  a.target_prob = in.layout.probabilities ? in.target.const_data_ptr<S>() : nullptr;
  a.weight = in.weight.defined() ? in.weight.const_data_ptr<A>() : nullptr;
  a.ignore_index = ignore_index;
  a.label_smoothing = A(label_smoothing);
  a.z_loss = A(z_loss);
  a.softcap = A(in.softcap);
  a.weight_sum = in.weight_sum.const_data_ptr<A>();
  a.stats = const_cast<A*>(stats.const_data_ptr<A>());
  return a;
}

// 16-byte packs when every row starts 16-byte aligned (C a multiple of the pack, aligned bases).
template <typename S>
bool use_packs(const CrossEntropyArgs<S>& a) {
  constexpr int kVec = 16 / sizeof(S);
  return kVec > 1 && a.spatial == 1 && rows_fit_packs<S, kVec>(a.input, a.classes) &&
         rows_fit_packs<S, kVec>(a.grad_input, a.classes);
}

int threads_for_row(int64_t loads) {
  int threads = 32;
  while (threads < 512 && threads < loads) threads *= 2;
  return threads;
}

int64_t grid_for(int64_t blocks) { return std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 30); }

enum class Pass { Forward, Backward, ForwardWithGrad };

// ForwardWithGrad reads each row a second time right after its statistics: for that read to hit
// L2, the rows of the blocks in flight must fit in it (half of it, for the gradient's writes).
// The kernels loop over rows, so the grid is capped there, at no fewer blocks than multiprocessors.
int64_t blocks_with_rows_in_l2(int64_t rows, int64_t row_bytes) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int64_t fit = int64_t(props->l2CacheSize) / std::max<int64_t>(2 * row_bytes, 1);
  return grid_for(std::min(rows, std::max<int64_t>(fit, props->multiProcessorCount)));
}

template <typename S, int kVec>
void launch_rows(Pass pass, const CrossEntropyArgs<S>& a, int threads, cudaStream_t stream) {
  const int64_t blocks = grid_for(a.rows);
  switch (pass) {
    case Pass::Forward: forward_rows_kernel<S, kVec, false><<<blocks, threads, 0, stream>>>(a); break;
    case Pass::ForwardWithGrad:
      forward_rows_kernel<S, kVec, true>
          <<<blocks_with_rows_in_l2(a.rows, a.classes * int64_t(sizeof(S))), threads, 0, stream>>>(a);
      break;
    case Pass::Backward: backward_rows_kernel<S, kVec><<<blocks, threads, 0, stream>>>(a); break;
  }
}

template <typename S>
void launch(Pass pass, const CrossEntropyArgs<S>& a) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kVec = 16 / sizeof(S) > 0 ? 16 / sizeof(S) : 1;
  if (a.spatial > 1) {
    const int threads = 256;
    const int64_t blocks = grid_for((a.rows + threads - 1) / threads);
    switch (pass) {
      case Pass::Forward: forward_positions_kernel<S, false><<<blocks, threads, 0, stream>>>(a); break;
      case Pass::ForwardWithGrad: forward_positions_kernel<S, true><<<blocks, threads, 0, stream>>>(a); break;
      case Pass::Backward: backward_positions_kernel<S><<<blocks, threads, 0, stream>>>(a); break;
    }
  } else if (use_packs(a)) {
    launch_rows<S, kVec>(pass, a, threads_for_row(a.classes / kVec), stream);
  } else {
    launch_rows<S, 1>(pass, a, threads_for_row(a.classes), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward kernel; given grad_input and `scale` (a device scalar), it also writes the input's
// gradient for d(loss)/d(row loss) = scale, each row's right after its statistics.
void run_forward(const CrossEntropyInputs& in, int64_t ignore_index, double label_smoothing, double z_loss,
                 bool ignored_row_stats, const Tensor& stats, const Tensor& row_loss,
                 const Tensor& grad_input = Tensor(), const Tensor& scale = Tensor()) {
  if (in.layout.rows() == 0 || in.layout.classes == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "cross_entropy_fwd_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    auto a = kernel_args<scalar_t>(in, ignore_index, label_smoothing, z_loss, stats);
    a.row_loss = row_loss.data_ptr<A>();
    a.ignored_row_stats = ignored_row_stats;
    if (grad_input.defined()) {
      a.scale = scale.const_data_ptr<A>();
      a.grad_input = grad_input.data_ptr<scalar_t>();
    }
    launch<scalar_t>(grad_input.defined() ? Pass::ForwardWithGrad : Pass::Forward, a);
  });
}

Tensor reduced_loss(Reduction red, const Tensor& row_loss, const CrossEntropyInputs& in, at::ScalarType dtype) {
  switch (red) {
    case Reduction::None: return row_loss.to(dtype).view(in.layout.loss_shape);
    case Reduction::Sum: return row_loss.sum().to(dtype);
    default: return row_loss.sum().div(in.denominator).to(dtype);
  }
}

void backward_into(const char* op, const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                   const std::optional<Tensor>& weight, const Tensor& stats, int64_t ignore_index,
                   c10::string_view reduction, double label_smoothing, double z_loss, double softcap,
                   const std::optional<Tensor>& grad_lse, Tensor& grad_input, Tensor& grad_target) {
  const Reduction red = parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const CrossEntropyInputs in =
      prepare(op, input, target, weight, ignore_index, label_smoothing, z_loss, softcap, TargetCheck::Backward);
  const int64_t rows = in.layout.rows();
  TORCH_CHECK(!grad_target.defined() || in.layout.probabilities, op,
              ": output_mask[1] asks for the target's gradient, which exists only for class-probability targets");
  check_row_stats(op, input, "input", stats, "stats", rows, accumulate_dtype(input), "cross_entropy_fwd");
  check_same_device(op, input, "input", grad_loss, "grad_loss");
  Tensor row_scale, scale;
  check_grad_loss(op, grad_loss, red, reduction, at::IntArrayRef(in.layout.loss_shape));
  if (red == Reduction::None) {
    row_scale = grad_loss.to(accumulate_dtype(input)).contiguous();
  } else {
    scale = grad_loss.reshape({}).to(accumulate_dtype(input));
    if (red == Reduction::Mean) scale = scale.div(in.denominator);
  }
  Tensor lse_grad;
  if (grad_lse.has_value()) {
    check_grad_lse(op, input, *grad_lse, rows);
    lse_grad = grad_lse->to(accumulate_dtype(input)).contiguous();
  }
  const Tensor stats_c = stats.contiguous();
  if (rows > 0 && in.layout.classes > 0 && (grad_input.defined() || grad_target.defined())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_bwd_cuda", [&] {
      using A = at::acc_type<scalar_t, true>;
      auto a = kernel_args<scalar_t>(in, ignore_index, label_smoothing, z_loss, stats_c);
      a.row_scale = row_scale.defined() ? row_scale.const_data_ptr<A>() : nullptr;
      a.grad_lse = lse_grad.defined() ? lse_grad.const_data_ptr<A>() : nullptr;
      a.scale = scale.defined() ? scale.const_data_ptr<A>() : nullptr;
      a.grad_input = grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr;
      a.grad_target = grad_target.defined() ? grad_target.data_ptr<scalar_t>() : nullptr;
      launch<scalar_t>(Pass::Backward, a);
    });
  }
}

std::tuple<Tensor, Tensor> cross_entropy_bwd_cuda(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                                  const std::optional<Tensor>& weight, const Tensor& stats,
                                                  int64_t ignore_index, c10::string_view reduction,
                                                  double label_smoothing, double z_loss,
                                                  std::array<bool, 2> output_mask, double softcap,
                                                  const std::optional<Tensor>& grad_lse) {
  const c10::cuda::CUDAGuard guard(input.device());
  Tensor grad_input = output_mask[0] ? at::empty(input.sizes(), input.options()) : Tensor();
  Tensor grad_target = output_mask[1] ? at::empty(input.sizes(), input.options()) : Tensor();
  backward_into("torch_ext.cross_entropy_bwd", grad_loss, input, target, weight, stats, ignore_index, reduction,
                label_smoothing, z_loss, softcap, grad_lse, grad_input, grad_target);
  return {grad_input, grad_target};
}

void cross_entropy_bwd_inplace_cuda(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                                    const std::optional<Tensor>& weight, const Tensor& stats, int64_t ignore_index,
                                    c10::string_view reduction, double label_smoothing, double z_loss, double softcap) {
  constexpr const char* op = "torch_ext.cross_entropy_bwd_inplace";
  const c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK(input.is_contiguous(), op, ": input must be contiguous to take its gradient in place");
  Tensor grad_input = input;
  Tensor no_target_grad;
  backward_into(op, grad_loss, input, target, weight, stats, ignore_index, reduction, label_smoothing, z_loss, softcap,
                std::nullopt, grad_input, no_target_grad);
}

// The loss and the stats in one kernel; with grad_mask[0], each row's gradient for grad_loss = 1
// is written right after its statistics, while the row is still in L2, so the logits are read
// from memory once per training step instead of twice (reductions mean and sum). A probability
// target's gradient (grad_mask[1]) is taken by the backward kernel afterwards.
std::tuple<Tensor, Tensor, Tensor, Tensor> cross_entropy_fwd_cuda(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight, int64_t ignore_index,
    c10::string_view reduction, double label_smoothing, double z_loss, std::array<bool, 2> grad_mask, double softcap,
    bool ignored_row_stats, std::optional<at::ScalarType> loss_dtype) {
  constexpr const char* op = "torch_ext.cross_entropy";
  const c10::cuda::CUDAGuard guard(input.device());
  const bool any_grad = grad_mask[0] || grad_mask[1];
  const Reduction red = any_grad ? check_reduction_with_grad_in_forward(op, reduction)
                                 : parse_reduction(std::string_view(reduction.data(), reduction.size()));
  const at::ScalarType dtype = loss_dtype_or_input(op, input, loss_dtype);
  const CrossEntropyInputs in =
      prepare(op, input, target, weight, ignore_index, label_smoothing, z_loss, softcap, TargetCheck::Forward);
  TORCH_CHECK(!grad_mask[1] || in.layout.probabilities, op,
              ": grad_mask[1] asks for the target's gradient, which exists only for class-probability targets");
  const auto acc_options = input.options().dtype(accumulate_dtype(input));
  Tensor stats = at::zeros({in.layout.rows(), 3}, acc_options);
  Tensor row_loss = at::zeros({in.layout.rows()}, acc_options);
  Tensor grad_input, scale;
  if (grad_mask[0]) {
    grad_input = at::empty(input.sizes(), input.options());
    // d(loss)/d(row loss): 1 for sum, 1 / denominator for mean (a device scalar: no sync).
    scale = red == Reduction::Mean ? in.denominator.reciprocal() : at::scalar_tensor(1.0, acc_options);
  }
  run_forward(in, ignore_index, label_smoothing, z_loss, ignored_row_stats, stats, row_loss, grad_input, scale);
  Tensor grad_target;
  if (grad_mask[1]) {
    Tensor no_input_grad;
    grad_target = at::empty(input.sizes(), input.options());
    backward_into(op, at::scalar_tensor(1.0, input.options()), input, target, weight, stats, ignore_index, reduction,
                  label_smoothing, z_loss, softcap, std::nullopt, no_input_grad, grad_target);
  }
  return {reduced_loss(red, row_loss, in, dtype), stats, grad_input, grad_target};
}

}  // namespace

void cuda::check_class_targets(const char* op, const Tensor& target, int64_t classes, int64_t ignore_index) {
  const Tensor bad = target.ne(ignore_index).logical_and(target.lt(0).logical_or(target.ge(classes)));
  if (bad.any().item<bool>()) {  // the one synchronization
    const int64_t first = target.masked_select(bad).reshape(-1)[0].item<int64_t>();
    TORCH_CHECK_INDEX(false, op, ": target ", first, " is out of bounds: class indices must be in [0, ", classes - 1,
                      "] or equal ignore_index (", ignore_index, ")");
  }
}

cuda::TargetsChecked::TargetsChecked() : previous_(targets_checked_by_caller) { targets_checked_by_caller = true; }
cuda::TargetsChecked::~TargetsChecked() { targets_checked_by_caller = previous_; }

TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("cross_entropy_bwd_inplace", &cross_entropy_bwd_inplace_cuda);
}

}  // namespace torch_ext
