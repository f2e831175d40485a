// masked_attention (SPEC §3) by plain ATen ops, for the shapes the tiled CUDA kernels cannot
// hold: D > kMaxHeadDim, E > kMaxValueDim, or tiles that need more shared memory than the GPU
// has (LTL at 512-1024 channels in the wider generators). Queries go in chunks, so at most
// ~16 M scores exist at once. Same contract as the kernels: out in q's dtype, lse float32 (-inf
// where nothing is attended), inactive queries and removed keys give 0 and no gradient; sums in
// float32 (float64 for float64). Device-agnostic: only ATen.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

namespace regharm {
namespace dense {

inline at::ScalarType acc_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t query_chunk(int64_t B, int64_t N) {
  return std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(1, B * N));
}

// Scores of a chunk of queries (B, n, N) and their log-sum-exp (B, n, 1), -inf for rows without
// an active query or a kept key.
inline std::tuple<at::Tensor, at::Tensor> scores_lse(const at::Tensor& qa, const at::Tensor& ka,
                                                     const at::Tensor& bias, const at::Tensor& act,
                                                     double scale) {
  const auto s = at::baddbmm(bias.unsqueeze(1), qa, ka.transpose(1, 2), 1.0, scale);
  const auto m = std::get<0>(s.max(-1, true));
  const auto m0 = at::where(at::isfinite(m), m, at::zeros_like(m));  // no inf - inf
  const auto l = at::exp(s - m0).sum(-1, true);
  const auto keep = (l > 0).logical_and(act.unsqueeze(-1));
  const auto lse = at::where(keep, m0 + at::log(at::where(keep, l, at::ones_like(l))),
                             -std::numeric_limits<double>::infinity());
  return {s, lse};
}

inline at::Tensor active_rows(const std::optional<at::Tensor>& query_mask, int64_t B, int64_t l0,
                              int64_t n, const at::TensorOptions& opts) {
  if (query_mask.has_value() && query_mask->defined()) return query_mask->narrow(1, l0, n);
  return at::ones({B, n}, opts.dtype(at::kBool));
}

// P of a chunk: exp(s - lse) where the row attends, 0 elsewhere (and at removed keys).
inline at::Tensor probs(const at::Tensor& s, const at::Tensor& lse) {
  return at::where(at::isfinite(lse), at::exp(s - lse), 0.0);
}

inline std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const at::Tensor& key_bias,
                                                  const std::optional<at::Tensor>& query_mask,
                                                  double scale) {
  const int64_t B = q.size(0), L = q.size(1), N = k.size(1), E = v.size(2);
  const auto acc = acc_of(q);
  auto out = at::zeros({B, L, E}, q.options());
  auto lse = at::full({B, L}, -std::numeric_limits<float>::infinity(),
                      q.options().dtype(at::kFloat));
  if (B == 0 || L == 0 || N == 0) return {out, lse};
  const auto ka = k.to(acc), va = v.to(acc), bias = key_bias.to(acc);
  const int64_t chunk = query_chunk(B, N);
  for (int64_t l0 = 0; l0 < L; l0 += chunk) {
    const int64_t n = std::min(chunk, L - l0);
    const auto act = active_rows(query_mask, B, l0, n, q.options());
    auto [s, ls] = scores_lse(q.narrow(1, l0, n).to(acc), ka, bias, act, scale);
    out.narrow(1, l0, n).copy_(at::bmm(probs(s, ls), va));
    lse.narrow(1, l0, n).copy_(ls.squeeze(-1));
  }
  return {out, lse};
}

// The saved lse only marks which rows attend; the scores' log-sum-exp is recomputed exactly in
// the accumulation type (the saved one is float32).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& key_bias, const std::optional<at::Tensor>& query_mask,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  const int64_t B = q.size(0), L = q.size(1), N = k.size(1), D = q.size(2), E = v.size(2);
  const auto acc = acc_of(q);
  auto dq = at::zeros({B, L, D}, q.options());
  auto dk = at::zeros({B, N, D}, q.options().dtype(acc));
  auto dv = at::zeros({B, N, E}, q.options().dtype(acc));
  if (B > 0 && L > 0 && N > 0) {
    const auto ka = k.to(acc), va = v.to(acc), bias = key_bias.to(acc);
    const int64_t chunk = query_chunk(B, N);
    for (int64_t l0 = 0; l0 < L; l0 += chunk) {
      const int64_t n = std::min(chunk, L - l0);
      const auto act = active_rows(query_mask, B, l0, n, q.options())
                           .logical_and(at::isfinite(lse.narrow(1, l0, n)));
      const auto qa = q.narrow(1, l0, n).to(acc);
      const auto go = grad_out.narrow(1, l0, n).to(acc);
      const auto oa = out.narrow(1, l0, n).to(acc);
      auto [s, ls] = scores_lse(qa, ka, bias, act, scale);
      const auto p = probs(s, ls);
      dv.add_(at::bmm(p.transpose(1, 2), go));
      const auto delta = (go * oa).sum(-1, true);
      const auto ds = p * (at::bmm(go, va.transpose(1, 2)) - delta);
      dq.narrow(1, l0, n).copy_(at::bmm(ds, ka).mul_(scale));
      dk.add_(at::bmm(ds.transpose(1, 2), qa), scale);
    }
  }
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

}  // namespace dense
}  // namespace regharm
