// torch_ext's run-time switches, in one object: read from the environment once, when torch_ext
// is imported, and changed after that only through torch_ext.set_config() (torch_ext/_config.py),
// which checks each value. Kernels read the current value on each call (atomics: a change from
// another thread takes effect at the next call, never in the middle of one).
//
//   cpu_gemm         TORCH_EXT_CPU_GEMM         auto | ours | aten: which float32 GEMM the CPU ops'
//                                               products of 32 rows or more take (csrc/cpu/runtime/gemm.h)
//   panel_bytes      TORCH_EXT_PANEL_BYTES      > 0: fused_linear's CPU panel size, exactly (tuning,
//                                               tests); 0: the default rule (csrc/cpu/linear_act.cpp)
//   cublaslt         TORCH_EXT_CUBLASLT         0 turns the cuBLASLt epilogue paths off (diagnosis)
//   cpu_cache_bytes  TORCH_EXT_CPU_CACHE_BYTES  the bound on cached free CPU output blocks; 0: no
//                                               cache (csrc/cpu/runtime/allocator.h)
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

namespace torch_ext {

enum class CpuGemm : int { Auto = 0, Ours = 1, Aten = 2 };

struct RuntimeConfig {
  std::atomic<int> cpu_gemm{int(CpuGemm::Auto)};
  std::atomic<int64_t> panel_bytes{0};
  std::atomic<bool> cublaslt{true};
  std::atomic<int64_t> cpu_cache_bytes{int64_t(2) << 30};

  CpuGemm gemm() const { return CpuGemm(cpu_gemm.load(std::memory_order_relaxed)); }
};

// The one config, filled from the environment on first use (torch_ext._C's import makes that
// first use). A bad environment value raises there, naming the variable.
RuntimeConfig& runtime_config();

// "auto" / "ours" / "aten", and back; the parse raises on any other value, naming `what`.
const char* cpu_gemm_name(CpuGemm choice);
CpuGemm parse_cpu_gemm(const std::string& value, const char* what);

}  // namespace torch_ext
