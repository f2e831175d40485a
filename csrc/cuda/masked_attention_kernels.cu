// CUDA kernels of regharm::masked_attention and its backward (SPEC §3), flash-attention style:
// the L x N score matrix only ever exists as one BM x BN tile in shared memory.
//
// Forward (one block per BM queries x EC value columns x image): an online softmax over key
// tiles. With a query mask the query tiles run over the queries in compacted order (the active
// ones first, attn_order_kernel), so a foreground of 20 % fills 20 % of the tiles (in raster
// order it touches ~45 % of 64-row tiles); query tiles without an active query and key tiles
// whose keys are all removed (key_bias = -inf) are skipped outright: foregrounds cover 5-30 %
// of an image, so skipping is most of the speed. Saves lse = m + log(l) per row, -inf where
// nothing is attended.
//
// Backward (FlashAttention-2): Δ_l = rowsum(dO ∘ O); then P = exp(scale·QKᵀ + bias - lse) is
// recomputed tile by tile, once in a kernel over key tiles (dV = Pᵀ dO, dK = scale·dSᵀ Q with
// dS = P ∘ (dO Vᵀ - Δ)), once in a kernel over query tiles (dQ = scale·dS K). Each output element
// has one writer: the key-tile kernel may split the queries over several blocks (the PTL case
// has few keys and many queries), each writing its own partial sums, which a last kernel adds in
// a fixed order. No atomics: results are deterministic. (The register kernels can instead add
// dQ up in the key-tile kernel with atomics, AttnShape::dq_atomic: not deterministic.)
//
// Products of tiles go through block_mm (tensor cores for 16-bit inputs; CUDA cores for float32,
// or tensor cores as 3xTF32 when AttnShape::tf32x3 asks; CUDA cores for float64); everything
// else (softmax, masking) runs in the accumulation type.
//
// Where D, E <= 128 (and float32's tiles fit shared memory) the launchers below run the register
// kernels of attention_registers.cuh instead (use_registers; 16-bit and tf32x3 on sm_80+),
// compiled in attention_registers_*.cu; the query order, Δ and the split sums are shared.
#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "attention_common.cuh"
#include "attention_register_set.h"
#include "block_mm.cuh"

namespace regharm {
namespace cuda {
namespace {

// The queries of each image in compacted order, active ones first, then the others, each group
// in raster order, and the number of active ones; the same for the keys under
// AttnShape::key_order, kept ones (key_bias not -inf) first. One block per image and order;
// warp w takes the w-th of kOrderWarps contiguous chunks of L in whole steps of 32 queries, read
// coalesced, and ranks them with ballots: a first pass counts the chunk's active queries, the
// warps' counts give each chunk its offsets, a second pass writes the positions. Every query
// gets exactly one position. (Run 2 measured the version with a thread per chunk of L / 256, 64
// strided flags each, at 24 µs per call at PTL's setting, twice per fwd+bwd.)
constexpr int kOrderThreads = 1024, kOrderWarps = kOrderThreads / 32;

__device__ __forceinline__ bool order_flag(const bool* f, int64_t i) { return f[i]; }
// a key stays unless its bias is -inf: the kernels skip a tile only when no key in it is kept
__device__ __forceinline__ bool order_flag(const float* f, int64_t i) {
  return !(f[i] == -INFINITY);
}

template <typename F>
__device__ __forceinline__ void order_image(const F* __restrict__ m, int64_t L,
                                            int* __restrict__ o, int* __restrict__ count,
                                            int* warp_active) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t per_warp = ((L + 31) / 32 + kOrderWarps - 1) / kOrderWarps * 32;
  const int64_t lo = min(L, warp * per_warp), hi = min(L, lo + per_warp);  // uniform per warp
  int mine = 0;
#pragma unroll 4
  for (int64_t base = lo; base < hi; base += 32) {
    const int64_t i = base + lane;
    mine += __popc(__ballot_sync(0xffffffffu, i < hi && order_flag(m, i)));
  }
  if (lane == 0) warp_active[warp] = mine;
  __syncthreads();
  int before = 0, total = 0;
  for (int w = 0; w < kOrderWarps; ++w) {
    const int c = warp_active[w];
    total += c;
    before += w < warp ? c : 0;
  }
  int64_t act = before, inact = total + lo - before;  // the chunk's first positions
  const unsigned below = (1u << lane) - 1u;
  for (int64_t base = lo; base < hi; base += 32) {
    const int64_t i = base + lane;
    const bool here = i < hi, on = here && order_flag(m, i);
    const unsigned active = __ballot_sync(0xffffffffu, on);
    const unsigned inactive = __ballot_sync(0xffffffffu, here) & ~active;
    if (here) o[on ? act + __popc(active & below) : inact + __popc(inactive & below)] = int(i);
    act += __popc(active);
    inact += __popc(inactive);
  }
  if (threadIdx.x == 0) *count = total;
}

// blockIdx.y: the queries (when qmask is given), then the keys (when korder is); one launch for
// both, as every forward and backward computes them.
__global__ void __launch_bounds__(kOrderThreads)
    attn_order_kernel(const bool* __restrict__ qmask, int64_t L, int* __restrict__ qorder,
                      int* __restrict__ qcount, const float* __restrict__ bias, int64_t N,
                      int* __restrict__ korder, int* __restrict__ kcount) {
  __shared__ int warp_active[kOrderWarps];
  const int64_t b = blockIdx.x;
  if (blockIdx.y == 0 && qmask != nullptr)
    order_image(qmask + b * L, L, qorder + b * L, qcount + b, warp_active);
  else
    order_image(bias + b * N, N, korder + b * N, kcount + b, warp_active);
}

// Row padding of shared-memory tiles. WMMA operands need pitches that are multiples of 16
// bytes: 8 elements of 16-bit tiles, 4 of float32 tiles on tensor cores (tc). Tiles read by
// CUDA cores only (simt_mm, softmax) take one element: the pitch is odd, so a column walk hits
// 32 different banks. Accumulator tiles (float for 16-bit inputs) are WMMA operands too: they
// take 16 bytes as well.
template <typename T> __host__ __device__ constexpr int pad_of(bool tc) {
  return sizeof(T) == 2 ? 8 : (tc ? int(16 / sizeof(T)) : 1);
}
template <typename A> __host__ __device__ constexpr int acc_pad_of() {
  return int(16 / sizeof(A));
}

template <typename T, typename A>
struct FwdSmem {
  T *q, *k, *v, *p;
  A *s, *o, *m, *l, *bias;
  int* act;
  int ldq, ldv, lds, ldp, ldo;
  size_t bytes;
  __host__ __device__ FwdSmem(unsigned char* base, int BM, int BN, int Dp, int EC, bool tc) {
    ldq = Dp + pad_of<T>(tc);
    ldv = EC + pad_of<T>(tc);
    ldp = BN + pad_of<T>(tc);
    lds = BN + acc_pad_of<A>();
    ldo = EC + acc_pad_of<A>();
    SmemCarver c(base);
    q = c.take<T>(size_t(BM) * ldq);
    k = c.take<T>(size_t(BN) * ldq);
    v = c.take<T>(size_t(BN) * ldv);
    s = c.take<A>(size_t(BM) * lds);
    p = c.take<T>(size_t(BM) * ldp);
    o = c.take<A>(size_t(BM) * ldo);
    m = c.take<A>(BM);
    l = c.take<A>(BM);
    bias = c.take<A>(BN);
    act = c.take<int>(BM);
    bytes = c.offset;
  }
};

// Shared memory of both backward kernels. dQ kernel: acc = dQ (BM x Dp), acc2 unused.
// dK/dV kernel: acc = dK (BN x Dp), acc2 = dV (BN x Ep).
template <typename T, typename A>
struct BwdSmem {
  T *q, *dout, *k, *v, *p, *ds;
  A *s, *dp, *acc, *acc2, *bias, *lse, *delta;
  int ldq, lde, lds, ldp, ldacc, ldacc2;
  size_t bytes;
  __host__ __device__ BwdSmem(unsigned char* base, int BM, int BN, int Dp, int Ep, bool dkdv,
                             bool tc) {
    ldq = Dp + pad_of<T>(tc);
    lde = Ep + pad_of<T>(tc);
    ldp = BN + pad_of<T>(tc);
    lds = BN + acc_pad_of<A>();
    ldacc = Dp + acc_pad_of<A>();
    ldacc2 = Ep + acc_pad_of<A>();
    SmemCarver c(base);
    q = c.take<T>(size_t(BM) * ldq);
    dout = c.take<T>(size_t(BM) * lde);
    k = c.take<T>(size_t(BN) * ldq);
    v = c.take<T>(size_t(BN) * lde);
    s = c.take<A>(size_t(BM) * lds);
    dp = c.take<A>(size_t(BM) * lds);
    p = dkdv ? c.take<T>(size_t(BM) * ldp) : nullptr;
    ds = c.take<T>(size_t(BM) * ldp);
    acc = c.take<A>(size_t(dkdv ? BN : BM) * ldacc);
    acc2 = dkdv ? c.take<A>(size_t(BN) * ldacc2) : nullptr;
    bias = c.take<A>(BN);
    lse = c.take<A>(BM);
    delta = c.take<A>(BM);
    bytes = c.offset;
  }
};


// Zeros a rows x cols accumulator tile of pitch ld. No barrier inside.
template <typename A>
__device__ __forceinline__ void zero_tile(A* t, int ld, int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x)
    t[(idx / cols) * ld + idx % cols] = A(0);
}

// One row of the online softmax over a score tile, by one warp (every lane calls it): the
// scores s = scale·srow + bias, the row's running max m and sum l updated (lane 0 writes them,
// after every lane has read the old max), and with WITH_P the tile's P = exp(s - m_new) written
// to prow. Returns exp(m_old - m_new), the factor for the row's earlier output (1 while the row
// has kept no key: its P is 0 and m, l stay).
template <bool WITH_P, typename T, typename A>
__device__ __forceinline__ A online_softmax_row(const A* srow, const A* bias, A scale, int BN,
                                                A* m, A* l, T* prow) {
  const int lane = threadIdx.x & 31;
  A tmax = neg_inf<A>();
  for (int c = lane; c < BN; c += 32) {
    const A sv = srow[c] * scale + bias[c];
    tmax = sv > tmax ? sv : tmax;
  }
  tmax = warp_max(tmax);
  const A m_old = *m;
  const A m_new = tmax > m_old ? tmax : m_old;
  if (m_new == neg_inf<A>()) {  // warp-uniform
    if (WITH_P)
      for (int c = lane; c < BN; c += 32) prow[c] = from_acc<T>(A(0));
    return A(1);
  }
  A sum = 0;
  for (int c = lane; c < BN; c += 32) {
    const A pv = fast_exp(srow[c] * scale + bias[c] - m_new);  // exp(-inf) = 0
    if (WITH_P) prow[c] = from_acc<T>(pv);
    sum += pv;
  }
  sum = warp_sum(sum);
  const A alpha = fast_exp(m_old - m_new);  // 0 when m_old = -inf
  __syncwarp();  // every lane has read *m before lane 0 replaces it
  if (lane == 0) {
    *m = m_new;
    *l = *l * alpha + sum;
  }
  return alpha;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(AttnArgs<T, A> a, T* __restrict__ out, float* __restrict__ lse) {
  REGHARM_DYNAMIC_SMEM(raw);
  const FwdSmem<T, A> sm(raw, a.BM, a.BN, a.Dp, a.EC, a.tc);
  const int64_t b = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.x) * a.BM;
  const int e0 = blockIdx.y * a.EC;
  const int rows = int(min(int64_t(a.BM), a.L - q0));
  const int ecols = min(a.EC, a.E - e0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  T* out_b = out + b * a.L * a.E + e0;  // row query_at(q0 + r) of image b
  float* lse_b = lse + b * a.L;

  int any = 0;
  for (int r = tid; r < a.BM; r += blockDim.x) {
    const int act = r < rows && active_at(a, b, q0 + r);
    sm.act[r] = act;
    sm.m[r] = neg_inf<A>();
    sm.l[r] = A(0);
    any |= act;
  }
  if (!__syncthreads_or(any)) {  // no active query: exact zeros, nothing attended
    for (int idx = tid; idx < rows * ecols; idx += blockDim.x)
      out_b[query_at(a, b, q0 + idx / ecols) * a.E + idx % ecols] = from_acc<T>(A(0));
    if (blockIdx.y == 0)
      for (int r = tid; r < rows; r += blockDim.x) lse_b[query_at(a, b, q0 + r)] = -INFINITY;
    return;
  }
  load_query_tile(a, sm.q, sm.ldq, a.q + b * a.qs.b, a.qs.r, b, q0, rows, a.D, a.Dp, a.vec_q);
  cp_async_wait_all();
  zero_tile(sm.o, sm.ldo, a.BM, a.EC);

  const T* k_b = a.k + b * a.ks.b;
  const T* v_b = a.v + b * a.vs.b + e0;
  const A* bias_b = a.bias + b * a.N;
  for (int64_t k0 = 0; k0 < a.N; k0 += a.BN) {
    const int keys = int(min(int64_t(a.BN), a.N - k0));
    if (!load_bias_tile(sm.bias, bias_b, k0, keys, a.BN)) continue;  // every key removed
    load_tile(sm.k, sm.ldq, k_b + k0 * a.ks.r, a.ks.r, keys, a.BN, a.D, a.Dp, a.vec_k);
    load_tile(sm.v, sm.ldv, v_b + k0 * a.vs.r, a.vs.r, keys, a.BN, ecols, a.EC, a.vec_v);
    __syncthreads();
    block_mm<T, A, false, true, false>(sm.s, sm.lds, sm.q, sm.ldq, sm.k, sm.ldq, a.BM, a.BN, a.Dp,
                                       a.tc);
    __syncthreads();
    // online softmax, one warp per row; O is rescaled by exp(m_old - m_new)
    for (int r = warp; r < a.BM; r += nwarps) {
      const A alpha = online_softmax_row<true>(sm.s + r * sm.lds, sm.bias, a.scale, a.BN,
                                               sm.m + r, sm.l + r, sm.p + r * sm.ldp);
      if (alpha != A(1))
        for (int e = lane; e < a.EC; e += 32) sm.o[r * sm.ldo + e] *= alpha;
    }
    __syncthreads();
    block_mm<T, A, false, false, true>(sm.o, sm.ldo, sm.p, sm.ldp, sm.v, sm.ldv, a.BM, a.EC, a.BN,
                                       a.tc);
    // the next load_bias_tile's barrier protects sm.k, sm.v, sm.p from being overwritten early
  }
  __syncthreads();
  for (int idx = tid; idx < rows * ecols; idx += blockDim.x) {
    const int r = idx / ecols, e = idx % ecols;
    const A l = sm.l[r];
    const A val = (sm.act[r] && l > A(0)) ? sm.o[r * sm.ldo + e] / l : A(0);
    out_b[query_at(a, b, q0 + r) * a.E + e] = from_acc<T>(val);
  }
  if (blockIdx.y == 0)
    for (int r = tid; r < rows; r += blockDim.x) {
      const A l = sm.l[r];
      lse_b[query_at(a, b, q0 + r)] =
          (sm.act[r] && l > A(0)) ? float(sm.m[r] + acc_log(l)) : -INFINITY;
    }
}

// float64 only: the log-sum-exp recomputed in float64, since the forward saves it in float32
// (a 1e-7 relative error in P would limit gradcheck-grade gradients). The forward's online
// softmax without values: one block per BM queries, one warp per row.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    attn_lse_kernel(AttnArgs<T, A> a, A* __restrict__ lse) {
  REGHARM_DYNAMIC_SMEM(raw);
  const FwdSmem<T, A> sm(raw, a.BM, a.BN, a.Dp, a.EC, a.tc);
  const int64_t b = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.x) * a.BM;
  const int rows = int(min(int64_t(a.BM), a.L - q0));
  const int tid = threadIdx.x, warp = tid >> 5, nwarps = blockDim.x >> 5;
  int any = 0;
  for (int r = tid; r < a.BM; r += blockDim.x) {
    const int act = r < rows && active_at(a, b, q0 + r);
    sm.act[r] = act;
    sm.m[r] = neg_inf<A>();
    sm.l[r] = A(0);
    any |= act;
  }
  if (__syncthreads_or(any)) {
    load_query_tile(a, sm.q, sm.ldq, a.q + b * a.qs.b, a.qs.r, b, q0, rows, a.D, a.Dp, a.vec_q);
    cp_async_wait_all();
    for (int64_t k0 = 0; k0 < a.N; k0 += a.BN) {
      const int keys = int(min(int64_t(a.BN), a.N - k0));
      if (!load_bias_tile(sm.bias, a.bias + b * a.N, k0, keys, a.BN)) continue;
      load_tile(sm.k, sm.ldq, a.k + b * a.ks.b + k0 * a.ks.r, a.ks.r, keys, a.BN, a.D, a.Dp,
                a.vec_k);
      __syncthreads();
      block_mm<T, A, false, true, false>(sm.s, sm.lds, sm.q, sm.ldq, sm.k, sm.ldq, a.BM, a.BN,
                                         a.Dp, a.tc);
      __syncthreads();
      for (int r = warp; r < a.BM; r += nwarps)
        online_softmax_row<false, T>(sm.s + r * sm.lds, sm.bias, a.scale, a.BN, sm.m + r,
                                     sm.l + r, static_cast<T*>(nullptr));
      // load_bias_tile writes sm.bias before its barrier: the softmax must be done with it
      __syncthreads();
    }
  }
  __syncthreads();
  for (int r = tid; r < rows; r += blockDim.x) {
    const A l = sm.l[r];
    lse[b * a.L + query_at(a, b, q0 + r)] =
        (sm.act[r] && l > A(0)) ? sm.m[r] + acc_log(l) : neg_inf<A>();
  }
}

// Δ = rowsum(dO ∘ O) for rows that attended something (0 elsewhere); one warp per row.
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    attn_delta_kernel(AttnArgs<T, A> a, BwdArgs<T, A> g) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= a.B * a.L) return;  // whole warp
  const int64_t b = row / a.L, l = row % a.L;
  const bool act = (a.qmask == nullptr || a.qmask[row]) && g.lse[row] > -INFINITY;
  A s = 0;
  if (act) {
    const T* dor = g.dout + b * g.dos.b + l * g.dos.r;
    const T* orow = g.out + b * g.os.b + l * g.os.r;
    for (int e = lane; e < a.E; e += 32) s += to_acc<A>(dor[e]) * to_acc<A>(orow[e]);
  }
  s = warp_sum(s);
  if (lane == 0) g.delta[row] = s;
}

// The backward's tiles: K, V of keys [k0, k0 + keys) and Q, dO of the queries at positions
// [q0, q0 + rows) of the query order. No barrier inside.
template <typename T, typename A>
__device__ __forceinline__ void load_kv_tiles(const AttnArgs<T, A>& a, const BwdSmem<T, A>& sm,
                                              int64_t b, int64_t k0, int keys) {
  load_tile(sm.k, sm.ldq, a.k + b * a.ks.b + k0 * a.ks.r, a.ks.r, keys, a.BN, a.D, a.Dp, a.vec_k);
  load_tile(sm.v, sm.lde, a.v + b * a.vs.b + k0 * a.vs.r, a.vs.r, keys, a.BN, a.E, a.Ep, a.vec_v);
}
template <typename T, typename A>
__device__ __forceinline__ void load_q_dout_tiles(const AttnArgs<T, A>& a, const BwdArgs<T, A>& g,
                                                  const BwdSmem<T, A>& sm, int64_t b, int64_t q0,
                                                  int rows) {
  load_query_tile(a, sm.q, sm.ldq, a.q + b * a.qs.b, a.qs.r, b, q0, rows, a.D, a.Dp, a.vec_q);
  load_query_tile(a, sm.dout, sm.lde, g.dout + b * g.dos.b, g.dos.r, b, q0, rows, a.E, a.Ep,
                  g.vec_do);
  cp_async_wait_all();
}

// S = Q Kᵀ and dP = dO Vᵀ of the current tiles, then P and dS = P ∘ (dP - Δ) in T.
// Starts after a barrier that published q, dout, k, v, bias, lse, delta; ends with one.
template <typename T, typename A, bool WITH_P>
__device__ __forceinline__ void tile_p_ds(const AttnArgs<T, A>& a, const BwdSmem<T, A>& sm) {
  block_mm<T, A, false, true, false>(sm.s, sm.lds, sm.q, sm.ldq, sm.k, sm.ldq, a.BM, a.BN, a.Dp,
                                     a.tc);
  block_mm<T, A, false, true, false>(sm.dp, sm.lds, sm.dout, sm.lde, sm.v, sm.lde, a.BM, a.BN,
                                     a.Ep, a.tc);
  __syncthreads();
  for (int idx = threadIdx.x; idx < a.BM * a.BN; idx += blockDim.x) {
    const int r = idx / a.BN, c = idx % a.BN;
    const A ls = sm.lse[r], bv = sm.bias[c];
    A p = 0;
    if (ls > neg_inf<A>() && bv > neg_inf<A>())
      p = fast_exp(sm.s[r * sm.lds + c] * a.scale + bv - ls);
    const A ds = p * (sm.dp[r * sm.lds + c] - sm.delta[r]);
    if (WITH_P) sm.p[r * sm.ldp + c] = from_acc<T>(p);
    sm.ds[r * sm.ldp + c] = from_acc<T>(ds);
  }
  __syncthreads();
}

// dK, dV of BN keys from the query tiles qt = split, split + nsplit, ...
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkdv_kernel(AttnArgs<T, A> a, BwdArgs<T, A> g) {
  REGHARM_DYNAMIC_SMEM(raw);
  const BwdSmem<T, A> sm(raw, a.BM, a.BN, a.Dp, a.Ep, true, a.tc);
  const int64_t b = blockIdx.z;
  const int split = blockIdx.y;
  const int64_t k0 = int64_t(blockIdx.x) * a.BN;
  const int keys = int(min(int64_t(a.BN), a.N - k0));
  const int tid = threadIdx.x;

  zero_tile(sm.acc, sm.ldacc, a.BN, a.Dp);
  zero_tile(sm.acc2, sm.ldacc2, a.BN, a.Ep);
  if (load_bias_tile(sm.bias, a.bias + b * a.N, k0, keys, a.BN)) {  // else: removed keys, 0
    load_kv_tiles(a, sm, b, k0, keys);
    const int64_t span = a.qorder ? int64_t(a.qcount[b]) : a.L;  // positions that may attend
    const int64_t qtiles = (span + a.BM - 1) / a.BM;
    for (int64_t qt = split; qt < qtiles; qt += g.nsplit) {
      const int64_t q0 = qt * a.BM;
      const int rows = int(min(int64_t(a.BM), span - q0));
      // barrier inside: the previous tile's products are done with q, dout, p, ds
      if (!load_query_rows(a, g, sm.lse, sm.delta, b, q0, rows)) continue;
      load_q_dout_tiles(a, g, sm, b, q0, rows);
      __syncthreads();
      tile_p_ds<T, A, true>(a, sm);
      // dV += Pᵀ dO, dK += dSᵀ Q (scale applied once at the end)
      block_mm<T, A, true, false, true>(sm.acc2, sm.ldacc2, sm.p, sm.ldp, sm.dout, sm.lde, a.BN,
                                        a.Ep, a.BM, a.tc);
      block_mm<T, A, true, false, true>(sm.acc, sm.ldacc, sm.ds, sm.ldp, sm.q, sm.ldq, a.BN,
                                        a.Dp, a.BM, a.tc);
    }
  }
  __syncthreads();
  A* dk = g.dk_part + ((split * a.B + b) * a.N + k0) * a.D;
  A* dv = g.dv_part + ((split * a.B + b) * a.N + k0) * a.E;
  for (int idx = tid; idx < keys * a.D; idx += blockDim.x)
    dk[idx] = sm.acc[(idx / a.D) * sm.ldacc + idx % a.D] * a.scale;
  for (int idx = tid; idx < keys * a.E; idx += blockDim.x)
    dv[idx] = sm.acc2[(idx / a.E) * sm.ldacc2 + idx % a.E];
}

// dk, dv = Σ_split partials, in a fixed order. With a key order the partials sit at the keys'
// positions in it, and only those of kept keys were written: the others' gradients are 0.
template <typename T, typename A>
__global__ void __launch_bounds__(256) attn_bwd_reduce_kernel(AttnArgs<T, A> a, BwdArgs<T, A> g) {
  __shared__ int splits;  // a loop over the images' kept counts: once per block
  if (threadIdx.x == 0) splits = key_splits(a, g, a.BN);
  __syncthreads();
  const int nsplit = splits;
  const int64_t nk = a.B * a.N * a.D, nv = a.B * a.N * a.E;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < nk + nv;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const bool is_k = idx < nk;
    const int64_t i = is_k ? idx : idx - nk, stride = is_k ? nk : nv;
    const A* src = (is_k ? g.dk_part : g.dv_part) + i;
    int64_t dst = i;
    bool kept = true;
    if (a.korder) {  // i is (image, position p of the key order, column)
      const int64_t cols = is_k ? a.D : a.E, row = i / cols, b = row / a.N, p = row % a.N;
      dst = (b * a.N + a.korder[row]) * cols + i % cols;
      kept = p < a.kcount[b];
    }
    A s = 0;
    if (kept)
      for (int sp = 0; sp < nsplit; ++sp) s += src[sp * stride];
    (is_k ? g.dk : g.dv)[dst] = from_acc<T>(s);
  }
}

// dQ of BM queries over every key tile.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dq_kernel(AttnArgs<T, A> a, BwdArgs<T, A> g) {
  REGHARM_DYNAMIC_SMEM(raw);
  const BwdSmem<T, A> sm(raw, a.BM, a.BN, a.Dp, a.Ep, false, a.tc);
  const int64_t b = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.x) * a.BM;
  const int rows = int(min(int64_t(a.BM), a.L - q0));
  const int tid = threadIdx.x;

  zero_tile(sm.acc, sm.ldacc, a.BM, a.Dp);
  if (load_query_rows(a, g, sm.lse, sm.delta, b, q0, rows)) {  // else: nothing attended, 0
    load_q_dout_tiles(a, g, sm, b, q0, rows);
    const A* bias_b = a.bias + b * a.N;
    for (int64_t k0 = 0; k0 < a.N; k0 += a.BN) {
      const int keys = int(min(int64_t(a.BN), a.N - k0));
      // barrier inside: the previous tile's dQ product is done with k and ds
      if (!load_bias_tile(sm.bias, bias_b, k0, keys, a.BN)) continue;
      load_kv_tiles(a, sm, b, k0, keys);
      __syncthreads();
      tile_p_ds<T, A, false>(a, sm);
      block_mm<T, A, false, false, true>(sm.acc, sm.ldacc, sm.ds, sm.ldp, sm.k, sm.ldq, a.BM,
                                         a.Dp, a.BN, a.tc);
    }
  }
  __syncthreads();
  T* dq = g.dq + b * a.L * a.D;
  for (int idx = tid; idx < rows * a.D; idx += blockDim.x) {
    const int r = idx / a.D, d = idx % a.D;
    const A val = sm.lse[r] > neg_inf<A>() ? sm.acc[r * sm.ldacc + d] * a.scale : A(0);
    dq[query_at(a, b, q0 + r) * a.D + d] = from_acc<T>(val);
  }
}

// ---- host side -------------------------------------------------------------------------------

inline int round16(int v) { return std::max(16, (v + 15) / 16 * 16); }

template <typename T> bool uses_tc(const AttnShape& s) {
  return std::is_same<T, float>::value && s.tf32x3;
}

// ---- which kernels: tiles in registers (attention_registers.cuh) or in shared memory --------

inline bool sm80_or_newer() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    forget_error();
    return false;
  }
  return major >= 8;
}

// The register kernels for s as the launchers run them: under s.pipeline the two-stage kernels
// (16-bit) in place of the one-stage ones, each where its shared memory fits
// the device. PTL's D 64, E 128 on an H100: forward 35.6 -> 61.9 KB (3 blocks per SM either
// way), dQ 52.8 -> 79.0 KB (3 -> 2 blocks per SM: PTL's ~1.6 active query tiles per SM do not
// fill 2), dK/dV 44.0 -> 57.3 KB (its registers allow 2 blocks per SM either way).
template <typename T>
RegKernelSet<T> reg_kernels_run(const AttnShape& s) {
  RegKernelSet<T> rk = reg_kernels<T>(s);
  if (!s.pipeline) return rk;
  const size_t limit = size_t(max_dynamic_smem());
  if (rk.fwd2 != nullptr && rk.fwd2_smem <= limit) rk.fwd = rk.fwd2, rk.fwd_smem = rk.fwd2_smem;
  if (rk.dq2 != nullptr && rk.dq2_smem <= limit) rk.dq = rk.dq2, rk.dq_smem = rk.dq2_smem;
  if (rk.dkdv2 != nullptr && rk.dkdv2_smem <= limit)
    rk.dkdv = rk.dkdv2, rk.dkdv_smem = rk.dkdv2_smem;
  return rk;
}

// The register kernels take 16-bit inputs (mma.sync, sm_80+) and float32 (FMAs on CUDA cores
// on any GPU, or 3xTF32 mma.sync on sm_80+ under tf32x3), with D, E <= 128 (their fragments
// must fit the registers) where shared memory holds their tiles (float32 at D = E = 128 needs
// ~132 KB), unless AttnShape::tiles asks for the tile kernels.
template <typename T> constexpr bool has_registers() { return !std::is_same<T, double>::value; }
template <typename T> bool use_registers(const AttnShape& s) {
  if constexpr (!has_registers<T>()) {
    return false;
  } else {
    const bool tensor_cores = sizeof(T) == 2 || s.tf32x3;
    if (s.tiles || s.D > 128 || s.E > 128 || (tensor_cores && !sm80_or_newer())) return false;
    const RegKernelSet<T> rk = reg_kernels_run<T>(s);
    return std::max({rk.fwd_smem, rk.dq_smem, rk.dkdv_smem}) <= size_t(max_dynamic_smem());
  }
}

// Whether the register kernels take the keys in compacted order: where asked and there is more
// than one key tile (a single tile is skipped or not as a whole already).
inline bool key_order(const AttnShape& s) {
  return s.key_order && s.N > kRegKeys && s.N <= INT32_MAX;
}

// Blocks of the register key-tile kernel in one wave: the occupancy its registers and shared
// memory allow, times the multiprocessors.
template <typename T>
int64_t reg_wave(const AttnShape& s) {
  const RegKernelSet<T> rk = reg_kernels_run<T>(s);
  // the occupancy query costs driver calls: asked once per kernel, device and smem limit
  static std::mutex lock;
  static std::map<std::tuple<const void*, int, int>, int> known;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    dev = -1;
    forget_error();
  }
  const auto key = std::make_tuple(reinterpret_cast<const void*>(rk.dkdv), dev, max_dynamic_smem());
  int per_sm = 0;
  {
    std::lock_guard<std::mutex> guard(lock);
    const auto it = known.find(key);
    if (it != known.end()) {
      per_sm = it->second;
    } else {
      if (allow_smem(reinterpret_cast<const void*>(rk.dkdv), rk.dkdv_smem) != cudaSuccess ||
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, rk.dkdv, kThreads,
                                                        rk.dkdv_smem) != cudaSuccess) {
        per_sm = 1;
        forget_error();
      }
      known[key] = per_sm;
    }
  }
  return int64_t(std::max(1, per_sm)) * multiprocessor_count();
}

// Query tiles of the register key-tile kernel per image, in raster order (the most any split
// count can use).
inline int64_t reg_query_tiles(const AttnShape& s) {
  return (s.L + kRegQueries - 1) / kRegQueries;
}

// Query splits of the register key-tile kernel: as many as one wave of blocks holds (the
// occupancy the kernel's registers and shared memory allow, times the multiprocessors), so that
// no second, mostly idle wave follows; at least one, at most one per query tile (and 16).
// PTL's setting on an H100 (56 key blocks; 2 blocks per SM by registers): 4 splits, 224 blocks.
template <typename T>
int reg_num_splits(const AttnShape& s) {
  const int64_t key_blocks = s.B * ((s.N + kRegRows - 1) / kRegRows);
  const int64_t qtiles = reg_query_tiles(s);
  if (key_blocks == 0 || qtiles == 0) return 1;
  return int(std::max<int64_t>(1, std::min<int64_t>({reg_wave<T>(s) / key_blocks, qtiles, 16})));
}

// Whether the key-tile kernel's query splits follow the kept keys (BwdArgs::wave): under the
// key order, for batches whose kept counts each block can add up (a loop over the images).
inline bool splits_follow_keys(const AttnShape& s) { return key_order(s) && s.B <= 256; }

// Query splits the register backward's partial sums hold: reg_num_splits, and where the splits
// follow the kept keys half as many again, enough for a third of the key blocks to have no kept
// key (PTL's setting: 12 of 14 busy, 4 splits become 5 of at most 6).
template <typename T>
int reg_split_room(const AttnShape& s) {
  const int n = reg_num_splits<T>(s);
  if (!splits_follow_keys(s)) return n;
  return int(std::max<int64_t>(n, std::min<int64_t>({n + (n + 1) / 2, reg_query_tiles(s), 16})));
}

struct Tiles {
  int BM = 0, BN = 0, EC = 0;
  size_t smem = 0;  // 0: nothing fits
};

// Preferred first: large tiles within ~100 KB (two blocks per SM on H100, fits sm_86), then any
// that fits the device.
constexpr int kTileCandidates[][2] = {{64, 64}, {64, 32}, {32, 32}, {32, 16}, {16, 16}};
constexpr size_t kSoftSmem = 100 * 1024;

template <typename T, typename A>
Tiles choose_fwd(int Dp, int Ep, bool tc, size_t limit) {
  for (const size_t budget : {std::min(kSoftSmem, limit), limit})
    for (const int ec : {128, 64, 32, 16}) {
      const int EC = std::min(ec, Ep);
      if (ec != 128 && EC != ec) continue;  // each chunk width once
      for (const auto& bmn : kTileCandidates) {
        const size_t bytes = FwdSmem<T, A>(nullptr, bmn[0], bmn[1], Dp, EC, tc).bytes;
        if (bytes <= budget) return Tiles{bmn[0], bmn[1], EC, bytes};
      }
    }
  return Tiles{};
}

template <typename T, typename A>
Tiles choose_bwd(int Dp, int Ep, bool dkdv, bool tc, size_t limit) {
  // the key-tile kernel prefers narrow key tiles: more blocks for the PTL case's few keys
  static constexpr int dkdv_candidates[][2] = {{64, 32}, {32, 32}, {64, 16}, {32, 16}, {16, 16}};
  for (const size_t budget : {std::min(kSoftSmem, limit), limit})
    for (int i = 0; i < 5; ++i) {
      const int BM = dkdv ? dkdv_candidates[i][0] : kTileCandidates[i][0];
      const int BN = dkdv ? dkdv_candidates[i][1] : kTileCandidates[i][1];
      const size_t bytes = BwdSmem<T, A>(nullptr, BM, BN, Dp, Ep, dkdv, tc).bytes;
      if (bytes <= budget) return Tiles{BM, BN, 0, bytes};
    }
  return Tiles{};
}

// Whether shared-memory tiles take 16-byte stores: the register kernels' (reg_pitch) and the
// WMMA tiles' do; the CUDA-core tile kernels' odd pitches do not.
template <typename T> bool vector_tiles(const AttnShape& s, bool regs) {
  return regs || sizeof(T) == 2 || uses_tc<T>(s);
}

template <typename T, typename A>
AttnArgs<T, A> make_args(const void* q, RowStrides qs, const void* k, RowStrides ks,
                         const void* v, RowStrides vs, const void* key_bias,
                         const bool* query_mask, const AttnShape& s, double scale, bool regs) {
  constexpr int V = 16 / sizeof(T);
  const bool tc = uses_tc<T>(s), vec = vector_tiles<T>(s, regs);
  auto vec_ok = [vec](const void* p, RowStrides st, int cols) {
    return vec && aligned16(p) && cols % V == 0 && st.b % V == 0 && st.r % V == 0;
  };
  AttnArgs<T, A> a;
  a.q = static_cast<const T*>(q);
  a.qs = qs;
  a.k = static_cast<const T*>(k);
  a.ks = ks;
  a.v = static_cast<const T*>(v);
  a.vs = vs;
  a.bias = static_cast<const A*>(key_bias);
  a.qmask = query_mask;
  a.qorder = a.qcount = a.korder = a.kcount = nullptr;
  a.fwd_sync = nullptr;
  a.B = s.B, a.L = s.L, a.N = s.N;
  a.D = s.D, a.E = s.E;
  a.Dp = round16(s.D);
  a.Ep = round16(s.E);
  a.BM = a.BN = a.EC = 0;
  a.scale = A(scale);
  a.vec_q = vec_ok(q, qs, s.D);
  a.vec_k = vec_ok(k, ks, s.D);
  a.vec_v = vec_ok(v, vs, s.E);
  a.tc = tc;
  return a;
}

// The query and key orders' scratch (attn_order_kernel) at the start of either workspace.
struct OrderSpace {
  int *order, *count, *korder, *kcount;
  size_t bytes;
  OrderSpace(void* base, const AttnShape& s) {
    unsigned char* p = static_cast<unsigned char*>(base);
    size_t off = 0;
    auto take = [&](size_t n) {
      int* r = p ? reinterpret_cast<int*>(p + off) : nullptr;
      off = align_up(off + n * sizeof(int), 256);
      return r;
    };
    order = take(size_t(s.B * s.L));
    count = take(size_t(s.B));
    korder = take(s.key_order ? size_t(s.B * s.N) : 0);
    kcount = take(s.key_order ? size_t(s.B) : 0);
    bytes = off;
  }
};

// The register forward's key-split flags (AttnArgs::fwd_sync), after the query order in the
// forward's workspace: an arrival count and a ready flag per (image, query tile).
struct FwdSyncSpace {
  int* flags;
  size_t count, bytes;
  FwdSyncSpace(void* base, const AttnShape& s) {
    const size_t at = OrderSpace(nullptr, s).bytes;
    count = 2 * size_t(s.B) * size_t((s.L + kRegRows - 1) / kRegRows);
    flags = base ? reinterpret_cast<int*>(static_cast<unsigned char*>(base) + at) : nullptr;
    bytes = at + align_up(count * sizeof(int), 256);
  }
};

// Key splits of the register forward: two for float32 where asked (AttnShape::fwd_key_split)
// and there are two key tiles to split; its output holds a half's rows exactly until the other
// half combines them.
template <typename T> int fwd_key_splits(const AttnShape& s) {
  return std::is_same<T, float>::value && s.fwd_key_split && s.N > kRegKeys ? 2 : 1;
}

// Puts the active queries first (a.qorder, a.qcount) when there is a mask, and with `keys` the
// kept keys first (a.korder, a.kcount), in one launch; L beyond int range keeps raster order
// (the kernels then read the mask itself).
template <typename T, typename A>
cudaError_t order_rows(AttnArgs<T, A>& a, const OrderSpace& ws, bool keys, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  const bool queries = a.qmask != nullptr && a.L > 0 && a.L <= INT32_MAX;
  keys = keys && std::is_same<A, float>::value;
  if (!queries && !keys) return cudaSuccess;
  const float* bias = keys ? reinterpret_cast<const float*>(a.bias) : nullptr;
  const dim3 grid(unsigned(a.B), unsigned(int(queries) + int(keys)));
  REGHARM_LAUNCH(attn_order_kernel, grid, dim3(kOrderThreads), 0, stream,
                 queries ? a.qmask : nullptr, a.L, ws.order, ws.count, bias, a.N, ws.korder,
                 ws.kcount);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (queries) a.qorder = ws.order, a.qcount = ws.count;
  if (keys) a.korder = ws.korder, a.kcount = ws.kcount;
  return cudaSuccess;
}

template <typename T>
cudaError_t forward_launch(const void* q, RowStrides qs, const void* k, RowStrides ks,
                           const void* v, RowStrides vs, const void* key_bias,
                           const bool* query_mask, const AttnShape& s, double scale, void* out,
                           float* lse, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  if (s.B == 0 || s.L == 0) return cudaSuccess;
  const bool regs = use_registers<T>(s);
  auto a = make_args<T, A>(q, qs, k, ks, v, vs, key_bias, query_mask, s, scale, regs);
  if constexpr (has_registers<T>()) {
    if (regs) {
      const RegKernelSet<T> rk = reg_kernels_run<T>(s);
      a.BM = kRegRows, a.BN = kRegKeys, a.EC = reg_dim(s.E);
      cudaError_t err = allow_smem(reinterpret_cast<const void*>(rk.fwd), rk.fwd_smem);
      if (err != cudaSuccess) return err;
      err = order_rows(a, OrderSpace(workspace, s), key_order(s), stream);
      if (err != cudaSuccess) return err;
      const int splits = fwd_key_splits<T>(s);
      if (splits > 1) {
        const FwdSyncSpace sync(workspace, s);
        a.fwd_sync = sync.flags;
        err = cudaMemsetAsync(sync.flags, 0, sync.count * sizeof(int), stream);
        if (err != cudaSuccess) return err;
      }
      const dim3 grid(unsigned((s.L + kRegRows - 1) / kRegRows), unsigned(splits), unsigned(s.B));
      REGHARM_LAUNCH(rk.fwd, grid, dim3(kThreads), rk.fwd_smem, stream, a, static_cast<T*>(out),
                     lse);
      return cudaGetLastError();
    }
  }
  const Tiles t = choose_fwd<T, A>(a.Dp, a.Ep, a.tc, size_t(max_dynamic_smem()));
  if (t.smem == 0) return cudaErrorInvalidValue;
  a.BM = t.BM, a.BN = t.BN, a.EC = t.EC;
  auto kern = attn_fwd_kernel<T, A>;
  cudaError_t err = allow_smem(reinterpret_cast<const void*>(kern), t.smem);
  if (err != cudaSuccess) return err;
  if ((err = order_rows(a, OrderSpace(workspace, s), false, stream)) != cudaSuccess) return err;
  // E = 0 still needs one column block: it writes lse
  const dim3 grid(unsigned((s.L + t.BM - 1) / t.BM), unsigned(std::max(1, (s.E + t.EC - 1) / t.EC)),
                  unsigned(s.B));
  REGHARM_LAUNCH(kern, grid, dim3(kThreads), t.smem, stream, a, static_cast<T*>(out), lse);
  return cudaGetLastError();
}

// Query splits of the key-tile kernel: enough blocks for two per multiprocessor.
inline int num_splits(const AttnShape& s, const Tiles& t) {
  const int64_t key_blocks = s.B * ((s.N + t.BN - 1) / t.BN);
  const int64_t qtiles = (s.L + t.BM - 1) / t.BM;
  if (key_blocks == 0 || qtiles == 0) return 1;
  const int64_t want = (2 * int64_t(multiprocessor_count()) + key_blocks - 1) / key_blocks;
  return int(std::max<int64_t>(1, std::min<int64_t>({want, qtiles, 16})));
}

template <typename A>
struct BwdWorkspace {
  A *delta, *lse, *dk_part, *dv_part;
  float* dq_acc;  // float32 dQ of 16-bit inputs under dq_atomic (float32 adds into dq itself)
  size_t bytes;
  BwdWorkspace(void* base, const AttnShape& s, int nsplit, bool dq_buffer = false) {
    unsigned char* p = static_cast<unsigned char*>(base);
    size_t off = OrderSpace(nullptr, s).bytes;  // the query order comes first
    auto take = [&](size_t count) {
      A* r = p ? reinterpret_cast<A*>(p + off) : nullptr;
      off = align_up(off + count * sizeof(A), 256);
      return r;
    };
    delta = take(size_t(s.B * s.L));
    lse = take(std::is_same<A, double>::value ? size_t(s.B * s.L) : 0);
    dk_part = take(size_t(nsplit) * s.B * s.N * s.D);
    dv_part = take(size_t(nsplit) * s.B * s.N * s.E);
    dq_acc = reinterpret_cast<float*>(
        take(dq_buffer ? (size_t(s.B * s.L) * s.D * sizeof(float) + sizeof(A) - 1) / sizeof(A)
                       : 0));
    bytes = off;
  }
};

// Whether the register kernels' dK/dV kernel adds dQ itself (AttnShape::dq_atomic).
template <typename T> bool dq_atomic(const AttnShape& s) {
  return has_registers<T>() && s.dq_atomic && use_registers<T>(s);
}
// ... and needs a float32 buffer for it (16-bit dq).
template <typename T> bool dq_buffer(const AttnShape& s) {
  return dq_atomic<T>(s) && !std::is_same<T, float>::value;
}

template <typename T>
size_t workspace_impl(const AttnShape& s) {
  using A = acc_t<T>;
  if constexpr (has_registers<T>()) {
    if (use_registers<T>(s))
      return BwdWorkspace<A>(nullptr, s, reg_split_room<T>(s), dq_buffer<T>(s)).bytes;
  }
  const Tiles t = choose_bwd<T, A>(round16(s.D), round16(s.E), true, uses_tc<T>(s),
                                   size_t(max_dynamic_smem()));
  if (t.smem == 0) return 0;
  return BwdWorkspace<A>(nullptr, s, num_splits(s, t)).bytes;
}

template <typename T, typename A>
cudaError_t launch_reduce(const AttnArgs<T, A>& a, const BwdArgs<T, A>& g, const AttnShape& s,
                          cudaStream_t stream) {
  const int64_t total = s.B * s.N * (s.D + s.E);
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, 1 << 16);
  auto kern = attn_bwd_reduce_kernel<T, A>;
  REGHARM_LAUNCH(kern, dim3(unsigned(blocks)), dim3(256), 0, stream, a, g);
  return cudaGetLastError();
}

// dq = the float32 dQ that the dK/dV kernel added up (16-bit dq under dq_atomic).
template <typename T>
__global__ void __launch_bounds__(256) attn_dq_cast_kernel(const float* __restrict__ src,
                                                           T* __restrict__ dst, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_acc<T>(src[i]);
}

// The register kernels' dK/dV (then the split sums) and dQ: by its own kernel, or added up by
// the dK/dV kernel (g.dq_acc, zeroed first); Δ is in g.delta already.
template <typename T>
cudaError_t backward_registers(AttnArgs<T, float> a, const BwdArgs<T, float>& g,
                               const AttnShape& s, cudaStream_t stream) {
  const RegKernelSet<T> rk = reg_kernels_run<T>(s);
  const int64_t nq = s.B * s.L * s.D;
  cudaError_t err;
  if (g.dq_acc != nullptr && nq > 0 &&
      (err = cudaMemsetAsync(g.dq_acc, 0, size_t(nq) * sizeof(float), stream)) != cudaSuccess)
    return err;
  if (s.B * s.N > 0) {
    a.BM = kRegQueries, a.BN = kRegRows;
    if ((err = allow_smem(reinterpret_cast<const void*>(rk.dkdv), rk.dkdv_smem)) != cudaSuccess)
      return err;
    const dim3 grid(unsigned((s.N + kRegRows - 1) / kRegRows), unsigned(g.nsplit), unsigned(s.B));
    REGHARM_LAUNCH(rk.dkdv, grid, dim3(kThreads), rk.dkdv_smem, stream, a, g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if ((err = launch_reduce(a, g, s, stream)) != cudaSuccess) return err;
  }
  if (g.dq_acc != nullptr) {
    if constexpr (!std::is_same<T, float>::value) {  // float32 added into dq itself
      if (nq > 0) {
        const int64_t blocks = std::min<int64_t>((nq + 255) / 256, 1 << 16);
        REGHARM_LAUNCH(attn_dq_cast_kernel<T>, dim3(unsigned(blocks)), dim3(256), 0, stream,
                       g.dq_acc, g.dq, nq);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
      }
    }
    return cudaSuccess;
  }
  if (s.B * s.L > 0) {
    a.BM = kRegRows, a.BN = kRegKeys;
    if ((err = allow_smem(reinterpret_cast<const void*>(rk.dq), rk.dq_smem)) != cudaSuccess)
      return err;
    const dim3 grid(unsigned((s.L + kRegRows - 1) / kRegRows), 1u, unsigned(s.B));
    REGHARM_LAUNCH(rk.dq, grid, dim3(kThreads), rk.dq_smem, stream, a, g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t backward_launch(const void* grad_out, RowStrides gs, const void* q, RowStrides qs,
                            const void* k, RowStrides ks, const void* v, RowStrides vs,
                            const void* key_bias, const bool* query_mask, const void* out,
                            RowStrides os, const float* lse, const AttnShape& s, double scale,
                            void* workspace, void* dq, void* dk, void* dv, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int V = 16 / sizeof(T);
  const bool regs = use_registers<T>(s);
  auto a = make_args<T, A>(q, qs, k, ks, v, vs, key_bias, query_mask, s, scale, regs);
  const size_t limit = size_t(max_dynamic_smem());
  const Tiles tkv = choose_bwd<T, A>(a.Dp, a.Ep, true, a.tc, limit);
  const Tiles tq = choose_bwd<T, A>(a.Dp, a.Ep, false, a.tc, limit);
  if (!regs && (tkv.smem == 0 || tq.smem == 0)) return cudaErrorInvalidValue;
  int nsplit = tkv.BN > 0 ? num_splits(s, tkv) : 1;   // no shared-memory tile: registers alone
  int wave = 0;
  if constexpr (has_registers<T>()) {
    if (regs) nsplit = reg_split_room<T>(s);
    if (regs && splits_follow_keys(s)) wave = int(std::min<int64_t>(reg_wave<T>(s), INT32_MAX));
  }
  const BwdWorkspace<A> ws(workspace, s, nsplit, dq_buffer<T>(s));
  cudaError_t err;
  if ((err = order_rows(a, OrderSpace(workspace, s), regs && key_order(s), stream)) != cudaSuccess)
    return err;

  BwdArgs<T, A> g;
  g.dout = static_cast<const T*>(grad_out);
  g.dos = gs;
  g.vec_do = vector_tiles<T>(s, regs) && aligned16(grad_out) && s.E % V == 0 &&
             gs.b % V == 0 && gs.r % V == 0;
  g.out = static_cast<const T*>(out);
  g.os = os;
  if constexpr (std::is_same<A, float>::value) g.lse = lse;  // the forward's
  else g.lse = nullptr;  // float64: recomputed below
  g.delta = ws.delta;
  g.dk_part = ws.dk_part;
  g.dv_part = ws.dv_part;
  g.nsplit = nsplit;
  g.wave = wave;
  g.dq_acc = !dq_atomic<T>(s)              ? nullptr
             : std::is_same<T, float>::value ? static_cast<float*>(dq)
                                             : ws.dq_acc;
  g.dq = static_cast<T*>(dq);
  g.dk = static_cast<T*>(dk);
  g.dv = static_cast<T*>(dv);

  if constexpr (std::is_same<A, double>::value) {
    if (s.B * s.L > 0) {
      const Tiles tf = choose_fwd<T, A>(a.Dp, 16, a.tc, limit);
      if (tf.smem == 0) return cudaErrorInvalidValue;
      auto la = a;
      la.BM = tf.BM, la.BN = tf.BN, la.EC = tf.EC;
      auto kern = attn_lse_kernel<T, A>;
      if ((err = allow_smem(reinterpret_cast<const void*>(kern), tf.smem)) != cudaSuccess)
        return err;
      const dim3 grid(unsigned((s.L + tf.BM - 1) / tf.BM), 1u, unsigned(s.B));
      REGHARM_LAUNCH(kern, grid, dim3(kThreads), tf.smem, stream, la, ws.lse);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      g.lse = ws.lse;
    }
  }
  if (s.B * s.L > 0) {
    auto kern = attn_delta_kernel<T, A>;
    const int64_t blocks = (s.B * s.L + 7) / 8;  // 8 warps (rows) per block
    REGHARM_LAUNCH(kern, dim3(unsigned(blocks)), dim3(256), 0, stream, a, g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if constexpr (has_registers<T>()) {
    if (regs) return backward_registers(a, g, s, stream);
  }
  if (s.B * s.N > 0) {
    a.BM = tkv.BM, a.BN = tkv.BN;
    auto kern = attn_bwd_dkdv_kernel<T, A>;
    if ((err = allow_smem(reinterpret_cast<const void*>(kern), tkv.smem)) != cudaSuccess)
      return err;
    const dim3 grid(unsigned((s.N + tkv.BN - 1) / tkv.BN), unsigned(nsplit), unsigned(s.B));
    REGHARM_LAUNCH(kern, grid, dim3(kThreads), tkv.smem, stream, a, g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if ((err = launch_reduce(a, g, s, stream)) != cudaSuccess) return err;
  }
  if (s.B * s.L > 0) {
    a.BM = tq.BM, a.BN = tq.BN;
    auto kern = attn_bwd_dq_kernel<T, A>;
    if ((err = allow_smem(reinterpret_cast<const void*>(kern), tq.smem)) != cudaSuccess)
      return err;
    const dim3 grid(unsigned((s.L + tq.BM - 1) / tq.BM), 1u, unsigned(s.B));
    REGHARM_LAUNCH(kern, grid, dim3(kThreads), tq.smem, stream, a, g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
size_t largest_smem(const AttnShape& s) {
  using A = acc_t<T>;
  const size_t limit = size_t(max_dynamic_smem());
  const int Dp = round16(s.D), Ep = round16(s.E);
  const bool tc = uses_tc<T>(s);
  if constexpr (has_registers<T>()) {
    if (use_registers<T>(s)) {
      const RegKernelSet<T> rk = reg_kernels_run<T>(s);
      return std::max({rk.fwd_smem, rk.dq_smem, rk.dkdv_smem});
    }
  }
  const Tiles f = choose_fwd<T, A>(Dp, Ep, tc, limit),
              kv = choose_bwd<T, A>(Dp, Ep, true, tc, limit),
              dq = choose_bwd<T, A>(Dp, Ep, false, tc, limit);
  if (f.smem == 0 || kv.smem == 0 || dq.smem == 0) {  // report what the smallest tiles need
    return std::max({FwdSmem<T, A>(nullptr, 16, 16, Dp, 16, tc).bytes,
                     BwdSmem<T, A>(nullptr, 16, 16, Dp, Ep, true, tc).bytes,
                     BwdSmem<T, A>(nullptr, 16, 16, Dp, Ep, false, tc).bytes});
  }
  return std::max({f.smem, kv.smem, dq.smem});
}

}  // namespace

cudaError_t masked_attention_order(const bool* query_mask, int64_t B, int64_t L, int* order,
                                   int* count, cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  REGHARM_LAUNCH(attn_order_kernel, dim3(unsigned(B)), dim3(kOrderThreads), 0, stream,
                 query_mask, L, order, count, static_cast<const float*>(nullptr), int64_t(0),
                 static_cast<int*>(nullptr), static_cast<int*>(nullptr));
  return cudaGetLastError();
}

cudaError_t masked_attention_forward(DType dt, const void* q, RowStrides qs, const void* k,
                                     RowStrides ks, const void* v, RowStrides vs,
                                     const void* key_bias, const bool* query_mask,
                                     const AttnShape& s, double scale, void* out, float* lse,
                                     void* workspace, cudaStream_t stream) {
  REGHARM_DISPATCH(dt, forward_launch, q, qs, k, ks, v, vs, key_bias, query_mask, s, scale, out,
                   lse, workspace, stream)
  return cudaErrorInvalidValue;
}

size_t masked_attention_forward_workspace(const AttnShape& s) {
  return FwdSyncSpace(nullptr, s).bytes;
}

bool masked_attention_fits(DType dt, const AttnShape& s, size_t* need, size_t* have) {
  size_t bytes = 0;
  switch (dt) {
    case DType::kFloat32: bytes = largest_smem<float>(s); break;
    case DType::kFloat16: bytes = largest_smem<__half>(s); break;
    case DType::kBFloat16: bytes = largest_smem<__nv_bfloat16>(s); break;
    case DType::kFloat64: bytes = largest_smem<double>(s); break;
  }
  const size_t limit = size_t(max_dynamic_smem());
  if (need) *need = bytes;
  if (have) *have = limit;
  return bytes <= limit;
}

size_t masked_attention_backward_workspace(DType dt, const AttnShape& s) {
  REGHARM_DISPATCH(dt, workspace_impl, s)
  return 0;
}

cudaError_t masked_attention_backward(DType dt, const void* grad_out, RowStrides gs,
                                      const void* q, RowStrides qs, const void* k, RowStrides ks,
                                      const void* v, RowStrides vs, const void* key_bias,
                                      const bool* query_mask, const void* out, RowStrides os,
                                      const float* lse, const AttnShape& s, double scale,
                                      void* workspace, void* dq, void* dk, void* dv,
                                      cudaStream_t stream) {
  REGHARM_DISPATCH(dt, backward_launch, grad_out, gs, q, qs, k, ks, v, vs, key_bias, query_mask,
                   out, os, lse, s, scale, workspace, dq, dk, dv, stream)
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace regharm
