// masked_attention's kernels with tiles in registers (FlashAttention-2's structure): each warp
// owns 16 rows and keeps its scores, probabilities and output accumulators in registers. The
// products come from a policy M: TensorCores<T> (mma_sync.cuh: mma.sync for 16-bit inputs, and
// for float32 as 3xTF32) or CudaCoresF32 (simt_products.cuh: float32 FMAs), both with
// mma.sync's accumulator layout; shared memory holds only the streamed K/V (or Q/dO) tiles.
// The shared-memory tile kernels of masked_attention_kernels.cu write every score tile to
// shared memory and read it back for the softmax and for the next product; the H100 run of
// a868fa1 measured them at 12 % occupancy (~95 KB of shared memory per block) and 3.6-10x
// slower than the Triton kernels. Both float32 policies read their A fragments from shared
// memory at each product (M::kFragsInRegs): 3xTF32's splits and CUDA cores' whole k-ranges
// need the registers.
//
// Same semantics, masking and skipping as the tile kernels (SPEC §3): query tiles run over the
// compacted query order, key tiles whose keys are all removed are skipped, inactive queries get
// zeros and lse = -inf, and the key-tile kernel writes per-split partial sums that
// attn_bwd_reduce_kernel adds in a fixed order (deterministic). dQ comes either from its own
// kernel over query tiles (deterministic; it recomputes S and dP, a third of the backward's
// products at PTL's D 64, E 128) or, with BwdArgs::dq_acc, from the key-tile kernel, which has
// dS already: one more product per tile and float32 atomics (FlashAttention-2's choice).
//
// Sizes: DP, EP (D and E padded with zeros to 64 or 128) are template parameters, so the
// fragment arrays are fixed-size and stay in registers. Every streamed tile sits row-major in
// shared memory as load_tile writes it (16-byte loads); operands used transposed (V in P·V, K in
// dS·K, Q and dO in the key-tile kernel) are read with `ldmatrix .trans` (load_b_trans), or on
// CUDA cores as 4 contiguous floats per lane of two n-tiles at once (load_b_trans2).
#pragma once

#include "attention_common.cuh"
#include "attention_register_set.h"
#include "mma_sync.cuh"
#include "simt_products.cuh"

namespace regharm {
namespace cuda {
namespace {

// Pitch of a tile with `cols` columns (a multiple of 16): 16 bytes of padding put the 8 rows a
// fragment load touches on 8 different groups of 4 banks, and keep rows 16-byte aligned for
// load_tile's vector loads.
template <typename T> __host__ __device__ constexpr int reg_pitch(int cols) {
  return cols + int(16 / sizeof(T));
}

// Max and sum over the 4 lanes that hold a row of an accumulator fragment (policy M's Lanes).
template <typename M>
__device__ __forceinline__ float row_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, M::Lanes::kRowXor0));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, M::Lanes::kRowXor1));
}
template <typename M>
__device__ __forceinline__ float row_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, M::Lanes::kRowXor0);
  return v + __shfl_xor_sync(0xffffffffu, v, M::Lanes::kRowXor1);
}

// The warp's products, each lane holding its fragments (policy M):
// acc[j] += A · Mᵀ[:, 8j : 8j + 8] over KS k-steps of M::K, A (16 rows) in registers and
// the matrix m row-major in shared memory (pitch ldm): S = Q Kᵀ, dP = dO Vᵀ and their
// transposes.
template <typename M, int KS, int NJ>
__device__ __forceinline__ void mma_abt(float (&acc)[NJ][4], const typename M::FragA (&af)[KS],
                                        const typename M::In* m, int ldm) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk)
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      typename M::FragB bf;
      M::load_b_t(bf, m, ldm, j * 8, kk * M::K);
      M::mma(acc[j], af[kk], bf);
    }
}

// The same with A's 16 rows read from shared memory (pitch lda) one k-step at a time.
template <typename M, int KS, int NJ>
__device__ __forceinline__ void mma_abt(float (&acc)[NJ][4], const typename M::In* a, int lda,
                                        const typename M::In* m, int ldm) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    typename M::FragA af[1];
    M::load_a(af[0], a, lda, kk * M::K);
    mma_abt<M, 1, NJ>(acc, af, m + kk * M::K, ldm);
  }
}

// acc[n] += A · M[k-step, 8n : 8n + 8] for one k-step, A's fragment in pa and the matrix m
// row-major in shared memory (pitch ldm) at that k-step's first row. The results are only
// stored: element c of a lane's pair in acc[n] is column M::out_col(n, t, c), which for
// M::kPairedOutputs groups n-tiles by two (NN even).
template <typename M, int NN>
__device__ __forceinline__ void mma_am_step(float (&acc)[NN][4], const typename M::FragA& pa,
                                            const typename M::In* mk, int ldm) {
  if constexpr (M::kPairedOutputs) {
    static_assert(NN % 2 == 0, "paired outputs need an even number of n-tiles");
#pragma unroll
    for (int n = 0; n < NN; n += 2) {
      typename M::FragB b0, b1;
      M::load_b_trans2(b0, b1, mk + n * 8, ldm);
      M::mma(acc[n], pa, b0);
      M::mma(acc[n + 1], pa, b1);
    }
  } else {
#pragma unroll
    for (int n = 0; n < NN; ++n) {
      typename M::FragB bf;
      M::load_b_trans(bf, mk + n * 8, ldm);
      M::mma(acc[n], pa, bf);
    }
  }
}

// acc[n] += P · M[:, 8n : 8n + 8] with P (16 x 8 NP) the accumulator fragments p (as A
// operands: P·V, dS·K, Pᵀ·dO, dSᵀ·Q) and the matrix m row-major in shared memory (pitch ldm).
template <typename M, int NP, int NN>
__device__ __forceinline__ void mma_pm(float (&acc)[NN][4], const float (&p)[NP][4],
                                       const typename M::In* m, int ldm) {
  constexpr int K = M::K, PER = K / 8;  // accumulator n-tiles per k-step
#pragma unroll
  for (int kk = 0; kk < NP / PER; ++kk) {
    typename M::FragA pa;
    M::acc_to_a(pa, &p[kk * PER]);
    mma_am_step<M>(acc, pa, m + kk * K * ldm, ldm);
  }
}

// The same with A's 16 rows read from shared memory (pitch lda), KS k-steps: dS·K of the
// dK/dV kernel's atomic dQ, whose dS rows come from all four warps.
template <typename M, int KS, int NN>
__device__ __forceinline__ void mma_sm(float (&acc)[NN][4], const typename M::In* a, int lda,
                                       const typename M::In* m, int ldm) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    typename M::FragA af;
    M::load_a(af, a, lda, kk * M::K);
    mma_am_step<M>(acc, af, m + kk * M::K * ldm, ldm);
  }
}

// ---- the key tiles the forward and dQ kernels stream --------------------------------------

// Shared memory of the streamed key tiles: S stages of K (kRegKeys rows, pitch ldk), V (pitch
// ldv) and the keys' bias, one after another (k_at, v_at, bias_at: offsets, not arrays of
// pointers, which a stage picked at run time would send to local memory).
template <typename T>
struct KeyTileBuffers {
  T *k, *v;
  float* bias;
  int ldk, ldv;
  __device__ __forceinline__ T* k_at(int s) const { return k + s * kRegKeys * ldk; }
  __device__ __forceinline__ T* v_at(int s) const { return v + s * kRegKeys * ldv; }
  __device__ __forceinline__ float* bias_at(int s) const { return bias + s * kRegKeys; }
};

// Streams the key tiles at positions [k_begin, k_end) of image b's key order through shared
// memory (K: a.D columns of DP; V: ecols of EC) and calls attend(k, v, bias) for each tile that
// keeps a key, in every thread, with the tile published; attend has no barrier.
// S = 1: a tile is loaded, waited for, published, used, and a barrier ends its use before the
// next one's loads (two barriers a tile; the loads' latency is the block's idle time).
// S = 2 (16-bit inputs): tile i + 1's copies are issued right after the barrier that publishes
// tile i, into the other stage, and fly while tile i's products run; the next wait and barrier
// publish them and end tile i's use (FlashAttention's prefetch of K and V, Triton's
// num_stages). At PTL's setting 20 % of the queries make ~1.6 blocks of 4 warps per SM: no
// other block hides a block's loads.
template <int S, typename T, typename A, typename Attend>
__device__ __forceinline__ void stream_key_tiles(const AttnArgs<T, A>& a, int64_t b,
                                                 int64_t k_begin, int64_t k_end,
                                                 const KeyTileBuffers<T>& kt, int DP, int ecols,
                                                 int EC, Attend&& attend) {
  static_assert(S == 1 || S == 2, "one or two stages");
  static_assert(kRegKeys == 64, "the vote below reads two keys per lane");
  const T* k_img = a.k + b * a.ks.b;
  const T* v_img = a.v + b * a.vs.b;
  const A* bias_img = a.bias + b * a.N;
  // a tile's keys from the key span, not k_end: the same values (splits end on whole tiles),
  // but the float32 forward took 190 registers instead of 168 with k_end
  const int64_t span = key_span(a, b);
  if constexpr (S == 1) {
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kRegKeys) {
      const int keys = int(min(int64_t(kRegKeys), span - k0));
      // K and V in flight over the bias's round trips (the previous tile ended with a barrier)
      load_key_tile(a, kt.k, kt.ldk, k_img, a.ks.r, b, k0, keys, kRegKeys, a.D, DP, a.vec_k);
      load_key_tile(a, kt.v, kt.ldv, v_img, a.vs.r, b, k0, keys, kRegKeys, ecols, EC, a.vec_v);
      const bool kept = load_bias_tile(kt.bias, bias_img, k0, keys, kRegKeys, key_rows(a, b, k0));
      cp_async_wait_all();
      if (!kept) continue;  // every key removed: nobody reads this tile
      __syncthreads();
      attend(static_cast<const T*>(kt.k), static_cast<const T*>(kt.v),
             static_cast<const float*>(kt.bias));
      __syncthreads();  // every warp is done with k, v and bias before the next tile's loads
    }
  } else {
    auto issue = [&](int64_t k0, int s) {
      const int keys = int(min(int64_t(kRegKeys), span - k0));
      const int* rows = key_rows(a, b, k0);
      load_key_tile(a, kt.k_at(s), kt.ldk, k_img, a.ks.r, b, k0, keys, kRegKeys, a.D, DP,
                    a.vec_k);
      load_key_tile(a, kt.v_at(s), kt.ldv, v_img, a.vs.r, b, k0, keys, kRegKeys, ecols, EC,
                    a.vec_v);
      load_bias_tile_async(kt.bias_at(s), bias_img, k0, keys, kRegKeys, rows);
    };
    if (k_begin >= k_end) return;
    issue(k_begin, 0);
    const int lane = threadIdx.x & 31;
    int s = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kRegKeys, s ^= 1) {
      cp_async_wait_all();  // this thread's copies of tile k0: the only ones in flight
      __syncthreads();      // tile k0 published; every warp done with the other stage's tile
      if (k0 + kRegKeys < k_end) issue(k0 + kRegKeys, s ^ 1);
      const float* bias = kt.bias_at(s);
      // every warp votes alike: no barrier needed to skip a tile of removed keys
      if (!__ballot_sync(0xffffffffu, bias[lane] > -INFINITY || bias[lane + 32] > -INFINITY))
        continue;
      attend(static_cast<const T*>(kt.k_at(s)), static_cast<const T*>(kt.v_at(s)), bias);
    }
  }
}

// ---- forward ---------------------------------------------------------------------------------

template <typename T>
struct RegFwdSmem {
  T* q;
  KeyTileBuffers<T> keys;
  int *act, *role;
  int ldq, ldv;
  size_t bytes;
  __host__ __device__ RegFwdSmem(unsigned char* base, int DP, int EC, int stages) {
    ldq = reg_pitch<T>(DP);
    ldv = reg_pitch<T>(EC);
    SmemCarver c(base);
    q = c.take<T>(size_t(kRegRows) * ldq);
    keys.k = c.take<T>(size_t(stages) * kRegKeys * ldq);
    keys.v = c.take<T>(size_t(stages) * kRegKeys * ldv);
    keys.bias = c.take<float>(size_t(stages) * kRegKeys);
    keys.ldk = ldq, keys.ldv = ldv;
    act = c.take<int>(kRegRows);
    role = c.take<int>(1);
    bytes = c.offset;
  }
};

// Waits until another block has set *flag (it got there first and is running: no deadlock).
__device__ __forceinline__ void wait_for_flag(int* flag) {
#if defined(REGHARM_CUDA_EMULATION)
  // blocks run one after another there: the other one has finished
  if (*flag == 0) ::emu::fail("forward key split: the first block of a query tile never finished");
#else
  while (atomicAdd(flag, 0) == 0) {
  }
#endif
  __threadfence();
}

// The rows of one query tile from two halves of the keys, each (o, lse) normalized as if alone:
// both rows weighted by exp(lse - max) and renormalized. Symmetric in its two operands, rounding
// included (no contraction into FMAs), so the result does not depend on which block finished
// first.
struct SplitMix {
  float w_own = 1.0f, w_other = 0.0f, inv = 1.0f, lse = -INFINITY;
  __device__ __forceinline__ SplitMix(float lse_own, float lse_other) {
    const float mx = fmaxf(lse_own, lse_other);
    if (mx == -INFINITY) {  // nothing attended in either half
      w_own = 0.0f;
      return;
    }
    w_own = fast_exp(lse_own - mx);  // exp(-inf) = 0
    w_other = fast_exp(lse_other - mx);
    const float sum = __fadd_rn(w_own, w_other);
    inv = 1.0f / sum;
    lse = mx + acc_log(sum);
  }
  __device__ __forceinline__ float operator()(float own, float other) const {
    return __fmul_rn(__fadd_rn(__fmul_rn(own, w_own), __fmul_rn(other, w_other)), inv);
  }
};

// One block per 64 positions of the query order x key split x image; a.BM = kRegRows. With
// key splits (gridDim.y = 2, a.fwd_sync; float32, whose output holds a partial result exactly),
// split y takes the y-th half of the key tiles, so that the ~1.6 blocks per SM of PTL's setting
// (20 % of 4 x 16384 queries on 132 SMs) become ~3 with all SMs busy; the first block of a
// query tile to finish writes its rows as if it were alone, the second waits for them and
// writes both halves combined (SplitMix).
template <typename M, int DP, int EC, int S = 1, typename T = typename M::In>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_reg_kernel(AttnArgs<T, float> a, T* __restrict__ out, float* __restrict__ lse) {
  constexpr int KD = DP / M::K, NS = kRegKeys / 8, NE = EC / 8;
  REGHARM_DYNAMIC_SMEM(raw);
  const RegFwdSmem<T> sm(raw, DP, EC, S);
  const int64_t b = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.x) * kRegRows;
  const int split = blockIdx.y, nsplit = gridDim.y;
  const int rows = int(min(int64_t(kRegRows), a.L - q0));
  const int ecols = min(EC, a.E);
  const int tid = threadIdx.x, warp = tid >> 5, g = M::Lanes::g(), t = M::Lanes::t();
  T* out_b = out + b * a.L * a.E;
  float* lse_b = lse + b * a.L;

  int any = 0;
  for (int r = tid; r < kRegRows; r += blockDim.x) {
    const int act = r < rows && active_at(a, b, q0 + r);
    sm.act[r] = act;
    any |= act;
  }
  if (!__syncthreads_or(any)) {  // no active query: exact zeros, nothing attended
    if (split > 0) return;
    for (int idx = tid; idx < rows * ecols; idx += blockDim.x)
      out_b[query_at(a, b, q0 + idx / ecols) * a.E + idx % ecols] = from_acc<T>(0.0f);
    for (int r = tid; r < rows; r += blockDim.x) lse_b[query_at(a, b, q0 + r)] = -INFINITY;
    return;
  }
  load_query_tile(a, sm.q, sm.ldq, a.q + b * a.qs.b, a.qs.r, b, q0, rows, a.D, DP, a.vec_q);
  cp_async_wait_all();
  __syncthreads();
  // Q fragments stay in registers where the policy says so, else are read at each product
  const T* qw = sm.q + warp * 16 * sm.ldq;
  typename M::FragA qf[M::kFragsInRegs ? KD : 1];
  if constexpr (M::kFragsInRegs)
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) M::load_a(qf[kk], qw, sm.ldq, kk * M::K);

  // rows g (h = 0: fragment elements 0, 1) and g + 8 (h = 1: elements 2, 3) of the warp's 16;
  // l is this lane's share of the row sum (its 2 of every 8 columns), added up at the end
  float o[NE][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  const int64_t nk = key_span(a, b);  // positions of the key order that may hold a kept key
  const int64_t per = ((nk + kRegKeys - 1) / kRegKeys + nsplit - 1) / nsplit;  // key tiles
  const int64_t k_end = min(nk, (split + 1) * per * kRegKeys);
  auto attend = [&](const T* sk, const T* sv, const float* sbias) {
    float s[NS][4] = {};
    if constexpr (M::kFragsInRegs) mma_abt<M>(s, qf, sk, sm.ldq);
    else mma_abt<M, KD>(s, qw, sm.ldq, sk, sm.ldq);
    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s[j][c] = s[j][c] * a.scale + sbias[j * 8 + 2 * t + (c & 1)];
        tmax[c >> 1] = fmaxf(tmax[c >> 1], s[j][c]);
      }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m[h], row_max<M>(tmax[h]));
      alpha[h] = m_new == -INFINITY ? 1.0f : fast_exp(m[h] - m_new);  // 0 when m was -inf
      m[h] = m_new;
    }
    float psum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int h = c >> 1;
        const float p = m[h] == -INFINITY ? 0.0f : fast_exp(s[j][c] - m[h]);  // exp(-inf) = 0
        s[j][c] = p;
        psum[h] += p;
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + psum[h];
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      o[e][0] *= alpha[0], o[e][1] *= alpha[0];
      o[e][2] *= alpha[1], o[e][3] *= alpha[1];
    }
    mma_pm<M>(o, s, sv, sm.ldv);  // O += P V
  };
  stream_key_tiles<S>(a, b, split * per * kRegKeys, k_end, sm.keys, DP, ecols, EC, attend);
  bool combine = false;  // the second block of a split query tile: combines
  int* arrivals = nullptr;
  if (nsplit > 1) {
    arrivals = a.fwd_sync + b * gridDim.x + blockIdx.x;
    if (tid == 0) *sm.role = atomicAdd(arrivals, 1);
    __syncthreads();
    combine = *sm.role != 0;
    if (combine && tid == 0) wait_for_flag(arrivals + a.B * gridDim.x);
    __syncthreads();
  }
  float lse_other[2] = {-INFINITY, -INFINITY};  // the first block's rows, read before replaced
  if (combine) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 + g + 8 * h;
      if (r < rows) lse_other[h] = __ldcg(lse_b + query_at(a, b, q0 + r));
    }
    __syncwarp();  // every lane of a row has read its lse before lane t = 0 overwrites it
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float lsum = row_sum<M>(l[h]);
    const int r = warp * 16 + g + 8 * h;
    if (r >= rows) continue;
    const bool act = sm.act[r] && lsum > 0.0f;
    const float inv = act ? 1.0f / lsum : 0.0f;
    const int64_t qrow = query_at(a, b, q0 + r);
    const float lse_own = act ? m[h] + acc_log(lsum) : -INFINITY;
    const SplitMix mix(lse_own, lse_other[h]);
#pragma unroll
    for (int e = 0; e < NE; ++e)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = M::out_col(e, t, c);
        if (col >= ecols) continue;
        T* dst = out_b + qrow * a.E + col;
        const float own = o[e][2 * h + c] * inv;
        *dst = from_acc<T>(combine ? mix(own, to_acc<float>(__ldcg(dst))) : own);
      }
    if (t == 0) lse_b[qrow] = combine ? mix.lse : lse_own;
  }
  if (nsplit > 1 && !combine) {  // publish the rows (every thread's stores), then the flag
    __threadfence();
    __syncthreads();
    if (tid == 0) atomicExch(arrivals + a.B * gridDim.x, 1);
  }
}

// ---- backward: dQ over key tiles -------------------------------------------------------------

// Shared memory of both backward kernels: a pair of tiles the block loads once (`held` rows:
// Q and dO in the dQ kernel, K and V in the dK/dV kernel), the pair it streams (`streamed` rows:
// K and V, or Q and dO), then the keys' bias and the query rows' lse and Δ. The first tile of a
// pair has DP columns, the second EP. stages: copies of the streamed pair and of what streams
// with it, the bias where the streamed rows are keys (the dQ kernel), lse and Δ where they are
// queries (the dK/dV kernel).
template <typename T>
struct RegBwdSmem {
  T *held_d, *held_e, *stream_d, *stream_e;
  float *bias, *lse, *delta;
  int ldd, lde;
  size_t bytes;
  __host__ __device__ RegBwdSmem(unsigned char* base, int DP, int EP, int held, int streamed,
                                 int keys, int queries, int stages, bool streams_keys) {
    ldd = reg_pitch<T>(DP);
    lde = reg_pitch<T>(EP);
    SmemCarver c(base);
    held_d = c.take<T>(size_t(held) * ldd);
    held_e = c.take<T>(size_t(held) * lde);
    stream_d = c.take<T>(size_t(stages) * streamed * ldd);
    stream_e = c.take<T>(size_t(stages) * streamed * lde);
    bias = c.take<float>(size_t(streams_keys ? stages : 1) * keys);
    lse = c.take<float>(size_t(streams_keys ? 1 : stages) * queries);
    delta = c.take<float>(size_t(streams_keys ? 1 : stages) * queries);
    bytes = c.offset;
  }
};

// The dQ kernel's: Q and dO of 64 query rows held, K and V of 64 keys streamed in `stages`.
template <typename T>
struct RegDqSmem : RegBwdSmem<T> {
  __host__ __device__ RegDqSmem(unsigned char* base, int DP, int EP, int stages)
      : RegBwdSmem<T>(base, DP, EP, kRegRows, kRegKeys, kRegKeys, kRegRows, stages, true) {}
};

// dQ = scale · dS K with dS = P ∘ (dO Vᵀ - Δ); one block per 64 positions of the query order x
// image; a.BM = kRegRows.
template <typename M, int DP, int EP, int S = 1, typename T = typename M::In>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dq_reg_kernel(AttnArgs<T, float> a, BwdArgs<T, float> g) {
  constexpr int KD = DP / M::K, KE = EP / M::K, NS = kRegKeys / 8, ND = DP / 8;
  REGHARM_DYNAMIC_SMEM(raw);
  const RegDqSmem<T> sm(raw, DP, EP, S);
  T* const sq = sm.held_d;  // Q and dO rows of this block; K and V stream through stream_*
  T* const sdo = sm.held_e;
  const int ldq = sm.ldd, lde = sm.lde;
  const int64_t b = blockIdx.z;
  const int64_t q0 = int64_t(blockIdx.x) * kRegRows;
  const int rows = int(min(int64_t(kRegRows), a.L - q0));
  const int tid = threadIdx.x, warp = tid >> 5, gr = M::Lanes::g(), t = M::Lanes::t();

  float dq[ND][4] = {};
  // Q and dO in flight over lse's and delta's round trips
  load_query_tile(a, sq, ldq, a.q + b * a.qs.b, a.qs.r, b, q0, rows, a.D, DP, a.vec_q);
  load_query_tile(a, sdo, lde, g.dout + b * g.dos.b, g.dos.r, b, q0, rows, a.E, EP, g.vec_do);
  const bool attends = load_query_rows(a, g, sm.lse, sm.delta, b, q0, rows);
  cp_async_wait_all();
  if (attends) {  // else: nothing attended, 0
    __syncthreads();
    const T* qw = sq + warp * 16 * ldq;
    const T* dow = sdo + warp * 16 * lde;
    typename M::FragA qf[M::kFragsInRegs ? KD : 1], dof[M::kFragsInRegs ? KE : 1];
    if constexpr (M::kFragsInRegs) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) M::load_a(qf[kk], qw, ldq, kk * M::K);
#pragma unroll
      for (int kk = 0; kk < KE; ++kk) M::load_a(dof[kk], dow, lde, kk * M::K);
    }
    float lse_r[2], delta_r[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      lse_r[h] = sm.lse[warp * 16 + gr + 8 * h];
      delta_r[h] = sm.delta[warp * 16 + gr + 8 * h];
    }
    auto attend = [&](const T* sk, const T* sv, const float* sbias) {
      float s[NS][4] = {}, dp[NS][4] = {};
      if constexpr (M::kFragsInRegs) {
        mma_abt<M>(s, qf, sk, ldq);    // S = Q Kᵀ
        mma_abt<M>(dp, dof, sv, lde);  // dP = dO Vᵀ
      } else {
        mma_abt<M, KD>(s, qw, ldq, sk, ldq);
        mma_abt<M, KE>(dp, dow, lde, sv, lde);
      }
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int h = c >> 1;
          const float bv = sbias[j * 8 + 2 * t + (c & 1)];
          const float p = (lse_r[h] > -INFINITY && bv > -INFINITY)
                              ? fast_exp(s[j][c] * a.scale + bv - lse_r[h])
                              : 0.0f;
          s[j][c] = p * (dp[j][c] - delta_r[h]);  // dS
        }
      mma_pm<M>(dq, s, sk, ldq);  // dQ += dS K
    };
    const KeyTileBuffers<T> kt{sm.stream_d, sm.stream_e, sm.bias, ldq, lde};
    stream_key_tiles<S>(a, b, 0, key_span(a, b), kt, DP, a.E, EP, attend);
  }
  T* dq_b = g.dq + b * a.L * a.D;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + gr + 8 * h;
    if (r >= rows) continue;
    const bool act = sm.lse[r] > -INFINITY;
    const int64_t qrow = query_at(a, b, q0 + r);
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = M::out_col(n, t, c);
        if (col < a.D)
          dq_b[qrow * a.D + col] = from_acc<T>(act ? dq[n][2 * h + c] * a.scale : 0.0f);
      }
  }
}

// ---- backward: dK, dV over query tiles -------------------------------------------------------

// The dK/dV kernel's: K and V of 64 keys held, Q and dO of 32 query rows streamed in
// `stages`, and the query tile's dS (32 queries x 64 keys, row-major) for the atomic dQ.
template <typename T>
struct RegDkdvSmem : RegBwdSmem<T> {
  T* ds;
  int ldds;
  __host__ __device__ RegDkdvSmem(unsigned char* base, int DP, int EP, int stages)
      : RegBwdSmem<T>(base, DP, EP, kRegRows, kRegQueries, kRegRows, kRegQueries, stages,
                      false) {
    SmemCarver c(base);
    c.offset = this->bytes;
    ldds = reg_pitch<T>(kRegRows);
    ds = c.take<T>(size_t(kRegQueries) * ldds);
    this->bytes = c.offset;
  }
};

// sm_90's vector float atomics: one atomic (PTX atom.global.add.v4.f32, or .v2) for a lane's
// four (two) neighbouring dQ columns instead of four (two) scalar ones; the emulator runs them
// as sm_90 does. Older GPUs add column by column.
#if defined(REGHARM_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define REGHARM_VECTOR_ATOMICS 1
__device__ __forceinline__ void add_pair(float* p, float v0, float v1) {
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(v0, v1));
}
__device__ __forceinline__ void add_quad(float* p, const float (&v)[4]) {
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
}
#else
#define REGHARM_VECTOR_ATOMICS 0
__device__ __forceinline__ void add_pair(float* p, float v0, float v1) {  // not reached
  atomicAdd(p, v0);
  atomicAdd(p + 1, v1);
}
__device__ __forceinline__ void add_quad(float* p, const float (&v)[4]) {  // not reached
  for (int e = 0; e < 4; ++e) atomicAdd(p + e, v[e]);
}
#endif

// dQ += scale · dS K of one query tile, added to g.dq_acc with atomics: dS (kRegQueries x
// kRegRows keys) in shared memory from all four warps, K the block's keys. Warp w takes query
// rows 16 (w & 1) .. + 16 and the columns of half (w >> 1) of DP. A lane's columns: n-tile n's
// pair (c = 0, 1) is two neighbours; with PairedLanes' outputs (kPairedOutputs) n-tiles 2j and
// 2j + 1 make four. Where a group would run past D or D leaves rows unaligned, its columns go
// one by one.
template <typename M, int DP, typename T, typename A>
__device__ __forceinline__ void add_dq_atomic(const AttnArgs<T, A>& a, const BwdArgs<T, A>& g,
                                              const T* ds, int ldds, const T* sk, int ldk,
                                              const float* lse_s, int64_t b, int64_t q0,
                                              int rows) {
  static_assert(kRegQueries == 32 && kThreads == 128, "4 warps: 2 row halves x 2 column halves");
  constexpr int NH = DP / 16;  // n-tiles of a column half
  const int warp = threadIdx.x >> 5, gr = M::Lanes::g(), t = M::Lanes::t();
  const int r0 = (warp & 1) * 16, c0 = (warp >> 1) * (DP / 2);
  // a lane's four neighbouring columns (PairedLanes), or two (mma.sync's layout), at once
  constexpr bool kFour = REGHARM_VECTOR_ATOMICS && M::kPairedOutputs;
  constexpr bool kTwo = REGHARM_VECTOR_ATOMICS && !M::kPairedOutputs;
  float acc[NH][4] = {};
  mma_sm<M, kRegRows / M::K>(acc, ds + r0 * ldds, ldds, sk + c0, ldk);
  float* dq_b = g.dq_acc + b * a.L * a.D;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = r0 + gr + 8 * h;
    if (r >= rows || !(lse_s[r] > -INFINITY)) continue;  // nothing attended: dS is 0
    float* dq_row = dq_b + query_at(a, b, q0 + r) * a.D;
    if constexpr (kFour) {  // n-tiles n, n + 1: columns col .. col + 3
#pragma unroll
      for (int n = 0; n < NH; n += 2) {
        const int col = c0 + M::out_col(n, t, 0);
        const float v[4] = {acc[n][2 * h] * a.scale, acc[n][2 * h + 1] * a.scale,
                            acc[n + 1][2 * h] * a.scale, acc[n + 1][2 * h + 1] * a.scale};
        if (a.D % 4 == 0 && col + 3 < a.D) {
          REGHARM_CHECK_ALIGNED(dq_row + col, 16);
          add_quad(dq_row + col, v);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (col + e < a.D) atomicAdd(dq_row + col + e, v[e]);
        }
      }
    } else {
#pragma unroll
      for (int n = 0; n < NH; ++n) {
        const int col = c0 + M::out_col(n, t, 0);
        const float v0 = acc[n][2 * h] * a.scale, v1 = acc[n][2 * h + 1] * a.scale;
        if (kTwo && a.D % 2 == 0 && col + 1 < a.D) {
          REGHARM_CHECK_ALIGNED(dq_row + col, 8);
          add_pair(dq_row + col, v0, v1);
          continue;
        }
        if (col < a.D) atomicAdd(dq_row + col, v0);
        if (col + 1 < a.D) atomicAdd(dq_row + col + 1, v1);
      }
    }
  }
}

// dV = Pᵀ dO and dK = scale · dSᵀ Q of 64 keys (16 per warp, as rows: the scores come out
// transposed, Sᵀ = K Qᵀ) from the query tiles qt = split, split + nsplit, ...; a.BM =
// kRegQueries. Writes the split's partial sums, by position of the key order where there is
// one (blocks past its kept keys, or of splits beyond key_splits, have nothing to do).
// S: stages of the streamed query tiles, as stream_key_tiles' (two: the next tile's Q, dO, lse
// and Δ copies in flight during this tile's products; a warp vote skips a tile where no query
// attends).
template <typename M, int DP, int EP, int S = 1, typename T = typename M::In>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkdv_reg_kernel(AttnArgs<T, float> a, BwdArgs<T, float> g) {
  static_assert(S == 1 || S == 2, "one or two stages");
  static_assert(kRegQueries == 32, "the vote reads one query per lane");
  constexpr int KD = DP / M::K, KE = EP / M::K, NQ = kRegQueries / 8, ND = DP / 8,
                NE = EP / 8;
  const int nsplit = key_splits(a, g, kRegRows);
  REGHARM_DYNAMIC_SMEM(raw);
  const RegDkdvSmem<T> sm(raw, DP, EP, S);
  T* const sk = sm.held_d;  // K and V of this block's keys; Q and dO stream through stream_*
  T* const sv = sm.held_e;
  const int ldk = sm.ldd, lde = sm.lde;
  const int64_t b = blockIdx.z;
  const int split = blockIdx.y;
  const int64_t k0 = int64_t(blockIdx.x) * kRegRows;
  const int64_t nk = key_span(a, b);
  // past the kept keys of the key order (attn_bwd_reduce_kernel writes their zeros), or a
  // split the kept keys' blocks do not need
  if (k0 >= nk || split >= nsplit) return;
  const int keys = int(min(int64_t(kRegRows), nk - k0));
  const int tid = threadIdx.x, warp = tid >> 5, gr = M::Lanes::g(), t = M::Lanes::t();

  float dk[ND][4] = {}, dv[NE][4] = {};
  // K and V in flight over the bias's round trips; the first query tile's wait and barrier
  // publish them
  load_key_tile(a, sk, ldk, a.k + b * a.ks.b, a.ks.r, b, k0, keys, kRegRows, a.D, DP, a.vec_k);
  load_key_tile(a, sv, lde, a.v + b * a.vs.b, a.vs.r, b, k0, keys, kRegRows, a.E, EP, a.vec_v);
  if (load_bias_tile(sm.bias, a.bias + b * a.N, k0, keys, kRegRows, key_rows(a, b, k0))) {
    const float bk0 = sm.bias[warp * 16 + gr], bk1 = sm.bias[warp * 16 + gr + 8];
    const T* kw = sk + warp * 16 * ldk;
    const T* vw = sv + warp * 16 * lde;
    const int64_t span = a.qorder ? int64_t(a.qcount[b]) : a.L;  // positions that may attend
    // 32-bit tile counters (L / 32 < 2^31 here): float32 at DP = EP = 128 is at 255 registers
    const int qtiles = int((span + kRegQueries - 1) / kRegQueries);
    const T* q_img = a.q + b * a.qs.b;
    const T* do_img = g.dout + b * g.dos.b;
    // the products of one query tile (Q, dO, lse and Δ published), with the atomic dQ's barrier
    auto attend = [&](const T* sq, const T* sdo, const float* lse_s, const float* delta_s,
                      int64_t q0, int rows) {
      float st[NQ][4] = {}, dpt[NQ][4] = {};
      mma_abt<M, KD>(st, kw, ldk, sq, ldk);     // Sᵀ = K Qᵀ
      mma_abt<M, KE>(dpt, vw, lde, sdo, lde);   // dPᵀ = V dOᵀ
#pragma unroll
      for (int j = 0; j < NQ; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int qi = j * 8 + 2 * t + (c & 1);
          const float ls = lse_s[qi], bk = c < 2 ? bk0 : bk1;  // key rows gr, gr + 8
          const float p = (ls > -INFINITY && bk > -INFINITY)
                              ? fast_exp(st[j][c] * a.scale + bk - ls)
                              : 0.0f;
          st[j][c] = p;                                // Pᵀ
          dpt[j][c] = p * (dpt[j][c] - delta_s[qi]);   // dSᵀ
          if (g.dq_acc)  // dS[query qi][key], for the dQ product of all 64 keys below
            sm.ds[qi * sm.ldds + warp * 16 + gr + 8 * (c >> 1)] = from_acc<T>(dpt[j][c]);
        }
      mma_pm<M>(dv, st, sdo, lde);   // dV += Pᵀ dO
      mma_pm<M>(dk, dpt, sq, ldk);   // dK += dSᵀ Q
      if (g.dq_acc) {
        __syncthreads();  // every warp's dS is in shared memory
        add_dq_atomic<M, DP>(a, g, sm.ds, sm.ldds, sk, ldk, lse_s, b, q0, rows);
      }
    };
    auto tile_rows = [&](int qt) {
      return int(min(int64_t(kRegQueries), span - int64_t(qt) * kRegQueries));
    };
    if constexpr (S == 1) {
      for (int qt = split; qt < qtiles; qt += nsplit) {
        const int64_t q0 = int64_t(qt) * kRegQueries;
        const int rows = tile_rows(qt);
        // Q and dO in flight over lse's and delta's round trips; the previous tile ended with
        // a barrier, so q, dout, lse and delta are free
        load_query_tile(a, sm.stream_d, ldk, q_img, a.qs.r, b, q0, rows, a.D, DP, a.vec_q);
        load_query_tile(a, sm.stream_e, lde, do_img, g.dos.r, b, q0, rows, a.E, EP, g.vec_do);
        const bool attends = load_query_rows(a, g, sm.lse, sm.delta, b, q0, rows);
        cp_async_wait_all();
        if (!attends) continue;  // nobody reads this tile
        __syncthreads();
        attend(sm.stream_d, sm.stream_e, sm.lse, sm.delta, q0, rows);
        __syncthreads();  // done with q, dout, lse, delta and ds before the next tile's loads
      }
    } else {
      auto q_at = [&](int s) { return sm.stream_d + s * kRegQueries * ldk; };
      auto do_at = [&](int s) { return sm.stream_e + s * kRegQueries * lde; };
      auto issue = [&](int qt, int s) {
        const int64_t q0 = int64_t(qt) * kRegQueries;
        const int rows = tile_rows(qt);
        load_query_tile(a, q_at(s), ldk, q_img, a.qs.r, b, q0, rows, a.D, DP, a.vec_q);
        load_query_tile(a, do_at(s), lde, do_img, g.dos.r, b, q0, rows, a.E, EP, g.vec_do);
        load_query_rows_async(a, g, sm.lse + s * kRegQueries, sm.delta + s * kRegQueries, b,
                              q0, rows);
      };
      if (split < qtiles) issue(split, 0);
      const int lane = tid & 31;
      int s = 0;
      for (int qt = split; qt < qtiles; qt += nsplit, s ^= 1) {
        float* lse_s = sm.lse + s * kRegQueries;
        float* delta_s = sm.delta + s * kRegQueries;
        cp_async_wait_all();  // this thread's copies of tile qt (and, the first time, K and V)
        __syncthreads();  // tile qt published; every warp done with the other stage and ds
        if (qt + nsplit < qtiles) issue(qt + nsplit, s ^ 1);
        // every warp votes alike: no barrier needed to skip a tile where no query attends
        if (!__ballot_sync(0xffffffffu, lse_s[lane] > -INFINITY)) continue;
        attend(q_at(s), do_at(s), lse_s, delta_s, int64_t(qt) * kRegQueries, tile_rows(qt));
      }
    }
  }
  cp_async_wait_all();  // K and V where no query tile waited for them: none left in flight
  float* dk_p = g.dk_part + ((split * a.B + b) * a.N + k0) * a.D;
  float* dv_p = g.dv_part + ((split * a.B + b) * a.N + k0) * a.E;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + gr + 8 * h;
    if (r >= keys) continue;
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = M::out_col(n, t, c);
        if (col < a.D) dk_p[int64_t(r) * a.D + col] = dk[n][2 * h + c] * a.scale;
      }
#pragma unroll
    for (int n = 0; n < NE; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = M::out_col(n, t, c);
        if (col < a.E) dv_p[int64_t(r) * a.E + col] = dv[n][2 * h + c];
      }
  }
}

// ---- the kernel sets (each attention_registers_*.cu instantiates its dtype's) ---------------

// With 16-bit inputs the three kernels of both stage counts (stream_key_tiles, and the dK/dV
// kernel's query tiles):
// float32 tiles are twice the bytes, and a second stage would cost its blocks per SM.
template <typename M, int DP, int EP, typename T = typename M::In>
RegKernelSet<T> reg_set() {
  RegKernelSet<T> r{attn_fwd_reg_kernel<M, DP, EP, 1>, attn_bwd_dq_reg_kernel<M, DP, EP, 1>,
                    attn_bwd_dkdv_reg_kernel<M, DP, EP, 1>,
                    RegFwdSmem<T>(nullptr, DP, EP, 1).bytes,
                    RegDqSmem<T>(nullptr, DP, EP, 1).bytes,
                    RegDkdvSmem<T>(nullptr, DP, EP, 1).bytes};
  if constexpr (sizeof(T) == 2) {
    r.fwd2 = attn_fwd_reg_kernel<M, DP, EP, 2>;
    r.dq2 = attn_bwd_dq_reg_kernel<M, DP, EP, 2>;
    r.dkdv2 = attn_bwd_dkdv_reg_kernel<M, DP, EP, 2>;
    r.fwd2_smem = RegFwdSmem<T>(nullptr, DP, EP, 2).bytes;
    r.dq2_smem = RegDqSmem<T>(nullptr, DP, EP, 2).bytes;
    r.dkdv2_smem = RegDkdvSmem<T>(nullptr, DP, EP, 2).bytes;
  }
  return r;
}

template <typename M, int DP>
RegKernelSet<typename M::In> reg_set_e(int EP) {
  return EP == 64 ? reg_set<M, DP, 64>() : reg_set<M, DP, 128>();
}

template <typename M>
RegKernelSet<typename M::In> reg_set_de(const AttnShape& s) {
  const int DP = reg_dim(s.D), EP = reg_dim(s.E);
  return DP == 64 ? reg_set_e<M, 64>(EP) : reg_set_e<M, 128>(EP);
}

}  // namespace
}  // namespace cuda
}  // namespace regharm

// reg_kernels<T> of a 16-bit T, on tensor cores: the whole of attention_registers_{f16,bf16}.cu.
#define REGHARM_TENSOR_CORE_REG_KERNELS(T)                                   \
  namespace regharm {                                                        \
  namespace cuda {                                                           \
  template <>                                                                \
  RegKernelSet<T> reg_kernels<T>(const AttnShape& s) {                       \
    return reg_set_de<TensorCores<T>>(s);                                    \
  }                                                                          \
  }                                                                          \
  }
