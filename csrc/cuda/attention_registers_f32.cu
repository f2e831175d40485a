// The register attention kernels for float32 on CUDA cores (simt_products.cuh), the default;
// the 3xTF32 ones are in attention_registers_tf32x3.cu. Units of their own so that the build
// compiles them in parallel (attention_register_set.h).
#include "attention_registers.cuh"

namespace regharm {
namespace cuda {

template <>
RegKernelSet<float> reg_kernels<float>(const AttnShape& s) {
  return s.tf32x3 ? reg_kernels_tf32x3(s) : reg_set_de<CudaCoresF32>(s);
}

}  // namespace cuda
}  // namespace regharm
