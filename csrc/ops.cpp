// Every op schema of torch_ext, in one place. Kernels: csrc/cpu/*.cpp, csrc/cuda/*.cu; fake
// (meta) kernels and autograd: torch_ext/*.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(torch_ext, m) {
  // Dense layer + activation. Returns (out, saved): saved is what backward needs besides input
  // and weight: the relu/leaky_relu bit mask as uint8 (*, ceil(N/8)), the pre-activation
  // (*, N) for gelu/gelu_tanh/silu, or an empty tensor (none, sigmoid and tanh, which use out).
  m.def("linear_act_fwd(Tensor input, Tensor weight, Tensor? bias, str activation, "
        "float negative_slope) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Gradients for (input, weight, bias); those not asked for in output_mask come back empty.
  // saved: the mask, pre-activation or output, as returned by linear_act_fwd.
  m.def("linear_act_bwd(Tensor grad_output, Tensor input, Tensor weight, Tensor saved, "
        "str activation, float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

// torch_ext._C registers the ops above when imported, and tells which CPU kernels it runs.
static PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(torch_ext::cpu::cpu_kernels().capability);
}

static PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Instruction set of the CPU kernels in use: DEFAULT, AVX2 or AVX512 (follows ATEN_CPU_CAPABILITY)."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
