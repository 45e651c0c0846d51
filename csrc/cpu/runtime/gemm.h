// The float32 GEMM of our own, for torch_ext's matrix products (csrc/matmul.h, which runs every
// other product on ATen). Float32 products of 32 rows or more run on it
// (csrc/cpu/kernels/gemm.h; AVX2 and AVX-512 builds, following ATEN_CPU_CAPABILITY like the other
// kernels) on AMD CPUs running the AVX-512 kernels, where it was measured faster than ATen's;
// everything else runs ATen's.
// The config's cpu_gemm (csrc/runtime_config.h; TORCH_EXT_CPU_GEMM, torch_ext.set_config) = ours |
// aten | auto (the default) overrides the choice.
//
// It is the one exception to docs/design.md's rule that GEMMs go through a library: on the
// development machine (AMD EPYC, 2 cores) ATen's float32 GEMM (MKL's sgemm) runs well below the
// FMA peak, and the dense layer's GEMMs alone took nearly all of eager's step at 8192x256->256,
// which left the fused layer's goal (1.15x eager) to chance; ours runs them faster (docs/cpu.md
// has the figures, and those of oneDNN's and OpenBLAS's GEMMs).
#pragma once

#include <ATen/core/Tensor.h>

namespace torch_ext::cpu {

// Whether out = a @ b (2-D, of any device) runs on our GEMM, by the rule above.
bool takes_own_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out = a @ b, or out += a @ b when accumulate, on our GEMM (where takes_own_gemm): a (m x k) and
// b (k x n) with any strides, out (m x n) with unit column stride.
void run_own_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// Whether float32 products run on our GEMM now ("ours") or on ATen's ("aten").
const char* float32_gemm();

// Whether ATen's CPU GEMM of this 16-bit dtype runs far below the float32 GEMM of the same shape
// here (docs/cpu.md has the figures). bfloat16: oneDNN's GEMM is fast only with AVX512-BF16 dot
// products; on other AVX-512 CPUs it emulates them (4-5x below float32), and without AVX-512 F,
// BW, VL and DQ (ATen's mkldnn_bf16_device_check) ATen runs a reference loop. float16: oneDNN
// takes it only with AVX-512 FP16 or AMX-FP16 (mkldnn_fp16_device_check; AMX-FP16 CPUs have
// AVX-512 FP16 too), elsewhere a reference loop. False for other dtypes.
bool aten_reduced_gemm_is_slow(at::ScalarType dtype);

}  // namespace torch_ext::cpu
