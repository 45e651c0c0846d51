#include "cpu/gemm.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace torch_ext::cpu {

namespace {

// Below this many rows of the product, packing B (k x n values per call) costs more than our
// micro-kernel saves: ATen's GEMM (a matrix-vector product for one row) is 1.4-4x faster at
// 1-16 rows of 256-1024 columns, measured.
constexpr int64_t kMinRows = 32;

bool own_float32_gemm() {
  if (cpu_kernels().gemm_f32 == nullptr) return false;
  const char* env = std::getenv("TORCH_EXT_CPU_GEMM");
  return env == nullptr || std::strcmp(env, "aten") != 0;
}

}  // namespace

const char* float32_gemm() { return own_float32_gemm() ? "ours" : "aten"; }

void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool unit_column_stride = out.size(1) <= 1 || out.stride(1) == 1;
  if (out.is_cpu() && out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      unit_column_stride && a.size(0) >= kMinRows && own_float32_gemm()) {
    GemmF32Args g{a.size(0), b.size(1), a.size(1),
                  a.const_data_ptr<float>(), a.stride(0), a.stride(1),
                  b.const_data_ptr<float>(), b.stride(0), b.stride(1),
                  out.data_ptr<float>(), out.stride(0), accumulate};
    cpu_kernels().gemm_f32(g);
    return;
  }
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

}  // namespace torch_ext::cpu
