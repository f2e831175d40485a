// Torch glue of the CUDA masked_attention kernels (SPEC §3): checks, dtype conversions,
// allocation, the current stream. The kernels themselves are in masked_attention_kernels.cu;
// shapes they cannot hold (D > 256, E > 512, or tiles beyond the GPU's shared memory) go to the
// dense ATen path of dense_attention.h instead of failing.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "cuda_glue.h"
#include "dense_attention.h"
#include "kernels.h"

namespace regharm {
namespace cuda {
namespace {

constexpr const char* kOp = "regharm::masked_attention (CUDA)";
constexpr const char* kOpBw = "regharm::masked_attention_backward (CUDA)";

struct Checked {
  AttnDims dims;
  AttnShape shape;
  bool tiled;  // false: the tiled kernels cannot hold these sizes, use the dense path
};

// REGHARM_CUDA_FP32_MATH: how float32 tile products run. tf32x3 (three tf32 products per
// float32 one: float32-grade accuracy, as cuBLAS/CUTLASS "fast fp32" and the Triton backend's
// tf32x3) needs sm_80's tensor cores; older GPUs stay on CUDA cores.
bool fp32_on_tensor_cores(const at::Tensor& q, const char* op) {
  const std::string mode = env_choice(
      "REGHARM_CUDA_FP32_MATH", {{"simt", "CUDA cores"}, {"tf32x3", "tensor cores"}}, op);
  if (q.scalar_type() != at::kFloat || mode != "tf32x3") return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  return major >= 8;
}

// REGHARM_CUDA_ATTENTION: the kernels of 16-bit and float32 inputs, tiles in registers where
// D, E <= 128 (attention_registers.cuh: mma.sync on sm_80+ for 16-bit and tf32x3, float32 FMAs
// on any GPU) or the shared-memory tile kernels (masked_attention_kernels.cu).
bool tile_kernels_asked(const char* op) {
  return env_choice("REGHARM_CUDA_ATTENTION",
                    {{"auto", "register kernels where they apply"},
                     {"tiles", "shared-memory tile kernels"}},
                    op) == "tiles";
}

// REGHARM_CUDA_DQ: how the register kernels get dQ. "auto" takes "atomic" for float32, whose
// CUDA-core products make the dQ kernel's recomputation of S and dP the costliest part of the
// backward, and "kernel" for 16-bit; atomics are not deterministic, so
// torch.use_deterministic_algorithms(True) always gets "kernel".
bool dq_atomic_asked(const at::Tensor& q, const char* op) {
  const std::string mode = env_choice(
      "REGHARM_CUDA_DQ",
      {{"auto", "atomics for float32"}, {"atomic", "dQ added up with atomics by the dK/dV kernel"},
       {"kernel", "dQ by its own deterministic kernel"}},
      op);
  if (at::globalContext().deterministicAlgorithms() || mode == "kernel") return false;
  return mode == "atomic" || q.scalar_type() == at::kFloat;
}

// REGHARM_CUDA_SIMT_LANES: the lane order of the float32 CUDA-core register kernels, PairedLanes
// (lanes that read the same shared-memory address sit next to each other, simt_products.cuh) or
// mma.sync's order (the kernels of GPU run 2).
bool simt_mma_lanes_asked(const char* op) {
  return env_choice("REGHARM_CUDA_SIMT_LANES",
                    {{"paired", "the default"}, {"mma", "mma.sync's lane order"}}, op) == "mma";
}

// REGHARM_CUDA_FWD_SPLIT: whether the float32 register forward splits each query tile's keys
// over two blocks (attention_registers.cuh) or runs one block per query tile (GPU run 2's).
bool fwd_key_split_asked(const at::Tensor& q, const char* op) {
  return env_choice("REGHARM_CUDA_FWD_SPLIT",
                    {{"auto", "float32's forward splits the keys over two blocks"},
                     {"off", "one block per query tile"}},
                    op) == "auto" &&
         q.scalar_type() == at::kFloat;
}

// REGHARM_CUDA_KEY_ORDER: whether the register kernels visit the keys in compacted order, the
// kept ones first, or in raster order, skipping only key tiles with every key removed (GPU run
// 2's).
bool key_order_asked(const char* op) {
  return env_choice("REGHARM_CUDA_KEY_ORDER",
                    {{"auto", "kept keys first"}, {"raster", "the keys in their own order"}},
                    op) == "auto";
}

// REGHARM_CUDA_PIPELINE: whether the 16-bit register kernels stream their tiles (key tiles;
// the dK/dV kernel's query tiles) through two stages of shared memory (the next tile's copies
// in flight during this one's products) or one (GPU run 2's loops).
bool pipeline_asked(const at::Tensor& q, const char* op) {
  return env_choice("REGHARM_CUDA_PIPELINE",
                    {{"auto", "16-bit streamed tiles through two stages"},
                     {"off", "one stage: each tile loaded, then used"}},
                    op) == "auto" &&
         q.element_size() == 2;
}

// Called under a guard on q's device (the shared-memory check asks that device).
Checked check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& key_bias, const std::optional<at::Tensor>& query_mask,
                   const char* op) {
  const AttnDims d =
      check_attention_args(OnCuda{op, q.device()}, q, k, v, key_bias, query_mask, op);
  AttnShape s{};
  s.B = d.B, s.L = d.L, s.N = d.N;
  // grid z of the kernels holds B: at most 65535
  if (d.D > kMaxHeadDim || d.E > kMaxValueDim || d.B > 65535) return {d, s, false};
  s.D = int(d.D), s.E = int(d.E);
  s.tf32x3 = fp32_on_tensor_cores(q, op);
  s.tiles = tile_kernels_asked(op);
  s.dq_atomic = dq_atomic_asked(q, op);
  s.simt_mma_lanes = simt_mma_lanes_asked(op);
  s.fwd_key_split = fwd_key_split_asked(q, op);
  s.key_order = key_order_asked(op);
  s.pipeline = pipeline_asked(q, op);
  return {d, s, masked_attention_fits(dtype_tag(q), s, nullptr, nullptr)};
}

// The kernels read rows through batch and row strides; only the feature dim must be dense.
at::Tensor dense_rows(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}
RowStrides row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

const bool* mask_ptr(const std::optional<at::Tensor>& query_mask, at::Tensor& holder) {
  if (!query_mask.has_value() || !query_mask->defined()) return nullptr;
  holder = query_mask->contiguous();
  return holder.data_ptr<bool>();
}

std::tuple<at::Tensor, at::Tensor> masked_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_bias,
    const std::optional<at::Tensor>& query_mask, double scale) {
  TORCH_CHECK(q.defined() && q.is_cuda(), kOp, ": q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto [d, s, tiled] = check_args(q, k, v, key_bias, query_mask, kOp);
  if (!tiled) return dense::forward(q, k, v, key_bias, query_mask, scale);
  const auto qd = dense_rows(q), kd = dense_rows(k), vd = dense_rows(v);
  const auto bias = key_bias.to(acc_dtype(q)).contiguous();
  at::Tensor mask;
  const bool* mp = mask_ptr(query_mask, mask);
  auto out = at::empty({s.B, s.L, s.E}, q.options());
  auto lse = at::empty({s.B, s.L}, q.options().dtype(at::kFloat));
  auto workspace = at::empty({int64_t(masked_attention_forward_workspace(s))},
                             q.options().dtype(at::kByte));
  check_launch(masked_attention_forward(dtype_tag(q), qd.data_ptr(), row_strides(qd),
                                        kd.data_ptr(), row_strides(kd), vd.data_ptr(),
                                        row_strides(vd), bias.data_ptr(), mp, s, scale,
                                        out.data_ptr(), lse.data_ptr<float>(),
                                        workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               kOp);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& key_bias, const std::optional<at::Tensor>& query_mask,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  TORCH_CHECK(q.defined() && q.is_cuda(), kOpBw, ": q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto [d, s, tiled] = check_args(q, k, v, key_bias, query_mask, kOpBw);
  check_attention_saved(OnCuda{kOpBw, q.device()}, d, grad_out, out, lse, kOpBw);
  if (!tiled) return dense::backward(grad_out, q, k, v, key_bias, query_mask, out, lse, scale);
  const auto dt = q.scalar_type();
  const auto qd = dense_rows(q), kd = dense_rows(k), vd = dense_rows(v);
  const auto god = dense_rows(grad_out.to(dt)), od = dense_rows(out.to(dt));
  const auto lsed = lse.to(at::kFloat).contiguous();
  const auto bias = key_bias.to(acc_dtype(q)).contiguous();
  at::Tensor mask;
  const bool* mp = mask_ptr(query_mask, mask);
  const auto tag = dtype_tag(q);
  auto workspace = at::empty({int64_t(masked_attention_backward_workspace(tag, s))},
                             q.options().dtype(at::kByte));
  auto dq = at::empty({s.B, s.L, s.D}, q.options());
  auto dk = at::empty({s.B, s.N, s.D}, q.options());
  auto dv = at::empty({s.B, s.N, s.E}, q.options());
  check_launch(masked_attention_backward(tag, god.data_ptr(), row_strides(god), qd.data_ptr(),
                                         row_strides(qd), kd.data_ptr(), row_strides(kd),
                                         vd.data_ptr(), row_strides(vd), bias.data_ptr(), mp,
                                         od.data_ptr(), row_strides(od), lsed.data_ptr<float>(), s,
                                         scale, workspace.data_ptr(), dq.data_ptr(),
                                         dk.data_ptr(), dv.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream()),
               kOpBw);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(regharm, CUDA, m) {
  m.impl("masked_attention", &masked_attention_cuda);
  m.impl("masked_attention_backward", &masked_attention_backward_cuda);
}

}  // namespace cuda
}  // namespace regharm
