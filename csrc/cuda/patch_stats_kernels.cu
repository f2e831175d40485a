// CUDA kernels of regharm::patch_stats and its backward (SPEC §2).
//
// A block takes one (image, channel) and a tile of tkh x tkw patches: it reads the pixels under
// the tile once into shared memory (x minus a shift, and bg), sums the rows of every patch
// window once (separable window sums give the mass and Σ bg·x), then each thread finishes one
// patch with a second sweep over its window in shared memory for the centred moments
// Σ bg·(x - mu)² and Σ weight·bg·(x - mu). Centring inside the patch keeps the variance exact
// for inputs offset by +100; the shift (one pixel of the tile) only keeps Σ bg·x small.
//
// Backward: the same tile pass recomputes the statistics in the accumulation type (the saved
// 16-bit ones are rounded), turns the output gradients into per-patch coefficients
//   alpha~ = g_mu/M - g_content·Ws/(M σ),  beta = g_sigma/(M σ) - g_content·D/(M σ³),
//   gamma = g_content/σ,
// so that grad_x_u = bg_u · Σ_{n covering u} [alpha~_n + beta_n (x_u - mu_n) + gamma_n weight_r]
// (alpha~ = alpha + beta·mu of the brief, centred for the same +100 reason), and writes per-block
// partial sums of grad_weight and grad_bias. A gather kernel then gives each pixel its gradient
// from the patches covering it, and a reduction kernel sums the partials: no atomics anywhere,
// so results are deterministic.
#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "device_utils.cuh"

namespace regharm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTile = 16;  // patches per tile side (tkh * tkw <= kThreads)

template <typename T, typename A>
struct PatchArgs {
  const T* x;
  XStrides xs;
  const A* bg;
  BgStrides bs;
  const A* weight;
  int C, Kh, Kw;
  int ph, pw, sh, sw;
  int tkh, tkw, tiles_w;
  bool rotate;  // the per-patch sweep starts at column (patch index mod pw): see tile_moments
  bool w_smem;  // the weights have a copy in shared memory (where it fits)
  A eps, min_mass;
};

template <typename A> struct alignas(sizeof(A) * 4) Coef { A alpha, beta, gamma, mu; };

// A tile pixel as the sweeps read it: bg and the shifted x side by side, one 8-byte load (16
// for float64). Separate arrays took two loads, and the coefficient kernel's weight sums (lanes
// 0-15 and 16-31 on rows rw apart) read each with 2-way bank conflicts at PTL's rw = 76; a
// half-warp reading 16 neighbouring pairs has none.
template <typename A> struct alignas(sizeof(A) * 2) BgX { A bg, x; };
// A patch's gamma and mu for the weight sums: one broadcast load instead of two.
template <typename A> struct alignas(sizeof(A) * 2) GammaMu { A gamma, mu; };

// Shared-memory layout of a tile; the host runs the same constructor with a null base to size it.
template <typename A>
struct TileSmem {
  BgX<A>* px;
  GammaMu<A>* gm;
  A *hb, *hx, *w, *scratch;
  size_t bytes;
  __host__ __device__ TileSmem(unsigned char* base, int tkh, int tkw, int ph, int pw, int sh,
                               int sw, bool w_smem) {
    const int rh = (tkh - 1) * sh + ph, rw = (tkw - 1) * sw + pw;
    SmemCarver c(base);
    px = c.take<BgX<A>>(size_t(rh) * rw);
    hb = c.take<A>(size_t(rh) * tkw);
    hx = c.take<A>(size_t(rh) * tkw);
    gm = c.take<GammaMu<A>>(tkh * tkw);
    w = c.take<A>(w_smem ? ph * pw : 0);
    scratch = c.take<A>(32);
    bytes = c.offset;
  }
};

// Where this block's tile sits: ni x nj patches from patch (i0, j0), pixels from (y0, x0).
struct Tile {
  int b, c, i0, j0, ni, nj, rh, rw;
};

__device__ __forceinline__ Tile tile_of_block(int Kh, int Kw, int tkh, int tkw, int tiles_w,
                                              int ph, int pw, int sh, int sw) {
  Tile t;
  t.b = blockIdx.z;
  t.c = blockIdx.y;
  t.i0 = (blockIdx.x / tiles_w) * tkh;
  t.j0 = (blockIdx.x % tiles_w) * tkw;
  t.ni = min(tkh, Kh - t.i0);
  t.nj = min(tkw, Kw - t.j0);
  t.rh = (t.ni - 1) * sh + ph;  // the last patch ends inside the map: no bounds checks needed
  t.rw = (t.nj - 1) * sw + pw;
  return t;
}

// Pixels per thread whose loads tile_moments issues together (registers: 4 blocks of 256
// threads per SM allow 64 per thread; the tile kernels use 32-48).
constexpr int kPixelBatch = 4;

template <typename A> struct Moments { A mass, mu, var, d, ws; bool valid; };

// Loads the tile's pixels, sums window rows, and returns the statistics of patch `p` of the
// tile (for p < ni*nj; other threads get an invalid patch). Ends with all of shared memory
// written (the caller needs no barrier to read xs, bg).
template <typename T, typename A>
__device__ Moments<A> tile_moments(const PatchArgs<T, A>& a, const Tile& t, const TileSmem<A>& sm,
                                   A shift, int p) {
  const T* xc = a.x + t.b * a.xs.b + t.c * a.xs.c;
  const A* bgi = a.bg + t.b * a.bs.b;
  const int y0 = t.i0 * a.sh, x0 = t.j0 * a.sw;
  // (r, q) of idx carried along instead of divided out at every pixel. A thread's pixels go in
  // batches of kPixelBatch whose loads are all issued before the first store: a loop of
  // load-then-store kept one pixel's two loads in flight (ptxas does not pipeline it), a
  // global round trip per pixel of the thread's share (~21 at PTL's float32 tile).
  const int step_r = blockDim.x / t.rw, step_q = blockDim.x % t.rw;
  const int n = t.rh * t.rw;
  int lr = threadIdx.x / t.rw, lq = threadIdx.x % t.rw;
  for (int idx = threadIdx.x; idx < n; idx += kPixelBatch * blockDim.x) {
    A bv[kPixelBatch] = {};
    T xv[kPixelBatch] = {};
#pragma unroll
    for (int u = 0; u < kPixelBatch; ++u) {
      if (idx + u * int(blockDim.x) < n) {
        const int64_t y = y0 + lr, xx = x0 + lq;
        bv[u] = bgi[y * a.bs.h + xx * a.bs.w];
        xv[u] = xc[y * a.xs.h + xx * a.xs.w];
      }
      lr += step_r, lq += step_q;
      if (lq >= t.rw) lq -= t.rw, ++lr;
    }
#pragma unroll
    for (int u = 0; u < kPixelBatch; ++u)
      if (idx + u * int(blockDim.x) < n)
        sm.px[idx + u * blockDim.x] = BgX<A>{bv[u], to_acc<A>(xv[u]) - shift};
  }
  if (a.w_smem)
    for (int idx = threadIdx.x; idx < a.ph * a.pw; idx += blockDim.x) sm.w[idx] = a.weight[idx];
  __syncthreads();
  // horizontal window sums: row r of the region, patch column j
  for (int idx = threadIdx.x; idx < t.rh * t.nj; idx += blockDim.x) {
    const int r = idx / t.nj, j = idx % t.nj;
    const BgX<A>* win = sm.px + r * t.rw + j * a.sw;
    A sb = 0, sx = 0;
    for (int q = 0; q < a.pw; ++q) {
      const BgX<A> v = win[q];
      sb += v.bg;
      sx += v.bg * v.x;
    }
    sm.hb[r * t.nj + j] = sb;
    sm.hx[r * t.nj + j] = sx;
  }
  __syncthreads();
  Moments<A> m{A(0), A(0), A(0), A(0), A(0), false};
  if (p >= t.ni * t.nj) return m;
  const int i = p / t.nj, j = p % t.nj;
  A s1 = 0;
  for (int r = 0; r < a.ph; ++r) {
    m.mass += sm.hb[(i * a.sh + r) * t.nj + j];
    s1 += sm.hx[(i * a.sh + r) * t.nj + j];
  }
  m.valid = m.mass >= a.min_mass;
  if (!m.valid) return m;
  m.mu = s1 / m.mass;
  // The threads of a warp read neighbouring windows sw apart: at the same column q they hit
  // few banks (PTL's 16x16 patches at stride 4: a half-warp's 8-byte pixels on 4 bank pairs,
  // a 4-way conflict). With `rotate` each thread starts its rows at column p mod pw and wraps
  // (the host turns it on where that spreads the banks: PTL's setting becomes conflict-free).
  const int q0 = a.rotate ? p % a.pw : 0;
  for (int r = 0; r < a.ph; ++r) {
    const BgX<A>* win = sm.px + (i * a.sh + r) * t.rw + j * a.sw;
    const A* ww = (a.w_smem ? sm.w : a.weight) + r * a.pw;
    int q = q0;
    for (int n = 0; n < a.pw; ++n) {
      const BgX<A> v = win[q];
      const A dv = v.x - m.mu, bv = v.bg, wb = ww[q] * bv;
      m.var += bv * dv * dv;
      m.d += wb * dv;
      m.ws += wb;
      q = q + 1 == a.pw ? 0 : q + 1;
    }
  }
  m.var /= m.mass;
  return m;
}

template <typename T, typename A>
__device__ __forceinline__ A tile_shift(const PatchArgs<T, A>& a, const Tile& t) {
  return to_acc<A>(a.x[t.b * a.xs.b + t.c * a.xs.c + int64_t(t.i0 * a.sh) * a.xs.h +
                       int64_t(t.j0 * a.sw) * a.xs.w]);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    patch_stats_fwd_kernel(PatchArgs<T, A> a, const A* __restrict__ bias, T* __restrict__ mu,
                           T* __restrict__ sigma, T* __restrict__ content, T* __restrict__ mass) {
  REGHARM_DYNAMIC_SMEM(raw);
  const TileSmem<A> sm(raw, a.tkh, a.tkw, a.ph, a.pw, a.sh, a.sw, a.w_smem);
  const Tile t = tile_of_block(a.Kh, a.Kw, a.tkh, a.tkw, a.tiles_w, a.ph, a.pw, a.sh, a.sw);
  const A shift = tile_shift(a, t);
  const int p = threadIdx.x;
  const Moments<A> m = tile_moments(a, t, sm, shift, p);
  if (p >= t.ni * t.nj) return;
  const int64_t K = int64_t(a.Kh) * a.Kw;
  const int64_t n = int64_t(t.i0 + p / t.nj) * a.Kw + t.j0 + p % t.nj;
  const int64_t o = (t.b * K + n) * a.C + t.c;
  A mu_v = 0, sigma_v = 0, content_v = 0;
  if (m.valid) {  // invalid patches are exactly 0 (SPEC §2)
    sigma_v = sqrt(m.var + a.eps);
    mu_v = shift + m.mu;
    content_v = bias[0] + m.d / sigma_v;
  }
  mu[o] = from_acc<T>(mu_v);
  sigma[o] = from_acc<T>(sigma_v);
  content[o] = from_acc<T>(content_v);
  if (t.c == 0) mass[t.b * K + n] = from_acc<T>(m.mass);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    patch_stats_coef_kernel(PatchArgs<T, A> a, const A* __restrict__ grad_mu,
                            const A* __restrict__ grad_sigma, const A* __restrict__ grad_content,
                            GradRows rows, Coef<A>* __restrict__ coef, A* __restrict__ partial) {
  REGHARM_DYNAMIC_SMEM(raw);
  const TileSmem<A> sm(raw, a.tkh, a.tkw, a.ph, a.pw, a.sh, a.sw, a.w_smem);
  const Tile t = tile_of_block(a.Kh, a.Kw, a.tkh, a.tkw, a.tiles_w, a.ph, a.pw, a.sh, a.sw);
  const A shift = tile_shift(a, t);
  const int p = threadIdx.x, np = t.ni * t.nj;
  const Moments<A> m = tile_moments(a, t, sm, shift, p);
  const int64_t K = int64_t(a.Kh) * a.Kw;
  A gc_valid = 0;
  if (p < np) {
    const int64_t n = int64_t(t.i0 + p / t.nj) * a.Kw + t.j0 + p % t.nj;
    Coef<A> cf{A(0), A(0), A(0), A(0)};
    if (m.valid) {
      const int64_t row = t.b * K + n;
      const A gm = grad_mu[row * rows.mu + t.c], gs = grad_sigma[row * rows.sigma + t.c];
      const A gc = grad_content[row * rows.content + t.c];
      const A s = sqrt(m.var + a.eps), M = m.mass;
      cf.gamma = gc / s;
      cf.beta = gs / (M * s) - gc * m.d / (M * s * s * s);
      cf.alpha = gm / M - gc * m.ws / (M * s);
      cf.mu = shift + m.mu;
      gc_valid = gc;
    }
    coef[(int64_t(t.b) * a.C + t.c) * K + n] = cf;
    sm.gm[p] = GammaMu<A>{cf.gamma, m.mu};  // mu in the tile's shifted coordinates, like px.x
  }
  // block_sum's barrier also publishes sm.gm
  const A gb = block_sum(gc_valid, sm.scratch);
  const int64_t nblocks = int64_t(gridDim.x) * gridDim.y * gridDim.z;
  const int64_t blk = (int64_t(t.b) * a.C + t.c) * gridDim.x + blockIdx.x;
  const int P = a.ph * a.pw;
  // grad_weight_r += Σ_patches gamma · bg_u · (x_u - mu), u = position r of the patch
  for (int r = threadIdx.x; r < P; r += blockDim.x) {
    const int dy = r / a.pw, dx = r % a.pw;
    A s = 0;
    for (int qi = 0; qi < t.ni; ++qi) {  // patches q = qi * nj + qj in order
      const int row = (qi * a.sh + dy) * t.rw + dx;
      for (int qj = 0; qj < t.nj; ++qj) {
        const GammaMu<A> g = sm.gm[qi * t.nj + qj];
        if (g.gamma == A(0)) continue;
        const BgX<A> v = sm.px[row + qj * a.sw];
        s += g.gamma * v.bg * (v.x - g.mu);
      }
    }
    partial[r * nblocks + blk] = s;
  }
  if (threadIdx.x == 0) partial[int64_t(P) * nblocks + blk] = gb;
}

// grad_w[r] = Σ_blocks partial[r][block], one block per r, and r = P is grad_b; the order of
// the sum depends on the shapes only, so results are deterministic.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    patch_stats_reduce_kernel(const A* __restrict__ partial, int64_t nblocks, int P,
                              A* __restrict__ grad_w, A* __restrict__ grad_b) {
  __shared__ A scratch[32];
  const A* row = partial + int64_t(blockIdx.x) * nblocks;
  A s = 0;
  for (int64_t k = threadIdx.x; k < nblocks; k += blockDim.x) s += row[k];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) (int(blockIdx.x) < P ? grad_w[blockIdx.x] : grad_b[0]) = s;
}

// grad_x of every pixel, gathered from the coefficients of the patches covering it. Block
// (blockIdx.x, blockIdx.y): row y = blockIdx.x / col_blocks of planes bc = blockIdx.y,
// blockIdx.y + gridDim.y, ...; a thread per column. The row's covering patch rows are the same
// for the whole block, and no index needs a 64-bit division (run 1's flat-index version spent
// most of its 124 µs there: five per pixel).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    patch_stats_gather_kernel(PatchArgs<T, A> a, int H, int W, int col_blocks, int64_t planes,
                              const Coef<A>* __restrict__ coef, T* __restrict__ grad_x) {
  const int y = int(blockIdx.x) / col_blocks;
  const int xx = (int(blockIdx.x) % col_blocks) * blockDim.x + threadIdx.x;
  if (xx >= W) return;
  const int64_t K = int64_t(a.Kh) * a.Kw;
  // patches (i, j) with i*sh <= y <= i*sh + ph - 1 and j*sw <= xx <= j*sw + pw - 1
  const int i_lo = y >= a.ph ? (y - a.ph) / a.sh + 1 : 0, i_hi = min(y / a.sh, a.Kh - 1);
  const int j_lo = xx >= a.pw ? (xx - a.pw) / a.sw + 1 : 0, j_hi = min(xx / a.sw, a.Kw - 1);
  for (int64_t bc = blockIdx.y; bc < planes; bc += gridDim.y) {
    const int64_t b = bc / a.C;  // one division per plane, not per pixel
    const int c = int(bc - b * a.C);
    const A bgv = a.bg[b * a.bs.b + y * a.bs.h + xx * a.bs.w];
    A g = 0;
    if (bgv != A(0)) {  // every term carries a factor bg_u
      const A xv = to_acc<A>(a.x[b * a.xs.b + c * a.xs.c + y * a.xs.h + xx * a.xs.w]);
      const Coef<A>* cb = coef + bc * K;
      for (int i = i_lo; i <= i_hi; ++i) {
        const A* wrow = a.weight + (y - i * a.sh) * a.pw;
        for (int j = j_lo; j <= j_hi; ++j) {
          const Coef<A> cf = cb[int64_t(i) * a.Kw + j];
          g += cf.alpha + cf.beta * (xv - cf.mu) + cf.gamma * wrow[xx - j * a.sw];
        }
      }
      g *= bgv;
    }
    grad_x[(bc * H + y) * W + xx] = from_acc<T>(g);
  }
}

// The gather where every window is a whole number of strides (ph = kh*sh, pw = kw*sw with kh,
// kw <= 4: PTL's default patch and stride at any size). The patches covering pixel (y, x) are
// then exactly those covering its cell (y / sh, x / sw): patch (qy - i, qx - j) for i < kh,
// j < kw, at offset (i*sh + y % sh, j*sw + x % sw) inside it. So a thread adds up its cell's
// coefficients once for the sh rows it takes there (the per-pixel gather above loads kh*kw
// 16-byte coefficients at every pixel: run 2's 130 µs at PTL's setting) and keeps the gammas in
// registers:
//   grad_x_u = bg_u (Σ[alpha~ + beta (s - mu)] + (x_u - s) Σ beta + Σ gamma weight_r)
// with s the thread's pixel of the cell's first row: the same centring as the per-pixel form
// (s and every mu are of one neighbourhood), so inputs offset by +100 stay as exact. The sum
// does not depend on s, only its rounding does, so a foreground pixel serves as well.
// The weights a pixel needs depend on (y % sh, x % sw) only: shared memory holds them as 16
// contiguous values per offset (zero where i >= kh or j >= kw), rows padded by 4 so that the
// lanes' offsets fall in different banks: four 16-byte loads per pixel, no index arithmetic.
// A block takes a row of columns (a thread each) over kCellRows rows (whole cells) of planes
// blockIdx.y, blockIdx.y + gridDim.y, ...; each thread first loads its column of x and bg over
// those rows into shared memory, all loads in flight at once: one row at a time left the
// kernel waiting on memory latency with a few hundred bytes in flight per warp.
constexpr int kCellK = 4, kCellKK = kCellK * kCellK, kCellStride = kCellKK + 4, kCellRows = 16;

template <typename A> struct alignas(4 * sizeof(A)) Quad { A v[4]; };

// Rows of a block of the cells gather: whole cells, at most kCellRows (sh <= kCellRows).
__host__ __device__ inline int cell_block_rows(int sh) { return kCellRows / sh * sh; }

// Shared memory of patch_stats_gather_cells_kernel; the host runs it with a null base to size it.
template <typename A>
struct CellSmem {
  A *w, *x, *bg;
  size_t bytes;
  __host__ __device__ CellSmem(unsigned char* base, int sh, int sw, int threads) {
    SmemCarver c(base);
    w = c.take<A>(size_t(sh) * sw * kCellStride);
    x = c.take<A>(size_t(kCellRows) * threads);
    bg = c.take<A>(size_t(kCellRows) * threads);
    bytes = c.offset;
  }
};

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    patch_stats_gather_cells_kernel(PatchArgs<T, A> a, int H, int W, int col_blocks,
                                    int64_t planes, const Coef<A>* __restrict__ coef,
                                    T* __restrict__ grad_x) {
  REGHARM_DYNAMIC_SMEM(raw);
  const CellSmem<A> sm(raw, a.sh, a.sw, blockDim.x);
  const int kh = a.ph / a.sh, kw = a.pw / a.sw;
  for (int idx = threadIdx.x; idx < a.sh * a.sw * kCellKK; idx += blockDim.x) {
    const int off = idx / kCellKK, k = idx - off * kCellKK, i = k / kCellK, j = k % kCellK;
    const int ry = off / a.sw, rx = off - ry * a.sw;
    sm.w[off * kCellStride + k] =
        i < kh && j < kw ? a.weight[(i * a.sh + ry) * a.pw + j * a.sw + rx] : A(0);
  }
  __syncthreads();
  const int xx = (int(blockIdx.x) % col_blocks) * blockDim.x + threadIdx.x;
  if (xx >= W) return;
  const int rows = cell_block_rows(a.sh);
  const int y0 = (int(blockIdx.x) / col_blocks) * rows, n = min(H - y0, rows);
  const int qx = xx / a.sw, rx = xx - qx * a.sw;
  const int64_t K = int64_t(a.Kh) * a.Kw;
  A* const xs = sm.x + threadIdx.x;  // this thread's column: row r at [r * blockDim.x]
  A* const bgs = sm.bg + threadIdx.x;
  for (int64_t bc = blockIdx.y; bc < planes; bc += gridDim.y) {
    const int64_t b = bc / a.C;  // one division per plane
    const int c = int(bc - b * a.C);
    const T* xp = a.x + b * a.xs.b + c * a.xs.c + int64_t(y0) * a.xs.h + xx * a.xs.w;
    const A* bgp = a.bg + b * a.bs.b + int64_t(y0) * a.bs.h + xx * a.bs.w;
#pragma unroll
    for (int r = 0; r < kCellRows; ++r) {
      A xv = 0, bv = 0;
      if (r < n) xv = to_acc<A>(xp[r * a.xs.h]), bv = bgp[r * a.bs.h];
      xs[r * blockDim.x] = xv;
      bgs[r * blockDim.x] = bv;
    }
    const Coef<A>* cb = coef + bc * K;
    T* out = grad_x + (bc * H + y0) * W + xx;
    A gam[kCellKK];
    A sum_a = 0, sum_b = 0, s = 0;
    const int qy0 = y0 / a.sh;
    for (int r = 0; r < n; ++r) {
      const int cell = r / a.sh, ry = r - cell * a.sh;
      const A xv = xs[r * blockDim.x];
      if (ry == 0) {  // a new cell: its coefficients, centred on this pixel
        s = xv, sum_a = 0, sum_b = 0;
        const int qy = qy0 + cell;
#pragma unroll
        for (int k = 0; k < kCellKK; ++k) {
          const int pi = qy - k / kCellK, pj = qx - k % kCellK;
          Coef<A> cf{A(0), A(0), A(0), A(0)};
          if (k / kCellK < kh && k % kCellK < kw && pi >= 0 && pi < a.Kh && pj >= 0 && pj < a.Kw)
            cf = cb[int64_t(pi) * a.Kw + pj];
          gam[k] = cf.gamma;
          sum_a += cf.alpha + cf.beta * (s - cf.mu);
          sum_b += cf.beta;
        }
      }
      const A bgv = bgs[r * blockDim.x];
      A g = 0;
      if (bgv != A(0)) {  // every term carries a factor bg_u
        A t = sum_a + sum_b * (xv - s);
        const auto* wq = reinterpret_cast<const Quad<A>*>(sm.w + (ry * a.sw + rx) * kCellStride);
        REGHARM_CHECK_ALIGNED(wq, sizeof(Quad<A>));
#pragma unroll
        for (int k4 = 0; k4 < kCellKK / 4; ++k4) {
          const Quad<A> w4 = wq[k4];
#pragma unroll
          for (int e = 0; e < 4; ++e) t += gam[4 * k4 + e] * w4.v[e];
        }
        g = t * bgv;
      }
      out[int64_t(r) * W] = from_acc<T>(g);
    }
  }
}

struct TileChoice {
  int tkh, tkw, tiles_h, tiles_w;
  bool rotate, w_smem;
  size_t smem;
};

// Shared-memory wavefronts of the first warp's sweep reads (tile_moments) at window row 0,
// averaged over the columns. Each lane reads one BgX (2 * elem bytes); shared memory serves a
// warp's 8-byte loads as two half-warp phases (16-byte ones as four quarter-warp phases), each
// taking as many wavefronts as the most distinct 4-byte words one bank serves in it.
inline double sweep_conflicts(const PatchShape& s, int tkh, int tkw, bool rotate, size_t elem) {
  const int rw = (tkw - 1) * s.sw + s.pw, words = int(2 * elem / 4);
  const int lanes = std::min(32, tkh * tkw), phase = std::max(1, 32 / words);
  double total = 0;
  for (int q = 0; q < s.pw; ++q) {
    for (int p0 = 0; p0 < lanes; p0 += phase) {
      int64_t seen[32][32];
      int count[32] = {}, worst = 1;
      for (int p = p0; p < std::min(lanes, p0 + phase); ++p) {
        const int i = p / tkw, j = p % tkw;
        const int col = rotate ? (q + p % s.pw) % s.pw : q;
        const int64_t first = (int64_t(i) * s.sh * rw + j * s.sw + col) * words;
        for (int64_t word = first; word < first + words; ++word) {
          const int bank = int(word % 32);
          bool dup = false;
          for (int k = 0; k < count[bank]; ++k) dup |= seen[bank][k] == word;
          if (!dup) seen[bank][count[bank]++] = word;
          worst = std::max(worst, count[bank]);
        }
      }
      total += worst;
    }
  }
  return total / s.pw;
}

// The largest tile (at most 16 x 16 patches) within 64 KB of shared memory (48 KB where the
// device offers no more), then balanced (below); a patch too large for that takes a
// single-patch tile with the device's opt-in maximum. 64 KB: PTL's float32 setting gets tiles
// 16 patches wide (16 x 8 tiles left half of each block idle).
template <typename A>
TileChoice tiles_for(const PatchShape& s, int max_smem) {
  const size_t soft = std::min<size_t>(64 * 1024, std::max(48 * 1024, max_smem));
  TileChoice tc;
  tc.tkh = int(std::min<int64_t>(kMaxTile, s.Kh));
  tc.tkw = int(std::min<int64_t>(kMaxTile, s.Kw));
  for (;;) {
    tc.smem = TileSmem<A>(nullptr, tc.tkh, tc.tkw, s.ph, s.pw, s.sh, s.sw, false).bytes;
    if (tc.smem <= soft || (tc.tkh == 1 && tc.tkw == 1)) break;
    if (tc.tkw >= tc.tkh) tc.tkw = (tc.tkw + 1) / 2;
    else tc.tkh = (tc.tkh + 1) / 2;
  }
  // Tiles of equal height for the same number of tiles: PTL's 29 patch rows as 15 + 14
  // instead of 16 + 13. Fewer idle threads in the last tile, and PTL's float32 tile takes
  // 56 064 bytes instead of 59 648: four blocks per H100 SM (57 344 each at most) instead of
  // three, its 1024 blocks in two waves instead of three. The width (the lanes' layout in the
  // bank simulation) is balanced too where that reads shared memory with no more conflicts.
  auto balanced = [](int64_t K, int tk) {
    const int64_t n = (K + tk - 1) / tk;
    return int((K + n - 1) / n);
  };
  tc.tkh = balanced(s.Kh, tc.tkh);
  const int tkw = balanced(s.Kw, tc.tkw);
  if (tkw != tc.tkw &&
      std::min(sweep_conflicts(s, tc.tkh, tkw, true, sizeof(A)),
               sweep_conflicts(s, tc.tkh, tkw, false, sizeof(A))) <=
          std::min(sweep_conflicts(s, tc.tkh, tc.tkw, true, sizeof(A)),
                   sweep_conflicts(s, tc.tkh, tc.tkw, false, sizeof(A))))
    tc.tkw = tkw;
  tc.smem = TileSmem<A>(nullptr, tc.tkh, tc.tkw, s.ph, s.pw, s.sh, s.sw, false).bytes;
  tc.tiles_h = int((s.Kh + tc.tkh - 1) / tc.tkh);
  tc.tiles_w = int((s.Kw + tc.tkw - 1) / tc.tkw);
  tc.rotate = sweep_conflicts(s, tc.tkh, tc.tkw, true, sizeof(A)) <
              sweep_conflicts(s, tc.tkh, tc.tkw, false, sizeof(A));
  // the weights' copy (rotated threads read different weights) where it stays within the
  // budget the tiles were chosen for: the largest patches keep their limit
  const size_t with_w = TileSmem<A>(nullptr, tc.tkh, tc.tkw, s.ph, s.pw, s.sh, s.sw, true).bytes;
  tc.w_smem = with_w <= (tc.smem <= soft ? soft : size_t(max_smem));
  if (tc.w_smem) tc.smem = with_w;
  return tc;
}

// tiles_for, remembered per shape: an op call asks up to three times (fits, workspace,
// launch), and the bank simulation is host time on calls that are host-bound on a GPU.
template <typename A>
TileChoice choose_tiles(const PatchShape& s) {
  static std::mutex lock;
  static std::map<std::tuple<int64_t, int64_t, int, int, int, int, int>, TileChoice> known;
  const int max_smem = max_dynamic_smem();
  const auto key = std::make_tuple(s.Kh, s.Kw, s.ph, s.pw, s.sh, s.sw, max_smem);
  std::lock_guard<std::mutex> guard(lock);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  if (known.size() > 4096) known.clear();  // shapes seen by a long-running process stay few
  return known[key] = tiles_for<A>(s, max_smem);
}

template <typename T, typename A>
PatchArgs<T, A> make_args(const void* x, XStrides xs, const void* bg, BgStrides bs,
                          const void* weight, const PatchShape& s, const TileChoice& tc,
                          double eps, double min_mass) {
  PatchArgs<T, A> a;
  a.x = static_cast<const T*>(x);
  a.xs = xs;
  a.bg = static_cast<const A*>(bg);
  a.bs = bs;
  a.weight = static_cast<const A*>(weight);
  a.C = int(s.C);
  a.Kh = int(s.Kh);
  a.Kw = int(s.Kw);
  a.ph = s.ph, a.pw = s.pw, a.sh = s.sh, a.sw = s.sw;
  a.tkh = tc.tkh, a.tkw = tc.tkw, a.tiles_w = tc.tiles_w;
  a.rotate = tc.rotate;
  a.w_smem = tc.w_smem;
  a.eps = A(eps);
  a.min_mass = A(min_mass);
  return a;
}

inline int64_t num_blocks(const PatchShape& s, const TileChoice& tc) {
  return int64_t(tc.tiles_h) * tc.tiles_w * s.C * s.B;
}

inline bool empty(const PatchShape& s) { return s.B == 0 || s.C == 0 || s.Kh <= 0 || s.Kw <= 0; }

// Whether the backward's gather runs by cells (patch_stats_gather_cells_kernel): windows of
// whole strides, kh and kw at most 4, whole cells in a block's rows (sh <= 16) and the shared
// memory within 48 KB; else (or where the glue asks for it: REGHARM_CUDA_PS_GATHER=pixels) the
// per-pixel gather.
template <typename A>
bool gather_by_cells(const PatchShape& s, int threads) {
  if (s.pixel_gather || s.ph % s.sh != 0 || s.pw % s.sw != 0) return false;
  if (s.ph / s.sh > kCellK || s.pw / s.sw > kCellK || s.sh > kCellRows) return false;
  return CellSmem<A>(nullptr, s.sh, s.sw, threads).bytes <= 48 * 1024;
}

template <typename T>
cudaError_t forward_impl(const void* x, XStrides xs, const void* bg, BgStrides bs,
                         const void* weight, const void* bias, const PatchShape& s, double eps,
                         double min_mass, void* mu, void* sigma, void* content, void* mass,
                         cudaStream_t stream) {
  using A = acc_t<T>;
  if (empty(s)) return cudaSuccess;
  const TileChoice tc = choose_tiles<A>(s);
  const auto a = make_args<T, A>(x, xs, bg, bs, weight, s, tc, eps, min_mass);
  auto kern = patch_stats_fwd_kernel<T, A>;
  cudaError_t err = allow_smem(reinterpret_cast<const void*>(kern), tc.smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(tc.tiles_h * tc.tiles_w), unsigned(s.C), unsigned(s.B));
  REGHARM_LAUNCH(kern, grid, dim3(kThreads), tc.smem, stream, a, static_cast<const A*>(bias),
                 static_cast<T*>(mu), static_cast<T*>(sigma), static_cast<T*>(content),
                 static_cast<T*>(mass));
  return cudaGetLastError();
}

template <typename A>
struct Workspace {
  Coef<A>* coef;
  A* partial;
  size_t bytes;
  Workspace(void* base, const PatchShape& s, const TileChoice& tc) {
    unsigned char* b = static_cast<unsigned char*>(base);
    const size_t coef_bytes = align_up(sizeof(Coef<A>) * size_t(s.B * s.C * s.Kh * s.Kw), 256);
    coef = reinterpret_cast<Coef<A>*>(b);
    partial = reinterpret_cast<A*>(b + coef_bytes);
    bytes = coef_bytes + sizeof(A) * size_t(s.ph * s.pw + 1) * size_t(num_blocks(s, tc));
  }
};

template <typename T>
size_t workspace_impl(const PatchShape& s) {
  using A = acc_t<T>;
  if (empty(s)) return 0;
  return Workspace<A>(nullptr, s, choose_tiles<A>(s)).bytes;
}

template <typename T>
cudaError_t backward_impl(const void* grad_mu, const void* grad_sigma, const void* grad_content,
                          GradRows grad_rows, const void* x, XStrides xs, const void* bg,
                          BgStrides bs, const void* weight, const PatchShape& s, double eps,
                          double min_mass, void* workspace, void* grad_x, void* grad_w,
                          void* grad_b, cudaStream_t stream) {
  using A = acc_t<T>;
  const int P = s.ph * s.pw;
  const int64_t total = s.B * s.C * s.H * s.W;
  if (empty(s)) {  // nothing to sum: zero gradients
    cudaError_t err = cudaMemsetAsync(grad_w, 0, sizeof(A) * P, stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(grad_b, 0, sizeof(A), stream);
    if (err == cudaSuccess && total > 0)
      err = cudaMemsetAsync(grad_x, 0, sizeof(T) * size_t(total), stream);
    return err;
  }
  const TileChoice tc = choose_tiles<A>(s);
  const auto a = make_args<T, A>(x, xs, bg, bs, weight, s, tc, eps, min_mass);
  const Workspace<A> ws(workspace, s, tc);
  const int64_t nblocks = num_blocks(s, tc);

  auto coef_kern = patch_stats_coef_kernel<T, A>;
  cudaError_t err = allow_smem(reinterpret_cast<const void*>(coef_kern), tc.smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(tc.tiles_h * tc.tiles_w), unsigned(s.C), unsigned(s.B));
  REGHARM_LAUNCH(coef_kern, grid, dim3(kThreads), tc.smem, stream, a,
                 static_cast<const A*>(grad_mu), static_cast<const A*>(grad_sigma),
                 static_cast<const A*>(grad_content), grad_rows, ws.coef, ws.partial);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  auto reduce_kern = patch_stats_reduce_kernel<A>;
  // one warp per 32 partial sums, at most kThreads: few tiles (large patches) need few threads
  const int reduce_threads = int(std::min<int64_t>(kThreads, (nblocks + 31) / 32 * 32));
  REGHARM_LAUNCH(reduce_kern, dim3(unsigned(P + 1)), dim3(reduce_threads), 0, stream,
                 static_cast<const A*>(ws.partial), nblocks, P, static_cast<A*>(grad_w),
                 static_cast<A*>(grad_b));
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // threads along a row: W rounded up to whole warps (at least 2, at most kThreads). A fixed
  // 256 left half of every block idle at PTL's W = 128, and an SM holds 8 such blocks (2048
  // threads): 32 working warps instead of 64 to hide the coefficient loads' latency.
  const int threads = int(std::min<int64_t>(kThreads, std::max<int64_t>(64, (s.W + 31) / 32 * 32)));
  const int col_blocks = int((s.W + threads - 1) / threads);
  const int64_t planes = s.B * s.C;
  const unsigned plane_blocks = unsigned(std::min<int64_t>(planes, 65535));
  if (gather_by_cells<A>(s, threads)) {
    auto cells_kern = patch_stats_gather_cells_kernel<T, A>;
    const int64_t chunks = (s.H + cell_block_rows(s.sh) - 1) / cell_block_rows(s.sh);
    REGHARM_LAUNCH(cells_kern, dim3(unsigned(chunks * col_blocks), plane_blocks), dim3(threads),
                   CellSmem<A>(nullptr, s.sh, s.sw, threads).bytes, stream, a, int(s.H),
                   int(s.W), col_blocks, planes, static_cast<const Coef<A>*>(ws.coef),
                   static_cast<T*>(grad_x));
    return cudaGetLastError();
  }
  auto gather_kern = patch_stats_gather_kernel<T, A>;
  REGHARM_LAUNCH(gather_kern, dim3(unsigned(s.H * col_blocks), plane_blocks), dim3(threads), 0,
                 stream, a, int(s.H), int(s.W), col_blocks, planes,
                 static_cast<const Coef<A>*>(ws.coef), static_cast<T*>(grad_x));
  return cudaGetLastError();
}

}  // namespace

cudaError_t patch_stats_forward(DType dt, const void* x, XStrides xs, const void* bg, BgStrides bs,
                                const void* weight, const void* bias, const PatchShape& s,
                                double eps, double min_mass, void* mu, void* sigma, void* content,
                                void* mass, cudaStream_t stream) {
  REGHARM_DISPATCH(dt, forward_impl, x, xs, bg, bs, weight, bias, s, eps, min_mass, mu, sigma,
                   content, mass, stream)
  return cudaErrorInvalidValue;
}

bool patch_stats_fits(DType dt, const PatchShape& s, size_t* need, size_t* have) {
  const size_t bytes = empty(s) ? 0
                       : dt == DType::kFloat64 ? choose_tiles<double>(s).smem
                                               : choose_tiles<float>(s).smem;
  const size_t limit = bytes <= 48 * 1024 ? 48 * 1024 : size_t(max_dynamic_smem());
  if (need) *need = bytes;
  if (have) *have = limit;
  return bytes <= limit;
}

size_t patch_stats_backward_workspace(DType dt, const PatchShape& s) {
  REGHARM_DISPATCH(dt, workspace_impl, s)
  return 0;
}

cudaError_t patch_stats_backward(DType dt, const void* grad_mu, const void* grad_sigma,
                                 const void* grad_content, GradRows rows, const void* x,
                                 XStrides xs, const void* bg, BgStrides bs, const void* weight,
                                 const PatchShape& s, double eps, double min_mass,
                                 void* workspace, void* grad_x, void* grad_w, void* grad_b,
                                 cudaStream_t stream) {
  REGHARM_DISPATCH(dt, backward_impl, grad_mu, grad_sigma, grad_content, rows, x, xs, bg, bs,
                   weight, s, eps, min_mass, workspace, grad_x, grad_w, grad_b, stream)
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace regharm
