// What both families of attention kernels share (masked_attention_kernels.cu: tiles in shared
// memory, products through block_mm; attention_registers.cuh: tiles in registers): the kernel
// arguments (one type for every translation unit: masked_attention_kernels.cu launches the
// register kernels compiled in attention_registers_*.cu), the query order, and the loads of a
// tile's key bias and of the backward's per-query rows (internal linkage: a copy per unit).
#pragma once

#include <cmath>

#include "device_utils.cuh"

namespace regharm {
namespace cuda {

constexpr int kThreads = 128;  // 4 warps

template <typename T, typename A>
struct AttnArgs {
  const T* q;
  RowStrides qs;
  const T* k;
  RowStrides ks;
  const T* v;
  RowStrides vs;
  const A* bias;        // (B, N)
  const bool* qmask;    // (B, L) or null
  const int* qorder;    // (B, L) with qmask: the queries, active ones first (attn_order_kernel)
  const int* qcount;    // (B) with qmask: active queries per image
  int64_t B, L, N;
  int D, E, Dp, Ep;     // Dp, Ep: D, E rounded up to a multiple of 16 (at least 16)
  int BM, BN, EC;       // queries and keys per tile; value columns per forward block
  A scale;
  bool vec_q, vec_k, vec_v;
  bool tc;              // float32 products on tensor cores (3xTF32); shapes the smem pitches
  // The register forward's key splits (gridDim.y > 1): per (image, query tile) an arrival
  // count, then per (image, query tile) a ready flag, zeroed before the launch; else null.
  int* fwd_sync;
  // Last, so that the fields above keep their parameter offsets (the float32 dK/dV kernel is
  // at ptxas's 255 registers, and moving them made it spill).
  const int* korder;    // (B, N) or null: the keys, kept ones first (register kernels, key_order)
  const int* kcount;    // (B) with korder: kept keys per image
};

template <typename T, typename A>
struct BwdArgs {
  const T* dout;
  RowStrides dos;
  bool vec_do;
  const T* out;
  RowStrides os;
  const A* lse;         // (B, L): the forward's, or for float64 recomputed exactly
  A* delta;             // (B, L)
  A* dk_part;           // (nsplit, B, N, D), scaled
  A* dv_part;           // (nsplit, B, N, E)
  int nsplit;           // query splits of the key-tile kernel: what the partials hold
  // with a key order: blocks in one wave of the key-tile kernel (key_splits), else 0. An int
  // beside nsplit, in the padding before the next pointer: the struct keeps its size and its
  // fields their parameter offsets (the float32 dK/dV kernel is at ptxas's 255 registers, and
  // an 8-byte field at the end made it spill)
  int wave;
  float* dq_acc;        // (B, L, D) zeroed, or null: where the dK/dV kernel adds dQ (dq_atomic)
  T* dq;
  T* dk;
  T* dv;
};

namespace {

// Query tiles cover positions p of the query order of image b: query query_at(p), active when
// active_at(p). Without an order (no mask) positions are queries.
template <typename T, typename A>
__device__ __forceinline__ int64_t query_at(const AttnArgs<T, A>& a, int64_t b, int64_t p) {
  return a.qorder ? int64_t(a.qorder[b * a.L + p]) : p;
}
template <typename T, typename A>
__device__ __forceinline__ bool active_at(const AttnArgs<T, A>& a, int64_t b, int64_t p) {
  return a.qorder ? p < a.qcount[b] : (a.qmask == nullptr || a.qmask[b * a.L + p]);
}

// Loads rows_valid rows of a (rows, cols) image (row stride rs) into a `rows`-row tile: the
// rows order[0 ..) of an order (its entries from the tile's first position p0), or without one
// the rows p0, p0 + 1, ... Like load_tile_async, this and the two below only issue their
// copies: cp_async_wait_all() and a barrier come before the tile is read.
template <typename T>
__device__ __forceinline__ void load_ordered_tile(T* dst, int ld, const T* img, int64_t rs,
                                                  const int* order, int64_t p0, int rows_valid,
                                                  int rows, int cols_valid, int cols, bool vec) {
  if (order)
    load_tile_async(dst, ld, img, rs, rows_valid, rows, cols_valid, cols, vec, order);
  else
    load_tile_async(dst, ld, img + p0 * rs, rs, rows_valid, rows, cols_valid, cols, vec);
}

// Loads rows_valid rows of a (B, L, cols) tensor (image b, row stride rs) from position q0 of
// the query order into a BM-row tile.
template <typename T, typename A>
__device__ __forceinline__ void load_query_tile(const AttnArgs<T, A>& a, T* dst, int ld,
                                                const T* img, int64_t rs, int64_t b, int64_t q0,
                                                int rows_valid, int cols_valid, int cols,
                                                bool vec) {
  load_ordered_tile(dst, ld, img, rs, a.qorder ? a.qorder + b * a.L + q0 : nullptr, q0,
                    rows_valid, a.BM, cols_valid, cols, vec);
}

// Key tiles cover positions p of the key order of image b, and only positions below
// key_span(b) may hold a kept key; without an order (a.korder null) positions are keys.
template <typename T, typename A>
__device__ __forceinline__ int64_t key_span(const AttnArgs<T, A>& a, int64_t b) {
  return a.korder ? int64_t(a.kcount[b]) : a.N;
}
// The keys at positions [k0, ...) of image b, or null for positions that are keys.
template <typename T, typename A>
__device__ __forceinline__ const int* key_rows(const AttnArgs<T, A>& a, int64_t b, int64_t k0) {
  return a.korder ? a.korder + b * a.N + k0 : nullptr;
}

// Loads rows_valid rows of a (B, N, cols) tensor (image b, row stride rs) from position k0 of
// the key order into a `rows`-row tile.
template <typename T, typename A>
__device__ __forceinline__ void load_key_tile(const AttnArgs<T, A>& a, T* dst, int ld,
                                              const T* img, int64_t rs, int64_t b, int64_t k0,
                                              int rows_valid, int rows, int cols_valid, int cols,
                                              bool vec) {
  load_ordered_tile(dst, ld, img, rs, key_rows(a, b, k0), k0, rows_valid, rows, cols_valid, cols,
                    vec);
}

template <typename A> __device__ __forceinline__ A acc_log(A v) { return log(v); }
template <> __device__ __forceinline__ float acc_log<float>(float v) { return __logf(v); }

// Loads key_bias of keys [k0, k0 + BN) (-inf past N), or of the keys rows[0 .. keys) of the
// key order; true when any key of the tile is kept. Contains the barrier that ends the previous
// use of the tile's shared memory.
template <typename A>
__device__ __forceinline__ bool load_bias_tile(A* dst, const A* bias_row, int64_t k0, int keys,
                                               int BN, const int* rows = nullptr) {
  int alive = 0;
  for (int c = threadIdx.x; c < BN; c += blockDim.x) {
    const A bv = c < keys ? bias_row[rows ? int64_t(rows[c]) : k0 + c] : neg_inf<A>();
    dst[c] = bv;
    alive |= bv > neg_inf<A>();
  }
  return __syncthreads_or(alive) != 0;
}

// load_bias_tile's copies only (cp.async, 4 bytes each), no vote and no barrier: for a tile
// loaded while the previous one is in use, whose wait and barrier come before it is read.
template <typename A>
__device__ __forceinline__ void load_bias_tile_async(A* dst, const A* bias_row, int64_t k0,
                                                     int keys, int BN, const int* rows) {
  static_assert(sizeof(A) == 4, "4-byte copies");
  for (int c = threadIdx.x; c < BN; c += blockDim.x) {
    if (c < keys)
      cp_async4(dst + c, bias_row + (rows ? int64_t(rows[c]) : k0 + c));
    else
      dst[c] = neg_inf<A>();
  }
}

// The key-tile kernel's query splits, the same in every block and in the reduction: g.nsplit,
// or with a key order (its counts a.kcount) as many as one wave (g.wave) holds for the key
// blocks that keep a key, at most g.nsplit: the host cannot know the kept counts, and with
// fewer key blocks busy each takes fewer query tiles instead of leaving its share of the wave
// idle.
template <typename T, typename A>
__device__ __forceinline__ int key_splits(const AttnArgs<T, A>& a, const BwdArgs<T, A>& g,
                                          int BN) {
  if (a.kcount == nullptr || g.wave == 0) return g.nsplit;
  int64_t blocks = 0;
  for (int64_t b = 0; b < a.B; ++b) blocks += (a.kcount[b] + BN - 1) / BN;
  if (blocks == 0) return 1;
  return int(max(int64_t(1), min(int64_t(g.nsplit), int64_t(g.wave) / blocks)));
}

// Loads lse and Δ of the queries at positions [q0, q0 + BM) into shared memory; rows that
// attend nothing get lse = -inf (their P is 0). True when any row attends. Contains a barrier.
template <typename T, typename A>
__device__ __forceinline__ bool load_query_rows(const AttnArgs<T, A>& a, const BwdArgs<T, A>& g,
                                                A* lse_s, A* delta_s, int64_t b, int64_t q0,
                                                int rows) {
  int any = 0;
  for (int r = threadIdx.x; r < a.BM; r += blockDim.x) {
    A ls = neg_inf<A>(), dl = A(0);
    if (r < rows && active_at(a, b, q0 + r)) {
      const int64_t row = b * a.L + query_at(a, b, q0 + r);
      ls = A(g.lse[row]);
      dl = g.delta[row];
    }
    const int act = ls > neg_inf<A>();
    lse_s[r] = act ? ls : neg_inf<A>();
    delta_s[r] = act ? dl : A(0);
    any |= act;
  }
  return __syncthreads_or(any) != 0;
}

// load_query_rows' copies only (cp.async, 4 bytes each: lse and Δ of the rows that may attend;
// the others get -inf and 0 stored), no vote and no barrier: for a query tile loaded while the
// previous one is in use. A copied lse that is not above -inf stays as it is: Δ is 0 there
// (attn_delta_kernel) and the products take P = 0 for it, as for load_query_rows' -inf.
template <typename T, typename A>
__device__ __forceinline__ void load_query_rows_async(const AttnArgs<T, A>& a,
                                                      const BwdArgs<T, A>& g, A* lse_s,
                                                      A* delta_s, int64_t b, int64_t q0,
                                                      int rows) {
  static_assert(sizeof(A) == 4, "4-byte copies");
  for (int r = threadIdx.x; r < a.BM; r += blockDim.x) {
    if (r < rows && active_at(a, b, q0 + r)) {
      const int64_t row = b * a.L + query_at(a, b, q0 + r);
      cp_async4(lse_s + r, g.lse + row);
      cp_async4(delta_s + r, g.delta + row);
    } else {
      lse_s[r] = neg_inf<A>();
      delta_s[r] = A(0);
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace regharm
