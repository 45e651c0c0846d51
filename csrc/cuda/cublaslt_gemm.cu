// cuBLASLt GEMMs with fused epilogues; see cublaslt_gemm.h.
//
// The row-major problem out (m, n) = a (m, k) @ b (k, n) is the column-major one
// out^T (n, m) = b^T (n, k) @ a^T (k, m): cuBLASLt's A is b, its B is a, its D is out. In that
// view the bias (length n) runs along D's rows, the aux matrix has D's layout (one column per
// row of out), and BGRADB's sums over the GEMM's k of cuBLASLt's B (a^T) are a.sum(1).
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "cuda/cublaslt_gemm.h"
#include "runtime_config.h"

namespace torch_ext::cuda {
namespace {

using at::Tensor;

void check_lt(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "torch_ext: cuBLASLt ", what,
              " failed: ", cublasLtGetStatusString(status), " (status ", int(status), ")");
}

struct DescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
  void operator()(cublasLtMatrixLayoutOpaque_t* d) const { cublasLtMatrixLayoutDestroy(d); }
  void operator()(cublasLtMatmulPreferenceOpaque_t* d) const { cublasLtMatmulPreferenceDestroy(d); }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter>;
using MatrixLayout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, DescDeleter>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, DescDeleter>;

template <typename T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const T& value) {
  check_lt(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)), "matmul attribute");
}

template <typename T>
void set_preference(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
  check_lt(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)), "matmul preference");
}

// A row-major (r, c) operand seen as cuBLASLt's column-major operand of shape (c, r): the
// stored matrix's rows, columns and leading dimension, and the op that turns it into (c, r).
struct LtOperand {
  cublasOperation_t op;
  uint64_t rows, cols;
  int64_t ld;
};

std::optional<LtOperand> transposed_view(const Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1);
  // The leading dimension of a single row or column is free; cuBLASLt wants it >= the rows.
  if (t.stride(1) == 1 && (r == 1 || t.stride(0) >= c))
    return LtOperand{CUBLAS_OP_N, uint64_t(c), uint64_t(r), r == 1 ? c : t.stride(0)};
  if (t.stride(0) == 1 && (c == 1 || t.stride(1) >= r))
    return LtOperand{CUBLAS_OP_T, uint64_t(r), uint64_t(c), c == 1 ? r : t.stride(1)};
  return std::nullopt;
}

MatrixLayout layout(cudaDataType_t type, uint64_t rows, uint64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  check_lt(cublasLtMatrixLayoutCreate(&raw, type, rows, cols, ld), "matrix layout");
  return MatrixLayout(raw);
}

// The largest power of two (up to 256) that divides the address: cuBLASLt picks kernels whose
// vector loads the pointers allow.
uint32_t alignment_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t alignment = 1;
  while (alignment < 256 && address % (2 * alignment) == 0) alignment *= 2;
  return alignment;
}

cudaDataType_t lt_data_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

cublasLtEpilogue_t lt_epilogue(const LtEpilogueArgs& e) {
  const bool bias = e.bias != nullptr;
  switch (e.kind) {
    case LtEpilogue::GeluTanhAux: return bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    case LtEpilogue::GeluTanh: return bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    case LtEpilogue::BiasGradOfA: return CUBLASLT_EPILOGUE_BGRADB;
    default: return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  }
}

// Hopper kernels use a larger workspace (split-K, stream-K); the tensor comes from the caching
// allocator, so after the first call it is a cache hit.
int64_t workspace_bytes(const Tensor& like) {
  const auto* props = at::cuda::getDeviceProperties(like.device().index());
  return props->major >= 9 ? (int64_t(32) << 20) : (int64_t(4) << 20);
}

}  // namespace

bool cublaslt_enabled() { return runtime_config().get(Switch::Cublaslt) != 0; }

bool cublaslt_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat;
}

bool lt_gemm(const Tensor& a, const Tensor& b, Tensor& out, const LtEpilogueArgs& epilogue, std::string* why_not) {
  const auto decline = [why_not](std::string why) {
    if (why_not != nullptr) *why_not = std::move(why);
    return false;
  };
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_INTERNAL_ASSERT(m > 0 && n > 0 && k > 0 && b.size(0) == k && out.size(0) == m && out.size(1) == n);
  const at::ScalarType in_dtype = a.scalar_type();
  const bool widening = out.scalar_type() == at::kFloat && in_dtype != at::kFloat;
  TORCH_INTERNAL_ASSERT(
      cublaslt_dtype(in_dtype) && b.scalar_type() == in_dtype &&
      (out.scalar_type() == in_dtype || (widening && epilogue.kind == LtEpilogue::None && epilogue.bias == nullptr)));
  // The handle, workspace and stream are the current device's: make it out's (callers such as
  // linear_cross_entropy's device-neutral loop set no guard of their own).
  const c10::cuda::CUDAGuard guard(out.device());
  const auto a_view = transposed_view(a), b_view = transposed_view(b);
  if (!a_view || !b_view || out.stride(1) != 1 || (m > 1 && out.stride(0) < n))
    return decline("an operand's strides (neither dimension of unit stride, or overlapping rows)");
  if (!lt_epilogue_pointers_aligned(epilogue))
    return decline("a bias, aux or bias-gradient vector not 16-byte aligned");
  const int64_t ld_out = m == 1 ? n : out.stride(0);

  const cudaDataType_t type = lt_data_type(in_dtype), out_type = lt_data_type(out.scalar_type());
  // float32 keeps ATen's choice between exact float32 and TF32 (torch.backends.cuda.matmul);
  // float16/bfloat16 accumulate in float32.
  const cublasComputeType_t compute = in_dtype == at::kFloat && at::globalContext().allowTF32CuBLAS()
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  cublasLtMatmulDesc_t raw_desc = nullptr;
  check_lt(cublasLtMatmulDescCreate(&raw_desc, compute, CUDA_R_32F), "matmul descriptor");
  const MatmulDesc desc(raw_desc);
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_TRANSA, int32_t(b_view->op));
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_TRANSB, int32_t(a_view->op));
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, uint32_t(lt_epilogue(epilogue)));
  const void* bias_or_grad = epilogue.kind == LtEpilogue::BiasGradOfA ? epilogue.bias_grad : epilogue.bias;
  if (bias_or_grad != nullptr) set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_or_grad);
  if (epilogue.kind == LtEpilogue::GeluTanhAux) {
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, epilogue.aux);
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, epilogue.aux_ld);
  }

  const MatrixLayout a_layout = layout(type, b_view->rows, b_view->cols, b_view->ld);  // cuBLASLt's A: b
  const MatrixLayout b_layout = layout(type, a_view->rows, a_view->cols, a_view->ld);  // cuBLASLt's B: a
  const MatrixLayout d_layout = layout(out_type, uint64_t(n), uint64_t(m), ld_out);

  const int64_t workspace_size = workspace_bytes(out);
  cublasLtMatmulPreference_t raw_pref = nullptr;
  check_lt(cublasLtMatmulPreferenceCreate(&raw_pref), "matmul preference");
  const Preference pref(raw_pref);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t(workspace_size));
  // Split-K partial sums are reduced in float32, never in the output's 16-bit type.
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                 uint32_t(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(b.const_data_ptr()));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(a.const_data_ptr()));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(out.const_data_ptr()));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(out.const_data_ptr()));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, raw_desc, a_layout.get(), b_layout.get(), d_layout.get(), d_layout.get(),
                                     raw_pref, 1, &heuristic, &found);
  // Any failure of the heuristic is a reason to take the unfused path, not an error: besides
  // NOT_SUPPORTED it answers INVALID_VALUE for some shapes it does not take (PyTorch's own cuBLASLt
  // code notes this for operands of a single row or column).
  if (status != CUBLAS_STATUS_SUCCESS)
    return decline(std::string("its algorithm heuristic answered ") + cublasLtGetStatusString(status));
  if (found == 0) return decline("its algorithm heuristic found no algorithm");

  const Tensor workspace = at::empty({workspace_size}, out.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = epilogue.accumulate ? 1.0f : 0.0f;
  check_lt(cublasLtMatmul(handle, raw_desc, &alpha, b.const_data_ptr(), a_layout.get(), a.const_data_ptr(),
                          b_layout.get(), &beta, out.const_data_ptr(), d_layout.get(), out.data_ptr(), d_layout.get(),
                          &heuristic.algo, workspace.data_ptr(), size_t(workspace_size),
                          c10::cuda::getCurrentCUDAStream(out.device().index()).stream()),
           "matmul");
  return true;
}

}  // namespace torch_ext::cuda
