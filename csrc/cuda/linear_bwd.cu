// CUDA body of linear_bwd: recompute the chunk states, per-row normalisers, gradient
// deltas per chunk, their reverse scan, then dq and dk/dv tiles (linear_kernels.cuh).
#include "../common/linear_args.h"
#include "linear_cuda.h"
#include "linear_kernels.cuh"

namespace attention_ext::cuda_linear {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_S, const std::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, int64_t feature_map, bool causal,
    bool normalize, double eps, double scale, int64_t chunk_size) {
  const char* op = "linear_bwd";
  const QkvShape s = check_linear_qkv(op, q, k, v, causal);
  check_linear_params(op, feature_map, chunk_size, eps, scale);
  const auto st0 = check_linear_state(op, "initial state", s, q, S0, z0);
  const at::Tensor S0c = st0.first, z0c = st0.second;
  const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
  const auto st1 = check_linear_bwd_inputs(op, s, q, grad_out, out, grad_S, grad_z);
  const at::Tensor gSc = st1.first, gzc = st1.second;
  check_grid(s.B * s.Hq, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto oc = out.contiguous(), goc = grad_out.contiguous();
  auto dq = at::empty({s.B, s.Hq, s.Nq, s.D}, q.options());
  auto dk = at::empty({s.B, s.Hkv, s.Nk, s.D}, q.options());
  auto dv = at::empty({s.B, s.Hkv, s.Nk, s.Dv}, q.options());
  auto dS0 = at::empty({s.B, s.Hkv, s.D, s.Dv}, sd);
  auto dz0 = at::empty({s.B, s.Hkv, s.D}, sd);
  const int64_t bh = s.B * s.Hkv;
  if (bh == 0) return {dq, dk, dv, dS0, dz0};
  const LinParams p{s.B, s.Hq, s.Hkv, s.Nq, s.Nk, s.D, s.Dv, s.Hq / s.Hkv, feature_map, causal, normalize, eps, scale};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t nck = cdiv(s.Nk, kTile), ncq = cdiv(s.Nq, kTile), E = s.D * s.Dv + s.D;
    const int tilesD = int(cdiv(s.D, kTile)), tilesE = int(cdiv(s.Dv, kTile));
    const scalar_t *qp = qc.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
    const scalar_t *op_ = oc.data_ptr<scalar_t>(), *gop = goc.data_ptr<scalar_t>();

    // 1. chunk states (causal: the state before each chunk; non-causal: the total)
    auto states = at::empty({bh * std::max<int64_t>(nck, 1) * E}, sd);
    acc_t* buf = states.data_ptr<acc_t>();
    launch_key_deltas<scalar_t, acc_t>(p, kp, vp, buf, nck, stream);
    at::Tensor Sfin, zfin;
    if (!causal) {
      Sfin = at::empty({bh * s.D * s.Dv}, sd);
      zfin = at::empty({bh * s.D}, sd);
    }
    launch_scan<acc_t>(buf, bh, nck, s.D, s.Dv, opt_ptr<acc_t>(S0c), opt_ptr<acc_t>(z0c),
                       causal ? nullptr : Sfin.data_ptr<acc_t>(), causal ? nullptr : zfin.data_ptr<acc_t>(),
                       /*reverse=*/false, /*exclusive=*/causal, stream);
    const StateView<acc_t> sview = causal ? chunk_view<acc_t>(buf, nck, s.D, s.Dv)
                                          : split_view<acc_t>(Sfin.data_ptr<acc_t>(), zfin.data_ptr<acc_t>(), s.D,
                                                              s.Dv);
    // 2. normalisers and dd per query row
    at::Tensor den, dd;
    if (normalize) {
      den = at::empty({s.B * s.Hq * s.Nq}, sd);
      dd = at::empty({s.B * s.Hq * s.Nq}, sd);
      if (ncq > 0) {
        rowstats_kernel<scalar_t, acc_t><<<dim3(unsigned(ncq), unsigned(s.B * s.Hq)), kTile, 0, stream>>>(
            p, qp, kp, gop, op_, sview, den.data_ptr<acc_t>(), dd.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    const acc_t* denp = normalize ? den.data_ptr<acc_t>() : nullptr;
    const acc_t* ddp = normalize ? dd.data_ptr<acc_t>() : nullptr;
    // 3. gradient deltas per query chunk; 4. scan: causal backwards (gradient of the state
    //    after each chunk), non-causal the total; the final value is the initial state's gradient
    auto gstates = at::empty({bh * std::max<int64_t>(ncq, 1) * E}, sd);
    acc_t* gbuf = gstates.data_ptr<acc_t>();
    if (ncq > 0) {
      outer_kernel<scalar_t, acc_t, true><<<dim3(unsigned(ncq), unsigned(bh), unsigned(tilesD * tilesE)), kThreads, 0,
                                            stream>>>(p, qp, gop, denp, ddp, gbuf, ncq, tilesE);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_scan<acc_t>(gbuf, bh, ncq, s.D, s.Dv, opt_ptr<acc_t>(gSc), opt_ptr<acc_t>(gzc), dS0.data_ptr<acc_t>(),
                       dz0.data_ptr<acc_t>(), /*reverse=*/causal, /*exclusive=*/causal, stream);
    const StateView<acc_t> gview = causal ? chunk_view<acc_t>(gbuf, ncq, s.D, s.Dv)
                                          : split_view<acc_t>(dS0.data_ptr<acc_t>(), dz0.data_ptr<acc_t>(), s.D,
                                                              s.Dv);
    // 5. dq; 6. dk, dv
    if (ncq > 0) {
      dq_kernel<scalar_t, acc_t><<<dim3(unsigned(ncq), unsigned(s.B * s.Hq), unsigned(tilesD)), kThreads, 0,
                                   stream>>>(p, qp, kp, vp, gop, denp, ddp, sview, dq.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (nck > 0) {
      dkv_kernel<scalar_t, acc_t><<<dim3(unsigned(nck), unsigned(bh), unsigned(tilesD + tilesE)), kThreads, 0,
                                    stream>>>(p, qp, kp, vp, gop, denp, ddp, gview, dk.data_ptr<scalar_t>(),
                                              dv.data_ptr<scalar_t>(), tilesD);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dk, dv, dS0, dz0};
}

}  // namespace attention_ext::cuda_linear
