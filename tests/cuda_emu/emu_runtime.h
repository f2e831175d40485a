// CPU emulation of the parts of CUDA that csrc/cuda/*.cu use, so that a machine without a GPU
// can execute the kernels (tests/test_cuda_emulated.py). Force-included (g++ -include) before
// the kernel files, with REGHARM_CUDA_EMULATION defined.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after
// another. A fiber runs until it reaches a barrier (__syncthreads, a warp shuffle, a vote), so
// a missing barrier shows up as a wrong result: the schedule order (forward, reverse, shuffled)
// decides who writes first. The emulator also checks what a GPU would only corrupt silently:
// barriers reached by part of the block or at different lines (divergence), deadlocks, WMMA
// pointer alignment and pitches, 16-byte vector access alignment, dynamic shared memory beyond
// the launch size (guard bytes) or the opt-in limit, and launch configurations. Dynamic shared
// memory starts filled with NaN bytes, so reading an element never written poisons the result.
//
// WMMA fragments hold the whole 16x16 tile in every lane (their real distribution over lanes is
// opaque to the kernels anyway); only lane 0 stores, so a lane that reads a tile stored by its
// warp without a barrier reads stale data.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#undef __host__
#undef __device__
#undef __global__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace emu {

struct Config {
  int smem_optin = 227 * 1024;  // H100
  int sm_count = 4;             // few: exercises the key-tile kernel's query splits
  int cc_major = 9;             // compute capability (the register kernels need 8 or more)
  int order = 0;                // 0 forward, 1 reverse, 2 shuffled every round
  unsigned seed = 1;
  bool reverse_blocks = false;  // blocks of a launch from the last one back
  // cp.async copies land when issued (a missing barrier before a tile is rewritten shows: a
  // warp still reading it sees the next tile), else at the issuing thread's wait (a missing
  // wait or barrier before a tile is read shows: it still holds NaN or the previous tile)
  bool copies_land_early = false;
};
inline Config& config() {
  static Config c;
  return c;
}

inline std::string& error_text() {
  static std::string s;
  return s;
}
inline void fail(const std::string& what) {
  if (error_text().size() < 4000) error_text() += what + "\n";
}

enum State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  State state = kRunnable;
  const char* file = nullptr;
  int line = 0;
};

struct Block {
  dim3 grid, dim;
  uint3 idx;
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  ucontext_t sched;
  int current = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<uint64_t> exchange;
  std::vector<std::array<uint32_t, 10>> mma;  // one lane's a, b, c registers (mma_m16n8k16)
  std::vector<int> votes;
  std::vector<std::vector<uintptr_t>> loads16;  // each lane's 16-byte shared-memory loads
  struct Copy {
    unsigned char* dst;
    std::array<unsigned char, 16> bytes;
    size_t size;
  };
  std::vector<std::vector<Copy>> copies;  // each thread's cp.async copies not yet landed
  std::function<void()>* body = nullptr;
};

inline Block*& block_ptr() {
  static Block* b = nullptr;
  return b;
}
inline Block& blk() { return *block_ptr(); }
inline Fiber& cur() { return blk().fibers[blk().current]; }

inline void yield_to_scheduler() {
  Block& b = blk();
  swapcontext(&b.fibers[b.current].ctx, &b.sched);
}

inline void syncthreads(const char* file, int line) {
  Fiber& f = cur();
  f.state = kBlockBarrier;
  f.file = file;
  f.line = line;
  yield_to_scheduler();
}

inline void warp_barrier() {
  cur().state = kWarpBarrier;
  yield_to_scheduler();
}

inline int syncthreads_or(int pred, const char* file, int line) {
  Block& b = blk();
  const int me = cur().linear;
  b.votes[me] = pred != 0;
  syncthreads(file, line);
  int any = 0;
  for (int v : b.votes) any |= v;
  syncthreads(file, line);  // nobody overwrites a vote before everyone has read them
  return any;
}

// The value of v in lane src_lane(lane) of the calling warp (every lane must call it).
template <typename T, typename F> T shfl_from(T v, F src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  Block& b = blk();
  const int me = cur().linear, base = me & ~31, lane = me & 31;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.exchange[me] = bits;
  warp_barrier();
  const int src = base + (src_lane(lane) & 31);
  if (src >= int(b.fibers.size())) fail("shuffle from a lane outside the block");
  T out;
  std::memcpy(&out, &b.exchange[src], sizeof(T));
  warp_barrier();
  return out;
}

template <typename T> T shfl_xor(T v, int lane_mask) {
  return shfl_from(v, [lane_mask](int lane) { return lane ^ lane_mask; });
}

// Bit l set where lane l of the calling warp passed a true pred (every lane must call it; lanes
// past the end of the block count as false).
inline unsigned ballot(int pred) {
  Block& b = blk();
  const int me = cur().linear, base = me & ~31;
  b.exchange[me] = pred != 0;
  warp_barrier();
  unsigned out = 0;
  for (int l = 0; l < 32 && base + l < int(b.fibers.size()); ++l)
    out |= unsigned(b.exchange[base + l] != 0) << l;
  warp_barrier();
  return out;
}

inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

inline long long& mma_sync_count() {  // mma.sync products run (the register kernels)
  static long long n = 0;
  return n;
}

// mma.sync products a warp's lane 0 ran with cp.async copies of its own still in flight: the
// next key tile loading during this one's products (stream_key_tiles' two stages)
inline long long& overlapped_mma_count() {
  static long long n = 0;
  return n;
}

inline long long& simt_product_count() {  // float32 CUDA-core warp products (register kernels)
  static long long n = 0;
  return n;
}

// The CUDA-core products' 16-byte shared-memory loads (simt_products.cuh's ld4), as warp
// instructions, and what they cost in a model of the SM's shared memory: it returns 128 bytes
// (one register of a warp) per cycle, so a 16-byte load takes 4 cycles, or 2 where lanes n and
// n ^ 1 (or n and n ^ 2) all read the same address (NVIDIA's forum, sm_70/75). Bank conflicts
// are not modelled: the kernels' pitches are chosen to have none.
struct SharedLoadModel {
  long long loads = 0, cycles = 0, paired = 0;
};
inline SharedLoadModel& shared_load_model() {
  static SharedLoadModel m;
  return m;
}
inline void note_shared_load16(const void* p) {
  blk().loads16[cur().linear].push_back(reinterpret_cast<uintptr_t>(p));
}
// Adds up a finished block's loads warp instruction by warp instruction (a lane's i-th load
// and its warp's other lanes' i-th are one instruction: the products run the same loads on
// every lane).
inline void account_shared_loads(Block& b) {
  const int n = int(b.fibers.size());
  for (int w = 0; w * 32 < n; ++w) {
    const size_t count = b.loads16[w * 32].size();
    for (int l = 1; l < 32; ++l)
      if (b.loads16[w * 32 + l].size() != count) {
        fail("lanes of a warp made different numbers of 16-byte shared-memory loads");
        return;
      }
    for (size_t i = 0; i < count; ++i) {
      auto addr = [&](int lane) { return b.loads16[w * 32 + lane][i]; };
      bool pair1 = true, pair2 = true;
      for (int l = 0; l < 32; ++l) {
        pair1 = pair1 && addr(l) == addr(l ^ 1);
        pair2 = pair2 && addr(l) == addr(l ^ 2);
      }
      SharedLoadModel& m = shared_load_model();
      ++m.loads;
      m.paired += pair1 || pair2;
      m.cycles += (pair1 || pair2) ? 2 : 4;
    }
  }
  for (auto& v : b.loads16) v.clear();
}

inline long long& tf32_mma_count();
inline float tf32_truncate(float v);

// One warp-wide product d += A · B (A 16 x K, B K x 8, C and D float 16 x 8 in the m16n8
// accumulator layout): each lane deposits its registers, the warp meets, every lane rebuilds A
// and B with unpack(lane's registers, g, t, A, B) and C from all 32 deposits, and keeps its own
// elements of D. A layout error in a kernel therefore gives wrong numbers here as on the GPU.
template <int K, typename Unpack>
void warp_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], Unpack unpack) {
  Block& bl = blk();
  const int me = cur().linear, base = me & ~31, lane = me & 31;
  if (base + 32 > int(bl.fibers.size())) fail("mma.sync in a partial warp");
  if (lane == 0) {
    ++mma_sync_count();
    if (!bl.copies[me].empty()) ++overlapped_mma_count();
  }
  std::array<uint32_t, 10>& mine = bl.mma[me];
  std::memcpy(mine.data(), a, 16);
  std::memcpy(mine.data() + 4, b, 8);
  std::memcpy(mine.data() + 6, d, 16);
  warp_barrier();
  float A[16][K], B[K][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const std::array<uint32_t, 10>& s = bl.mma[base + l];
    const int g = l >> 2, t = l & 3;
    unpack(s, g, t, A, B);
    float pc[4];
    std::memcpy(pc, s.data() + 6, 16);
    C[g][2 * t] = pc[0], C[g][2 * t + 1] = pc[1];
    C[g + 8][2 * t] = pc[2], C[g + 8][2 * t + 1] = pc[3];
  }
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i >> 1), c = 2 * t + (i & 1);
    float acc = C[r][c];
    for (int k = 0; k < K; ++k) acc += A[r][k] * B[k][c];
    d[i] = acc;
  }
  warp_barrier();  // nobody deposits the next product's registers before all have read these
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} (PTX ISA "Matrix Fragments for
// mma.m16n8k16 with floating point type"; csrc/cuda/mma_sync.cuh spells it out).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto halves = [](uint32_t r, float* out) {
    T pair[2];
    std::memcpy(static_cast<void*>(pair), &r, 4);
    out[0] = to_float(pair[0]);
    out[1] = to_float(pair[1]);
  };
  warp_mma<16>(d, a, b, [&](const std::array<uint32_t, 10>& s, int g, int t, float (&A)[16][16],
                            float (&B)[16][8]) {
    halves(s[0], &A[g][2 * t]);
    halves(s[1], &A[g + 8][2 * t]);
    halves(s[2], &A[g][2 * t + 8]);
    halves(s[3], &A[g + 8][2 * t + 8]);
    float pb[4];
    halves(s[4], pb);
    halves(s[5], pb + 2);
    B[2 * t][g] = pb[0], B[2 * t + 1][g] = pb[1], B[2 * t + 8][g] = pb[2], B[2 * t + 9][g] = pb[3];
  });
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (PTX ISA "Matrix Fragments for
// mma.m16n8k8", .tf32): one element per register, A: a0 (g, t), a1 (g+8, t), a2 (g, t+4),
// a3 (g+8, t+4); B: b0 (t, g), b1 (t+4, g). Inputs read as tf32 (their low 13 bits ignored, as
// the hardware does).
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if ((cur().linear & 31) == 0) ++tf32_mma_count();
  auto f = [](uint32_t r) {
    float v;
    std::memcpy(&v, &r, 4);
    return tf32_truncate(v);
  };
  warp_mma<8>(d, a, b, [&](const std::array<uint32_t, 10>& s, int g, int t, float (&A)[16][8],
                           float (&B)[8][8]) {
    A[g][t] = f(s[0]), A[g + 8][t] = f(s[1]), A[g][t + 4] = f(s[2]), A[g + 8][t + 4] = f(s[3]);
    B[t][g] = f(s[4]), B[t + 4][g] = f(s[5]);
  });
}

inline void check_aligned(const void* p, size_t bytes, const char* what);
inline bool in_shared(const void* p, size_t bytes);

// ldmatrix.sync.aligned.m8n8.x{NUM}{.trans}.shared.b16 (PTX ISA "Warp-level matrix load
// instruction: ldmatrix"): lanes 8i..8i+7 give the row addresses of matrix i; register i of lane
// l holds matrix i's elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1), or with .trans (2(l%4), l/4)
// and (2(l%4)+1, l/4). Rows must be 16-byte aligned and in shared memory.
template <int NUM, bool TRANS, typename T>
void ldmatrix(uint32_t (&r)[NUM], const T* p) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
  Block& bl = blk();
  const int me = cur().linear, base = me & ~31, lane = me & 31;
  if (base + 32 > int(bl.fibers.size())) fail("ldmatrix in a partial warp");
  bl.exchange[me] = reinterpret_cast<uint64_t>(p);
  warp_barrier();
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < NUM; ++i) {
    T pair[2];
    for (int j = 0; j < 2; ++j) {
      const int row = TRANS ? 2 * t + j : g, col = TRANS ? g : 2 * t + j;
      const T* rp = reinterpret_cast<const T*>(bl.exchange[base + 8 * i + row]);
      check_aligned(rp, 16, "ldmatrix row address");
      if (!in_shared(rp, 16)) fail("ldmatrix row outside the dynamic shared memory");
      pair[j] = rp[col];
    }
    std::memcpy(&r[i], static_cast<const void*>(pair), 4);
  }
  warp_barrier();  // nobody replaces an address before all have read them
}

inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s: pointer %p not %zu-byte aligned", what, p, bytes);
    fail(buf);
  }
}

inline unsigned char* dynamic_smem() { return blk().smem; }

inline bool in_shared(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= blk().smem && c + bytes <= blk().smem + blk().smem_bytes;
}

inline std::map<const void*, int>& smem_attribute() {
  static std::map<const void*, int> m;
  return m;
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

constexpr size_t kGuard = 256;
constexpr size_t kStack = 256 * 1024;

// cp.async.cg.shared.global (16 bytes) and cp.async.ca (4 bytes): the source is read at issue
// (it is read-only for the kernel's lifetime), the destination written when the copy lands
// (Config::copies_land_early).
inline long long& async_copy_count() {  // 16-byte copies issued (the attention's tile rows)
  static long long n = 0;
  return n;
}
inline void cp_async(void* dst, const void* src, size_t size) {
  check_aligned(dst, size, "cp.async destination");
  check_aligned(src, size, "cp.async source");
  if (!in_shared(dst, size)) fail("cp.async destination outside the dynamic shared memory");
  Block::Copy c;
  c.dst = static_cast<unsigned char*>(dst);
  c.size = size;
  std::memcpy(c.bytes.data(), src, size);
  if (config().copies_land_early) std::memcpy(c.dst, c.bytes.data(), size);
  else blk().copies[cur().linear].push_back(c);
}
inline void cp_async16(void* dst, const void* src) {
  ++async_copy_count();
  cp_async(dst, src, 16);
}
inline long long& async_copy4_count() {  // 4-byte copies issued (the key tiles' bias)
  static long long n = 0;
  return n;
}
inline void cp_async4(void* dst, const void* src) {
  ++async_copy4_count();
  cp_async(dst, src, 4);
}
// cp.async.wait_all: the calling thread's copies land (other threads' need their own wait and
// a barrier to be seen).
inline void cp_async_wait_all() {
  auto& mine = blk().copies[cur().linear];
  for (const Block::Copy& c : mine) std::memcpy(c.dst, c.bytes.data(), c.size);
  mine.clear();
}

inline void fiber_entry() {
  Block& b = blk();
  (*b.body)();
  if (!b.copies[b.current].empty()) fail("a thread returned with cp.async copies never waited for");
  b.fibers[b.current].state = kDone;
  // returning resumes uc_link (the scheduler)
}

// Runs one block to completion; false when it deadlocked or diverged.
inline bool run_block(Block& b, std::mt19937& rng) {
  const int n = int(b.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.state = kRunnable;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks[i].data();
    f.ctx.uc_stack.ss_size = b.stacks[i].size();
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = config().order == 1 ? n - 1 - i : i;
  for (;;) {
    if (config().order == 2) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int i : order) {
      if (b.fibers[i].state != kRunnable) continue;
      b.current = i;
      swapcontext(&b.sched, &b.fibers[i].ctx);
      ran = true;
    }
    if (ran) continue;
    int done = 0, at_block = 0;
    for (auto& f : b.fibers) {
      done += f.state == kDone;
      at_block += f.state == kBlockBarrier;
    }
    if (done == n) return true;
    // warps whose live lanes all wait at a warp barrier go on: all of them in the forward
    // schedule (warps in lockstep); only the last one (reverse) or the first one (shuffled) in
    // the others, so that one warp runs ahead of the rest until its next block barrier, as
    // warps do on a GPU, and a shared-memory tile rewritten before a slower warp has read it
    // gives wrong results
    std::vector<int> ready;
    for (int w = 0; w * 32 < n; ++w) {
      int live = 0, waiting = 0;
      for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) {
        live += b.fibers[i].state != kDone;
        waiting += b.fibers[i].state == kWarpBarrier;
      }
      if (waiting > 0 && waiting == live) {
        if (live != std::min(n, w * 32 + 32) - w * 32) fail("warp shuffle after some lanes exited");
        ready.push_back(w);
      }
    }
    if (!ready.empty()) {
      if (config().order == 1) ready = {ready.back()};
      else if (config().order == 2) ready = {ready.front()};
      for (int w : ready)
        for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i)
          if (b.fibers[i].state == kWarpBarrier) b.fibers[i].state = kRunnable;
      continue;
    }
    if (at_block + done == n && at_block > 0) {
      if (done > 0) {
        fail("__syncthreads reached after some threads of the block returned");
        return false;
      }
      const Fiber& f0 = b.fibers[0];
      for (auto& f : b.fibers)
        if (f.line != f0.line || std::strcmp(f.file, f0.file) != 0) {
          char buf[400];
          std::snprintf(buf, sizeof buf, "divergent barriers: %s:%d and %s:%d", f0.file, f0.line,
                        f.file, f.line);
          fail(buf);
          return false;
        }
      for (auto& f : b.fibers) f.state = kRunnable;
      continue;
    }
    fail("deadlock: threads wait at different kinds of barrier");
    return false;
  }
}

// The kernel expression of every launch since the tests last took them (the launchers name
// their kernels by what they launch: the tests see which kernel a shape took).
inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}

// overlapped_mma_count() by launch expression (its launches added up)
inline std::map<std::string, long long>& launch_overlaps() {
  static std::map<std::string, long long> m;
  return m;
}

inline void launch(const void* kernel, dim3 grid, dim3 block, size_t smem,
                   std::function<void()> body, const char* name = "") {
  if (launch_log().size() < 4096) launch_log().emplace_back(name);
  const long long overlapped_before = overlapped_mma_count();
  const int n = int(block.x * block.y * block.z);
  char buf[200];
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || n == 0 || n > 1024 || grid.y > 65535 ||
      grid.z > 65535 || n % 32 != 0) {
    std::snprintf(buf, sizeof buf, "bad launch: grid (%u, %u, %u), block (%u, %u, %u)", grid.x,
                  grid.y, grid.z, block.x, block.y, block.z);
    fail(buf);
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  auto it = smem_attribute().find(kernel);
  const size_t allowed = it == smem_attribute().end() ? 48 * 1024 : size_t(it->second);
  if (smem > allowed) {
    std::snprintf(buf, sizeof buf, "launch with %zu bytes of dynamic shared memory, %zu allowed",
                  smem, allowed);
    fail(buf);
    last_error() = cudaErrorInvalidValue;
    return;
  }
  Block b;
  b.grid = grid;
  b.dim = block;
  b.fibers.resize(n);
  b.stacks.assign(n, std::vector<char>(kStack));
  b.exchange.assign(n, 0);
  b.mma.assign(n, {});
  b.votes.assign(n, 0);
  b.loads16.assign(n, {});
  b.copies.assign(n, {});
  b.body = &body;
  for (int i = 0; i < n; ++i) {
    b.fibers[i].linear = i;
    b.fibers[i].tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
  }
  std::vector<unsigned char> raw(smem + 2 * kGuard + 128);
  // 128-byte aligned start, guard bytes on both sides
  unsigned char* base = raw.data() + kGuard;
  base += (128 - reinterpret_cast<uintptr_t>(base) % 128) % 128;
  std::mt19937 rng(config().seed);
  block_ptr() = &b;
  const bool rev = config().reverse_blocks;
  for (unsigned zi = 0; zi < grid.z; ++zi)
    for (unsigned yi = 0; yi < grid.y; ++yi)
      for (unsigned xi = 0; xi < grid.x; ++xi) {
        const unsigned z = rev ? grid.z - 1 - zi : zi, y = rev ? grid.y - 1 - yi : yi,
                       x = rev ? grid.x - 1 - xi : xi;
        std::memset(raw.data(), 0xA5, raw.size());
        std::memset(base, 0xFF, smem);  // NaN in every float format
        b.smem = base;
        b.smem_bytes = smem;
        b.idx = make_uint3(x, y, z);
        if (!run_block(b, rng)) {
          last_error() = cudaErrorLaunchFailure;
          block_ptr() = nullptr;
          return;
        }
        account_shared_loads(b);
        for (unsigned char* p = raw.data(); p < base; ++p)
          if (*p != 0xA5) { fail("write before the dynamic shared memory"); break; }
        for (unsigned char* p = base + smem; p < raw.data() + raw.size(); ++p)
          if (*p != 0xA5) { fail("write past the dynamic shared memory"); break; }
      }
  block_ptr() = nullptr;
  launch_overlaps()[name] += overlapped_mma_count() - overlapped_before;
  if (!error_text().empty()) last_error() = cudaErrorLaunchFailure;
}

}  // namespace emu

// ---- the CUDA names the kernels use ----------------------------------------------------------

#define threadIdx (::emu::cur().tid)
#define blockIdx (::emu::blk().idx)
#define blockDim (::emu::blk().dim)
#define gridDim (::emu::blk().grid)
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_or(p) ::emu::syncthreads_or((p), __FILE__, __LINE__)
#define __syncwarp(...) ::emu::warp_barrier()

template <typename T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return ::emu::shfl_xor(v, lane_mask);
}
template <typename T> inline T __shfl_sync(unsigned, T v, int src_lane, int = 32) {
  return ::emu::shfl_from(v, [src_lane](int) { return src_lane; });
}
inline unsigned __ballot_sync(unsigned, int pred) { return ::emu::ballot(pred); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }

// Fibers switch only at barriers and shuffles, so a read-modify-write is atomic here; the count
// tells the tests which dQ path ran.
namespace emu {
inline long long& atomic_count() {
  static long long n = 0;
  return n;
}
inline long long& vector_atomic_count() {
  static long long n = 0;
  return n;
}
}  // namespace emu
inline float atomicAdd(float* p, float v) {
  ++::emu::atomic_count();
  const float old = *p;
  *p = old + v;
  return old;
}
// sm_90's vector versions: one atomic adds two or four neighbouring values (counted once)
inline float2 atomicAdd(float2* p, float2 v) {
  ++::emu::atomic_count();
  ++::emu::vector_atomic_count();
  const float2 old = *p;
  p->x = old.x + v.x, p->y = old.y + v.y;
  return old;
}
inline float4 atomicAdd(float4* p, float4 v) {
  ++::emu::atomic_count();
  ++::emu::vector_atomic_count();
  const float4 old = *p;
  p->x = old.x + v.x, p->y = old.y + v.y, p->z = old.z + v.z, p->w = old.w + v.w;
  return old;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
namespace emu {
inline long long& flag_count() {  // atomicExch calls: the forward's key splits publishing
  static long long n = 0;
  return n;
}
}  // namespace emu
inline int atomicExch(int* p, int v) {
  ++::emu::flag_count();
  const int old = *p;
  *p = v;
  return old;
}
inline void __threadfence() {}
// round-to-nearest float arithmetic that nvcc never contracts into an FMA
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldg(const T* p) {
  if (sizeof(T) == 16) ::emu::check_aligned(p, 16, "__ldg of a 16-byte vector");
  return *p;
}
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
using std::max;
using std::min;
inline int min(int a, long b) = delete;  // mixed-width min/max are errors in CUDA too

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::emu::last_error();
  ::emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = ::emu::config().smem_optin;
  else if (attr == cudaDevAttrMultiProcessorCount) *v = ::emu::config().sm_count;
  else if (attr == cudaDevAttrComputeCapabilityMajor) *v = ::emu::config().cc_major;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int v) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (v > ::emu::config().smem_optin) {
    ::emu::fail("cudaFuncSetAttribute above the opt-in shared memory limit");
    return cudaErrorInvalidValue;
  }
  ::emu::smem_attribute()[f] = v;
  return cudaSuccess;
}
// Blocks per multiprocessor as the shared memory allows (threads: at most 2048 per SM; the
// registers are not modelled), after the kernel's opt-in.
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F kernel, int threads,
                                                                 size_t smem) {
  auto it = ::emu::smem_attribute().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = it == ::emu::smem_attribute().end() ? 48 * 1024 : size_t(it->second);
  if (smem > allowed || threads <= 0 || threads > 1024) {
    *n = 0;
    return cudaErrorInvalidValue;
  }
  const int by_threads = 2048 / threads;
  const int by_smem = smem == 0 ? 32 : int(size_t(::emu::config().smem_optin) / smem);
  *n = std::max(0, std::min({32, by_threads, by_smem}));
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

// ---- WMMA ------------------------------------------------------------------------------------
// Shapes m16n16k16 (16-bit inputs) and m16n16k8 (precision::tf32, float storage). A tf32 product
// reads only the 19 bits a tf32 keeps (the rest truncated, as the hardware ignores them), so an
// operand that skipped __float_to_tf32 loses accuracy here too.

namespace emu {
inline long long& tf32_mma_count() {  // tensor-core float32 products run (tests ask for them)
  static long long n = 0;
  return n;
}
}  // namespace emu

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

inline float tf32_bits(float v, bool round) {  // round: to nearest, ties away; else truncate
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (round && (u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;  // not for inf / NaN
  u &= ~0x1fffu;
  std::memcpy(&v, &u, 4);
  return v;
}
inline float __float_to_tf32(float v) { return tf32_bits(v, true); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "the emulator models m16n16k16/k8");
  static_assert(std::is_same<Use, accumulator>::value ||
                    (K == 8) == std::is_same<T, precision::tf32>::value,
                "m16n16k8 is the tf32 shape, m16n16k16 the 16-bit one");
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  typename storage<T>::type x[rows * cols];
};

template <typename T> inline void check_tile(const T* p, unsigned ldm, const char* what) {
  ::emu::check_aligned(p, 32, what);
  const unsigned unit = 16 / sizeof(T);  // ldm: multiple of 16 bytes
  if (ldm % unit != 0) ::emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename L, typename S>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const S* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators need a layout");
  static_assert(std::is_same<S, typename storage<T>::type>::value, "pointer of the wrong type");
  check_tile(p, ldm, "wmma::load_matrix_sync");
  constexpr bool row = std::is_same<L, row_major>::value;
  constexpr int R = fragment<Use, M, N, K, T, L>::rows, C = fragment<Use, M, N, K, T, L>::cols;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) f.x[i * C + j] = row ? p[i * ldm + j] : p[j * ldm + i];
}

template <int K, typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, K, T>& f, const T* p, unsigned ldm,
                             layout_t layout) {
  check_tile(p, ldm, "wmma::load_matrix_sync (accumulator)");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i * 16 + j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}

template <int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, K, T>& f, unsigned ldm,
                              layout_t layout) {
  check_tile(p, ldm, "wmma::store_matrix_sync");
  if ((::emu::cur().linear & 31) != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * 16 + j];
}

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  for (auto& e : f.x) e = static_cast<typename storage<T>::type>(v);
}

template <int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, K, float>& d,
                     const fragment<matrix_a, 16, 16, K, T, LA>& a,
                     const fragment<matrix_b, 16, 16, K, T, LB>& b,
                     const fragment<accumulator, 16, 16, K, float>& c) {
  constexpr bool tf32 = std::is_same<T, precision::tf32>::value;
  auto in = [](typename storage<T>::type v) {
    if constexpr (tf32) return tf32_bits(v, false);
    else return float(v);
  };
  if (tf32 && (::emu::cur().linear & 31) == 0) ++::emu::tf32_mma_count();
  float r[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < K; ++k) s += in(a.x[i * K + k]) * in(b.x[k * 16 + j]);
      r[i * 16 + j] = s;
    }
  std::memcpy(d.x, r, sizeof r);
}

}  // namespace wmma
}  // namespace nvcuda

inline float emu::tf32_truncate(float v) { return nvcuda::wmma::tf32_bits(v, false); }
