// Op schemas of regharm_ext (SPEC §2-§3). Kernels register per device in csrc/cpu and
// csrc/cuda; fake (meta) kernels and autograd are registered in regharm_ext/ops/native.py.
#include <Python.h>
#include <torch/library.h>

// Importing regharm_ext._C runs the static registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(regharm, m) {
  // mu, sigma, content: (B, K, C); mass: (B, K). Invalid patches (mass < min_mass) give 0.
  m.def("patch_stats(Tensor x, Tensor bg, Tensor weight, Tensor bias, int ph, int pw, int sh, "
        "int sw, float eps, float min_mass) -> (Tensor, Tensor, Tensor, Tensor)");
  // gradients of x, weight, bias from those of mu, sigma, content
  m.def("patch_stats_backward(Tensor grad_mu, Tensor grad_sigma, Tensor grad_content, Tensor x, "
        "Tensor bg, Tensor weight, Tensor mu, Tensor sigma, Tensor mass, int ph, int pw, int sh, "
        "int sw, float eps, float min_mass) -> (Tensor, Tensor, Tensor)");
  // out: (B, L, E) in q's dtype; lse: (B, L) float32 log-sum-exp of the scaled, biased scores
  // (-inf for inactive queries and for rows with every key removed)
  m.def("masked_attention(Tensor q, Tensor k, Tensor v, Tensor key_bias, Tensor? query_mask, "
        "float scale) -> (Tensor, Tensor)");
  m.def("masked_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor key_bias, Tensor? query_mask, Tensor out, Tensor lse, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  // PTL's foreground content (regharm_ext/ops/norm_composite.py): tokens y (B, H*W, C) in x's
  // dtype, mu and rstd (B, C) in the accumulation dtype; weight is data
  m.def("masked_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("masked_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor mu, Tensor rstd) "
        "-> Tensor");
  // PTL (SPEC §4) in one op each way for the native backend (csrc/ptl_node.cpp): the output,
  // then the tensors the backward needs; the backward returns the gradients of x (None when
  // need_x is false), weight and bias
  m.def("ptl_forward(Tensor x, Tensor m, Tensor weight, Tensor bias, int ph, int pw, int sh, "
        "int sw, float eps, float min_mass, float scale) -> Tensor[]");
  m.def("ptl_backward(Tensor grad, Tensor x, Tensor m, Tensor weight, Tensor[] saved, int ph, "
        "int pw, int sh, int sw, float eps, float min_mass, float scale, bool need_x) "
        "-> (Tensor?, Tensor, Tensor)");
}
