// CUDA bodies of attention_fwd / attention_bwd: the same checks, shapes, dtypes and
// early returns as csrc/cpu/attention_ops.cpp, then either the tensor-core kernels
// (fp16/bf16, head dims <= 256) or the SIMT kernels (everything else).
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

#include "../common/attention_args.h"
#include "cuda_attn_params.h"

namespace attention_ext::cuda {
namespace {

int scalar_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    default: return 3;  // bfloat16 (check_qkv admits nothing else)
  }
}

bool low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

Strides4 strides4(const at::Tensor& t) {
  Strides4 s;
  for (int i = 0; i < 4; ++i) s.s[i] = t.stride(i);
  return s;
}

// Head-dim bucket of the tensor-core kernels, 0 when none fits.
int tc_bucket(int64_t d8) { return d8 <= 64 ? 64 : d8 <= 128 ? 128 : d8 <= 256 ? 256 : 0; }

// bytes of dynamic shared memory, plus the kernels' static shared memory (mask spec and
// tile schedule, under 2 KB)
bool smem_fits(size_t bytes) {
  return bytes + 2048 <= static_cast<size_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

bool tc_arch() { return at::cuda::getCurrentDeviceProperties()->major >= 8; }

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

template <typename T>
void tc_fwd(int bucket, const TcFwdParams& p, cudaStream_t st) {
  switch (bucket) {
    case 64: return launch_tc_fwd<T, 64>(p, st);
    case 128: return launch_tc_fwd<T, 128>(p, st);
    default: return launch_tc_fwd<T, 256>(p, st);
  }
}

template <typename T>
void tc_bwd(int bucket, const TcBwdParams& p, bool dq_pass, cudaStream_t st) {
  switch (bucket) {
    case 64:
      launch_tc_bwd_dkdv<T, 64>(p, st);
      if (dq_pass) launch_tc_bwd_dq<T, 64>(p, st);
      return;
    case 128:
      launch_tc_bwd_dkdv<T, 128>(p, st);
      if (dq_pass) launch_tc_bwd_dq<T, 128>(p, st);
      return;
    default:
      launch_tc_bwd_dkdv<T, 256>(p, st);
      if (dq_pass) launch_tc_bwd_dq<T, 256>(p, st);
      return;
  }
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "attention_ext: problem too large for one launch (",
              blocks, " blocks)");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& global_mask,
                                                      const std::optional<at::Tensor>& layout, int64_t kind,
                                                      bool causal, int64_t left, int64_t right, int64_t kernel_size,
                                                      int64_t dilation, int64_t num_global, int64_t block_size,
                                                      double scale, double softcap,
                                                      const std::optional<at::Tensor>& key_mask) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const AttnShape s = check_qkv(q, k, v);
  check_softcap(softcap);
  const MaskArgs m = make_mask(s, q, global_mask, layout, kind, causal, left, right, kernel_size, dilation,
                               num_global, block_size, key_mask);
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto lse = at::empty({s.B, s.Hq, s.Nq}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.Nk == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sc = scalar_code(q.scalar_type());
  const int64_t dq8 = round_up(s.Dqk, 8), dv8 = round_up(s.Dv, 8);
  const int bucket = tc_bucket(std::max(dq8, dv8));

  if (low_precision(q.scalar_type()) && bucket && tc_arch() && smem_fits(tc_fwd_smem(bucket))) {
    const int bm = bucket == 64 ? FwdCfg<64>::BM : bucket == 128 ? FwdCfg<128>::BM : FwdCfg<256>::BM;
    check_grid(s.B * s.Hq * ((s.Nq + bm - 1) / bm));
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
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
    p.softcap_log2 = static_cast<float>(softcap * 1.4426950408889634);
    p.mask = m.spec;
    if (sc == 2) tc_fwd<__half>(bucket, p, stream);
    else tc_fwd<__nv_bfloat16>(bucket, p, stream);
    if (dv8 != s.Dv) out.copy_(o.narrow(3, 0, s.Dv));
    return {out, lse};
  }

  check_grid((s.B * s.Hq * s.Nq + 7) / 8);
  SimtFwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.qs = strides4(q), p.ks = strides4(k), p.vs = strides4(v);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Nq = s.Nq, p.Nk = s.Nk, p.Dqk = s.Dqk, p.Dv = s.Dv;
  p.scale = scale;
  p.softcap = softcap;
  p.mask = m.spec;
  launch_simt_fwd(sc, p, stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& global_mask,
    const std::optional<at::Tensor>& layout, int64_t kind, bool causal, int64_t left, int64_t right,
    int64_t kernel_size, int64_t dilation, int64_t num_global, int64_t block_size, double scale, double softcap,
    const std::optional<at::Tensor>& key_mask) {
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const AttnShape s = check_qkv(q, k, v);
  check_softcap(softcap);
  const MaskArgs m = make_mask(s, q, global_mask, layout, kind, causal, left, right, kernel_size, dilation,
                               num_global, block_size, key_mask);
  const std::vector<int64_t> o_shape{s.B, s.Hq, s.Nq, s.Dv}, l_shape{s.B, s.Hq, s.Nq};
  TORCH_CHECK(grad_out.sizes() == o_shape && out.sizes() == o_shape,
              "attention_bwd: grad_out and out must be ", c10::IntArrayRef(o_shape));
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "attention_bwd: grad_out and out must have q's dtype");
  const auto ld = lse_dtype(q.scalar_type());
  TORCH_CHECK(lse.sizes() == l_shape && lse.scalar_type() == ld, "attention_bwd: lse must be ",
              c10::IntArrayRef(l_shape), " ", ld);
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "attention_bwd: grad_out, out and lse must be on ", q.device());
  auto dq = at::empty({s.B, s.Hq, s.Nq, s.Dqk}, q.options());
  auto dk = at::empty({s.B, s.Hkv, s.Nk, s.Dqk}, q.options());
  auto dv = at::empty({s.B, s.Hkv, s.Nk, s.Dv}, q.options());
  if (s.B == 0 || s.Hq == 0 || s.Nq == 0 || s.Nk == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sc = scalar_code(q.scalar_type());
  auto lse_c = lse.contiguous();
  at::Tensor glse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->sizes() == l_shape, "attention_bwd: grad_lse must be ", c10::IntArrayRef(l_shape));
    TORCH_CHECK(grad_lse->device() == q.device(), "attention_bwd: grad_lse must be on ", q.device());
    glse = grad_lse->to(ld).contiguous();
  }

  // lse2 = lse * log2(e) (+inf for rows without keys) and delta = dO . O - dlse, padded
  // to a multiple of every query tile
  const int64_t nq_pad = round_up(s.Nq, kLseRowPad);
  check_grid((s.B * s.Hq * nq_pad + 7) / 8);
  auto lse2 = at::empty({s.B * s.Hq, nq_pad}, lse_c.options());
  auto delta = at::empty({s.B * s.Hq, nq_pad}, lse_c.options());
  BwdPrepParams pp{};
  pp.out = out.data_ptr(), pp.dout = grad_out.data_ptr();
  pp.os = strides4(out), pp.dos = strides4(grad_out);
  pp.lse = lse_c.data_ptr();
  pp.grad_lse = glse.defined() ? glse.data_ptr() : nullptr;
  pp.lse2 = lse2.data_ptr(), pp.delta = delta.data_ptr();
  pp.nq_pad = nq_pad;
  pp.B = s.B, pp.Hq = s.Hq, pp.Nq = s.Nq, pp.Dv = s.Dv;
  launch_bwd_prep(sc, pp, stream);

  const int64_t dq8 = round_up(s.Dqk, 8), dv8 = round_up(s.Dv, 8);
  const int bucket = tc_bucket(std::max(dq8, dv8));
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  if (low_precision(q.scalar_type()) && bucket && tc_arch() && smem_fits(tc_bwd_smem(bucket)) &&
      (!deterministic || smem_fits(tc_dq_smem(bucket)))) {
    const int bn = bucket == 64 ? BwdCfg<64>::BN : bucket == 128 ? BwdCfg<128>::BN : BwdCfg<256>::BN;
    check_grid(s.B * s.Hkv * ((s.Nk + bn - 1) / bn));
    check_grid(s.B * s.Hq * ((s.Nq + 63) / 64));
    const at::Tensor qc = tc_operand(q, dq8), kc = tc_operand(k, dq8), vc = tc_operand(v, dv8),
                     doc = tc_operand(grad_out, dv8);
    const at::Tensor dq_o = dq8 == s.Dqk ? dq : at::empty({s.B, s.Hq, s.Nq, dq8}, q.options());
    const at::Tensor dk_o = dq8 == s.Dqk ? dk : at::empty({s.B, s.Hkv, s.Nk, dq8}, q.options());
    const at::Tensor dv_o = dv8 == s.Dv ? dv : at::empty({s.B, s.Hkv, s.Nk, dv8}, q.options());
    at::Tensor dq_accum;
    if (!deterministic) dq_accum = at::zeros({s.B, s.Hq, s.Nq, dq8}, q.options().dtype(at::kFloat));
    TcBwdParams p{};
    p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.v = vc.data_ptr(), p.dout = doc.data_ptr();
    p.q_bs = qc.stride(0), p.q_hs = qc.stride(1), p.q_rs = qc.stride(2);
    p.k_bs = kc.stride(0), p.k_hs = kc.stride(1), p.k_rs = kc.stride(2);
    p.v_bs = vc.stride(0), p.v_hs = vc.stride(1), p.v_rs = vc.stride(2);
    p.do_bs = doc.stride(0), p.do_hs = doc.stride(1), p.do_rs = doc.stride(2);
    p.lse2 = lse2.data_ptr<float>(), p.delta = delta.data_ptr<float>();
    p.nq_pad = nq_pad;
    p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
    p.dq = dq_o.data_ptr(), p.dk = dk_o.data_ptr(), p.dv_out = dv_o.data_ptr();
    p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Nq = s.Nq, p.Nk = s.Nk;
    p.dqk = static_cast<int>(dq8), p.dv = static_cast<int>(dv8);
    p.scale = static_cast<float>(scale);
    p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
    p.softcap_log2 = static_cast<float>(softcap * 1.4426950408889634);
    p.scale_over_cap = softcap > 0 ? static_cast<float>(scale / softcap) : 0.f;
    p.mask = m.spec;
    if (sc == 2) tc_bwd<__half>(bucket, p, deterministic, stream);
    else tc_bwd<__nv_bfloat16>(bucket, p, deterministic, stream);
    if (!deterministic) launch_dq_convert(sc, p.dq_accum, p.dq, dq_accum.numel(), p.scale, stream);
    if (dq8 != s.Dqk) {
      dq.copy_(dq_o.narrow(3, 0, s.Dqk));
      dk.copy_(dk_o.narrow(3, 0, s.Dqk));
    }
    if (dv8 != s.Dv) dv.copy_(dv_o.narrow(3, 0, s.Dv));
    return {dq, dk, dv};
  }

  check_grid((s.B * s.Hkv * s.Nk + 7) / 8);
  SimtBwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.dout = grad_out.data_ptr();
  p.qs = strides4(q), p.ks = strides4(k), p.vs = strides4(v), p.dos = strides4(grad_out);
  p.lse2 = lse2.data_ptr(), p.delta = delta.data_ptr();
  p.nq_pad = nq_pad;
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.Nq = s.Nq, p.Nk = s.Nk, p.Dqk = s.Dqk, p.Dv = s.Dv;
  p.scale = scale;
  p.softcap = softcap;
  p.mask = m.spec;
  launch_simt_bwd(sc, p, stream);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace attention_ext::cuda
