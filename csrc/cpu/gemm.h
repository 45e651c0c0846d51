// The CPU ops' matrix products. Float32 runs on the GEMM of our own (csrc/cpu/kernels/gemm.h)
// where this machine's kernel table has one (AVX2 and AVX-512 builds; it follows
// ATEN_CPU_CAPABILITY like the other kernels) for products of 32 rows or more; other dtypes,
// smaller products and the DEFAULT build run ATen's. TORCH_EXT_CPU_GEMM=aten (read per call)
// sends float32 to ATen's too.
#pragma once

#include <ATen/core/Tensor.h>

namespace torch_ext::cpu {

// out = a @ b, or out += a @ b when accumulate, for tensors of any device (others than CPU, and
// the cases above, go to ATen). a (m x k) and b (k x n) may have any strides (transposed views
// included); out (m x n) is written through its strides.
void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// Whether float32 products run on our GEMM now ("ours") or on ATen's ("aten").
const char* float32_gemm();

}  // namespace torch_ext::cpu
