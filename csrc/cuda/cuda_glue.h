// Argument checks and conversions shared by the torch glue of the CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "kernels.h"

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

// SPEC §1: float32 accumulation, float64 stays float64.
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A defined floating-point CUDA tensor on `device`.
inline void check_float_cuda(const at::Tensor& t, const char* name, const char* op,
                             const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the first "
              "input, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name,
                        const char* op, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", layout, " = ", expected,
              ", got ", t.sizes());
}

// Grid dimensions y and z of the kernels are limited to 65535.
inline void check_grid_dim(int64_t v, const char* what, const char* op) {
  TORCH_CHECK(v <= 65535, op, ": ", what, " = ", v, " exceeds the CUDA kernels' limit of 65535");
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace regharm
