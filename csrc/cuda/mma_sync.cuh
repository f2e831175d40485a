// Warp-wide tensor-core products on registers with `mma.sync` (sm_80+), for kernels that keep
// their tiles in registers (attention_registers.cuh) instead of going through shared memory as
// WMMA does: m16n8k16 for 16-bit inputs, and for float32 m16n8k8 tf32 three times (3xTF32:
// big·big + big·small + small·big, float32-grade accuracy, as the tile kernels' tf32x3 mode).
// Both accumulate in float. The functions below are written once per element type and the
// kernels call them the same way: Mma<T>::K is the k-step.
//
// Unlike WMMA's opaque fragments, the distribution of the elements over the lanes is fixed by
// the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), and the kernels
// rely on it: with g = lane / 4 and t = lane % 4,
//   A (16 x 16, row-major): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
//                           a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9];
//   B (16 x 8):             b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g];
//   C, D (16 x 8, float):   c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1],
// each 32-bit register holding two 16-bit elements, the lower index in the low half. So the
// accumulator of a 16 x 16 product (two n-tiles) holds exactly the A operand of the next
// product (P = softmax(S) feeds P · V without leaving the registers, as in FlashAttention-2).
// tf32 m16n8k8, one element per register ("Matrix Fragments for mma.m16n8k8"):
//   A (16 x 8): a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4];
//   B (8 x 8):  b[0] = B[t][g], b[1] = B[t+4][g];  C, D as above;
// there an accumulator n-tile becomes an A operand through shuffles within each quad.
// `ldmatrix ... .trans` (load_b_trans) reads a B operand out of a row-major tile of its
// transpose. The CPU emulator (tests/cuda_emu) implements the same layouts.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_utils.cuh"

namespace regharm {
namespace cuda {

// One mma.sync with four float accumulators d, four A registers a and two B registers b (every
// shape and type used here); only the instruction differs.
#define REGHARM_MMA_SYNC(INSTR)                                                           \
  asm volatile(INSTR " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

// The k-step of one mma.sync per element type.
template <typename T> struct Mma { static constexpr int K = 16; };
template <> struct Mma<float> { static constexpr int K = 8; };

// Two 16-bit values of T packed into one register (lo in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T pair[2] = {from_acc<T>(lo), from_acc<T>(hi)};
  uint32_t r;
  std::memcpy(&r, static_cast<const void*>(pair), 4);
  return r;
}

// Two adjacent 16-bit elements from shared memory (4-byte aligned: even offsets, even pitches).
template <typename T> __device__ __forceinline__ uint32_t ld_pair(const T* p) {
  REGHARM_CHECK_ALIGNED(p, 4);
  return *reinterpret_cast<const uint32_t*>(p);
}

// d += A · B for the fragments above; every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if defined(REGHARM_CUDA_EMULATION)
  ::emu::mma_m16n8k16<T>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    REGHARM_MMA_SYNC("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
  else
    REGHARM_MMA_SYNC("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
#else
  // the launchers never pick the register kernels below sm_80 (registers_supported)
  (void)d, (void)a, (void)b;
  __trap();
#endif
}

// The A operand of rows [0, 16) of a row-major tile at `p` (pitch ld elements), columns
// [k0, k0 + 16).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* p, int ld, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* r0 = p + g * ld + k0 + 2 * t;
  const T* r1 = r0 + 8 * ld;
  a[0] = ld_pair(r0);
  a[1] = ld_pair(r1);
  a[2] = ld_pair(r0 + 8);
  a[3] = ld_pair(r1 + 8);
}

// The B operand B[k][n] = M[n0 + n][k0 + k] of a row-major tile M (pitch ld): rows of M are
// the columns of B (Kᵀ from K, Vᵀ from V, ... without a transposed copy).
template <typename T>
__device__ __forceinline__ void load_b_t(uint32_t (&b)[2], const T* p, int ld, int n0, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* r = p + (n0 + g) * ld + k0 + 2 * t;
  b[0] = ld_pair(r);
  b[1] = ld_pair(r + 8);
}

// The B operand B[k][n] = M[k0 + k][n0 + n] of a row-major tile M (pitch ld) at p = M + k0 * ld
// + n0, read as two transposed 8x8 matrices by `ldmatrix ... .trans` (V in P·V, K in dS·K, Q and
// dO in the key-tile kernel): no transposed copy in shared memory. Rows must be 16-byte aligned
// (pitches and n0 multiples of 8 elements); every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[2], const T* p, int ld) {
  const T* row = p + (threadIdx.x & 15) * ld;  // lanes 0-7: rows 0-7 (b[0]), 8-15: rows 8-15
#if defined(REGHARM_CUDA_EMULATION)
  ::emu::ldmatrix<2, true>(b, row);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(b[0]), "=r"(b[1])
               : "r"(addr));
#else
  (void)row, (void)b;
  __trap();
#endif
}

// The A operand made of two accumulator n-tiles c0 (columns 0-7) and c1 (columns 8-15),
// rounded to T.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4],
                                         const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// ---- float32: m16n8k8 tf32, three products -------------------------------------------------

__device__ __forceinline__ uint32_t f2u(float v) {
  uint32_t r;
  std::memcpy(&r, &v, 4);
  return r;
}
__device__ __forceinline__ float u2f(uint32_t v) {
  float r;
  std::memcpy(&r, &v, 4);
  return r;
}

// x rounded to tf32 (to nearest, ties away: cvt.rna.tf32.f32), as the bits of a float.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(REGHARM_CUDA_EMULATION)
  return f2u(nvcuda::wmma::__float_to_tf32(x));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  return f2u(x);
#endif
}

// d += A · B, one m16n8k8 tf32 product (inputs read as tf32: their low 13 bits ignored).
__device__ __forceinline__ void mma1688_tf32(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if defined(REGHARM_CUDA_EMULATION)
  ::emu::mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  REGHARM_MMA_SYNC("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32");
#else
  (void)d, (void)a, (void)b;
  __trap();
#endif
}

// d += A · B for float32 fragments (float bits in each register) as 3xTF32: x = big + small
// with big = tf32(x), small = tf32(x - big); the small products first, so they are not lost
// against the large one; small·small (~2^-22 relative) is dropped.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[2]) {
  uint32_t ab[4], as[4], bb[2], bs[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ab[i] = to_tf32(u2f(a[i]));
    as[i] = to_tf32(u2f(a[i]) - u2f(ab[i]));
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    bb[i] = to_tf32(u2f(b[i]));
    bs[i] = to_tf32(u2f(b[i]) - u2f(bb[i]));
  }
  mma1688_tf32(d, as, bb);
  mma1688_tf32(d, ab, bs);
  mma1688_tf32(d, ab, bb);
}

template <>
__device__ __forceinline__ void load_a<float>(uint32_t (&a)[4], const float* p, int ld, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float* r0 = p + g * ld + k0 + t;
  const float* r1 = r0 + 8 * ld;
  a[0] = f2u(r0[0]);
  a[1] = f2u(r1[0]);
  a[2] = f2u(r0[4]);
  a[3] = f2u(r1[4]);
}

template <>
__device__ __forceinline__ void load_b_t<float>(uint32_t (&b)[2], const float* p, int ld, int n0,
                                                int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float* r = p + (n0 + g) * ld + k0 + t;
  b[0] = f2u(r[0]);
  b[1] = f2u(r[4]);
}

// B[k][n] = M[k0 + k][n0 + n] at p = M + k0 * ld + n0: column g of rows t and t + 4 (no
// ldmatrix for 32-bit elements).
template <>
__device__ __forceinline__ void load_b_trans<float>(uint32_t (&b)[2], const float* p, int ld) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  b[0] = f2u(p[t * ld + g]);
  b[1] = f2u(p[(t + 4) * ld + g]);
}

// ---- the same calls for every element type ---------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, float>::value) mma_3xtf32(d, a, b);
  else mma16816<T>(d, a, b);
}

// The A operand of the k-step whose columns are the accumulator n-tiles c[0 .. K/8): for 16-bit
// T two n-tiles rounded to T; for float32 one n-tile, moved within each quad (lane t needs
// columns t and t + 4 of its rows, held by lanes t/2 and t/2 + 2). Every lane must call it.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (*c)[4]) {
  if constexpr (std::is_same<T, float>::value) {
    const int lane = threadIdx.x & 31, t = lane & 3, quad = lane & ~3;
    const int lo = quad | (t >> 1), hi = quad | ((t >> 1) + 2);
    const bool odd = t & 1;
    float v[4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // rows g (elements 0, 1) and g + 8 (elements 2, 3)
      const float x0 = __shfl_sync(0xffffffffu, c[0][2 * r], lo);
      const float x1 = __shfl_sync(0xffffffffu, c[0][2 * r + 1], lo);
      const float y0 = __shfl_sync(0xffffffffu, c[0][2 * r], hi);
      const float y1 = __shfl_sync(0xffffffffu, c[0][2 * r + 1], hi);
      v[r] = odd ? x1 : x0;      // column t
      v[r + 2] = odd ? y1 : y0;  // column t + 4
    }
    a[0] = f2u(v[0]);
    a[1] = f2u(v[1]);
    a[2] = f2u(v[2]);
    a[3] = f2u(v[3]);
  } else {
    acc_to_a<T>(a, c[0], c[1]);
  }
}

// ---- the register kernels' view: one policy per way of multiplying --------------------------

// What attention_registers.cuh calls, for tensor cores: fragment types, the k-step, and the five
// operations above. simt_products.cuh has the same interface for float32 on CUDA cores, with
// the same accumulator layout, so the kernels' softmax and masking code is shared.
// Which (g, t) of the accumulator layout a lane holds: rows g and g + 8, columns 2t and 2t + 1 of
// every 8-column n-tile. mma.sync fixes it for tensor cores (g = lane / 4, t = lane % 4); the
// lanes that share a row differ in the bits of row_xor.
struct MmaLanes {
  static __device__ __forceinline__ int g() { return (threadIdx.x & 31) >> 2; }
  static __device__ __forceinline__ int t() { return threadIdx.x & 3; }
  static __device__ __forceinline__ int lane(int g, int t) { return 4 * g + t; }
  static constexpr int kRowXor0 = 1, kRowXor1 = 2;
};

template <typename T>
struct TensorCores {
  using In = T;
  using Lanes = MmaLanes;
  using FragA = uint32_t[4];
  using FragB = uint32_t[2];
  static constexpr int K = Mma<T>::K;
  // 16-bit Q and dO fragments stay in registers across a key loop; 3xTF32 needs those
  // registers for its splits and reads A fragments from shared memory at each product
  static constexpr bool kFragsInRegs = sizeof(T) == 2;

  static __device__ __forceinline__ void load_a(FragA& a, const T* p, int ld, int k0) {
    cuda::load_a<T>(a, p, ld, k0);
  }
  static __device__ __forceinline__ void load_b_t(FragB& b, const T* p, int ld, int n0, int k0) {
    cuda::load_b_t<T>(b, p, ld, n0, k0);
  }
  static __device__ __forceinline__ void load_b_trans(FragB& b, const T* p, int ld) {
    cuda::load_b_trans<T>(b, p, ld);
  }
  static __device__ __forceinline__ void acc_to_a(FragA& a, const float (*c)[4]) {
    cuda::acc_to_a<T>(a, c);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const FragA& a, const FragB& b) {
    cuda::mma<T>(d, a, b);
  }
  // Accumulators of every product in mma.sync's layout (CudaCoresF32 pairs the n-tiles of
  // products that are only stored).
  static constexpr bool kPairedOutputs = false;
  static __device__ __forceinline__ int out_col(int n, int t, int c) { return n * 8 + 2 * t + c; }
};

}  // namespace cuda
}  // namespace regharm
