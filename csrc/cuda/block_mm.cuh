// Block-wide matrix product of shared-memory tiles, C (+)= A · B, accumulated in the
// accumulation type: 16-bit inputs on tensor cores (WMMA 16x16x16, float accumulators); float32
// on CUDA cores, or on tensor cores as 3xTF32 when the launcher asks for it (`tc`, sm_80+);
// float64 on CUDA cores. The attention kernels are written against this one function, so the
// dtype only changes how a tile product is computed, never the tiling or the masking.
//
// Shapes: C is M x N (row-major, pitch ldc), A is M x K, B is K x N; M, N, K are multiples of 16.
// A_COL / B_COL: the operand is stored transposed (element (i, j) at [j * ld + i]), which is how
// Kᵀ, Vᵀ, Pᵀ and dSᵀ are read without copying. For WMMA, pointers must be 32-byte aligned and
// pitches multiples of 16 bytes (the kernels' shared-memory layouts guarantee both).
#pragma once

#include <type_traits>

#include "device_utils.cuh"

#if defined(REGHARM_CUDA_EMULATION)
#define REGHARM_WMMA_HALF 1
#define REGHARM_WMMA_BF16 1
#define REGHARM_WMMA_TF32 1
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define REGHARM_WMMA_HALF 1
#define REGHARM_WMMA_BF16 1
#define REGHARM_WMMA_TF32 1
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
#define REGHARM_WMMA_HALF 1
#define REGHARM_WMMA_BF16 0
#define REGHARM_WMMA_TF32 0
#else
#define REGHARM_WMMA_HALF 0
#define REGHARM_WMMA_BF16 0
#define REGHARM_WMMA_TF32 0
#endif

#if REGHARM_WMMA_HALF && !defined(REGHARM_CUDA_EMULATION)
#include <mma.h>
#endif

namespace regharm {
namespace cuda {

template <typename T> struct UseWmma { static constexpr bool value = false; };
#if REGHARM_WMMA_HALF
template <> struct UseWmma<__half> { static constexpr bool value = true; };
#endif
#if REGHARM_WMMA_BF16
template <> struct UseWmma<__nv_bfloat16> { static constexpr bool value = true; };
#endif

// Each thread owns a 4 x 4 register tile of rows tm + i*M/4 and columns tn + j*N/4: 16 FMAs per
// 8 shared-memory reads, and neighbouring threads read neighbouring rows or columns, which the
// odd row pitches of 4- and 8-byte tiles spread over the banks.
template <typename T, typename A, bool A_COL, bool B_COL, bool ACCUMULATE>
__device__ void simt_mm(A* C, int ldc, const T* Am, int lda, const T* Bm, int ldb, int M, int N,
                        int K) {
  const int MS = M / 4, NS = N / 4;
  for (int u = threadIdx.x; u < MS * NS; u += blockDim.x) {
    const int tm = u / NS, tn = u % NS;
    A acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        acc[i][j] = ACCUMULATE ? C[(tm + i * MS) * ldc + tn + j * NS] : A(0);
    for (int k = 0; k < K; ++k) {
      A a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        a[i] = to_acc<A>(A_COL ? Am[k * lda + tm + i * MS] : Am[(tm + i * MS) * lda + k]);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        b[j] = to_acc<A>(B_COL ? Bm[(tn + j * NS) * ldb + k] : Bm[k * ldb + tn + j * NS]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) C[(tm + i * MS) * ldc + tn + j * NS] = acc[i][j];
  }
}

#if REGHARM_WMMA_TF32
// x = big + small with big = tf32(x) and small = tf32(x - big), in place of x's fragment.
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& big, Frag& small) {
#pragma unroll
  for (int i = 0; i < big.num_elements; ++i) {
    const float x = big.x[i];
    const float hi = nvcuda::wmma::__float_to_tf32(x);
    big.x[i] = hi;
    small.x[i] = nvcuda::wmma::__float_to_tf32(x - hi);
  }
}
#endif

#if REGHARM_WMMA_HALF
// WMMA operand type and k-step per input type: 16-bit inputs as they are (m16n16k16); float32
// as tf32 (m16n16k8), three products per step (below).
template <typename T> struct WmmaIn {
  using type = T;
  static constexpr int k = 16;
};
#if REGHARM_WMMA_TF32
template <> struct WmmaIn<float> {
  using type = nvcuda::wmma::precision::tf32;
  static constexpr int k = 8;
};
#endif

// float32 inputs (3xTF32, as CUTLASS's FastF32 and the Triton kernels' tf32x3): a·b =
// big_a·big_b + big_a·small_b + small_a·big_b, dropping small_a·small_b (~2^-22 relative), at
// float32 accuracy; the small terms go first so they are not lost against the large one.
template <typename T, bool A_COL, bool B_COL, bool ACCUMULATE>
__device__ void wmma_mm(float* C, int ldc, const T* Am, int lda, const T* Bm, int ldb, int M,
                        int N, int K) {
  namespace wmma = nvcuda::wmma;
  using In = typename WmmaIn<T>::type;
  constexpr int KS = WmmaIn<T>::k;
  using LayoutA = typename std::conditional<A_COL, wmma::col_major, wmma::row_major>::type;
  using LayoutB = typename std::conditional<B_COL, wmma::col_major, wmma::row_major>::type;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KS, In, LayoutA>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KS, In, LayoutB>;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
  // each warp owns whole 16x16 output tiles: no two warps touch the same C element
  for (int t = warp; t < tiles; t += nwarps) {
    const int tm = (t / tiles_n) * 16, tn = (t % tiles_n) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, KS, float> c;
    if (ACCUMULATE)
      wmma::load_matrix_sync(c, C + tm * ldc + tn, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(c, 0.0f);
    for (int k = 0; k < K; k += KS) {
      FragA a;
      FragB b;
      wmma::load_matrix_sync(a, A_COL ? Am + k * lda + tm : Am + tm * lda + k, lda);
      wmma::load_matrix_sync(b, B_COL ? Bm + tn * ldb + k : Bm + k * ldb + tn, ldb);
#if REGHARM_WMMA_TF32
      if constexpr (std::is_same<T, float>::value) {
        FragA a_small;
        FragB b_small;
        split_tf32(a, a_small);
        split_tf32(b, b_small);
        wmma::mma_sync(c, a_small, b, c);
        wmma::mma_sync(c, a, b_small, c);
      }
#endif
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(C + tm * ldc + tn, c, ldc, wmma::mem_row_major);
  }
}
#endif

// C (+)= A · B over the whole block. `tc`: float32 on tensor cores (3xTF32) where the GPU has
// them; the caller's tile pitches must then suit WMMA. No barrier inside: callers synchronize
// before reading C or overwriting A and B.
template <typename T, typename A, bool A_COL, bool B_COL, bool ACCUMULATE>
__device__ __forceinline__ void block_mm(A* C, int ldc, const T* Am, int lda, const T* Bm,
                                         int ldb, int M, int N, int K, bool tc) {
#if REGHARM_WMMA_HALF
  if constexpr (UseWmma<T>::value) {
    wmma_mm<T, A_COL, B_COL, ACCUMULATE>(C, ldc, Am, lda, Bm, ldb, M, N, K);
    return;
  }
#endif
#if REGHARM_WMMA_TF32
  if constexpr (std::is_same<T, float>::value && std::is_same<A, float>::value) {
    if (tc) {
      wmma_mm<float, A_COL, B_COL, ACCUMULATE>(C, ldc, Am, lda, Bm, ldb, M, N, K);
      return;
    }
  }
#endif
  (void)tc;
  simt_mm<T, A, A_COL, B_COL, ACCUMULATE>(C, ldc, Am, lda, Bm, ldb, M, N, K);
}

}  // namespace cuda
}  // namespace regharm
