// Per-tile mask application and the online-softmax row update of the forward pass.
#pragma once

#include "../../common/mask.h"
#include "../../common/score_mods.h"
#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

// Sets disallowed scores of one row (query i, keys [k0, k0 + n)) to -inf.
template <typename acc_t>
inline void mask_row(const MaskSpec& m, int64_t b, int64_t h, int64_t i, int64_t k0, int64_t n, acc_t* row) {
  int64_t j0, j1;
  if (row_interval(m, i, &j0, &j1)) {
    const int64_t a = std::clamp<int64_t>(j0 - k0, 0, n), e = std::clamp<int64_t>(j1 - k0, a, n);
    for (int64_t c = 0; c < a; ++c) row[c] = kNegInf<acc_t>;
    for (int64_t c = e; c < n; ++c) row[c] = kNegInf<acc_t>;
    return;
  }
  for (int64_t c = 0; c < n; ++c)
    if (!allowed(m, b, h, i, k0 + c)) row[c] = kNegInf<acc_t>;
}

// Logit softcapping of one row of base-2 scores: s = cap * tanh(s / cap), with cap the
// softcap in base-2 units (softcap * log2(e)). Runs before masking: tanh would turn a
// masked -inf into -cap.
template <typename acc_t>
inline void softcap_row(acc_t* s, int64_t n, acc_t cap) {
  using V = Vec<acc_t>;
  constexpr int64_t VL = V::size();
  const V vc(cap), vinv(acc_t(1) / cap);
  int64_t c = 0;
  for (; c + VL <= n; c += VL) (vc * tanh_fast(V::loadu(s + c) * vinv)).store(s + c);
  if (c < n) (vc * tanh_fast(V::loadu(s + c, n - c) * vinv)).store(s + c, n - c);
}

// ALiBi terms alibi_bias(slope2, p, j) (score_mods.h) along a run of position differences
// p - j = d0, d0 + step, ...: step -1 along a row of keys (the forward), +1 along a column
// of queries (the backward's transposed tiles); slope2 in base-2 units. The differences
// stay in a vector advanced by one add per vector (exact below 2^24 in float32, so both
// passes add the same values), and each term is one abs and one fused multiply-add: no
// per-vector lane setup (Vectorized::arange builds its lanes one by one).
template <typename acc_t>
struct AlibiRamp {
  using V = Vec<acc_t>;
  V iota, inc, neg, d;
  AlibiRamp(acc_t slope2, int step)
      : iota(V::arange(acc_t(0), step)), inc(acc_t(step * V::size())), neg(-slope2), d(acc_t(0)) {}
  void start(int64_t d0) { d = V(acc_t(d0)) + iota; }
  // s + the next vector of terms
  V add(const V& s) {
    const V r = at::vec::fmadd(d.abs(), neg, s);
    d = d + inc;
    return r;
  }
};

// ALiBi of one row of base-2 scores: s[c] += alibi_bias(slope2, p, j0 + c), p the query's
// aligned position. After the softcap (the forward's tiles fold it into
// online_softmax_row instead).
template <typename acc_t>
inline void alibi_row(acc_t* s, int64_t n, AlibiRamp<acc_t>& ramp, int64_t p, int64_t j0) {
  using V = Vec<acc_t>;
  constexpr int64_t VL = V::size();
  ramp.start(p - j0);
  int64_t c = 0;
  for (; c + VL <= n; c += VL) ramp.add(V::loadu(s + c)).store(s + c);
  if (c < n) ramp.add(V::loadu(s + c, n - c)).store(s + c, n - c);
}

// Smallest sub-rectangle [*r0, *r1) x [*c0, *c1) (offsets inside the tile q0.. x k0..)
// holding every allowed element of a Partial tile whose rows are intervals (windows,
// neighborhoods, causal diagonals): the products then skip what the band leaves out.
// Returns false when rows are not intervals (the whole tile is computed instead).
inline bool trim_tile(const MaskSpec& m, int64_t q0, int64_t mq, int64_t k0, int64_t nk, int64_t* r0,
                      int64_t* r1, int64_t* c0, int64_t* c1) {
  int64_t rb = mq, re = 0, cb = nk, ce = 0;
  for (int64_t r = 0; r < mq; ++r) {
    int64_t j0, j1;
    if (!row_interval(m, q0 + r, &j0, &j1)) return false;
    j0 = std::max(j0 - k0, int64_t(0));
    j1 = std::min(j1 - k0, nk);
    if (j0 >= j1) continue;
    rb = std::min(rb, r);
    re = r + 1;
    cb = std::min(cb, j0);
    ce = std::max(ce, j1);
  }
  *r0 = rb, *r1 = re, *c0 = cb, *c1 = ce;
  return true;
}

// Online softmax over one row of base-2 scores s[0, n): updates the running max and
// sum, turns s into probabilities relative to the new max, and returns the factor the
// row's output accumulator must be rescaled by. A row with nothing visible so far keeps
// max = -inf and gets zeros, never NaN. With alibi, the row's ALiBi terms (differences
// p - j from d0 down) are added in the max pass, which saves a pass over the row; a
// masked -inf stays -inf, so it may follow the masking.
template <typename acc_t>
inline acc_t online_softmax_row(acc_t* s, int64_t n, acc_t& row_max, acc_t& row_sum,
                                AlibiRamp<acc_t>* alibi = nullptr, int64_t d0 = 0) {
  using V = Vec<acc_t>;
  constexpr int64_t VL = V::size();
  V vmax(kNegInf<acc_t>);
  int64_t c = 0;
  if (alibi) {
    alibi->start(d0);
    for (; c + VL <= n; c += VL) {
      const V x = alibi->add(V::loadu(s + c));
      x.store(s + c);
      vmax = fast_max(vmax, x);
    }
    if (c < n) alibi->add(V::loadu(s + c, n - c)).store(s + c, n - c);
  } else {
    for (; c + VL <= n; c += VL) vmax = fast_max(vmax, V::loadu(s + c));
  }
  acc_t mx = hmax(vmax);
  for (; c < n; ++c) mx = std::max(mx, s[c]);
  acc_t m_new = std::max(row_max, mx);
  if (m_new == kNegInf<acc_t>) {
    // nothing visible so far, unless a visible score is NaN (the fast max drops NaN):
    // then go on with a finite reference so the NaN reaches the output
    bool nan = false;
    for (c = 0; c < n; ++c) nan |= std::isnan(s[c]);
    if (!nan) {
      std::fill(s, s + n, acc_t(0));
      return acc_t(1);
    }
    m_new = acc_t(0);
  }
  const V vm(m_new);
  V vsum(acc_t(0));
  c = 0;
  for (; c + VL <= n; c += VL) {
    const V p = exp2_poly(V::loadu(s + c) - vm);
    p.store(s + c);
    vsum = vsum + p;
  }
  acc_t sum = hsum(vsum);
  if (c < n) {
    const V p = exp2_poly(V::loadu(s + c, n - c) - vm);
    p.store(s + c, n - c);
    acc_t tail[VL];
    p.store(tail);
    for (int64_t t = 0; t < n - c; ++t) sum += tail[t];
  }
  const acc_t alpha = row_max == kNegInf<acc_t> ? acc_t(0) : exp2_scalar(row_max - m_new);
  row_sum = row_sum * alpha + sum;
  row_max = m_new;
  return alpha;
}

template <typename acc_t>
inline void scale_row(acc_t* x, int64_t n, acc_t f) {
  using V = Vec<acc_t>;
  const V vf(f);
  for (int64_t c = 0; c < n; c += V::size()) (V::loadu(x + c) * vf).store(x + c);
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
