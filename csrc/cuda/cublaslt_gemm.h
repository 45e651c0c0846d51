// Row-major GEMMs through cuBLASLt with its fused epilogues, for the dense-layer ops on CUDA.
//
//   out = a @ b (+ bias)                                  LtEpilogue::None
//   out = relu(a @ b (+ bias)), aux = 1-bit mask out > 0  LtEpilogue::ReluAux
//   out = gelu_tanh(a @ b (+ bias)), aux = pre-activation LtEpilogue::GeluTanhAux
//   out = a @ b, bias_grad = a.sum(1)                     LtEpilogue::BiasGradOfA
//
//   out += a @ b (accumulate, LtEpilogue::None)
//
// a (m, k), b (k, n): 2-D, each with unit stride in one dimension (row- or column-major, so
// x.t() views need no copy); out (m, n) row-major, of a's dtype, or float32 when a and b are
// float16/bfloat16 (no epilogue: float32 accumulation of 16-bit products, e.g. a weight gradient
// summed over chunks). The aux matrix has one row per row of out: aux_ld bits (ReluAux, a
// multiple of 128) or elements (GeluTanhAux, a multiple of 8).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torch_ext::cuda {

enum class LtEpilogue { None, ReluAux, GeluTanhAux, BiasGradOfA };

struct LtEpilogueArgs {
  LtEpilogue kind = LtEpilogue::None;
  const void* bias = nullptr;   // (n,), out's dtype, or nullptr: None / ReluAux / GeluTanhAux
  void* aux = nullptr;          // ReluAux / GeluTanhAux
  int64_t aux_ld = 0;
  void* bias_grad = nullptr;    // (m,), out's dtype: BiasGradOfA
  bool accumulate = false;      // out += a @ b instead of out = a @ b
};

// Whether cuBLASLt may be used at all: TORCH_EXT_CUBLASLT=0 turns it off (read per call, for
// diagnosis and for the tests that compare both paths); the default is on.
bool cublaslt_enabled();

// Whether lt_gemm takes this dtype: float16, bfloat16, float32 (float64 goes through ATen).
bool cublaslt_dtype(at::ScalarType dtype);

// Runs the GEMM with the epilogue and returns true, or returns false without side effects when
// the operands' layouts do not suit cuBLASLt or it has no algorithm for the problem (callers
// then take their unfused path). A failing cuBLASLt call is an error. m, n, k must be > 0.
bool lt_gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const LtEpilogueArgs& epilogue);

}  // namespace torch_ext::cuda
