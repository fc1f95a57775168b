// A 16 x 16 transpose of 32-bit lanes in AVX-512 registers, for every module with
// AVX-512 (the bf16 packs of gemm_bf16.h, the linear kernels' fp32 transposes).
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

// A 16 x 16 transpose of 32-bit lanes in registers: r[i] lane j becomes r[j] lane i.
inline void transpose_16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4g + c], 128-bit lane L: rows 4g .. 4g + 3 of column 4L + c
#pragma GCC unroll 4
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
#endif
