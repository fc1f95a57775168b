#include "linear_args.h"

#include <cmath>
#include <tuple>

namespace attention_ext {
namespace {

QkvShape check_linear_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          bool causal) {
  const QkvShape s = check_qkv(op, q, k, v, kLinearMaxDim);
  TORCH_CHECK(!causal || s.Nq == s.Nk, op, ": q and k must have the same sequence length (causal attention and ",
              "the recurrent step read one token at a time), got ", s.Nq, " and ", s.Nk);
  return s;
}

void check_linear_params(const char* op, int64_t feature_map, int64_t chunk, double eps, double scale) {
  TORCH_CHECK(feature_map == kFeatureIdentity || feature_map == kFeatureElu || feature_map == kFeatureRelu, op,
              ": unknown feature_map code ", feature_map);
  TORCH_CHECK(chunk >= 1 && chunk <= kLinearMaxChunk, op, ": chunk_size must be in [1, ", kLinearMaxChunk, "], got ",
              chunk);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

// Both or neither; returns contiguous copies (undefined tensors when absent).
std::pair<at::Tensor, at::Tensor> check_linear_state(const char* op, const char* name, const QkvShape& s,
                                                     const at::Tensor& q, const std::optional<at::Tensor>& S,
                                                     const std::optional<at::Tensor>& z) {
  const bool hs = S.has_value() && S->defined(), hz = z.has_value() && z->defined();
  TORCH_CHECK(hs == hz, op, ": ", name, " needs both S and z or neither");
  if (!hs) return {};
  const auto dt = linear_state_dtype(q.scalar_type());
  const std::vector<int64_t> s_shape{s.B, s.Hkv, s.D, s.Dv}, z_shape{s.B, s.Hkv, s.D};
  TORCH_CHECK(S->sizes() == c10::IntArrayRef(s_shape), op, ": ", name, " S must have shape ",
              c10::IntArrayRef(s_shape), ", got ", S->sizes());
  TORCH_CHECK(z->sizes() == c10::IntArrayRef(z_shape), op, ": ", name, " z must have shape ",
              c10::IntArrayRef(z_shape), ", got ", z->sizes());
  TORCH_CHECK(S->scalar_type() == dt && z->scalar_type() == dt, op, ": ", name, " must be ", dt, ", got ",
              S->scalar_type(), " and ", z->scalar_type());
  check_device(op, name, *S, q);
  check_device(op, name, *z, q);
  return {S->contiguous(), z->contiguous()};
}

// grad_out, out and the state gradient, where a missing half counts as zero.
std::pair<at::Tensor, at::Tensor> check_linear_grads(const char* op, const QkvShape& s, const at::Tensor& q,
                                                     const at::Tensor& grad_out, const at::Tensor& out,
                                                     const std::optional<at::Tensor>& grad_S,
                                                     const std::optional<at::Tensor>& grad_z) {
  std::optional<at::Tensor> gS = grad_S, gz = grad_z;
  if (gS.has_value() != gz.has_value()) {
    const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
    if (!gS.has_value()) gS = at::zeros({s.B, s.Hkv, s.D, s.Dv}, sd);
    if (!gz.has_value()) gz = at::zeros({s.B, s.Hkv, s.D}, sd);
  }
  auto state_grad = check_linear_state(op, "grad of the final state", s, q, gS, gz);
  const std::vector<int64_t> o_shape{s.B, s.Hq, s.Nq, s.Dv};
  check_shape(op, "grad_out", grad_out, o_shape);
  check_shape(op, "out", out, o_shape);
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype");
  check_device(op, "grad_out", grad_out, q);
  check_device(op, "out", out, q);
  return state_grad;
}

// The checks every op starts with, in the order the ops always ran them.
LinearInputs check_linear_common(const char* op, const char* state_name, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const std::optional<at::Tensor>& S,
                                 const std::optional<at::Tensor>& z, const LinearOptions& o) {
  LinearInputs in{};
  in.shape = check_linear_qkv(op, q, k, v, o.causal);
  check_linear_params(op, o.feature_map, o.chunk, o.eps, o.scale);
  std::tie(in.S0, in.z0) = check_linear_state(op, state_name, in.shape, q, S, z);
  in.options = o;
  return in;
}

}  // namespace

LinearInputs check_linear_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
                                     const LinearOptions& options) {
  return check_linear_common("linear_fwd", "initial state", q, k, v, S0, z0, options);
}

LinearInputs check_linear_bwd_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_S,
                                     const std::optional<at::Tensor>& grad_z, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                     const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
                                     const LinearOptions& options) {
  const char* op = "linear_bwd";
  LinearInputs in = check_linear_common(op, "initial state", q, k, v, S0, z0, options);
  std::tie(in.grad_S, in.grad_z) = check_linear_grads(op, in.shape, q, grad_out, out, grad_S, grad_z);
  return in;
}

LinearInputs check_linear_step_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& S, const at::Tensor& z, const LinearOptions& options) {
  return check_linear_common("linear_step", "state", q, k, v, S, z, options);
}

}  // namespace attention_ext
