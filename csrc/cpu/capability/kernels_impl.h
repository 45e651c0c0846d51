// The body of one per-instruction-set build of the CPU kernel table. setup.py compiles the
// wrappers default.cpp, avx2.cpp and avx512.cpp (each only includes this file) as separate
// static libraries, each with its own -m flags and CPU_CAPABILITY / CPU_CAPABILITY_<NAME>
// macros, which is also how ATen builds its vectorized kernels. Their names live in
// torch_ext::cpu::<NAME> (and at::vec::<NAME>), so the builds never collide.
#pragma once

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must be defined by the build (see setup.py)"
#endif

#include "cpu/kernels/cross_entropy.h"
#include "cpu/kernels/gemm.h"
#include "cpu/kernels/linear_act.h"
#include "cpu/kernels/linear_cross_entropy.h"
#include "cpu/kernels/mlp_act.h"
#include "cpu/kernels/regression_loss.h"
#include "cpu/kernels/triplet_margin_loss.h"
#include "cpu/runtime/kernel_table.h"

namespace torch_ext::cpu::CPU_CAPABILITY {

#define TORCH_EXT_STRINGIFY_(x) #x
#define TORCH_EXT_STRINGIFY(x) TORCH_EXT_STRINGIFY_(x)

const CpuKernels& kernels() {
  // Named fields (C++20 designated initializers, in the struct's order): an entry cannot land
  // in another's place.
  static const CpuKernels table{
      .capability = TORCH_EXT_STRINGIFY(CPU_CAPABILITY),
#if defined(CPU_CAPABILITY_DEFAULT)
      .gemm_f32 = nullptr,  // Vectorized<float> is emulated there: ATen's GEMM is faster
#else
      .gemm_f32 = &gemm_f32,
#endif
      .linear_act_forward_f32 = &linear_act_forward<float, float>,
      .linear_act_forward_f64 = &linear_act_forward<double, double>,
      .linear_act_forward_bf16 = &linear_act_forward<c10::BFloat16, float>,
      .linear_act_forward_f16 = &linear_act_forward<c10::Half, float>,
      .linear_act_backward_f32 = &linear_act_backward<float, float>,
      .linear_act_backward_f64 = &linear_act_backward<double, double>,
      .linear_act_backward_bf16 = &linear_act_backward<c10::BFloat16, float>,
      .linear_act_backward_f16 = &linear_act_backward<c10::Half, float>,
      .mlp_act_forward_f32 = &mlp_act_forward<float, float>,
      .mlp_act_forward_f64 = &mlp_act_forward<double, double>,
      .mlp_act_forward_bf16 = &mlp_act_forward<c10::BFloat16, float>,
      .mlp_act_forward_f16 = &mlp_act_forward<c10::Half, float>,
      .mlp_act_backward_f32 = &mlp_act_backward<float, float>,
      .mlp_act_backward_f64 = &mlp_act_backward<double, double>,
      .mlp_act_backward_bf16 = &mlp_act_backward<c10::BFloat16, float>,
      .mlp_act_backward_f16 = &mlp_act_backward<c10::Half, float>,
      .cross_entropy_forward_f32 = &cross_entropy_forward<float>,
      .cross_entropy_forward_f64 = &cross_entropy_forward<double>,
      .cross_entropy_forward_bf16 = &cross_entropy_forward<c10::BFloat16>,
      .cross_entropy_forward_f16 = &cross_entropy_forward<c10::Half>,
      .cross_entropy_backward_f32 = &cross_entropy_backward<float>,
      .cross_entropy_backward_f64 = &cross_entropy_backward<double>,
      .cross_entropy_backward_bf16 = &cross_entropy_backward<c10::BFloat16>,
      .cross_entropy_backward_f16 = &cross_entropy_backward<c10::Half>,
      .regression_loss_forward_f32 = &regression_loss_forward<float>,
      .regression_loss_forward_f64 = &regression_loss_forward<double>,
      .regression_loss_forward_bf16 = &regression_loss_forward<c10::BFloat16>,
      .regression_loss_forward_f16 = &regression_loss_forward<c10::Half>,
      .regression_loss_backward_f32 = &regression_loss_backward<float>,
      .regression_loss_backward_f64 = &regression_loss_backward<double>,
      .regression_loss_backward_bf16 = &regression_loss_backward<c10::BFloat16>,
      .regression_loss_backward_f16 = &regression_loss_backward<c10::Half>,
      .triplet_margin_forward_f32 = &triplet_margin_forward<float>,
      .triplet_margin_forward_f64 = &triplet_margin_forward<double>,
      .triplet_margin_forward_bf16 = &triplet_margin_forward<c10::BFloat16>,
      .triplet_margin_forward_f16 = &triplet_margin_forward<c10::Half>,
      .triplet_margin_backward_f32 = &triplet_margin_backward<float>,
      .triplet_margin_backward_f64 = &triplet_margin_backward<double>,
      .triplet_margin_backward_bf16 = &triplet_margin_backward<c10::BFloat16>,
      .triplet_margin_backward_f16 = &triplet_margin_backward<c10::Half>,
      .add_widened_bf16 = &add_widened<c10::BFloat16>,
      .add_widened_f16 = &add_widened<c10::Half>,
  };
  return table;
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
