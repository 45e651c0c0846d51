#include "runtime_config.h"

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdlib>

namespace torch_ext {
namespace {

void fill_from_environment(RuntimeConfig& config) {
  for (const ConfigEntry& entry : kConfigEntries) {
    const char* env = std::getenv(entry.env);
    if (env != nullptr && *env != '\0') config.set(entry.id, parse_config_text(entry.kind, env, entry.env));
  }
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

const ConfigEntry& config_entry(const std::string& name, const char* caller) {
  std::string names;
  for (const ConfigEntry& entry : kConfigEntries) {
    if (name == entry.name) return entry;
    names += std::string(names.empty() ? "" : ", ") + entry.name;
  }
  TORCH_CHECK_TYPE(false, caller, ": no switch named '", name, "'; they are ", names);
}

int64_t parse_config_text(ConfigKind kind, const std::string& text, const std::string& what) {
  switch (kind) {
    case ConfigKind::GemmChoice:
      if (text == "ours") return int64_t(CpuGemm::Ours);
      if (text == "aten") return int64_t(CpuGemm::Aten);
      TORCH_CHECK_VALUE(text == "auto", what, " must be auto, ours or aten; got '", text, "'");
      return int64_t(CpuGemm::Auto);
    case ConfigKind::Flag: return text == "0" ? 0 : 1;  // the variable turns a path off with 0
    case ConfigKind::Bytes: break;
  }
  errno = 0;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  TORCH_CHECK_VALUE(errno == 0 && end != text.c_str() && *end == '\0', what,
                    " must be a non-negative number of bytes; got '", text, "'");
  return check_config_value(kind, value, what);
}

int64_t check_config_value(ConfigKind kind, int64_t value, const std::string& what) {
  TORCH_CHECK_VALUE(kind != ConfigKind::Bytes || value >= 0, what, " must be a non-negative number of bytes; got ",
                    value);
  return value;
}

const char* cpu_gemm_name(CpuGemm choice) {
  switch (choice) {
    case CpuGemm::Ours: return "ours";
    case CpuGemm::Aten: return "aten";
    default: return "auto";
  }
}

}  // namespace torch_ext
