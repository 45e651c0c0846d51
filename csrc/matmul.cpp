// See matmul.h.
#include "matmul.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "cpu/runtime/gemm.h"

namespace torch_ext {

void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (cpu::takes_own_gemm(out, a, b)) {
    cpu::run_own_gemm(out, a, b, accumulate);
  } else if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void addmm_into(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (cpu::takes_own_gemm(out, a, b)) {
    out.copy_(bias.expand_as(out));
    cpu::run_own_gemm(out, a, b, /*accumulate=*/true);
  } else {
    at::addmm_out(out, bias, a, b);
  }
}

}  // namespace torch_ext
