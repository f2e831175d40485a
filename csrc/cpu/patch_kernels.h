// Window kernels of patch_stats (CPU). patch_stats.cpp includes this file twice, inside two
// namespaces (baseline ISA and AVX2+FMA), so it has no include guard and includes nothing.
// Each function handles one range of a parallel_for.

template <typename T>
REGHARM_INLINE T sum_of(const T* v, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

// One patch window of one image: its background weights, weight·bg, their sums, and scratch.
template <typename T>
struct Window {
  explicit Window(const Geom& g) : g(g), bg(g.P), a(g.P), c1(g.pw), c2(g.pw), c3(g.pw) {}

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

  // Of one channel, xw pointing at the window's top-left pixel: the masked mean mu, the masked
  // variance and d = Σ a·(x - mu).
  void moments(const T* xw, T& mu, T& var, T& d) {
    const int64_t pw = g.pw;
    T* __restrict s1 = c1.data();
    T* __restrict s2 = c2.data();
    T* __restrict s3 = c3.data();
    std::fill(s1, s1 + pw, T(0));
    for (int64_t r = 0; r < g.ph; ++r) {
      const T* __restrict xr = xw + r * g.W;
      const T* __restrict br = bg.data() + r * pw;
      for (int64_t q = 0; q < pw; ++q) s1[q] += br[q] * xr[q];
    }
    mu = sum_of(s1, pw) / mass;
    std::fill(s2, s2 + pw, T(0));
    std::fill(s3, s3 + pw, T(0));
    for (int64_t r = 0; r < g.ph; ++r) {
      const T* __restrict xr = xw + r * g.W;
      const T* __restrict br = bg.data() + r * pw;
      const T* __restrict ar = a.data() + r * pw;
      for (int64_t q = 0; q < pw; ++q) {
        const T dx = xr[q] - mu;
        s2[q] += br[q] * dx * dx;
        s3[q] += ar[q] * dx;
      }
    }
    var = sum_of(s2, pw) / mass;
    d = sum_of(s3, pw);
  }

  const Geom& g;
  std::vector<T> bg, a, c1, c2, c3;
  T mass = 0, ws = 0;
};

// Forward of the patches t = b·K + n in [begin, end).
template <typename T>
void forward_patches(const Geom& g, const T* x, const T* bg, const T* weight, T bias, T eps,
                     T min_mass, T* mu, T* sigma, T* content, T* mass, int64_t begin,
                     int64_t end) {
  Window<T> win(g);
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
    for (int64_t c = 0; c < g.C; ++c) {
      const T* xw = x + ((b * g.C + c) * g.H + i * g.sh) * g.W + j * g.sw;
      T m, var, d;
      win.moments(xw, m, var, d);
      const T s = std::sqrt(var + eps);
      mu_o[c] = m;
      sigma_o[c] = s;
      content_o[c] = bias + d / s;
    }
  }
}

// Backward, pass 1, rows of patches t = b·Kh + i in [begin, end): alpha, beta, gamma of every
// valid patch and channel, so that grad_x_u = Σ_n bg_u (alpha_n + beta_n (x_u - shift)) +
// gamma_n weight_r(u) bg_u (COMMON brief), and grad_weight, grad_bias summed per row of patches.
// alpha is taken relative to a per-(b, c) shift so that alpha + beta·x does not cancel for
// inputs offset by +100.
template <typename T>
void backward_coefficients(const Geom& g, const T* x, const T* bg, const T* weight,
                           const T* shift, const T* gmu, const T* gsigma, const T* gcontent,
                           T eps, T min_mass, T* alpha, T* beta, T* gamma, T* gw_rows,
                           T* gb_rows, int64_t begin, int64_t end) {
  Window<T> win(g);
  std::vector<T> acc(g.P);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.Kh, i = t % g.Kh;
    T* gw = gw_rows + t * g.P;
    T gb = 0;
    for (int64_t j = 0; j < g.Kw; ++j) {
      const int64_t n = i * g.Kw + j;
      win.load(bg + b * g.H * g.W, weight, i * g.sh, j * g.sw);
      if (!(win.mass >= min_mass)) continue;  // coefficients stay 0: no gradient
      const T M = win.mass;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const T* xw = x + ((b * g.C + c) * g.H + i * g.sh) * g.W + j * g.sw;
        T m, var, d;
        win.moments(xw, m, var, d);
        const T s = std::sqrt(var + eps);
        const int64_t o = (b * g.K + n) * g.C + c;
        const T gm = gmu[o], gs = gsigma[o], gc = gcontent[o];
        const T ga = gc / s;
        const T be = gs / (M * s) - gc * d / (M * s * s * s);
        const T al = gm / M - gc * win.ws / (M * s) - be * (m - shift[b * g.C + c]);
        const int64_t oc = (b * g.C + c) * g.K + n;
        alpha[oc] = al, beta[oc] = be, gamma[oc] = ga;
        gb += gc;
        if (ga == T(0)) continue;
        // grad_weight_r += gamma · bg_u · (x_u - mu); bg is applied once per patch below
        for (int64_t r = 0; r < g.ph; ++r) {
          const T* __restrict xr = xw + r * g.W;
          T* __restrict ar = acc.data() + r * g.pw;
          for (int64_t q = 0; q < g.pw; ++q) ar[q] += ga * (xr[q] - m);
        }
      }
      for (int64_t u = 0; u < g.P; ++u) gw[u] += win.bg[u] * acc[u];
    }
    gb_rows[t] = gb;
  }
}

// Backward, pass 2, planes t = b·C + c in [begin, end): every pixel gathers from the patches
// covering it, one output row at a time, so no two threads write the same pixel.
template <typename T>
void backward_gather(const Geom& g, const T* x, const T* bg, const T* weight, const T* shift,
                     const T* alpha, const T* beta, const T* gamma, T* grad_x, int64_t begin,
                     int64_t end) {
  std::vector<T> sa(g.W), sb(g.W), sg(g.W);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.C;
    const T s = shift[t];
    const T* al = alpha + t * g.K;
    const T* be = beta + t * g.K;
    const T* ga = gamma + t * g.K;
    const T* xc = x + t * g.H * g.W;
    const T* bgi = bg + b * g.H * g.W;
    T* gx = grad_x + t * g.H * g.W;
    for (int64_t h = 0; h < g.H; ++h) {
      std::fill(sa.begin(), sa.end(), T(0));
      std::fill(sb.begin(), sb.end(), T(0));
      std::fill(sg.begin(), sg.end(), T(0));
      // patch rows i with i*sh <= h <= i*sh + ph - 1
      const int64_t i_lo = h + 1 > g.ph ? (h - g.ph + g.sh) / g.sh : 0;
      const int64_t i_hi = std::min(g.Kh - 1, h / g.sh);
      for (int64_t i = i_lo; i <= i_hi; ++i) {
        const T* __restrict wr = weight + (h - i * g.sh) * g.pw;
        for (int64_t j = 0; j < g.Kw; ++j) {
          const int64_t n = i * g.Kw + j;
          const T a = al[n], bt = be[n], gm = ga[n];
          if (a == T(0) && bt == T(0) && gm == T(0)) continue;
          T* __restrict pa = sa.data() + j * g.sw;
          T* __restrict pb = sb.data() + j * g.sw;
          T* __restrict pg = sg.data() + j * g.sw;
          for (int64_t q = 0; q < g.pw; ++q) {
            pa[q] += a;
            pb[q] += bt;
            pg[q] += gm * wr[q];
          }
        }
      }
      const T* xr = xc + h * g.W;
      const T* br = bgi + h * g.W;
      T* out = gx + h * g.W;
      for (int64_t w = 0; w < g.W; ++w) out[w] = br[w] * (sa[w] + sb[w] * (xr[w] - s) + sg[w]);
    }
  }
}
