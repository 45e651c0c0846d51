// Row-major GEMMs through cuBLASLt with its fused epilogues, for the dense-layer ops on CUDA.
//
//   out = a @ b (+ bias)                                  LtEpilogue::None
//   out = gelu_tanh(a @ b (+ bias)), aux = pre-activation LtEpilogue::GeluTanhAux
//   out = gelu_tanh(a @ b (+ bias)) (inference)           LtEpilogue::GeluTanh
//   out = a @ b, bias_grad = a.sum(1)                     LtEpilogue::BiasGradOfA
// No RELU_AUX: its mask bit is set where x >= 0 (CUTLASS's epilogues: relu(x) == x on sm_90,
// !(x < 0) on sm_80) and relu(NaN) is 0, where PyTorch's relu keeps NaN and its backward passes
// the gradient only where x > 0; linear_act's relu takes the bias epilogue and its own pass.
//
//   out += a @ b (accumulate, LtEpilogue::None)
//
// a (m, k), b (k, n): 2-D, each with unit stride in one dimension (row- or column-major, so
// x.t() views need no copy); out (m, n) row-major, of a's dtype, or float32 when a and b are
// float16/bfloat16 (no epilogue: float32 accumulation of 16-bit products, e.g. a weight gradient
// summed over chunks). The aux matrix has one row per row of out: aux_ld elements (GeluTanhAux, a
// multiple of 8).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace torch_ext::cuda {

enum class LtEpilogue { None, GeluTanhAux, GeluTanh, BiasGradOfA };

struct LtEpilogueArgs {
  LtEpilogue kind = LtEpilogue::None;
  const void* bias = nullptr;  // (n,), out's dtype, or nullptr: None / GeluTanhAux / GeluTanh
  void* aux = nullptr;         // GeluTanhAux
  int64_t aux_ld = 0;
  void* bias_grad = nullptr;  // (m,), out's dtype: BiasGradOfA
  bool accumulate = false;    // out += a @ b instead of out = a @ b
};

// Whether the epilogue's vectors (bias, aux, bias_grad; absent ones pass) are 16-byte aligned.
// cuBLASLt's heuristic is told only A, B, C and D's alignment, and its epilogue kernels load these
// vectors 16 bytes at a time: a bias sliced at an odd offset of a flat parameter buffer would
// fault and poison the CUDA context. lt_gemm declines (unfused path) unless this holds.
inline bool lt_epilogue_pointers_aligned(const LtEpilogueArgs& e) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return aligned(e.bias) && aligned(e.aux) && aligned(e.bias_grad);
}

// Whether cuBLASLt may be used at all: the config's cublaslt (csrc/runtime_config.h;
// TORCH_EXT_CUBLASLT=0 or torch_ext.set_config(cublaslt=False) turn it off, for diagnosis and for
// the tests that compare both paths); the default is on.
bool cublaslt_enabled();

// Whether lt_gemm takes this dtype: float16, bfloat16, float32 (float64 goes through ATen).
bool cublaslt_dtype(at::ScalarType dtype);

// Runs the GEMM with the epilogue and returns true, or returns false without side effects when
// the operands' layouts or the epilogue's pointers do not suit cuBLASLt, or its heuristic gives
// no algorithm for any reason (NOT_SUPPORTED, or INVALID_VALUE as for operands of a single row or
// column): callers then warn once, with `why_not` (if given) set to the reason, and take their
// unfused path. A failing matmul, once an algorithm was found, is an error. m, n, k must be > 0.
bool lt_gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const LtEpilogueArgs& epilogue,
             std::string* why_not = nullptr);

}  // namespace torch_ext::cuda
