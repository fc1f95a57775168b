// The attention_ext._C Python module: loading it registers every op (ops.cpp and the
// per-device implementations). It also exports the limits and codes of common/ (the
// Python checks read them from here), the CPU kernel build switch and the CUDA path.
#include <torch/extension.h>

#include <ATen/native/CPUBlas.h>

#include <chrono>

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

// Frees the kept scratch of the build in this capsule (an ISA module's table), or of the
// portable build with None.
void release_cpu_workspace(py::object cap) {
  attention_ext::cpu::release_workspace(
      cap.is_none() ? nullptr : static_cast<const attention_ext::cpu::KernelTable*>(cap.cast<py::capsule>().get_pointer()));
}

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

// Seconds per call of one bf16 tile product C (M x N) += A (M x K) * B (K x N), best of
// `rounds` interleaved rounds of `reps` calls each: ours (the active build's gemm_bf16, B
// in our VNNI pairs) and oneDNN's brgemm through ATen (B packed once with cpublas::pack
// where it can), single-threaded as inside our kernels. Returns (ours, brgemm, largest
// |difference| of their C).
py::tuple tile_product_seconds(int64_t M, int64_t N, int64_t K, int64_t rounds, int64_t reps) {
  const auto ours = attention_ext::cpu::active_kernels().tile_product_bf16;
  const auto pack = attention_ext::cpu::active_kernels().pack_vnni;
  TORCH_CHECK(ours != nullptr && pack != nullptr, "the active CPU build has no bf16 tile products");
  TORCH_CHECK(M > 0 && N > 0 && K > 0 && N % 16 == 0 && rounds > 0 && reps > 0,
              "need M, K > 0, N a positive multiple of 16, rounds and reps > 0");
  const at::NoGradGuard no_grad;
  const int64_t K2 = (K + 1) / 2 * 2;
  auto a = at::zeros({M, K2}, at::kBFloat16);
  a.narrow(1, 0, K).normal_();
  auto b = at::randn({K, N}).to(at::kBFloat16);
  auto b_ours = at::empty({K2 / 2, N, 2}, at::kBFloat16);
  auto flags = at::empty({K2}, at::kByte);
  pack(b.data_ptr<at::BFloat16>(), K, N, b_ours.data_ptr<at::BFloat16>(), N, K2, flags.data_ptr<uint8_t>());
  const bool packed = at::native::cpublas::could_pack(at::kBFloat16);
  auto b_onednn = b;
  if (packed) {
    b_onednn = at::empty({K2 / 2, N, 2}, at::kBFloat16);
    at::native::cpublas::pack(K, N, N, N, at::kBFloat16, at::kBFloat16, b.data_ptr(), b_onednn.data_ptr());
  }
  auto c_ours = at::zeros({M, N}), c_onednn = at::zeros({M, N});
  auto run_ours = [&] {
    ours(M, N, K, a.data_ptr<at::BFloat16>(), b_ours.data_ptr<at::BFloat16>(), c_ours.data_ptr<float>(), false);
  };
  auto run_onednn = [&] {
    at::native::cpublas::brgemm(M, N, K, K2, N, N, false, a.data_ptr<at::BFloat16>(),
                                b_onednn.data_ptr<at::BFloat16>(), c_onednn.data_ptr<float>(), packed);
  };
  auto seconds = [&](auto& fn) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < reps; ++r) fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / double(reps);
  };
  run_ours(), run_onednn();  // warm-up: oneDNN generates its kernel on the first call
  double best_ours = 1e30, best_onednn = 1e30;
  for (int64_t r = 0; r < rounds; ++r) {
    best_ours = std::min(best_ours, seconds(run_ours));
    best_onednn = std::min(best_onednn, seconds(run_onednn));
  }
  at::native::cpublas::brgemm_release(packed);
  return py::make_tuple(best_ours, best_onednn, (c_ours - c_onednn).abs().max().item<double>());
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
  m.def("_release_cpu_workspace", &release_cpu_workspace,
        "Free the scratch an ISA build (capsule, or None: the portable build) keeps between calls");
  m.def("_exp2_poly", &exp2_poly, "The CPU kernels' vectorised exp2 (for tests)");
  m.def("_tanh_fast", &tanh_fast, "The CPU kernels' vectorised tanh of the softcap (for tests)");
  m.def("_cpu_tile_shapes", &cpu_tile_shapes, "((fwd BQ, BK), (bwd BQ, BK)) of the CPU kernels (for tests)");
  m.def("_cpu_decode_kernel_stats", &attention_ext::cpu::decode_kernel_stats,
        "(calls, last split in keys) of the CPU decode kernel (for tests)");
  m.def("_pack_vnni", &pack_vnni, "The bf16 tiles' VNNI pack of the active CPU build (for tests)");
  m.def("_tile_product_seconds", &tile_product_seconds,
        "Our bf16 tile product against oneDNN's brgemm, seconds per call (for benchmarks/bench_tile_products.py)");
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
