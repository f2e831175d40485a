// CUDA kernels of regharm::masked_norm and its backward: PTL's foreground content, a masked
// instance norm written as (B, H*W, C) tokens (regharm_ext/ops/norm_composite.py).
//
// Forward: a block per (image, channel) row sums over the contiguous row twice (the mean, then
// the centred variance: exact for inputs offset by +100), and a tile kernel writes the tokens,
// transposing 32 x 32 tiles through shared memory so that both the read of x and the write of
// y are coalesced. Backward: a block per row sums Σg and Σg·y (g read down a column of the
// tokens: strided, but the blocks of neighbouring channels run together and share the sectors in
// L2), and the tile kernel writes dx in x's layout. No atomics: results are deterministic.
#include <cmath>

#include "device_utils.cuh"

namespace regharm {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kTile = 32, kTileRows = 8;  // 32 x 32 tiles, 32 x 8 threads

// mu and rstd of one (image, channel) row; w: the image's weights (acc).
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    norm_stats_kernel(const T* __restrict__ x, const A* __restrict__ w, int64_t C, int64_t HW,
                      A eps, A* __restrict__ mu, A* __restrict__ rstd) {
  __shared__ A scratch[32];
  const int64_t bc = blockIdx.x;
  const T* xr = x + bc * HW;
  const A* wr = w + (bc / C) * HW;
  A mass = 0, s1 = 0;
  for (int64_t l = threadIdx.x; l < HW; l += blockDim.x) {
    const A wl = wr[l];
    mass += wl;
    s1 += wl * to_acc<A>(xr[l]);
  }
  mass = block_sum(mass, scratch);
  s1 = block_sum(s1, scratch);
  const A inv = mass > A(0) ? A(1) / mass : A(0);  // no weight: mu = var = 0
  const A m = s1 * inv;
  A s2 = 0;
  for (int64_t l = threadIdx.x; l < HW; l += blockDim.x) {
    const A d = to_acc<A>(xr[l]) - m;
    s2 += wr[l] * d * d;
  }
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

// Σg and Σg·y of one (image, channel) row into sums[2 bc], sums[2 bc + 1]; the channel-0 block
// of each image also writes 1 / Σw (0 without weight) to inv_mass[b].
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    norm_grad_sums_kernel(const T* __restrict__ g, const T* __restrict__ x,
                          const A* __restrict__ w, const A* __restrict__ mu,
                          const A* __restrict__ rstd, int64_t C, int64_t HW,
                          A* __restrict__ sums, A* __restrict__ inv_mass) {
  __shared__ A scratch[32];
  const int64_t bc = blockIdx.x, b = bc / C, c = bc % C;
  const T* xr = x + bc * HW;
  const T* gc = g + b * HW * C + c;
  const A m = mu[bc], r = rstd[bc];
  A sg = 0, sgy = 0;
  for (int64_t l = threadIdx.x; l < HW; l += blockDim.x) {
    const A gl = to_acc<A>(gc[l * C]);
    sg += gl;
    sgy += gl * (to_acc<A>(xr[l]) - m) * r;
  }
  sg = block_sum(sg, scratch);
  sgy = block_sum(sgy, scratch);
  if (threadIdx.x == 0) {
    sums[2 * bc] = sg;
    sums[2 * bc + 1] = sgy;
  }
  if (c == 0) {  // uniform per block
    A mass = 0;
    for (int64_t l = threadIdx.x; l < HW; l += blockDim.x) mass += w[b * HW + l];
    mass = block_sum(mass, scratch);
    if (threadIdx.x == 0) inv_mass[b] = mass > A(0) ? A(1) / mass : A(0);
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

template <typename T>
size_t workspace_impl(const NormShape& s) {
  return size_t(2 * s.B * s.C + s.B) * sizeof(acc_t<T>);
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
  REGHARM_LAUNCH((norm_grad_sums_kernel<T, A>), dim3(unsigned(s.B * s.C)), dim3(kRowThreads), 0,
                 stream, gp, xp, wp, mp, rp, s.C, s.HW, sums, inv);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
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
