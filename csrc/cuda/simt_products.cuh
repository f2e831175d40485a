// float32 warp products on CUDA cores for the register attention kernels
// (attention_registers.cuh): the default float32 path, as issue 5 asks (tensor cores only under
// REGHARM_CUDA_FP32_MATH=tf32x3). The tile kernels' float32 path (block_mm.cuh's simt_mm) writes
// every score tile to shared memory, reads it back for the softmax and the next product, and ran
// at 12 % occupancy on the H100 of run 1 (~95 KB of shared memory per block).
//
// The accumulators are laid out exactly as mma.sync's (mma_sync.cuh: with g = lane / 4 and
// t = lane % 4, c[0], c[1] = C[g][2t, 2t+1] and c[2], c[3] = C[g+8][2t, 2t+1] of each 16 x 8
// n-tile), so the kernels' softmax, masking and stores are the same code for both. Only the
// operands differ: a lane holds the whole k-range it needs,
//   A fragment (16 x 8): a[0][k] = A[g][k], a[1][k] = A[g+8][k], k = 0..7;
//   B fragment (8 x 8):  b[0][k] = B[k][2t], b[1][k] = B[k][2t+1];
// and a product is 32 FMAs per lane. An A fragment is reused for every n-tile of its k-step.
// Every shared-memory load is 16 bytes, the lanes sharing g or t reading the same address
// (broadcast): products whose accumulators are only stored (O, dQ, dK, dV) pair their n-tiles
// so that B read transposed is 4 contiguous columns per lane (load_b_trans2, out_col).
// Accumulation is float32 in k order, as the tile kernels'. The sm_90 PTX at D 64, E 128 has 7.0
// (dK/dV) to 7.6 (forward) FMAs per shared-memory load instruction, above the 4 FMA
// instructions an SM issues per shared-memory wavefront (unpaired: 4.7 to 5.9; unpaired and
// through float4/float2 pointers, which the compiler split into 4-byte loads: 2.1 to 4.9).
#pragma once

#include <cstdint>

#include "device_utils.cuh"

#if defined(REGHARM_CUDA_EMULATION)
namespace emu {
inline long long& simt_product_count();
}
#endif

namespace regharm {
namespace cuda {

struct CudaCoresF32 {
  using In = float;
  using FragA = float[2][8];
  using FragB = float[2][8];
  static constexpr int K = 8;
  static constexpr bool kFragsInRegs = false;  // 8 k-steps x 16 floats would not fit

  // 16-byte shared-memory loads. Written in PTX: through float4/float2 pointers the
  // compiler split most of them into 4-byte loads (nvcc 13, sm_90 PTX: all of the dQ kernel's),
  // which doubles the load instructions per FMA. volatile: never merged or moved across the
  // kernels' barriers.
  static __device__ __forceinline__ void ld4(float* dst, const float* p) {
    REGHARM_CHECK_ALIGNED(p, 16);
#if defined(__CUDA_ARCH__) && !defined(REGHARM_CUDA_EMULATION)
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(dst[0]), "=f"(dst[1]), "=f"(dst[2]), "=f"(dst[3])
                 : "r"(addr));
#else
    for (int i = 0; i < 4; ++i) dst[i] = p[i];
#endif
  }
  static __device__ __forceinline__ void ld8(float (&dst)[8], const float* p) {
    ld4(dst, p);
    ld4(dst + 4, p + 4);
  }

  // rows g and g + 8 of a row-major tile at p (pitch ld, a multiple of 4), columns k0 .. k0 + 7
  static __device__ __forceinline__ void load_a(FragA& a, const float* p, int ld, int k0) {
    const int g = (threadIdx.x & 31) >> 2;
    ld8(a[0], p + g * ld + k0);
    ld8(a[1], p + (g + 8) * ld + k0);
  }

  // B[k][n] = M[n0 + n][k0 + k] of a row-major M (pitch ld): rows 2t and 2t + 1 of M
  static __device__ __forceinline__ void load_b_t(FragB& b, const float* p, int ld, int n0,
                                                  int k0) {
    const int t = threadIdx.x & 3;
    ld8(b[0], p + (n0 + 2 * t) * ld + k0);
    ld8(b[1], p + (n0 + 2 * t + 1) * ld + k0);
  }

  // B[k][n] = M[k][n] at p = M + k0 * ld + n0, two n-tiles at once, for the products whose
  // accumulators are only stored (P·V, dS·K, Pᵀ·dO, dSᵀ·Q): lane t reads columns 4t .. 4t + 3
  // of each of 8 rows (one 16-byte load), the first pair for n-tile 2j, the second for 2j + 1;
  // out_col says where each accumulator element belongs.
  static constexpr bool kPairedOutputs = true;
  static __device__ __forceinline__ void load_b_trans2(FragB& b0, FragB& b1, const float* p,
                                                       int ld) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float v[4];
      ld4(v, p + k * ld + 4 * t);
      b0[0][k] = v[0], b0[1][k] = v[1], b1[0][k] = v[2], b1[1][k] = v[3];
    }
  }
  // Column of element c (0, 1) of a lane's pair in accumulator n-tile n of such a product.
  static __device__ __forceinline__ int out_col(int n, int t, int c) {
    return (n >> 1) * 16 + 4 * t + 2 * (n & 1) + c;
  }

  // The A fragment of accumulator n-tile c[0]: row g's 8 columns are spread over the quad
  // (lane t holds columns 2t, 2t + 1), so each lane collects the other three lanes' pairs.
  // Every lane must call it.
  static __device__ __forceinline__ void acc_to_a(FragA& a, const float (*c)[4]) {
    const int quad = threadIdx.x & 28;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int src = quad | s;
      a[0][2 * s] = __shfl_sync(0xffffffffu, c[0][0], src);
      a[0][2 * s + 1] = __shfl_sync(0xffffffffu, c[0][1], src);
      a[1][2 * s] = __shfl_sync(0xffffffffu, c[0][2], src);
      a[1][2 * s + 1] = __shfl_sync(0xffffffffu, c[0][3], src);
    }
  }

  static __device__ __forceinline__ void mma(float (&d)[4], const FragA& a, const FragB& b) {
#if defined(REGHARM_CUDA_EMULATION)
    if ((threadIdx.x & 31) == 0) ++::emu::simt_product_count();
#endif
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      d[0] = fmaf(a[0][k], b[0][k], d[0]);
      d[1] = fmaf(a[0][k], b[1][k], d[1]);
      d[2] = fmaf(a[1][k], b[0][k], d[2]);
      d[3] = fmaf(a[1][k], b[1][k], d[3]);
    }
  }
};

}  // namespace cuda
}  // namespace regharm
