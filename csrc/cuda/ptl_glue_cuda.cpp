// Torch glue of PTL's blend kernels (ptl_glue_kernels.cu) for the native node: checks that the
// node hands them what they read (contiguous tensors of one dtype on one device), allocation,
// the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "cuda_glue.h"
#include "kernels.h"
#include "ptl_glue.h"

namespace regharm {
namespace cuda {
namespace {

constexpr const char* kOp = "regharm::ptl (CUDA blend)";

BlendShape shape_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, kOp, ": expected (B, C, H, W), got ", x.sizes());
  check_grid_dim(x.size(0), "batch size B", kOp);
  check_grid_dim((x.size(1) + 31) / 32, "channel tiles (C + 31) / 32", kOp);
  return BlendShape{x.size(0), x.size(1), x.size(2), x.size(3)};
}

void check_dense(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef sizes,
                 const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == like.scalar_type(), kOp, ": ",
              name, " must be ", like.scalar_type(), " on ", like.device(), ", got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == sizes && t.is_contiguous(), kOp, ": ", name,
              " must be contiguous with shape ", sizes, ", got ", t.sizes());
}

}  // namespace

bool ptl_glue_kernels_asked() {
  return env_choice("REGHARM_CUDA_PTL_GLUE",
                    {{"kernels", "the blend's CUDA kernels"}, {"aten", "torch's ops"}},
                    kOp) == "kernels";
}

std::tuple<at::Tensor, at::Tensor> ptl_mask(const at::Tensor& m) {
  const BlendShape s = shape_of(m);
  check_dense(m, m, {s.B, 1, s.H, s.W}, "m");
  const c10::cuda::CUDAGuard guard(m.device());
  auto bg = at::empty_like(m);
  auto active = at::empty({s.B, s.H * s.W}, m.options().dtype(at::kBool));
  check_launch(cuda::ptl_mask(dtype_tag(m), m.data_ptr(), m.numel(), bg.data_ptr(),
                              active.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {bg, active};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ptl_keys(const at::Tensor& mass,
                                                        const at::Tensor& mu,
                                                        const at::Tensor& sigma,
                                                        const at::Tensor& m, double min_mass) {
  const BlendShape s = shape_of(m);
  TORCH_CHECK(mu.dim() == 3 && mu.size(0) == s.B, kOp, ": mu must be (B, K, C), got ", mu.sizes());
  const int64_t K = mu.size(1), C = mu.size(2);
  check_dense(m, mu, {s.B, 1, s.H, s.W}, "m");
  check_dense(mass, mu, {s.B, K}, "mass");
  check_dense(mu, mu, {s.B, K, C}, "mu");
  check_dense(sigma, mu, {s.B, K, C}, "sigma");
  const c10::cuda::CUDAGuard guard(mu.device());
  auto key_bias = at::empty({s.B, K}, mu.options().dtype(at::kFloat));
  auto values = at::empty({s.B, K, 2 * C}, mu.options());
  auto weight = at::empty_like(m);
  const BlendShape ks{s.B, C, s.H, s.W};  // C: the statistics' channels
  check_launch(cuda::ptl_keys(dtype_tag(mu), mass.data_ptr(), mu.data_ptr(), sigma.data_ptr(),
                              m.data_ptr(), ks, K, min_mass, key_bias.data_ptr<float>(),
                              values.data_ptr(), weight.data_ptr(),
                              c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {key_bias, values, weight};
}

at::Tensor ptl_blend_forward(const at::Tensor& x, const at::Tensor& attn_out,
                             const at::Tensor& c_f, const at::Tensor& weight) {
  const BlendShape s = shape_of(x);
  const int64_t L = s.H * s.W;
  check_dense(x, x, x.sizes(), "x");
  check_dense(attn_out, x, {s.B, L, 2 * s.C}, "attn_out");
  check_dense(c_f, x, {s.B, L, s.C}, "c_f");
  check_dense(weight, x, {s.B, 1, s.H, s.W}, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  check_launch(cuda::ptl_blend_forward(dtype_tag(x), x.data_ptr(), attn_out.data_ptr(),
                                       c_f.data_ptr(), weight.data_ptr(), s, out.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream()),
               kOp);
  return out;
}

at::Tensor ptl_blend_backward(const at::Tensor& grad, const at::Tensor& weight,
                              const at::Tensor& c_f) {
  const BlendShape s = shape_of(grad);
  const int64_t L = s.H * s.W;
  check_dense(weight, grad, {s.B, 1, s.H, s.W}, "weight");
  check_dense(c_f, grad, {s.B, L, s.C}, "c_f");
  const c10::cuda::CUDAGuard guard(grad.device());
  auto gav = at::empty({s.B, L, 2 * s.C}, c_f.options());
  check_launch(cuda::ptl_blend_backward(dtype_tag(grad), grad.data_ptr(), strides_of_x(grad),
                                        weight.data_ptr(), c_f.data_ptr(), s, gav.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream()),
               kOp);
  return gav;
}

void ptl_grad_x_(at::Tensor& gx, const at::Tensor& gxp, const at::Tensor& grad,
                 const at::Tensor& weight) {
  const BlendShape s = shape_of(gx);
  check_dense(gx, gx, gx.sizes(), "gx");
  check_dense(gxp, gx, gx.sizes(), "gxp");
  check_dense(weight, gx, {s.B, 1, s.H, s.W}, "weight");
  TORCH_CHECK(grad.sizes() == gx.sizes() && grad.scalar_type() == gx.scalar_type() &&
                  grad.device() == gx.device(),
              kOp, ": grad must match gx (", gx.sizes(), ", ", gx.scalar_type(), ")");
  const c10::cuda::CUDAGuard guard(gx.device());
  check_launch(cuda::ptl_grad_x(dtype_tag(gx), gx.data_ptr(), gxp.data_ptr(), grad.data_ptr(),
                                strides_of_x(grad), weight.data_ptr(), s,
                                c10::cuda::getCurrentCUDAStream()),
               kOp);
}

}  // namespace cuda
}  // namespace regharm
