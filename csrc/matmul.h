// torch_ext's matrix products, for tensors of any device: float32 CPU products that our GEMM
// takes (csrc/cpu/runtime/gemm.h) run on it, every other one on ATen's (on CUDA, cuBLAS / cuBLASLt).
// bfloat16 and float16 CPU products, where ATen's GEMM of that dtype is slow (a reference loop
// without AVX-512, emulated dot products without AVX512-BF16: cpu::aten_reduced_gemm_is_slow),
// run as float32 products of the operands' exact float32 values, rounded once into out: what a
// 16-bit GEMM accumulating in float32 gives, far sooner there.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_ext {

// out = a @ b, or out += a @ b when accumulate. a (m x k) and b (k x n) may have any strides
// (transposed views included); out (m x n) is written through its strides. out has a and b's
// dtype, or is bfloat16 / float16 with float32 a and b (operands widened once by the caller, as
// linear_cross_entropy's chunks share its weight's): the float32 product, rounded once into out.
void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// out = bias + a @ b (bias broadcast over the rows), as at::addmm_out: on our GEMM the bias is
// copied into out first, as ATen's CPU addmm does; elsewhere at::addmm_out (on CUDA cuBLASLt
// can add the bias in its epilogue). dtypes as matmul_into's (bias: out's or float32).
void addmm_into(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b);

// a @ b and F.linear(x, weight, bias) as new tensors, for the ops that take ATen's GEMM as it is
// (FusedMLP's second layer and its backward products): ATen's, bits and all, except bfloat16 and
// float16 CPU products where ATen's GEMM of their dtype is slow, which run in float32 as above.
at::Tensor dense_product(const at::Tensor& a, const at::Tensor& b);
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace torch_ext
