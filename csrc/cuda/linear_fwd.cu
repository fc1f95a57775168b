// CUDA bodies of linear_fwd and linear_step, and the CUDA registration of the linear ops
// (linear_bwd's body is in linear_bwd.cu). Kernels: linear_kernels.cuh.
#include <torch/library.h>

#include "../common/linear_args.h"
#include "linear_cuda.h"
#include "linear_kernels.cuh"

namespace attention_ext::cuda_linear {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const std::optional<at::Tensor>& S0,
                                                               const std::optional<at::Tensor>& z0,
                                                               int64_t feature_map, bool causal, bool normalize,
                                                               double eps, double scale, int64_t chunk_size) {
  const char* op = "linear_fwd";
  const QkvShape s = check_linear_qkv(op, q, k, v, causal);
  check_linear_params(op, feature_map, chunk_size, eps, scale);
  const auto st0 = check_linear_state(op, "initial state", s, q, S0, z0);
  const at::Tensor S0c = st0.first, z0c = st0.second;
  check_grid(s.B * s.Hq, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto S = at::empty({s.B, s.Hkv, s.D, s.Dv}, sd);
  auto z = at::empty({s.B, s.Hkv, s.D}, sd);
  const int64_t bh = s.B * s.Hkv;
  if (bh == 0) return {out, S, z};
  const LinParams p{s.B, s.Hq, s.Hkv, s.Nq, s.Nk, s.D, s.Dv, s.Hq / s.Hkv, feature_map, causal, normalize, eps, scale};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t nck = cdiv(s.Nk, kTile), ncq = cdiv(s.Nq, kTile), E = s.D * s.Dv + s.D;
    auto states = at::empty({bh * std::max<int64_t>(nck, 1) * E}, sd);
    acc_t* buf = states.data_ptr<acc_t>();
    launch_key_deltas<scalar_t, acc_t>(p, kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), buf, nck, stream);
    launch_scan<acc_t>(buf, bh, nck, s.D, s.Dv, opt_ptr<acc_t>(S0c), opt_ptr<acc_t>(z0c), S.data_ptr<acc_t>(),
                       z.data_ptr<acc_t>(), /*reverse=*/false, /*exclusive=*/causal, stream);
    const StateView<acc_t> view = causal ? chunk_view<acc_t>(buf, nck, s.D, s.Dv)
                                         : split_view<acc_t>(S.data_ptr<acc_t>(), z.data_ptr<acc_t>(), s.D, s.Dv);
    if (ncq > 0) {
      const dim3 grid(unsigned(ncq), unsigned(s.B * s.Hq), unsigned(cdiv(s.Dv, kTile)));
      fwd_out_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          p, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), view,
          out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, S, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_step_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& S,
                                                                const at::Tensor& z, int64_t feature_map,
                                                                bool normalize, double eps, double scale) {
  const char* op = "linear_step";
  const QkvShape s = check_linear_qkv(op, q, k, v, /*causal=*/true);
  check_linear_params(op, feature_map, 1, eps, scale);
  const auto st1 = check_linear_state(op, "state", s, q, S, z);
  const at::Tensor Sc = st1.first, zc = st1.second;
  check_grid(s.B * s.Hkv, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto S1 = at::empty({s.B, s.Hkv, s.D, s.Dv}, sd);
  auto z1 = at::empty({s.B, s.Hkv, s.D}, sd);
  const int64_t bh = s.B * s.Hkv;
  if (bh == 0) return {out, S1, z1};
  const LinParams p{s.B, s.Hq, s.Hkv, s.Nq, s.Nk, s.D, s.Dv, s.Hq / s.Hkv, feature_map, true, normalize, eps, scale};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = size_t(2 * s.D + kThreads) * sizeof(acc_t);
    auto kernel = step_kernel<scalar_t, acc_t>;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    const dim3 grid(unsigned(bh), unsigned(cdiv(s.Dv, 32)));
    kernel<<<grid, kThreads, smem, stream>>>(p, s.Nq, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                             vc.data_ptr<scalar_t>(), Sc.data_ptr<acc_t>(), zc.data_ptr<acc_t>(),
                                             out.data_ptr<scalar_t>(), S1.data_ptr<acc_t>(), z1.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, S1, z1};
}

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, CUDA, m) {
  m.impl("linear_fwd", &linear_fwd_cuda);
  m.impl("linear_bwd", &linear_bwd_cuda);
  m.impl("linear_step", &linear_step_cuda);
}

}  // namespace attention_ext::cuda_linear
