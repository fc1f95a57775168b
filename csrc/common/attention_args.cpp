#include "attention_args.h"

#include <cmath>
#include <initializer_list>
#include <vector>

namespace attention_ext {

int64_t attention_max_head_dim(const at::Device& device) {
  return device.is_cuda() ? kCudaMaxHeadDim : kCpuMaxHeadDim;
}

namespace {

// (B, Nk) bool -> (B, Nk + 1) int32 prefix counts, after checking shape and device.
at::Tensor prefix_counts(const char* op, const char* name, const at::Tensor& g, const QkvShape& s,
                         const at::Tensor& q) {
  TORCH_CHECK(g.scalar_type() == at::kBool, op, ": ", name, " must be bool, got ", g.scalar_type());
  check_device(op, name, g, q);
  check_shape(op, name, g, {s.B, s.Nk});
  TORCH_CHECK(s.Nk < (int64_t(1) << 31), op, ": ", name, " needs fewer than 2^31 keys, got ", s.Nk);
  auto pre = at::zeros({s.B, s.Nk + 1}, g.options().dtype(at::kInt));
  if (s.Nk > 0) pre.narrow(1, 1, s.Nk).copy_(g.to(at::kInt).cumsum(1));
  return pre;
}

// cu_seqlens (S + 1,) or (B, S + 1) int32 on q's device -> host (rows, S + 1) boundaries.
at::Tensor check_cu_seqlens(const char* op, const char* name, const at::Tensor& c, int64_t B, int64_t n,
                            const at::Tensor& q) {
  TORCH_CHECK_TYPE(c.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", c.scalar_type());
  check_device(op, name, c, q);
  TORCH_CHECK_VALUE((c.dim() == 1 || (c.dim() == 2 && c.size(0) == B)) && c.size(-1) >= 1, op, ": ", name,
                    " must have shape (S + 1,) or (batch=", B, ", S + 1), got ", c.sizes());
  return host_boundaries(op, name, c, c.dim() == 1 ? 1 : B, n);
}

// A score-term tensor (alibi_slopes, sinks): the lse dtype, q's device, one of the given
// shapes, finite values (read once: a sync on CUDA, as for cu_seqlens).
at::Tensor check_score_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                              std::initializer_list<std::vector<int64_t>> shapes, const char* want) {
  const auto dt = acc_dtype(q.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == dt, op, ": ", name, " must be ", dt, " for ", q.scalar_type(),
                   " inputs, got ", t.scalar_type());
  check_device(op, name, t, q);
  bool ok = false;
  for (const auto& sh : shapes) ok |= t.sizes() == at::IntArrayRef(sh);
  TORCH_CHECK_VALUE(ok, op, ": ", name, " has shape ", t.sizes(), ", expected ", want);
  TORCH_CHECK_VALUE(t.numel() == 0 || at::isfinite(t).all().item<bool>(), op, ": ", name,
                    " must hold finite values");
  return t.contiguous();
}

void check_numbers(const char* op, const AttentionSpecArgs& a) {
  TORCH_CHECK(std::isfinite(a.scale) && a.scale > 0, op, ": scale must be positive and finite, got ", a.scale);
  TORCH_CHECK(a.softcap == 0 || (a.softcap >= kMinSoftcap && a.softcap <= kMaxSoftcap), op,
              ": softcap must be 0 (off) or in [", kMinSoftcap, ", ", kMaxSoftcap, "], got ", a.softcap);
  TORCH_CHECK(a.mask_kind >= kDense && a.mask_kind <= kBlockLayout, op, ": unknown mask_kind ", a.mask_kind);
  TORCH_CHECK(a.window_left >= 0 && a.window_right >= 0, op, ": window_left and window_right must be >= 0, got ",
              a.window_left, " and ", a.window_right);
  TORCH_CHECK(a.dilation >= 1, op, ": dilation must be >= 1, got ", a.dilation);
  TORCH_CHECK(a.kernel_size >= 1, op, ": kernel_size must be >= 1, got ", a.kernel_size);
  TORCH_CHECK(a.num_global >= 0, op, ": num_global must be >= 0, got ", a.num_global);
  TORCH_CHECK(a.block_size >= 1, op, ": block_size must be >= 1, got ", a.block_size);
  TORCH_CHECK_VALUE(a.dropout_p >= 0 && a.dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", a.dropout_p);
}

// dropout_p and its int64 (2,) (seed, offset), on any device: read once on the host.
DropoutSpec check_dropout(const char* op, const AttentionSpecArgs& a) {
  DropoutSpec d;
  if (a.dropout_p == 0) return d;
  TORCH_CHECK_VALUE(a.dropout_seed.has_value(), op, ": dropout_p > 0 needs dropout_seed");
  const at::Tensor& t = *a.dropout_seed;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": dropout_seed must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == 2, op, ": dropout_seed must have shape (2,), got ", t.sizes());
  const at::Tensor h = t.cpu().contiguous();
  d.p = a.dropout_p;
  d.seed = uint64_t(h.data_ptr<int64_t>()[0]);
  d.offset = uint32_t(uint64_t(h.data_ptr<int64_t>()[1]));
  return d;
}

// The grid neighborhood's fields (mask.h, na_nd > 0), padded in front to 3 dims. The public
// function (attention_ext/_neighborhood.py) checks them with messages naming its arguments;
// this keeps a raw op call from reading out of bounds.
void check_grid(const char* op, const QkvShape& s, const AttentionSpecArgs& a, MaskSpec& m) {
  const int64_t nd = int64_t(a.spatial_shape.size());
  TORCH_CHECK_VALUE(a.mask_kind == kNeighborhood, op, ": spatial_shape needs mask_kind ", kNeighborhood);
  TORCH_CHECK_VALUE(nd >= 1 && nd <= 3, op, ": spatial_shape must have 1 to 3 dims, got ", a.spatial_shape);
  for (const auto& [name, v] : {std::pair<const char*, at::IntArrayRef>{"na_kernel_size", a.na_kernel_size},
                                {"na_dilation", a.na_dilation}, {"na_stride", a.na_stride},
                                {"na_causal", a.na_causal}, {"tile_shape", a.tile_shape}})
    TORCH_CHECK_VALUE(int64_t(v.size()) == nd, op, ": ", name, " must have ", nd, " entries, got ", v);
  TORCH_CHECK_VALUE(s.Nq == s.Nk, op, ": neighborhood attention needs Nq == Nk, got ", s.Nq, " and ", s.Nk);
  TORCH_CHECK_VALUE(!a.causal, op, ": a grid neighborhood takes na_causal, not causal");
  TORCH_CHECK_VALUE(!a.cu_seqlens_q.has_value() && !a.alibi_slopes.has_value(), op,
                    ": a grid neighborhood takes neither cu_seqlens nor alibi_slopes");
  int64_t n = 1;
  for (int64_t d = 0; d < nd; ++d) {
    const int64_t E = a.spatial_shape[d], K = a.na_kernel_size[d], D = a.na_dilation[d], S = a.na_stride[d];
    TORCH_CHECK_VALUE(E >= 1 && K >= 1 && D >= 1 && S >= 1 && S <= K && K <= E / D && a.tile_shape[d] >= 1, op,
                      ": grid dim ", d, ": need extent >= kernel_size * dilation, 1 <= stride <= kernel_size and "
                      "tile >= 1, got extent ", E, ", kernel_size ", K, ", dilation ", D, ", stride ", S, ", tile ",
                      a.tile_shape[d]);
    TORCH_CHECK_VALUE(n <= s.Nk / E, op, ": spatial_shape ", a.spatial_shape, " has more tokens than Nk = ", s.Nk);
    n *= E;
    const int64_t p = 3 - nd + d;
    m.na_extent[p] = E, m.na_kernel[p] = K, m.na_dilation[p] = D, m.na_stride[p] = S;
    m.na_tile[p] = a.tile_shape[d], m.na_causal[p] = a.na_causal[d] != 0;
  }
  TORCH_CHECK_VALUE(n == s.Nk, op, ": spatial_shape ", a.spatial_shape, " holds ", n, " tokens, but Nk = ", s.Nk);
  m.na_nd = nd;
}

AttentionInputs check_spec(const char* op, const QkvShape& s, const at::Tensor& q, const AttentionSpecArgs& a) {
  check_numbers(op, a);
  AttentionInputs in;
  in.shape = s;
  in.dtype = dtype_of(q.scalar_type());
  in.scale = a.scale;
  in.softcap = a.softcap;
  in.dropout = check_dropout(op, a);
  MaskSpec& m = in.mask;
  m.kind = a.mask_kind;
  m.causal = a.causal;
  // reach beyond the sequence changes nothing; the clamp keeps left * dilation in range
  const int64_t cap = s.Nq + s.Nk + 1;
  m.left = std::min(a.window_left, cap);
  m.right = std::min(a.window_right, cap);
  m.dilation = std::min(a.dilation, cap);
  m.kernel_size = a.kernel_size;
  m.num_global = std::min(a.num_global, s.Nk);
  m.nq = s.Nq;
  m.nk = s.Nk;
  m.offset = s.Nk - s.Nq;
  m.prefix_stride = s.Nk + 1;
  if (!a.spatial_shape.empty()) check_grid(op, s, a, m);
  else if (a.mask_kind == kNeighborhood) {
    TORCH_CHECK(s.Nq == s.Nk, op, ": neighborhood attention needs Nq == Nk, got ", s.Nq, " and ", s.Nk);
    TORCH_CHECK(a.kernel_size % 2 == 1, op, ": kernel_size must be odd, got ", a.kernel_size);
    // kernel_size * dilation <= Nk, without the product (it may not fit in int64)
    TORCH_CHECK(s.Nk == 0 || a.kernel_size <= s.Nk / a.dilation, op, ": kernel_size (", a.kernel_size,
                ") * dilation (", a.dilation, ") must not exceed the sequence length (", s.Nk, ")");
  }
  if (a.global_mask.has_value()) {
    in.global_prefix = prefix_counts(op, "global_mask", *a.global_mask, s, q);
    m.global_prefix = in.global_prefix.data_ptr<int32_t>();
  }
  if (a.key_mask.has_value()) {
    in.key_prefix = prefix_counts(op, "key_mask", *a.key_mask, s, q);
    m.key_prefix = in.key_prefix.data_ptr<int32_t>();
  }
  if (a.block_layout.has_value()) check_device(op, "block_layout", *a.block_layout, q);
  if (a.mask_kind == kBlockLayout) {
    TORCH_CHECK(a.block_layout.has_value(), op, ": mask_kind ", kBlockLayout, " (block layout) needs block_layout");
    const auto& l = *a.block_layout;
    const int64_t nqb = cdiv_safe(s.Nq, a.block_size), nkb = cdiv_safe(s.Nk, a.block_size);
    TORCH_CHECK(l.scalar_type() == at::kBool, op, ": block_layout must be bool, got ", l.scalar_type());
    TORCH_CHECK(l.dim() == 3 && (l.size(0) == 1 || l.size(0) == s.Hq) && l.size(1) == nqb && l.size(2) == nkb, op,
                ": block_layout must have shape (1 or ", s.Hq, ", ", nqb, ", ", nkb, ") for block_size ",
                a.block_size, ", got ", l.sizes());
    in.block_layout = l.contiguous();
    m.layout = in.block_layout.data_ptr<bool>();
    m.layout_heads = l.size(0);
    m.nqb = nqb;
    m.nkb = nkb;
    m.block_size = a.block_size;
  }
  if (a.cu_seqlens_q.has_value() || a.cu_seqlens_k.has_value()) {
    TORCH_CHECK_VALUE(a.cu_seqlens_q.has_value() && a.cu_seqlens_k.has_value(), op,
                      ": cu_seqlens_q and cu_seqlens_k go together (pass both, or neither)");
    // one tensor for both is the public cu_seqlens: the messages name it so
    const bool one = a.cu_seqlens_q->is_same(*a.cu_seqlens_k);
    in.cu_q = check_cu_seqlens(op, one ? "cu_seqlens" : "cu_seqlens_q", *a.cu_seqlens_q, s.B, s.Nq, q);
    in.cu_k = one ? in.cu_q : check_cu_seqlens(op, "cu_seqlens_k", *a.cu_seqlens_k, s.B, s.Nk, q);
    TORCH_CHECK_VALUE(in.cu_q.sizes() == in.cu_k.sizes(), op,
                      ": cu_seqlens_q and cu_seqlens_k must have the same shape, got ", a.cu_seqlens_q->sizes(),
                      " and ", a.cu_seqlens_k->sizes());
    TORCH_CHECK_VALUE(a.mask_kind != kNeighborhood || at::equal(in.cu_q, in.cu_k), op,
                      ": neighborhood attention needs the same documents for queries and keys "
                      "(cu_seqlens_q == cu_seqlens_k)");
  }
  check_score_mods(op, a.alibi_slopes, a.sinks, q, s.B, s.Hq, &in.mods, &in.alibi, &in.sinks);
  return in;
}

}  // namespace

void check_score_mods(const char* op, const std::optional<at::Tensor>& alibi_slopes,
                      const std::optional<at::Tensor>& sinks, const at::Tensor& q, int64_t B, int64_t Hq,
                      ScoreMods* mods, at::Tensor* alibi, at::Tensor* sinks_kept) {
  mods->hq = Hq;
  if (alibi_slopes.has_value()) {
    *alibi = check_score_tensor(op, "alibi_slopes", *alibi_slopes, q, {{Hq}, {B, Hq}}, "(Hq,) or (B, Hq)")
                 .expand({B, Hq})
                 .contiguous();
    mods->alibi = alibi->data_ptr();
  }
  if (sinks.has_value()) {
    *sinks_kept = check_score_tensor(op, "sinks", *sinks, q, {{Hq}}, "(Hq,)");
    mods->sinks = sinks_kept->data_ptr();
  }
}

Documents AttentionInputs::documents() const {
  Documents d;
  if (!cu_q.defined()) return d;
  d.cu_q = cu_q.data_ptr<int32_t>(), d.cu_k = cu_k.data_ptr<int32_t>();
  d.rows = cu_q.size(0), d.count = cu_q.size(1) - 1;
  return d;
}

AttentionInputs check_attention_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const AttentionSpecArgs& spec) {
  const char* op = "attention_fwd";
  const QkvShape s = check_qkv(op, q, k, v, attention_max_head_dim(q.device()));
  return check_spec(op, s, q, spec);
}

AttentionInputs check_attention_bwd_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                                           const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           const AttentionSpecArgs& spec) {
  const char* op = "attention_bwd";
  const QkvShape s = check_qkv(op, q, k, v, attention_max_head_dim(q.device()));
  const auto st = q.scalar_type(), lt = acc_dtype(st);
  for (const auto& [name, t, dtype] :
       {std::tuple<const char*, const at::Tensor&, at::ScalarType>{"grad_out", grad_out, st}, {"out", out, st},
        {"lse", lse, lt}}) {
    check_device(op, name, t, q);
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  }
  check_shape(op, "grad_out", grad_out, {s.B, s.Hq, s.Nq, s.Dv});
  check_shape(op, "out", out, {s.B, s.Hq, s.Nq, s.Dv});
  check_shape(op, "lse", lse, {s.B, s.Hq, s.Nq});
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_device(op, "grad_lse", *grad_lse, q);
    TORCH_CHECK(grad_lse->is_floating_point(), op, ": grad_lse must be floating point, got ",
                grad_lse->scalar_type());
    check_shape(op, "grad_lse", *grad_lse, {s.B, s.Hq, s.Nq});
  }
  return check_spec(op, s, q, spec);
}

}  // namespace attention_ext
