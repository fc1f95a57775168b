// CPU bodies of attention_fwd / attention_bwd: check, allocate, hand plain pointers to
// the active ISA build of the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "../common/attention_args.h"
#include "isa.h"

namespace attention_ext::cpu {
namespace {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    default: return DType::Float16;
  }
}

Operand operand(const at::Tensor& t) {
  Operand o;
  o.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) o.stride[i] = t.stride(i);
  return o;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& global_mask,
                                                     const std::optional<at::Tensor>& layout, int64_t kind,
                                                     bool causal, int64_t left, int64_t right, int64_t kernel_size,
                                                     int64_t dilation, int64_t num_global, int64_t block_size,
                                                     double scale, double softcap,
                                                     const std::optional<at::Tensor>& key_mask) {
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
  AttentionFwdArgs a{dtype_of(q.scalar_type()), s.B, s.Hq, s.Hkv, s.Nq, s.Nk, s.Dqk, s.Dv,
                     operand(q), operand(k), operand(v), out.data_ptr(), lse.data_ptr(), m.spec, scale, softcap};
  active_kernels().attention_fwd(a);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& global_mask,
    const std::optional<at::Tensor>& layout, int64_t kind, bool causal, int64_t left, int64_t right,
    int64_t kernel_size, int64_t dilation, int64_t num_global, int64_t block_size, double scale, double softcap,
    const std::optional<at::Tensor>& key_mask) {
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
  auto dq = at::empty({s.B, s.Hq, s.Nq, s.Dqk}, q.options());
  auto dk = at::empty({s.B, s.Hkv, s.Nk, s.Dqk}, q.options());
  auto dv = at::empty({s.B, s.Hkv, s.Nk, s.Dv}, q.options());
  if (s.B == 0 || s.Hq == 0 || s.Nq == 0 || s.Nk == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  auto lse_c = lse.contiguous();
  at::Tensor glse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->sizes() == l_shape, "attention_bwd: grad_lse must be ", c10::IntArrayRef(l_shape));
    glse = grad_lse->to(ld).contiguous();
  }
  AttentionBwdArgs a{dtype_of(q.scalar_type()), s.B, s.Hq, s.Hkv, s.Nq, s.Nk, s.Dqk, s.Dv,
                     operand(q), operand(k), operand(v), operand(out), operand(grad_out),
                     lse_c.data_ptr(), glse.defined() ? glse.data_ptr() : nullptr,
                     dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), m.spec, scale, softcap};
  active_kernels().attention_bwd(a);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace attention_ext::cpu
