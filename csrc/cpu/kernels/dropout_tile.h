// Attention dropout on the CPU tiles (the generator and its counters: common/dropout.h).
// Philox runs on 16 counters at a time, in AVX-512 / AVX2 integer lanes (compilers do
// not vectorise its 32 x 32 -> 64-bit products by themselves), so 128 decisions cost
// ten rounds of a few vector instructions, and several such sets are
// interleaved. The mask enters as a multiplier: 1 / (1 - p) where kept, 0 where dropped.
#pragma once

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <type_traits>

#include "../../common/dropout.h"
#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

constexpr int kPhiloxLanes = 16;
// Counter sets computed together: the ten rounds are a chain of dependent multiplies,
// so independent sets interleaved run in about the time of one (4 sets: ~4x the keys
// per second of one on AVX-512).
constexpr int kPhiloxSets = 4;

// Philox4x32-10 of S sets of 16 counters: set s has lanes (c0[16 s + l], c1[16 s + l], c2,
// c3), l < 16, and word w of its lane l goes to out[64 s + 16 w + l].
template <int S>
inline void philox_sets(const uint32_t* c0, const uint32_t* c1, uint32_t c2, uint32_t c3, uint32_t k0,
                        uint32_t k1, uint32_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
  // the even and odd 32-bit lanes multiply separately (vpmuludq); one masked in-lane swap
  // each puts the hi and lo words back, a ternary-logic op does each three-way xor
  auto mulhilo = [](__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
    const __m512i ev = _mm512_mul_epu32(a, m), od = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    lo = _mm512_mask_shuffle_epi32(ev, 0xAAAA, od, _MM_PERM_CDAB);
    hi = _mm512_mask_shuffle_epi32(od, 0x5555, ev, _MM_PERM_CDAB);
  };
  __m512i x0[S], x1[S], x2[S], x3[S];
  for (int s = 0; s < S; ++s) {
    x0[s] = _mm512_loadu_si512(c0 + 16 * s), x1[s] = _mm512_loadu_si512(c1 + 16 * s);
    x2[s] = _mm512_set1_epi32(int(c2)), x3[s] = _mm512_set1_epi32(int(c3));
  }
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  for (int r = 0; r < 10; ++r) {
    const __m512i r0 = _mm512_set1_epi32(int(k0)), r1 = _mm512_set1_epi32(int(k1));
    for (int s = 0; s < S; ++s) {
      __m512i h0, l0, h1, l1;
      mulhilo(x0[s], m0, h0, l0);
      mulhilo(x2[s], m1, h1, l1);
      x0[s] = _mm512_ternarylogic_epi32(h1, x1[s], r0, 0x96);  // h1 ^ x1 ^ r0
      x2[s] = _mm512_ternarylogic_epi32(h0, x3[s], r1, 0x96);
      x1[s] = l1, x3[s] = l0;
    }
    k0 += kPhiloxW0, k1 += kPhiloxW1;
  }
  for (int s = 0; s < S; ++s) {
    _mm512_storeu_si512(out + 64 * s, x0[s]), _mm512_storeu_si512(out + 64 * s + 16, x1[s]);
    _mm512_storeu_si512(out + 64 * s + 32, x2[s]), _mm512_storeu_si512(out + 64 * s + 48, x3[s]);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  auto mulhilo = [](__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
    const __m256i ev = _mm256_mul_epu32(a, m), od = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    lo = _mm256_blend_epi32(ev, _mm256_slli_epi64(od, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(ev, 32), od, 0xAA);
  };
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  for (int half = 0; half < 2 * S; ++half) {  // 8 lanes at a time
    const int s = half / 2, o = 64 * s + 8 * (half % 2);
    uint32_t a0 = k0, a1 = k1;
    __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + 16 * s + 8 * (half % 2)));
    __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + 16 * s + 8 * (half % 2)));
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
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o), x0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o + 16), x1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o + 32), x2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + o + 48), x3);
  }
#else
  for (int s = 0; s < S; ++s)
    for (int l = 0; l < kPhiloxLanes; ++l) {
      uint32_t c[4] = {c0[16 * s + l], c1[16 * s + l], c2, c3};
      philox4x32_10(c, k0, k1);
      for (int w = 0; w < 4; ++w) out[64 * s + 16 * w + l] = c[w];
    }
#endif
}

struct DropoutTile {
  const DropoutSpec& d;
  int64_t Hq;
  uint32_t thr;
  double inv;
  DropoutTile(const DropoutSpec& spec, int64_t hq) : d(spec), Hq(hq), thr(spec.threshold()), inv(spec.inv_keep()) {}

  // kPhiloxSets sets of counters (c0, c1 as philox_sets reads them) of head (b, h)
  void words(const uint32_t* c0, const uint32_t* c1, int64_t b, int64_t h, uint32_t* out) const {
    philox_sets<kPhiloxSets>(c0, c1, dropout_bh(d, Hq, b, h), d.offset, uint32_t(d.seed), uint32_t(d.seed >> 32),
                             out);
  }

  // 16 keys whose halves are (w[q] >> sh) & 0xFFFF, q in [a, e): x[q] becomes x[q] / (1 - p)
  // or 0. One masked vector op on AVX-512 (the compiler's own vectorisation of the loop
  // shuffles lanes instead).
  template <typename acc_t>
  void scale16(const uint32_t* w, int sh, acc_t keep, acc_t* x, int64_t a, int64_t e) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      const __mmask16 lanes = __mmask16((0xFFFFu >> (16 - e)) & (0xFFFFu << a));
      __m512i hv = _mm512_loadu_si512(w);
      hv = _mm512_and_si512(sh ? _mm512_srli_epi32(hv, 16) : hv, _mm512_set1_epi32(0xFFFF));
      const __mmask16 kept = _mm512_cmplt_epu32_mask(hv, _mm512_set1_epi32(int(thr)));
      const __m512 r = _mm512_maskz_mul_ps(kept, _mm512_maskz_loadu_ps(lanes, x), _mm512_set1_ps(keep));
      _mm512_mask_storeu_ps(x, lanes, r);
      return;
    }
#endif
    for (int64_t q = a; q < e; ++q) x[q] = ((w[q] >> sh) & 0xFFFFu) < thr ? x[q] * keep : acc_t(0);
  }

  // 32 consecutive rows whose halves are w[0, 16) in memory order (row 2 q + t: half t of
  // w[q]), e in [a, b): m[e] = 1 / (1 - p) or 0.
  template <typename acc_t>
  void fill32(const uint32_t* w, acc_t keep, acc_t* m, int64_t a, int64_t b) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      const uint64_t span = ((~0ull) >> (64 - b)) & ((~0ull) << a);
      const __m512i hv = _mm512_loadu_si512(w);
      // thr = 2^16 (p below 2^-17) keeps all; it does not fit a 16-bit lane
      const __mmask32 kept = thr > 0xFFFFu ? ~__mmask32(0) : _mm512_cmplt_epu16_mask(hv, _mm512_set1_epi16(short(thr)));
      const __m512 vk = _mm512_set1_ps(keep);
      _mm512_mask_storeu_ps(m, __mmask16(span), _mm512_maskz_mov_ps(__mmask16(kept), vk));
      _mm512_mask_storeu_ps(m + 16, __mmask16(span >> 16), _mm512_maskz_mov_ps(__mmask16(kept >> 16), vk));
      return;
    }
#endif
    for (int64_t e = a; e < b; ++e) m[e] = ((w[e >> 1] >> (16 * (e & 1))) & 0xFFFFu) < thr ? keep : acc_t(0);
  }

  // Forward: the probabilities x[r * ld + c] of query rows i0 + r (r < rows) and keys
  // j0 + c (c < n), rows of the call. Each (row pair, 64-key block) is one counter set.
  template <typename acc_t>
  void apply_rows(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t n, acc_t* x,
                  int64_t ld) const {
    constexpr int S = kPhiloxSets, L = kDropoutBlockLog2;
    const int64_t jg = j0 + d.k0, ig = i0 + d.q0;  // full-problem key and row indices
    const int64_t blk0 = jg >> L, nb = ((jg + n - 1) >> L) - blk0 + 1;
    const int64_t pair0 = ig >> 1, total = (((ig + rows - 1) >> 1) - pair0 + 1) * nb;
    const acc_t keep = acc_t(inv);
    uint32_t c0[16 * S], c1[16 * S], out[64 * S];
    for (int64_t p0 = 0; p0 < total; p0 += S) {
      const int ns = int(std::min<int64_t>(S, total - p0));
      for (int s = 0; s < S; ++s) {
        const int64_t p = p0 + std::min(s, ns - 1);  // spare sets repeat the last one
        for (int l = 0; l < kPhiloxLanes; ++l) {
          c0[16 * s + l] = uint32_t(((blk0 + p % nb) << 4) + l);
          c1[16 * s + l] = uint32_t(pair0 + p / nb);
        }
      }
      words(c0, c1, b, h, out);
      for (int s = 0; s < ns; ++s) {
        // key 16 w + l of the block is word w of lane l, row 2 pair + t its half t
        const int64_t p = p0 + s, base = ((blk0 + p % nb) << L) - jg;
        const int64_t lo = std::max<int64_t>(0, -base), hi = std::min<int64_t>(64, n - base);
        for (int t = 0; t < 2; ++t) {
          const int64_t r = 2 * (pair0 + p / nb) + t - ig;
          if (r < 0 || r >= rows) continue;
          acc_t* xr = x + r * ld + base;
          if (lo == 0 && hi == 64) {  // a whole block: constant bounds
            for (int w = 0; w < 4; ++w) scale16(out + 64 * s + 16 * w, 16 * t, keep, xr + 16 * w, 0, 16);
            continue;
          }
          for (int w = 0; w < 4; ++w) {
            const int64_t a = std::max<int64_t>(lo - 16 * w, 0), e = std::min<int64_t>(hi - 16 * w, 16);
            if (a < e) scale16(out + 64 * s + 16 * w, 16 * t, keep, xr + 16 * w, a, e);
          }
        }
      }
    }
  }

  // Backward: the multiplier tile m[r * ld + c] of keys j0 + r (r < nk) and queries i0 + c
  // (c < nq), held transposed as the backward's tiles are. Counter 16 blk + l of 16
  // consecutive row pairs is one set: its word w gives key row blk * 64 + 16 w + l for 32
  // consecutive queries.
  template <typename acc_t>
  void fill_transposed(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk, acc_t* m,
                       int64_t ld) const {
    constexpr int S = kPhiloxSets, L = kDropoutBlockLog2;
    const int64_t jg = j0 + d.k0, qg = i0 + d.q0;
    const int64_t o = qg & 1, nchunk = ae_cdiv(nq + o, int64_t(32));  // chunks of 32 rows from qg - o
    const acc_t keep = acc_t(inv);
    uint32_t c0[16 * S], c1[16 * S], out[64 * S];
    for (int64_t blk = jg >> L; (blk << L) < jg + nk; ++blk) {
      // the sets of this block: (l, chunk) for the counters l holding a row of the tile
      const int64_t lrow0 = (blk << L) - jg;  // tile row of key 16 w + l: lrow0 + 16 w + l
      const int64_t total = 16 * nchunk;
      for (int64_t p0 = 0; p0 < total; p0 += S) {
        const int ns = int(std::min<int64_t>(S, total - p0));
        for (int s = 0; s < S; ++s) {
          const int64_t p = p0 + std::min(s, ns - 1), l = p / nchunk, ch = p % nchunk;
          for (int q = 0; q < kPhiloxLanes; ++q) {
            c0[16 * s + q] = uint32_t((blk << 4) + l);
            c1[16 * s + q] = uint32_t(((qg - o) >> 1) + 16 * ch + q);
          }
        }
        words(c0, c1, b, h, out);
        for (int s = 0; s < ns; ++s) {
          const int64_t p = p0 + s, l = p / nchunk, ch = p % nchunk;
          const int64_t cs = 32 * ch - o;  // tile column of the chunk's first row
          const int64_t a = std::max<int64_t>(0, -cs), e = std::min<int64_t>(32, nq - cs);
          for (int w = 0; w < 4; ++w) {
            const int64_t r = lrow0 + 16 * w + l;
            if (r >= 0 && r < nk) fill32(out + 64 * s + 16 * w, keep, m + r * ld + cs, a, e);
          }
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
