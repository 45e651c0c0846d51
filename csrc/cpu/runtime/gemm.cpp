#include "cpu/runtime/gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstring>
#include <string_view>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "cpu/runtime/kernel_table.h"
#include "runtime_config.h"

namespace torch_ext::cpu {

namespace {

// Below this many rows of the product, packing B (k x n values per call) costs more than our
// micro-kernel saves: ATen's GEMM (a matrix-vector product for one row) measured faster at
// 1-16 rows of 256-1024 columns.
constexpr int64_t kMinRows = 32;

bool amd_cpu() {
  static const bool amd = [] {
#if defined(__x86_64__) || defined(__i386__)
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return false;
    char vendor[13] = {};
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    return std::string_view(vendor) == "AuthenticAMD";
#else
    return false;
#endif
  }();
  return amd;
}

// The config's cpu_gemm (csrc/runtime_config.h): "ours", "aten", or "auto": ours on AMD CPUs
// running the AVX-512 kernels, where it was measured faster than ATen's (MKL's) float32 GEMM;
// ATen's elsewhere: with AVX2 ours was no faster at the median (docs/cpu.md), and on Intel CPUs,
// which MKL is tuned for, it has not been measured.
bool own_float32_gemm() {
  if (cpu_kernels().gemm_f32 == nullptr) return false;
  switch (runtime_config().gemm()) {
    case CpuGemm::Ours: return true;
    case CpuGemm::Aten: return false;
    default: return amd_cpu() && std::string_view(cpu_kernels().capability) == "AVX512";
  }
}

}  // namespace

const char* float32_gemm() { return own_float32_gemm() ? "ours" : "aten"; }

bool aten_reduced_gemm_is_slow(at::ScalarType dtype) {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports also checks that the OS saves the AVX-512 registers. oneDNN's bfloat16
  // GEMM runs at its speed only with AVX512-BF16 dot products (AMX CPUs have them too); on AVX-512
  // without them it emulates the dot products, and without AVX-512 ATen runs a reference loop.
  static const bool bfloat16_slow = !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16"));
  static const bool float16_slow = !__builtin_cpu_supports("avx512fp16");
  return dtype == at::kBFloat16 ? bfloat16_slow : dtype == at::kHalf && float16_slow;
#else
  (void)dtype;
  return false;
#endif
}

bool takes_own_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const bool unit_column_stride = out.size(1) <= 1 || out.stride(1) == 1;
  return out.is_cpu() && out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
         b.scalar_type() == at::kFloat && unit_column_stride && a.size(0) >= kMinRows && own_float32_gemm();
}

void run_own_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  GemmF32Args g{a.size(0),
                b.size(1),
                a.size(1),
                a.const_data_ptr<float>(),
                a.stride(0),
                a.stride(1),
                b.const_data_ptr<float>(),
                b.stride(0),
                b.stride(1),
                out.data_ptr<float>(),
                out.stride(0),
                accumulate};
  cpu_kernels().gemm_f32(g);
}

}  // namespace torch_ext::cpu
