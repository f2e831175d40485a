// CPU kernels of regharm::masked_norm and regharm::masked_norm_backward: PTL's foreground
// content, a masked instance norm written as (B, H*W, C) tokens (regharm_ext/ops/norm_composite.py).
//
// Statistics run over each (image, channel) row of x, which is contiguous; the tokens and the
// gradient are written by rows of their own layout, so no two threads share a cache line.
// A channels-last x (the model's CPU layout) is read as it is: its pixels already are the
// tokens, and blocks of kBlock channels are summed side by side. Copying it to NCHW first cost
// more than the kernels at C = 64 (PyTorch's channels-last -> contiguous copy).
// T is the accumulation type: float for float32/float16/bfloat16 inputs, double for float64.
#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace regharm {
namespace cpu {
namespace {

constexpr const char* kOp = "regharm::masked_norm";
constexpr const char* kOpBw = "regharm::masked_norm_backward";

// 1 / Σ weight of each image, 0 for an image without weight (then w_n = 0: mu = var = 0). A
// subnormal Σ counts as the smallest normal number, as the composite's clamp_min(tiny) does:
// 1 / 1e-40 is inf in float32, and inf times a zero weight NaN.
template <typename T>
void inverse_mass(const T* w, int64_t B, int64_t HW, T* inv) {
  for (int64_t b = 0; b < B; ++b) {
    T mass = 0;
    for (int64_t l = 0; l < HW; ++l) mass += w[b * HW + l];
    inv[b] = mass > 0 ? T(1) / std::max(mass, std::numeric_limits<T>::min()) : T(0);
  }
}

constexpr int64_t kBlock = 16;  // channels summed side by side (independent lanes)

// x in the accumulation dtype, channels-last when it came so (then read in place), else NCHW.
at::Tensor to_acc_layout(const at::Tensor& x, at::ScalarType acc, bool& channels_last) {
  channels_last = x.size(1) > 1 && x.size(2) * x.size(3) > 1 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return channels_last ? to_acc_channels_last(x, acc) : to_acc(x, acc);
}

// mu and rstd of channels [c0, c0 + n) of image b, x channels-last: each channel's sums run over
// the pixels in the same order, with the same expressions, as the NCHW rows below.
template <typename T>
void stats_block_cl(const T* px, const T* pw, T inv, int64_t b, int64_t HW, int64_t C,
                    int64_t c0, int64_t n, T eps, T* mu, T* rstd) {
  T s1[kBlock] = {}, m[kBlock], s2[kBlock] = {};
  const T* wr = pw + b * HW;
  for (int64_t l = 0; l < HW; ++l) {
    const T* xr = px + (b * HW + l) * C + c0;
    for (int64_t c = 0; c < n; ++c) s1[c] += wr[l] * xr[c];
  }
  for (int64_t c = 0; c < n; ++c) m[c] = s1[c] * inv;
  for (int64_t l = 0; l < HW; ++l) {
    const T* xr = px + (b * HW + l) * C + c0;
    for (int64_t c = 0; c < n; ++c) s2[c] += wr[l] * (xr[c] - m[c]) * (xr[c] - m[c]);
  }
  for (int64_t c = 0; c < n; ++c) {
    mu[b * C + c0 + c] = m[c];
    rstd[b * C + c0 + c] = T(1) / std::sqrt(s2[c] * inv + eps);
  }
}

// dx (B, C, H, W contiguous) of channels [c0, c0 + n) of image b, x channels-last.
template <typename T>
void grad_block_cl(const T* px, const T* pw, const T* pg, const T* pmu, const T* pr, T inv,
                   int64_t b, int64_t HW, int64_t C, int64_t c0, int64_t n, T* pdx) {
  T sg[kBlock] = {}, sgy[kBlock] = {}, m[kBlock], r[kBlock], a[kBlock], k[kBlock];
  for (int64_t c = 0; c < n; ++c) m[c] = pmu[b * C + c0 + c], r[c] = pr[b * C + c0 + c];
  for (int64_t l = 0; l < HW; ++l) {
    const T* xr = px + (b * HW + l) * C + c0;
    const T* gr = pg + (b * HW + l) * C + c0;
    for (int64_t c = 0; c < n; ++c) {
      sg[c] += gr[c];
      sgy[c] += gr[c] * (xr[c] - m[c]) * r[c];
    }
  }
  for (int64_t c = 0; c < n; ++c) a[c] = r[c] * sg[c], k[c] = r[c] * sgy[c];
  const T* wr = pw + b * HW;
  T* out = pdx + (b * C + c0) * HW;
  for (int64_t l = 0; l < HW; ++l) {
    const T* xr = px + (b * HW + l) * C + c0;
    const T* gr = pg + (b * HW + l) * C + c0;
    const T wn = wr[l] * inv;   // first: inv may be 1 / FLT_MIN, a[c] * inv would overflow
    for (int64_t c = 0; c < n; ++c)
      out[c * HW + l] = r[c] * gr[c] - wn * (a[c] + (xr[c] - m[c]) * r[c] * k[c]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_norm_cpu(const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               double eps) {
  const NormDims d = check_norm_args(OnCpu{kOp}, x, weight, eps, kOp);
  const int64_t HW = d.H * d.W;
  const auto acc = acc_dtype(x);
  bool cl = false;
  const auto xa = to_acc_layout(x, acc, cl), wa = to_acc(weight, acc);
  auto mu = at::empty({d.B, d.C}, wa.options()), rstd = at::empty({d.B, d.C}, wa.options());
  auto y = at::empty({d.B, HW, d.C}, wa.options());
  const int64_t blocks = (d.C + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_norm_cpu", [&] {
    using T = scalar_t;
    const T *px = xa.data_ptr<T>(), *pw = wa.data_ptr<T>();
    T *pmu = mu.data_ptr<T>(), *pr = rstd.data_ptr<T>(), *py = y.data_ptr<T>();
    std::vector<T> inv(d.B);
    inverse_mass(pw, d.B, HW, inv.data());
    if (cl) {
      at::parallel_for(0, d.B * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / blocks, c0 = t % blocks * kBlock;
          stats_block_cl(px, pw, inv[b], b, HW, d.C, c0, std::min(kBlock, d.C - c0), T(eps), pmu,
                         pr);
        }
      });
      // the tokens are x's own layout
      at::parallel_for(0, d.B * HW, 64, [&](int64_t begin, int64_t end) {
        for (int64_t bl = begin; bl < end; ++bl) {
          const T* m = pmu + bl / HW * d.C;
          const T* r = pr + bl / HW * d.C;
          for (int64_t c = 0; c < d.C; ++c)
            py[bl * d.C + c] = (px[bl * d.C + c] - m[c]) * r[c];
        }
      });
      return;
    }
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
  bool cl = false;
  const auto xa = to_acc_layout(x, acc, cl), wa = to_acc(weight, acc), ga = to_acc(grad, acc);
  const auto mua = to_acc(mu, acc), ra = to_acc(rstd, acc);
  auto dx = at::empty({d.B, d.C, d.H, d.W}, wa.options());
  const int64_t blocks = (d.C + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_norm_backward_cpu", [&] {
    using T = scalar_t;
    const T *px = xa.data_ptr<T>(), *pw = wa.data_ptr<T>(), *pg = ga.data_ptr<T>();
    const T *pmu = mua.data_ptr<T>(), *pr = ra.data_ptr<T>();
    T* pdx = dx.data_ptr<T>();
    std::vector<T> inv(d.B);
    inverse_mass(pw, d.B, HW, inv.data());
    if (cl) {
      at::parallel_for(0, d.B * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / blocks, c0 = t % blocks * kBlock;
          grad_block_cl(px, pw, pg, pmu, pr, inv[b], b, HW, d.C, c0, std::min(kBlock, d.C - c0),
                        pdx);
        }
      });
      return;
    }
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
        const T a = r * sg, k = r * sgy, ib = inv[b];
        T* out = pdx + bc * HW;
        for (int64_t l = 0; l < HW; ++l)   // w_n first: inv may be 1 / FLT_MIN
          out[l] = r * gc[l * d.C] - (wr[l] * ib) * (a + (xr[l] - m) * r * k);
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
