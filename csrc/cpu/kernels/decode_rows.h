// The decode kernel's inner products (decode_fwd.cpp): up to RB = 4 query rows of a GQA
// group against one cached key row (q . k) and against a run of value rows (P . V), so
// each cached row is loaded once for the whole group.
//
// q . k: FMAs on key rows converted on load, the query rows pre-scaled; on AVX512-BF16 a
// bf16 cache runs vdpbf16ps on the raw bf16 query and key (exact products, fp32 sums, the
// scale applied to the score afterwards, as gemm_bf16.h does). The RB sums leave through
// one shuffle tree (store_sums).
// P . V: every value row of the run enters every row's accumulator. Where that gives a
// non-finite block (a NaN / inf value row, or an overflow) the block is redone applying a
// value row only where its probability is non-zero (gemm_guarded's semantics: a masked key
// never leaks, a visible one follows the reference).
#pragma once

#include <type_traits>

#include "gemm_bf16.h"
#include "tile_util.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

constexpr int RB = 4;  // query rows served by one load of a key / value row

// The query operand of q . k: raw bf16 for the vdpbf16ps path, else acc_t.
template <typename scalar_t, typename acc_t>
using decode_q_t = std::conditional_t<bf16_tiles<scalar_t>(), scalar_t, acc_t>;
// Query rows are padded to this many elements (zeros).
template <typename scalar_t, typename acc_t>
constexpr int64_t decode_q_pad() {
  return bf16_tiles<scalar_t>() ? 32 : Vec<acc_t>::size();
}

template <typename acc_t, typename S>
inline Vec<acc_t> load_acc(const S* p) {
  if constexpr (std::is_same_v<S, acc_t>) {
    return Vec<acc_t>::loadu(p);
  } else {
    Vec<float> out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// n < VL lanes; the others are zero
template <typename acc_t, typename S>
inline Vec<acc_t> load_acc(const S* p, int64_t n) {
  if constexpr (std::is_same_v<S, acc_t>) {
    return Vec<acc_t>::loadu(p, n);
  } else {
    acc_t tmp[Vec<acc_t>::size()] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = acc_t(to_acc(p[i]));
    return Vec<acc_t>::loadu(tmp);
  }
}

// s[r * lds] = mult * (sum of acc[r]'s lanes) for r < nr; acc[nr..RB) are zero.
template <typename acc_t>
inline void store_sums(const Vec<acc_t>* acc, int nr, acc_t mult, acc_t* s, int64_t lds) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    // 256-bit halves added: [a0 | a1], [a2 | a3], 8 partials each
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    // 128-bit lane r: 4 partials of row r
    __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
    y = _mm512_add_ps(y, _mm512_permute_ps(y, 0x4E));
    y = _mm512_add_ps(y, _mm512_permute_ps(y, 0xB1));
    y = _mm512_mul_ps(y, _mm512_set1_ps(mult));  // element 4r: row r's sum
    // element 4r lands at s + r * lds (lds >= 4: the address stays inside s's rows)
    for (int r = 0; r < nr; ++r) _mm512_mask_storeu_ps(s + r * (lds - 4), __mmask16(1u << (4 * r)), y);
    return;
  }
#endif
  for (int r = 0; r < nr; ++r) s[r * lds] = hsum(acc[r]) * mult;
}

// s[r * lds] = mult * q_r . k for the NR query rows q_r = q + r * ldq (padded with zeros
// to decode_q_pad; k has D elements).
template <int NR, typename acc_t, typename S, typename Q>
inline void dot_rows(const S* k, const Q* q, int64_t ldq, int64_t D, acc_t mult, acc_t* s, int64_t lds) {
  Vec<acc_t> acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = Vec<acc_t>(acc_t(0));
#if defined(AE_BF16_TILES)
  if constexpr (std::is_same_v<Q, c10::BFloat16>) {
    __m512 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + d);
      for (int r = 0; r < NR; ++r) a[r] = _mm512_dpbf16_ps(a[r], kv, (__m512bh)_mm512_loadu_si512(q + r * ldq + d));
    }
    if (d < D) {  // the key's tail lanes are never read (the query's are zero)
      const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(__mmask32((1ull << (D - d)) - 1), k + d);
      for (int r = 0; r < NR; ++r) a[r] = _mm512_dpbf16_ps(a[r], kv, (__m512bh)_mm512_loadu_si512(q + r * ldq + d));
    }
    for (int r = 0; r < NR; ++r) acc[r] = a[r];
    return store_sums(acc, NR, mult, s, lds);
  }
#endif
  if constexpr (std::is_same_v<Q, acc_t>) {
    constexpr int64_t VL = Vec<acc_t>::size();
    int64_t d = 0;
    for (; d + VL <= D; d += VL) {
      const Vec<acc_t> kv = load_acc<acc_t>(k + d);
      for (int r = 0; r < NR; ++r) acc[r] = at::vec::fmadd(Vec<acc_t>::loadu(q + r * ldq + d), kv, acc[r]);
    }
    if (d < D) {
      const Vec<acc_t> kv = load_acc<acc_t>(k + d, D - d);
      for (int r = 0; r < NR; ++r) acc[r] = at::vec::fmadd(Vec<acc_t>::loadu(q + r * ldq + d), kv, acc[r]);
    }
    store_sums(acc, NR, mult, s, lds);
  }
}

template <typename acc_t>
inline bool any_nan(const Vec<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0;
#endif
  acc_t tmp[Vec<acc_t>::size()];
  x.store(tmp);
  bool nan = false;
  for (acc_t t : tmp) nan |= t != t;
  return nan;
}

// Columns [d, d + W * VL) (TAIL: the last W = 1 vector, Dv - d < VL columns) of
// o_r += sum over t < n of p[r * ldp + t] * v[t] for NR rows; GUARD skips zero p.
template <int NR, int W, bool TAIL, bool GUARD, typename acc_t, typename S>
inline void pv_cols(const S* const* v, int64_t n, const acc_t* p, int64_t ldp, int64_t d, int64_t Dv,
                    Vec<acc_t> (&acc)[NR][W]) {
  constexpr int64_t VL = Vec<acc_t>::size();
  for (int64_t t = 0; t < n; ++t) {
    Vec<acc_t> vv[W];
    for (int w = 0; w < W; ++w)
      vv[w] = TAIL ? load_acc<acc_t>(v[t] + d, Dv - d) : load_acc<acc_t>(v[t] + d + w * VL);
    for (int r = 0; r < NR; ++r) {
      const acc_t pr = p[r * ldp + t];
      if (GUARD && pr == acc_t(0)) continue;
      for (int w = 0; w < W; ++w) acc[r][w] = at::vec::fmadd(Vec<acc_t>(pr), vv[w], acc[r][w]);
    }
  }
}

template <int NR, int W, bool TAIL, typename acc_t, typename S>
inline void pv_block(const S* const* v, int64_t n, const acc_t* p, int64_t ldp, int64_t d, int64_t Dv, acc_t* o,
                     int64_t ldo) {
  constexpr int64_t VL = Vec<acc_t>::size();
  Vec<acc_t> acc[NR][W];
  for (int r = 0; r < NR; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = Vec<acc_t>::loadu(o + r * ldo + d + w * VL);
  pv_cols<NR, W, TAIL, false>(v, n, p, ldp, d, Dv, acc);
  Vec<acc_t> z(acc_t(0));  // x * 0 is NaN exactly for non-finite x
  for (int r = 0; r < NR; ++r)
    for (int w = 0; w < W; ++w) z = at::vec::fmadd(acc[r][w], Vec<acc_t>(acc_t(0)), z);
  if (any_nan(z)) {
    for (int r = 0; r < NR; ++r)
      for (int w = 0; w < W; ++w) acc[r][w] = Vec<acc_t>::loadu(o + r * ldo + d + w * VL);
    pv_cols<NR, W, TAIL, true>(v, n, p, ldp, d, Dv, acc);
  }
  for (int r = 0; r < NR; ++r)
    for (int w = 0; w < W; ++w) acc[r][w].store(o + r * ldo + d + w * VL);
}

// o_r[0, Dv) += sum over t < n of p[r * ldp + t] * v[t][0, Dv) (o rows padded to VL).
template <int NR, typename acc_t, typename S>
inline void pv_rows(const S* const* v, int64_t n, const acc_t* p, int64_t ldp, int64_t Dv, acc_t* o, int64_t ldo) {
  constexpr int64_t VL = Vec<acc_t>::size();
  int64_t d = 0;
  for (; d + 2 * VL <= Dv; d += 2 * VL) pv_block<NR, 2, false>(v, n, p, ldp, d, Dv, o, ldo);
  for (; d + VL <= Dv; d += VL) pv_block<NR, 1, false>(v, n, p, ldp, d, Dv, o, ldo);
  if (d < Dv) pv_block<NR, 1, true>(v, n, p, ldp, d, Dv, o, ldo);
}

// The NR-row kernels above for 1 <= nr <= RB rows.
template <typename acc_t, typename S, typename Q>
inline void dot_block(int nr, const S* k, const Q* q, int64_t ldq, int64_t D, acc_t mult, acc_t* s, int64_t lds) {
  switch (nr) {
    case 1: return dot_rows<1>(k, q, ldq, D, mult, s, lds);
    case 2: return dot_rows<2>(k, q, ldq, D, mult, s, lds);
    case 3: return dot_rows<3>(k, q, ldq, D, mult, s, lds);
    default: return dot_rows<RB>(k, q, ldq, D, mult, s, lds);
  }
}
template <typename acc_t, typename S>
inline void pv_group(int nr, const S* const* v, int64_t n, const acc_t* p, int64_t ldp, int64_t Dv, acc_t* o,
                     int64_t ldo) {
  switch (nr) {
    case 1: return pv_rows<1>(v, n, p, ldp, Dv, o, ldo);
    case 2: return pv_rows<2>(v, n, p, ldp, Dv, o, ldo);
    case 3: return pv_rows<3>(v, n, p, ldp, Dv, o, ldo);
    default: return pv_rows<RB>(v, n, p, ldp, Dv, o, ldo);
  }
}

// Prefetch of one cached row (n elements) into L1.
template <typename S>
inline void prefetch_row(const S* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t x = 0; x < n * int64_t(sizeof(S)); x += 64) __builtin_prefetch(c + x, 0, 3);
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
