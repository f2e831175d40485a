// Small SIMD building blocks for the CPU kernels, written with GCC vector extensions.
//
// Included once per instruction set, inside that copy's namespace (see REGHARM_AVX2_BEGIN in
// cpu_common.h), after REGHARM_VEC_BYTES is defined to the copy's native vector size (16 for
// the SSE2 baseline, 32 for AVX2): each copy gets registers of its own width, so no include guard
// and no includes here. float gets explicit vectors; double (used for gradcheck only) plain loops.
//
// Needs: <cmath>, <cstdint> and REGHARM_INLINE (cpu_common.h).

#if defined(__GNUC__) && !defined(__clang__)
// vectors never cross a call boundary (always_inline); the note would fire at the end of the
// translation unit, where templates are instantiated, so it stays off for the whole file
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace simd {

constexpr int kLanes = REGHARM_VEC_BYTES / 4;
typedef float vf __attribute__((vector_size(REGHARM_VEC_BYTES), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(REGHARM_VEC_BYTES), aligned(4), may_alias));

REGHARM_INLINE vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
REGHARM_INLINE void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
REGHARM_INLINE vf splat(float x) {
  vf v = {};
  return v + x;
}
REGHARM_INLINE float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp(x), relative error ~2 ulp for x in [-87.3, 88.3]; exactly 0 below (so exp(-inf) = 0),
// finite above. Cephes' polynomial on x - n·ln2, and 2^n put straight into the exponent bits.
REGHARM_INLINE vf exp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.3f);
  const vf xc = x < lo ? lo : (x > hi ? hi : x);
  const vf magic = splat(12582912.0f);  // 1.5·2^23: adding and subtracting it rounds to int
  const vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf f = xc - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * (f * f) + f + 1.0f;
  const vi bits = reinterpret_cast<const vi&>(p) + (__builtin_convertvector(n, vi) << 23);
  const vf r = reinterpret_cast<const vf&>(bits);
  return x < lo ? splat(0.0f) : r;
}

// max_j x[j] for j < n (n > 0 a multiple of 8)
REGHARM_INLINE float max_of(const float* x, int64_t n) {
  vf m = load(x);
  for (int64_t j = kLanes; j < n; j += kLanes) {
    const vf v = load(x + j);
    m = v > m ? v : m;
  }
  float r = m[0];
  for (int i = 1; i < kLanes; ++i) r = m[i] > r ? m[i] : r;
  return r;
}

REGHARM_INLINE double max_of(const double* x, int64_t n) {
  double r = x[0];
  for (int64_t j = 1; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

// x[j] = exp(x[j] - shift) for j < n (n a multiple of 8); returns Σ_j x[j].
REGHARM_INLINE float exp_shift_sum(float* x, int64_t n, float shift) {
  vf acc = splat(0.0f);
  const vf s = splat(shift);
  for (int64_t j = 0; j < n; j += kLanes) {
    const vf e = exp(load(x + j) - s);
    store(x + j, e);
    acc += e;
  }
  return hsum(acc);
}

REGHARM_INLINE double exp_shift_sum(double* x, int64_t n, double shift) {
  double acc = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    acc += x[j];
  }
  return acc;
}

// C[m][0 .. NV·kLanes) += Σ_k A(m, k) · B[k][0 .. NV·kLanes) for m < MR, accumulators in
// registers. A(m, k) = a[m·am + k·ak]; row k of B starts at b + k·ldb; row m of C at c + m·ldc.
template <int MR, int NV>
REGHARM_INLINE void micro_kernel(int64_t K, const float* a, int64_t am, int64_t ak,
                                 const float* b, int64_t ldb, float* c, int64_t ldc) {
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = load(c + m * ldc + kLanes * v);
  for (int64_t k = 0; k < K; ++k) {
    vf bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + kLanes * v);
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
    for (int v = 0; v < NV; ++v) store(c + m * ldc + kLanes * v, acc[m][v]);
}

template <int NV>
REGHARM_INLINE void gemm_cols(int64_t M, int64_t n, int64_t K, const float* a, int64_t am,
                              int64_t ak, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    micro_kernel<4, NV>(K, a + m * am, am, ak, b + n, ldb, c + m * ldc + n, ldc);
  for (; m < M; ++m) micro_kernel<1, NV>(K, a + m * am, am, ak, b + n, ldb, c + m * ldc + n, ldc);
}

// C (M x N) += A (M x K) · B (K x N), A(m, k) = a[m·am + k·ak], B and C row-major with row
// strides ldb and ldc. N must be a multiple of 8 (callers pad their buffers).
REGHARM_INLINE void gemm_acc(int64_t M, int64_t N, int64_t K, const float* a, int64_t am,
                             int64_t ak, const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t n = 0;
  for (; n + 2 * kLanes <= N; n += 2 * kLanes) gemm_cols<2>(M, n, K, a, am, ak, b, ldb, c, ldc);
  for (; n + kLanes <= N; n += kLanes) gemm_cols<1>(M, n, K, a, am, ak, b, ldb, c, ldc);
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
