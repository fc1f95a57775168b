// CUDA backend of linear_fwd / linear_bwd / linear_step: the shared op body
// (common/linear_op.h) checks and allocates; this runs the passes of linear_state.cuh,
// linear_fwd.cuh, linear_bwd.cuh and linear_step.cuh (linear_device.cuh has the layout).
#include <torch/library.h>

#include "../common/linear_op.h"
#include "linear_bwd.cuh"
#include "linear_fwd.cuh"
#include "linear_state.cuh"
#include "linear_step.cuh"

namespace attention_ext::cuda::linear {
namespace {

void check_grid(int64_t y, const char* op) {
  TORCH_CHECK(y <= 65535, op, ": batch x heads = ", y, " exceeds the CUDA grid limit 65535");
}

template <typename acc_t>
const acc_t* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// Packed documents (cu_seqlens): document g as a call of its own, rows [cu[g], cu[g + 1]) of
// the single batch row with state row g.
LinearInputs document_inputs(const LinearInputs& in, int64_t g, int64_t len) {
  LinearInputs doc = in;
  doc.cu_seqlens = at::Tensor();
  doc.segments = 1;
  doc.shape.Nq = doc.shape.Nk = len;
  const auto row = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, g, 1) : t; };
  doc.S0 = row(in.S0), doc.z0 = row(in.z0), doc.grad_S = row(in.grad_S), doc.grad_z = row(in.grad_z);
  return doc;
}

// fn(document inputs, g, first row, length) for every document, in order. The CUDA passes
// run once per document from the host (the checks already copied cu_seqlens there): far
// simpler than segment-aware kernels and plainly the per-document definition, at the cost
// of a few launches per document. A length-0 document still runs: its scan copies the
// initial state (or zeros) to its final state. Compiled here, never run: no GPU.
template <class Fn>
void for_each_document(const LinearInputs& in, const Fn& fn) {
  const int32_t* cu = in.cu_seqlens.data_ptr<int32_t>();
  for (int64_t g = 0; g < in.segments; ++g) fn(document_inputs(in, g, cu[g + 1] - cu[g]), g, cu[g], cu[g + 1] - cu[g]);
}

LinParams lin_params(const LinearInputs& in) {
  const QkvShape& s = in.shape;
  const LinearOptions& o = in.options;
  return {s.B, s.Hq, s.Hkv, s.Nq, s.Nk, s.D, s.Dv, s.Hq / s.Hkv, o.feature_map, o.causal, o.normalize, o.eps, o.scale};
}

struct CudaBackend {
  static void fwd(const LinearInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::Tensor& out, at::Tensor& S, at::Tensor& z) {
    if (!in.cu_seqlens.defined()) return fwd_rows(in, q, k, v, out, S, z);
    for_each_document(in, [&](const LinearInputs& doc, int64_t g, int64_t r0, int64_t len) {
      auto out_d = at::empty({1, in.shape.Hq, len, in.shape.Dv}, out.options());
      auto S_d = S.narrow(0, g, 1), z_d = z.narrow(0, g, 1);
      fwd_rows(doc, q.narrow(2, r0, len), k.narrow(2, r0, len), v.narrow(2, r0, len), out_d, S_d, z_d);
      out.narrow(2, r0, len).copy_(out_d);
    });
  }

  static void bwd(const LinearInputs& in, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                  at::Tensor& dS0, at::Tensor& dz0) {
    if (!in.cu_seqlens.defined()) return bwd_rows(in, grad_out, q, k, v, out, dq, dk, dv, dS0, dz0);
    for_each_document(in, [&](const LinearInputs& doc, int64_t g, int64_t r0, int64_t len) {
      const auto rows = [&](const at::Tensor& t) { return t.narrow(2, r0, len); };
      auto dq_d = at::empty_like(rows(dq), at::MemoryFormat::Contiguous);
      auto dk_d = at::empty_like(rows(dk), at::MemoryFormat::Contiguous);
      auto dv_d = at::empty_like(rows(dv), at::MemoryFormat::Contiguous);
      auto dS0_d = dS0.narrow(0, g, 1), dz0_d = dz0.narrow(0, g, 1);
      bwd_rows(doc, rows(grad_out), rows(q), rows(k), rows(v), rows(out), dq_d, dk_d, dv_d, dS0_d, dz0_d);
      rows(dq).copy_(dq_d);
      rows(dk).copy_(dk_d);
      rows(dv).copy_(dv_d);
    });
  }

  // One segment per batch row (no cu_seqlens): the kernels' layout.
  static void fwd_rows(const LinearInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& out, at::Tensor& S, at::Tensor& z) {
    const QkvShape& s = in.shape;
    const bool causal = in.options.causal;
    check_grid(s.B * s.Hq, "linear_fwd");
    const c10::cuda::CUDAGuard guard(q.device());
    const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const auto sd = S.options();
    const int64_t bh = s.B * s.Hkv;
    const LinParams p = lin_params(in);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t nck = cdiv(s.Nk, kTile), ncq = cdiv(s.Nq, kTile), E = s.D * s.Dv + s.D;
      auto states = at::empty({bh * std::max<int64_t>(nck, 1) * E}, sd);
      acc_t* buf = states.data_ptr<acc_t>();
      launch_deltas<scalar_t, acc_t, false>(p, kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), nullptr, nullptr,
                                            buf, nck, stream);
      launch_scan<acc_t>(buf, bh, nck, s.D, s.Dv, opt_ptr<acc_t>(in.S0), opt_ptr<acc_t>(in.z0), S.data_ptr<acc_t>(),
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
  }

  // Chunk states recomputed, per-row normalisers, gradient deltas per chunk, their
  // reverse scan, then dq and dk/dv tiles.
  static void bwd_rows(const LinearInputs& in, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                       at::Tensor& dS0, at::Tensor& dz0) {
    const QkvShape& s = in.shape;
    const bool causal = in.options.causal, normalize = in.options.normalize;
    check_grid(s.B * s.Hq, "linear_bwd");
    const c10::cuda::CUDAGuard guard(q.device());
    const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const auto oc = out.contiguous(), goc = grad_out.contiguous();
    const auto sd = dS0.options();
    const int64_t bh = s.B * s.Hkv;
    const LinParams p = lin_params(in);
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
      launch_deltas<scalar_t, acc_t, false>(p, kp, vp, nullptr, nullptr, buf, nck, stream);
      at::Tensor Sfin, zfin;
      if (!causal) {
        Sfin = at::empty({bh * s.D * s.Dv}, sd);
        zfin = at::empty({bh * s.D}, sd);
      }
      launch_scan<acc_t>(buf, bh, nck, s.D, s.Dv, opt_ptr<acc_t>(in.S0), opt_ptr<acc_t>(in.z0),
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
      launch_deltas<scalar_t, acc_t, true>(p, qp, gop, denp, ddp, gbuf, ncq, stream);
      launch_scan<acc_t>(gbuf, bh, ncq, s.D, s.Dv, opt_ptr<acc_t>(in.grad_S), opt_ptr<acc_t>(in.grad_z),
                         dS0.data_ptr<acc_t>(), dz0.data_ptr<acc_t>(), /*reverse=*/causal, /*exclusive=*/causal,
                         stream);
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
  }

  static void step(const LinearInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   at::Tensor& out, at::Tensor& S1, at::Tensor& z1) {
    const QkvShape& s = in.shape;
    const int64_t bh = s.B * s.Hkv;
    check_grid(bh, "linear_step");
    const c10::cuda::CUDAGuard guard(q.device());
    const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const LinParams p = lin_params(in);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t smem = size_t(2 * s.D + kThreads) * sizeof(acc_t);
      auto kernel = step_kernel<scalar_t, acc_t>;
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      const dim3 grid(unsigned(bh), unsigned(cdiv(s.Dv, 32)));
      kernel<<<grid, kThreads, smem, stream>>>(p, s.Nq, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                               vc.data_ptr<scalar_t>(), in.S0.data_ptr<acc_t>(),
                                               in.z0.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
                                               S1.data_ptr<acc_t>(), z1.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, CUDA, m) {
  m.impl("linear_fwd", &linear_fwd_op<CudaBackend>);
  m.impl("linear_bwd", &linear_bwd_op<CudaBackend>);
  m.impl("linear_step", &linear_step_op<CudaBackend>);
}

}  // namespace attention_ext::cuda::linear
