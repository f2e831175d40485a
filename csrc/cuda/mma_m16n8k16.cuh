// One warp-wide tensor-core product D += A · B of shape m16n8k16 (16-bit inputs, float
// accumulators) on registers, as `mma.sync` (sm_80+), for kernels that keep their tiles in
// registers (attention_registers.cuh) instead of going through shared memory as WMMA does.
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
// `ldmatrix ... .trans` (load_b_trans) reads a B operand out of a row-major tile of its
// transpose. The CPU emulator (tests/cuda_emu) implements the same layouts.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_utils.cuh"

namespace regharm {
namespace cuda {

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
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
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

}  // namespace cuda
}  // namespace regharm
