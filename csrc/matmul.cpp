// See matmul.h.
#include "matmul.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include "allocation.h"
#include "cpu/runtime/gemm.h"

#include <algorithm>
#include <vector>

namespace torch_ext {
namespace {

// A bfloat16 / float16 CPU product whose ATen GEMM is slow here (matmul.h).
bool reduced_slow_on_aten(const at::Tensor& a, const at::Tensor& b) {
  return a.is_cpu() && a.scalar_type() == b.scalar_type() && cpu::aten_reduced_gemm_is_slow(a.scalar_type());
}

// A product through float32 (matmul.h): 16-bit CPU operands whose ATen GEMM is slow, into out of
// their dtype or float32; or float32 operands into a 16-bit out.
bool through_float32(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto is_16_bit = [](at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; };
  if (a.scalar_type() == at::kFloat) return is_16_bit(out.scalar_type());
  return reduced_slow_on_aten(a, b) && (out.scalar_type() == a.scalar_type() || out.scalar_type() == at::kFloat);
}

// Float32 bytes that one block of a product through float32 widens at once (below).
constexpr int64_t kFloat32BlockBytes = int64_t(2) << 20;

// Units (rows, columns or k) of a block when each unit widens `floats` values: ~kFloat32BlockBytes,
// and at least 256 so that each block's GEMM stays large.
int64_t block_units(int64_t floats) {
  return std::max<int64_t>(256, kFloat32BlockBytes / (int64_t(sizeof(float)) * std::max<int64_t>(1, floats)));
}

// out = [bias +] a @ b, or out += a @ b, as float32 products (through_float32), rounded once into a
// 16-bit out. 16-bit operands are widened a block at a time, cut along the largest of m, n and k
// (the other operand, the smaller, widened whole), so the float32 copies held at once stay near
// kFloat32BlockBytes beyond it: whole float32 copies of the operands and of out raised
// fused_linear's peak above eager's (bfloat16 8192x256->256: 28.3 MB against 19.9) and
// linear_cross_entropy's by its weight's float32 copy. Float32 operands are multiplied whole.
void product_through_float32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                             const std::optional<at::Tensor>& bias) {
  const int64_t m = out.size(0), n = out.size(1), k = a.size(1);
  const bool out_float = out.scalar_type() == at::kFloat;
  const auto wide = [](const at::Tensor& t) { return t.to(at::kFloat); };
  // One block: out_block = [bias_block +] a32 @ b32 (or +=), through a float32 copy of a 16-bit out.
  const auto block = [&](at::Tensor out_block, const at::Tensor& a32, const at::Tensor& b32,
                         const std::optional<at::Tensor>& bias_block) {
    at::Tensor out32 = out_float                               ? out_block
                       : accumulate && !bias_block.has_value() ? wide(out_block)
                                                               : at::empty(out_block.sizes(), a32.options());
    if (bias_block.has_value()) {
      addmm_into(out32, wide(*bias_block), a32, b32);
    } else {
      matmul_into(out32, a32, b32, accumulate);
    }
    if (!out_float) out_block.copy_(out32);
  };
  if (a.scalar_type() == at::kFloat) {
    block(out, a, b, bias);
  } else if (k >= m && k >= n) {
    // Along k: out (or its float32 copy) accumulates the blocks' products.
    at::Tensor out32 = out_float ? out : accumulate ? wide(out) : at::empty({m, n}, out.options().dtype(at::kFloat));
    bool added = accumulate;  // whether out32 holds a sum to add to
    if (bias.has_value() && !accumulate) {
      out32.copy_(bias->expand({m, n}));
      added = true;
    }
    if (!added && k == 0) out32.zero_();
    const int64_t step = block_units(m + n);
    for (int64_t p0 = 0; p0 < k; p0 += step) {
      const int64_t len = std::min(step, k - p0);
      matmul_into(out32, wide(a.narrow(1, p0, len)), wide(b.narrow(0, p0, len)), /*accumulate=*/added || p0 > 0);
    }
    if (!out_float) out.copy_(out32);
  } else if (m >= n) {
    const at::Tensor b32 = wide(b);
    const int64_t step = block_units(k + n);
    for (int64_t r0 = 0; r0 < m; r0 += step) {
      const int64_t len = std::min(step, m - r0);
      block(out.narrow(0, r0, len), wide(a.narrow(0, r0, len)), b32, bias);
    }
  } else {
    const at::Tensor a32 = wide(a);
    const int64_t step = block_units(k + m);
    for (int64_t c0 = 0; c0 < n; c0 += step) {
      const int64_t len = std::min(step, n - c0);
      const std::optional<at::Tensor> bias_block =
          bias.has_value() ? std::optional(bias->narrow(0, c0, len)) : std::nullopt;
      block(out.narrow(1, c0, len), a32, wide(b.narrow(1, c0, len)), bias_block);
    }
  }
}

}  // namespace

void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (through_float32(out, a, b)) {
    product_through_float32(out, a, b, accumulate, std::nullopt);
  } else if (cpu::takes_own_gemm(out, a, b)) {
    cpu::run_own_gemm(out, a, b, accumulate);
  } else if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

void addmm_into(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (through_float32(out, a, b)) {
    product_through_float32(out, a, b, /*accumulate=*/false, bias);
  } else if (cpu::takes_own_gemm(out, a, b)) {
    out.copy_(bias.expand_as(out));
    cpu::run_own_gemm(out, a, b, /*accumulate=*/true);
  } else {
    at::addmm_out(out, bias, a, b);
  }
}

at::Tensor dense_product(const at::Tensor& a, const at::Tensor& b) {
  // ATen's product (mm_out: at::mm's kernel and bits) into a buffer from the ops' output cache
  // (allocation.h), as their other large outputs: a backward that has just freed one of those
  // reuses its block here rather than growing the process by a new one from ATen's allocator.
  at::Tensor out = empty_output({a.size(0), b.size(1)}, a.options());
  if (reduced_slow_on_aten(a, b)) {
    product_through_float32(out, a, b, /*accumulate=*/false, std::nullopt);
    return out;
  }
  return at::mm_out(out, a, b);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (reduced_slow_on_aten(x, weight)) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = weight.size(0);
    at::Tensor out = at::empty(sizes, x.options());
    at::Tensor out2d = out.view({-1, weight.size(0)});
    product_through_float32(out2d, x.reshape({-1, x.size(-1)}), weight.t(), /*accumulate=*/false, bias);
    return out;
  }
  return at::linear(x, weight, bias);
}

}  // namespace torch_ext
