// The one body of attention_decode for every backend: checks, the in-place append, and
// attention over the keys each row needs (its window, its ring, its pages).
//
//   m.impl("attention_decode", &attention_decode_op<Backend>);
//
// A backend with a decode kernel of its own (the CPU: split-K, reading the cache in
// place) provides
//   static bool decode(const DecodeInputs&, q, k_cache, v_cache, at::Tensor& out, at::Tensor& lse);
// returning false where that kernel does not win (long query chunks). Otherwise, and
// then, each row runs the backend's attention kernel on a view (or gather) of its keys.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <type_traits>

#include "attention_args.h"
#include "decode_args.h"

namespace attention_ext {

// Row b's call: a batch of one, keys [lo, lengths[b]) in local positions (the mask is
// relative, so only the offset moves), the key mask of those positions, row b's slopes.
inline AttentionInputs decode_row_inputs(const DecodeInputs& in, int64_t b, int64_t lo, const at::Tensor& q) {
  const int64_t n = in.lengths[b] - lo;
  AttentionInputs sub;
  sub.shape = {1, in.Hq, in.Hkv, in.Nq, n, in.D, in.Dv};
  sub.dtype = in.dtype;
  sub.scale = in.scale, sub.softcap = in.softcap;
  sub.mask = in.mask;
  sub.mask.nq = in.Nq, sub.mask.nk = n, sub.mask.offset = n - in.Nq;
  sub.mask.prefix_stride = n + 1;
  if (in.key_mask.defined()) {
    // positions at or past the mask's width M are attendable
    const int64_t M = in.key_mask.size(1), hi = std::min(M, in.lengths[b]);
    at::Tensor ok = at::ones({1, n}, q.options().dtype(at::kBool));
    if (hi > lo) ok.narrow(1, 0, hi - lo).copy_(in.key_mask.narrow(0, b, 1).narrow(1, lo, hi - lo));
    sub.key_prefix = at::zeros({1, n + 1}, q.options().dtype(at::kInt));
    sub.key_prefix.narrow(1, 1, n).copy_(ok.to(at::kInt).cumsum(1));
    sub.mask.key_prefix = sub.key_prefix.data_ptr<int32_t>();
  }
  // local positions keep |p - t|: both move by lo
  sub.mods = in.mods, sub.sinks = in.sinks;
  if (in.alibi.defined()) {
    sub.alibi = in.alibi.narrow(0, b, 1);
    sub.mods.alibi = sub.alibi.data_ptr();
  }
  return sub;
}

template <class Backend, class = void>
struct has_decode_kernel : std::false_type {};
template <class Backend>
struct has_decode_kernel<Backend, std::void_t<decltype(&Backend::decode)>> : std::true_type {};

template <class Backend>
std::tuple<at::Tensor, at::Tensor> attention_decode_op(AE_DECODE_PARAMS) {
  const DecodeInputs in = check_attention_decode_inputs(AE_DECODE_ARGS);
  if (in.append) {
    append_to_cache(in, k_cache, *k);
    append_to_cache(in, v_cache, *v);
  }
  auto out = at::empty({in.B, in.Hq, in.Nq, in.Dv}, q.options());
  auto lse = at::empty({in.B, in.Hq, in.Nq}, q.options().dtype(acc_dtype(q.scalar_type())));
  if constexpr (has_decode_kernel<Backend>::value)
    if (Backend::decode(in, q, k_cache, v_cache, out, lse)) return {out, lse};
  for (int64_t b = 0; b < in.B; ++b) {
    const int64_t lo = first_key(in, b), hi = in.lengths[b];
    at::Tensor o = out.narrow(0, b, 1), l = lse.narrow(0, b, 1);
    Backend::fwd(decode_row_inputs(in, b, lo, q), q.narrow(0, b, 1), cache_rows(in, k_cache, b, lo, hi),
                 cache_rows(in, v_cache, b, lo, hi), o, l);
  }
  return {out, lse};
}

}  // namespace attention_ext
