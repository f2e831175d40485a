// The register attention kernels for bfloat16 (mma.sync m16n8k16), in a unit of their own so
// that the build compiles the dtypes in parallel (attention_register_set.h).
#include "attention_registers.cuh"

REGHARM_TENSOR_CORE_REG_KERNELS(__nv_bfloat16)
