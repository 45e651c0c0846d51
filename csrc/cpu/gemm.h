// The CPU ops' matrix products. Float32 products of 32 rows or more run on the GEMM of our own
// (csrc/cpu/kernels/gemm.h; AVX2 and AVX-512 builds, following ATEN_CPU_CAPABILITY like the other
// kernels) on AMD CPUs, where it was measured faster than ATen's; everything else runs ATen's.
// TORCH_EXT_CPU_GEMM (read per call) = ours | aten | auto (the default) overrides the choice.
//
// This departs from DESIGN.md ("we do not write our own CPU GEMM"): on the development machine
// (AMD EPYC, 2 cores) ATen's float32 GEMM (MKL's sgemm) runs well below the FMA peak, and the
// dense layer's GEMMs alone took nearly all of eager's step at 8192x256->256, which left the
// fused layer's goal (1.15x eager) to chance; ours runs them faster (docs/cpu.md has the figures).
#pragma once

#include <ATen/core/Tensor.h>

namespace torch_ext::cpu {

// out = a @ b, or out += a @ b when accumulate, for tensors of any device (others than CPU, and
// the cases above, go to ATen). a (m x k) and b (k x n) may have any strides (transposed views
// included); out (m x n) is written through its strides.
void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// out = bias + a @ b (bias broadcast over the rows), as at::addmm_out: on our GEMM the bias is
// copied into out first, as ATen's CPU addmm does; elsewhere at::addmm_out (on CUDA cuBLASLt
// can add the bias in its epilogue).
void addmm_into(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b);

// Whether float32 products run on our GEMM now ("ours") or on ATen's ("aten").
const char* float32_gemm();

}  // namespace torch_ext::cpu
