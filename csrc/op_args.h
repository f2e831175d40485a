// Argument checks of the ops' schemas (SPEC §2–§3), shared by the CPU and the CUDA glue so both
// devices refuse the same inputs with the same words. What differs per device is only where a
// tensor must live: each glue passes its rule as `on_device(t, name)` (defined, and on the
// right device); the float dtypes, shapes and hyper-parameters are checked here.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace regharm {

// SPEC §1: float32 accumulation for every dtype but float64, which stays exact for gradcheck.
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_float_dtype(const at::Tensor& t, const char* name, const char* op) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name,
                        const char* op, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", layout, " = ", expected,
              ", got ", t.sizes());
}

struct PatchDims {
  int64_t B, C, H, W, Kh, Kw;  // Kh x Kw patches
};

// x (B, C, H, W), bg (B, 1, H, W), weight (ph*pw), bias (1) when given; patch and stride >= 1,
// the patch inside the map, eps > 0, min_mass > 0.
template <typename OnDevice>
PatchDims check_patch_args(OnDevice&& on_device, const at::Tensor& x, const at::Tensor& bg,
                           const at::Tensor& weight, const at::Tensor* bias, int64_t ph,
                           int64_t pw, int64_t sh, int64_t sw, double eps, double min_mass,
                           const char* op) {
  const std::pair<const at::Tensor*, const char*> inputs[] = {
      {&x, "x"}, {&bg, "bg"}, {&weight, "weight"}, {bias, "bias"}};
  for (const auto& [t, name] : inputs) {
    if (t == nullptr) continue;
    on_device(*t, name);
    check_float_dtype(*t, name, op);
  }
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (B, C, H, W), got ", x.sizes());
  PatchDims d{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0};
  // as the Python checks: with no channel the CUDA kernels (which sum the mass with channel 0)
  // would leave mass unwritten
  TORCH_CHECK(d.C >= 1, op, ": x must have at least one channel, got ", x.sizes());
  check_shape(bg, {d.B, 1, d.H, d.W}, "bg", op, "(B, 1, H, W)");
  TORCH_CHECK(ph >= 1 && pw >= 1, op, ": patch size must be >= 1, got (", ph, ", ", pw, ")");
  TORCH_CHECK(sh >= 1 && sw >= 1, op, ": stride must be >= 1, got (", sh, ", ", sw, ")");
  TORCH_CHECK(d.H >= ph && d.W >= pw, op, ": patch size (", ph, ", ", pw,
              ") is larger than the feature map (", d.H, ", ", d.W, ") of x");
  check_shape(weight, {ph * pw}, "weight", op, "(ph*pw,)");
  if (bias) check_shape(*bias, {1}, "bias", op, "(1,)");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  TORCH_CHECK(min_mass > 0, op, ": min_mass must be > 0, got ", min_mass);
  d.Kh = (d.H - ph) / sh + 1;
  d.Kw = (d.W - pw) / sw + 1;
  return d;
}

// The backward's per-patch inputs: grad_mu, grad_sigma, grad_content, mu, sigma (B, K, C) and
// mass (B, K).
template <typename OnDevice>
void check_patch_saved(OnDevice&& on_device, const PatchDims& d, const at::Tensor& grad_mu,
                       const at::Tensor& grad_sigma, const at::Tensor& grad_content,
                       const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& mass,
                       const char* op) {
  const int64_t K = d.Kh * d.Kw;
  const std::vector<int64_t> bkc{d.B, K, d.C};
  const std::pair<const at::Tensor*, const char*> per_patch[] = {
      {&grad_mu, "grad_mu"}, {&grad_sigma, "grad_sigma"}, {&grad_content, "grad_content"},
      {&mu, "mu"}, {&sigma, "sigma"}};
  for (const auto& [t, name] : per_patch) {
    on_device(*t, name);
    check_float_dtype(*t, name, op);
    check_shape(*t, bkc, name, op, "(B, K, C)");
  }
  on_device(mass, "mass");
  check_float_dtype(mass, "mass", op);
  check_shape(mass, {d.B, K}, "mass", op, "(B, K)");
}

struct AttnDims {
  int64_t B, L, N, D, E;
};

// q (B, L, D), k (B, N, D), v (B, N, E) of one float dtype, key_bias (B, N) of any float dtype,
// query_mask (B, L) bool when given.
template <typename OnDevice>
AttnDims check_attention_args(OnDevice&& on_device, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& key_bias,
                              const std::optional<at::Tensor>& query_mask, const char* op) {
  const std::pair<const at::Tensor*, const char*> inputs[] = {
      {&q, "q"}, {&k, "k"}, {&v, "v"}, {&key_bias, "key_bias"}};
  for (const auto& [t, name] : inputs) {
    on_device(*t, name);
    check_float_dtype(*t, name, op);
  }
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape (B, L, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, op, ": k must have shape (B, N, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 3, op, ": v must have shape (B, N, E), got ", v.sizes());
  const AttnDims d{q.size(0), q.size(1), k.size(1), q.size(2), v.size(2)};
  check_shape(k, {d.B, d.N, d.D}, "k", op, "(B, N, D)");
  check_shape(v, {d.B, d.N, d.E}, "v", op, "(B, N, E)");
  check_shape(key_bias, {d.B, d.N}, "key_bias", op, "(B, N)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  if (query_mask.has_value() && query_mask->defined()) {
    on_device(*query_mask, "query_mask");
    TORCH_CHECK(query_mask->scalar_type() == at::kBool, op, ": query_mask must be bool, got ",
                query_mask->scalar_type());
    check_shape(*query_mask, {d.B, d.L}, "query_mask", op, "(B, L)");
  }
  return d;
}

// The backward's grad_out and out (B, L, E) and lse (B, L).
template <typename OnDevice>
void check_attention_saved(OnDevice&& on_device, const AttnDims& d, const at::Tensor& grad_out,
                           const at::Tensor& out, const at::Tensor& lse, const char* op) {
  const std::pair<const at::Tensor*, const char*> saved[] = {
      {&grad_out, "grad_out"}, {&out, "out"}, {&lse, "lse"}};
  for (const auto& [t, name] : saved) {
    on_device(*t, name);
    check_float_dtype(*t, name, op);
  }
  check_shape(grad_out, {d.B, d.L, d.E}, "grad_out", op, "(B, L, E)");
  check_shape(out, {d.B, d.L, d.E}, "out", op, "(B, L, E)");
  check_shape(lse, {d.B, d.L}, "lse", op, "(B, L)");
}

struct NormDims {
  int64_t B, C, H, W;
};

// masked_norm: x (B, C, H, W) and weight (B, 1, H, W), any float dtypes; eps > 0.
template <typename OnDevice>
NormDims check_norm_args(OnDevice&& on_device, const at::Tensor& x, const at::Tensor& weight,
                         double eps, const char* op) {
  on_device(x, "x");
  on_device(weight, "weight");
  check_float_dtype(x, "x", op);
  check_float_dtype(weight, "weight", op);
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (B, C, H, W), got ", x.sizes());
  const NormDims d{x.size(0), x.size(1), x.size(2), x.size(3)};
  check_shape(weight, {d.B, 1, d.H, d.W}, "weight", op, "(B, 1, H, W)");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  return d;
}

// The backward's grad (B, H*W, C) and the forward's mu and rstd (B, C).
template <typename OnDevice>
void check_norm_saved(OnDevice&& on_device, const NormDims& d, const at::Tensor& grad,
                      const at::Tensor& mu, const at::Tensor& rstd, const char* op) {
  const std::pair<const at::Tensor*, const char*> saved[] = {
      {&grad, "grad"}, {&mu, "mu"}, {&rstd, "rstd"}};
  for (const auto& [t, name] : saved) {
    on_device(*t, name);
    check_float_dtype(*t, name, op);
  }
  check_shape(grad, {d.B, d.H * d.W, d.C}, "grad", op, "(B, H*W, C)");
  check_shape(mu, {d.B, d.C}, "mu", op, "(B, C)");
  check_shape(rstd, {d.B, d.C}, "rstd", op, "(B, C)");
}

}  // namespace regharm
