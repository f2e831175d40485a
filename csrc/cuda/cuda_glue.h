// Argument checks and conversions shared by the torch glue of the CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

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

// Grid dimensions y and z of the kernels are limited to 65535.
inline void check_grid_dim(int64_t v, const char* what, const char* op) {
  TORCH_CHECK(v <= 65535, op, ": ", what, " = ", v, " exceeds the CUDA kernels' limit of 65535");
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace regharm
