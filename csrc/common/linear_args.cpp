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

// The host copy of a checked cu_seqlens (undefined when absent). Every value is read here,
// so a kernel walking the documents never leaves [0, N).
at::Tensor check_cu_seqlens(const char* op, const QkvShape& s, const at::Tensor& q,
                            const std::optional<at::Tensor>& cu_seqlens) {
  if (!cu_seqlens.has_value() || !cu_seqlens->defined()) return {};
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": cu_seqlens must be 1-D (documents + 1,), got shape ",
                    cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == q.device(), op, ": cu_seqlens must be on q's device (", q.device(), "), got ",
                    cu.device());
  TORCH_CHECK_VALUE(s.B == 1, op, ": cu_seqlens needs batch size 1 (documents packed along the sequence), got ",
                    s.B);
  TORCH_CHECK_VALUE(s.Nq == s.Nk, op, ": cu_seqlens needs as many queries as keys, got ", s.Nq, " and ", s.Nk);
  // CUDA: one device-to-host copy (a sync), what checking the values on the host costs
  const at::Tensor host = cu.to(at::kCPU).contiguous();
  const int32_t* c = host.data_ptr<int32_t>();
  const int64_t docs = host.size(0) - 1;
  TORCH_CHECK_VALUE(c[0] == 0, op, ": cu_seqlens must start at 0, got ", c[0]);
  TORCH_CHECK_VALUE(c[docs] == s.Nq, op, ": cu_seqlens must end at the sequence length ", s.Nq, ", got ", c[docs]);
  for (int64_t i = 0; i < docs; ++i)
    TORCH_CHECK_VALUE(c[i + 1] >= c[i], op, ": cu_seqlens must be non-decreasing, got ", c[i], " then ", c[i + 1],
                      " at ", i);
  return host;
}

// Both or neither, (segments, Hkv, D, Dv) and (segments, Hkv, D); returns contiguous copies
// (undefined tensors when absent).
std::pair<at::Tensor, at::Tensor> check_linear_state(const char* op, const char* name, const QkvShape& s,
                                                     int64_t segments, const at::Tensor& q,
                                                     const std::optional<at::Tensor>& S,
                                                     const std::optional<at::Tensor>& z) {
  const bool hs = S.has_value() && S->defined(), hz = z.has_value() && z->defined();
  TORCH_CHECK(hs == hz, op, ": ", name, " needs both S and z or neither");
  if (!hs) return {};
  const auto dt = linear_state_dtype(q.scalar_type());
  const std::vector<int64_t> s_shape{segments, s.Hkv, s.D, s.Dv}, z_shape{segments, s.Hkv, s.D};
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
std::pair<at::Tensor, at::Tensor> check_linear_grads(const char* op, const QkvShape& s, int64_t segments,
                                                     const at::Tensor& q,
                                                     const at::Tensor& grad_out, const at::Tensor& out,
                                                     const std::optional<at::Tensor>& grad_S,
                                                     const std::optional<at::Tensor>& grad_z) {
  std::optional<at::Tensor> gS = grad_S, gz = grad_z;
  if (gS.has_value() != gz.has_value()) {
    const auto sd = q.options().dtype(linear_state_dtype(q.scalar_type()));
    if (!gS.has_value()) gS = at::zeros({segments, s.Hkv, s.D, s.Dv}, sd);
    if (!gz.has_value()) gz = at::zeros({segments, s.Hkv, s.D}, sd);
  }
  auto state_grad = check_linear_state(op, "grad of the final state", s, segments, q, gS, gz);
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
                                 const std::optional<at::Tensor>& z, const LinearOptions& o,
                                 const std::optional<at::Tensor>& cu_seqlens) {
  LinearInputs in{};
  in.shape = check_linear_qkv(op, q, k, v, o.causal);
  check_linear_params(op, o.feature_map, o.chunk, o.eps, o.scale);
  in.cu_seqlens = check_cu_seqlens(op, in.shape, q, cu_seqlens);
  in.segments = in.cu_seqlens.defined() ? in.cu_seqlens.size(0) - 1 : in.shape.B;
  std::tie(in.S0, in.z0) = check_linear_state(op, state_name, in.shape, in.segments, q, S, z);
  in.options = o;
  return in;
}

}  // namespace

LinearInputs check_linear_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
                                     const LinearOptions& options, const std::optional<at::Tensor>& cu_seqlens) {
  return check_linear_common("linear_fwd", "initial state", q, k, v, S0, z0, options, cu_seqlens);
}

LinearInputs check_linear_bwd_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_S,
                                     const std::optional<at::Tensor>& grad_z, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                     const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
                                     const LinearOptions& options, const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "linear_bwd";
  LinearInputs in = check_linear_common(op, "initial state", q, k, v, S0, z0, options, cu_seqlens);
  std::tie(in.grad_S, in.grad_z) =
      check_linear_grads(op, in.shape, in.segments, q, grad_out, out, grad_S, grad_z);
  return in;
}

LinearInputs check_linear_step_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& S, const at::Tensor& z, const LinearOptions& options) {
  return check_linear_common("linear_step", "state", q, k, v, S, z, options, std::nullopt);
}

}  // namespace attention_ext
