// Helpers shared by the CPU kernels: the ISA dispatch, the device rule of the argument checks
// (op_args.h) and the conversion to the accumulation dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "op_args.h"

#define REGHARM_INLINE inline __attribute__((always_inline))

// Each kernel header (with simd.h) is compiled twice, in namespaces isa_base and isa_avx2: once
// for the baseline ISA, once for AVX2+FMA between REGHARM_AVX2_BEGIN and REGHARM_AVX2_END (GCC
// on x86-64 only; elsewhere the baseline copy alone). cpu_has_avx2() picks the copy at run time,
// so one build serves every x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REGHARM_HAVE_AVX2_COPY 1
#define REGHARM_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define REGHARM_AVX2_END _Pragma("GCC pop_options")
#else
#define REGHARM_HAVE_AVX2_COPY 0
#endif

// Calls fn from namespace isa_avx2 when the CPU has AVX2+FMA, else from isa_base.
#if REGHARM_HAVE_AVX2_COPY
#define REGHARM_ISA_CALL(fn, ...) \
  (cpu_has_avx2() ? isa_avx2::fn(__VA_ARGS__) : isa_base::fn(__VA_ARGS__))
#else
#define REGHARM_ISA_CALL(fn, ...) isa_base::fn(__VA_ARGS__)
#endif

namespace regharm {
namespace cpu {

// REGHARM_CPU_BASELINE=1 in the environment forces the baseline copy (to test it on any CPU).
inline bool cpu_has_avx2() {
#if REGHARM_HAVE_AVX2_COPY
  static const bool ok = [] {
    const char* forced = std::getenv("REGHARM_CPU_BASELINE");
    if (forced != nullptr && std::string(forced) == "1") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// The CPU kernels' device rule for op_args.h's checks: a defined CPU tensor.
struct OnCpu {
  const char* op;
  void operator()(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t.device().is_cpu(), op, " (CPU kernel): ", name, " must be a CPU tensor, got ",
                t.device());
  }
};

// The tensor in the accumulation dtype, contiguous (no copy when it already is both).
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// A (B, C, H, W) tensor in the accumulation dtype, channels-last (no copy when it already is
// both): the model's CPU layout, read in place by the kernels that take it.
inline at::Tensor to_acc_channels_last(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace cpu
}  // namespace regharm
