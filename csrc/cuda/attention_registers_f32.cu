// The register attention kernels for float32 on CUDA cores (simt_products.cuh), the default, in
// PairedLanes order; mma.sync's lane order is in attention_registers_f32_mma_lanes.cu and the
// 3xTF32 kernels in attention_registers_tf32x3.cu. Units of their own so that the build compiles
// them in parallel (attention_register_set.h).
#include "attention_registers.cuh"

namespace regharm {
namespace cuda {

template <>
RegKernelSet<float> reg_kernels<float>(const AttnShape& s) {
  if (s.tf32x3) return reg_kernels_tf32x3(s);
  if (s.simt_mma_lanes) return reg_kernels_f32_mma_lanes(s);
  return reg_set_de<CudaCoresF32<PairedLanes>>(s);
}

}  // namespace cuda
}  // namespace regharm
