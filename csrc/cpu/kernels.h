// The table of CPU inner kernels (row loops on SIMD registers). Each table is compiled once per
// instruction set (csrc/cpu/capability/), and cpu_kernels() hands out the one that matches
// at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default|avx2|avx512 selects ours too.
// The op files in csrc/cpu/ do the tensor work (checks, GEMMs, threads) and call these.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "activation.h"

namespace torch_ext::cpu {

// Rows are contiguous in their last dimension; ld* are row strides in elements.
template <typename S>
struct LinearActForwardRows {
  int64_t rows, n;
  S* gemm;            // x @ W.T for these rows; read, and rewritten as gemm + bias when pre_out
  int64_t ld_gemm;
  const S* bias;      // n values, or nullptr
  bool pre_out;       // store gemm + bias back into `gemm` (the saved pre-activation)
  S* out;             // act(gemm + bias); may equal gemm
  int64_t ld_out;
  uint8_t* mask;      // nullptr, or bit j of byte j/8 set where gemm + bias > 0
  int64_t ld_mask;    // bytes per row of mask
};

template <typename S>
struct LinearActBackwardRows {
  int64_t rows, n;
  const S* grad_out;
  int64_t ld_grad_out;
  const S* saved;     // pre-activation or output (see SavedForBackward), or nullptr
  int64_t ld_saved;
  const uint8_t* mask;
  int64_t ld_mask;
  S* grad_pre;        // grad_out * act'(pre)
  int64_t ld_grad_pre;
  // n accumulators: += the sum of grad_pre over these rows, or nullptr. float for bfloat16.
  std::conditional_t<std::is_same_v<S, double>, double, float>* bias_grad;
};

struct CpuKernels {
  const char* capability;
  void (*linear_act_forward_f32)(Activation, float, const LinearActForwardRows<float>&);
  void (*linear_act_forward_f64)(Activation, double, const LinearActForwardRows<double>&);
  void (*linear_act_forward_bf16)(Activation, float, const LinearActForwardRows<c10::BFloat16>&);
  void (*linear_act_backward_f32)(Activation, float, const LinearActBackwardRows<float>&);
  void (*linear_act_backward_f64)(Activation, double, const LinearActBackwardRows<double>&);
  void (*linear_act_backward_bf16)(Activation, float, const LinearActBackwardRows<c10::BFloat16>&);
};

// Typed access to the table, so op code can be written once over its scalar type.
template <typename S> struct KernelsFor;
template <> struct KernelsFor<float> {
  static auto forward(const CpuKernels& k) { return k.linear_act_forward_f32; }
  static auto backward(const CpuKernels& k) { return k.linear_act_backward_f32; }
};
template <> struct KernelsFor<double> {
  static auto forward(const CpuKernels& k) { return k.linear_act_forward_f64; }
  static auto backward(const CpuKernels& k) { return k.linear_act_backward_f64; }
};
template <> struct KernelsFor<c10::BFloat16> {
  static auto forward(const CpuKernels& k) { return k.linear_act_forward_bf16; }
  static auto backward(const CpuKernels& k) { return k.linear_act_backward_bf16; }
};

const CpuKernels& cpu_kernels();

namespace DEFAULT { const CpuKernels& kernels(); }
namespace AVX2 { const CpuKernels& kernels(); }
namespace AVX512 { const CpuKernels& kernels(); }

}  // namespace torch_ext::cpu
