// The register attention kernels for float32 as 3xTF32 mma.sync (REGHARM_CUDA_FP32_MATH=
// tf32x3), in a unit of their own so that the build compiles them in parallel with the others
// (attention_register_set.h).
#include "attention_registers.cuh"

namespace regharm {
namespace cuda {

RegKernelSet<float> reg_kernels_tf32x3(const AttnShape& s) {
  return reg_set_de<TensorCores<float>>(s);
}

}  // namespace cuda
}  // namespace regharm
