// The body of one per-instruction-set build of the CPU kernel table. setup.py compiles the
// wrappers default.cpp, avx2.cpp and avx512.cpp (each only includes this file) as separate
// static libraries, each with its own -m flags and CPU_CAPABILITY / CPU_CAPABILITY_<NAME>
// macros, which is also how ATen builds its vectorized kernels. Their names live in
// torch_ext::cpu::<NAME> (and at::vec::<NAME>), so the builds never collide.
#pragma once

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must be defined by the build (see setup.py)"
#endif

#include "cpu/kernels.h"
#include "cpu/kernels/linear_act.h"

namespace torch_ext::cpu::CPU_CAPABILITY {

#define TORCH_EXT_STRINGIFY_(x) #x
#define TORCH_EXT_STRINGIFY(x) TORCH_EXT_STRINGIFY_(x)

const CpuKernels& kernels() {
  static const CpuKernels table{
      TORCH_EXT_STRINGIFY(CPU_CAPABILITY),
      &linear_act_forward<float, float>,
      &linear_act_forward<double, double>,
      &linear_act_forward<c10::BFloat16, float>,
      &linear_act_backward<float, float>,
      &linear_act_backward<double, double>,
      &linear_act_backward<c10::BFloat16, float>,
  };
  return table;
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
