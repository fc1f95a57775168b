#include "tensor_checks.h"

#include <string>

namespace attention_ext {

QkvShape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t max_dim) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-D (batch, heads, seq, head_dim), got q.dim()=", q.dim(), ", k.dim()=", k.dim(),
              ", v.dim()=", v.dim());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": q dtype must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, op, ": q, k, v must share a dtype, got ", st, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  check_device(op, "k", k, q);
  check_device(op, "v", v, q);
  const QkvShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": batch sizes differ: q ", s.B, ", k ", k.size(0), ", v ",
              v.size(0));
  TORCH_CHECK(v.size(1) == s.Hkv, op, ": k and v head counts differ: ", s.Hkv, " vs ", v.size(1));
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, op, ": q heads (", s.Hq, ") must be a multiple of k/v heads (", s.Hkv,
              ")");
  TORCH_CHECK(v.size(2) == s.Nk, op, ": k and v sequence lengths differ: ", s.Nk, " vs ", v.size(2));
  TORCH_CHECK(k.size(3) == s.D, op, ": q and k head dims differ: ", s.D, " vs ", k.size(3));
  TORCH_CHECK(s.D >= 1 && s.D <= max_dim && s.Dv >= 1 && s.Dv <= max_dim, op, ": head dims must be in [1, ", max_dim,
              "] on ", q.device().type(), ", got ", s.D, " (q/k) and ", s.Dv, " (v)");
  return s;
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device (", q.device(), "), got ",
              t.device());
}

void check_device(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& q) {
  if (t.has_value() && t->defined()) check_device(op, name, *t, q);
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK(false, "attention_ext: unsupported dtype ", t);
  }
}

at::Tensor host_boundaries(const char* op, const char* name, const at::Tensor& c, int64_t rows, int64_t n) {
  const at::Tensor h = c.to(at::kCPU).contiguous().view({rows, -1});
  const int64_t S = h.size(1) - 1;
  const int32_t* p = h.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r, p += S + 1) {
    const std::string where = rows > 1 ? " in row " + std::to_string(r) : "";
    TORCH_CHECK_VALUE(p[0] == 0, op, ": ", name, " must start at 0, got ", p[0], where);
    TORCH_CHECK_VALUE(p[S] == n, op, ": ", name, " must end at the sequence length ", n, ", got ", p[S], where);
    for (int64_t i = 0; i < S; ++i)
      TORCH_CHECK_VALUE(p[i] <= p[i + 1], op, ": ", name, " must be non-decreasing, got ", p[i], " then ", p[i + 1],
                        " at index ", i, where);
  }
  return h;
}

}  // namespace attention_ext
