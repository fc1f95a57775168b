#include "attention_args.h"

#include <cmath>

namespace attention_ext {

AttnShape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention_ext: q, k, v must be 4-D (batch, heads, seq, head_dim), got q.dim()=", q.dim(),
              ", k.dim()=", k.dim(), ", v.dim()=", v.dim());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention_ext: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "attention_ext: q dtype must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "attention_ext: q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  AttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, "attention_ext: batch sizes differ: q ", s.B, ", k ",
              k.size(0), ", v ", v.size(0));
  TORCH_CHECK(v.size(1) == s.Hkv, "attention_ext: k and v head counts differ: ", s.Hkv, " vs ", v.size(1));
  TORCH_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "attention_ext: q heads (", s.Hq,
              ") must be a multiple of k/v heads (", s.Hkv, ")");
  TORCH_CHECK(v.size(2) == s.Nk, "attention_ext: k and v sequence lengths differ: ", s.Nk, " vs ", v.size(2));
  TORCH_CHECK(k.size(3) == s.Dqk, "attention_ext: q and k head_dim differ: ", s.Dqk, " vs ", k.size(3));
  TORCH_CHECK(s.Dqk >= 1 && s.Dqk <= 512 && s.Dv >= 1 && s.Dv <= 512,
              "attention_ext: head_dim must be in [1, 512], got ", s.Dqk, " (q/k) and ", s.Dv, " (v)");
  return s;
}

void check_softcap(double softcap) {
  // the kernels hold softcap * log2(e), 1 / that and scale / softcap in float32
  TORCH_CHECK(softcap == 0 || (softcap >= kMinSoftcap && softcap <= kMaxSoftcap),
              "attention_ext: softcap must be 0 (off) or in [", kMinSoftcap, ", ", kMaxSoftcap, "], got ", softcap);
}

namespace {

// (B, Nk) bool -> (B, Nk + 1) int32 prefix counts, after checking shape and device.
at::Tensor prefix_counts(const at::Tensor& g, const char* name, const AttnShape& s, const at::Tensor& q) {
  TORCH_CHECK(g.scalar_type() == at::kBool, "attention_ext: ", name, " must be bool, got ", g.scalar_type());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == s.B && g.size(1) == s.Nk, "attention_ext: ", name, " must be (", s.B,
              ", ", s.Nk, "), got ", g.sizes());
  TORCH_CHECK(g.device() == q.device(), "attention_ext: ", name, " must be on ", q.device());
  auto pre = at::zeros({s.B, s.Nk + 1}, g.options().dtype(at::kInt));
  if (s.Nk > 0) pre.narrow(1, 1, s.Nk).copy_(g.to(at::kInt).cumsum(1));
  return pre;
}

}  // namespace

MaskArgs make_mask(const AttnShape& s, const at::Tensor& q, const std::optional<at::Tensor>& global_mask,
                   const std::optional<at::Tensor>& layout, int64_t kind, bool causal, int64_t left,
                   int64_t right, int64_t kernel_size, int64_t dilation, int64_t num_global,
                   int64_t block_size, const std::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(kind >= kDense && kind <= kBlockLayout, "attention_ext: unknown mask kind ", kind);
  TORCH_CHECK(left >= 0 && right >= 0, "attention_ext: window reach must be >= 0, got left=", left,
              ", right=", right);
  TORCH_CHECK(dilation >= 1, "attention_ext: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(num_global >= 0, "attention_ext: num_global must be >= 0, got ", num_global);
  MaskArgs m;
  MaskSpec& spec = m.spec;
  spec.kind = kind;
  spec.causal = causal;
  // reach beyond the sequence changes nothing; the clamp keeps left * dilation in range
  const int64_t cap = s.Nq + s.Nk + 1;
  spec.left = std::min(left, cap);
  spec.right = std::min(right, cap);
  spec.dilation = std::min(dilation, cap);
  spec.kernel_size = kernel_size;
  spec.num_global = std::min(num_global, s.Nk);
  spec.nq = s.Nq;
  spec.nk = s.Nk;
  spec.offset = s.Nk - s.Nq;
  if (kind == kNeighborhood) {
    TORCH_CHECK(s.Nq == s.Nk, "attention_ext: neighborhood attention needs Nq == Nk, got ", s.Nq, " and ", s.Nk);
    TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "attention_ext: kernel_size must be odd and >= 1, got ",
                kernel_size);
    TORCH_CHECK(s.Nk == 0 || kernel_size * dilation <= s.Nk,
                "attention_ext: kernel_size * dilation (", kernel_size * dilation,
                ") must not exceed the sequence length (", s.Nk, ")");
  }
  if (global_mask.has_value()) {
    m.global_prefix = prefix_counts(*global_mask, "global_mask", s, q);
    spec.global_prefix = m.global_prefix.data_ptr<int32_t>();
  }
  if (key_mask.has_value()) {
    m.key_prefix = prefix_counts(*key_mask, "key_mask", s, q);
    spec.key_prefix = m.key_prefix.data_ptr<int32_t>();
  }
  if (kind == kBlockLayout) {
    TORCH_CHECK(layout.has_value(), "attention_ext: block layout kind needs a layout tensor");
    TORCH_CHECK(block_size >= 1, "attention_ext: block_size must be >= 1, got ", block_size);
    const auto& l = *layout;
    const int64_t nqb = (s.Nq + block_size - 1) / block_size, nkb = (s.Nk + block_size - 1) / block_size;
    TORCH_CHECK(l.scalar_type() == at::kBool, "attention_ext: layout must be bool, got ", l.scalar_type());
    TORCH_CHECK(l.dim() == 3 && (l.size(0) == 1 || l.size(0) == s.Hq) && l.size(1) == nqb && l.size(2) == nkb,
                "attention_ext: layout must be (1 or ", s.Hq, ", ", nqb, ", ", nkb, ") for block_size ", block_size,
                ", got ", l.sizes());
    TORCH_CHECK(l.device() == q.device(), "attention_ext: layout must be on ", q.device());
    m.layout = l.contiguous();
    spec.layout = m.layout.data_ptr<bool>();
    spec.layout_heads = l.size(0);
    spec.nqb = nqb;
    spec.nkb = nkb;
    spec.block_size = block_size;
  }
  return m;
}

}  // namespace attention_ext
