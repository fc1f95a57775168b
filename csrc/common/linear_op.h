// The one body of linear_fwd, linear_bwd and linear_step for every backend: checks, outputs
// and the empty batch live here; a backend only runs its kernels on a checked call.
//
//   struct Backend {
//     static void fwd(const LinearInputs&, q, k, v, at::Tensor& out, at::Tensor& S, at::Tensor& z);
//     static void bwd(const LinearInputs&, grad_out, q, k, v, out,
//                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dS0, at::Tensor& dz0);
//     static void step(const LinearInputs&, q, k, v, at::Tensor& out, at::Tensor& S, at::Tensor& z);
//   };
//   m.impl("linear_fwd", &linear_fwd_op<Backend>);   // cpu/linear_ops.cpp, cuda/linear_ops.cu
// The states a backend reads (initial state, state-gradient) are in LinearInputs, contiguous.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

#include "linear_args.h"

namespace attention_ext {

// Uninitialised (S, z) of shape (segments, Hkv, D, Dv) and (segments, Hkv, D), the state dtype.
inline std::pair<at::Tensor, at::Tensor> empty_linear_state(const LinearInputs& in, const at::Tensor& q) {
  const QkvShape& s = in.shape;
  const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
  return {at::empty({in.segments, s.Hkv, s.D, s.Dv}, sd), at::empty({in.segments, s.Hkv, s.D}, sd)};
}

// No segment (B == 0, or cu_seqlens with no document and so N == 0) is the only empty call
// (check_qkv refuses Hkv == 0): every output is empty then.

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_op(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const std::optional<at::Tensor>& S0,
                                                             const std::optional<at::Tensor>& z0, int64_t feature_map,
                                                             bool causal, bool normalize, double eps, double scale,
                                                             int64_t chunk_size,
                                                             const std::optional<at::Tensor>& cu_seqlens) {
  const LinearInputs in =
      check_linear_fwd_inputs(q, k, v, S0, z0, {feature_map, causal, normalize, eps, scale, chunk_size}, cu_seqlens);
  const QkvShape& s = in.shape;
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto [S, z] = empty_linear_state(in, q);
  if (in.segments > 0) Backend::fwd(in, q, k, v, out, S, z);
  return {out, S, z};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_op(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_S, const std::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, int64_t feature_map, bool causal,
    bool normalize, double eps, double scale, int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens) {
  const LinearInputs in = check_linear_bwd_inputs(grad_out, grad_S, grad_z, q, k, v, out, S0, z0,
                                                  {feature_map, causal, normalize, eps, scale, chunk_size}, cu_seqlens);
  const QkvShape& s = in.shape;
  auto dq = at::empty({s.B, s.Hq, s.Nq, s.D}, q.options());
  auto dk = at::empty({s.B, s.Hkv, s.Nk, s.D}, q.options());
  auto dv = at::empty({s.B, s.Hkv, s.Nk, s.Dv}, q.options());
  auto [dS0, dz0] = empty_linear_state(in, q);
  if (in.segments > 0) Backend::bwd(in, grad_out, q, k, v, out, dq, dk, dv, dS0, dz0);
  return {dq, dk, dv, dS0, dz0};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_step_op(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& S,
                                                              const at::Tensor& z, int64_t feature_map,
                                                              bool normalize, double eps, double scale) {
  const LinearInputs in = check_linear_step_inputs(q, k, v, S, z, {feature_map, true, normalize, eps, scale, 1});
  const QkvShape& s = in.shape;
  auto out = at::empty({s.B, s.Hq, s.Nq, s.Dv}, q.options());
  auto [S1, z1] = empty_linear_state(in, q);
  if (s.B > 0) Backend::step(in, q, k, v, out, S1, z1);
  return {out, S1, z1};
}

}  // namespace attention_ext
