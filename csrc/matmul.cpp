// See matmul.h.
#include "matmul.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>

#include "allocation.h"
#include "cpu/runtime/gemm.h"

namespace torch_ext {
namespace {

// A bfloat16 / float16 CPU product that ATen would run on its reference loop (matmul.h).
bool reduced_slow_on_aten(const at::Tensor& a, const at::Tensor& b) {
  return a.is_cpu() && a.scalar_type() == b.scalar_type() && cpu::aten_reduced_gemm_is_slow(a.scalar_type());
}

bool reduced_through_float32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return out.scalar_type() == a.scalar_type() && reduced_slow_on_aten(a, b);
}

}  // namespace

void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (reduced_through_float32(out, a, b)) {
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
  if (reduced_through_float32(out, a, b)) {
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

at::Tensor dense_product(const at::Tensor& a, const at::Tensor& b) {
  if (reduced_slow_on_aten(a, b)) return at::mm(a.to(at::kFloat), b.to(at::kFloat)).to(a.scalar_type());
  // ATen's product (mm_out: at::mm's kernel and bits) into a buffer from the ops' output cache
  // (allocation.h), as their other large outputs: a backward that has just freed one of those
  // reuses its block here rather than growing the process by a new one from ATen's allocator.
  at::Tensor out = empty_output({a.size(0), b.size(1)}, a.options());
  return at::mm_out(out, a, b);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (reduced_slow_on_aten(x, weight)) {
    const std::optional<at::Tensor> bias32 = bias.has_value() ? std::optional(bias->to(at::kFloat)) : std::nullopt;
    return at::linear(x.to(at::kFloat), weight.to(at::kFloat), bias32).to(x.scalar_type());
  }
  return at::linear(x, weight, bias);
}

}  // namespace torch_ext
