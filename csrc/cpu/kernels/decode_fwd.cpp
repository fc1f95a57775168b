// attention_decode on CPU: split-K over the cache, which is read once, in place, in its
// storage dtype.
//
// One task = (batch row b, kv head hk, key split s). It reads its slice of K and V once
// (in the cache's dtype; nothing of the cache is packed) and serves every query row of
// the GQA group from that read: R = (Hq / Hkv) * Nq rows, RB at a time (decode_rows.h).
// It keeps per-row partials (max, sum, unnormalised output) of its split. A second pass
// combines each row's splits in split order, so the result (and lse) is bitwise the same
// for any thread count. Splits depend on the shapes only: small enough that a split's K/V
// fits in L2 and that a batch of one still has tasks for every thread.
//
// Keys are logical positions t in [first[b], length[b]); the cache slot of t is t
// (contiguous), t % slots (rolling) or slot t % page_size of page block_table[b][t / page_size]
// (paged): the kernel never reads a key outside the row's range. Causality and windows
// come from mask.h's row_interval() at the row's own length, the key mask from
// key_allowed(). A chunk every row sees whole (the common case) runs without a check per
// key; in the others a masked key's score is -inf, its probability 0, and a zero
// probability never applies a value row (pv_rows), so a non-finite value there cannot
// leak (as gemm_guarded does in the flash kernels).
#include <type_traits>
#include <vector>

#include "../../common/mask.h"
#include "decode_rows.h"
#include "kernels.h"
#include "softmax_tile.h"
#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 64;              // keys per online-softmax step
constexpr int64_t kAhead = 16;              // keys between a key row's prefetch and its use
constexpr int64_t kSplitBytes = 256 << 10;  // K + V of one split: well inside L2
constexpr int64_t kMinTasks = 8;            // splits enough for this many tasks at any B * Hkv

// The terms a score gets after q . k (base-2 units, scale folded in), in flash_attention's
// order: the softcap, then ALiBi (slope2 0 = off) of query position p against keys j0...
template <typename acc_t>
inline void score_terms(acc_t* s, int64_t n, acc_t cap2, acc_t slope2, int64_t p, int64_t j0) {
  if (cap2 > acc_t(0)) softcap_row(s, n, cap2);
  if (slope2 != acc_t(0)) {
    AlibiRamp<acc_t> ramp(slope2, -1);  // p - j falls by one per key
    alibi_row(s, n, ramp, p, j0);
  }
}

// Key mask: logical positions at or past its width are attendable (decode_args.h).
inline bool key_allowed(const DecodeFwdArgs& a, int64_t b, int64_t t) {
  return !a.key_mask || t >= a.key_mask_len || a.key_mask[b * a.key_mask_len + t];
}

// Address of logical token t of row b, kv head hk.
template <typename S>
inline const S* token(const DecodeFwdArgs& a, const Operand& c, int64_t b, int64_t hk, int64_t t) {
  int64_t page = b, slot = t;
  if (a.block_table) {
    page = a.block_table[b * a.max_pages + t / a.slots];
    slot = t % a.slots;
  } else if (a.rolling) {
    slot = t % a.slots;
  }
  return static_cast<const S*>(c.data) + page * c.stride[0] + hk * c.stride[1] + slot * c.stride[2];
}

int64_t split_size(const DecodeFwdArgs& a, int64_t elem_bytes) {
  int64_t span = 1;
  for (int64_t b = 0; b < a.B; ++b) span = std::max(span, a.length[b] - a.first[b]);
  const int64_t by_bytes = std::max(kChunk, kSplitBytes / ((a.D + a.Dv) * elem_bytes) / kChunk * kChunk);
  const int64_t want = ae_cdiv(kMinTasks, std::max<int64_t>(a.B * a.Hkv, 1));  // splits per (b, hk)
  return std::min(by_bytes, std::max(kChunk, round_up(ae_cdiv(span, want), kChunk)));
}

template <typename scalar_t, typename acc_t>
void decode_impl(DecodeFwdArgs& a) {
  using q_t = decode_q_t<scalar_t, acc_t>;
  constexpr int64_t VL = Vec<acc_t>::size();
  const int64_t G = a.Hq / a.Hkv, R = G * a.Nq, D = a.D, Dv = a.Dv;
  const int64_t Dp = round_up(D, decode_q_pad<scalar_t, acc_t>()), Dvp = round_up(Dv, VL), part = R * Dvp + 2 * R;
  const int64_t split = split_size(a, sizeof(scalar_t));
  a.split = split;

  // tasks in (b, hk, s) order; row b's start at task_off[b]
  std::vector<int64_t> nsplit(a.B), task_off(a.B + 1, 0);
  for (int64_t b = 0; b < a.B; ++b) {
    nsplit[b] = ae_cdiv(a.length[b] - a.first[b], split);
    task_off[b + 1] = task_off[b] + a.Hkv * nsplit[b];
  }
  const int64_t ntasks = task_off[a.B];
  Buffer<acc_t> partials(ntasks * part);

  const acc_t qmult = acc_t(a.scale * kLog2e);    // softmax in base 2
  const acc_t cap2 = acc_t(a.softcap * kLog2e);  // softcap in base-2 units, 0 = off
  // the scale goes into acc_t query rows, or onto the scores of raw bf16 ones
  const acc_t smult = std::is_same_v<q_t, acc_t> ? acc_t(1) : qmult;
  const auto* q = static_cast<const scalar_t*>(a.q.data);

  parallel_tasks(ntasks, [&](int64_t task) {
    const int64_t b = std::upper_bound(task_off.begin(), task_off.end(), task) - task_off.begin() - 1;
    const int64_t rem = task - task_off[b], hk = rem / nsplit[b], sp = rem % nsplit[b];
    const int64_t L = a.length[b], k0 = a.first[b] + sp * split, k1 = std::min(L, k0 + split);
    const int64_t need = R * Dp * sizeof(q_t) + (R * kChunk + G) * sizeof(acc_t) +
                         (2 * kChunk + kAhead) * sizeof(void*) + 2 * a.Nq * sizeof(int64_t) + kChunk + 64;
    auto* qs = reinterpret_cast<q_t*>(task_scratch<uint8_t>(need));                 // (R, Dp), row r = g * Nq + i
    // (R, kChunk) scores, then probabilities
    auto* s = reinterpret_cast<acc_t*>(qs + round_up(R * Dp, 64 / sizeof(q_t)));
    auto** kp = reinterpret_cast<const scalar_t**>(s + R * kChunk);  // key rows of the chunk, kAhead more
    const scalar_t** vp = kp + kChunk + kAhead;
    auto* iv0 = reinterpret_cast<int64_t*>(vp + kChunk);  // query i sees keys [iv0[i], iv1[i])
    int64_t* iv1 = iv0 + a.Nq;
    auto* slope2 = reinterpret_cast<acc_t*>(iv1 + a.Nq);  // (G,) ALiBi slopes of the group's heads
    auto* ok = reinterpret_cast<uint8_t*>(slope2 + G);    // key mask of the chunk

    MaskSpec m = a.mask;
    m.nq = a.Nq, m.nk = L, m.offset = L - a.Nq;
    for (int64_t i = 0; i < a.Nq; ++i) {
      int64_t j0 = 0, j1 = L;
      row_interval(m, i, &j0, &j1);  // dense / window kinds: always one interval
      iv0[i] = std::max(j0, k0), iv1[i] = std::min(j1, k1);
    }
    for (int64_t g = 0; g < G; ++g) {
      slope2[g] = alibi_slope<acc_t>(a.mods, b, hk * G + g) * acc_t(kLog2e);  // base 2, 0 = off
      const scalar_t* src = q + b * a.q.stride[0] + (hk * G + g) * a.q.stride[1];
      for (int64_t i = 0; i < a.Nq; ++i) {
        q_t* dst = qs + (g * a.Nq + i) * Dp;
        for (int64_t c = 0; c < D; ++c) {
          const scalar_t x = src[i * a.q.stride[2] + c * a.q.stride[3]];
          if constexpr (std::is_same_v<q_t, acc_t>) dst[c] = acc_t(to_acc(x)) * qmult;
          else dst[c] = x;
        }
        std::fill(dst + D, dst + Dp, q_t(0));
      }
    }
    acc_t* o = partials.get() + task * part;  // (R, Dvp), then max (R), sum (R)
    acc_t* row_max = o + R * Dvp;
    acc_t* row_sum = row_max + R;
    std::fill(o, o + R * Dvp, acc_t(0));
    std::fill(row_max, row_max + R, kNegInf<acc_t>);
    std::fill(row_sum, row_sum + R, acc_t(0));

    for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
      const int64_t n = std::min(kChunk, k1 - c0);
      // full: every row sees every key of the chunk, so nothing below checks a key
      bool seen = false, full = true;
      for (int64_t i = 0; i < a.Nq; ++i) {
        seen |= std::max(iv0[i], c0) < std::min(iv1[i], c0 + n);
        full &= iv0[i] <= c0 && c0 + n <= iv1[i];
      }
      if (!seen) continue;
      if (a.key_mask) {
        int64_t nok = 0;
        for (int64_t t = 0; t < n; ++t) nok += ok[t] = key_allowed(a, b, c0 + t);
        if (nok == 0) continue;
        full &= nok == n;
      }
      const int64_t nk = std::min(n + kAhead, k1 - c0);  // key rows to prefetch
      for (int64_t t = 0; t < nk; ++t) kp[t] = token<scalar_t>(a, a.k_cache, b, hk, c0 + t);
      for (int64_t t = 0; t < n; ++t) vp[t] = token<scalar_t>(a, a.v_cache, b, hk, c0 + t);
      for (int64_t t = 0; t < n; ++t) {
        if (t + kAhead < nk) prefetch_row(kp[t + kAhead], D);
        prefetch_row(vp[t], Dv);  // used after the chunk's scores
        if (!full && a.key_mask && !ok[t]) continue;  // masked out: its score is set below, its key never read
        for (int64_t r0 = 0; r0 < R; r0 += RB)
          dot_block(int(std::min<int64_t>(RB, R - r0)), kp[t], qs + r0 * Dp, Dp, D, smult, s + r0 * kChunk + t,
                    kChunk);
      }
      for (int64_t r = 0; r < R; ++r) {
        acc_t* row = s + r * kChunk;
        const int64_t i = r % a.Nq;
        score_terms(row, n, cap2, slope2[r / a.Nq], L - a.Nq + i, c0);
        if (!full)
          for (int64_t t = 0; t < n; ++t)
            if ((a.key_mask && !ok[t]) || c0 + t < iv0[i] || c0 + t >= iv1[i]) row[t] = kNegInf<acc_t>;
        const acc_t alpha = online_softmax_row(row, n, row_max[r], row_sum[r]);
        if (alpha != acc_t(1)) scale_row(o + r * Dvp, Dvp, alpha);
      }
      // a masked key's probability is 0: it reaches no output (pv_rows)
      for (int64_t r0 = 0; r0 < R; r0 += RB)
        pv_group(int(std::min<int64_t>(RB, R - r0)), vp, n, s + r0 * kChunk, kChunk, Dv, o + r0 * Dvp, Dvp);
    }
  });

  // combine each row's splits in split order
  auto* out = static_cast<scalar_t*>(a.out);
  auto* lse = static_cast<acc_t*>(a.lse);
  parallel_tasks(a.B * a.Hkv, [&](int64_t bh) {
    const int64_t b = bh / a.Hkv, hk = bh % a.Hkv, t0 = task_off[b] + hk * nsplit[b], ns = nsplit[b];
    std::vector<acc_t> acc(Dv);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / a.Nq, i = r % a.Nq, h = hk * G + g;
      acc_t mx = kNegInf<acc_t>, l = 0;
      for (int64_t x = 0; x < ns; ++x) mx = std::max(mx, partials.get()[(t0 + x) * part + R * Dvp + r]);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (mx != kNegInf<acc_t>)
        for (int64_t x = 0; x < ns; ++x) {
          const acc_t* P = partials.get() + (t0 + x) * part;
          const acc_t m_s = P[R * Dvp + r];
          if (m_s == kNegInf<acc_t>) continue;  // the split saw nothing of this row
          const acc_t w = exp2_scalar(m_s - mx);
          l += P[R * Dvp + R + r] * w;
          for (int64_t c = 0; c < Dv; ++c) acc[c] += P[r * Dvp + c] * w;
        }
      // l == 0: the row saw no key (zeros; lse -inf, or the sink). A NaN l (NaN input)
      // stays NaN.
      const acc_t alpha = a.mods.sinks ? fold_sink(sink_logit<acc_t>(a.mods, h) * acc_t(kLog2e), mx, l) : acc_t(1);
      const bool none = l == acc_t(0);
      const acc_t inv = none ? acc_t(0) : alpha / l;
      scalar_t* dst = out + ((b * a.Hq + h) * a.Nq + i) * Dv;
      for (int64_t c = 0; c < Dv; ++c) dst[c] = from_acc<scalar_t>(acc[c] * inv);
      lse[(b * a.Hq + h) * a.Nq + i] = none ? kNegInf<acc_t> : lse_from_log2(mx, l);
    }
  });
}

}  // namespace

void decode_fwd(DecodeFwdArgs& a) {
  switch (a.dtype) {
    case DType::Float32: return decode_impl<float, float>(a);
    case DType::Float64: return decode_impl<double, double>(a);
    case DType::BFloat16: return decode_impl<c10::BFloat16, float>(a);
    case DType::Float16: return decode_impl<c10::Half, float>(a);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
