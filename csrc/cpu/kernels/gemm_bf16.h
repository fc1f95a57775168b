// bf16 tile products on AVX512-BF16 (vdpbf16ps: two bf16 products summed into each fp32
// lane), compiled only into the avx512bf16 module (-mavx512bf16 defines __AVX512BF16__).
//
// C_fp32[M x N] = alpha * A * B  or  C += A * B, with
//   A(i, k) = a[i * lda + k]        bf16 rows; the pair (k, k+1) is read as one 32-bit
//                                   broadcast, so lda and the A offset are even
//   B in VNNI pairs: pair kp of column n is b[kp * ldb + 2 * n + {0, 1}] = B(2kp, n),
//                                   B(2kp + 1, n); N a multiple of 16
// An odd K is padded to even with zeros in A and B (pack_vnni, copy_rows_bf16 write
// them). The MR x (NV * 16) accumulator block stays in registers as in gemm.h.
#pragma once

#include <type_traits>

#include <c10/util/BFloat16.h>

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {
// Whether inputs of this dtype run their tile products on bf16 operands in this build.
template <typename scalar_t>
constexpr bool bf16_tiles() {
#if defined(__AVX512BF16__)
  return std::is_same_v<scalar_t, c10::BFloat16>;
#else
  return false;
#endif
}
}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu

#if defined(__AVX512BF16__)
#define AE_BF16_TILES 1

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "transpose16.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

using bf16 = c10::BFloat16;

struct BlockingBf16 {
  static constexpr int MR = 12, NV = 2;  // 24 of 32 zmm hold C
};

template <int MR, int NV, bool ACC>
void micro_kernel_bf16(int64_t KP, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c,
                       int64_t ldc, float alpha) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = ACC ? _mm512_loadu_ps(c + i * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + kp * ldb + v * 32);
    const bf16* ak = a + 2 * kp;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, ak + i * lda, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + v * 16, ACC ? acc[i][v] : _mm512_mul_ps(acc[i][v], va));
}

using MicroFnBf16 = void (*)(int64_t, const bf16*, int64_t, const bf16*, int64_t, float*, int64_t, float);

// [acc][nv - 1][mr - 1], as gemm.h's MicroTable.
struct MicroTableBf16 {
  static constexpr int MR = BlockingBf16::MR, NV = BlockingBf16::NV;
  MicroFnBf16 fn[2][NV][MR];

  template <int ACC, int NVI, int... MRI>
  constexpr void fill_row(std::integer_sequence<int, MRI...>) {
    ((fn[ACC][NVI][MRI] = &micro_kernel_bf16<MRI + 1, NVI + 1, ACC != 0>), ...);
  }
  template <int ACC, int... NVI>
  constexpr void fill(std::integer_sequence<int, NVI...>) {
    (fill_row<ACC, NVI>(std::make_integer_sequence<int, MR>{}), ...);
  }
  constexpr MicroTableBf16() : fn{} {
    fill<0>(std::make_integer_sequence<int, NV>{});
    fill<1>(std::make_integer_sequence<int, NV>{});
  }
};

// K counts bf16 elements (pairs = ceil(K / 2)); alpha scales a non-accumulated product
// (the softmax scale of the scores, applied in fp32 so Q and K stay exact bf16).
inline void gemm_bf16(int64_t M, int64_t N, int64_t K, const bf16* a, int64_t lda, const bf16* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate, float alpha = 1.0f) {
  static constexpr MicroTableBf16 table;
  constexpr int MR = BlockingBf16::MR, NV = BlockingBf16::NV;
  if (M <= 0 || N <= 0) return;
  const int64_t KP = (K + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += NV * 16) {
    const int nv = int(std::min<int64_t>(NV, (N - n0) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = int(std::min<int64_t>(MR, M - m0));
      table.fn[accumulate][nv - 1][mr - 1](KP, a + m0 * lda, lda, b + 2 * n0, ldb, c + m0 * ldc + n0, ldc, alpha);
    }
  }
}

// dst[0, n) = src rounded to bf16 (nearest even), and a zero at dst[n] for odd n (the
// K padding of a product).
inline void round_row_bf16(const float* src, int64_t n, bf16* dst) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) _mm256_storeu_si256((__m256i*)(dst + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
  if (c < n) {
    const __mmask16 m = __mmask16((1u << (n - c)) - 1);
    _mm256_mask_storeu_epi16(dst + c, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + c)));
  }
  if (n & 1) dst[n] = bf16(0.0f);
}

// The mask of the first n (clamped to [0, 16]) lanes / [0, 32] 16-bit lanes.
inline __mmask16 lanes16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? 0 : __mmask16((1u << n) - 1); }
inline __mmask32 lanes32(int64_t n) { return n >= 32 ? ~__mmask32(0) : n <= 0 ? 0 : __mmask32((1u << n) - 1); }

// 32 bf16 lanes as bf16(float(x)) makes them: every NaN becomes 0x7FC0, so that the bit
// copies of the fast packs below write what the scalar conversion writes.
inline __m512i canonical_nan_bf16(__m512i x) {
  const __mmask32 nan = _mm512_cmpgt_epu16_mask(_mm512_and_si512(x, _mm512_set1_epi16(0x7fff)), _mm512_set1_epi16(0x7f80));
  return _mm512_mask_mov_epi16(x, nan, _mm512_set1_epi16(0x7fc0));
}

// The bf16 lanes holding a NaN or infinity (all exponent bits set).
inline __mmask32 nonfinite_bf16(__m512i x) {
  const __m512i e = _mm512_set1_epi16(0x7f80);
  return _mm512_cmpeq_epi16_mask(_mm512_and_si512(x, e), e);
}

// The VNNI pack of a strided (k, n) matrix, src(k, n) = src[k * s_k + n * s_n]:
// dst[(k / 2) * 2 * ldn + 2 * n + k % 2] for k < k_pad (even), n < ldn, zeros outside
// [0, kn) x [0, nn). With `bad`, bad[k] = 1 marks k holding a NaN or infinity; those are
// packed as zeros (the caller adds them back where allowed, see add_bad_rows).
// bf16 sources with contiguous n (pairs of rows interleaved) or contiguous k (pairs
// already adjacent: a transpose of 32-bit pairs) take vector paths, bitwise the same.
template <typename scalar_t>
void pack_vnni(const scalar_t* src, int64_t s_k, int64_t s_n, int64_t kn, int64_t nn, bf16* dst, int64_t ldn,
               int64_t k_pad, uint8_t* bad = nullptr) {
  if constexpr (std::is_same_v<scalar_t, bf16>) {
    if (s_n == 1) {
      // lane 2n of a pair row takes row k's n, lane 2n + 1 row k + 1's
      alignas(64) static constexpr uint16_t lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
      const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
      // a pair row of rows k, k + 1; a flagged row (rare) is packed again as zeros
      auto pair_row = [&](int64_t k, bool live0, bool live1) {
        const bf16* r0 = src + k * s_k;
        const bf16* r1 = r0 + s_k;
        bf16* d = dst + k * ldn;
        __mmask32 nonfinite0 = 0, nonfinite1 = 0;
        for (int64_t n0 = 0; n0 < ldn; n0 += 32) {
          const __mmask32 m = lanes32(nn - n0);
          __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
          if (live0) a = _mm512_maskz_loadu_epi16(m, r0 + n0), nonfinite0 |= nonfinite_bf16(a);
          if (live1) b = _mm512_maskz_loadu_epi16(m, r1 + n0), nonfinite1 |= nonfinite_bf16(b);
          a = canonical_nan_bf16(a), b = canonical_nan_bf16(b);
          _mm512_mask_storeu_epi32(d + 2 * n0, lanes16(ldn - n0), _mm512_permutex2var_epi16(a, ilo, b));
          _mm512_mask_storeu_epi32(d + 2 * n0 + 32, lanes16(ldn - n0 - 16), _mm512_permutex2var_epi16(a, ihi, b));
        }
        return std::pair<bool, bool>(nonfinite0 != 0, nonfinite1 != 0);
      };
      for (int64_t k = 0; k < k_pad; k += 2) {
        const auto [bad0, bad1] = pair_row(k, k < kn, k + 1 < kn);
        if (bad && (bad0 || bad1)) pair_row(k, k < kn && !bad0, k + 1 < kn && !bad1);
        if (bad) bad[k] = bad0, bad[k + 1] = bad1;
      }
      return;
    }
    if (s_k == 1 && !bad) {
      // 16 columns n x 16 pairs of k per block; row n of the block is n's 16 pairs
      for (int64_t n0 = 0; n0 < ldn; n0 += 16)
        for (int64_t p0 = 0; 2 * p0 < k_pad; p0 += 16) {
          __m512i r[16];
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i)
            r[i] = n0 + i < nn
                ? canonical_nan_bf16(_mm512_maskz_loadu_epi16(lanes32(kn - 2 * p0), src + (n0 + i) * s_n + 2 * p0))
                : _mm512_setzero_si512();
          transpose_16x16_epi32(r);
          const __mmask16 m = lanes16(ldn - n0);
#pragma GCC unroll 16
          for (int p = 0; p < 16; ++p)
            if (2 * (p0 + p) < k_pad) _mm512_mask_storeu_epi32(dst + (p0 + p) * 2 * ldn + 2 * n0, m, r[p]);
        }
      return;
    }
  }
  for (int64_t k = 0; k < k_pad; ++k) {
    bf16* d = dst + (k / 2) * 2 * ldn + (k & 1);
    bool nonfinite = false;
    if (k < kn) {
      const scalar_t* s = src + k * s_k;
      for (int64_t n = 0; n < nn; ++n) {
        const float x = float(s[n * s_n]);
        nonfinite |= !std::isfinite(x);
        d[2 * n] = bf16(x);
      }
      if (bad && nonfinite)
        for (int64_t n = 0; n < nn; ++n) d[2 * n] = bf16(0.0f);
    }
    for (int64_t n = k < kn ? nn : 0; n < ldn; ++n) d[2 * n] = bf16(0.0f);
    if (bad) bad[k] = nonfinite;
  }
}

// Rows [0, rows) x cols [0, cols) of a strided (row, col) matrix as bf16 rows of
// leading dimension ld (even), zero-filled from cols to ld and from rows to rows_pad.
template <typename scalar_t>
void copy_rows_bf16(const scalar_t* src, int64_t s_row, int64_t s_col, int64_t rows, int64_t cols, bf16* dst,
                    int64_t ld, int64_t rows_pad) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    bf16* d = dst + r * ld;
    int64_t c = 0;
    if (r < rows)
      for (; c < cols; ++c) d[c] = bf16(float(src[r * s_row + c * s_col]));
    for (; c < ld; ++c) d[c] = bf16(0.0f);
  }
}

// The products that pack_vnni left out: C[i, :] += A(i, k) * row_k for the flagged k
// where A(i, k) != 0 (gemm_guarded's semantics: a NaN in a masked-out row never leaks,
// a visible one propagates). row(k) points at B's k-th row (n contiguous floats or bf16).
template <typename RowFn>
void add_bad_rows(int64_t M, int64_t K, const bf16* a, int64_t a_rs, int64_t a_cs, const uint8_t* bad,
                  const RowFn& row, float* c, int64_t ldc) {
  if (!bad || K <= 0 || !std::memchr(bad, 1, size_t(K))) return;
  for (int64_t k = 0; k < K; ++k) {
    if (!bad[k]) continue;
    for (int64_t i = 0; i < M; ++i) {
      const float av = float(a[i * a_rs + k * a_cs]);
      if (av != 0.0f) row(k, av, c + i * ldc);
    }
  }
}

// row[0, n) += p * src(x), src(x) = src[x * s]: one flagged row in add_bad_rows.
template <typename scalar_t>
inline void add_row(float p, const scalar_t* src, int64_t s, int64_t n, float* row) {
  for (int64_t x = 0; x < n; ++x) row[x] += p * float(src[x * s]);
}

// The backward's bf16 A operands from its fp32 tiles (rows = nj keys, columns = ni
// queries, leading dimension ld): P^T and dS^T rounded in place of layout (pairs along
// queries), and dS transposed (pairs along keys, leading dimension ld_ds), with the odd
// K padding zeroed.
inline void bf16_products(int64_t nj, int64_t ni, const float* pt, const float* dst, int64_t ld, bf16* ptb,
                          bf16* dstb, bf16* dsb, int64_t ld_ds) {
  for (int64_t j = 0; j < nj; ++j) {
    round_row_bf16(pt + j * ld, ni, ptb + j * ld);
    round_row_bf16(dst + j * ld, ni, dstb + j * ld);
  }
  // dS in blocks of 16 queries x 16 key pairs: lane i of r[p] is the pair (dS^T(2p, i),
  // dS^T(2p + 1, i)), a missing odd key zero; the transpose makes r[i] query i's pairs
  const int64_t pairs = (nj + 1) / 2;
  for (int64_t i0 = 0; i0 < ni; i0 += 16) {
    const __mmask16 mi = lanes16(ni - i0);
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t j = 2 * (p0 + p);
        const __m512i a = j < nj ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mi, dstb + j * ld + i0))
                                 : _mm512_setzero_si512();
        const __m512i b = j + 1 < nj ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mi, dstb + (j + 1) * ld + i0))
                                     : _mm512_setzero_si512();
        r[p] = _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
      }
      transpose_16x16_epi32(r);
      const __mmask16 mp = lanes16(pairs - p0);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        if (i0 + i < ni) _mm512_mask_storeu_epi32(dsb + (i0 + i) * ld_ds + 2 * p0, mp, r[i]);
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu

#endif  // __AVX512BF16__
