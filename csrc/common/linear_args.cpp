#include "linear_args.h"

#include <cmath>

namespace attention_ext {

LinearShape check_linear_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-D (batch, heads, seq, dim), got q.dim()=", q.dim(), ", k.dim()=", k.dim(),
              ", v.dim()=", v.dim());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": q dtype must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  LinearShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": batch sizes differ: q ", s.B, ", k ", k.size(0), ", v ",
              v.size(0));
  TORCH_CHECK(v.size(1) == s.Hkv, op, ": k and v head counts differ: ", s.Hkv, " vs ", v.size(1));
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, op, ": q heads (", s.Hq, ") must be a multiple of k/v heads (", s.Hkv,
              ")");
  TORCH_CHECK(v.size(2) == s.Nk, op, ": k and v sequence lengths differ: ", s.Nk, " vs ", v.size(2));
  TORCH_CHECK(k.size(3) == s.D, op, ": q and k feature dims differ: ", s.D, " vs ", k.size(3));
  TORCH_CHECK(s.D >= 1 && s.D <= kLinearMaxDim && s.Dv >= 1 && s.Dv <= kLinearMaxDim, op,
              ": feature and value dims must be in [1, ", kLinearMaxDim, "], got ", s.D, " and ", s.Dv);
  TORCH_CHECK(!causal || s.Nq == s.Nk, op, ": causal needs as many queries as keys, got ", s.Nq, " and ", s.Nk);
  return s;
}

void check_linear_params(const char* op, int64_t feature_map, int64_t chunk, double eps, double scale) {
  TORCH_CHECK(feature_map == kFeatureIdentity || feature_map == kFeatureElu || feature_map == kFeatureRelu, op,
              ": unknown feature_map code ", feature_map);
  TORCH_CHECK(chunk >= 1, op, ": chunk_size must be >= 1, got ", chunk);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

std::pair<at::Tensor, at::Tensor> check_linear_state(const char* op, const char* name, const LinearShape& s,
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
  TORCH_CHECK(S->device() == q.device() && z->device() == q.device(), op, ": ", name, " must be on ", q.device());
  return {S->contiguous(), z->contiguous()};
}

std::pair<at::Tensor, at::Tensor> check_linear_bwd_inputs(const char* op, const LinearShape& s, const at::Tensor& q,
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
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(o_shape) && out.sizes() == c10::IntArrayRef(o_shape), op,
              ": grad_out and out must be ", c10::IntArrayRef(o_shape));
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype");
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device(), op,
              ": grad_out and out must be on q's device");
  return state_grad;
}

}  // namespace attention_ext
