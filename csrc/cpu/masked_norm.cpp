// CPU kernels of regharm::masked_norm and regharm::masked_norm_backward: PTL's foreground
// content, a masked instance norm written as (B, H*W, C) tokens (regharm_ext/ops/norm_composite.py).
//
// Statistics run over each (image, channel) row of x, which is contiguous; the tokens and the
// gradient are written by rows of their own layout, so no two threads share a cache line.
// T is the accumulation type: float for float32/float16/bfloat16 inputs, double for float64.
#include <cmath>
#include <tuple>

#include "cpu_common.h"

namespace regharm {
namespace cpu {
namespace {

constexpr const char* kOp = "regharm::masked_norm";
constexpr const char* kOpBw = "regharm::masked_norm_backward";

// 1 / Σ weight of each image, 0 for an image without weight (then w_n = 0: mu = var = 0)
template <typename T>
void inverse_mass(const T* w, int64_t B, int64_t HW, T* inv) {
  for (int64_t b = 0; b < B; ++b) {
    T mass = 0;
    for (int64_t l = 0; l < HW; ++l) mass += w[b * HW + l];
    inv[b] = mass > 0 ? T(1) / mass : T(0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_norm_cpu(const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               double eps) {
  const NormDims d = check_norm_args(OnCpu{kOp}, x, weight, eps, kOp);
  const int64_t HW = d.H * d.W;
  const auto acc = acc_dtype(x);
  const auto xa = to_acc(x, acc), wa = to_acc(weight, acc);
  auto mu = at::empty({d.B, d.C}, xa.options()), rstd = at::empty({d.B, d.C}, xa.options());
  auto y = at::empty({d.B, HW, d.C}, xa.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_norm_cpu", [&] {
    using T = scalar_t;
    const T *px = xa.data_ptr<T>(), *pw = wa.data_ptr<T>();
    T *pmu = mu.data_ptr<T>(), *pr = rstd.data_ptr<T>(), *py = y.data_ptr<T>();
    std::vector<T> inv(d.B);
    inverse_mass(pw, d.B, HW, inv.data());
    at::parallel_for(0, d.B * d.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / d.C;
        const T* xr = px + bc * HW;
        const T* wr = pw + b * HW;
        T s1 = 0;
        for (int64_t l = 0; l < HW; ++l) s1 += wr[l] * xr[l];
        const T m = s1 * inv[b];
        T s2 = 0;
        for (int64_t l = 0; l < HW; ++l) s2 += wr[l] * (xr[l] - m) * (xr[l] - m);
        pmu[bc] = m;
        pr[bc] = T(1) / std::sqrt(s2 * inv[b] + T(eps));
      }
    });
    at::parallel_for(0, d.B * HW, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bl = begin; bl < end; ++bl) {
        const int64_t b = bl / HW, l = bl % HW;
        for (int64_t c = 0; c < d.C; ++c) {
          const int64_t bc = b * d.C + c;
          py[bl * d.C + c] = (px[bc * HW + l] - pmu[bc]) * pr[bc];
        }
      }
    });
  });
  return {y.to(x.scalar_type()), mu, rstd};
}

at::Tensor masked_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& mu,
                                    const at::Tensor& rstd) {
  const NormDims d = check_norm_args(OnCpu{kOpBw}, x, weight, 1.0, kOpBw);
  check_norm_saved(OnCpu{kOpBw}, d, grad, mu, rstd, kOpBw);
  const int64_t HW = d.H * d.W;
  const auto acc = acc_dtype(x);
  const auto xa = to_acc(x, acc), wa = to_acc(weight, acc), ga = to_acc(grad, acc);
  const auto mua = to_acc(mu, acc), ra = to_acc(rstd, acc);
  auto dx = at::empty({d.B, d.C, d.H, d.W}, xa.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_norm_backward_cpu", [&] {
    using T = scalar_t;
    const T *px = xa.data_ptr<T>(), *pw = wa.data_ptr<T>(), *pg = ga.data_ptr<T>();
    const T *pmu = mua.data_ptr<T>(), *pr = ra.data_ptr<T>();
    T* pdx = dx.data_ptr<T>();
    std::vector<T> inv(d.B);
    inverse_mass(pw, d.B, HW, inv.data());
    // dx = r·g - w_n·(r·Σg + y·r·Σg·y): each (image, channel) row reads its tokens' column of
    // grad and writes its own contiguous row of dx
    at::parallel_for(0, d.B * d.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / d.C, c = bc % d.C;
        const T* xr = px + bc * HW;
        const T* wr = pw + b * HW;
        const T* gc = pg + b * HW * d.C + c;
        const T m = pmu[bc], r = pr[bc];
        T sg = 0, sgy = 0;
        for (int64_t l = 0; l < HW; ++l) {
          const T g = gc[l * d.C];
          sg += g;
          sgy += g * (xr[l] - m) * r;
        }
        const T a = r * sg * inv[b], k = r * sgy * inv[b];
        T* out = pdx + bc * HW;
        for (int64_t l = 0; l < HW; ++l)
          out[l] = r * gc[l * d.C] - wr[l] * (a + (xr[l] - m) * r * k);
      }
    });
  });
  return dx.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(regharm, CPU, m) {
  m.impl("masked_norm", &masked_norm_cpu);
  m.impl("masked_norm_backward", &masked_norm_backward_cpu);
}

}  // namespace cpu
}  // namespace regharm
