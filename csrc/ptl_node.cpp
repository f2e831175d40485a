// regharm::ptl_forward and regharm::ptl_backward: PTL (SPEC §4) for the native backend as one
// op each way, the layer's glue between its three kernels in C++ (benchmarks/PERF_NOTES.md,
// item 18). On a GPU PTL's fwd+bwd waited on the host, and after item 15 (one autograd node) the
// host time left was mostly Python around ~40 small ops. regharm_ext/ptl_node.py's PTLNode runs
// the same ops in the same order from Python (the `triton` backend's node, and what any dispatch
// mode sees); tests hold the two to identical bits.
//
// The ATen ops and our three ops dispatch on the tensors' device, below the autograd key (the
// Python autograd.Function that calls these records the graph). On CUDA the layer's small
// steps and the blend's three formulas run as kernels of their own (PERF_NOTES item 19:
// csrc/cuda/ptl_glue_kernels.cu) unless REGHARM_CUDA_PTL_GLUE=aten; they round each step as
// the ATen ops do.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#ifdef REGHARM_WITH_CUDA
#include "cuda/ptl_glue.h"
#endif

namespace regharm {
namespace {

using at::Tensor;
using Tensors = std::vector<Tensor>;

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// the saved tensors of ptl_forward, in the order it returns them after the output
enum Saved : size_t {
  kBg, kMu, kSigma, kMass,       // patch_stats: 1 - m and its outputs
  kCf, kNormMu, kNormRstd,       // masked_norm: the tokens C_f (B, HW, C) and its statistics
  kContent, kValues, kKeyBias,   // the attention's keys [content], values [mu | sigma], bias
  kQueryMask, kAttnOut, kLse,    // active queries, [A | V] (B, HW, 2C), its log-sum-exp
  kBlendWeight,                  // m, or 0 for an image without a valid patch
  kSavedCount
};

// Every op below runs below autograd: these ops are called inside an autograd.Function.
struct BelowAutograd {
  at::AutoDispatchBelowADInplaceOrView guard;
};

// Whether the blend's CUDA kernels take a call on x's device (they read x's layout as dense).
bool glue_kernels(const Tensor& x) {
#ifdef REGHARM_WITH_CUDA
  return x.is_cuda() && x.is_contiguous() && cuda::ptl_glue_kernels_asked();
#else
  (void)x;
  return false;
#endif
}

Tensors ptl_forward(const Tensor& x, const Tensor& m, const Tensor& weight, const Tensor& bias,
                    int64_t ph, int64_t pw, int64_t sh, int64_t sw, double eps, double min_mass,
                    double scale) {
  BelowAutograd below;
  static const auto patch_stats =
      op<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, int64_t, int64_t, int64_t,
                                                    int64_t, double, double)>(
          "regharm::patch_stats");
  static const auto masked_norm =
      op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double)>(
          "regharm::masked_norm");
  static const auto masked_attention =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const std::optional<Tensor>&, double)>(
          "regharm::masked_attention");
  TORCH_CHECK(x.dim() == 4, "regharm::ptl_forward: x must be (B, C, H, W), got ", x.sizes());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);

  [[maybe_unused]] const bool glue = glue_kernels(x);
  Tensor bg, query_mask;
#ifdef REGHARM_WITH_CUDA
  const Tensor mc = glue ? m.contiguous() : m;
  if (glue) std::tie(bg, query_mask) = cuda::ptl_mask(mc);
#endif
  if (!bg.defined()) bg = at::rsub(m, 1);
  auto [mu, sigma, content, mass] =
      patch_stats.call(x, bg, weight, bias, ph, pw, sh, sw, eps, min_mass);
  auto [c_f, norm_mu, norm_rstd] = masked_norm.call(x, m, eps);
  // SPEC §4 step 4: the keys of patches with too little background are removed, and an image
  // without a valid patch passes through (a blend weight of 0)
  Tensor key_bias, values, blend_weight;
#ifdef REGHARM_WITH_CUDA
  if (glue)
    std::tie(key_bias, values, blend_weight) = cuda::ptl_keys(mass, mu, sigma, mc, min_mass);
#endif
  if (!key_bias.defined()) {
    // sigma is exactly 0 for the patches patch_stats found invalid on its float32 mass, which
    // may round up to min_mass in a 16-bit dtype (ptl_node.py's attention_keys says more)
    Tensor valid = at::ge(mass, min_mass).logical_and_(at::gt(sigma.select(-1, 0), 0));
    key_bias = at::where(valid, at::scalar_tensor(0.0, at::kFloat),
                         at::scalar_tensor(-std::numeric_limits<double>::infinity(), at::kFloat));
    query_mask = at::gt(m, 0).flatten(1);
    values = at::cat({mu, sigma}, -1);
    blend_weight = at::where(valid.any(1).view({-1, 1, 1, 1}), m, 0.0).contiguous();
  }
  // float16 C_f may overflow outside the foreground, and the blend's 0 * inf would be NaN where
  // the output must be x (ptl_node.py's inactive_content_zeroed says more)
  if (c_f.scalar_type() == at::kHalf) c_f.masked_fill_(query_mask.logical_not().unsqueeze(-1), 0);
  auto [attn_out, lse] =
      masked_attention.call(c_f, content, values, key_bias, query_mask, scale);
  // T_fb = C_f * V + A, out = lerp(x, T_fb, weight)
  Tensor out;
#ifdef REGHARM_WITH_CUDA
  if (glue) out = cuda::ptl_blend_forward(x, attn_out, c_f, blend_weight);
#endif
  if (!out.defined()) {
    Tensor a = attn_out.narrow(-1, 0, C), v = attn_out.narrow(-1, C, C);
    Tensor t_fb = at::addcmul(a, c_f, v).transpose(1, 2).view({B, C, H, W});
    out = at::lerp(x, t_fb, blend_weight);
  }
  Tensors result{out, bg, mu, sigma, mass, c_f, norm_mu, norm_rstd, content, values, key_bias,
                 query_mask, attn_out, lse, blend_weight};
  TORCH_INTERNAL_ASSERT(result.size() == kSavedCount + 1);
  return result;
}

// Gradients (x or None, weight, bias) in the order regharm_ext/ptl_node.py's PTLNode.backward
// adds them: the blend's [dA | dV], the attention's backward, dC_f = dQ + dA·V, the norm's
// backward, patch_stats' backward, and x's blend term (1 - weight)·g last.
std::tuple<std::optional<Tensor>, Tensor, Tensor> ptl_backward(
    const Tensor& grad, const Tensor& x, const Tensor& m, const Tensor& weight,
    at::TensorList saved, int64_t ph, int64_t pw, int64_t sh, int64_t sw, double eps,
    double min_mass, double scale, bool need_x) {
  BelowAutograd below;
  static const auto attention_backward =
      op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&,
                                            const std::optional<Tensor>&, const Tensor&,
                                            const Tensor&, double)>(
          "regharm::masked_attention_backward");
  static const auto norm_backward =
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
          "regharm::masked_norm_backward");
  static const auto patch_backward =
      op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&, int64_t,
                                            int64_t, int64_t, int64_t, double, double)>(
          "regharm::patch_stats_backward");
  TORCH_CHECK(saved.size() == kSavedCount, "regharm::ptl_backward: expected ", kSavedCount,
              " saved tensors (ptl_forward's outputs after the first), got ", saved.size());
  TORCH_CHECK(grad.sizes() == x.sizes(), "regharm::ptl_backward: grad must have x's shape ",
              x.sizes(), ", got ", grad.sizes());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const Tensor& blend_weight = saved[kBlendWeight];
  const Tensor& attn_out = saved[kAttnOut];
  const Tensor v = attn_out.narrow(-1, C, C);

  // the blend: [dA | dV] = [w·g | w·g·C_f] in the attention's (B, HW, 2C) layout
  [[maybe_unused]] const bool glue = glue_kernels(x);
  Tensor gav;
#ifdef REGHARM_WITH_CUDA
  if (glue) gav = cuda::ptl_blend_backward(grad, blend_weight, saved[kCf]);
#endif
  Tensor ga, gv;
  if (gav.defined()) {
    ga = gav.narrow(-1, 0, C);
  } else {  // written in place: no concatenation pass
    gav = at::empty({B, HW, 2 * C}, v.options());
    ga = gav.narrow(-1, 0, C), gv = gav.narrow(-1, C, C);
    at::mul_out(ga, grad.flatten(2).transpose(1, 2), blend_weight.view({B, HW, 1}));
    at::mul_out(gv, ga, saved[kCf]);
  }
  auto [dq, dk, dv] = attention_backward.call(gav, saved[kCf], saved[kContent], saved[kValues],
                                              saved[kKeyBias], saved[kQueryMask], attn_out,
                                              saved[kLse], scale);
  // C_f feeds the attention and the blend: dC_f = dQ + dA·V, in place
  Tensor gcf = dq.addcmul_(ga, v);
  gav.reset();
  ga.reset();
  gv.reset();
  std::optional<Tensor> gx;
  if (need_x) gx = norm_backward.call(gcf, x, m, saved[kNormMu], saved[kNormRstd]);
  gcf.reset();
  dq.reset();
  auto [gxp, gw, gb] = patch_backward.call(dv.narrow(-1, 0, C), dv.narrow(-1, C, C), dk, x,
                                           saved[kBg], weight, saved[kMu], saved[kSigma],
                                           saved[kMass], ph, pw, sh, sw, eps, min_mass);
  if (gx) {
#ifdef REGHARM_WITH_CUDA
    if (glue) {
      cuda::ptl_grad_x_(*gx, gxp, grad, blend_weight);
      return {gx, gw, gb};
    }
#endif
    gx->add_(gxp);
    gxp.reset();
    gx->addcmul_(grad, at::rsub(blend_weight, 1));
  }
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(regharm, CPU, m) {
  m.impl("ptl_forward", &ptl_forward);
  m.impl("ptl_backward", &ptl_backward);
}

#ifdef REGHARM_WITH_CUDA
TORCH_LIBRARY_IMPL(regharm, CUDA, m) {
  m.impl("ptl_forward", &ptl_forward);
  m.impl("ptl_backward", &ptl_backward);
}
#endif

}  // namespace regharm
