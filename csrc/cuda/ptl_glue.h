// The CUDA branch of PTL's native node (csrc/ptl_node.cpp): the layer's small steps and the
// blend's three formulas as kernels (ptl_glue_kernels.cu), each where torch ran one to five
// elementwise ops.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace regharm {
namespace cuda {

// REGHARM_CUDA_PTL_GLUE: "kernels" (default) or "aten" (the torch ops, as on CPU: the
// benchmarks' native_aten_glue rows). Read on every call.
bool ptl_glue_kernels_asked();

// From the mask m (B, 1, H, W) at x's size: bg = 1 - m (B, 1, H, W) and the active queries
// m > 0 (B, H*W) bool.
std::tuple<at::Tensor, at::Tensor> ptl_mask(const at::Tensor& m);

// From patch_stats' outputs mass (B, K), mu and sigma (B, K, C), and m: key_bias (B, K) float32
// (0 where mass >= min_mass, -inf elsewhere), values (B, K, 2C) = [mu | sigma], and the blend
// weight (B, 1, H, W): m, or 0 for an image without a valid patch.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ptl_keys(const at::Tensor& mass,
                                                        const at::Tensor& mu,
                                                        const at::Tensor& sigma,
                                                        const at::Tensor& m, double min_mass);

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
