// The register attention kernels for float32 on CUDA cores with mma.sync's lane order
// (REGHARM_CUDA_SIMT_LANES=mma; run 2's kernels), so that a GPU run times both orders in one
// process (simt_products.cuh says why the default differs). A unit of its own so that the build
// compiles it in parallel with the others (attention_register_set.h).
#include "attention_registers.cuh"

namespace regharm {
namespace cuda {

RegKernelSet<float> reg_kernels_f32_mma_lanes(const AttnShape& s) {
  return reg_set_de<CudaCoresF32<MmaLanes>>(s);
}

}  // namespace cuda
}  // namespace regharm
