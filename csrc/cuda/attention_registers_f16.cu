// The register attention kernels for float16 (mma.sync m16n8k16), in a unit of their own so
// that the build compiles the dtypes in parallel (attention_register_set.h).
#include "attention_registers.cuh"

namespace regharm {
namespace cuda {

template <>
RegKernelSet<__half> reg_kernels<__half>(const AttnShape& s) {
  return reg_set_de<TensorCores<__half>>(s);
}

}  // namespace cuda
}  // namespace regharm
