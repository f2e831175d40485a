// PTL's blend (SPEC §4 step 6) for the native node (csrc/ptl_node.cpp) on CUDA: between the
// attention's token layout (B, HW, C) and x's (B, C, H, W). torch's elementwise kernels ran
// these as strided ops that read one layout across the other (run 2's profile: 3 calls of a
// non-vectorized BinaryFunctor kernel, 52.7 µs, in PTL's top 8) and through full-size
// temporaries; here 32 x 32 tiles go through shared memory so both layouts are read and written
// coalesced, and each formula runs in one kernel.
//
// Each result is rounded as torch's ops round it (addcmul's output before lerp, mul's before the
// next mul, add_ and rsub before addcmul_), with the same operations in A (float, double for
// float64): the node's results stay those of the op-by-op formulas up to FMA contraction.
#include <algorithm>

#include "device_utils.cuh"

namespace regharm {
namespace cuda {
namespace {

constexpr int kTile = 32, kTileRows = 8;  // 32 x 32 tiles, 32 x 8 threads

__device__ __forceinline__ float mad(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mad(double a, double b, double c) { return fma(a, b, c); }

template <typename T, typename A>
__device__ __forceinline__ A rounded(A v) {  // v as a T holds it, back in A
  return to_acc<A>(from_acc<T, A>(v));
}

// torch.lerp(s, e, w) as ATen computes it (ATen/native/Lerp.h): from the nearer end
template <typename A>
__device__ __forceinline__ A lerp(A s, A e, A w) {
  const A d = e - s;
  return (w < A(0.5) && w > A(-0.5)) ? mad(w, d, s) : mad(-d, A(1) - w, e);
}

// out[b, c, p] = lerp(x[b, c, p], A[b, p, c] + C_f[b, p, c] · V[b, p, c], w[b, p]); tile rows:
// positions then channels
template <typename T, typename A>
__global__ void __launch_bounds__(kTile * kTileRows)
    blend_forward_kernel(const T* __restrict__ x, const T* __restrict__ av,
                         const T* __restrict__ c_f, const T* __restrict__ w, int64_t C,
                         int64_t HW, T* __restrict__ out) {
  __shared__ A tile[kTile][kTile + 1];  // [position][channel]
  const int64_t b = blockIdx.z, p0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int r = ty; r < kTile; r += kTileRows) {  // rows: positions, lanes: channels
    const int64_t p = p0 + r, c = c0 + tx;
    if (p < HW && c < C) {
      const int64_t row = b * HW + p;
      const A a = to_acc<A>(av[row * 2 * C + c]), v = to_acc<A>(av[row * 2 * C + C + c]);
      tile[r][tx] = rounded<T>(mad(to_acc<A>(c_f[row * C + c]), v, a));  // addcmul's output
    }
  }
  __syncthreads();
  for (int r = ty; r < kTile; r += kTileRows) {  // rows: channels, lanes: positions
    const int64_t c = c0 + r, p = p0 + tx;
    if (c < C && p < HW) {
      const int64_t i = (b * C + c) * HW + p;
      out[i] = from_acc<T, A>(lerp(to_acc<A>(x[i]), tile[tx][r], to_acc<A>(w[b * HW + p])));
    }
  }
}

// g[b, c, p] through its strides (p = h W + w)
template <typename T>
__device__ __forceinline__ T grad_at(const T* g, XStrides gs, int64_t W, int64_t b, int64_t c,
                                     int64_t p) {
  const int64_t h = p / W;
  return g[b * gs.b + c * gs.c + h * gs.h + (p - h * W) * gs.w];
}

// gav[b, p] = [g·w | (g·w)·C_f] with g[b, :, p] in the tokens' layout; tile rows: channels
// then positions
template <typename T, typename A>
__global__ void __launch_bounds__(kTile * kTileRows)
    blend_backward_kernel(const T* __restrict__ g, XStrides gs, int64_t W,
                          const T* __restrict__ w, const T* __restrict__ c_f, int64_t C,
                          int64_t HW, T* __restrict__ gav) {
  __shared__ A tile[kTile][kTile + 1];  // [channel][position]
  const int64_t b = blockIdx.z, p0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int r = ty; r < kTile; r += kTileRows) {  // rows: channels, lanes: positions
    const int64_t c = c0 + r, p = p0 + tx;
    if (c < C && p < HW) tile[r][tx] = to_acc<A>(grad_at(g, gs, W, b, c, p));
  }
  __syncthreads();
  for (int r = ty; r < kTile; r += kTileRows) {  // rows: positions, lanes: channels
    const int64_t p = p0 + r, c = c0 + tx;
    if (p < HW && c < C) {
      const int64_t row = b * HW + p;
      const T ga = from_acc<T, A>(tile[tx][r] * to_acc<A>(w[row]));
      gav[row * 2 * C + c] = ga;
      gav[row * 2 * C + C + c] = from_acc<T, A>(to_acc<A>(ga) * to_acc<A>(c_f[row * C + c]));
    }
  }
}

// gx = (gx + gxp) + g·(1 - w), in x's layout; a block row of positions per (image, channel)
// plane, planes strided by gridDim.y
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    grad_x_kernel(T* __restrict__ gx, const T* __restrict__ gxp, const T* __restrict__ g,
                  XStrides gs, int64_t W, const T* __restrict__ w, int64_t C, int64_t HW,
                  int64_t planes) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= HW) return;
  for (int64_t bc = blockIdx.y; bc < planes; bc += gridDim.y) {
    const int64_t b = bc / C, c = bc - b * C, i = bc * HW + p;
    const A s = rounded<T>(to_acc<A>(gx[i]) + to_acc<A>(gxp[i]));      // add_
    const A keep = rounded<T>(A(1) - to_acc<A>(w[b * HW + p]));        // rsub
    gx[i] = from_acc<T, A>(mad(to_acc<A>(grad_at(g, gs, W, b, c, p)), keep, s));  // addcmul_
  }
}

// The inputs of patch_stats and the attention that come from the mask: bg = 1 - m and the
// active queries m > 0 (torch's rsub and gt), m (B, HW).
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    mask_kernel(const T* __restrict__ m, int64_t n, T* __restrict__ bg, bool* __restrict__ active) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const A v = to_acc<A>(m[i]);
    bg[i] = from_acc<T, A>(A(1) - v);
    active[i] = v > A(0);
  }
}

// What the attention and the blend take from patch_stats (SPEC §4 step 4): key_bias (B, K) float,
// 0 for a patch with mass >= min_mass and sigma > 0, -inf otherwise; values (B, K, 2C) = [mu |
// sigma]; and the blend weight (B, HW), m for an image with a valid patch and 0 otherwise.
// min_mass as T holds it: torch compares a tensor with a Python float in the tensor's dtype.
// sigma is exactly 0 for a patch patch_stats found invalid on its float32 mass, which a 16-bit
// dtype may round up to min_mass. Blocks (blockIdx.x, image); each finds its image's "any valid"
// itself (K reads, from L2).
template <typename T, typename A>
__global__ void __launch_bounds__(256)
    keys_kernel(const T* __restrict__ mass, const T* __restrict__ mu, const T* __restrict__ sigma,
                const T* __restrict__ m, int64_t K, int64_t C, int64_t HW, A min_mass,
                float* __restrict__ key_bias, T* __restrict__ values, T* __restrict__ weight) {
  const int64_t b = blockIdx.y;
  const T* mass_b = mass + b * K;
  const T* sigma0_b = sigma + b * K * C;   // channel 0 of patch k at k * C
  auto valid = [&](int64_t k) {
    return to_acc<A>(mass_b[k]) >= min_mass && to_acc<A>(sigma0_b[k * C]) > A(0);
  };
  int found = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) found |= valid(k);
  const bool any = __syncthreads_or(found) != 0;
  const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t k = start; k < K; k += step) key_bias[b * K + k] = valid(k) ? 0.0f : -INFINITY;
  for (int64_t i = start; i < K * C; i += step) {
    const int64_t row = i / C, c = i - row * C;
    T* out = values + (b * K + row) * 2 * C + c;
    out[0] = mu[b * K * C + i];
    out[C] = sigma[b * K * C + i];
  }
  for (int64_t p = start; p < HW; p += step)
    weight[b * HW + p] = any ? m[b * HW + p] : from_acc<T, A>(A(0));
}

inline bool empty(const BlendShape& s) { return s.B == 0 || s.C == 0 || s.H * s.W == 0; }

inline dim3 tile_grid(const BlendShape& s) {
  return dim3(unsigned((s.H * s.W + kTile - 1) / kTile), unsigned((s.C + kTile - 1) / kTile),
              unsigned(s.B));
}

template <typename T>
cudaError_t forward_impl(const void* x, const void* av, const void* c_f, const void* weight,
                         const BlendShape& s, void* out, cudaStream_t stream) {
  using A = acc_t<T>;
  if (empty(s)) return cudaSuccess;
  REGHARM_LAUNCH((blend_forward_kernel<T, A>), tile_grid(s), dim3(kTile, kTileRows), 0, stream,
                 static_cast<const T*>(x), static_cast<const T*>(av), static_cast<const T*>(c_f),
                 static_cast<const T*>(weight), s.C, s.H * s.W, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const void* grad, XStrides gs, const void* weight, const void* c_f,
                          const BlendShape& s, void* gav, cudaStream_t stream) {
  using A = acc_t<T>;
  if (empty(s)) return cudaSuccess;
  REGHARM_LAUNCH((blend_backward_kernel<T, A>), tile_grid(s), dim3(kTile, kTileRows), 0, stream,
                 static_cast<const T*>(grad), gs, s.W, static_cast<const T*>(weight),
                 static_cast<const T*>(c_f), s.C, s.H * s.W, static_cast<T*>(gav));
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_x_impl(void* gx, const void* gxp, const void* grad, XStrides gs,
                        const void* weight, const BlendShape& s, cudaStream_t stream) {
  using A = acc_t<T>;
  if (empty(s)) return cudaSuccess;
  const int64_t HW = s.H * s.W, planes = s.B * s.C;
  const dim3 grid(unsigned((HW + 255) / 256), unsigned(planes < 65535 ? planes : 65535));
  REGHARM_LAUNCH((grad_x_kernel<T, A>), grid, dim3(256), 0, stream, static_cast<T*>(gx),
                 static_cast<const T*>(gxp), static_cast<const T*>(grad), gs, s.W,
                 static_cast<const T*>(weight), s.C, HW, planes);
  return cudaGetLastError();
}

// min_mass as torch compares a T tensor with a Python float: converted to T first (16-bit via
// float), then compared in A
template <typename T> double threshold_of(double v) { return double(static_cast<T>(v)); }
template <> double threshold_of<__half>(double v) {
  return __half2float(__float2half_rn(float(v)));
}
template <> double threshold_of<__nv_bfloat16>(double v) {
  return __bfloat162float(__float2bfloat16_rn(float(v)));
}

template <typename T>
cudaError_t mask_impl(const void* m, int64_t n, void* bg, bool* active, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 1 << 16);
  REGHARM_LAUNCH((mask_kernel<T, acc_t<T>>), dim3(unsigned(blocks)), dim3(256), 0, stream,
                 static_cast<const T*>(m), n, static_cast<T*>(bg), active);
  return cudaGetLastError();
}

template <typename T>
cudaError_t keys_impl(const void* mass, const void* mu, const void* sigma, const void* m,
                      const BlendShape& s, int64_t K, double min_mass, float* key_bias,
                      void* values, void* weight, cudaStream_t stream) {
  using A = acc_t<T>;
  if (s.B == 0) return cudaSuccess;
  const int64_t most = std::max(K * s.C, s.H * s.W);
  // a few blocks per image: each reads the image's K masses once more for its "any"
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((most + 1023) / 1024, 64));
  const A threshold = A(threshold_of<T>(min_mass));
  REGHARM_LAUNCH((keys_kernel<T, A>), dim3(unsigned(blocks), unsigned(s.B)), dim3(256), 0, stream,
                 static_cast<const T*>(mass), static_cast<const T*>(mu),
                 static_cast<const T*>(sigma), static_cast<const T*>(m), K, s.C, s.H * s.W,
                 threshold, key_bias, static_cast<T*>(values), static_cast<T*>(weight));
  return cudaGetLastError();
}

}  // namespace

cudaError_t ptl_mask(DType dt, const void* m, int64_t n, void* bg, bool* active,
                     cudaStream_t stream) {
  REGHARM_DISPATCH(dt, mask_impl, m, n, bg, active, stream)
  return cudaErrorInvalidValue;
}

cudaError_t ptl_keys(DType dt, const void* mass, const void* mu, const void* sigma, const void* m,
                     const BlendShape& s, int64_t K, double min_mass, float* key_bias,
                     void* values, void* weight, cudaStream_t stream) {
  REGHARM_DISPATCH(dt, keys_impl, mass, mu, sigma, m, s, K, min_mass, key_bias, values, weight,
                   stream)
  return cudaErrorInvalidValue;
}

cudaError_t ptl_blend_forward(DType dt, const void* x, const void* av, const void* c_f,
                              const void* weight, const BlendShape& s, void* out,
                              cudaStream_t stream) {
  REGHARM_DISPATCH(dt, forward_impl, x, av, c_f, weight, s, out, stream)
  return cudaErrorInvalidValue;
}

cudaError_t ptl_blend_backward(DType dt, const void* grad, XStrides gs, const void* weight,
                               const void* c_f, const BlendShape& s, void* gav,
                               cudaStream_t stream) {
  REGHARM_DISPATCH(dt, backward_impl, grad, gs, weight, c_f, s, gav, stream)
  return cudaErrorInvalidValue;
}

cudaError_t ptl_grad_x(DType dt, void* gx, const void* gxp, const void* grad, XStrides gs,
                       const void* weight, const BlendShape& s, cudaStream_t stream) {
  REGHARM_DISPATCH(dt, grad_x_impl, gx, gxp, grad, gs, weight, s, stream)
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace regharm
