// Small SIMD building blocks for the CPU kernels, written with GCC/Clang vector extensions.
//
// Everything here is always_inline and carries no target attribute: the kernels that use it are
// compiled twice (see REGHARM_AVX2_BEGIN in cpu_common.h), and each copy gets these helpers in
// its own instruction set (SSE2 baseline, AVX2+FMA). float gets explicit 8-wide vectors; double
// (used for gradcheck only) gets plain loops.
#pragma once

#include <cmath>
#include <cstdint>

#define REGHARM_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__)
// vectors never cross a call boundary (always_inline); the note would fire at the end of the
// translation unit, where templates are instantiated, so it stays off for the whole file
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace regharm {
namespace cpu {
namespace simd {

typedef float vf8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t vi8 __attribute__((vector_size(32), aligned(4), may_alias));

REGHARM_INLINE vf8 load8(const float* p) { return *reinterpret_cast<const vf8*>(p); }
REGHARM_INLINE void store8(float* p, vf8 v) { *reinterpret_cast<vf8*>(p) = v; }
REGHARM_INLINE vf8 splat8(float x) { return vf8{x, x, x, x, x, x, x, x}; }
REGHARM_INLINE float hsum8(vf8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x), relative error ~2 ulp for x in [-87.3, 88.3]; 0 below (so exp(-inf) = 0), +inf-free
// above. Cephes' polynomial on x - n·ln2, and 2^n put straight into the exponent bits.
REGHARM_INLINE vf8 exp8(vf8 x) {
  const vf8 lo = splat8(-87.3f), hi = splat8(88.3f);
  const vf8 xc = x < lo ? lo : (x > hi ? hi : x);
  const vf8 magic = splat8(12582912.0f);  // 1.5·2^23: adding and subtracting it rounds to int
  const vf8 n = (xc * 1.44269504088896341f + magic) - magic;
  vf8 f = xc - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  vf8 p = splat8(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * (f * f) + f + 1.0f;
  const vi8 bits = reinterpret_cast<const vi8&>(p) + (__builtin_convertvector(n, vi8) << 23);
  const vf8 r = reinterpret_cast<const vf8&>(bits);
  return x < lo ? splat8(0.0f) : r;
}

// max_j x[j] for j < n (n a multiple of 8, n > 0)
REGHARM_INLINE float max_of(const float* x, int64_t n) {
  vf8 m = load8(x);
  for (int64_t j = 8; j < n; j += 8) {
    const vf8 v = load8(x + j);
    m = v > m ? v : m;
  }
  float r = m[0];
  for (int i = 1; i < 8; ++i) r = m[i] > r ? m[i] : r;
  return r;
}

REGHARM_INLINE double max_of(const double* x, int64_t n) {
  double r = x[0];
  for (int64_t j = 1; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

// x[j] = exp(x[j] - shift) for j < n (n a multiple of 8); returns Σ_j x[j].
REGHARM_INLINE float exp_shift_sum(float* x, int64_t n, float shift) {
  vf8 acc = splat8(0.0f);
  const vf8 s = splat8(shift);
  for (int64_t j = 0; j < n; j += 8) {
    const vf8 e = exp8(load8(x + j) - s);
    store8(x + j, e);
    acc += e;
  }
  return hsum8(acc);
}

REGHARM_INLINE double exp_shift_sum(double* x, int64_t n, double shift) {
  double acc = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    acc += x[j];
  }
  return acc;
}

// C[m][0 .. 8·NV) += Σ_k A(m, k) · B[k][0 .. 8·NV) for m < MR, accumulators in registers.
// A(m, k) = a[m·am + k·ak]; row k of B starts at b + k·ldb; row m of C at c + m·ldc.
template <int MR, int NV>
REGHARM_INLINE void micro_kernel(int64_t K, const float* a, int64_t am, int64_t ak, const float* b,
                                 int64_t ldb, float* c, int64_t ldc) {
  vf8 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = load8(c + m * ldc + 8 * v);
  for (int64_t k = 0; k < K; ++k) {
    vf8 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = load8(b + k * ldb + 8 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const float s = a[m * am + k * ak];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] += s * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store8(c + m * ldc + 8 * v, acc[m][v]);
}

template <int NV>
REGHARM_INLINE void gemm_cols(int64_t M, int64_t n, int64_t K, const float* a, int64_t am,
                              int64_t ak, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) micro_kernel<4, NV>(K, a + m * am, am, ak, b + n, ldb, c + m * ldc + n, ldc);
  for (; m < M; ++m) micro_kernel<1, NV>(K, a + m * am, am, ak, b + n, ldb, c + m * ldc + n, ldc);
}

// C (M x N) += A (M x K) · B (K x N), A(m, k) = a[m·am + k·ak], B and C row-major with row
// strides ldb and ldc. N must be a multiple of 8 (callers pad their buffers).
REGHARM_INLINE void gemm_acc(int64_t M, int64_t N, int64_t K, const float* a, int64_t am,
                             int64_t ak, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) gemm_cols<2>(M, n, K, a, am, ak, b, ldb, c, ldc);
  for (; n + 8 <= N; n += 8) gemm_cols<1>(M, n, K, a, am, ak, b, ldb, c, ldc);
}

REGHARM_INLINE void gemm_acc(int64_t M, int64_t N, int64_t K, const double* a, int64_t am,
                             int64_t ak, const double* b, int64_t ldb, double* c, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    double* cr = c + m * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const double s = a[m * am + k * ak];
      const double* br = b + k * ldb;
      for (int64_t n = 0; n < N; ++n) cr[n] += s * br[n];
    }
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace regharm
