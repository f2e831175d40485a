// CPU kernels of regharm::masked_attention and regharm::masked_attention_backward (SPEC §3).
//
// Flash-attention style: per image the live keys (key_bias > -inf) are compacted once, active
// queries are processed in blocks of kQB against tiles of kKT keys with an online softmax, so
// neither removed keys nor inactive queries cost anything and the L x N score matrix never
// exists. The backward recomputes P per tile from the saved log-sum-exp: in one sweep per image
// where there are at least two images per thread, else in two race-free passes, one over query
// blocks (dQ), one over key tiles (dK, dV; each tile owns its rows).
// The tile products are register-blocked SIMD loops (simd.h), in attention_kernels.h.
//
// T is the accumulation type: float for float32/float16/bfloat16 inputs, double for float64.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace regharm {
namespace cpu {
namespace {

constexpr const char* kOp = "regharm::masked_attention";
constexpr const char* kOpBw = "regharm::masked_attention_backward";
constexpr int64_t kQB = 32;  // queries per block
constexpr int64_t kKT = 64;  // keys per tile (row stride of the score tile)

using Dims = AttnDims;

inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// The live keys of one image as the tile kernels read them; their count nl is padded to nlp (a
// multiple of 8) with removed keys, D and E to Dp and Ep with zero columns.
template <typename T>
struct KeysView {
  int64_t nl, nlp, D, Dp, E, Ep;
  const T* bias;  // (nlp), -inf on the padding
  const T* kt;    // (D, nlp)
  const T* k;     // (nlp, Dp), backward only
  const T* v;     // (nlp, Ep), forward only
  const T* vt;    // (E, nlp), backward only
};

template <typename T>
struct LiveKeys {
  std::vector<int64_t> idx;  // positions in the image's key axis
  std::vector<T> bias, kt, k, v, vt;
  KeysView<T> view;
};

// A (B, R, C) operand read in place, whatever its strides: LTL's tokens are a transposed view of
// NCHW features, and q, k, v are that one view (copying it three times cost more than the
// gathers below, which touch every element once anyway).
template <typename T>
struct Strided {
  const T* p;
  int64_t sb, sr, sc;
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// dst[i * drs + c * dcs] = f(src[b, rows[i], c]) for i < n, c < cols. When src's columns are
// nearer in memory than its rows, chunks of kChunk rows are walked column by column (a blocked
// transpose: a chunk's reads and writes stay in L1); else row by row, as a contiguous src is.
template <typename T, typename F>
void gather(const Strided<T>& src, int64_t b, const int64_t* rows, int64_t n, int64_t cols,
            T* dst, int64_t drs, int64_t dcs, F f) {
  constexpr int64_t kChunk = 16;
  const T* base = src.p + b * src.sb;
  if (src.sc <= src.sr || cols == 1) {
    for (int64_t i = 0; i < n; ++i) {
      const T* r = base + rows[i] * src.sr;
      T* d = dst + i * drs;
      if (src.sc == 1)
        for (int64_t c = 0; c < cols; ++c) d[c * dcs] = f(r[c]);
      else
        for (int64_t c = 0; c < cols; ++c) d[c * dcs] = f(r[c * src.sc]);
    }
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    for (int64_t c = 0; c < cols; ++c) {
      const T* col = base + c * src.sc;
      for (int64_t i = i0; i < i1; ++i) dst[i * drs + c * dcs] = f(col[rows[i] * src.sr]);
    }
  }
}

struct Same {
  template <typename T>
  T operator()(T x) const {
    return x;
  }
};

template <typename T>
void gather_keys(const Dims& s, int64_t b, const Strided<T>& k, const Strided<T>& v,
                 const T* key_bias, bool backward, LiveKeys<T>& lk) {
  const T* kb = key_bias + b * s.N;
  for (int64_t n = 0; n < s.N; ++n)
    if (kb[n] > -std::numeric_limits<T>::infinity()) lk.idx.push_back(n);
  const int64_t nl = static_cast<int64_t>(lk.idx.size()), nlp = round8(nl);
  const int64_t Dp = round8(s.D), Ep = round8(s.E);
  lk.bias.assign(nlp, -std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < nl; ++j) lk.bias[j] = kb[lk.idx[j]];
  const int64_t* idx = lk.idx.data();
  lk.kt.assign(s.D * nlp, T(0));
  gather(k, b, idx, nl, s.D, lk.kt.data(), 1, nlp, Same{});
  if (backward) {
    lk.k.assign(nlp * Dp, T(0));
    lk.vt.assign(s.E * nlp, T(0));
    gather(k, b, idx, nl, s.D, lk.k.data(), Dp, 1, Same{});
    gather(v, b, idx, nl, s.E, lk.vt.data(), 1, nlp, Same{});
  } else {
    lk.v.assign(nlp * Ep, T(0));
    gather(v, b, idx, nl, s.E, lk.v.data(), Ep, 1, Same{});
  }
  lk.view = {nl, nlp, s.D, Dp, s.E, Ep, lk.bias.data(), lk.kt.data(), lk.k.data(),
             lk.v.data(), lk.vt.data()};
}

namespace isa_base {
#define REGHARM_VEC_BYTES 16
#include "simd.h"
#include "attention_kernels.h"
#undef REGHARM_VEC_BYTES
}  // namespace isa_base
#if REGHARM_HAVE_AVX2_COPY
REGHARM_AVX2_BEGIN
namespace isa_avx2 {
#define REGHARM_VEC_BYTES 32
#include "simd.h"
#include "attention_kernels.h"
#undef REGHARM_VEC_BYTES
}  // namespace isa_avx2
REGHARM_AVX2_END
#endif

struct Block {
  int64_t b, start, count;
};

std::vector<Block> blocks_of(const std::vector<std::vector<int64_t>>& rows, int64_t size) {
  std::vector<Block> out;
  for (int64_t b = 0; b < static_cast<int64_t>(rows.size()); ++b) {
    const int64_t n = static_cast<int64_t>(rows[b].size());
    for (int64_t s = 0; s < n; s += size) out.push_back({b, s, std::min(size, n - s)});
  }
  return out;
}

template <typename T>
void forward_kernel(const Dims& s, const Strided<T>& q, const Strided<T>& k, const Strided<T>& v,
                    const T* key_bias,
                    const bool* qmask, T scale, T* out, float* lse) {
  std::vector<LiveKeys<T>> keys(s.B);
  std::vector<std::vector<int64_t>> queries(s.B);
  for (int64_t b = 0; b < s.B; ++b) {
    gather_keys(s, b, k, v, key_bias, false, keys[b]);
    if (keys[b].view.nl == 0) continue;  // every key removed: the whole image's rows stay 0
    for (int64_t l = 0; l < s.L; ++l)
      if (qmask == nullptr || qmask[b * s.L + l]) queries[b].push_back(l);
  }
  const int64_t Dp = round8(s.D), Ep = round8(s.E);
  const auto blocks = blocks_of(queries, kQB);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qs(kQB * Dp, T(0)), S(kQB * kKT), O(kQB * Ep), mrow(kQB), lrow(kQB);
    for (int64_t t = begin; t < end; ++t) {
      const Block& blk = blocks[t];
      const int64_t* rows = queries[blk.b].data() + blk.start;
      const int64_t nq = blk.count;
      gather(q, blk.b, rows, nq, s.D, qs.data(), Dp, 1, [scale](T x) { return scale * x; });
      REGHARM_ISA_CALL(forward_block<T>, keys[blk.b].view, qs.data(), nq, S.data(), O.data(),
                       mrow.data(), lrow.data());
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t row = blk.b * s.L + rows[i];
        const T inv = T(1) / lrow[i];
        T* o = out + row * s.E;
        for (int64_t e = 0; e < s.E; ++e) o[e] = O[i * Ep + e] * inv;
        lse[row] = static_cast<float>(mrow[i] + std::log(lrow[i]));
      }
    }
  });
}

template <typename T>
void backward_kernel(const Dims& s, const Strided<T>& grad_out, const Strided<T>& q,
                     const Strided<T>& k, const Strided<T>& v, const T* key_bias,
                     const bool* qmask, const Strided<T>& out, const T* lse_in,
                     T scale, T* dq, T* dk, T* dv) {
  const int64_t Dp = round8(s.D), Ep = round8(s.E);
  // per image: live keys, and active queries (mask on, finite lse) gathered contiguously
  std::vector<LiveKeys<T>> keys(s.B);
  std::vector<std::vector<int64_t>> queries(s.B);
  std::vector<std::vector<T>> qs(s.B), go(s.B), delta(s.B), lse(s.B);
  for (int64_t b = 0; b < s.B; ++b) {
    gather_keys(s, b, k, v, key_bias, true, keys[b]);
    if (keys[b].view.nl == 0) continue;
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t row = b * s.L + l;
      if ((qmask == nullptr || qmask[row]) && std::isfinite(lse_in[row])) queries[b].push_back(l);
    }
    const int64_t la = static_cast<int64_t>(queries[b].size());
    const int64_t* rows = queries[b].data();
    qs[b].assign(la * Dp, T(0));
    go[b].assign(la * Ep, T(0));
    gather(q, b, rows, la, s.D, qs[b].data(), Dp, 1, [scale](T x) { return scale * x; });
    gather(grad_out, b, rows, la, s.E, go[b].data(), Ep, 1, Same{});
    std::vector<T> o(la * Ep);
    gather(out, b, rows, la, s.E, o.data(), Ep, 1, Same{});
    delta[b].resize(la);
    lse[b].resize(la);
    for (int64_t i = 0; i < la; ++i) {
      T dl = 0;
      for (int64_t e = 0; e < s.E; ++e) dl += go[b][i * Ep + e] * o[i * Ep + e];
      delta[b][i] = dl;
      lse[b][i] = lse_in[b * s.L + rows[i]];
    }
  }
  const bool exact_lse = std::is_same<T, double>::value;
  // a block's results into the op's rows: n queries from position i0 of the image's active
  // ones (dQ unscaled, row stride Dp), n keys from position j0 of its live ones
  auto write_dq = [&](int64_t b, int64_t i0, int64_t n, const T* dQ) {
    for (int64_t i = 0; i < n; ++i) {
      T* o = dq + (b * s.L + queries[b][i0 + i]) * s.D;
      for (int64_t d = 0; d < s.D; ++d) o[d] = scale * dQ[i * Dp + d];
    }
  };
  auto write_keys = [&](int64_t b, int64_t j0, int64_t n, const T* dK, const T* dV) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = b * s.N + keys[b].idx[j0 + j];
      std::copy(dK + j * Dp, dK + j * Dp + s.D, dk + row * s.D);
      std::copy(dV + j * Ep, dV + j * Ep + s.E, dv + row * s.E);
    }
  };

  if (s.B >= 2 * static_cast<int64_t>(at::get_num_threads())) {
    // enough images to keep every thread busy: one sweep per image computes each tile's P and
    // dS once (a third fewer products than the two passes below, the same bits)
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> S(kQB * kKT), dP(kQB * kKT), mrow(kQB), lrow(kQB), dQ, dK, dV;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t la = static_cast<int64_t>(queries[b].size());
        if (la == 0) continue;  // no active query or no live key: the gradients stay 0
        const auto& kv = keys[b].view;
        if (exact_lse)
          for (int64_t i0 = 0; i0 < la; i0 += kQB)
            REGHARM_ISA_CALL(lse_block<T>, kv, qs[b].data() + i0 * Dp, std::min(kQB, la - i0),
                             S.data(), mrow.data(), lrow.data(), lse[b].data() + i0);
        dQ.resize(la * Dp);
        dK.resize(kv.nlp * Dp);
        dV.resize(kv.nlp * Ep);
        REGHARM_ISA_CALL(backward_image<T>, kv, qs[b].data(), go[b].data(), lse[b].data(),
                         delta[b].data(), la, S.data(), dP.data(), dQ.data(), dK.data(),
                         dV.data());
        write_dq(b, 0, la, dQ.data());
        write_keys(b, 0, kv.nl, dK.data(), dV.data());
      }
    });
    return;
  }

  // pass 1, over query blocks: dQ = scale · dS K (in float64 the exact lse first: the saved
  // one is float32, too coarse for gradcheck)
  const auto qblocks = blocks_of(queries, kQB);
  at::parallel_for(0, static_cast<int64_t>(qblocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(kQB * kKT), dP(kQB * kKT), dQ(kQB * Dp), mrow(kQB), lrow(kQB);
    for (int64_t t = begin; t < end; ++t) {
      const Block& blk = qblocks[t];
      const auto& kv = keys[blk.b].view;
      const int64_t b = blk.b, i0 = blk.start, nq = blk.count;
      const T* q_i = qs[b].data() + i0 * Dp;
      if (exact_lse)
        REGHARM_ISA_CALL(lse_block<T>, kv, q_i, nq, S.data(), mrow.data(), lrow.data(),
                         lse[b].data() + i0);
      REGHARM_ISA_CALL(backward_query_block<T>, kv, q_i, go[b].data() + i0 * Ep,
                       lse[b].data() + i0, delta[b].data() + i0, nq, S.data(), dP.data(),
                       dQ.data());
      write_dq(b, i0, nq, dQ.data());
    }
  });

  // pass 2, over key tiles: dV = Pᵀ dO, dK = dSᵀ (scale · Q). Tiles are narrowed when there are
  // few keys so that every thread gets work.
  std::vector<std::vector<int64_t>> live(s.B);
  int64_t total_live = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    if (!queries[b].empty()) live[b] = keys[b].idx;
    total_live += static_cast<int64_t>(live[b].size());
  }
  const int64_t want_tiles = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t kt2 =
      round8(std::clamp<int64_t>(total_live / std::max<int64_t>(1, want_tiles), 16, kKT));
  const auto kblocks = blocks_of(live, kt2);
  at::parallel_for(0, static_cast<int64_t>(kblocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(kQB * kKT), dP(kQB * kKT), dK(kKT * Dp), dV(kKT * Ep);
    for (int64_t t = begin; t < end; ++t) {
      const Block& blk = kblocks[t];
      const int64_t b = blk.b, j0 = blk.start, nt = blk.count;
      REGHARM_ISA_CALL(backward_key_tile<T>, keys[b].view, qs[b].data(), go[b].data(),
                       lse[b].data(), delta[b].data(),
                       static_cast<int64_t>(queries[b].size()), j0, nt, S.data(), dP.data(),
                       dK.data(), dV.data());
      write_keys(b, j0, nt, dK.data(), dV.data());
    }
  });
}

const bool* mask_ptr(const std::optional<at::Tensor>& query_mask, at::Tensor& holder) {
  if (!query_mask.has_value() || !query_mask->defined()) return nullptr;
  holder = query_mask->contiguous();
  return holder.data_ptr<bool>();
}

std::tuple<at::Tensor, at::Tensor> masked_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_bias,
    const std::optional<at::Tensor>& query_mask, double scale) {
  const Dims s = check_attention_args(OnCpu{kOp}, q, k, v, key_bias, query_mask, kOp);
  const auto acc = acc_dtype(q);
  // q, k, v in the accumulation dtype, read in place (the gathers take any strides)
  const auto qa = q.to(acc), ka = k.to(acc), va = v.to(acc);
  const auto kb = to_acc(key_bias, acc);
  at::Tensor mask_holder;
  const bool* qm = mask_ptr(query_mask, mask_holder);
  auto out = at::zeros({s.B, s.L, s.E}, qa.options());
  auto lse = at::full({s.B, s.L}, -std::numeric_limits<float>::infinity(),
                      qa.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_attention_cpu", [&] {
    using T = scalar_t;
    forward_kernel<T>(s, strided<T>(qa), strided<T>(ka), strided<T>(va), kb.data_ptr<T>(), qm,
                      static_cast<T>(scale), out.data_ptr<T>(), lse.data_ptr<float>());
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& key_bias, const std::optional<at::Tensor>& query_mask,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  const Dims s =
      check_attention_args(OnCpu{kOpBw}, q, k, v, key_bias, query_mask, kOpBw);
  check_attention_saved(OnCpu{kOpBw}, s, grad_out, out, lse, kOpBw);
  const auto acc = acc_dtype(q);
  const auto qa = q.to(acc), ka = k.to(acc), va = v.to(acc), ga = grad_out.to(acc);
  const auto oa = out.to(acc), kb = to_acc(key_bias, acc);
  const auto la = to_acc(lse, acc);
  at::Tensor mask_holder;
  const bool* qm = mask_ptr(query_mask, mask_holder);
  // contiguous, whatever the inputs' strides (the fake kernel's layout)
  auto dq = at::zeros({s.B, s.L, s.D}, qa.options()), dk = at::zeros({s.B, s.N, s.D}, ka.options());
  auto dv = at::zeros({s.B, s.N, s.E}, va.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "masked_attention_backward_cpu", [&] {
    using T = scalar_t;
    backward_kernel<T>(s, strided<T>(ga), strided<T>(qa), strided<T>(ka), strided<T>(va),
                       kb.data_ptr<T>(), qm, strided<T>(oa), la.data_ptr<T>(),
                       static_cast<T>(scale), dq.data_ptr<T>(), dk.data_ptr<T>(),
                       dv.data_ptr<T>());
  });
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(regharm, CPU, m) {
  m.impl("masked_attention", &masked_attention_cpu);
  m.impl("masked_attention_backward", &masked_attention_backward_cpu);
}

}  // namespace cpu
}  // namespace regharm
