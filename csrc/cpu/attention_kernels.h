// Tile kernels of masked_attention (CPU). masked_attention.cpp includes this file twice, inside
// two namespaces (baseline ISA and AVX2+FMA), so it has no include guard and includes nothing.
//
// A "tile" is nq <= kQB queries against nt <= kKT live keys; a score tile S has row stride kKT
// and nt8 = nt rounded up to 8 columns (the padding keys have bias -inf: P = 0 there).

// S[i][j] = bias_j + Σ_d qs[i][d] · k_j[d] (qs already scaled)
template <typename T>
REGHARM_INLINE void score_tile(const KeysView<T>& kv, const T* qs, int64_t nq, int64_t j0,
                               int64_t nt8, T* S) {
  for (int64_t i = 0; i < nq; ++i) std::copy(kv.bias + j0, kv.bias + j0 + nt8, S + i * kKT);
  simd::gemm_acc(nq, nt8, kv.D, qs, kv.Dp, 1, kv.kt + j0, kv.nlp, S, kKT);
}

// Forward of one query block against every live key, online softmax over key tiles.
// Leaves the unnormalized output in O (nq x Ep), the running max in mrow and the sum in lrow.
template <typename T>
void forward_block(const KeysView<T>& kv, const T* qs, int64_t nq, T* S, T* O, T* mrow,
                   T* lrow) {
  std::fill(O, O + nq * kv.Ep, T(0));
  std::fill(mrow, mrow + nq, -std::numeric_limits<T>::infinity());
  std::fill(lrow, lrow + nq, T(0));
  for (int64_t j0 = 0; j0 < kv.nl; j0 += kKT) {
    const int64_t nt = std::min(kKT, kv.nl - j0), nt8 = round8(nt);
    score_tile(kv, qs, nq, j0, nt8, S);
    for (int64_t i = 0; i < nq; ++i) {
      T* srow = S + i * kKT;
      const T mnew = std::max(mrow[i], simd::max_of(srow, nt8));
      const T corr = std::exp(mrow[i] - mnew);  // 0 on the first tile (mrow = -inf)
      lrow[i] = lrow[i] * corr + simd::exp_shift_sum(srow, nt8, mnew);
      mrow[i] = mnew;
      if (corr != T(1)) {
        T* oi = O + i * kv.Ep;
        for (int64_t e = 0; e < kv.Ep; ++e) oi[e] *= corr;
      }
    }
    simd::gemm_acc(nq, kv.Ep, nt, S, kKT, 1, kv.v + j0 * kv.Ep, kv.Ep, O, kv.Ep);
  }
}

// The log-sum-exp of a query block, recomputed (the float64 backward: the saved one is float32).
template <typename T>
void lse_block(const KeysView<T>& kv, const T* qs, int64_t nq, T* S, T* mrow, T* lrow, T* lse) {
  std::fill(mrow, mrow + nq, -std::numeric_limits<T>::infinity());
  std::fill(lrow, lrow + nq, T(0));
  for (int64_t j0 = 0; j0 < kv.nl; j0 += kKT) {
    const int64_t nt = std::min(kKT, kv.nl - j0), nt8 = round8(nt);
    score_tile(kv, qs, nq, j0, nt8, S);
    for (int64_t i = 0; i < nq; ++i) {
      T* srow = S + i * kKT;
      const T mnew = std::max(mrow[i], simd::max_of(srow, nt8));
      lrow[i] = lrow[i] * std::exp(mrow[i] - mnew) + simd::exp_shift_sum(srow, nt8, mnew);
      mrow[i] = mnew;
    }
  }
  for (int64_t i = 0; i < nq; ++i) lse[i] = mrow[i] + std::log(lrow[i]);
}

// One tile of the backward: S <- P = exp(S - lse_i), dP <- dS = P ∘ (dO·v_j - Δ_i).
template <typename T>
REGHARM_INLINE void grad_tile(const KeysView<T>& kv, const T* qs, const T* go, const T* lse,
                              const T* delta, int64_t nq, int64_t j0, int64_t nt8, T* S, T* dP) {
  score_tile(kv, qs, nq, j0, nt8, S);
  for (int64_t i = 0; i < nq; ++i) std::fill(dP + i * kKT, dP + i * kKT + nt8, T(0));
  simd::gemm_acc(nq, nt8, kv.E, go, kv.Ep, 1, kv.vt + j0, kv.nlp, dP, kKT);
  for (int64_t i = 0; i < nq; ++i) {
    T* srow = S + i * kKT;
    T* prow = dP + i * kKT;
    simd::exp_shift_sum(srow, nt8, lse[i]);
    const T di = delta[i];
    for (int64_t j = 0; j < nt8; ++j) prow[j] = srow[j] * (prow[j] - di);
  }
}

// dQ (nq x Dp, unscaled) of one query block: Σ over key tiles of dS · K.
template <typename T>
void backward_query_block(const KeysView<T>& kv, const T* qs, const T* go, const T* lse,
                          const T* delta, int64_t nq, T* S, T* dP, T* dQ) {
  std::fill(dQ, dQ + nq * kv.Dp, T(0));
  for (int64_t j0 = 0; j0 < kv.nl; j0 += kKT) {
    const int64_t nt = std::min(kKT, kv.nl - j0), nt8 = round8(nt);
    grad_tile(kv, qs, go, lse, delta, nq, j0, nt8, S, dP);
    simd::gemm_acc(nq, kv.Dp, nt, dP, kKT, 1, kv.k + j0 * kv.Dp, kv.Dp, dQ, kv.Dp);
  }
}

// dK (nt x Dp) and dV (nt x Ep) of keys j0 .. j0+nt-1: Σ over the la active queries (rows of qs,
// go, lse, delta) of dSᵀ · (scale·Q) and Pᵀ · dO. With dQ (la x Dp, unscaled) also adds this
// tile's dS · K to it, from the same P and dS.
template <typename T>
void backward_key_tile(const KeysView<T>& kv, const T* qs, const T* go, const T* lse,
                       const T* delta, int64_t la, int64_t j0, int64_t nt, T* S, T* dP, T* dK,
                       T* dV, T* dQ = nullptr) {
  const int64_t nt8 = round8(nt);
  std::fill(dK, dK + nt * kv.Dp, T(0));
  std::fill(dV, dV + nt * kv.Ep, T(0));
  for (int64_t i0 = 0; i0 < la; i0 += kQB) {
    const int64_t nq = std::min(kQB, la - i0);
    const T* q_i = qs + i0 * kv.Dp;
    const T* go_i = go + i0 * kv.Ep;
    grad_tile(kv, q_i, go_i, lse + i0, delta + i0, nq, j0, nt8, S, dP);
    simd::gemm_acc(nt, kv.Ep, nq, S, 1, kKT, go_i, kv.Ep, dV, kv.Ep);
    simd::gemm_acc(nt, kv.Dp, nq, dP, 1, kKT, q_i, kv.Dp, dK, kv.Dp);
    if (dQ != nullptr)
      simd::gemm_acc(nq, kv.Dp, nt, dP, kKT, 1, kv.k + j0 * kv.Dp, kv.Dp, dQ + i0 * kv.Dp,
                     kv.Dp);
  }
}

// dQ (la x Dp, unscaled), dK (nlp x Dp) and dV (nlp x Ep) of one image in one sweep: each tile's
// P and dS are computed once and feed all three products (the two passes above compute them
// twice). Every sum runs in the same order as in those passes (dQ over key tiles, dK and dV over
// query blocks, each ascending), so the results are the same bits.
template <typename T>
void backward_image(const KeysView<T>& kv, const T* qs, const T* go, const T* lse,
                    const T* delta, int64_t la, T* S, T* dP, T* dQ, T* dK, T* dV) {
  std::fill(dQ, dQ + la * kv.Dp, T(0));
  for (int64_t j0 = 0; j0 < kv.nl; j0 += kKT)
    backward_key_tile(kv, qs, go, lse, delta, la, j0, std::min(kKT, kv.nl - j0), S, dP,
                      dK + j0 * kv.Dp, dV + j0 * kv.Ep, dQ);
}
