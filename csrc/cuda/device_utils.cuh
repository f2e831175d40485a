// Device helpers shared by the kernel files: dtype conversion, warp reductions, tile loads and
// the launch/shared-memory macros.
//
// REGHARM_CUDA_EMULATION: tests/cuda_emu compiles the kernel files as plain C++ and runs every
// CUDA thread as a fiber on the CPU (a machine without a GPU can still execute the index math);
// the two macros below are the only places where the kernel code sees the difference.
#pragma once

#include <cstdint>

#ifndef REGHARM_CUDA_EMULATION
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

#ifdef REGHARM_CUDA_EMULATION
#define REGHARM_LAUNCH(kern, grid, block, smem, stream, ...) \
  ::emu::launch((const void*)(kern), grid, block, smem, [&] { kern(__VA_ARGS__); }, #kern)
#define REGHARM_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()
#define REGHARM_CHECK_ALIGNED(ptr, bytes) ::emu::check_aligned(ptr, bytes, #ptr)
#else
#define REGHARM_CHECK_ALIGNED(ptr, bytes) ((void)0)
#define REGHARM_LAUNCH(kern, grid, block, smem, stream, ...) \
  kern<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define REGHARM_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// In a launcher taking a DType tag: returns FN<T>(...) for the tag's element type T.
#define REGHARM_DISPATCH(dt, FN, ...)                                  \
  switch (dt) {                                                         \
    case DType::kFloat32: return FN<float>(__VA_ARGS__);                \
    case DType::kFloat16: return FN<__half>(__VA_ARGS__);               \
    case DType::kBFloat16: return FN<__nv_bfloat16>(__VA_ARGS__);       \
    case DType::kFloat64: return FN<double>(__VA_ARGS__);               \
  }

namespace regharm {
namespace cuda {

// SPEC §1: float32 accumulation for every dtype but float64, which stays exact for gradcheck.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

template <typename A> __device__ __forceinline__ A to_acc(float v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) {
  return static_cast<A>(__bfloat162float(v));
}

template <typename T> struct Cast {
  template <typename A> __device__ __forceinline__ static T from(A v) { return static_cast<T>(v); }
};
template <> struct Cast<__half> {
  template <typename A> __device__ __forceinline__ static __half from(A v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <> struct Cast<__nv_bfloat16> {
  template <typename A> __device__ __forceinline__ static __nv_bfloat16 from(A v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) {
  return Cast<T>::from(v);
}

__device__ __forceinline__ float fast_exp(float v) { return __expf(v); }
__device__ __forceinline__ double fast_exp(double v) { return exp(v); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }

// Reductions over the 32 lanes of a warp; every lane must call them and gets the result.
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename A> __device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) {
    const A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread must call it and
// gets the result. `scratch` holds 32 values in shared memory; it may be reused after return.
template <typename A> __device__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = lane < nwarps ? scratch[lane] : A(0);
  total = warp_sum(total);
  __syncthreads();  // scratch may be reused by the caller
  return total;
}

// A 16-byte copy from global to shared memory that neither stages through registers nor blocks
// the thread (cp.async, sm_80+): it lands at the thread's next cp_async_wait_all, and a barrier
// after that shows it to the other threads. Below sm_80, a load and a store.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(REGHARM_CUDA_EMULATION)
  ::emu::cp_async16(dst, src);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(src) : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
#endif
}

// The same for 4 bytes (cp.async.ca: .cg takes only 16): gathered scalars such as a key
// tile's bias, in flight with the tile they belong to.
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
#if defined(REGHARM_CUDA_EMULATION)
  ::emu::cp_async4(dst, src);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(addr), "l"(src) : "memory");
#else
  *reinterpret_cast<unsigned*>(dst) = __ldg(reinterpret_cast<const unsigned*>(src));
#endif
}

// Waits for the calling thread's cp.async copies.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(REGHARM_CUDA_EMULATION)
  ::emu::cp_async_wait_all();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Copies a rows x cols tile into shared memory (row pitch ld), zero outside rows_valid x
// cols_valid: padding rows and columns must be exact zeros, since they enter matrix products
// (0 · garbage could be NaN). Tile row r is source row row_idx[r] when row_idx is given (a
// gather), else r. vec: 16-byte copies, allowed when src, its row stride and cols_valid are
// multiples of 16 bytes (the launchers check it); cols and ld always are.
//
// Only issues the vector copies (cp.async): the caller waits (cp_async_wait_all) before the
// barrier that publishes the tile, so that every copy of a tile, or of the tiles loaded
// together, is in flight at once. A loop of load-then-store, as before, kept one 16-byte load
// per thread in flight (ptxas does not pipeline it): a global round trip per 16 bytes of a
// thread's share, 12 per key tile of the 16-bit forward at D 64, E 128.
template <typename T>
__device__ void load_tile_async(T* dst, int ld, const T* src, int64_t src_ld, int rows_valid,
                                int rows, int cols_valid, int cols, bool vec,
                                const int* row_idx = nullptr) {
  auto src_row = [&](int r) {
    return src + (row_idx ? int64_t(row_idx[r]) : int64_t(r)) * src_ld;
  };
  if (vec) {
    constexpr int V = 16 / sizeof(T);
    const int units = cols / V;
    for (int idx = threadIdx.x; idx < rows * units; idx += blockDim.x) {
      const int r = idx / units, c = (idx % units) * V;
      REGHARM_CHECK_ALIGNED(dst + r * ld + c, 16);
      if (r < rows_valid && c < cols_valid)
        cp_async16(dst + r * ld + c, src_row(r) + c);
      else
        *reinterpret_cast<uint4*>(dst + r * ld + c) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    const T zero = from_acc<T>(0.0f);
    for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
      const int r = idx / cols, c = idx % cols;
      dst[r * ld + c] = (r < rows_valid && c < cols_valid) ? src_row(r)[c] : zero;
    }
  }
}

// load_tile_async, then the wait: a barrier after it publishes the tile.
template <typename T>
__device__ void load_tile(T* dst, int ld, const T* src, int64_t src_ld, int rows_valid, int rows,
                          int cols_valid, int cols, bool vec, const int* row_idx = nullptr) {
  load_tile_async(dst, ld, src, src_ld, rows_valid, rows, cols_valid, cols, vec, row_idx);
  cp_async_wait_all();
}

// A failed query that the caller answers with a fallback: its error is also the runtime's "last
// error", which the cudaGetLastError() after the next launch would report as that kernel's.
inline void forget_error() { (void)cudaGetLastError(); }

// Bytes of shared memory the launchers may use: the opt-in maximum of the current device.
inline int max_dynamic_smem() {
  int dev = 0, bytes = 48 * 1024;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    forget_error();
    return 48 * 1024;
  }
  return bytes;
}

inline int multiprocessor_count() {
  int dev = 0, n = 1;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    forget_error();
    return 1;
  }
  return n;
}

// Launches with more than the default 48 KB of dynamic shared memory must opt in first.
inline cudaError_t allow_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Carves consecutive 128-byte aligned arrays out of one dynamic shared-memory block; the host
// side runs the same sequence to size the launch, so the two cannot disagree.
struct SmemCarver {
  size_t offset = 0;
  unsigned char* base = nullptr;
  __host__ __device__ explicit SmemCarver(unsigned char* b = nullptr) : base(b) {}
  template <typename U> __host__ __device__ U* take(size_t count) {
    U* p = reinterpret_cast<U*>(base + offset);
    offset = (offset + count * sizeof(U) + 127) / 128 * 128;
    return p;
  }
};

}  // namespace cuda
}  // namespace regharm
