// Picks the CPU kernel table for this machine, once, the way ATen picks its own kernels.
#include <ATen/Version.h>

#include "cpu/runtime/kernel_table.h"

namespace torch_ext::cpu {

const CpuKernels& cpu_kernels() {
  static const CpuKernels& table = []() -> const CpuKernels& {
#if TORCH_EXT_CPU_CAPABILITIES >= 3
    // "AVX512", "AVX2" or "DEFAULT"; honours ATEN_CPU_CAPABILITY like ATen's DispatchStub.
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return AVX512::kernels();
    if (capability == "AVX2") return AVX2::kernels();
#endif
    return DEFAULT::kernels();
  }();
  return table;
}

}  // namespace torch_ext::cpu
