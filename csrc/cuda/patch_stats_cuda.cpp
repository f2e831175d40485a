// Torch glue of the CUDA patch_stats kernels (SPEC §2): checks, dtype conversions, allocation,
// the current stream (c10::cuda::getCurrentCUDAStream, what at::cuda:: re-exports, without
// ATen/cuda/CUDAContext.h and its cuBLAS/cuSPARSE headers). The kernels are in patch_stats_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "cuda_glue.h"
#include "kernels.h"

namespace regharm {
namespace cuda {
namespace {

constexpr const char* kOp = "regharm::patch_stats (CUDA)";
constexpr const char* kOpBw = "regharm::patch_stats_backward (CUDA)";

// Called under a guard on x's device (the shared-memory check asks that device).
PatchShape check_args(const at::Tensor& x, const at::Tensor& bg, const at::Tensor& weight,
                      const at::Tensor* bias, int64_t ph, int64_t pw, int64_t sh, int64_t sw,
                      double eps, double min_mass, const char* op) {
  const auto dev = x.device();
  check_float_cuda(x, "x", op, dev);
  check_float_cuda(bg, "bg", op, dev);
  check_float_cuda(weight, "weight", op, dev);
  if (bias) check_float_cuda(*bias, "bias", op, dev);
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (B, C, H, W), got ", x.sizes());
  PatchShape s{};
  s.B = x.size(0), s.C = x.size(1), s.H = x.size(2), s.W = x.size(3);
  check_shape(bg, {s.B, 1, s.H, s.W}, "bg", op, "(B, 1, H, W)");
  TORCH_CHECK(ph >= 1 && pw >= 1, op, ": patch size must be >= 1, got (", ph, ", ", pw, ")");
  TORCH_CHECK(sh >= 1 && sw >= 1, op, ": stride must be >= 1, got (", sh, ", ", sw, ")");
  TORCH_CHECK(s.H >= ph && s.W >= pw, op, ": patch size (", ph, ", ", pw,
              ") is larger than the feature map (", s.H, ", ", s.W, ") of x");
  check_shape(weight, {ph * pw}, "weight", op, "(ph*pw,)");
  if (bias) check_shape(*bias, {1}, "bias", op, "(1,)");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  TORCH_CHECK(min_mass > 0, op, ": min_mass must be > 0, got ", min_mass);
  check_grid_dim(s.B, "batch size B", op);
  check_grid_dim(s.C, "channels C", op);
  s.ph = int(ph), s.pw = int(pw), s.sh = int(sh), s.sw = int(sw);
  s.Kh = (s.H - ph) / sh + 1;
  s.Kw = (s.W - pw) / sw + 1;
  size_t need = 0, have = 0;
  TORCH_CHECK(patch_stats_fits(dtype_tag(x), s, &need, &have), op, ": a patch of (", ph, ", ", pw,
              ") needs ", need, " bytes of shared memory, the GPU offers ", have,
              "; use a smaller patch");
  return s;
}

XStrides strides_of_x(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}
BgStrides strides_of_bg(const at::Tensor& bg) { return {bg.stride(0), bg.stride(2), bg.stride(3)}; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_stats_cuda(
    const at::Tensor& x, const at::Tensor& bg, const at::Tensor& weight, const at::Tensor& bias,
    int64_t ph, int64_t pw, int64_t sh, int64_t sw, double eps, double min_mass) {
  TORCH_CHECK(x.defined() && x.is_cuda(), kOp, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const PatchShape s = check_args(x, bg, weight, &bias, ph, pw, sh, sw, eps, min_mass, kOp);
  const auto acc = acc_dtype(x);
  // x and bg are read through their strides; the small parameters are made contiguous
  const auto bga = bg.to(acc);
  const auto wa = weight.to(acc).contiguous(), ba = bias.to(acc).contiguous();
  const int64_t K = s.Kh * s.Kw;
  auto mu = at::empty({s.B, K, s.C}, x.options());
  auto sigma = at::empty({s.B, K, s.C}, x.options());
  auto content = at::empty({s.B, K, s.C}, x.options());
  auto mass = at::empty({s.B, K}, x.options());
  check_launch(patch_stats_forward(dtype_tag(x), x.data_ptr(), strides_of_x(x), bga.data_ptr(),
                                   strides_of_bg(bga), wa.data_ptr(), ba.data_ptr(), s, eps,
                                   min_mass, mu.data_ptr(), sigma.data_ptr(), content.data_ptr(),
                                   mass.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {mu, sigma, content, mass};
}

// The saved mu, sigma and mass are only checked: the kernels recompute the window statistics
// in the accumulation type (the saved 16-bit ones are rounded), like the CPU kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_stats_backward_cuda(
    const at::Tensor& grad_mu, const at::Tensor& grad_sigma, const at::Tensor& grad_content,
    const at::Tensor& x, const at::Tensor& bg, const at::Tensor& weight, const at::Tensor& mu,
    const at::Tensor& sigma, const at::Tensor& mass, int64_t ph, int64_t pw, int64_t sh,
    int64_t sw, double eps, double min_mass) {
  TORCH_CHECK(x.defined() && x.is_cuda(), kOpBw, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const PatchShape s = check_args(x, bg, weight, nullptr, ph, pw, sh, sw, eps, min_mass, kOpBw);
  const int64_t K = s.Kh * s.Kw;
  const std::vector<int64_t> bkc{s.B, K, s.C};
  const std::pair<const at::Tensor*, const char*> per_patch[] = {
      {&grad_mu, "grad_mu"}, {&grad_sigma, "grad_sigma"}, {&grad_content, "grad_content"},
      {&mu, "mu"}, {&sigma, "sigma"}};
  for (const auto& [t, name] : per_patch) {
    check_float_cuda(*t, name, kOpBw, x.device());
    check_shape(*t, bkc, name, kOpBw, "(B, K, C)");
  }
  check_float_cuda(mass, "mass", kOpBw, x.device());
  check_shape(mass, {s.B, K}, "mass", kOpBw, "(B, K)");

  const auto acc = acc_dtype(x);
  const auto bga = bg.to(acc);
  const auto wa = weight.to(acc).contiguous();
  const auto gmu = grad_mu.to(acc).contiguous(), gsig = grad_sigma.to(acc).contiguous();
  const auto gcon = grad_content.to(acc).contiguous();
  const auto dt = dtype_tag(x);
  auto workspace = at::empty({int64_t(patch_stats_backward_workspace(dt, s))},
                             x.options().dtype(at::kByte));
  auto grad_x = at::empty({s.B, s.C, s.H, s.W}, x.options());
  auto grad_wb = at::empty({int64_t(ph * pw) + 1}, x.options().dtype(acc));
  check_launch(patch_stats_backward(dt, gmu.data_ptr(), gsig.data_ptr(), gcon.data_ptr(),
                                    x.data_ptr(), strides_of_x(x), bga.data_ptr(),
                                    strides_of_bg(bga), wa.data_ptr(), s, eps, min_mass,
                                    workspace.data_ptr(), grad_x.data_ptr(), grad_wb.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
               kOpBw);
  // copies, so that the two outputs never share storage
  auto grad_w = grad_wb.narrow(0, 0, ph * pw).to(weight.scalar_type(), false, true);
  auto grad_b = grad_wb.narrow(0, ph * pw, 1).to(grad_content.scalar_type(), false, true);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(regharm, CUDA, m) {
  m.impl("patch_stats", &patch_stats_cuda);
  m.impl("patch_stats_backward", &patch_stats_backward_cuda);
}

}  // namespace cuda
}  // namespace regharm
