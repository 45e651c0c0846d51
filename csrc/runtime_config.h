// torch_ext's run-time switches, in one object: read from the environment once, when torch_ext
// is imported, and changed after that only through torch_ext.set_config() (torch_ext/_config.py).
// Kernels read the current value on each call (atomics: a change from another thread takes
// effect at the next call, never in the middle of one). The table kConfigEntries is the one
// statement of the switches' names, variables and rules; the Python functions only forward.
//
//   cpu_gemm         TORCH_EXT_CPU_GEMM         auto | ours | aten: which float32 GEMM the CPU ops'
//                                               products of 32 rows or more take (csrc/cpu/runtime/gemm.h)
//   panel_bytes      TORCH_EXT_PANEL_BYTES      > 0: fused_linear's CPU panel size, exactly (tuning,
//                                               tests); 0: the default rule (csrc/cpu/linear_act.cpp)
//   cublaslt         TORCH_EXT_CUBLASLT         0 turns the cuBLASLt epilogue paths off (diagnosis)
//   cpu_cache_bytes  TORCH_EXT_CPU_CACHE_BYTES  the bound on cached free CPU output blocks; 0: no
//                                               cache (csrc/cpu/runtime/allocator.h)
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

namespace torch_ext {

enum class CpuGemm : int64_t { Auto = 0, Ours = 1, Aten = 2 };

// What a switch holds: one of the GEMM names, a byte count >= 0, or on/off.
enum class ConfigKind { GemmChoice, Bytes, Flag };

enum class Switch : size_t { CpuGemm, PanelBytes, Cublaslt, CpuCacheBytes, Count };

struct ConfigEntry {
  Switch id;
  const char* name;  // set_config's keyword
  const char* env;   // the environment variable read at import
  ConfigKind kind;
  int64_t initial;  // the value when the variable is unset (Flag: 1 on, 0 off)
};

inline constexpr std::array<ConfigEntry, size_t(Switch::Count)> kConfigEntries{{
    {Switch::CpuGemm, "cpu_gemm", "TORCH_EXT_CPU_GEMM", ConfigKind::GemmChoice, int64_t(CpuGemm::Auto)},
    {Switch::PanelBytes, "panel_bytes", "TORCH_EXT_PANEL_BYTES", ConfigKind::Bytes, 0},
    {Switch::Cublaslt, "cublaslt", "TORCH_EXT_CUBLASLT", ConfigKind::Flag, 1},
    {Switch::CpuCacheBytes, "cpu_cache_bytes", "TORCH_EXT_CPU_CACHE_BYTES", ConfigKind::Bytes, int64_t(2) << 30},
}};

constexpr bool config_entries_in_switch_order() {
  for (size_t i = 0; i < kConfigEntries.size(); ++i)
    if (size_t(kConfigEntries[i].id) != i) return false;
  return true;
}
static_assert(config_entries_in_switch_order(), "kConfigEntries[i] must describe Switch i");

class RuntimeConfig {
 public:
  RuntimeConfig() {
    for (const ConfigEntry& entry : kConfigEntries) set(entry.id, entry.initial);
  }
  // A switch's value as an integer (cpu_gemm: its CpuGemm, cublaslt: 0 or 1); set() takes one
  // that passed the checks below.
  int64_t get(Switch s) const { return values_[size_t(s)].load(std::memory_order_relaxed); }
  void set(Switch s, int64_t value) { values_[size_t(s)].store(value, std::memory_order_relaxed); }
  CpuGemm gemm() const { return CpuGemm(get(Switch::CpuGemm)); }

 private:
  std::array<std::atomic<int64_t>, size_t(Switch::Count)> values_;
};

// The one config, filled from the environment on first use (torch_ext._C's import makes that
// first use). A bad environment value raises there, naming the variable.
RuntimeConfig& runtime_config();

// The entry named `name`; raises TypeError (as for an unknown keyword argument) listing the names.
const ConfigEntry& config_entry(const std::string& name, const char* caller);

// The rules of each kind, for both sources: `text` is an environment value or a GEMM name; an
// integer from Python is checked by check_config_value. Both raise ValueError naming `what`.
int64_t parse_config_text(ConfigKind kind, const std::string& text, const std::string& what);
int64_t check_config_value(ConfigKind kind, int64_t value, const std::string& what);

// "auto" / "ours" / "aten".
const char* cpu_gemm_name(CpuGemm choice);

}  // namespace torch_ext
