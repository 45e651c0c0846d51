// Every op schema of torch_ext, in one place. Kernels: csrc/cpu/*.cpp, csrc/cuda/*.cu; fake
// (meta) kernels and autograd: torch_ext/*.py.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "autograd_node.h"
#include "cpu/runtime/allocator.h"
#include "cpu/runtime/gemm.h"
#include "cpu/runtime/kernel_table.h"
#include "cuda/cublaslt_gemm.h"  // plain C++: lt_epilogue_pointers_aligned, tested on every build
#include "matmul.h"
#include "runtime_config.h"

#include <pybind11/pybind11.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

TORCH_LIBRARY(torch_ext, m) {
  // The losses follow one convention:
  //   <op>_fwd(<inputs>, <options>, bool[k] grad_mask, <options with defaults>)
  //       -> (loss, <what backward needs>, <the gradients of the k differentiable inputs>)
  //   <op>_bwd(grad_loss, <inputs>, <what backward needs>, <options>, bool[k] output_mask, ...)
  //       -> (<the k gradients>)
  // grad_mask asks the forward for the gradients for grad_loss = 1 (reductions mean and sum: the
  // eager path forms them while the inputs are in cache, and its backward hands them over,
  // scaled); those not asked for are undefined (None in Python, as ATen's native_layer_norm_backward
  // returns its masked outputs: nothing to allocate or wrap on every call), and so are the
  // backward's not in output_mask. The dense ops' backward ops follow the same output_mask rule.

  // Dense layer + activation. Returns (out, saved): saved is what backward needs besides input
  // and weight: the relu/leaky_relu bit mask as uint8 (*, ceil(N/8)), the pre-activation
  // (*, N) for gelu/gelu_tanh/silu, or an empty tensor (none, sigmoid and tanh, which use out).
  // for_backward=False (inference): saved is None, and neither written nor allocated.
  m.def(
      "linear_act_fwd(Tensor input, Tensor weight, Tensor? bias, str activation, "
      "float negative_slope, bool for_backward=True) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradients for (input, weight, bias); those not asked for in output_mask: undefined (None).
  // saved: the mask, pre-activation or output, as returned by linear_act_fwd.
  m.def(
      "linear_act_bwd(Tensor grad_output, Tensor input, Tensor weight, Tensor saved, "
      "str activation, float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // The same gradients as linear_act_bwd, written with PyTorch's differentiable ops
  // (CompositeImplicitAutograd, csrc/dense_backward_composite.cpp): for a backward that records a
  // graph (create_graph=True), so gradients of gradients are PyTorch's. Forms the pre-activation
  // again from input, weight and bias instead of reading what the forward saved.
  m.def(
      "linear_act_bwd_composite(Tensor grad_output, Tensor input, Tensor weight, Tensor? bias, "
      "str activation, float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // The activation of an MLP on its own: act(input) over (*, n), or gated (GLU family: swiglu =
  // silu, geglu = gelu): act(input[..., :n]) * input[..., n:] over (*, 2n).
  m.def("mlp_act_fwd(Tensor input, str activation, float negative_slope, bool gated) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Returns (grad_input, output): the input's gradient, and the forward output formed again in
  // the same pass (to recompute it instead of saving it); those not in output_mask: undefined.
  m.def(
      "mlp_act_bwd(Tensor grad_output, Tensor input, str activation, float negative_slope, bool gated, "
      "bool[2] output_mask) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // mlp_act_bwd's input gradient with PyTorch's differentiable ops, as linear_act_bwd_composite's.
  m.def(
      "mlp_act_bwd_composite(Tensor grad_output, Tensor input, str activation, float negative_slope, bool gated) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});

  // The backward of the whole block fc2(act(fc1(input))) (csrc/mlp.cpp): gradients for (input,
  // fc1_weight, fc1_bias, fc2_weight, fc2_bias), those not in output_mask undefined. activation: the
  // (gate's) activation; saved: fc1's, as linear_act_fwd returns it (gated: fc1's output);
  // hidden: act(fc1(input)), or None to form it again from saved.
  m.def(
      "mlp_bwd(Tensor grad_output, Tensor input, Tensor fc1_weight, Tensor fc2_weight, Tensor saved, "
      "Tensor? hidden, str activation, float negative_slope, bool gated, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // mlp_bwd's gradients with PyTorch's differentiable ops, as linear_act_bwd_composite's (fc2's
  // bias shapes no gradient but its own, so it is not an argument).
  m.def(
      "mlp_bwd_composite(Tensor grad_output, Tensor input, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
      "str activation, float negative_slope, bool gated, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)",
      {at::Tag::pt2_compliant_tag});

  // Cross-entropy with every option of F.cross_entropy, plus z_loss (z_loss * logsumexp^2 per
  // row, weighted and reduced like the loss) and softcap (> 0: every logit x taken as
  // softcap * tanh(x / softcap) first; 0: off). target: class indices (int64/uint8, input's shape
  // without the class dim) or class probabilities (input's shape and dtype). Returns (loss,
  // stats); stats (rows, 3), float32 (float64 for float64 input), is what backward needs: per row
  // the max logit and log(sum exp(x - max)) (their sum is the row's logsumexp), and for
  // probability targets sum_c weight_c target_c, for class targets 1 where the row's argmax (first
  // index of the max, as torch.argmax) is its target, else 0. Ignored rows' stats are 0 unless
  // ignored_row_stats (then their logsumexp is taken too, for an lse output). grad_mask: (input,
  // target); the target's gradient exists only for probability targets. The input's gradient is
  // written row by row right after the row's statistics, while the row is in cache; the target's
  // is taken by the backward kernel after the forward (a second read, for that rare case only).
  // loss_dtype: the loss's dtype, None for the input's. The loss is computed in float32 (float64)
  // whatever the input's dtype; float32 for a 16-bit input returns it unrounded, as autocast's
  // float32 loss of 16-bit logits (linear_cross_entropy under autocast).
  m.def(
      "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, str reduction, "
      "float label_smoothing, float z_loss, bool[2] grad_mask, float softcap=0., bool ignored_row_stats=False, "
      "ScalarType? loss_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Gradients for (input, target); target's only for probability targets; not asked for: undefined.
  // grad_lse (one value per row, or None): the incoming gradient of the rows' logsumexp, added as
  // grad_lse * softmax (ignored rows too, whose stats must then be ignored_row_stats').
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor stats, "
      "int ignore_index, str reduction, float label_smoothing, float z_loss, bool[2] output_mask, "
      "float softcap=0., Tensor? grad_lse=None) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // cross_entropy_bwd's gradients by differentiating the loss written in PyTorch's ops (a
  // CompositeImplicitAutograd kernel, torch_ext/cross_entropy.py): for a backward that records a
  // graph (create_graph=True), so gradients of gradients are PyTorch's. grad_lse is refused.
  m.def(
      "cross_entropy_bwd_composite(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "str reduction, float label_smoothing, float z_loss, bool[2] output_mask, float softcap=0., "
      "Tensor? grad_lse=None) -> (Tensor?, Tensor?)");
  // The input's gradient written over the input (contiguous), for callers that no longer need the
  // logits (linear_cross_entropy's chunks).
  m.def(
      "cross_entropy_bwd_inplace(Tensor grad_loss, Tensor(a!) input, Tensor target, Tensor? weight, "
      "Tensor stats, int ignore_index, str reduction, float label_smoothing, float z_loss, float softcap=0.) -> ()",
      {at::Tag::pt2_compliant_tag});

  // Elementwise regression losses: loss = "mse" | "huber" (param = delta) | "smooth_l1" (param =
  // beta); input, target and the optional elementwise weight of one shape (the Python functions
  // broadcast). Weighted mse's mean divides by the sum of the weights, the others' by numel.
  // Returns (loss, grad_input, grad_target): nothing is saved but the inputs. grad_mask: (input,
  // target), formed in the same pass that reads them for the loss. loss_dtype as
  // cross_entropy_fwd's. The backward reads a float32 grad_loss of 16-bit inputs as it is.
  m.def(
      "regression_loss_fwd(Tensor input, Tensor target, Tensor? weight, str loss, float param, "
      "str reduction, bool[2] grad_mask, ScalarType? loss_dtype=None) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "regression_loss_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, str loss, "
      "float param, str reduction, bool[2] output_mask) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // regression_loss_bwd's gradients as cross_entropy_bwd_composite's (torch_ext/regression_loss.py).
  m.def(
      "regression_loss_bwd_composite(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, str loss, "
      "float param, str reduction, bool[2] output_mask) -> (Tensor?, Tensor?)");

  // Triplet margin loss over (D) or (N, D) inputs. Returns (loss, dist, grad_anchor,
  // grad_positive, grad_negative); dist (rows, 3) holds d(a, p), d(a, n) and d(p, n) (0 without
  // swap) in float32 (float64 for float64 input). grad_mask: (anchor, positive, negative), formed
  // in the same pass over the inputs. loss_dtype as cross_entropy_fwd's.
  m.def(
      "triplet_margin_loss_fwd(Tensor anchor, Tensor positive, Tensor negative, float margin, float p, "
      "float eps, bool swap, str reduction, bool[3] grad_mask, ScalarType? loss_dtype=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "triplet_margin_loss_bwd(Tensor grad_loss, Tensor anchor, Tensor positive, Tensor negative, "
      "Tensor dist, float margin, float p, float eps, bool swap, str reduction, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // cross_entropy(input @ linear_weight.T + linear_bias, target, ...) over chunks of chunk_size rows,
  // never holding the whole logits. input (*, H), linear_weight (V, H); target class indices (*)
  // or probabilities (*, V). Returns (loss, stats, grad_input, grad_weight, grad_bias): the rows'
  // stats as cross_entropy_fwd's, and the gradients for grad_output = 1 of those set in grad_mask
  // (reduction mean or sum only), formed while each chunk's logits exist, else undefined.
  // loss_dtype as cross_entropy_fwd's.
  m.def(
      "linear_cross_entropy_fwd(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
      "Tensor? weight, int ignore_index, str reduction, float label_smoothing, float z_loss, int chunk_size, "
      "bool[3] grad_mask, float softcap=0., bool ignored_row_stats=False, ScalarType? loss_dtype=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "linear_cross_entropy_bwd(Tensor grad_loss, Tensor input, Tensor linear_weight, Tensor? linear_bias, "
      "Tensor target, Tensor? weight, int ignore_index, str reduction, float label_smoothing, float z_loss, "
      "int chunk_size, bool[3] output_mask, float softcap=0.) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

// torch_ext._C registers the ops above when imported, and tells which CPU kernels it runs.
static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(torch_ext::cpu::cpu_kernels().capability);
}

// HANDLE_TH_ERRORS: a C++ error (e.g. a bad TORCH_EXT_CPU_GEMM) becomes a Python one, not an abort.
static PyObject* cpu_gemm(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(torch_ext::cpu::float32_gemm());
  END_HANDLE_TH_ERRORS
}

// _cpu_16bit_gemm("bfloat16" | "float16"): how the CPU ops multiply matrices of that dtype.
static PyObject* cpu_16bit_gemm(PyObject*, PyObject* name) {
  HANDLE_TH_ERRORS
  const char* text = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : "";
  const std::string_view dtype = text != nullptr ? text : "";
  TORCH_CHECK_VALUE(dtype == "bfloat16" || dtype == "float16", "_cpu_16bit_gemm takes 'bfloat16' or 'float16'");
  const bool slow = torch_ext::cpu::aten_reduced_gemm_is_slow(dtype == "bfloat16" ? at::kBFloat16 : at::kHalf);
  return PyUnicode_FromString(slow ? "float32" : "aten");
  END_HANDLE_TH_ERRORS
}

// _cpu_matmul_into(out, a, b, accumulate): out = a @ b (or +=) through the CPU ops' matrix
// product (csrc/cpu/runtime/gemm.h), for its tests and benchmarks/bench_cpu_gemm.py; not public API.
static PyObject* cpu_matmul_into(PyObject*, PyObject* args) {
  PyObject *out_obj = nullptr, *a_obj = nullptr, *b_obj = nullptr;
  int accumulate = 0;
  if (!PyArg_ParseTuple(args, "OOOp", &out_obj, &a_obj, &b_obj, &accumulate)) return nullptr;
  if (!THPVariable_Check(out_obj) || !THPVariable_Check(a_obj) || !THPVariable_Check(b_obj)) {
    PyErr_SetString(PyExc_TypeError, "_cpu_matmul_into(out, a, b, accumulate): out, a and b must be tensors");
    return nullptr;
  }
  HANDLE_TH_ERRORS
  at::Tensor out = THPVariable_Unpack(out_obj);
  const at::Tensor a = THPVariable_Unpack(a_obj), b = THPVariable_Unpack(b_obj);
  TORCH_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2, "_cpu_matmul_into: out, a and b must be 2-D");
  TORCH_CHECK(a.size(1) == b.size(0) && out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "_cpu_matmul_into: shapes do not multiply: out ", out.sizes(), ", a ", a.sizes(), ", b ", b.sizes());
  TORCH_CHECK(out.is_cpu() && a.is_cpu() && b.is_cpu(), "_cpu_matmul_into: CPU tensors only");
  TORCH_CHECK(out.scalar_type() == a.scalar_type() && a.scalar_type() == b.scalar_type(),
              "_cpu_matmul_into: out, a and b must have one dtype");
  torch_ext::matmul_into(out, a, b, accumulate != 0);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// Whether this module holds the CUDA kernels (TORCH_EXT_WITH_CUDA, set by setup.py): the
// compiled module's own answer, which show_config() checks the recorded build against.
static PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef TORCH_EXT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// _cublaslt_epilogue_aligned(bias, aux, bias_grad): the addresses (0: absent) cuBLASLt's epilogue
// would read, as lt_gemm decides whether they suit it (cuda/cublaslt_gemm.h); for its tests.
static PyObject* cublaslt_epilogue_aligned(PyObject*, PyObject* args) {
  unsigned long long bias = 0, aux = 0, bias_grad = 0;
  if (!PyArg_ParseTuple(args, "KKK", &bias, &aux, &bias_grad)) return nullptr;
  torch_ext::cuda::LtEpilogueArgs e;
  e.bias = reinterpret_cast<const void*>(uintptr_t(bias));
  e.aux = reinterpret_cast<void*>(uintptr_t(aux));
  e.bias_grad = reinterpret_cast<void*>(uintptr_t(bias_grad));
  return PyBool_FromLong(torch_ext::cuda::lt_epilogue_pointers_aligned(e));
}

// The eager training paths' Python entries (autograd_node.h): tensor arguments unpacked, each a
// tensor or None where optional (a clear TypeError naming it otherwise), then the path run without
// the GIL, as torch.ops calls run, so other Python threads go on meanwhile.
struct TensorArg {
  PyObject* obj;
  const char* name;
  bool optional;
  std::optional<at::Tensor>* out;
};

static bool unpack_tensors(std::initializer_list<TensorArg> args) {
  for (const TensorArg& a : args) {
    if (a.optional && a.obj == Py_None) continue;
    if (!THPVariable_Check(a.obj)) {
      PyErr_Format(PyExc_TypeError, "%s must be a tensor%s, got %s", a.name, a.optional ? " or None" : "",
                   Py_TYPE(a.obj)->tp_name);
      return false;
    }
    *a.out = THPVariable_Unpack(a.obj);
  }
  return true;
}

template <typename Path>
static PyObject* run_without_gil(Path&& path) {
  HANDLE_TH_ERRORS
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = path();
  }
  return THPVariable_Wrap(out);
  END_HANDLE_TH_ERRORS
}

// The same for a path giving (loss, stats): the loss, or (loss, stats) when the caller asked for
// the stats (the losses' lse and accuracy outputs).
template <typename Path>
static PyObject* run_without_gil_with_stats(bool return_stats, Path&& path) {
  HANDLE_TH_ERRORS
  at::Tensor loss, stats;
  {
    pybind11::gil_scoped_release no_gil;
    std::tie(loss, stats) = path();
  }
  if (!return_stats) return THPVariable_Wrap(loss);
  PyObject* loss_obj = THPVariable_Wrap(loss);
  if (loss_obj == nullptr) return nullptr;
  PyObject* stats_obj = THPVariable_Wrap(stats);
  if (stats_obj == nullptr) {
    Py_DECREF(loss_obj);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, loss_obj, stats_obj);
  Py_DECREF(loss_obj);
  Py_DECREF(stats_obj);
  return pair;
  END_HANDLE_TH_ERRORS
}

// The loss_dtype of a loss's eager entry point given its float32_loss flag: float32 (autocast, for
// 16-bit inputs), else None (the input's dtype).
static std::optional<at::ScalarType> loss_dtype_from_flag(int float32_loss) {
  return float32_loss != 0 ? std::optional(at::kFloat) : std::nullopt;
}

// _cross_entropy_eager(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
// softcap, ignored_row_stats, return_stats, float32_loss); float32_loss: loss_dtype float32 (autocast)
static PyObject* cross_entropy_eager(PyObject*, PyObject* args) {
  PyObject *input_obj, *target_obj, *weight_obj;
  long long ignore_index;
  const char* reduction;
  double label_smoothing, z_loss, softcap;
  int ignored_row_stats, return_stats, float32_loss;
  std::optional<at::Tensor> input, target, weight;
  if (!PyArg_ParseTuple(args, "OOOLsdddppp", &input_obj, &target_obj, &weight_obj, &ignore_index, &reduction,
                        &label_smoothing, &z_loss, &softcap, &ignored_row_stats, &return_stats, &float32_loss) ||
      !unpack_tensors({{input_obj, "input", false, &input},
                       {target_obj, "target", false, &target},
                       {weight_obj, "weight", true, &weight}}))
    return nullptr;
  return run_without_gil_with_stats(return_stats != 0, [&] {
    return torch_ext::cross_entropy_eager(*input, *target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                          softcap, ignored_row_stats != 0, loss_dtype_from_flag(float32_loss));
  });
}

// _regression_loss_eager(input, target, weight, loss, param, reduction, float32_loss): mse, huber,
// smooth_l1; float32_loss: loss_dtype float32 (autocast)
static PyObject* regression_loss_eager(PyObject*, PyObject* args) {
  PyObject *input_obj, *target_obj, *weight_obj;
  const char *loss, *reduction;
  double param;
  int float32_loss;
  std::optional<at::Tensor> input, target, weight;
  if (!PyArg_ParseTuple(args, "OOOsdsp", &input_obj, &target_obj, &weight_obj, &loss, &param, &reduction,
                        &float32_loss) ||
      !unpack_tensors({{input_obj, "input", false, &input},
                       {target_obj, "target", false, &target},
                       {weight_obj, "weight", true, &weight}}))
    return nullptr;
  return run_without_gil([&] {
    return torch_ext::regression_loss_eager(*input, *target, weight, loss, param, reduction,
                                            loss_dtype_from_flag(float32_loss));
  });
}

// _triplet_margin_loss_eager(anchor, positive, negative, margin, p, eps, swap, reduction,
// float32_loss); float32_loss: loss_dtype float32 (autocast)
static PyObject* triplet_margin_loss_eager(PyObject*, PyObject* args) {
  PyObject *anchor_obj, *positive_obj, *negative_obj;
  double margin, p, eps;
  int swap, float32_loss;
  const char* reduction;
  std::optional<at::Tensor> anchor, positive, negative;
  if (!PyArg_ParseTuple(args, "OOOdddpsp", &anchor_obj, &positive_obj, &negative_obj, &margin, &p, &eps, &swap,
                        &reduction, &float32_loss) ||
      !unpack_tensors({{anchor_obj, "anchor", false, &anchor},
                       {positive_obj, "positive", false, &positive},
                       {negative_obj, "negative", false, &negative}}))
    return nullptr;
  return run_without_gil([&] {
    return torch_ext::triplet_margin_loss_eager(*anchor, *positive, *negative, margin, p, eps, swap != 0, reduction,
                                                loss_dtype_from_flag(float32_loss));
  });
}

// _linear_act_eager(input, weight, bias, activation, negative_slope)
static PyObject* linear_act_eager(PyObject*, PyObject* args) {
  PyObject *input_obj, *weight_obj, *bias_obj;
  const char* activation;
  double negative_slope;
  std::optional<at::Tensor> input, weight, bias;
  if (!PyArg_ParseTuple(args, "OOOsd", &input_obj, &weight_obj, &bias_obj, &activation, &negative_slope) ||
      !unpack_tensors({{input_obj, "input", false, &input},
                       {weight_obj, "weight", false, &weight},
                       {bias_obj, "bias", true, &bias}}))
    return nullptr;
  return run_without_gil(
      [&] { return torch_ext::linear_act_eager(*input, *weight, bias, activation, negative_slope); });
}

// _mlp_eager(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, negative_slope, gated, recompute)
static PyObject* mlp_eager(PyObject*, PyObject* args) {
  PyObject *input_obj, *w1_obj, *b1_obj, *w2_obj, *b2_obj;
  const char* activation;
  double negative_slope;
  int gated, recompute;
  std::optional<at::Tensor> input, fc1_weight, fc1_bias, fc2_weight, fc2_bias;
  if (!PyArg_ParseTuple(args, "OOOOOsdpp", &input_obj, &w1_obj, &b1_obj, &w2_obj, &b2_obj, &activation, &negative_slope,
                        &gated, &recompute) ||
      !unpack_tensors({{input_obj, "input", false, &input},
                       {w1_obj, "fc1_weight", false, &fc1_weight},
                       {b1_obj, "fc1_bias", true, &fc1_bias},
                       {w2_obj, "fc2_weight", false, &fc2_weight},
                       {b2_obj, "fc2_bias", true, &fc2_bias}}))
    return nullptr;
  return run_without_gil([&] {
    return torch_ext::mlp_eager(*input, *fc1_weight, fc1_bias, *fc2_weight, fc2_bias, activation, negative_slope, gated,
                                recompute);
  });
}

// _linear_cross_entropy_eager(input, linear_weight, linear_bias, target, weight, ignore_index,
// reduction, label_smoothing, z_loss, chunk_size, softcap, ignored_row_stats, return_stats,
// float32_loss), for targets that take no gradient; float32_loss: loss_dtype float32 (autocast)
static PyObject* linear_cross_entropy_eager(PyObject*, PyObject* args) {
  PyObject *input_obj, *lw_obj, *lb_obj, *target_obj, *weight_obj;
  long long ignore_index, chunk_size;
  const char* reduction;
  double label_smoothing, z_loss, softcap;
  int ignored_row_stats, return_stats, float32_loss;
  std::optional<at::Tensor> input, linear_weight, linear_bias, target, weight;
  if (!PyArg_ParseTuple(args, "OOOOOLsddLdppp", &input_obj, &lw_obj, &lb_obj, &target_obj, &weight_obj, &ignore_index,
                        &reduction, &label_smoothing, &z_loss, &chunk_size, &softcap, &ignored_row_stats, &return_stats,
                        &float32_loss) ||
      !unpack_tensors({{input_obj, "input", false, &input},
                       {lw_obj, "linear_weight", false, &linear_weight},
                       {lb_obj, "linear_bias", true, &linear_bias},
                       {target_obj, "target", false, &target},
                       {weight_obj, "weight", true, &weight}}))
    return nullptr;
  return run_without_gil_with_stats(return_stats != 0, [&] {
    return torch_ext::linear_cross_entropy_eager(*input, *linear_weight, linear_bias, *target, weight, ignore_index,
                                                 reduction, label_smoothing, z_loss, chunk_size, softcap,
                                                 ignored_row_stats != 0, loss_dtype_from_flag(float32_loss));
  });
}

// A switch's value as Python sees it (csrc/runtime_config.h: a str, an int or a bool).
static PyObject* config_value_to_python(const torch_ext::ConfigEntry& entry, int64_t value) {
  switch (entry.kind) {
    case torch_ext::ConfigKind::GemmChoice:
      return PyUnicode_FromString(torch_ext::cpu_gemm_name(torch_ext::CpuGemm(value)));
    case torch_ext::ConfigKind::Flag: return PyBool_FromLong(value != 0);
    case torch_ext::ConfigKind::Bytes: break;
  }
  return PyLong_FromLongLong(value);
}

// A Python value checked against its switch's rules (the kind's type, then its values).
static int64_t config_value_from_python(const torch_ext::ConfigEntry& entry, PyObject* value) {
  const std::string what = std::string("torch_ext.set_config: ") + entry.name;
  const auto repr = [value] { return pybind11::repr(pybind11::handle(value)).cast<std::string>(); };
  switch (entry.kind) {
    case torch_ext::ConfigKind::GemmChoice:
      TORCH_CHECK_TYPE(PyUnicode_Check(value), what, " must be a str, got ", repr());
      return torch_ext::parse_config_text(entry.kind, PyUnicode_AsUTF8(value), what);
    case torch_ext::ConfigKind::Flag:
      TORCH_CHECK_TYPE(PyBool_Check(value), what, " must be a bool, got ", repr());
      return value == Py_True ? 1 : 0;
    case torch_ext::ConfigKind::Bytes: break;
  }
  TORCH_CHECK_TYPE(PyLong_Check(value) && !PyBool_Check(value), what, " must be an int, got ", repr());
  int overflow = 0;
  const long long bytes = PyLong_AsLongLongAndOverflow(value, &overflow);
  TORCH_CHECK_VALUE(overflow == 0, what, " must fit in 64 bits, got ", repr());
  return torch_ext::check_config_value(entry.kind, bytes, what);
}

// _get_config() -> {name: value} of every run-time switch (csrc/runtime_config.h).
static PyObject* get_config(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  const auto& config = torch_ext::runtime_config();
  pybind11::dict values;
  for (const auto& entry : torch_ext::kConfigEntries)
    values[entry.name] =
        pybind11::reinterpret_steal<pybind11::object>(config_value_to_python(entry, config.get(entry.id)));
  return values.release().ptr();
  END_HANDLE_TH_ERRORS
}

// _set_config({name: value}) -> {name: previous value}: every change is checked before any is
// applied, so a call applies all or none. Lowering cpu_cache_bytes frees the cached blocks beyond
// it at once.
static PyObject* set_config(PyObject*, PyObject* changes) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyDict_Check(changes), "_set_config takes a dict of changes");
  std::vector<std::pair<const torch_ext::ConfigEntry*, int64_t>> checked;
  PyObject* name = nullptr;
  PyObject* value = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(changes, &pos, &name, &value)) {
    TORCH_CHECK_TYPE(PyUnicode_Check(name), "torch_ext.set_config: switch names are str");
    const auto& entry = torch_ext::config_entry(PyUnicode_AsUTF8(name), "torch_ext.set_config");
    checked.emplace_back(&entry, config_value_from_python(entry, value));
  }
  auto& config = torch_ext::runtime_config();
  pybind11::dict previous;
  for (const auto& [entry, checked_value] : checked) {
    previous[entry->name] =
        pybind11::reinterpret_steal<pybind11::object>(config_value_to_python(*entry, config.get(entry->id)));
    config.set(entry->id, checked_value);
    if (entry->id == torch_ext::Switch::CpuCacheBytes) torch_ext::cpu::trim_cache();
  }
  return previous.release().ptr();
  END_HANDLE_TH_ERRORS
}

static PyObject* empty_cache(PyObject*, PyObject*) { return PyLong_FromSize_t(torch_ext::cpu::empty_cache()); }

static PyObject* cached_bytes(PyObject*, PyObject*) { return PyLong_FromSize_t(torch_ext::cpu::cached_bytes()); }

static PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Instruction set of the CPU kernels in use: DEFAULT, AVX2 or AVX512 (follows ATEN_CPU_CAPABILITY)."},
    {"cpu_gemm", cpu_gemm, METH_NOARGS,
     "GEMM of float32 CPU products of 32 rows or more now: ours or aten (see TORCH_EXT_CPU_GEMM in docs/cpu.md)."},
    {"_cpu_16bit_gemm", cpu_16bit_gemm, METH_O,
     "_cpu_16bit_gemm('bfloat16' | 'float16'): how the CPU ops multiply matrices of that dtype: 'aten' (oneDNN's "
     "GEMM), or 'float32' (as float32 products of their values, where ATen's GEMM of that dtype runs far below "
     "its float32 one: no AVX512-BF16 for bfloat16, no AVX-512 FP16 for float16)."},
    {"_cpu_matmul_into", cpu_matmul_into, METH_VARARGS,
     "_cpu_matmul_into(out, a, b, accumulate): out = a @ b, or out += a @ b, as the CPU ops multiply (tests, "
     "benchmarks)."},
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether this module was compiled with the CUDA kernels."},
    {"_cublaslt_epilogue_aligned", cublaslt_epilogue_aligned, METH_VARARGS,
     "_cublaslt_epilogue_aligned(bias, aux, bias_grad): whether cuBLASLt may read these epilogue addresses (tests)."},
    {"_cross_entropy_eager", cross_entropy_eager, METH_VARARGS,
     "torch_ext.cross_entropy's eager path: the loss with its input's gradient formed in the forward op and a C++ "
     "node, or without autograd the forward op alone."},
    {"_regression_loss_eager", regression_loss_eager, METH_VARARGS,
     "torch_ext's regression losses' eager path: the loss with its gradients formed in the forward op and a C++ "
     "node, or without autograd the forward op alone."},
    {"_triplet_margin_loss_eager", triplet_margin_loss_eager, METH_VARARGS,
     "torch_ext.triplet_margin_loss's eager path: the loss with its gradients formed in the forward op and a "
     "C++ node, or without autograd the forward op alone."},
    {"_linear_act_eager", linear_act_eager, METH_VARARGS,
     "torch_ext.fused_linear's eager path: the forward op and, when autograd records, a C++ node."},
    {"_mlp_eager", mlp_eager, METH_VARARGS,
     "torch_ext.fused_mlp's eager path: the forward ops and, when autograd records, a C++ node."},
    {"_linear_cross_entropy_eager", linear_cross_entropy_eager, METH_VARARGS,
     "torch_ext.linear_cross_entropy's eager path: the loss with its gradients formed in the forward op and a "
     "C++ node, or without autograd the forward op alone."},
    {"_get_config", get_config, METH_NOARGS, "The run-time config (torch_ext.get_config)."},
    {"_set_config", set_config, METH_O,
     "_set_config({name: value}) -> {name: previous}: checks every change, then applies them "
     "(torch_ext.set_config)."},
    {"empty_cache", empty_cache, METH_NOARGS,
     "Return the cached free CPU output blocks to the system; returns the bytes released."},
    {"cached_bytes", cached_bytes, METH_NOARGS, "Bytes held in cached free CPU output blocks."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  // The environment's switches are read here, once. A bad value is not an import error: the
  // first op or config call that reads the config raises it, naming the variable.
  try {
    torch_ext::runtime_config();
  } catch (const c10::Error&) {
  }
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
