// The register attention kernels (attention_registers.cuh) as the launchers of
// masked_attention_kernels.cu see them: one set of three kernels and their shared-memory sizes
// per dtype and padded D, E, compiled in attention_registers_*.cu (units that build in parallel,
// each heavy with unrolled fragment code: float32 on CUDA cores alone took 40 s of nvcc on a CI
// core).
#pragma once

#include <cstddef>

#include "attention_common.cuh"
#include "kernels.h"

namespace regharm {
namespace cuda {

constexpr int kRegRows = 16 * (kThreads / 32);  // rows per block: 16 per warp (64)
constexpr int kRegKeys = 64;                    // keys per streamed tile (forward, dQ)
constexpr int kRegQueries = 32;                 // queries per streamed tile (dK/dV)

// D and E padded to 64 or 128: two sizes keep the build short (3 kernels x 4 maths x 4), and
// smaller ones would mostly save work on shapes too small to matter.
inline int reg_dim(int v) { return v <= 64 ? 64 : 128; }

template <typename T>
struct RegKernelSet {
  void (*fwd)(AttnArgs<T, float>, T*, float*);
  void (*dq)(AttnArgs<T, float>, BwdArgs<T, float>);
  void (*dkdv)(AttnArgs<T, float>, BwdArgs<T, float>);
  size_t fwd_smem, dq_smem, dkdv_smem;
  // 16-bit: the kernels that stream their tiles (key tiles; the dK/dV kernel's query tiles)
  // through two stages (the next tile's copies in flight during this one's products), else null
  void (*fwd2)(AttnArgs<T, float>, T*, float*) = nullptr;
  void (*dq2)(AttnArgs<T, float>, BwdArgs<T, float>) = nullptr;
  void (*dkdv2)(AttnArgs<T, float>, BwdArgs<T, float>) = nullptr;
  size_t fwd2_smem = 0, dq2_smem = 0, dkdv2_smem = 0;
};

// The kernels for s (D, E <= 128): 16-bit on tensor cores; float32 on CUDA cores, or as
// 3xTF32 on tensor cores when s.tf32x3.
template <typename T> RegKernelSet<T> reg_kernels(const AttnShape& s);
template <> RegKernelSet<float> reg_kernels<float>(const AttnShape& s);
template <> RegKernelSet<__half> reg_kernels<__half>(const AttnShape& s);
template <> RegKernelSet<__nv_bfloat16> reg_kernels<__nv_bfloat16>(const AttnShape& s);
// What reg_kernels<float> returns under tf32x3, and under simt_mma_lanes.
RegKernelSet<float> reg_kernels_tf32x3(const AttnShape& s);
RegKernelSet<float> reg_kernels_f32_mma_lanes(const AttnShape& s);

}  // namespace cuda
}  // namespace regharm
