// CPU kernels of regharm::patch_stats and regharm::patch_stats_backward (SPEC §2).
//
// Every output is a sum over one patch window read straight from x: the B·K·C·ph·pw block
// tensor never exists. x is taken channels-last (the model's CPU layout; an NCHW x is copied),
// so the window sweeps of patch_kernels.h run across channels in vectors.
//
// T is the accumulation type: float for float32/float16/bfloat16 inputs (converted once at
// entry), double for float64.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace regharm {
namespace cpu {
namespace {

constexpr const char* kOp = "regharm::patch_stats";
constexpr const char* kOpBw = "regharm::patch_stats_backward";

struct Geom {
  int64_t B, C, H, W, ph, pw, sh, sw, Kh, Kw, K, P;
};

Geom geom_of(const PatchDims& d, int64_t ph, int64_t pw, int64_t sh, int64_t sw) {
  return Geom{d.B, d.C, d.H, d.W, ph, pw, sh, sw, d.Kh, d.Kw, d.Kh * d.Kw, ph * pw};
}

// x channels-last: pixel (h, w) of image b at p + b·sB + h·sH + w·sW, its C channels contiguous.
template <typename T>
struct XView {
  const T* p;
  int64_t C, sB, sH, sW;
  const T* at(int64_t b, int64_t h, int64_t w) const { return p + b * sB + h * sH + w * sW; }
};

template <typename T>
XView<T> x_view(const at::Tensor& xa) {
  TORCH_INTERNAL_ASSERT(xa.size(1) == 1 || xa.stride(1) == 1,
                        "patch_stats: x is not channels-last");
  return XView<T>{xa.data_ptr<T>(), xa.size(1), xa.stride(0), xa.stride(2), xa.stride(3)};
}

namespace isa_base {
#define REGHARM_VEC_BYTES 16
#include "simd.h"
#include "patch_kernels.h"
#undef REGHARM_VEC_BYTES
}  // namespace isa_base
#if REGHARM_HAVE_AVX2_COPY
REGHARM_AVX2_BEGIN
namespace isa_avx2 {
#define REGHARM_VEC_BYTES 32
#include "simd.h"
#include "patch_kernels.h"
#undef REGHARM_VEC_BYTES
}  // namespace isa_avx2
REGHARM_AVX2_END
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_stats_cpu(
    const at::Tensor& x, const at::Tensor& bg, const at::Tensor& weight, const at::Tensor& bias,
    int64_t ph, int64_t pw, int64_t sh, int64_t sw, double eps, double min_mass) {
  const Geom g = geom_of(
      check_patch_args(OnCpu{kOp}, x, bg, weight, &bias, ph, pw, sh, sw, eps, min_mass, kOp), ph,
      pw, sh, sw);
  const auto acc = acc_dtype(x);
  const auto xa = to_acc_channels_last(x, acc), bga = to_acc(bg, acc), wa = to_acc(weight, acc);
  const auto ba = to_acc(bias, acc);
  const auto opts = bga.options();
  auto mu = at::empty({g.B, g.K, g.C}, opts), sigma = at::empty({g.B, g.K, g.C}, opts);
  auto content = at::empty({g.B, g.K, g.C}, opts), mass = at::empty({g.B, g.K}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "patch_stats_cpu", [&] {
    using T = scalar_t;
    const XView<T> px = x_view<T>(xa);
    const T* pbg = bga.data_ptr<T>();
    const T* pwt = wa.data_ptr<T>();
    const T bias_v = ba.data_ptr<T>()[0];
    T *pmu = mu.data_ptr<T>(), *psig = sigma.data_ptr<T>(), *pcon = content.data_ptr<T>();
    T* pmass = mass.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.C * g.P));
    at::parallel_for(0, g.B * g.K, grain, [&](int64_t begin, int64_t end) {
      REGHARM_ISA_CALL(forward_patches<T>, g, px, pbg, pwt, bias_v, static_cast<T>(eps),
                       static_cast<T>(min_mass), pmu, psig, pcon, pmass, begin, end);
    });
  });
  const auto dt = x.scalar_type();
  return {mu.to(dt), sigma.to(dt), content.to(dt), mass.to(dt)};
}

// The saved mu, sigma and mass are only checked: the window statistics are recomputed in the
// accumulation dtype, since for 16-bit inputs the saved ones are rounded (a bfloat16 mu of a
// +100 input is off by up to 0.25, which would spoil every centred sum).
std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_stats_backward_cpu(
    const at::Tensor& grad_mu, const at::Tensor& grad_sigma, const at::Tensor& grad_content,
    const at::Tensor& x, const at::Tensor& bg, const at::Tensor& weight, const at::Tensor& mu,
    const at::Tensor& sigma, const at::Tensor& mass, int64_t ph, int64_t pw, int64_t sh,
    int64_t sw, double eps, double min_mass) {
  const PatchDims d =
      check_patch_args(OnCpu{kOpBw}, x, bg, weight, nullptr, ph, pw, sh, sw, eps, min_mass, kOpBw);
  check_patch_saved(OnCpu{kOpBw}, d, grad_mu, grad_sigma, grad_content, mu, sigma, mass, kOpBw);
  const Geom g = geom_of(d, ph, pw, sh, sw);

  const auto acc = acc_dtype(x);
  const auto xa = to_acc_channels_last(x, acc), bga = to_acc(bg, acc), wa = to_acc(weight, acc);
  const auto gmu = to_acc(grad_mu, acc), gsig = to_acc(grad_sigma, acc);
  const auto gcon = to_acc(grad_content, acc);
  const auto opts = bga.options();
  const auto shift = g.H * g.W > 0 ? xa.mean({2, 3}).contiguous() : at::zeros({g.B, g.C}, opts);
  auto alpha = at::zeros({g.B, g.K, g.C}, opts), beta = at::zeros({g.B, g.K, g.C}, opts);
  auto gamma = at::zeros({g.B, g.K, g.C}, opts);
  auto live = at::zeros({g.B * g.K}, opts.dtype(at::kByte));
  auto gw_rows = at::zeros({g.B * g.Kh, g.P}, opts), gb_rows = at::zeros({g.B * g.Kh}, opts);
  auto grad_x = at::empty({g.B, g.C, g.H, g.W}, opts);
  auto grad_w = at::zeros({g.P}, opts), grad_b = at::zeros({1}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "patch_stats_backward_cpu", [&] {
    using T = scalar_t;
    const XView<T> px = x_view<T>(xa);
    const T* pbg = bga.data_ptr<T>();
    const T* pwt = wa.data_ptr<T>();
    uint8_t* plive = live.data_ptr<uint8_t>();
    const T* psh = shift.data_ptr<T>();
    T *pa = alpha.data_ptr<T>(), *pb = beta.data_ptr<T>(), *pg = gamma.data_ptr<T>();
    at::parallel_for(0, g.B * g.Kh, 1, [&](int64_t begin, int64_t end) {
      REGHARM_ISA_CALL(backward_coefficients<T>, g, px, pbg, pwt, psh, gmu.data_ptr<T>(),
                       gsig.data_ptr<T>(), gcon.data_ptr<T>(), static_cast<T>(eps),
                       static_cast<T>(min_mass), pa, pb, pg, plive, gw_rows.data_ptr<T>(),
                       gb_rows.data_ptr<T>(), begin, end);
    });
    at::parallel_for(0, g.B * g.H, 1, [&](int64_t begin, int64_t end) {
      REGHARM_ISA_CALL(backward_gather<T>, g, px, pbg, pwt, psh, pa, pb, pg, plive,
                       grad_x.data_ptr<T>(), begin, end);
    });
    // fixed-order reduction of the per-row partial sums: deterministic for any thread count
    const T* rows = gw_rows.data_ptr<T>();
    const T* brow = gb_rows.data_ptr<T>();
    T* gw = grad_w.data_ptr<T>();
    T gb = 0;
    for (int64_t t = 0; t < g.B * g.Kh; ++t) {
      for (int64_t u = 0; u < g.P; ++u) gw[u] += rows[t * g.P + u];
      gb += brow[t];
    }
    grad_b.data_ptr<T>()[0] = gb;
  });
  return {grad_x.to(x.scalar_type()), grad_w.to(weight.scalar_type()),
          grad_b.to(grad_content.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(regharm, CPU, m) {
  m.impl("patch_stats", &patch_stats_cpu);
  m.impl("patch_stats_backward", &patch_stats_backward_cpu);
}

}  // namespace cpu
}  // namespace regharm
