// CPU bodies of linear_fwd / linear_bwd / linear_step: check, allocate, hand plain
// pointers to the active ISA build of the kernels (kernels/linear_*.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/linear_args.h"
#include "isa.h"

namespace attention_ext::cpu {
namespace {

Operand lin_operand(const at::Tensor& t) {
  Operand o;
  o.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) o.stride[i] = t.stride(i);
  return o;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const std::optional<at::Tensor>& S0,
                                                              const std::optional<at::Tensor>& z0, int64_t feature_map,
                                                              bool causal, bool normalize, double eps, double scale,
                                                              int64_t chunk_size) {
  const char* op = "linear_fwd";
  const QkvShape s = check_linear_qkv(op, q, k, v, causal);
  check_linear_params(op, feature_map, chunk_size, eps, scale);
  auto [S0c, z0c] = check_linear_state(op, "initial state", s, q, S0, z0);
  const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto S = at::empty({s.B, s.Hkv, s.D, s.Dv}, sd);
  auto z = at::empty({s.B, s.Hkv, s.D}, sd);
  LinearFwdArgs a{};
  a.dtype = dtype_of(q.scalar_type());
  a.B = s.B, a.Hq = s.Hq, a.Hkv = s.Hkv, a.Nq = s.Nq, a.Nk = s.Nk, a.D = s.D, a.Dv = s.Dv;
  a.q = lin_operand(q), a.k = lin_operand(k), a.v = lin_operand(v);
  a.S0 = ptr_or_null(S0c), a.z0 = ptr_or_null(z0c);
  a.out = out.data_ptr(), a.S = S.data_ptr(), a.z = z.data_ptr();
  a.feature_map = feature_map, a.chunk = chunk_size;
  a.causal = causal, a.normalize = normalize;
  a.eps = eps, a.scale = scale;
  active_kernels().linear_fwd(a);
  return {out, S, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_S, const std::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, int64_t feature_map, bool causal,
    bool normalize, double eps, double scale, int64_t chunk_size) {
  const char* op = "linear_bwd";
  const QkvShape s = check_linear_qkv(op, q, k, v, causal);
  check_linear_params(op, feature_map, chunk_size, eps, scale);
  auto [S0c, z0c] = check_linear_state(op, "initial state", s, q, S0, z0);
  auto [gSc, gzc] = check_linear_bwd_inputs(op, s, q, grad_out, out, grad_S, grad_z);
  const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
  auto dq = at::empty({s.B, s.Hq, s.Nq, s.D}, q.options());
  auto dk = at::empty({s.B, s.Hkv, s.Nk, s.D}, q.options());
  auto dv = at::empty({s.B, s.Hkv, s.Nk, s.Dv}, q.options());
  auto dS0 = at::empty({s.B, s.Hkv, s.D, s.Dv}, sd);
  auto dz0 = at::empty({s.B, s.Hkv, s.D}, sd);
  LinearBwdArgs a{};
  a.dtype = dtype_of(q.scalar_type());
  a.B = s.B, a.Hq = s.Hq, a.Hkv = s.Hkv, a.Nq = s.Nq, a.Nk = s.Nk, a.D = s.D, a.Dv = s.Dv;
  a.q = lin_operand(q), a.k = lin_operand(k), a.v = lin_operand(v);
  a.out = lin_operand(out), a.grad_out = lin_operand(grad_out);
  a.S0 = ptr_or_null(S0c), a.z0 = ptr_or_null(z0c);
  a.grad_S = ptr_or_null(gSc), a.grad_z = ptr_or_null(gzc);
  a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
  a.dS0 = dS0.data_ptr(), a.dz0 = dz0.data_ptr();
  a.feature_map = feature_map, a.chunk = chunk_size;
  a.causal = causal, a.normalize = normalize;
  a.eps = eps, a.scale = scale;
  active_kernels().linear_bwd(a);
  return {dq, dk, dv, dS0, dz0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_step_cpu(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& S,
                                                               const at::Tensor& z, int64_t feature_map,
                                                               bool normalize, double eps, double scale) {
  const char* op = "linear_step";
  const QkvShape s = check_linear_qkv(op, q, k, v, /*causal=*/true);
  check_linear_params(op, feature_map, 1, eps, scale);
  auto [Sc, zc] = check_linear_state(op, "state", s, q, S, z);
  const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto S1 = at::empty({s.B, s.Hkv, s.D, s.Dv}, sd);
  auto z1 = at::empty({s.B, s.Hkv, s.D}, sd);
  LinearStepArgs a{};
  a.dtype = dtype_of(q.scalar_type());
  a.B = s.B, a.Hq = s.Hq, a.Hkv = s.Hkv, a.T = s.Nq, a.D = s.D, a.Dv = s.Dv;
  a.q = lin_operand(q), a.k = lin_operand(k), a.v = lin_operand(v);
  a.S0 = Sc.data_ptr(), a.z0 = zc.data_ptr();
  a.out = out.data_ptr(), a.S = S1.data_ptr(), a.z = z1.data_ptr();
  a.feature_map = feature_map, a.normalize = normalize;
  a.eps = eps, a.scale = scale;
  active_kernels().linear_step(a);
  return {out, S1, z1};
}

}  // namespace

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("linear_fwd", &linear_fwd_cpu);
  m.impl("linear_bwd", &linear_bwd_cpu);
  m.impl("linear_step", &linear_step_cpu);
}

}  // namespace attention_ext::cpu
