#include "runtime_config.h"

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdlib>

namespace torch_ext {
namespace {

// A non-negative integer from the environment variable `name`, or `fallback` when unset.
int64_t env_bytes(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  errno = 0;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK(errno == 0 && end != env && *end == '\0' && value >= 0, name,
              " must be a non-negative number of bytes; got '", env, "'");
  return value;
}

void fill_from_environment(RuntimeConfig& config) {
  if (const char* gemm = std::getenv("TORCH_EXT_CPU_GEMM"))
    config.cpu_gemm = int(parse_cpu_gemm(gemm, "TORCH_EXT_CPU_GEMM"));
  config.panel_bytes = env_bytes("TORCH_EXT_PANEL_BYTES", 0);
  const char* lt = std::getenv("TORCH_EXT_CUBLASLT");
  config.cublaslt = lt == nullptr || std::string(lt) != "0";
  config.cpu_cache_bytes = env_bytes("TORCH_EXT_CPU_CACHE_BYTES", int64_t(2) << 30);
}

}  // namespace

RuntimeConfig& runtime_config() {
  // Leaked on purpose: kernels running during static destruction at exit may still read it.
  static RuntimeConfig* config = [] {
    auto* c = new RuntimeConfig();
    fill_from_environment(*c);
    return c;
  }();
  return *config;
}

const char* cpu_gemm_name(CpuGemm choice) {
  switch (choice) {
    case CpuGemm::Ours: return "ours";
    case CpuGemm::Aten: return "aten";
    default: return "auto";
  }
}

CpuGemm parse_cpu_gemm(const std::string& value, const char* what) {
  if (value == "ours") return CpuGemm::Ours;
  if (value == "aten") return CpuGemm::Aten;
  TORCH_CHECK(value == "auto" || value.empty(), what, " must be auto, ours or aten; got '", value, "'");
  return CpuGemm::Auto;
}

}  // namespace torch_ext
