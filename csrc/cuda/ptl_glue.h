// The CUDA branch of PTL's native node (csrc/ptl_node.cpp): the blend's three formulas as
// kernels (ptl_glue_kernels.cu), each where torch ran one to three strided elementwise ops.
#pragma once

#include <ATen/ATen.h>

namespace regharm {
namespace cuda {

// REGHARM_CUDA_PTL_GLUE: "kernels" (default) or "aten" (the torch ops, as on CPU: the
// benchmarks' native_aten_glue rows). Read on every call.
bool ptl_glue_kernels_asked();

// out (B, C, H, W) = lerp(x, A + C_f * V, weight); attn_out (B, HW, 2C) = [A | V], c_f
// (B, HW, C), weight (B, 1, H, W), all in x's dtype.
at::Tensor ptl_blend_forward(const at::Tensor& x, const at::Tensor& attn_out,
                             const at::Tensor& c_f, const at::Tensor& weight);

// [g * weight | g * weight * C_f] (B, HW, 2C) from g (B, C, H, W), any strides.
at::Tensor ptl_blend_backward(const at::Tensor& grad, const at::Tensor& weight,
                              const at::Tensor& c_f);

// In place: gx = (gx + gxp) + grad * (1 - weight).
void ptl_grad_x_(at::Tensor& gx, const at::Tensor& gxp, const at::Tensor& grad,
                 const at::Tensor& weight);

}  // namespace cuda
}  // namespace regharm
