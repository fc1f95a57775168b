// CUDA backend of attention_fwd / attention_bwd: the shared op body (common/attention_op.h)
// checks and allocates; this runs either the tensor-core kernels (fp16/bf16, head dims
// <= 256, sm_80+, enough shared memory) or the SIMT kernels (everything else).
// attention_path() makes that choice, for the ops and for attention_ext.explain().
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../common/attention_op.h"
#include "../common/decode_op.h"
#include "attention_path.h"
#include "attention_params.h"

namespace attention_ext::cuda {
namespace {

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

Strides4 strides4(const at::Tensor& t) {
  Strides4 s;
  for (int i = 0; i < 4; ++i) s.s[i] = t.stride(i);
  return s;
}

// The tensor-core kernels read rows with 16-byte cp.async: last dim contiguous, a head
// dim of d8 (multiple of 8) elements and 16-byte aligned rows. Anything else is copied
// into that form (zero-padded columns change no dot product).
at::Tensor tc_operand(const at::Tensor& t, int64_t d8) {
  bool ok = t.size(3) == d8 && t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (t.size(i) == 1 || t.stride(i) % 8 == 0);
  if (ok) return t;
  const std::vector<int64_t> shape{t.size(0), t.size(1), t.size(2), d8};
  at::Tensor c = d8 == t.size(3) ? at::empty(shape, t.options()) : at::zeros(shape, t.options());
  c.narrow(3, 0, t.size(3)).copy_(t);
  return c;
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "attention_ext: problem too large for one launch (",
              blocks, " blocks)");
}

bool deterministic() { return at::globalContext().deterministicAlgorithms(); }

void tc_fwd(const AttentionInputs& in, int bucket, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
  const QkvShape& s = in.shape;
  const int64_t dq8 = round_up(s.D, 8), dv8 = round_up(s.Dv, 8);
  const at::Tensor qc = tc_operand(q, dq8), kc = tc_operand(k, dq8), vc = tc_operand(v, dv8);
  const at::Tensor o = dv8 == s.Dv ? out : at::empty({s.B, s.Hq, s.Nq, dv8}, q.options());
  TcFwdParams p{};
  p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.v = vc.data_ptr();
  p.q_bs = qc.stride(0), p.q_hs = qc.stride(1), p.q_rs = qc.stride(2);
  p.k_bs = kc.stride(0), p.k_hs = kc.stride(1), p.k_rs = kc.stride(2);
  p.v_bs = vc.stride(0), p.v_hs = vc.stride(1), p.v_rs = vc.stride(2);
  p.out = o.data_ptr();
  p.out_rs = dv8;
  p.lse = lse.data_ptr<float>();
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Nq = s.Nq, p.Nk = s.Nk;
  p.dqk = static_cast<int>(dq8), p.dv = static_cast<int>(dv8);
  p.scale_log2 = static_cast<float>(in.scale * 1.4426950408889634);
  p.softcap_log2 = static_cast<float>(in.softcap * 1.4426950408889634);
  p.mask = in.mask;
  p.mods = in.mods;
  p.dropout = in.dropout;
  head_dim_switch(bucket, [&](auto d) {
    constexpr int D = decltype(d)::value;
    check_grid(s.B * s.Hq * ((s.Nq + FwdCfg<D>::BM - 1) / FwdCfg<D>::BM));
    tc_type_switch(in.dtype, [&](auto t) { launch_tc_fwd<decltype(t), D>(p, stream); });
  });
  if (dv8 != s.Dv) out.copy_(o.narrow(3, 0, s.Dv));
}

void simt_fwd(const AttentionInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
  const QkvShape& s = in.shape;
  check_grid((s.B * s.Hq * s.Nq + 7) / 8);
  SimtFwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.qs = strides4(q), p.ks = strides4(k), p.vs = strides4(v);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Nq = s.Nq, p.Nk = s.Nk, p.Dqk = s.D, p.Dv = s.Dv;
  p.scale = in.scale;
  p.softcap = in.softcap;
  p.mask = in.mask;
  p.mods = in.mods;
  p.dropout = in.dropout;
  launch_simt_fwd(in.dtype, p, stream);
}

void tc_bwd(const AttentionInputs& in, int bucket, const at::Tensor& grad_out, const at::Tensor& q,
            const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse2, const at::Tensor& delta,
            int64_t nq_pad, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, cudaStream_t stream) {
  const QkvShape& s = in.shape;
  const bool det = deterministic();
  const int64_t dq8 = round_up(s.D, 8), dv8 = round_up(s.Dv, 8);
  check_grid(s.B * s.Hq * ((s.Nq + 63) / 64));
  const at::Tensor qc = tc_operand(q, dq8), kc = tc_operand(k, dq8), vc = tc_operand(v, dv8),
                   doc = tc_operand(grad_out, dv8);
  const at::Tensor dq_o = dq8 == s.D ? dq : at::empty({s.B, s.Hq, s.Nq, dq8}, q.options());
  const at::Tensor dk_o = dq8 == s.D ? dk : at::empty({s.B, s.Hkv, s.Nk, dq8}, q.options());
  const at::Tensor dv_o = dv8 == s.Dv ? dv : at::empty({s.B, s.Hkv, s.Nk, dv8}, q.options());
  at::Tensor dq_accum;
  if (!det) dq_accum = at::zeros({s.B, s.Hq, s.Nq, dq8}, q.options().dtype(at::kFloat));
  TcBwdParams p{};
  p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.v = vc.data_ptr(), p.dout = doc.data_ptr();
  p.q_bs = qc.stride(0), p.q_hs = qc.stride(1), p.q_rs = qc.stride(2);
  p.k_bs = kc.stride(0), p.k_hs = kc.stride(1), p.k_rs = kc.stride(2);
  p.v_bs = vc.stride(0), p.v_hs = vc.stride(1), p.v_rs = vc.stride(2);
  p.do_bs = doc.stride(0), p.do_hs = doc.stride(1), p.do_rs = doc.stride(2);
  p.lse2 = lse2.data_ptr<float>(), p.delta = delta.data_ptr<float>();
  p.nq_pad = nq_pad;
  p.dq_accum = det ? nullptr : dq_accum.data_ptr<float>();
  p.dq = dq_o.data_ptr(), p.dk = dk_o.data_ptr(), p.dv_out = dv_o.data_ptr();
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Nq = s.Nq, p.Nk = s.Nk;
  p.dqk = static_cast<int>(dq8), p.dv = static_cast<int>(dv8);
  p.scale = static_cast<float>(in.scale);
  p.scale_log2 = static_cast<float>(in.scale * 1.4426950408889634);
  p.softcap_log2 = static_cast<float>(in.softcap * 1.4426950408889634);
  p.scale_over_cap = in.softcap > 0 ? static_cast<float>(in.scale / in.softcap) : 0.f;
  p.mask = in.mask;
  p.mods = in.mods;
  p.dropout = in.dropout;
  head_dim_switch(bucket, [&](auto d) {
    constexpr int D = decltype(d)::value;
    check_grid(s.B * s.Hkv * ((s.Nk + BwdCfg<D>::BN - 1) / BwdCfg<D>::BN));
    tc_type_switch(in.dtype, [&](auto t) {
      using T = decltype(t);
      launch_tc_bwd_dkdv<T, D>(p, stream);
      if (det) launch_tc_bwd_dq<T, D>(p, stream);
    });
  });
  if (!det) launch_dq_convert(in.dtype, p.dq_accum, p.dq, dq_accum.numel(), p.scale, stream);
  if (dq8 != s.D) {
    dq.copy_(dq_o.narrow(3, 0, s.D));
    dk.copy_(dk_o.narrow(3, 0, s.D));
  }
  if (dv8 != s.Dv) dv.copy_(dv_o.narrow(3, 0, s.Dv));
}

void simt_bwd(const AttentionInputs& in, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& lse2, const at::Tensor& delta, int64_t nq_pad, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv, cudaStream_t stream) {
  const QkvShape& s = in.shape;
  check_grid((s.B * s.Hkv * s.Nk + 7) / 8);
  SimtBwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.dout = grad_out.data_ptr();
  p.qs = strides4(q), p.ks = strides4(k), p.vs = strides4(v), p.dos = strides4(grad_out);
  p.lse2 = lse2.data_ptr(), p.delta = delta.data_ptr();
  p.nq_pad = nq_pad;
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Nq = s.Nq, p.Nk = s.Nk, p.Dqk = s.D, p.Dv = s.Dv;
  p.scale = in.scale;
  p.softcap = in.softcap;
  p.mask = in.mask;
  p.mods = in.mods;
  p.dropout = in.dropout;
  launch_simt_bwd(in.dtype, p, stream);
}

struct CudaBackend {
  static void fwd(const AttentionInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::Tensor& out, at::Tensor& lse) {
    const c10::cuda::OptionalCUDAGuard guard(q.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const CudaPath path = attention_path(q.scalar_type(), in.shape.D, in.shape.Dv, false, deterministic());
    if (path.tensor_core) tc_fwd(in, path.bucket, q, k, v, out, lse, stream);
    else simt_fwd(in, q, k, v, out, lse, stream);
  }

  static void bwd(const AttentionInputs& in, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
    const c10::cuda::OptionalCUDAGuard guard(q.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const QkvShape& s = in.shape;
    // lse2 = lse * log2(e) (+inf for rows without keys) and delta = dO . O - dlse, padded
    // to a multiple of every query tile
    const int64_t nq_pad = round_up(s.Nq, kLseRowPad);
    check_grid((s.B * s.Hq * nq_pad + 7) / 8);
    auto lse2 = at::empty({s.B * s.Hq, nq_pad}, lse.options());
    auto delta = at::empty({s.B * s.Hq, nq_pad}, lse.options());
    BwdPrepParams pp{};
    pp.out = out.data_ptr(), pp.dout = grad_out.data_ptr();
    pp.os = strides4(out), pp.dos = strides4(grad_out);
    pp.lse = lse.data_ptr();
    pp.grad_lse = grad_lse.defined() ? grad_lse.data_ptr() : nullptr;
    pp.lse2 = lse2.data_ptr(), pp.delta = delta.data_ptr();
    pp.nq_pad = nq_pad;
    pp.B = s.B, pp.Hq = s.Hq, pp.Nq = s.Nq, pp.Dv = s.Dv;
    launch_bwd_prep(in.dtype, pp, stream);
    const CudaPath path = attention_path(q.scalar_type(), s.D, s.Dv, true, deterministic());
    if (path.tensor_core) tc_bwd(in, path.bucket, grad_out, q, k, v, lse2, delta, nq_pad, dq, dk, dv, stream);
    else simt_bwd(in, grad_out, q, k, v, lse2, delta, nq_pad, dq, dk, dv, stream);
  }
};

}  // namespace

CudaPath attention_path(at::ScalarType dtype, int64_t head_dim, int64_t value_dim, bool backward,
                        bool deterministic) {
  CudaPath path;
  const int64_t d8 = std::max(round_up(head_dim, 8), round_up(value_dim, 8));
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const size_t smem_optin = static_cast<size_t>(props->sharedMemPerBlockOptin);
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    path.reason = "the tensor-core kernels take float16/bfloat16 only";
    return path;
  }
  if (d8 > kCudaTensorCoreMaxHeadDim) {
    path.reason = "head dim above the tensor-core limit of " + std::to_string(kCudaTensorCoreMaxHeadDim);
    return path;
  }
  if (props->major < 8) {
    path.reason = "the tensor-core kernels need compute capability 8.0 or newer";
    return path;
  }
  path.bucket = d8 <= 64 ? 64 : d8 <= 128 ? 128 : 256;
  // dynamic shared memory plus the kernels' static part (mask spec and tile schedule, < 2 KB)
  size_t need = 0;
  head_dim_switch(path.bucket, [&](auto d) {
    constexpr int D = decltype(d)::value;
    need = backward ? std::max(BwdCfg<D>::SMEM, deterministic ? DqCfg<D>::SMEM : size_t(0)) : FwdCfg<D>::SMEM;
  });
  if (need + 2048 > smem_optin) {
    path.reason = "needs " + std::to_string(need + 2048) + " bytes of shared memory per block, the device allows " +
                  std::to_string(smem_optin);
    path.bucket = 0;
    return path;
  }
  path.tensor_core = true;
  path.reason = "float16/bfloat16, head-dim bucket " + std::to_string(path.bucket);
  return path;
}

TORCH_LIBRARY_IMPL(attention_ext, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_op<CudaBackend>);
  m.impl("attention_bwd", &attention_bwd_op<CudaBackend>);
  m.impl("attention_decode", &attention_decode_op<CudaBackend>);
}

}  // namespace attention_ext::cuda
