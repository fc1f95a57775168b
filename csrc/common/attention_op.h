// The one body of attention_fwd and attention_bwd for every backend: checks, outputs and
// the empty cases live here; a backend only runs its kernels on a checked call.
//
//   struct Backend {
//     static void fwd(const AttentionInputs&, q, k, v, at::Tensor& out, at::Tensor& lse);
//     static void bwd(const AttentionInputs&, grad_out, grad_lse (lse dtype, contiguous, or undefined),
//                     q, k, v, out, lse (contiguous), at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);
//   };
//   m.impl("attention_fwd", &attention_fwd_op<Backend>);   // cpu/attention_ops.cpp, cuda/attention_ops.cu
//
// Packed documents (cu_seqlens): a backend whose kernels walk documents themselves says
// so with `static constexpr bool kDocuments = true` (the CPU). The others (CUDA, for now)
// get one kernel call per document here, on views of its rows: correct, but one launch
// per document.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>
#include <type_traits>

#include "attention_args.h"

namespace attention_ext {

template <class Backend, class = void>
struct walks_documents : std::false_type {};
template <class Backend>
struct walks_documents<Backend, std::void_t<decltype(Backend::kDocuments)>>
    : std::bool_constant<Backend::kDocuments> {};

// One document's call: a batch of one, its rows, document_mask() (mask.h) with the
// prefix arrays moved to row b.
inline AttentionInputs document_inputs(const AttentionInputs& in, int64_t b, const DocSpan& d) {
  AttentionInputs sub = in;
  sub.shape.B = 1, sub.shape.Nq = d.nq, sub.shape.Nk = d.nk;
  sub.mask = document_mask(in.mask, d.k0, d.nq, d.nk);
  if (sub.mask.global_prefix) sub.mask.global_prefix += b * in.mask.prefix_stride;
  if (sub.mask.key_prefix) sub.mask.key_prefix += b * in.mask.prefix_stride;
  sub.cu_q = sub.cu_k = at::Tensor();
  if (in.alibi.defined()) {
    sub.alibi = in.alibi.narrow(0, b, 1);
    sub.mods.alibi = sub.alibi.data_ptr();
  }
  sub.dropout.b0 += b, sub.dropout.q0 += d.q0, sub.dropout.k0 += d.k0;  // keyed by the full rows
  return sub;
}

// lse of rows that see no key: -inf, or the head's sink (the softmax is then the sink alone).
inline void fill_keyless_lse(const AttentionInputs& in, at::Tensor& lse) {
  if (in.sinks.defined()) lse.copy_(in.sinks.view({1, -1, 1}).expand_as(lse));
  else lse.fill_(-std::numeric_limits<double>::infinity());
}

// dsinks[h] = -sum over rows of P_sink * (dO . O - dlse), P_sink = exp(sink[h] - lse): the
// same for every backend, from the forward's outputs alone. The sum runs in a fixed order
// (on the host for the CPU), so it does not depend on the thread count.
inline at::Tensor sinks_grad(const AttentionInputs& in, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                             const at::Tensor& out, const at::Tensor& lse) {
  const auto ld = lse.scalar_type();
  at::Tensor delta = (grad_out.to(ld) * out.to(ld)).sum(-1);
  if (grad_lse.defined()) delta = delta - grad_lse;
  // (Hq, B * Nq) contributions
  at::Tensor c = ((in.sinks.view({1, -1, 1}) - lse).exp() * delta).neg().transpose(0, 1).reshape(
      {in.shape.Hq, in.shape.B * in.shape.Nq});
  if (!c.is_cpu()) return c.sum(1);
  c = c.to(at::kDouble).contiguous();
  at::Tensor g = at::empty({in.shape.Hq}, c.options());
  const double* src = c.data_ptr<double>();
  double* dst = g.data_ptr<double>();
  for (int64_t h = 0, n = c.size(1); h < in.shape.Hq; ++h) {
    double acc = 0;
    for (int64_t r = 0; r < n; ++r) acc += src[h * n + r];
    dst[h] = acc;
  }
  return g.to(ld);
}

// Rows [r0, r0 + n) (dim 2) of batch row b of a (B, H, N, ...) tensor.
inline at::Tensor rows(const at::Tensor& t, int64_t b, int64_t r0, int64_t n) {
  return t.narrow(0, b, 1).narrow(2, r0, n);
}

template <class Backend>
void fwd_by_document(const AttentionInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     at::Tensor& out, at::Tensor& lse) {
  const Documents docs = in.documents();
  for (int64_t b = 0; b < in.shape.B; ++b)
    for (int64_t i = 0; i < doc_count(docs); ++i) {
      const DocSpan d = doc_span(docs, b, i, in.shape.Nq, in.shape.Nk);
      if (d.nq == 0) continue;
      at::Tensor o = rows(out, b, d.q0, d.nq), l = rows(lse, b, d.q0, d.nq);
      if (d.nk == 0) {
        o.zero_();
        fill_keyless_lse(in, l);
        continue;
      }
      at::Tensor oc = at::empty_like(o, at::MemoryFormat::Contiguous);
      at::Tensor lc = at::empty_like(l, at::MemoryFormat::Contiguous);
      Backend::fwd(document_inputs(in, b, d), rows(q, b, d.q0, d.nq), rows(k, b, d.k0, d.nk), rows(v, b, d.k0, d.nk),
                   oc, lc);
      o.copy_(oc), l.copy_(lc);
    }
}

template <class Backend>
void bwd_by_document(const AttentionInputs& in, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const Documents docs = in.documents();
  for (int64_t b = 0; b < in.shape.B; ++b)
    for (int64_t i = 0; i < doc_count(docs); ++i) {
      const DocSpan d = doc_span(docs, b, i, in.shape.Nq, in.shape.Nk);
      if (d.nq == 0 || d.nk == 0) {  // queries without keys, keys without queries: zero gradients
        rows(dq, b, d.q0, d.nq).zero_(), rows(dk, b, d.k0, d.nk).zero_(), rows(dv, b, d.k0, d.nk).zero_();
        continue;
      }
      at::Tensor dqc = at::empty({1, in.shape.Hq, d.nq, in.shape.D}, dq.options());
      at::Tensor dkc = at::empty({1, in.shape.Hkv, d.nk, in.shape.D}, dk.options());
      at::Tensor dvc = at::empty({1, in.shape.Hkv, d.nk, in.shape.Dv}, dv.options());
      const at::Tensor gl = grad_lse.defined() ? rows(grad_lse, b, d.q0, d.nq).contiguous() : at::Tensor();
      Backend::bwd(document_inputs(in, b, d), rows(grad_out, b, d.q0, d.nq), gl, rows(q, b, d.q0, d.nq),
                   rows(k, b, d.k0, d.nk), rows(v, b, d.k0, d.nk), rows(out, b, d.q0, d.nq),
                   rows(lse, b, d.q0, d.nq).contiguous(), dqc, dkc, dvc);
      rows(dq, b, d.q0, d.nq).copy_(dqc), rows(dk, b, d.k0, d.nk).copy_(dkc), rows(dv, b, d.k0, d.nk).copy_(dvc);
    }
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> attention_fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    AE_ATTENTION_SPEC_PARAMS) {
  const AttentionInputs in = check_attention_fwd_inputs(q, k, v, {AE_ATTENTION_SPEC_ARGS});
  const QkvShape& s = in.shape;
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto lse = at::empty({s.B, s.Hq, s.Nq}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.Nk == 0) {  // no key at all: zeros, lse = -inf (or the sink)
    out.zero_();
    fill_keyless_lse(in, lse);
    return {out, lse};
  }
  if (in.cu_q.defined() && !walks_documents<Backend>::value) fwd_by_document<Backend>(in, q, k, v, out, lse);
  else Backend::fwd(in, q, k, v, out, lse);
  return {out, lse};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_op(const at::Tensor& grad_out,
                                                                const std::optional<at::Tensor>& grad_lse,
                                                                const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& out,
                                                                const at::Tensor& lse, AE_ATTENTION_SPEC_PARAMS) {
  const AttentionInputs in = check_attention_bwd_inputs(grad_out, grad_lse, q, k, v, out, lse, {AE_ATTENTION_SPEC_ARGS});
  const QkvShape& s = in.shape;
  auto dq = at::empty({s.B, s.Hq, s.Nq, s.D}, q.options());
  auto dk = at::empty({s.B, s.Hkv, s.Nk, s.D}, q.options());
  auto dv = at::empty({s.B, s.Hkv, s.Nk, s.Dv}, q.options());
  const auto ld = acc_dtype(q.scalar_type());
  at::Tensor glse;
  if (grad_lse.has_value() && grad_lse->defined()) glse = grad_lse->to(ld).contiguous();
  // sinks' gradient; an empty tensor when there are none (the autograd returns None)
  at::Tensor dsinks = in.sinks.defined() ? sinks_grad(in, grad_out, glse, out, lse) : at::empty({0}, lse.options());
  if (s.B == 0 || s.Hq == 0 || s.Nq == 0 || s.Nk == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv, dsinks};
  }
  if (in.cu_q.defined() && !walks_documents<Backend>::value)
    bwd_by_document<Backend>(in, grad_out, glse, q, k, v, out, lse.contiguous(), dq, dk, dv);
  else Backend::bwd(in, grad_out, glse, q, k, v, out, lse.contiguous(), dq, dk, dv);
  return {dq, dk, dv, dsinks};
}

}  // namespace attention_ext
