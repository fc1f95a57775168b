// bf16 operands of the linear-attention chunk products (AVX512-BF16, gemm_bf16.h).
//
// Every operand is made from an fp32 row-major block the kernels already hold:
//   rows       A operands, bf16 rows (round_rows)
//   pairs      B operands in VNNI pairs along K, from K fp32 rows (pack_pairs)
//   transposed A operands of transposed products, bf16 rows of X^T (transpose_round)
// all vectorised (load_transposed_16 also serves transpose_block): at chunk sizes the
// packing costs as much as a product when done element by element. The functions exist in every module so that the kernels name
// them in `if constexpr (bf16_tiles<scalar_t>())` branches; outside the avx512bf16
// module those branches are never instantiated and the bodies are empty.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "gemm.h"
#include "gemm_bf16.h"
#include "transpose16.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace linear {

using bf16 = c10::BFloat16;

// C (+)= A B through the tile products of the operand type: fp32/fp64 rows and rows of B
// (gemm.h), or bf16 rows and VNNI pairs (gemm_bf16.h; ldb counts bf16 per pair row,
// 2 N). A product starting at K row k0 (even for pairs) reads B from b_at(b, k0, ldb).
template <typename T>
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                      int64_t ldc, bool accumulate) {
  gemm<T>(M, N, K, a, lda, 1, b, ldb, c, ldc, accumulate);
}
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const bf16* a, int64_t lda, const bf16* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
#if defined(AE_BF16_TILES)
  gemm_bf16(M, N, K, a, lda, b, ldb, c, ldc, accumulate);
#endif
}
template <typename T>
inline const T* b_at(const T* b, int64_t k0, int64_t ldb) { return b + k0 * ldb; }
inline const bf16* b_at(const bf16* b, int64_t k0, int64_t ldb) { return b + k0 / 2 * ldb; }

// dst rows r < rows: src row r (n floats, n a multiple of 16) rounded to bf16 (nearest
// even); rows..rows_pad zero.
inline void round_rows(const float* src, int64_t lds, int64_t rows, int64_t n, bf16* dst, int64_t ldd,
                       int64_t rows_pad) {
#if defined(AE_BF16_TILES)
  for (int64_t r = 0; r < rows_pad; ++r) {
    bf16* d = dst + r * ldd;
    const float* s = src + r * lds;
    for (int64_t c = 0; c < n; c += 16)
      _mm256_storeu_si256((__m256i*)(d + c),
                          r < rows ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + c)) : _mm256_setzero_si256());
  }
#endif
}

// The VNNI pairs of a K x n fp32 matrix held as rows (src row k at src + k * lds, n a
// multiple of 16): dst[(k / 2) * 2n + 2c + k % 2] = src[k][c] for k < rows, zero for
// rows <= k < k_pad (even).
inline void pack_pairs(const float* src, int64_t lds, int64_t rows, int64_t n, bf16* dst, int64_t k_pad) {
#if defined(AE_BF16_TILES)
  // lane 2i takes element i of the even row, 2i + 1 element i of the odd row
  alignas(64) static constexpr int16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                          21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                          11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_pad; k += 2) {
    const float* s0 = src + k * lds;
    const float* s1 = s0 + lds;
    bf16* d = dst + k * n;
    for (int64_t c = 0; c < n; c += 16) {
      const __m512 lo = k < rows ? _mm512_loadu_ps(s0 + c) : zero;
      const __m512 hi = k + 1 < rows ? _mm512_loadu_ps(s1 + c) : zero;
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo in lanes 0-15, hi in 16-31
      _mm512_storeu_si512(d + 2 * c, _mm512_permutexvar_epi16(idx, both));
    }
  }
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// t[i] = column i of the 16 x 16 fp32 block at src (row stride lds), rows >= valid read
// as zeros: a transpose in registers (transpose_round, and transpose_block's fp32 path).
inline void load_transposed_16(const float* src, int64_t lds, int64_t valid, __m512 t[16]) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < valid ? _mm512_loadu_si512(src + i * lds) : _mm512_setzero_si512();
  transpose_16x16_epi32(r);
  for (int i = 0; i < 16; ++i) t[i] = _mm512_castsi512_ps(r[i]);
}
#endif

// dst[c][r] = bf16(src[r][c]) (dst leading dimension ldd, a multiple of 16) for r < rows,
// c < round_up(cols, 16) (src columns up to there readable), zero for rows <= r < ldd:
// the A operand of a product with X^T, by 16 x 16 fp32 transposes in registers.
inline void transpose_round(const float* src, int64_t lds, int64_t rows, int64_t cols, bf16* dst, int64_t ldd) {
#if defined(AE_BF16_TILES)
  for (int64_t r0 = 0; r0 < ldd; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512 t[16];
      load_transposed_16(src + r0 * lds + c0, lds, rows - r0, t);
      for (int i = 0; i < 16; ++i)
        _mm256_storeu_si256((__m256i*)(dst + (c0 + i) * ldd + r0), (__m256i)_mm512_cvtneps_pbh(t[i]));
    }
  }
#endif
}

}  // namespace linear
}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
