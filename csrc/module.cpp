// The attention_ext._C Python module: loading it registers every op (ops.cpp and the
// per-device implementations). It also exports the limits and codes of common/ (the
// Python checks read them from here), the CPU kernel build switch and the CUDA path.
#include <torch/extension.h>

#include "common/limits.h"
#include "common/linear.h"
#include "common/mask.h"
#include "cpu/isa.h"
#ifdef AE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>

#include "cuda/attention_path.h"
#endif

namespace attention_ext::cpu {
std::pair<int64_t, int64_t> decode_kernel_stats();  // cpu/attention_ops.cpp
}

namespace {

bool set_cpu_kernels(py::capsule cap) {
  auto* table = static_cast<const attention_ext::cpu::KernelTable*>(cap.get_pointer());
  return attention_ext::cpu::set_active_kernels(table);
}

void reset_cpu_kernels() { attention_ext::cpu::set_active_kernels(nullptr); }

std::string cpu_isa() { return attention_ext::cpu::active_kernels().isa; }

// A vector function of the active CPU build over a float32 tensor (tests bound its error).
using UnaryFn = void (*)(const float*, float*, int64_t);
at::Tensor apply_unary(UnaryFn fn, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor");
  auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  fn(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}

at::Tensor exp2_poly(const at::Tensor& x) { return apply_unary(attention_ext::cpu::active_kernels().exp2, x); }
at::Tensor tanh_fast(const at::Tensor& x) { return apply_unary(attention_ext::cpu::active_kernels().tanh, x); }

// ((fwd BQ, BK), (bwd BQ, BK)): the float32 tiles of the active CPU build for a mask of
// this kind and block size (tests bound the kernels' scratch with it).
py::tuple cpu_tile_shapes(int64_t kind, int64_t block_size, int64_t nq, int64_t nk) {
  attention_ext::MaskSpec m;
  m.kind = kind, m.block_size = block_size, m.nq = nq, m.nk = nk, m.offset = nk - nq;
  int64_t t[4];
  attention_ext::cpu::active_kernels().tile_shapes(m, nq, nk, t);
  return py::make_tuple(py::make_tuple(t[0], t[1]), py::make_tuple(t[2], t[3]));
}

// The active build's VNNI pack of a bf16 (kn, nn) matrix: ((k_pad / 2, ldn, 2) pairs,
// (k_pad,) non-finite flags), for the round-trip tests of the bf16 tiles.
py::tuple pack_vnni(const at::Tensor& x, int64_t ldn, int64_t k_pad) {
  const auto fn = attention_ext::cpu::active_kernels().pack_vnni;
  TORCH_CHECK(fn != nullptr, "the active CPU build has no bf16 tile products");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "x must be a 2-D bfloat16 CPU tensor");
  TORCH_CHECK(ldn >= x.size(1) && k_pad >= x.size(0) && k_pad % 2 == 0, "need ldn >= nn and an even k_pad >= kn");
  auto xc = x.contiguous();
  auto dst = at::full({k_pad / 2, ldn, 2}, 7.0, xc.options());  // 7: what the pack must overwrite
  auto bad = at::full({k_pad}, 9, xc.options().dtype(at::kByte));
  fn(xc.data_ptr<at::BFloat16>(), xc.size(0), xc.size(1), dst.data_ptr<at::BFloat16>(), ldn, k_pad,
     bad.data_ptr<uint8_t>());
  return py::make_tuple(dst, bad);
}

#ifdef AE_WITH_CUDA
// (tensor_core, bucket, reason) for an exact-attention call on q's CUDA device.
py::tuple cuda_attention_path(const at::Tensor& q, int64_t head_dim, int64_t value_dim, bool backward,
                              bool deterministic) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto p = attention_ext::cuda::attention_path(q.scalar_type(), head_dim, value_dim, backward, deterministic);
  return py::make_tuple(p.tensor_core, p.bucket, p.reason);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("_set_cpu_kernels", &set_cpu_kernels, "Use the CPU kernel table in this capsule (from an ISA module)");
  m.def("_reset_cpu_kernels", &reset_cpu_kernels, "Go back to the portable CPU kernels built into _C");
  m.def("_exp2_poly", &exp2_poly, "The CPU kernels' vectorised exp2 (for tests)");
  m.def("_tanh_fast", &tanh_fast, "The CPU kernels' vectorised tanh of the softcap (for tests)");
  m.def("_cpu_tile_shapes", &cpu_tile_shapes, "((fwd BQ, BK), (bwd BQ, BK)) of the CPU kernels (for tests)");
  m.def("_cpu_decode_kernel_stats", &attention_ext::cpu::decode_kernel_stats,
        "(calls, last split in keys) of the CPU decode kernel (for tests)");
  m.def("_pack_vnni", &pack_vnni, "The bf16 tiles' VNNI pack of the active CPU build (for tests)");
  m.def("_cpu_isa", &cpu_isa, "Name of the ISA build the CPU ops currently run");
  namespace ae = attention_ext;
  py::dict limits;
  limits["cpu_max_head_dim"] = ae::kCpuMaxHeadDim;
  limits["cuda_max_head_dim"] = ae::kCudaMaxHeadDim;
  limits["cuda_tensor_core_max_head_dim"] = ae::kCudaTensorCoreMaxHeadDim;
  limits["softcap_min"] = ae::kMinSoftcap;
  limits["softcap_max"] = ae::kMaxSoftcap;
  limits["linear_max_dim"] = ae::kLinearMaxDim;
  limits["linear_max_chunk"] = ae::kLinearMaxChunk;
  m.attr("limits") = limits;
  py::dict kinds;
  kinds["dense"] = int64_t(ae::kDense);
  kinds["window"] = int64_t(ae::kWindow);
  kinds["neighborhood"] = int64_t(ae::kNeighborhood);
  kinds["block_layout"] = int64_t(ae::kBlockLayout);
  m.attr("mask_kinds") = kinds;
  py::dict fmaps;
  fmaps["identity"] = int64_t(ae::kFeatureIdentity);
  fmaps["elu"] = int64_t(ae::kFeatureElu);
  fmaps["relu"] = int64_t(ae::kFeatureRelu);
  m.attr("feature_maps") = fmaps;
#ifdef AE_WITH_CUDA
  m.def("_cuda_attention_path", &cuda_attention_path,
        "(tensor_core, bucket, reason): which CUDA kernels an attention call on q's device runs");
#endif
  m.attr("cuda_built") = py::bool_(
#ifdef AE_WITH_CUDA
      true
#else
      false
#endif
  );
}
