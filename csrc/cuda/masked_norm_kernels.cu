// CUDA kernels of regharm::masked_norm and its backward: PTL's foreground content, a masked
// instance norm written as (B, H*W, C) tokens (regharm_ext/ops/norm_composite.py).
//
// Forward: a block per (image, channel) row sums over the contiguous row twice (the mean, then
// the centred variance: exact for inputs offset by +100), and a tile kernel writes the tokens,
// transposing 32 x 32 tiles through shared memory so that both the read of x and the write of
// y are coalesced. Backward: Σg and Σg·y per row from 32 x 32 tiles of g and x (both read
// coalesced) in partial sums over chunks of positions, added up in a fixed order by a small
// kernel, then the tile kernel writes dx in x's layout. No atomics: results are deterministic.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "device_utils.cuh"

namespace regharm {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kRowBatch = 4;  // positions per thread loaded together (norm_stats_kernel)
constexpr int kTile = 32, kTileRows = 8;  // 32 x 32 tiles, 32 x 8 threads

// add(w, x - shift) for each of this thread's positions of a row (x, w of HW positions), in
// order, kRowBatch at a time with all their loads issued before the first is used (a plain
// loop, even unrolled, waited for each position's loads before issuing the next: a global
// round trip per position of the thread's share, 64 at PTL's 128²). Positions past HW add
// (0, 0).
template <typename T, typename A, typename Add>
__device__ __forceinline__ void sweep_row(const T* xr, const A* wr, int64_t HW, A shift,
                                          Add&& add) {
  for (int64_t l0 = threadIdx.x; l0 < HW; l0 += kRowBatch * blockDim.x) {
    A wv[kRowBatch], xv[kRowBatch];
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) {
      const int64_t l = l0 + u * int64_t(blockDim.x);
      wv[u] = l < HW ? wr[l] : A(0);
      xv[u] = l < HW ? to_acc<A>(xr[l]) - shift : A(0);
    }
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) add(wv[u], xv[u]);
  }
}

// mu and rstd of one (image, channel) row; w: the image's weights (acc).
// 1 / Σ weight, 0 without weight (w_n = 0: mu = var = 0); a subnormal Σ counts as the smallest
// normal number, as the composite's clamp_min(tiny) does (1 / 1e-40 is inf in float32, and inf
// times a zero weight NaN)
template <typename A>
__device__ __forceinline__ A inverse_mass(A mass) {
  const A tiny = sizeof(A) == 8 ? A(DBL_MIN) : A(FLT_MIN);
  return mass > A(0) ? A(1) / (mass > tiny ? mass : tiny) : A(0);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    norm_stats_kernel(const T* __restrict__ x, const A* __restrict__ w, int64_t C, int64_t HW,
                      A eps, A* __restrict__ mu, A* __restrict__ rstd) {
  __shared__ A scratch[32];
  const int64_t bc = blockIdx.x;
  const T* xr = x + bc * HW;
  const A* wr = w + (bc / C) * HW;
  A mass = 0, s1 = 0;
  sweep_row<T>(xr, wr, HW, A(0), [&](A wv, A xv) {
    mass += wv;
    s1 += wv * xv;
  });
  mass = block_sum(mass, scratch);
  s1 = block_sum(s1, scratch);
  const A inv = inverse_mass(mass);
  const A m = s1 * inv;
  A s2 = 0;
  sweep_row<T>(xr, wr, HW, m, [&](A wv, A dv) { s2 += wv * dv * dv; });
  s2 = block_sum(s2, scratch);
  if (threadIdx.x == 0) {
    mu[bc] = m;
    rstd[bc] = A(1) / sqrt(s2 * inv + eps);
  }
}

// y[b, l, c] = (x[b, c, l] - mu) · rstd for a 32 x 32 tile of (channels, positions).
template <typename T, typename A>
__global__ void __launch_bounds__(kTile * kTileRows)
    norm_tokens_kernel(const T* __restrict__ x, const A* __restrict__ mu,
                       const A* __restrict__ rstd, int64_t C, int64_t HW, T* __restrict__ y) {
  __shared__ A tile[kTile][kTile + 1];  // +1: a column walk hits 32 banks
  const int64_t b = blockIdx.z, l0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int r = ty; r < kTile; r += kTileRows) {  // tile rows: channels, lanes: positions
    const int64_t c = c0 + r, l = l0 + tx;
    if (c < C && l < HW) {
      const int64_t bc = b * C + c;
      tile[r][tx] = (to_acc<A>(x[bc * HW + l]) - mu[bc]) * rstd[bc];
    }
  }
  __syncthreads();
  for (int r = ty; r < kTile; r += kTileRows) {  // tile rows: positions, lanes: channels
    const int64_t l = l0 + r, c = c0 + tx;
    if (l < HW && c < C) y[(b * HW + l) * C + c] = from_acc<T, A>(tile[tx][r]);
  }
}

// Partial Σg and Σg·y over the positions [chunk · span, + span) of 32 channels of one image,
// into part[chunk][2 (b C + c)], [.. + 1]; the blocks of channel tile 0 also sum the weights into
// part[chunk][2 B C + b]. g (tokens, channels fastest) and x (positions fastest) are both read
// by coalesced 32 x 32 tiles through shared memory. Run 2 (H100) measured the row-per-block
// version at 64 µs at PTL's setting: each block read its channel's column of g, 4 bytes of every
// 32-byte sector.
template <typename T, typename A>
__global__ void __launch_bounds__(kTile * kTileRows)
    norm_grad_partial_kernel(const T* __restrict__ g, const T* __restrict__ x,
                             const A* __restrict__ w, const A* __restrict__ mu,
                             const A* __restrict__ rstd, int64_t C, int64_t HW, int64_t span,
                             A* __restrict__ part) {
  __shared__ A gt[kTile][kTile + 1];  // [position][channel]
  __shared__ A xt[kTile][kTile + 1];  // [channel][position]
  __shared__ A red[3][kTileRows][kTile];
  const int64_t b = blockIdx.z, c0 = int64_t(blockIdx.y) * kTile, chunk = blockIdx.x;
  const int64_t l_begin = chunk * span, l_end = min(HW, l_begin + span);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c_mine = c0 + tx;  // the channel this thread sums
  const A m = c_mine < C ? mu[b * C + c_mine] : A(0);
  const A r = c_mine < C ? rstd[b * C + c_mine] : A(0);
  const bool weights = blockIdx.y == 0;  // uniform per block
  const int channels = C - c0 < kTile ? int(C - c0) : kTile;
  const T* g_b = g + (b * HW + l_begin) * C + c0;  // g[b, l_begin, c0]
  const T* x_b = x + (b * C + c0) * HW + l_begin;  // x[b, c0, l_begin]
  const A* w_b = w + b * HW + l_begin;
  const int len = int(l_end - l_begin);  // span <= HW / 256 + 32 fits an int
  A sg = 0, sgy = 0, mass = 0;
  for (int l0 = 0; l0 < len; l0 += kTile) {
    const int valid = min(kTile, len - l0);
    for (int i = ty; i < kTile; i += kTileRows) {  // g: rows positions, lanes channels
      gt[i][tx] = (i < valid && tx < channels) ? to_acc<A>(g_b[int64_t(l0 + i) * C + tx]) : A(0);
      // x: rows channels, lanes positions
      xt[i][tx] = (i < channels && tx < valid) ? to_acc<A>(x_b[int64_t(i) * HW + l0 + tx]) : A(0);
    }
    if (weights && ty == 0 && tx < valid) mass += w_b[l0 + tx];
    __syncthreads();
    for (int i = ty; i < valid; i += kTileRows) {
      const A gl = gt[i][tx];
      sg += gl;
      sgy += gl * (xt[tx][i] - m) * r;
    }
    __syncthreads();  // the tiles are rewritten next
  }
  red[0][ty][tx] = sg;
  red[1][ty][tx] = sgy;
  red[2][ty][tx] = mass;
  __syncthreads();
  if (ty == 0) {  // a fixed order: deterministic
    A a0 = 0, a1 = 0;
    for (int j = 0; j < kTileRows; ++j) a0 += red[0][j][tx], a1 += red[1][j][tx];
    A* p = part + chunk * (2 * gridDim.z * C + gridDim.z);
    if (c_mine < C) {
      p[2 * (b * C + c_mine)] = a0;
      p[2 * (b * C + c_mine) + 1] = a1;
    }
    if (weights && tx == 0) {
      A s = 0;
      for (int j = 0; j < kTile; ++j) s += red[2][0][j];
      p[2 * gridDim.z * C + b] = s;
    }
  }
}

// sums[i] = Σ_chunk part[chunk][i] for the 2 B C sums; inv_mass[b] = 1 / Σ_chunk (mass), or 0
// without weight.
template <typename A>
__global__ void __launch_bounds__(kRowThreads)
    norm_grad_finish_kernel(const A* __restrict__ part, int64_t chunks, int64_t B, int64_t C,
                            A* __restrict__ sums, A* __restrict__ inv_mass) {
  const int64_t n = 2 * B * C + B;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int64_t k = 0; k < chunks; ++k) s += part[k * n + i];
    if (i < 2 * B * C) sums[i] = s;
    else inv_mass[i - 2 * B * C] = inverse_mass(s);
  }
}

// dx[b, c, l] = rstd · (g[b, l, c] - w_n · (Σg + y · Σg·y)) for a 32 x 32 tile.
template <typename T, typename A>
__global__ void __launch_bounds__(kTile * kTileRows)
    norm_dx_kernel(const T* __restrict__ g, const T* __restrict__ x, const A* __restrict__ w,
                   const A* __restrict__ mu, const A* __restrict__ rstd,
                   const A* __restrict__ sums, const A* __restrict__ inv_mass, int64_t C,
                   int64_t HW, T* __restrict__ dx) {
  __shared__ A tile[kTile][kTile + 1];
  const int64_t b = blockIdx.z, l0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int r = ty; r < kTile; r += kTileRows) {  // tile rows: positions, lanes: channels
    const int64_t l = l0 + r, c = c0 + tx;
    if (l < HW && c < C) tile[r][tx] = to_acc<A>(g[(b * HW + l) * C + c]);
  }
  __syncthreads();
  const A inv = inv_mass[b];
  for (int r = ty; r < kTile; r += kTileRows) {  // tile rows: channels, lanes: positions
    const int64_t c = c0 + r, l = l0 + tx;
    if (c < C && l < HW) {
      const int64_t bc = b * C + c;
      const A rs = rstd[bc];
      const A y = (to_acc<A>(x[bc * HW + l]) - mu[bc]) * rs;
      const A wn = w[b * HW + l] * inv;
      dx[bc * HW + l] = from_acc<T, A>(rs * (tile[tx][r] - wn * (sums[2 * bc] + y * sums[2 * bc + 1])));
    }
  }
}

inline dim3 tile_grid(const NormShape& s) {
  return dim3(unsigned((s.HW + kTile - 1) / kTile), unsigned((s.C + kTile - 1) / kTile),
              unsigned(s.B));
}

inline bool empty(const NormShape& s) { return s.B == 0 || s.C == 0 || s.HW == 0; }

template <typename T>
cudaError_t forward_impl(const void* x, const void* weight, const NormShape& s, double eps,
                         void* y, void* mu, void* rstd, cudaStream_t stream) {
  using A = acc_t<T>;
  if (empty(s)) return cudaSuccess;
  const T* xp = static_cast<const T*>(x);
  A *mp = static_cast<A*>(mu), *rp = static_cast<A*>(rstd);
  REGHARM_LAUNCH((norm_stats_kernel<T, A>), dim3(unsigned(s.B * s.C)), dim3(kRowThreads), 0,
                 stream, xp, static_cast<const A*>(weight), s.C, s.HW, A(eps), mp, rp);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  REGHARM_LAUNCH((norm_tokens_kernel<T, A>), tile_grid(s), dim3(kTile, kTileRows), 0, stream, xp,
                 mp, rp, s.C, s.HW, static_cast<T*>(y));
  return cudaGetLastError();
}

// Positions per block of norm_grad_partial_kernel: 256 (8 tiles; PTL's 128² in 64 chunks, 512
// blocks), more on maps so large that the partial sums would outgrow 256 chunks.
inline int64_t grad_span(const NormShape& s) {
  const int64_t span = std::max<int64_t>(8 * kTile, (s.HW + 255) / 256);
  return (span + kTile - 1) / kTile * kTile;
}
inline int64_t grad_chunks(const NormShape& s) {
  return std::max<int64_t>(1, (s.HW + grad_span(s) - 1) / grad_span(s));
}

// The sums (2 B C) and 1 / Σ weight (B), then the chunks' partial sums of both.
template <typename T>
size_t workspace_impl(const NormShape& s) {
  return size_t((2 * s.B * s.C + s.B) * (1 + grad_chunks(s))) * sizeof(acc_t<T>);
}

template <typename T>
cudaError_t backward_impl(const void* grad, const void* x, const void* weight, const void* mu,
                          const void* rstd, const NormShape& s, void* workspace, void* dx,
                          cudaStream_t stream) {
  using A = acc_t<T>;
  if (empty(s)) return cudaSuccess;
  const T *gp = static_cast<const T*>(grad), *xp = static_cast<const T*>(x);
  const A* wp = static_cast<const A*>(weight);
  const A *mp = static_cast<const A*>(mu), *rp = static_cast<const A*>(rstd);
  A* sums = static_cast<A*>(workspace);
  A* inv = sums + 2 * s.B * s.C;
  A* part = inv + s.B;
  const int64_t chunks = grad_chunks(s), n = 2 * s.B * s.C + s.B;
  REGHARM_LAUNCH((norm_grad_partial_kernel<T, A>),
                 dim3(unsigned(chunks), unsigned((s.C + kTile - 1) / kTile), unsigned(s.B)),
                 dim3(kTile, kTileRows), 0, stream, gp, xp, wp, mp, rp, s.C, s.HW, grad_span(s),
                 part);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  REGHARM_LAUNCH((norm_grad_finish_kernel<A>),
                 dim3(unsigned(std::min<int64_t>((n + kRowThreads - 1) / kRowThreads, 1024))),
                 dim3(kRowThreads), 0, stream, part, chunks, s.B, s.C, sums, inv);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  REGHARM_LAUNCH((norm_dx_kernel<T, A>), tile_grid(s), dim3(kTile, kTileRows), 0, stream, gp, xp,
                 wp, mp, rp, sums, inv, s.C, s.HW, static_cast<T*>(dx));
  return cudaGetLastError();
}

}  // namespace

cudaError_t masked_norm_forward(DType dt, const void* x, const void* weight, const NormShape& s,
                                double eps, void* y, void* mu, void* rstd, cudaStream_t stream) {
  REGHARM_DISPATCH(dt, forward_impl, x, weight, s, eps, y, mu, rstd, stream)
  return cudaErrorInvalidValue;
}

size_t masked_norm_backward_workspace(DType dt, const NormShape& s) {
  REGHARM_DISPATCH(dt, workspace_impl, s)
  return 0;
}

cudaError_t masked_norm_backward(DType dt, const void* grad, const void* x, const void* weight,
                                 const void* mu, const void* rstd, const NormShape& s,
                                 void* workspace, void* dx, cudaStream_t stream) {
  REGHARM_DISPATCH(dt, backward_impl, grad, x, weight, mu, rstd, s, workspace, dx, stream)
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace regharm
