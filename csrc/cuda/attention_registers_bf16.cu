// The register attention kernels for bfloat16 (mma.sync m16n8k16), in a unit of their own so
// that the build compiles the dtypes in parallel (attention_register_set.h).
#include "attention_registers.cuh"

namespace regharm {
namespace cuda {

template <>
RegKernelSet<__nv_bfloat16> reg_kernels<__nv_bfloat16>(const AttnShape& s) {
  return reg_set_de<TensorCores<__nv_bfloat16>>(s);
}

}  // namespace cuda
}  // namespace regharm
