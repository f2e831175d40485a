// Argument checks and conversions shared by the torch glue of the CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>

#include "kernels.h"
#include "op_args.h"

namespace regharm {
namespace cuda {

inline DType dtype_tag(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

// The CUDA kernels' device rule for op_args.h's checks: a defined tensor on the first input's
// device.
struct OnCuda {
  const char* op;
  at::Device device;
  void operator()(const at::Tensor& t, const char* name) const {
    TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device,
                " like the first input, got ", t.device());
  }
};

// The strides of a (B, C, H, W) tensor as the kernels read it.
inline XStrides strides_of_x(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// Grid dimensions y and z of the kernels are limited to 65535.
inline void check_grid_dim(int64_t v, const char* what, const char* op) {
  TORCH_CHECK(v <= 65535, op, ": ", what, " = ", v, " exceeds the CUDA kernels' limit of 65535");
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

// An environment switch of the CUDA kernels, read on every call so that it can change at
// run time (the benchmarks time both sides of each in one process): its value, or the first
// choice when unset or empty; anything else is an error that lists the choices and their
// meanings.
using Choice = std::pair<const char*, const char*>;  // value, what it means
inline std::string env_choice(const char* name, std::initializer_list<Choice> choices,
                              const char* op) {
  const char* env = std::getenv(name);
  const std::string mode = (env == nullptr || *env == '\0') ? choices.begin()->first : env;
  std::string list;
  size_t i = 0;
  for (const Choice& c : choices) {
    if (mode == c.first) return mode;
    list += std::string(i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + "'" + c.first +
            "' (" + c.second + ")";
    ++i;
  }
  TORCH_CHECK(false, op, ": ", name, " must be ", list, ", got '", mode, "'");
  return mode;  // not reached
}

}  // namespace cuda
}  // namespace regharm
