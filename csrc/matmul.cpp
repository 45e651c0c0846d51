// See matmul.h.
#include "matmul.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "cpu/runtime/gemm.h"

namespace torch_ext {
namespace {

bool bfloat16_through_float32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return out.is_cpu() && out.scalar_type() == at::kBFloat16 && a.scalar_type() == at::kBFloat16 &&
         b.scalar_type() == at::kBFloat16 && cpu::aten_bfloat16_gemm_is_slow();
}

}  // namespace

void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (bfloat16_through_float32(out, a, b)) {
    at::Tensor out32 = accumulate ? out.to(at::kFloat) : at::empty(out.sizes(), out.options().dtype(at::kFloat));
    matmul_into(out32, a.to(at::kFloat), b.to(at::kFloat), accumulate);
    out.copy_(out32);
  } else if (cpu::takes_own_gemm(out, a, b)) {
    cpu::run_own_gemm(out, a, b, accumulate);
  } else if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void addmm_into(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (bfloat16_through_float32(out, a, b)) {
    at::Tensor out32 = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    addmm_into(out32, bias.to(at::kFloat), a.to(at::kFloat), b.to(at::kFloat));
    out.copy_(out32);
  } else if (cpu::takes_own_gemm(out, a, b)) {
    out.copy_(bias.expand_as(out));
    cpu::run_own_gemm(out, a, b, /*accumulate=*/true);
  } else {
    at::addmm_out(out, bias, a, b);
  }
}

}  // namespace torch_ext
