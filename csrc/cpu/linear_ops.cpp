// CPU backend of linear_fwd / linear_bwd / linear_step: the shared op body
// (common/linear_op.h) checks and allocates; this hands plain pointers to the active ISA
// build of the kernels (kernels/linear_*.cpp).
#include <torch/library.h>

#include "../common/linear_op.h"
#include "isa.h"
#include "operand.h"

namespace attention_ext::cpu {
namespace {

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The kernels' view of a checked call (the fields linear_fwd and linear_bwd share).
template <class Args>
Args kernel_args(const LinearInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const QkvShape& s = in.shape;
  const LinearOptions& o = in.options;
  Args a{};
  a.dtype = dtype_of(q.scalar_type());
  a.B = s.B, a.Hq = s.Hq, a.Hkv = s.Hkv, a.Nq = s.Nq, a.Nk = s.Nk, a.D = s.D, a.Dv = s.Dv;
  a.q = operand(q), a.k = operand(k), a.v = operand(v);
  a.cu_seqlens = in.cu_seqlens.defined() ? in.cu_seqlens.data_ptr<int32_t>() : nullptr;
  a.segments = in.segments;
  a.S0 = ptr_or_null(in.S0), a.z0 = ptr_or_null(in.z0);
  a.feature_map = o.feature_map, a.chunk = o.chunk;
  a.causal = o.causal, a.normalize = o.normalize;
  a.eps = o.eps, a.scale = o.scale;
  return a;
}

struct CpuBackend {
  static void fwd(const LinearInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::Tensor& out, at::Tensor& S, at::Tensor& z) {
    auto a = kernel_args<LinearFwdArgs>(in, q, k, v);
    a.out = out.data_ptr(), a.S = S.data_ptr(), a.z = z.data_ptr();
    active_kernels().linear_fwd(a);
  }

  static void bwd(const LinearInputs& in, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                  at::Tensor& dS0, at::Tensor& dz0) {
    auto a = kernel_args<LinearBwdArgs>(in, q, k, v);
    a.out = operand(out), a.grad_out = operand(grad_out);
    a.grad_S = ptr_or_null(in.grad_S), a.grad_z = ptr_or_null(in.grad_z);
    a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
    a.dS0 = dS0.data_ptr(), a.dz0 = dz0.data_ptr();
    active_kernels().linear_bwd(a);
  }

  static void step(const LinearInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   at::Tensor& out, at::Tensor& S, at::Tensor& z) {
    const QkvShape& s = in.shape;
    const LinearOptions& o = in.options;
    LinearStepArgs a{};
    a.dtype = dtype_of(q.scalar_type());
    a.B = s.B, a.Hq = s.Hq, a.Hkv = s.Hkv, a.T = s.Nq, a.D = s.D, a.Dv = s.Dv;
    a.q = operand(q), a.k = operand(k), a.v = operand(v);
    a.S0 = in.S0.data_ptr(), a.z0 = in.z0.data_ptr();
    a.out = out.data_ptr(), a.S = S.data_ptr(), a.z = z.data_ptr();
    a.feature_map = o.feature_map, a.normalize = o.normalize;
    a.eps = o.eps, a.scale = o.scale;
    active_kernels().linear_step(a);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("linear_fwd", &linear_fwd_op<CpuBackend>);
  m.impl("linear_bwd", &linear_bwd_op<CpuBackend>);
  m.impl("linear_step", &linear_step_op<CpuBackend>);
}

}  // namespace attention_ext::cpu
