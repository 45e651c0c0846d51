// The table of CPU inner kernels (row loops on SIMD registers). Each table is compiled once per
// instruction set (csrc/cpu/capability/), and cpu_kernels() hands out the one that matches
// at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default|avx2|avx512 selects ours too.
// The op files in csrc/cpu/ do the tensor work (checks, GEMMs, threads) and call these.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "activation.h"
#include "loss.h"

namespace torch_ext::cpu {

// Accumulation type of storage type S: double for double, float for float and bfloat16.
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Rows are contiguous in their last dimension; ld* are row strides in elements.
template <typename S>
struct LinearActForwardRows {
  int64_t rows, n;
  S* gemm;  // x @ W.T for these rows; read, and rewritten as gemm + bias when pre_out
  int64_t ld_gemm;
  const S* bias;  // n values, or nullptr
  bool pre_out;   // store gemm + bias back into `gemm` (the saved pre-activation)
  S* out;         // act(gemm + bias); may equal gemm
  int64_t ld_out;
  uint8_t* mask;    // nullptr, or bit j of byte j/8 set where gemm + bias > 0
  int64_t ld_mask;  // bytes per row of mask
};

template <typename S>
struct LinearActBackwardRows {
  int64_t rows, n;
  const S* grad_out;
  int64_t ld_grad_out;
  const S* saved;  // pre-activation or output (see SavedForBackward), or nullptr
  int64_t ld_saved;
  const uint8_t* mask;
  int64_t ld_mask;
  S* grad_pre;  // grad_out * act'(pre)
  int64_t ld_grad_pre;
  // n accumulators: += the sum of grad_pre over these rows, or nullptr. float for bfloat16.
  acc_t<S>* bias_grad;
};

// The MLP activation alone: out = act(input) over (rows, n), or gated: out = act(u) * v where
// input rows are [u | v] of 2n columns. Backward writes grad_input (n or 2n columns) and, when
// out is not null, the forward output again (recomputed rather than saved).
template <typename S>
struct MlpActRows {
  int64_t rows, n;
  bool gated;
  const S* input;
  int64_t ld_input;
  const S* grad_out;  // backward only
  int64_t ld_grad_out;
  S* out;  // or nullptr (backward)
  int64_t ld_out;
  S* grad_input;  // backward, or nullptr
  int64_t ld_grad_input;
};

// Cross-entropy over input viewed as (batch, classes, spatial), contiguous. Row r = n * spatial
// + s holds the logits input[n, :, s]; spatial == 1 is the (N, C) case with unit class stride.
// The kernel runs its own parallel loop over rows.
template <typename S>
struct CrossEntropyArgs {
  using A = acc_t<S>;
  int64_t batch, classes, spatial;
  const S* input;
  const int64_t* target;  // class index per row (already range-checked), or nullptr
  const S* target_prob;   // class probabilities in input's layout, or nullptr
  const A* weight;        // per class, or nullptr
  int64_t ignore_index;
  A label_smoothing, z_loss;
  A softcap;     // > 0: every logit x is taken as softcap * tanh(x / softcap); 0: off
  A weight_sum;  // sum of weight, or classes without weight
  A* stats;      // (rows, 3): max, log(sum exp(x - max)) (their sum is the logsumexp),
                 // and for probability targets sum_c w_c t'_c, for class targets 1 where
                 // the row's argmax (first index of the max) is its target, else 0
  // forward
  A* row_loss;             // unreduced loss per row
  bool ignored_row_stats;  // also the max and log-sum of ignored rows (else their stats are 0)
  // backward: d(loss)/d(row loss) per row, or `scale` for every row when row_scale is null.
  // The (N, C) forward kernel also writes grad_input when it is given (for row_scale / scale).
  const A* row_scale;
  A scale;
  const A* grad_lse;  // per row: the incoming gradient of its logsumexp, or nullptr
  S* grad_input;
  S* grad_target;  // probability targets only, or nullptr
};

// Elementwise regression loss over n contiguous elements. Reductions sum fixed blocks of
// `block` elements into partials (so results do not depend on the thread count); the op file
// adds the partials in order.
template <typename S>
struct RegressionLossArgs {
  using A = acc_t<S>;
  int64_t numel, block;
  const S* input;
  const S* target;
  const S* weight;  // elementwise, or nullptr
  RegressionLoss loss;
  A param;  // delta (huber) or beta (smooth_l1)
  // forward: the per-element loss (reduction none) in S (out) or in A (out_acc: autocast's float32
  // loss of 16-bit inputs, unrounded), or per-block partial sums
  S* out;
  A* out_acc;
  A* loss_partials;
  A* weight_partials;  // sum of weight per block (weighted mean), or nullptr
  // backward: the incoming gradient per element (reduction none) in S (grad_loss) or in A
  // (grad_loss_acc: the gradient of a float32 loss of 16-bit inputs), or `scale` for all. The
  // forward kernel also writes grad_input / grad_target when given (for `scale`).
  const S* grad_loss;
  const A* grad_loss_acc;
  A scale;
  S* grad_input;   // or nullptr
  S* grad_target;  // or nullptr
};

// Triplet margin loss over rows of `dim` contiguous elements.
template <typename S>
struct TripletMarginArgs {
  using A = acc_t<S>;
  int64_t rows, dim;
  const S* anchor;
  const S* positive;
  const S* negative;
  A margin, p, eps;
  bool swap;
  A* dist;  // (rows, 3): d(a, p), d(a, n), d(p, n) (the last only with swap)
  // forward
  A* row_loss;
  // backward, as in CrossEntropyArgs. The forward kernel also writes the gradients given here
  // (non-null), for an incoming gradient `scale` per row.
  const A* row_scale;
  A scale;
  S* grad_anchor;  // each may be nullptr
  S* grad_positive;
  S* grad_negative;
};

// Float32 GEMM: C = A . B, or C += A . B when accumulate. C (m x n) has unit column stride and
// row stride ldc; A(i, p) = a[i * a_rs + p * a_cs], B(p, j) = b[p * b_rs + j * b_cs] (any strides).
// The kernel runs its own parallel loops (csrc/cpu/kernels/gemm.h).
struct GemmF32Args {
  int64_t m, n, k;
  const float* a;
  int64_t a_rs, a_cs;
  const float* b;
  int64_t b_rs, b_cs;
  float* c;
  int64_t ldc;
  bool accumulate;
};

struct CpuKernels {
  const char* capability;
  // nullptr where this instruction set has no GEMM of ours (the DEFAULT build): ATen's is used.
  void (*gemm_f32)(const GemmF32Args&);
  void (*linear_act_forward_f32)(Activation, float, const LinearActForwardRows<float>&);
  void (*linear_act_forward_f64)(Activation, double, const LinearActForwardRows<double>&);
  void (*linear_act_forward_bf16)(Activation, float, const LinearActForwardRows<c10::BFloat16>&);
  void (*linear_act_forward_f16)(Activation, float, const LinearActForwardRows<c10::Half>&);
  void (*linear_act_backward_f32)(Activation, float, const LinearActBackwardRows<float>&);
  void (*linear_act_backward_f64)(Activation, double, const LinearActBackwardRows<double>&);
  void (*linear_act_backward_bf16)(Activation, float, const LinearActBackwardRows<c10::BFloat16>&);
  void (*linear_act_backward_f16)(Activation, float, const LinearActBackwardRows<c10::Half>&);
  void (*mlp_act_forward_f32)(Activation, float, const MlpActRows<float>&);
  void (*mlp_act_forward_f64)(Activation, double, const MlpActRows<double>&);
  void (*mlp_act_forward_bf16)(Activation, float, const MlpActRows<c10::BFloat16>&);
  void (*mlp_act_forward_f16)(Activation, float, const MlpActRows<c10::Half>&);
  void (*mlp_act_backward_f32)(Activation, float, const MlpActRows<float>&);
  void (*mlp_act_backward_f64)(Activation, double, const MlpActRows<double>&);
  void (*mlp_act_backward_bf16)(Activation, float, const MlpActRows<c10::BFloat16>&);
  void (*mlp_act_backward_f16)(Activation, float, const MlpActRows<c10::Half>&);
  void (*cross_entropy_forward_f32)(const CrossEntropyArgs<float>&);
  void (*cross_entropy_forward_f64)(const CrossEntropyArgs<double>&);
  void (*cross_entropy_forward_bf16)(const CrossEntropyArgs<c10::BFloat16>&);
  void (*cross_entropy_forward_f16)(const CrossEntropyArgs<c10::Half>&);
  void (*cross_entropy_backward_f32)(const CrossEntropyArgs<float>&);
  void (*cross_entropy_backward_f64)(const CrossEntropyArgs<double>&);
  void (*cross_entropy_backward_bf16)(const CrossEntropyArgs<c10::BFloat16>&);
  void (*cross_entropy_backward_f16)(const CrossEntropyArgs<c10::Half>&);
  void (*regression_loss_forward_f32)(const RegressionLossArgs<float>&);
  void (*regression_loss_forward_f64)(const RegressionLossArgs<double>&);
  void (*regression_loss_forward_bf16)(const RegressionLossArgs<c10::BFloat16>&);
  void (*regression_loss_forward_f16)(const RegressionLossArgs<c10::Half>&);
  void (*regression_loss_backward_f32)(const RegressionLossArgs<float>&);
  void (*regression_loss_backward_f64)(const RegressionLossArgs<double>&);
  void (*regression_loss_backward_bf16)(const RegressionLossArgs<c10::BFloat16>&);
  void (*regression_loss_backward_f16)(const RegressionLossArgs<c10::Half>&);
  void (*triplet_margin_forward_f32)(const TripletMarginArgs<float>&);
  void (*triplet_margin_forward_f64)(const TripletMarginArgs<double>&);
  void (*triplet_margin_forward_bf16)(const TripletMarginArgs<c10::BFloat16>&);
  void (*triplet_margin_forward_f16)(const TripletMarginArgs<c10::Half>&);
  void (*triplet_margin_backward_f32)(const TripletMarginArgs<float>&);
  void (*triplet_margin_backward_f64)(const TripletMarginArgs<double>&);
  void (*triplet_margin_backward_bf16)(const TripletMarginArgs<c10::BFloat16>&);
  void (*triplet_margin_backward_f16)(const TripletMarginArgs<c10::Half>&);
  // acc (float32) += src (16-bit), n elements (linear_cross_entropy's weight-gradient sum).
  void (*add_widened_bf16)(float* acc, const c10::BFloat16* src, int64_t n);
  void (*add_widened_f16)(float* acc, const c10::Half* src, int64_t n);
};

// Typed access to the table, so op code can be written once over its scalar type: each accessor
// picks the family's entry for S (one of the four; another S does not compile).
template <typename S>
struct KernelsFor {
  template <typename F32, typename F64, typename BF16, typename F16>
  static auto pick(F32 f32, F64 f64, BF16 bf16, F16 f16) {
    if constexpr (std::is_same_v<S, float>) {
      return f32;
    } else if constexpr (std::is_same_v<S, double>) {
      return f64;
    } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
      return bf16;
    } else {
      static_assert(std::is_same_v<S, c10::Half>, "the CPU kernels take float, double, bfloat16 and float16");
      return f16;
    }
  }
#define TORCH_EXT_KERNEL_ACCESSOR(accessor, family)                               \
  static auto accessor(const CpuKernels& k) {                                     \
    return pick(k.family##_f32, k.family##_f64, k.family##_bf16, k.family##_f16); \
  }
  TORCH_EXT_KERNEL_ACCESSOR(forward, linear_act_forward)
  TORCH_EXT_KERNEL_ACCESSOR(backward, linear_act_backward)
  TORCH_EXT_KERNEL_ACCESSOR(mlp_act_forward, mlp_act_forward)
  TORCH_EXT_KERNEL_ACCESSOR(mlp_act_backward, mlp_act_backward)
  TORCH_EXT_KERNEL_ACCESSOR(cross_entropy_forward, cross_entropy_forward)
  TORCH_EXT_KERNEL_ACCESSOR(cross_entropy_backward, cross_entropy_backward)
  TORCH_EXT_KERNEL_ACCESSOR(regression_loss_forward, regression_loss_forward)
  TORCH_EXT_KERNEL_ACCESSOR(regression_loss_backward, regression_loss_backward)
  TORCH_EXT_KERNEL_ACCESSOR(triplet_margin_forward, triplet_margin_forward)
  TORCH_EXT_KERNEL_ACCESSOR(triplet_margin_backward, triplet_margin_backward)
#undef TORCH_EXT_KERNEL_ACCESSOR
};

const CpuKernels& cpu_kernels();

namespace DEFAULT {
const CpuKernels& kernels();
}
namespace AVX2 {
const CpuKernels& kernels();
}
namespace AVX512 {
const CpuKernels& kernels();
}

}  // namespace torch_ext::cpu
