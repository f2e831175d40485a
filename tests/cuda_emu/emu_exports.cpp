// C interface (for ctypes) to the launchers of csrc/cuda/*.cu compiled for the CPU emulator
// (emu_runtime.h, force-included in every translation unit): tests/cuda_emu/emulated.py passes
// CPU tensors' data pointers where the launchers expect device pointers.
#include <utility>

#include "cuda/kernels.h"

using namespace regharm::cuda;

namespace {
// A counter's value since the last call, reset to 0.
long long take(long long& counter) { return std::exchange(counter, 0); }
}  // namespace

extern "C" {

// smem_optin: opt-in shared memory per block (bytes); sm_count: multiprocessors; order: fiber
// schedule (0 forward, 1 reverse, 2 shuffled); cc_major: the compute capability's major;
// reverse_blocks: every launch runs its blocks from the last one back. cp.async copies land when
// issued in the reverse schedule (where one warp runs ahead of the others) and at the issuing
// thread's wait in the others: between them, a missing barrier on either side of a tile's
// copies gives a wrong result.
void emu_configure(int smem_optin, int sm_count, int order, unsigned seed, int cc_major,
                   int reverse_blocks) {
  emu::config().reverse_blocks = reverse_blocks != 0;
  emu::config().smem_optin = smem_optin;
  emu::config().cc_major = cc_major;
  emu::config().sm_count = sm_count;
  emu::config().order = order;
  emu::config().copies_land_early = order == 1;
  emu::config().seed = seed;
  emu::smem_attribute().clear();
}

// Tensor-core float32 (tf32) warp products run since the last call.
long long emu_take_tf32_mma_count() { return take(emu::tf32_mma_count()); }

// Warp-level mma.sync products (the register attention kernels) since the last call.
long long emu_take_mma_sync_count() { return take(emu::mma_sync_count()); }

// float32 CUDA-core warp products of the register kernels since the last call.
long long emu_take_simt_product_count() { return take(emu::simt_product_count()); }

// The CUDA-core products' 16-byte shared-memory loads since the last call (emu_runtime.h's
// model): out[0] warp instructions, out[1] of them with paired lanes, out[2] modelled cycles.
void emu_take_shared_load_model(long long* out) {
  emu::SharedLoadModel& m = emu::shared_load_model();
  out[0] = m.loads, out[1] = m.paired, out[2] = m.cycles;
  m = emu::SharedLoadModel{};
}

// Flags published with atomicExch (the forward's key splits) since the last call.
long long emu_take_flag_count() { return take(emu::flag_count()); }

// float32 atomic additions (the dK/dV kernel's dQ under dq_atomic) since the last call.
long long emu_take_atomic_count() { return take(emu::atomic_count()); }

// cp.async copies (16 bytes each) issued since the last call.
long long emu_take_async_copy_count() { return take(emu::async_copy_count()); }

// cp.async copies of 4 bytes (a key tile's bias, a query tile's lse and Δ) issued since the
// last call.
long long emu_take_async_copy4_count() { return take(emu::async_copy4_count()); }

// mma.sync products run with the issuing warp's copies in flight since the last call, by launch
// expression, one "name count" per line.
const char* emu_take_launch_overlaps() {
  static std::string last;
  last.clear();
  for (const auto& [name, n] : emu::launch_overlaps())
    last += name + " " + std::to_string(n) + "\n";
  emu::launch_overlaps().clear();
  return last.c_str();
}

// The kernel expressions launched since the last call, one per line.
const char* emu_take_launches() {
  static std::string last;
  last.clear();
  for (const std::string& name : emu::launch_log()) last += name + "\n";
  emu::launch_log().clear();
  return last.c_str();
}

// Of those, sm_90's vector atomics (float2, float4) since the last call.
long long emu_take_vector_atomic_count() { return take(emu::vector_atomic_count()); }

// Everything the emulator found wrong since the last call (empty: nothing).
const char* emu_take_errors() {
  static std::string last;
  last = emu::error_text();
  emu::error_text().clear();
  return last.c_str();
}

static PatchShape patch_shape(const int64_t* s) {  // B, C, H, W, ph, pw, sh, sw, pixel_gather
  PatchShape p{};
  p.pixel_gather = s[8] != 0;
  p.B = s[0], p.C = s[1], p.H = s[2], p.W = s[3];
  p.ph = int(s[4]), p.pw = int(s[5]), p.sh = int(s[6]), p.sw = int(s[7]);
  p.Kh = (p.H - p.ph) / p.sh + 1;
  p.Kw = (p.W - p.pw) / p.sw + 1;
  return p;
}

int emu_patch_stats_forward(int dt, const void* x, const int64_t* xs, const void* bg,
                            const int64_t* bs, const void* weight, const void* bias,
                            const int64_t* shape, double eps, double min_mass, void* mu,
                            void* sigma, void* content, void* mass) {
  return int(patch_stats_forward(DType(dt), x, XStrides{xs[0], xs[1], xs[2], xs[3]}, bg,
                                 BgStrides{bs[0], bs[1], bs[2]}, weight, bias, patch_shape(shape),
                                 eps, min_mass, mu, sigma, content, mass, nullptr));
}

int64_t emu_patch_stats_backward_workspace(int dt, const int64_t* shape) {
  return int64_t(patch_stats_backward_workspace(DType(dt), patch_shape(shape)));
}

int emu_patch_stats_fits(int dt, const int64_t* shape, int64_t* need) {
  size_t n = 0, h = 0;
  const bool ok = patch_stats_fits(DType(dt), patch_shape(shape), &n, &h);
  *need = int64_t(n);
  return ok;
}

// rows: the three gradients' row strides (GradRows)
int emu_patch_stats_backward(int dt, const void* gmu, const void* gsigma, const void* gcontent,
                             const int64_t* rows, const void* x, const int64_t* xs,
                             const void* bg, const int64_t* bs, const void* weight,
                             const int64_t* shape, double eps, double min_mass, void* workspace,
                             void* grad_x, void* grad_w, void* grad_b) {
  return int(patch_stats_backward(DType(dt), gmu, gsigma, gcontent,
                                  GradRows{rows[0], rows[1], rows[2]}, x,
                                  XStrides{xs[0], xs[1], xs[2], xs[3]}, bg,
                                  BgStrides{bs[0], bs[1], bs[2]}, weight, patch_shape(shape), eps,
                                  min_mass, workspace, grad_x, grad_w, grad_b, nullptr));
}

// B, L, N, D, E, tf32x3, tiles, dq_atomic, simt_mma_lanes, fwd_key_split, key_order, pipeline
static AttnShape attn_shape(const int64_t* s) {
  AttnShape a{};
  a.B = s[0], a.L = s[1], a.N = s[2], a.D = int(s[3]), a.E = int(s[4]);
  a.tf32x3 = s[5] != 0;
  a.tiles = s[6] != 0;
  a.dq_atomic = s[7] != 0;
  a.simt_mma_lanes = s[8] != 0;
  a.fwd_key_split = s[9] != 0;
  a.key_order = s[10] != 0;
  a.pipeline = s[11] != 0;
  return a;
}

// strides: 2 per tensor (batch, row), in the order of the tensor arguments
int emu_attention_forward(int dt, const void* q, const void* k, const void* v,
                          const int64_t* strides, const void* bias, const bool* mask,
                          const int64_t* shape, double scale, void* out, float* lse,
                          void* workspace) {
  return int(masked_attention_forward(DType(dt), q, RowStrides{strides[0], strides[1]}, k,
                                      RowStrides{strides[2], strides[3]}, v,
                                      RowStrides{strides[4], strides[5]}, bias, mask,
                                      attn_shape(shape), scale, out, lse, workspace, nullptr));
}

int64_t emu_attention_forward_workspace(const int64_t* shape) {
  return int64_t(masked_attention_forward_workspace(attn_shape(shape)));
}

int emu_attention_fits(int dt, const int64_t* shape, int64_t* need) {
  size_t n = 0, h = 0;
  const bool ok = masked_attention_fits(DType(dt), attn_shape(shape), &n, &h);
  *need = int64_t(n);
  return ok;
}

int64_t emu_attention_backward_workspace(int dt, const int64_t* shape) {
  return int64_t(masked_attention_backward_workspace(DType(dt), attn_shape(shape)));
}

// strides: grad_out, q, k, v, out
int emu_attention_backward(int dt, const void* grad_out, const void* q, const void* k,
                           const void* v, const void* out, const int64_t* strides,
                           const void* bias, const bool* mask, const float* lse,
                           const int64_t* shape, double scale, void* workspace, void* dq,
                           void* dk, void* dv) {
  return int(masked_attention_backward(
      DType(dt), grad_out, RowStrides{strides[0], strides[1]}, q,
      RowStrides{strides[2], strides[3]}, k, RowStrides{strides[4], strides[5]}, v,
      RowStrides{strides[6], strides[7]}, bias, mask, out, RowStrides{strides[8], strides[9]},
      lse, attn_shape(shape), scale, workspace, dq, dk, dv, nullptr));
}

// shape: B, C, HW
int emu_attention_order(const bool* mask, int64_t B, int64_t L, int* order, int* count) {
  return int(masked_attention_order(mask, B, L, order, count, nullptr));
}

// PTL's blend: shape B, C, H, W; gs: grad's four strides
int emu_ptl_mask(int dt, const void* m, int64_t n, void* bg, bool* active) {
  return int(ptl_mask(DType(dt), m, n, bg, active, nullptr));
}

// shape: B, C, H, W, K
int emu_ptl_keys(int dt, const void* mass, const void* mu, const void* sigma, const void* m,
                 const int64_t* shape, double min_mass, float* key_bias, void* values,
                 void* weight) {
  return int(ptl_keys(DType(dt), mass, mu, sigma, m,
                      BlendShape{shape[0], shape[1], shape[2], shape[3]}, shape[4], min_mass,
                      key_bias, values, weight, nullptr));
}

int emu_ptl_blend_forward(int dt, const void* x, const void* av, const void* c_f, const void* w,
                          const int64_t* shape, void* out) {
  return int(ptl_blend_forward(DType(dt), x, av, c_f, w,
                               BlendShape{shape[0], shape[1], shape[2], shape[3]}, out, nullptr));
}

int emu_ptl_blend_backward(int dt, const void* g, const int64_t* gs, const void* w,
                           const void* c_f, const int64_t* shape, void* gav) {
  return int(ptl_blend_backward(DType(dt), g, XStrides{gs[0], gs[1], gs[2], gs[3]}, w, c_f,
                                BlendShape{shape[0], shape[1], shape[2], shape[3]}, gav,
                                nullptr));
}

int emu_ptl_grad_x(int dt, void* gx, const void* gxp, const void* g, const int64_t* gs,
                   const void* w, const int64_t* shape) {
  return int(ptl_grad_x(DType(dt), gx, gxp, g, XStrides{gs[0], gs[1], gs[2], gs[3]}, w,
                        BlendShape{shape[0], shape[1], shape[2], shape[3]}, nullptr));
}

int emu_masked_norm_forward(int dt, const void* x, const void* weight, const int64_t* shape,
                            double eps, void* y, void* mu, void* rstd) {
  return int(masked_norm_forward(DType(dt), x, weight, NormShape{shape[0], shape[1], shape[2]},
                                 eps, y, mu, rstd, nullptr));
}

int64_t emu_masked_norm_backward_workspace(int dt, const int64_t* shape) {
  return int64_t(
      masked_norm_backward_workspace(DType(dt), NormShape{shape[0], shape[1], shape[2]}));
}

int emu_masked_norm_backward(int dt, const void* grad, const void* x, const void* weight,
                             const void* mu, const void* rstd, const int64_t* shape,
                             void* workspace, void* dx) {
  return int(masked_norm_backward(DType(dt), grad, x, weight, mu, rstd,
                                  NormShape{shape[0], shape[1], shape[2]}, workspace, dx, nullptr));
}

}  // extern "C"
