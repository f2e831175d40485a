// Torch glue of the CUDA patch_stats kernels (SPEC §2): checks, dtype conversions, allocation,
// the current stream (c10::cuda::getCurrentCUDAStream, what at::cuda:: re-exports, without
// ATen/cuda/CUDAContext.h and its cuBLAS/cuSPARSE headers). The kernels are in patch_stats_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "cuda_glue.h"
#include "kernels.h"

namespace regharm {
namespace cuda {
namespace {

constexpr const char* kOp = "regharm::patch_stats (CUDA)";
constexpr const char* kOpBw = "regharm::patch_stats_backward (CUDA)";

// The checked sizes and the kernels' shape of them. Called under a guard on x's device (the
// shared-memory check asks that device).
std::pair<PatchDims, PatchShape> check_args(const at::Tensor& x, const at::Tensor& bg,
                                            const at::Tensor& weight, const at::Tensor* bias,
                                            int64_t ph, int64_t pw, int64_t sh, int64_t sw,
                                            double eps, double min_mass, const char* op) {
  const PatchDims d = check_patch_args(OnCuda{op, x.device()}, x, bg, weight, bias, ph, pw, sh,
                                      sw, eps, min_mass, op);
  PatchShape s{};
  s.B = d.B, s.C = d.C, s.H = d.H, s.W = d.W;
  check_grid_dim(s.B, "batch size B", op);
  check_grid_dim(s.C, "channels C", op);
  s.ph = int(ph), s.pw = int(pw), s.sh = int(sh), s.sw = int(sw);
  s.Kh = d.Kh, s.Kw = d.Kw;
  size_t need = 0, have = 0;
  TORCH_CHECK(patch_stats_fits(dtype_tag(x), s, &need, &have), op, ": a patch of (", ph, ", ", pw,
              ") needs ", need, " bytes of shared memory, the GPU offers ", have,
              "; use a smaller patch");
  return {d, s};
}

// REGHARM_CUDA_PS_GATHER: how the backward gives each pixel its gradient, from its cell's
// shared sums where windows are whole strides (patch_stats_kernels.cu) or from its covering
// patches one by one (GPU run 2's gather).
bool pixel_gather_asked(const char* op) {
  return env_choice("REGHARM_CUDA_PS_GATHER",
                    {{"auto", "a cell's sums shared by its pixels where windows are whole strides"},
                     {"pixels", "every pixel from its covering patches"}},
                    op) == "pixels";
}

BgStrides strides_of_bg(const at::Tensor& bg) { return {bg.stride(0), bg.stride(2), bg.stride(3)}; }

// A (B, K, C) gradient as the kernels read it: in acc, rows (b, k) a fixed stride apart and
// columns contiguous. PTL's dmu and dsigma are the halves of the attention's dV (rows 2C apart)
// and are read where they are: two copies fewer per PTL backward.
std::pair<at::Tensor, int64_t> grad_rows(const at::Tensor& g, at::ScalarType acc, int64_t K,
                                         int64_t C) {
  if (g.scalar_type() == acc && (C == 1 || g.stride(2) == 1) && g.stride(1) >= C &&
      g.stride(0) == K * g.stride(1))
    return {g, g.stride(1)};
  return {g.to(acc).contiguous(), C};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_stats_cuda(
    const at::Tensor& x, const at::Tensor& bg, const at::Tensor& weight, const at::Tensor& bias,
    int64_t ph, int64_t pw, int64_t sh, int64_t sw, double eps, double min_mass) {
  TORCH_CHECK(x.defined() && x.is_cuda(), kOp, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [d, s] = check_args(x, bg, weight, &bias, ph, pw, sh, sw, eps, min_mass, kOp);
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
  auto [d, s] = check_args(x, bg, weight, nullptr, ph, pw, sh, sw, eps, min_mass, kOpBw);
  s.pixel_gather = pixel_gather_asked(kOpBw);
  check_patch_saved(OnCuda{kOpBw, x.device()}, d, grad_mu, grad_sigma, grad_content, mu, sigma,
                    mass, kOpBw);

  const auto acc = acc_dtype(x);
  const auto bga = bg.to(acc);
  const auto wa = weight.to(acc).contiguous();
  const int64_t K = s.Kh * s.Kw;
  const auto [gmu, mu_rows] = grad_rows(grad_mu, acc, K, s.C);
  const auto [gsig, sigma_rows] = grad_rows(grad_sigma, acc, K, s.C);
  const auto [gcon, content_rows] = grad_rows(grad_content, acc, K, s.C);
  const auto dt = dtype_tag(x);
  auto workspace = at::empty({int64_t(patch_stats_backward_workspace(dt, s))},
                             x.options().dtype(at::kByte));
  auto grad_x = at::empty({s.B, s.C, s.H, s.W}, x.options());
  auto grad_w = at::empty({ph * pw}, x.options().dtype(acc));
  auto grad_b = at::empty({1}, x.options().dtype(acc));
  check_launch(patch_stats_backward(dt, gmu.data_ptr(), gsig.data_ptr(), gcon.data_ptr(),
                                    GradRows{mu_rows, sigma_rows, content_rows}, x.data_ptr(),
                                    strides_of_x(x), bga.data_ptr(), strides_of_bg(bga),
                                    wa.data_ptr(), s, eps, min_mass, workspace.data_ptr(),
                                    grad_x.data_ptr(), grad_w.data_ptr(), grad_b.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
               kOpBw);
  return {grad_x, grad_w.to(weight.scalar_type()), grad_b.to(grad_content.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(regharm, CUDA, m) {
  m.impl("patch_stats", &patch_stats_cuda);
  m.impl("patch_stats_backward", &patch_stats_backward_cuda);
}

}  // namespace cuda
}  // namespace regharm
