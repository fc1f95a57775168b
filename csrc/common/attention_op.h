// The one body of attention_fwd and attention_bwd for every backend: checks, outputs and
// the empty cases live here; a backend only runs its kernels on a checked call.
//
//   struct Backend {
//     static void fwd(const AttentionInputs&, q, k, v, at::Tensor& out, at::Tensor& lse);
//     static void bwd(const AttentionInputs&, grad_out, grad_lse (lse dtype, contiguous, or undefined),
//                     q, k, v, out, lse (contiguous), at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);
//   };
//   m.impl("attention_fwd", &attention_fwd_op<Backend>);   // cpu/attention_ops.cpp, cuda/attention_ops.cu
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "attention_args.h"

namespace attention_ext {

template <class Backend>
std::tuple<at::Tensor, at::Tensor> attention_fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    AE_ATTENTION_SPEC_PARAMS) {
  const AttentionInputs in = check_attention_fwd_inputs(q, k, v, {AE_ATTENTION_SPEC_ARGS});
  const QkvShape& s = in.shape;
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto lse = at::empty({s.B, s.Hq, s.Nq}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.Nk == 0) {  // no key at all: zeros, lse = -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  Backend::fwd(in, q, k, v, out, lse);
  return {out, lse};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_op(const at::Tensor& grad_out,
                                                                const std::optional<at::Tensor>& grad_lse,
                                                                const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& out,
                                                                const at::Tensor& lse, AE_ATTENTION_SPEC_PARAMS) {
  const AttentionInputs in = check_attention_bwd_inputs(grad_out, grad_lse, q, k, v, out, lse, {AE_ATTENTION_SPEC_ARGS});
  const QkvShape& s = in.shape;
  auto dq = at::empty({s.B, s.Hq, s.Nq, s.D}, q.options());
  auto dk = at::empty({s.B, s.Hkv, s.Nk, s.D}, q.options());
  auto dv = at::empty({s.B, s.Hkv, s.Nk, s.Dv}, q.options());
  if (s.B == 0 || s.Hq == 0 || s.Nq == 0 || s.Nk == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  const auto ld = acc_dtype(q.scalar_type());
  at::Tensor glse;
  if (grad_lse.has_value() && grad_lse->defined()) glse = grad_lse->to(ld).contiguous();
  Backend::bwd(in, grad_out, glse, q, k, v, out, lse.contiguous(), dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace attention_ext
