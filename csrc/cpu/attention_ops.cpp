// CPU backend of attention_fwd / attention_bwd: the shared op body (common/attention_op.h)
// checks and allocates; this hands plain pointers to the active ISA build of the kernels.
#include <torch/library.h>

#include "../common/attention_op.h"
#include "../common/decode_op.h"
#include "isa.h"
#include "operand.h"

namespace attention_ext::cpu {
namespace {

// The kernels' view of a checked call (the fields both passes share).
template <class Args>
Args kernel_args(const AttentionInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const QkvShape& s = in.shape;
  Args a{};
  a.dtype = in.dtype;
  a.B = s.B, a.Hq = s.Hq, a.Hkv = s.Hkv, a.Nq = s.Nq, a.Nk = s.Nk, a.Dqk = s.D, a.Dv = s.Dv;
  a.q = operand(q), a.k = operand(k), a.v = operand(v);
  a.mask = in.mask;
  a.docs = in.documents();
  a.scale = in.scale, a.softcap = in.softcap;
  a.mods = in.mods;
  return a;
}

struct CpuBackend {
  static constexpr bool kDocuments = true;  // the kernels walk packed documents (segments.h)

  static void fwd(const AttentionInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::Tensor& out, at::Tensor& lse) {
    auto a = kernel_args<AttentionFwdArgs>(in, q, k, v);
    a.out = out.data_ptr(), a.lse = lse.data_ptr();
    active_kernels().attention_fwd(a);
  }

  static void bwd(const AttentionInputs& in, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
    auto a = kernel_args<AttentionBwdArgs>(in, q, k, v);
    a.out = operand(out), a.grad_out = operand(grad_out);
    a.lse = lse.data_ptr(), a.grad_lse = grad_lse.defined() ? grad_lse.data_ptr() : nullptr;
    a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
    active_kernels().attention_bwd(a);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_op<CpuBackend>);
  m.impl("attention_bwd", &attention_bwd_op<CpuBackend>);
  m.impl("attention_decode", &attention_decode_op<CpuBackend>);
}

}  // namespace attention_ext::cpu
