#include "decode_args.h"

#include <cmath>

#include "attention_args.h"

namespace attention_ext {

namespace {

void check_int32_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  check_device(op, name, t, q);
}

}  // namespace

DecodeInputs check_attention_decode_inputs(AE_DECODE_PARAMS) {
  const char* op = "attention_decode";
  DecodeInputs in;
  TORCH_CHECK_VALUE(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, op,
                    ": q, k_cache, v_cache must be 4-D, got q.dim()=", q.dim(), ", k_cache.dim()=", k_cache.dim(),
                    ", v_cache.dim()=", v_cache.dim());
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                   ": q dtype must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK_TYPE(k_cache.scalar_type() == st && v_cache.scalar_type() == st, op,
                   ": k_cache and v_cache must have q's dtype ", st, ", got ", k_cache.scalar_type(), " and ",
                   v_cache.scalar_type());
  check_device(op, "k_cache", k_cache, q);
  check_device(op, "v_cache", v_cache, q);
  in.B = q.size(0), in.Hq = q.size(1), in.Nq = q.size(2), in.D = q.size(3);
  in.Hkv = k_cache.size(1), in.Dv = v_cache.size(3), in.slots = k_cache.size(2);
  in.dtype = dtype_of(st);
  const bool paged = block_table.has_value();
  in.rolling = rolling;
  TORCH_CHECK_VALUE(in.Nq >= 1, op, ": q needs at least one query, got Nq=0");
  TORCH_CHECK_VALUE(k_cache.size(3) == in.D, op, ": k_cache head dim ", k_cache.size(3), " must equal q's ", in.D);
  TORCH_CHECK_VALUE(v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3), op,
                    ": v_cache must match k_cache in its first three dims, got ", v_cache.sizes(), " and ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(in.Hkv > 0 && in.Hq % in.Hkv == 0, op, ": q heads (", in.Hq,
                    ") must be a multiple of the cache's k/v heads (", in.Hkv, ")");
  const int64_t max_dim = attention_max_head_dim(q.device());
  TORCH_CHECK_VALUE(in.D >= 1 && in.D <= max_dim && in.Dv >= 1 && in.Dv <= max_dim, op, ": head dims must be in [1, ",
                    max_dim, "], got ", in.D, " and ", in.Dv);
  TORCH_CHECK_VALUE(in.slots >= 1, op, ": the cache needs at least one slot per row (page), got ", in.slots);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be positive and finite, got ", scale);
  TORCH_CHECK_VALUE(softcap == 0 || (softcap >= kMinSoftcap && softcap <= kMaxSoftcap), op,
                    ": softcap must be 0 (off) or in [", kMinSoftcap, ", ", kMaxSoftcap, "], got ", softcap);
  in.scale = scale, in.softcap = softcap;

  if (paged) {
    TORCH_CHECK_VALUE(!rolling, op, ": a paged cache cannot also be rolling");
    check_int32_vector(op, "block_table", *block_table, q);
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == in.B, op,
                      ": block_table must have shape (batch=", in.B, ", max_pages), got ", block_table->sizes());
    in.block_table = block_table->to(at::kCPU).contiguous();
    in.max_pages = block_table->size(1);
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == in.B, op, ": k_cache must have shape (batch=", in.B,
                      ", kv heads, Ncache, head_dim) without a block_table, got ", k_cache.sizes());
    in.max_pages = 0;
  }

  in.append = k.has_value();
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), op, ": k and v go together (pass both, or neither)");
  if (in.append) {
    for (const auto& [name, t, dim] : {std::tuple<const char*, const at::Tensor&, int64_t>{"k", *k, in.D},
                                       {"v", *v, in.Dv}}) {
      TORCH_CHECK_TYPE(t.scalar_type() == st, op, ": ", name, " must have q's dtype ", st, ", got ", t.scalar_type());
      check_device(op, name, t, q);
      TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef({in.B, in.Hkv, in.Nq, dim}), op, ": ", name,
                        " must have shape (batch, kv heads, Nq, head_dim) = ", at::IntArrayRef({in.B, in.Hkv, in.Nq, dim}),
                        ", got ", t.sizes());
    }
  }

  in.windowed = window_left >= 0;
  TORCH_CHECK_VALUE((window_left == -1 && window_right == -1) || (window_left >= 0 && window_right >= 0), op,
                    ": window_left and window_right must both be -1 (no window) or both >= 0, got ", window_left,
                    " and ", window_right);
  MaskSpec& m = in.mask;
  m.kind = in.windowed ? kWindow : kDense;
  m.causal = causal;
  m.left = in.windowed ? window_left : 0;
  m.right = in.windowed && !causal ? window_right : 0;
  if (rolling) {
    TORCH_CHECK_VALUE(in.windowed, op, ": a rolling cache needs a window (it only holds the last Ncache tokens)");
    TORCH_CHECK_VALUE(in.slots - in.Nq >= m.left, op, ": a rolling cache of Ncache=", in.slots,
                      " slots is too small for window left=", m.left, " and Nq=", in.Nq,
                      " (needs Ncache >= left + Nq)");
  }

  check_int32_vector(op, "cache_seqlens", cache_seqlens, q);
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == in.B, op,
                    ": cache_seqlens must have shape (batch=", in.B, ",), got ", cache_seqlens.sizes());
  const at::Tensor lens = cache_seqlens.to(at::kCPU).contiguous();
  const int32_t* cs = lens.data_ptr<int32_t>();
  in.lengths.resize(in.B);
  for (int64_t b = 0; b < in.B; ++b) {
    const int64_t s = cs[b], L = s + (in.append ? in.Nq : 0);
    TORCH_CHECK_VALUE(s >= 0, op, ": cache_seqlens[", b, "] must be >= 0, got ", s);
    TORCH_CHECK_VALUE(in.append || s >= in.Nq, op, ": cache_seqlens[", b, "] = ", s, " must be >= Nq = ", in.Nq,
                      " when k and v are omitted (the cache already holds the new tokens)");
    if (paged) {
      const int64_t need = cdiv_safe(L, in.slots);
      TORCH_CHECK_VALUE(need <= in.max_pages, op, ": row ", b, " needs ", need, " pages of ", in.slots,
                        " for ", L, " tokens, but block_table has ", in.max_pages);
      const int32_t* row = in.block_table.data_ptr<int32_t>() + b * in.max_pages;
      for (int64_t p = 0; p < need; ++p)
        TORCH_CHECK_VALUE(row[p] >= 0 && row[p] < k_cache.size(0), op, ": block_table[", b, ", ", p, "] = ", row[p],
                          " is outside the pool of ", k_cache.size(0), " pages");
    } else if (!rolling) {
      TORCH_CHECK_VALUE(L <= in.slots, op, ": cache_seqlens[", b, "] = ", s, (in.append ? " + Nq" : ""),
                        " exceeds the cache's ", in.slots, " slots");
    }
    in.lengths[b] = L;
  }

  if (key_mask.has_value()) {
    TORCH_CHECK_TYPE(key_mask->scalar_type() == at::kBool, op, ": key_mask must be bool, got ",
                     key_mask->scalar_type());
    check_device(op, "key_mask", *key_mask, q);
    TORCH_CHECK_VALUE(key_mask->dim() == 2 && key_mask->size(0) == in.B, op,
                      ": key_mask must have shape (batch=", in.B, ", M), got ", key_mask->sizes());
    in.key_mask = *key_mask;
  }
  check_score_mods(op, alibi_slopes, sinks, q, in.B, in.Hq, &in.mods, &in.alibi, &in.sinks);
  return in;
}

int64_t first_key(const DecodeInputs& in, int64_t b) {
  const int64_t L = in.lengths[b];
  int64_t lo = in.windowed ? std::max<int64_t>(0, L - in.Nq - in.mask.left) : 0;
  if (in.rolling) lo = std::max(lo, L - in.slots);
  return lo;
}

at::Tensor cache_rows(const DecodeInputs& in, const at::Tensor& cache, int64_t b, int64_t lo, int64_t hi) {
  const int64_t n = hi - lo, S = in.slots;
  if (in.block_table.defined()) {
    const int64_t p0 = lo / S, p1 = (hi - 1) / S;
    const int32_t* row = in.block_table.data_ptr<int32_t>() + b * in.max_pages;
    if (p0 == p1) return cache.narrow(0, row[p0], 1).narrow(2, lo - p0 * S, n);
    std::vector<int64_t> ids(row + p0, row + p1 + 1);
    const at::Tensor idx = at::tensor(ids, at::kLong).to(cache.device());
    // (pages, Hkv, S, D) -> (1, Hkv, pages * S, D), then the tokens wanted
    return cache.index_select(0, idx).transpose(0, 1).reshape({1, in.Hkv, (p1 - p0 + 1) * S, cache.size(3)})
        .narrow(2, lo - p0 * S, n);
  }
  const at::Tensor row = cache.narrow(0, b, 1);
  if (!in.rolling) return row.narrow(2, lo, n);
  const int64_t s0 = lo % S;
  if (s0 + n <= S) return row.narrow(2, s0, n);
  return at::cat({row.narrow(2, s0, S - s0), row.narrow(2, 0, n - (S - s0))}, 2);
}

void append_to_cache(const DecodeInputs& in, at::Tensor& cache, const at::Tensor& src) {
  const int64_t S = in.slots;
  for (int64_t b = 0; b < in.B; ++b) {
    const int64_t start = in.lengths[b] - in.Nq;
    const at::Tensor s = src.narrow(0, b, 1);
    // runs of consecutive slots: one per page, at most two for a ring
    for (int64_t t = start; t < start + in.Nq;) {
      int64_t page = b, slot = t, run = start + in.Nq - t;
      if (in.block_table.defined()) {
        page = in.block_table.data_ptr<int32_t>()[b * in.max_pages + t / S];
        slot = t % S;
        run = std::min(run, S - slot);
      } else if (in.rolling) {
        slot = t % S;
        run = std::min(run, S - slot);
      }
      cache.narrow(0, page, 1).narrow(2, slot, run).copy_(s.narrow(2, t - start, run));
      t += run;
    }
  }
}

}  // namespace attention_ext
