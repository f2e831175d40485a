// Torch glue of the CUDA masked_norm kernels (masked_norm_kernels.cu): checks, contiguous inputs,
// allocation, the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cuda_glue.h"
#include "kernels.h"

namespace regharm {
namespace cuda {
namespace {

constexpr const char* kOp = "regharm::masked_norm (CUDA)";
constexpr const char* kOpBw = "regharm::masked_norm_backward (CUDA)";

NormShape shape_of(const NormDims& d, const char* op) {
  check_grid_dim(d.B, "batch size B", op);
  check_grid_dim((d.C + 31) / 32, "channel tiles (C + 31) / 32", op);
  // the statistics kernel has one block per (image, channel) along grid x
  TORCH_CHECK(d.B * d.C <= 2147483647, op, ": B * C = ", d.B * d.C,
              " exceeds the CUDA kernels' limit of 2^31 - 1 blocks");
  return NormShape{d.B, d.C, d.H * d.W};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_norm_cuda(const at::Tensor& x,
                                                                const at::Tensor& weight,
                                                                double eps) {
  TORCH_CHECK(x.defined() && x.is_cuda(), kOp, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const NormShape s = shape_of(check_norm_args(OnCuda{kOp, x.device()}, x, weight, eps, kOp), kOp);
  const auto acc = acc_dtype(x);
  const auto xc = x.contiguous();
  const auto wa = weight.to(acc).contiguous();
  auto y = at::empty({s.B, s.HW, s.C}, x.options());
  auto mu = at::empty({s.B, s.C}, x.options().dtype(acc));
  auto rstd = at::empty({s.B, s.C}, x.options().dtype(acc));
  if (s.HW == 0) {  // the kernels skip an empty map; the statistics of no weight, as on CPU
    mu.zero_();
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mu, rstd};
  }
  check_launch(masked_norm_forward(dtype_tag(x), xc.data_ptr(), wa.data_ptr(), s, eps,
                                   y.data_ptr(), mu.data_ptr(), rstd.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {y, mu, rstd};
}

at::Tensor masked_norm_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                     const at::Tensor& weight, const at::Tensor& mu,
                                     const at::Tensor& rstd) {
  TORCH_CHECK(x.defined() && x.is_cuda(), kOpBw, ": x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const NormDims d = check_norm_args(OnCuda{kOpBw, x.device()}, x, weight, 1.0, kOpBw);
  check_norm_saved(OnCuda{kOpBw, x.device()}, d, grad, mu, rstd, kOpBw);
  const NormShape s = shape_of(d, kOpBw);
  const auto acc = acc_dtype(x);
  const auto dt = dtype_tag(x);
  const auto xc = x.contiguous(), gc = grad.to(x.scalar_type()).contiguous();
  const auto wa = weight.to(acc).contiguous();
  const auto mua = mu.to(acc).contiguous(), ra = rstd.to(acc).contiguous();
  auto workspace = at::empty({int64_t(masked_norm_backward_workspace(dt, s))},
                             x.options().dtype(at::kByte));
  auto dx = at::empty({s.B, s.C, d.H, d.W}, x.options());
  check_launch(masked_norm_backward(dt, gc.data_ptr(), xc.data_ptr(), wa.data_ptr(),
                                    mua.data_ptr(), ra.data_ptr(), s, workspace.data_ptr(),
                                    dx.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               kOpBw);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(regharm, CUDA, m) {
  m.impl("masked_norm", &masked_norm_cuda);
  m.impl("masked_norm_backward", &masked_norm_backward_cuda);
}

}  // namespace cuda
}  // namespace regharm
