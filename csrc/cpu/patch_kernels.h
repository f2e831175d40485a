// Window kernels of patch_stats (CPU). patch_stats.cpp includes this file twice, after simd.h,
// inside two namespaces (baseline ISA and AVX2+FMA), so it has no include guard and includes
// nothing. Each function handles one range of a parallel_for.
//
// x is read channels-last (XView): a pixel's C channels are contiguous, so every sweep over a
// window runs across channels in vectors, and a window of a C = 8 map is 16 rows of 16·8
// contiguous floats instead of eight 16 x 16 tiles (the model's CPU activations are
// channels-last, so this also spares a copy).

// The lanes a channel sweep runs on: the ISA's float vector, or one value (float64, and the
// channels left over when C is not a multiple of the vector width).
template <typename T>
struct One {
  using V = T;
  static constexpr int64_t L = 1;
  static REGHARM_INLINE V load(const T* p) { return *p; }
  static REGHARM_INLINE void store(T* p, V v) { *p = v; }
  static REGHARM_INLINE V splat(T x) { return x; }
  static REGHARM_INLINE T hsum(V v) { return v; }
};

struct Wide {
  using V = simd::vf;
  static constexpr int64_t L = simd::kLanes;
  static REGHARM_INLINE V load(const float* p) { return simd::load(p); }
  static REGHARM_INLINE void store(float* p, V v) { simd::store(p, v); }
  static REGHARM_INLINE V splat(float x) { return simd::splat(x); }
  static REGHARM_INLINE float hsum(V v) { return simd::hsum(v); }
};

constexpr int kMaxVecs = 4;  // vectors per sweep: 3·4 accumulators fit 16 registers

// Calls f.template run<Lanes, NV>(c0) over channel blocks covering [0, C): blocks of kMaxVecs
// vectors, then single vectors, then one channel at a time.
template <typename T, class F>
REGHARM_INLINE void for_channel_blocks(int64_t C, F& f) {
  int64_t c = 0;
  if constexpr (std::is_same<T, float>::value) {
    for (; c + kMaxVecs * Wide::L <= C; c += kMaxVecs * Wide::L) f.template run<Wide, kMaxVecs>(c);
    for (; c + Wide::L <= C; c += Wide::L) f.template run<Wide, 1>(c);
  }
  for (; c < C; ++c) f.template run<One<T>, 1>(c);
}

// One patch window of one image: its background weights, weight·bg and their sums.
template <typename T>
struct Window {
  explicit Window(const Geom& g) : g(g), bg(g.P), a(g.P) {}

  void load(const T* bg_img, const T* weight, int64_t row0, int64_t col0) {
    mass = 0, ws = 0;
    for (int64_t r = 0; r < g.ph; ++r) {
      const T* src = bg_img + (row0 + r) * g.W + col0;
      for (int64_t q = 0; q < g.pw; ++q) {
        const int64_t u = r * g.pw + q;
        bg[u] = src[q];
        a[u] = weight[u] * src[q];
        mass += bg[u];
        ws += a[u];
      }
    }
  }

  const Geom& g;
  std::vector<T> bg, a;
  T mass = 0, ws = 0;
};

// Of the window whose top-left pixel's channel 0 is at xw, every channel's masked mean mu, masked
// variance var and d = Σ a·(x - mu). Two sweeps while the window sits in L1: the mean, then the
// centred moments, so the variance needs no shift and stays exact for inputs offset by +100. The
// mean's sum goes row by row (16 terms, then 16 row sums) rather than through one running sum.
template <typename T>
struct Moments {
  const Window<T>& win;
  XView<T> x;
  const T* xw;
  T *mu, *var, *d;

  template <class Ln, int NV>
  REGHARM_INLINE void run(int64_t c0) {
    using V = typename Ln::V;
    const Geom& g = win.g;
    const T* bg = win.bg.data();
    const T* a = win.a.data();
    V s[NV], m[NV], s2[NV], s3[NV];
    for (int v = 0; v < NV; ++v) s[v] = Ln::splat(0), s2[v] = Ln::splat(0), s3[v] = Ln::splat(0);
    for (int64_t r = 0; r < g.ph; ++r) {
      const T* xr = xw + r * x.sH + c0;
      V row[NV];
      for (int v = 0; v < NV; ++v) row[v] = Ln::splat(0);
      for (int64_t q = 0; q < g.pw; ++q) {
        const V b = Ln::splat(bg[r * g.pw + q]);
        for (int v = 0; v < NV; ++v) row[v] += b * Ln::load(xr + q * x.sW + v * Ln::L);
      }
      for (int v = 0; v < NV; ++v) s[v] += row[v];
    }
    const V mass = Ln::splat(win.mass);
    for (int v = 0; v < NV; ++v) m[v] = s[v] / mass;
    for (int64_t r = 0; r < g.ph; ++r) {
      const T* xr = xw + r * x.sH + c0;
      for (int64_t q = 0; q < g.pw; ++q) {
        const V b = Ln::splat(bg[r * g.pw + q]), w = Ln::splat(a[r * g.pw + q]);
        for (int v = 0; v < NV; ++v) {
          const V dx = Ln::load(xr + q * x.sW + v * Ln::L) - m[v];
          s2[v] += b * dx * dx;
          s3[v] += w * dx;
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      Ln::store(mu + c0 + v * Ln::L, m[v]);
      Ln::store(var + c0 + v * Ln::L, s2[v] / mass);
      Ln::store(d + c0 + v * Ln::L, s3[v]);
    }
  }
};

template <typename T>
REGHARM_INLINE void window_moments(const Window<T>& win, XView<T> x, const T* xw, T* mu, T* var,
                                   T* d) {
  Moments<T> f{win, x, xw, mu, var, d};
  for_channel_blocks<T>(x.C, f);
}

// grad_weight's share of one patch: bg_u · Σ_c gamma_c·(x_uc - mu_c) for every pixel u of the
// window, added to accv (P vectors, float only: summed across lanes once per row of patches) and
// accs (P values: the channels left over, and float64).
template <typename T>
REGHARM_INLINE void window_weight_grad(const Geom& g, XView<T> x, const T* xw, const T* bg,
                                       const T* gamma, const T* mu, T* accv, T* accs) {
  const int64_t C = x.C;
  for (int64_t r = 0; r < g.ph; ++r) {
    for (int64_t q = 0; q < g.pw; ++q) {
      const int64_t u = r * g.pw + q;
      const T* xp = xw + r * x.sH + q * x.sW;
      int64_t c = 0;
      if constexpr (std::is_same<T, float>::value) {
        if (C >= Wide::L) {
          Wide::V s = Wide::splat(0);
          for (; c + Wide::L <= C; c += Wide::L)
            s += Wide::load(gamma + c) * (Wide::load(xp + c) - Wide::load(mu + c));
          Wide::store(accv + u * Wide::L, Wide::load(accv + u * Wide::L) + bg[u] * s);
        }
      }
      if (c < C) {
        T tail = 0;
        for (; c < C; ++c) tail += gamma[c] * (xp[c] - mu[c]);
        accs[u] += bg[u] * tail;
      }
    }
  }
}

// Forward of the patches t = b·K + n in [begin, end).
template <typename T>
void forward_patches(const Geom& g, XView<T> x, const T* bg, const T* weight, T bias, T eps,
                     T min_mass, T* mu, T* sigma, T* content, T* mass, int64_t begin,
                     int64_t end) {
  Window<T> win(g);
  std::vector<T> var(g.C), d(g.C);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.K, n = t % g.K, i = n / g.Kw, j = n % g.Kw;
    win.load(bg + b * g.H * g.W, weight, i * g.sh, j * g.sw);
    mass[t] = win.mass;
    T* mu_o = mu + t * g.C;
    T* sigma_o = sigma + t * g.C;
    T* content_o = content + t * g.C;
    if (!(win.mass >= min_mass)) {  // invalid patch: exactly 0 (SPEC §2)
      std::fill(mu_o, mu_o + g.C, T(0));
      std::fill(sigma_o, sigma_o + g.C, T(0));
      std::fill(content_o, content_o + g.C, T(0));
      continue;
    }
    window_moments(win, x, x.at(b, i * g.sh, j * g.sw), mu_o, var.data(), d.data());
    for (int64_t c = 0; c < g.C; ++c) {
      const T s = std::sqrt(var[c] + eps);
      sigma_o[c] = s;
      content_o[c] = bias + d[c] / s;
    }
  }
}

// Backward, pass 1, rows of patches t = b·Kh + i in [begin, end): alpha, beta, gamma (B, K, C)
// of every valid patch and channel, so that grad_x_u = Σ_n bg_u (alpha_n + beta_n (x_u - shift))
// + gamma_n weight_r(u) bg_u (COMMON brief), live (B, K) for the patches whose coefficients are
// not all 0, and grad_weight, grad_bias summed per row of patches. alpha is taken relative to a
// per-(b, c) shift so that alpha + beta·x does not cancel for inputs offset by +100.
template <typename T>
void backward_coefficients(const Geom& g, XView<T> x, const T* bg, const T* weight,
                           const T* shift, const T* gmu, const T* gsigma, const T* gcontent,
                           T eps, T min_mass, T* alpha, T* beta, T* gamma, uint8_t* live,
                           T* gw_rows, T* gb_rows, int64_t begin, int64_t end) {
  Window<T> win(g);
  constexpr int64_t L = std::is_same<T, float>::value ? Wide::L : 1;
  std::vector<T> accv(g.P * L), m(g.C), var(g.C), d(g.C);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.Kh, i = t % g.Kh;
    T* gw = gw_rows + t * g.P;  // zeros: the tails' sums go straight in
    std::fill(accv.begin(), accv.end(), T(0));
    T gb = 0;
    for (int64_t j = 0; j < g.Kw; ++j) {
      const int64_t n = i * g.Kw + j, o = (b * g.K + n) * g.C;
      win.load(bg + b * g.H * g.W, weight, i * g.sh, j * g.sw);
      if (!(win.mass >= min_mass)) continue;  // coefficients stay 0: no gradient
      const T M = win.mass;
      const T* xw = x.at(b, i * g.sh, j * g.sw);
      window_moments(win, x, xw, m.data(), var.data(), d.data());
      bool any = false, any_gamma = false;
      for (int64_t c = 0; c < g.C; ++c) {
        const T s = std::sqrt(var[c] + eps);
        const T gm = gmu[o + c], gs = gsigma[o + c], gc = gcontent[o + c];
        const T ga = gc / s;
        const T be = gs / (M * s) - gc * d[c] / (M * s * s * s);
        const T al = gm / M - gc * win.ws / (M * s) - be * (m[c] - shift[b * g.C + c]);
        alpha[o + c] = al, beta[o + c] = be, gamma[o + c] = ga;
        any = any || al != T(0) || be != T(0) || ga != T(0);
        any_gamma = any_gamma || ga != T(0);
        gb += gc;
      }
      live[b * g.K + n] = any;
      if (any_gamma)
        window_weight_grad(g, x, xw, win.bg.data(), gamma + o, m.data(), accv.data(), gw);
    }
    if constexpr (std::is_same<T, float>::value)
      if (g.C >= Wide::L)
        for (int64_t u = 0; u < g.P; ++u) gw[u] += Wide::hsum(Wide::load(accv.data() + u * L));
    gb_rows[t] = gb;
  }
}

// One output row's sums over the patches covering it: a patch's alpha and beta go to its column's
// (Kw, C) sums, since they are the same over all its pixels; sg (W, C) += gamma·weight_q over the
// patch's pixel columns [col0, col0 + pw).
template <typename T>
struct Scatter {
  const T *al, *be, *ga, *wr;
  T *sa, *sb, *sg;
  int64_t C, pw;

  template <class Ln, int NV>
  REGHARM_INLINE void run(int64_t c0) {
    using V = typename Ln::V;
    V gm[NV];
    for (int v = 0; v < NV; ++v) {
      const int64_t c = c0 + v * Ln::L;
      Ln::store(sa + c, Ln::load(sa + c) + Ln::load(al + c));
      Ln::store(sb + c, Ln::load(sb + c) + Ln::load(be + c));
      gm[v] = Ln::load(ga + c);
    }
    for (int64_t q = 0; q < pw; ++q) {
      const V w = Ln::splat(wr[q]);
      for (int v = 0; v < NV; ++v) {
        T* pg = sg + q * C + c0 + v * Ln::L;
        Ln::store(pg, Ln::load(pg) + gm[v] * w);
      }
    }
  }
};

// grad x of one pixel, every channel: bg·(Σ_j alpha_j + Σ_j beta_j·(x - shift) + sg) over the
// patch columns j in [j_lo, j_hi] that cover it.
template <typename T>
struct PixelGrad {
  const T *sa, *sb, *sg, *xp, *shift;
  T bg, *out;
  int64_t C, j_lo, j_hi;

  template <class Ln, int NV>
  REGHARM_INLINE void run(int64_t c0) {
    using V = typename Ln::V;
    for (int v = 0; v < NV; ++v) {
      const int64_t c = c0 + v * Ln::L;
      V a = Ln::splat(0), b = Ln::splat(0);
      for (int64_t j = j_lo; j <= j_hi; ++j) {
        a += Ln::load(sa + j * C + c);
        b += Ln::load(sb + j * C + c);
      }
      const V r = Ln::splat(bg) * (a + b * (Ln::load(xp + c) - Ln::load(shift + c)) +
                                   Ln::load(sg + c));
      Ln::store(out + c, r);
    }
  }
};

// Backward, pass 2, image rows t = b·H + h in [begin, end): every pixel gathers from the
// patches covering it, so no two threads write the same pixel. grad_x is (B, C, H, W)
// contiguous: a row is made as (W, C), then written out one channel at a time (measured: no
// slower than in tiles of 16 or 64 pixels, or than an 8 x 8 register transpose).
template <typename T>
void backward_gather(const Geom& g, XView<T> x, const T* bg, const T* weight, const T* shift,
                     const T* alpha, const T* beta, const T* gamma, const uint8_t* live,
                     T* grad_x, int64_t begin, int64_t end) {
  const int64_t C = g.C;
  std::vector<T> sa(g.Kw * C), sb(g.Kw * C), sg(g.W * C), row(g.W * C);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.H, h = t % g.H;
    std::fill(sa.begin(), sa.end(), T(0));
    std::fill(sb.begin(), sb.end(), T(0));
    std::fill(sg.begin(), sg.end(), T(0));
    // patch rows i with i*sh <= h <= i*sh + ph - 1
    const int64_t i_lo = h + 1 > g.ph ? (h - g.ph + g.sh) / g.sh : 0;
    const int64_t i_hi = std::min(g.Kh - 1, h / g.sh);
    for (int64_t i = i_lo; i <= i_hi; ++i) {
      for (int64_t j = 0; j < g.Kw; ++j) {
        const int64_t n = i * g.Kw + j;
        if (!live[b * g.K + n]) continue;
        const int64_t o = (b * g.K + n) * C;
        Scatter<T> f{alpha + o, beta + o, gamma + o, weight + (h - i * g.sh) * g.pw,
                     sa.data() + j * C, sb.data() + j * C, sg.data() + j * g.sw * C, C, g.pw};
        for_channel_blocks<T>(C, f);
      }
    }
    const T* bgr = bg + (b * g.H + h) * g.W;
    for (int64_t w = 0; w < g.W; ++w) {
      // patch columns j with j*sw <= w <= j*sw + pw - 1 (none right of the last patch)
      const int64_t j_lo = w + 1 > g.pw ? (w - g.pw + g.sw) / g.sw : 0;
      const int64_t j_hi = std::min(g.Kw - 1, w / g.sw);
      PixelGrad<T> f{sa.data(), sb.data(), sg.data() + w * C, x.at(b, h, w), shift + b * C,
                     bgr[w], row.data() + w * C, C, j_lo, j_hi};
      for_channel_blocks<T>(C, f);
    }
    for (int64_t c = 0; c < C; ++c) {
      T* out = grad_x + ((b * C + c) * g.H + h) * g.W;
      for (int64_t w = 0; w < g.W; ++w) out[w] = row[w * C + c];
    }
  }
}
