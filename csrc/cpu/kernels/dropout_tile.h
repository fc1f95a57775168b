// Attention dropout on the CPU tiles (the generator and its counters: common/dropout.h).
// Philox runs on 16 counters at a time, in AVX-512 / AVX2 integer lanes (compilers do
// not vectorise its 32 x 32 -> 64-bit products by themselves), so a block of 64 keys
// costs ten rounds of a few vector instructions. The mask enters as a multiplier:
// 1 / (1 - p) where kept, 0 where dropped.
#pragma once

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "../../common/dropout.h"
#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

constexpr int kPhiloxLanes = 16;

// Philox4x32-10 of the counters (c0[l], c1[l], c2, c3), l < 16: word w of lane l in
// out[16 w + l] (so key 64 m + j of the block is out[j]).
inline void philox_lanes(const uint32_t* c0, const uint32_t* c1, uint32_t c2, uint32_t c3, uint32_t k0,
                         uint32_t k1, uint32_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
  // even and odd 32-bit lanes multiply separately (vpmuludq); hi/lo words are blended back
  auto mulhilo = [](__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
    const __m512i ev = _mm512_mul_epu32(a, m), od = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    lo = _mm512_mask_blend_epi32(0xAAAA, ev, _mm512_slli_epi64(od, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(ev, 32), od);
  };
  __m512i x0 = _mm512_loadu_si512(c0), x1 = _mm512_loadu_si512(c1);
  __m512i x2 = _mm512_set1_epi32(int(c2)), x3 = _mm512_set1_epi32(int(c3));
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  for (int r = 0; r < 10; ++r) {
    __m512i h0, l0, h1, l1;
    mulhilo(x0, m0, h0, l0);
    mulhilo(x2, m1, h1, l1);
    x0 = _mm512_xor_si512(_mm512_xor_si512(h1, x1), _mm512_set1_epi32(int(k0)));
    x2 = _mm512_xor_si512(_mm512_xor_si512(h0, x3), _mm512_set1_epi32(int(k1)));
    x1 = l1, x3 = l0;
    k0 += kPhiloxW0, k1 += kPhiloxW1;
  }
  _mm512_storeu_si512(out, x0), _mm512_storeu_si512(out + 16, x1);
  _mm512_storeu_si512(out + 32, x2), _mm512_storeu_si512(out + 48, x3);
#elif defined(CPU_CAPABILITY_AVX2)
  auto mulhilo = [](__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
    const __m256i ev = _mm256_mul_epu32(a, m), od = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    lo = _mm256_blend_epi32(ev, _mm256_slli_epi64(od, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(ev, 32), od, 0xAA);
  };
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  for (int half = 0; half < 2; ++half) {
    uint32_t a0 = k0, a1 = k1;
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + 8 * half));
    __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + 8 * half));
    __m256i x2 = _mm256_set1_epi32(int(c2)), x3 = _mm256_set1_epi32(int(c3));
    for (int r = 0; r < 10; ++r) {
      __m256i h0, l0, h1, l1;
      mulhilo(x0, m0, h0, l0);
      mulhilo(x2, m1, h1, l1);
      x0 = _mm256_xor_si256(_mm256_xor_si256(h1, x1), _mm256_set1_epi32(int(a0)));
      x2 = _mm256_xor_si256(_mm256_xor_si256(h0, x3), _mm256_set1_epi32(int(a1)));
      x1 = l1, x3 = l0;
      a0 += kPhiloxW0, a1 += kPhiloxW1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * half), x0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 + 8 * half), x1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 + 8 * half), x2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 48 + 8 * half), x3);
  }
#else
  for (int l = 0; l < kPhiloxLanes; ++l) {
    uint32_t c[4] = {c0[l], c1[l], c2, c3};
    philox4x32_10(c, k0, k1);
    for (int w = 0; w < 4; ++w) out[16 * w + l] = c[w];
  }
#endif
}

struct DropoutTile {
  const DropoutSpec& d;
  int64_t Hq;
  uint32_t thr;
  double inv;
  DropoutTile(const DropoutSpec& spec, int64_t hq) : d(spec), Hq(hq), thr(spec.threshold()), inv(spec.inv_keep()) {}

  void words(uint32_t c0_base, bool same_c0, const uint32_t* c1, uint32_t bh, uint32_t* out) const {
    uint32_t c0[kPhiloxLanes];
    for (int l = 0; l < kPhiloxLanes; ++l) c0[l] = c0_base + (same_c0 ? 0 : uint32_t(l));
    philox_lanes(c0, c1, bh, d.offset, uint32_t(d.seed), uint32_t(d.seed >> 32), out);
  }
  uint32_t bh(int64_t b, int64_t h) const { return dropout_bh(d, Hq, b, h); }

  // Forward: probabilities s[0, n) of query row i, keys j0 .. j0 + n - 1 (rows of the call).
  template <typename acc_t>
  void apply_row(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, acc_t* s) const {
    const int64_t jg = j0 + d.k0;  // full-problem key index
    uint32_t c1[kPhiloxLanes], out[64];
    for (int l = 0; l < kPhiloxLanes; ++l) c1[l] = uint32_t(i + d.q0);
    const acc_t keep = acc_t(inv);
    for (int64_t blk = jg >> 6; blk * 64 < jg + n; ++blk) {
      words(uint32_t(blk << 4), false, c1, bh(b, h), out);
      // keys blk * 64 + t, t < 64, are out[t]; s[c] is key jg + c
      const int64_t base = blk * 64 - jg, lo = std::max<int64_t>(0, -base), hi = std::min<int64_t>(64, n - base);
      acc_t* x = s + base;
      for (int64_t t = lo; t < hi; ++t) x[t] = out[t] < thr ? x[t] * keep : acc_t(0);
    }
  }

  // Backward: the multiplier tile m[r * ld + c] of keys j0 + r (r < nk) and queries i0 + c
  // (c < nq), held transposed as the backward's tiles are.
  template <typename acc_t>
  void fill_transposed(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk, acc_t* m,
                       int64_t ld) const {
    const int64_t jg = j0 + d.k0, qg = i0 + d.q0;
    const acc_t keep = acc_t(inv);
    uint32_t c1[kPhiloxLanes], out[64];
    for (int64_t blk = jg >> 6; blk * 64 < jg + nk; ++blk)
      for (int l = 0; l < 16; ++l) {
        // counter 16 blk + l holds keys blk * 64 + 16 w + l, w < 4: rows of m
        int64_t rows[4];
        bool any = false;
        for (int w = 0; w < 4; ++w) {
          rows[w] = blk * 64 + 16 * w + l - jg;
          any |= rows[w] >= 0 && rows[w] < nk;
        }
        if (!any) continue;
        for (int64_t c = 0; c < nq; c += kPhiloxLanes) {
          for (int q = 0; q < kPhiloxLanes; ++q) c1[q] = uint32_t(qg + c + q);
          words(uint32_t((blk << 4) + l), true, c1, bh(b, h), out);
          const int64_t cn = std::min<int64_t>(kPhiloxLanes, nq - c);
          for (int w = 0; w < 4; ++w) {
            if (rows[w] < 0 || rows[w] >= nk) continue;
            acc_t* row = m + rows[w] * ld + c;
            const uint32_t* o = out + 16 * w;
            for (int64_t q = 0; q < cn; ++q) row[q] = o[q] < thr ? keep : acc_t(0);
          }
        }
      }
  }
};

// x[r * ldx + c] *= m[r * ldm + c] for r < rows, c < cols (cols a multiple of the width).
template <typename acc_t>
inline void multiply_tile(acc_t* x, int64_t ldx, const acc_t* m, int64_t ldm, int64_t rows, int64_t cols) {
  using V = Vec<acc_t>;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; c += V::size())
      (V::loadu(x + r * ldx + c) * V::loadu(m + r * ldm + c)).store(x + r * ldx + c);
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
