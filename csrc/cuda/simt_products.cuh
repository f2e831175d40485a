// float32 warp products on CUDA cores for the register attention kernels
// (attention_registers.cuh): the default float32 path, as issue 5 asks (tensor cores only under
// REGHARM_CUDA_FP32_MATH=tf32x3). The tile kernels' float32 path (block_mm.cuh's simt_mm) writes
// every score tile to shared memory, reads it back for the softmax and the next product, and ran
// at 12 % occupancy on the H100 of run 1 (~95 KB of shared memory per block).
//
// The accumulators are laid out as mma.sync's (mma_sync.cuh: lane (g, t) holds c[0], c[1] =
// C[g][2t, 2t+1] and c[2], c[3] = C[g+8][2t, 2t+1] of each 16 x 8 n-tile), so the kernels'
// softmax, masking and stores are the same code for both; which lane is (g, t) is the policy's
// Lanes (below). Only the operands differ: a lane holds the whole k-range it needs,
//   A fragment (16 x 8): a[0][k] = A[g][k], a[1][k] = A[g+8][k], k = 0..7;
//   B fragment (8 x 8):  b[0][k] = B[k][2t], b[1][k] = B[k][2t+1];
// and a product is 32 FMAs per lane. An A fragment is reused for every n-tile of its k-step.
// Every shared-memory load is 16 bytes: products whose accumulators are only stored (O, dQ, dK,
// dV) pair their n-tiles so that B read transposed is 4 contiguous floats per lane
// (load_b_trans2, out_col). Accumulation is float32 in k order, as the tile kernels'.
//
// Shared memory returns 128 bytes per cycle, so a 16-byte load costs a warp 4 cycles however
// few distinct addresses it has, unless lanes n and n ^ 1 (or n and n ^ 2) all read the same
// address: then 2 (NVIDIA's forum, "Unexpected shared memory bank conflict", for sm_70/75; its
// Ampere/Hopper behaviour is what the next GPU run measures). Run 2's H100 ncu of the float32
// forward (PTL's setting, mma.sync's lane order) read 56 % L1/shared-memory throughput against
// 27 % compute: these kernels wait on shared memory. With mma.sync's order (t = lane % 4) the B
// loads, which depend on t only, have no such pairs: 4 cycles each, 16 per 32 FMAs of S = QKᵀ,
// while the SM issues 32 FMAs of a warp in 8. PairedLanes (the default) puts bit 0 of the lane
// in g and bit 1 in t, so B loads (same t) pair n with n ^ 1 and A loads (same g) n with n ^ 2.
// In that model, the forward at D 64, E 128 takes per warp and 64-key tile 3136 cycles of shared
// memory with mma.sync's order (S: 8 k-steps x (32 B loads x 4 + 4 A loads x 2), P·V: 64 paired
// B loads x 4 per 8 keys) and 1600 with PairedLanes, for 1536 cycles of FMA issue (6144 FMAs,
// 4 per cycle per SM).
#pragma once

#include <cstdint>

#include "device_utils.cuh"
#include "mma_sync.cuh"  // MmaLanes

#if defined(REGHARM_CUDA_EMULATION)
namespace emu {
inline long long& simt_product_count();
inline void note_shared_load16(const void* p);
}
#endif

namespace regharm {
namespace cuda {

// The lane order that pairs both kinds of operand loads: lane bits 1, 2 are t, bits 0, 3, 4 are
// g; lanes sharing a row (same g) differ in bits 1 and 2.
struct PairedLanes {
  static __device__ __forceinline__ int g() {
    const int lane = threadIdx.x & 31;
    return (lane & 1) | ((lane >> 2) & 6);
  }
  static __device__ __forceinline__ int t() { return (threadIdx.x >> 1) & 3; }
  static __device__ __forceinline__ int lane(int g, int t) {
    return (g & 1) | (t << 1) | ((g & 6) << 2);
  }
  static constexpr int kRowXor0 = 2, kRowXor1 = 4;
};

// L: which lane is (g, t): PairedLanes (the default) or MmaLanes (mma.sync's order,
// REGHARM_CUDA_SIMT_LANES=mma: the kernels of run 2).
template <typename L>
struct CudaCoresF32 {
  using In = float;
  using Lanes = L;
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
#if defined(REGHARM_CUDA_EMULATION)
    ::emu::note_shared_load16(p);
#endif
    for (int i = 0; i < 4; ++i) dst[i] = p[i];
#endif
  }
  static __device__ __forceinline__ void ld8(float (&dst)[8], const float* p) {
    ld4(dst, p);
    ld4(dst + 4, p + 4);
  }

  // rows g and g + 8 of a row-major tile at p (pitch ld, a multiple of 4), columns k0 .. k0 + 7
  static __device__ __forceinline__ void load_a(FragA& a, const float* p, int ld, int k0) {
    const int g = L::g();
    ld8(a[0], p + g * ld + k0);
    ld8(a[1], p + (g + 8) * ld + k0);
  }

  // B[k][n] = M[n0 + n][k0 + k] of a row-major M (pitch ld): rows 2t and 2t + 1 of M
  static __device__ __forceinline__ void load_b_t(FragB& b, const float* p, int ld, int n0,
                                                  int k0) {
    const int t = L::t();
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
    const int t = L::t();
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

  // The A fragment of accumulator n-tile c[0]: row g's 8 columns are spread over the four lanes
  // of that row (lane (g, t) holds columns 2t, 2t + 1), so each lane collects the other three
  // lanes' pairs. Every lane must call it.
  static __device__ __forceinline__ void acc_to_a(FragA& a, const float (*c)[4]) {
    const int g = L::g();
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int src = L::lane(g, s);
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
