// Launchers of the CUDA kernels of regharm (SPEC §2-§3). Plain C++ over raw device pointers:
// no torch header, so the kernel files build with nvcc alone (tests/test_cuda_compile.py) and
// the torch glue (patch_stats_cuda.cpp, masked_attention_cuda.cpp) stays thin.
//
// Conventions: sizes and strides are in elements; every output is contiguous; tensors named
// "acc" are in the accumulation type (float, or double when the dtype tag is kFloat64). Each
// launcher checks the launch (cudaGetLastError) and returns the error; it never synchronizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace regharm {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---- patch_stats ---------------------------------------------------------------------------

struct PatchShape {
  int64_t B, C, H, W;
  int ph, pw, sh, sw;
  int64_t Kh, Kw;  // (H - ph) / sh + 1, (W - pw) / sw + 1
  // Backward: gather every pixel's gradient from its covering patches one by one even where
  // windows are whole strides and a cell's sums could be shared by its pixels (the gather of
  // GPU run 2); the glue asks for it (REGHARM_CUDA_PS_GATHER).
  bool pixel_gather = false;
};

struct XStrides { int64_t b, c, h, w; };   // x (B, C, H, W)
struct BgStrides { int64_t b, h, w; };     // bg (B, 1, H, W) without its channel

// x: dtype dt; bg, weight (ph*pw), bias (1): acc. Outputs in dt: mu, sigma, content (B, K, C),
// mass (B, K).
cudaError_t patch_stats_forward(DType dt, const void* x, XStrides xs, const void* bg, BgStrides bs,
                                const void* weight, const void* bias, const PatchShape& s,
                                double eps, double min_mass, void* mu, void* sigma, void* content,
                                void* mass, cudaStream_t stream);

// Whether the shared memory these shapes need (*need bytes) fits the current device (*have).
bool patch_stats_fits(DType dt, const PatchShape& s, size_t* need, size_t* have);

// Scratch bytes patch_stats_backward needs (per-patch coefficients and per-block partial sums).
size_t patch_stats_backward_workspace(DType dt, const PatchShape& s);

// Elements between consecutive rows (b, k) of each (B, K, C) gradient, whose columns are
// contiguous: C for a contiguous one, 2C for a half of PTL's [dmu | dsigma].
struct GradRows { int64_t mu, sigma, content; };

// grad_mu, grad_sigma, grad_content: acc, (B, K, C) rows as `rows` says. Outputs: grad_x in dt,
// contiguous (B, C, H, W); grad_w (ph*pw values) and grad_b (1) in acc.
// workspace: patch_stats_backward_workspace(dt, s) bytes, 16-byte aligned.
cudaError_t patch_stats_backward(DType dt, const void* grad_mu, const void* grad_sigma,
                                 const void* grad_content, GradRows rows, const void* x,
                                 XStrides xs, const void* bg, BgStrides bs, const void* weight,
                                 const PatchShape& s, double eps, double min_mass,
                                 void* workspace, void* grad_x, void* grad_w, void* grad_b,
                                 cudaStream_t stream);

// ---- masked_attention ----------------------------------------------------------------------

struct AttnShape {
  int64_t B, L, N;
  int D, E;
  // float32 only: products on tensor cores as 3xTF32 (sm_80+; float32-grade accuracy) instead
  // of CUDA cores. It changes the kernels' shared-memory layout, so it travels with the sizes.
  bool tf32x3 = false;
  // 16-bit inputs (and float32 with tf32x3) with D, E <= 128 on sm_80+ run kernels that keep
  // their tiles in registers (mma.sync); true asks for the shared-memory tile kernels instead.
  bool tiles = false;
  // Register kernels: dQ added up with float32 atomics by the dK/dV kernel (which computes dS
  // anyway) instead of a kernel that recomputes S and dP over query tiles. Not deterministic
  // (the order of the additions varies); the glue asks for it (REGHARM_CUDA_DQ).
  bool dq_atomic = false;
  // float32 on CUDA cores: the register kernels' lanes in mma.sync's order instead of
  // PairedLanes (simt_products.cuh); the glue asks for it (REGHARM_CUDA_SIMT_LANES).
  bool simt_mma_lanes = false;
  // float32 register forward: each query tile's keys in two halves, two blocks, the second to
  // finish combining both (attention_registers.cuh); the glue asks for it
  // (REGHARM_CUDA_FWD_SPLIT).
  bool fwd_key_split = false;
  // Register kernels: the keys in compacted order (the kept ones, key_bias > -inf, first), so
  // that key tiles of removed keys (a foreground's patches, LTL's foreground tokens) are not
  // visited, however the removed keys are spread; the glue asks for it (REGHARM_CUDA_KEY_ORDER).
  bool key_order = false;
  // 16-bit register kernels: the tiles each kernel streams (the forward's and dQ kernel's key
  // tiles, the dK/dV kernel's query tiles) through two stages of shared memory, the next one's
  // copies in flight during this one's products, where both stages fit the device
  // (attention_registers.cuh); the glue asks for it (REGHARM_CUDA_PIPELINE).
  bool pipeline = false;
};

// A (B, rows, cols) tensor whose last dim is contiguous: strides of its batch and row dims.
struct RowStrides { int64_t b, r; };

// Largest D and E the kernels take (E = 2C for PTL).
constexpr int kMaxHeadDim = 256;
constexpr int kMaxValueDim = 512;

// The query order both attention launchers compute first (L <= INT32_MAX): for each image the
// positions of its active queries in raster order, then those of the others; count (B) the
// active ones. query_mask: contiguous (B, L) bool; order: (B, L) int32.
cudaError_t masked_attention_order(const bool* query_mask, int64_t B, int64_t L, int* order,
                                   int* count, cudaStream_t stream);

// q (B, L, D), k (B, N, D), v (B, N, E): dtype dt; key_bias: acc, contiguous (B, N);
// query_mask: contiguous bool (B, L) or null (every query active). Outputs: out (B, L, E) in
// dt, lse (B, L) float32 (-inf for inactive queries and rows with every key removed).
// workspace: masked_attention_forward_workspace(s) bytes, 16-byte aligned (the order of the
// queries, active ones first, when there is a mask; that of the keys under key_order; the key
// splits' flags).
cudaError_t masked_attention_forward(DType dt, const void* q, RowStrides qs, const void* k,
                                     RowStrides ks, const void* v, RowStrides vs,
                                     const void* key_bias, const bool* query_mask,
                                     const AttnShape& s, double scale, void* out, float* lse,
                                     void* workspace, cudaStream_t stream);

size_t masked_attention_forward_workspace(const AttnShape& s);

// Whether the shared memory of the forward and backward kernels (*need bytes, the largest)
// fits the current device (*have).
bool masked_attention_fits(DType dt, const AttnShape& s, size_t* need, size_t* have);

// Scratch bytes masked_attention_backward needs (query order, row sums Δ and split-L partial
// dK, dV).
size_t masked_attention_backward_workspace(DType dt, const AttnShape& s);

// grad_out and out (B, L, E) in dt; lse as returned by the forward. Outputs dq, dk, dv in dt,
// contiguous. workspace: masked_attention_backward_workspace(dt, s) bytes, 16-byte aligned.
cudaError_t masked_attention_backward(DType dt, const void* grad_out, RowStrides gs,
                                      const void* q, RowStrides qs, const void* k, RowStrides ks,
                                      const void* v, RowStrides vs, const void* key_bias,
                                      const bool* query_mask, const void* out, RowStrides os,
                                      const float* lse, const AttnShape& s, double scale,
                                      void* workspace, void* dq, void* dk, void* dv,
                                      cudaStream_t stream);

// ---- PTL's blend (the native node, csrc/ptl_node.cpp) ---------------------------------------

struct BlendShape {
  int64_t B, C, H, W;
};

// m: contiguous (B, H*W) in dt, n = B*H*W. Outputs: bg = 1 - m (dt), active = m > 0.
cudaError_t ptl_mask(DType dt, const void* m, int64_t n, void* bg, bool* active,
                     cudaStream_t stream);

// mass (B, K), mu and sigma (B, K, C), m (B, H*W): contiguous, in dt. Outputs: key_bias (B, K)
// float32, 0 where mass >= min_mass (min_mass converted to dt, as torch compares) and sigma's
// channel 0 > 0 (patch_stats' own float32 decision), -inf elsewhere; values (B, K, 2C) = [mu | sigma]; weight (B, H*W) = m for an image with a valid
// patch, 0 for one without.
cudaError_t ptl_keys(DType dt, const void* mass, const void* mu, const void* sigma, const void* m,
                     const BlendShape& s, int64_t K, double min_mass, float* key_bias,
                     void* values, void* weight, cudaStream_t stream);

// x: contiguous (B, C, H, W); av: contiguous (B, H*W, 2C) = [A | V]; c_f: contiguous (B, H*W, C);
// weight: contiguous (B, H*W); all in dt. out (B, C, H, W) = lerp(x, A + C_f * V, weight), with
// A + C_f * V rounded to dt first, as torch's addcmul then lerp round it.
cudaError_t ptl_blend_forward(DType dt, const void* x, const void* av, const void* c_f,
                              const void* weight, const BlendShape& s, void* out,
                              cudaStream_t stream);

// grad: (B, C, H, W) in dt, read through gs; weight and c_f as above. Output gav: contiguous
// (B, H*W, 2C) = [g * weight | (g * weight) * C_f], g in the tokens' layout.
cudaError_t ptl_blend_backward(DType dt, const void* grad, XStrides gs, const void* weight,
                               const void* c_f, const BlendShape& s, void* gav,
                               cudaStream_t stream);

// gx, gxp: contiguous (B, C, H, W); grad read through gs; weight as above; all in dt. In place:
// gx = (gx + gxp) + grad * (1 - weight), each step rounded as torch's add_, rsub and addcmul_.
cudaError_t ptl_grad_x(DType dt, void* gx, const void* gxp, const void* grad, XStrides gs,
                       const void* weight, const BlendShape& s, cudaStream_t stream);

// ---- masked_norm ---------------------------------------------------------------------------

struct NormShape {
  int64_t B, C, HW;
};

// x: contiguous (B, C, HW) in dt; weight: contiguous (B, HW) acc. Outputs: y (B, HW, C) in dt,
// mu and rstd (B, C) acc.
cudaError_t masked_norm_forward(DType dt, const void* x, const void* weight, const NormShape& s,
                                double eps, void* y, void* mu, void* rstd, cudaStream_t stream);

// Scratch bytes masked_norm_backward needs (per-row sums and per-image 1 / Σ weight).
size_t masked_norm_backward_workspace(DType dt, const NormShape& s);

// grad: contiguous (B, HW, C) in dt; x, weight as for the forward; mu, rstd as it returned them.
// Output: dx (B, C, HW) in dt. workspace: masked_norm_backward_workspace(dt, s) bytes, aligned.
cudaError_t masked_norm_backward(DType dt, const void* grad, const void* x, const void* weight,
                                 const void* mu, const void* rstd, const NormShape& s,
                                 void* workspace, void* dx, cudaStream_t stream);

}  // namespace cuda
}  // namespace regharm
