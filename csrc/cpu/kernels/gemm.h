// Register-blocked tile products for the attention kernels.
//
// C[M x N] (+)= A[M x K] * B[K x N] with
//   A(i, k) = a[i * a_rs + k * a_cs]   any strides: broadcast loads, so a transposed A
//                                      (P^T, dS^T) costs nothing extra
//   B(k, :) = b + k * ldb              rows contiguous, N a multiple of the vector width
// Every tile of the attention kernels fits this shape once K^T, Q^T and dO^T tiles are
// packed. The MR x (NV * width) accumulator block stays in registers across the whole
// K loop; B panels are reused from L1 across all row blocks.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "vec_math.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
struct Blocking {
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int MR = 12, NV = 2;  // 24 of 32 zmm hold C
#elif defined(CPU_CAPABILITY_AVX2)
  static constexpr int MR = 6, NV = 2;   // 12 of 16 ymm hold C
#else
  static constexpr int MR = 4, NV = 1;
#endif
};

template <typename T, int MR, int NV, bool ACC>
void micro_kernel(int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb, T* c,
                  int64_t ldc) {
  constexpr int VL = Vec<T>::size();
  Vec<T> acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = ACC ? Vec<T>::loadu(c + i * ldc + v * VL) : Vec<T>(T(0));
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Vec<T>::loadu(b + k * ldb + v * VL);
    const T* ak = a + k * a_cs;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const Vec<T> av(ak[i * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v].store(c + i * ldc + v * VL);
}

template <typename T>
using MicroFn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t);

// Table [acc][nv - 1][mr - 1] of micro kernels, so row and column tails need no
// scalar code.
template <typename T>
struct MicroTable {
  static constexpr int MR = Blocking<T>::MR, NV = Blocking<T>::NV;
  MicroFn<T> fn[2][NV][MR];

  template <int ACC, int NVI, int... MRI>
  constexpr void fill_row(std::integer_sequence<int, MRI...>) {
    ((fn[ACC][NVI][MRI] = &micro_kernel<T, MRI + 1, NVI + 1, ACC != 0>), ...);
  }
  template <int ACC, int... NVI>
  constexpr void fill(std::integer_sequence<int, NVI...>) {
    (fill_row<ACC, NVI>(std::make_integer_sequence<int, MR>{}), ...);
  }
  constexpr MicroTable() : fn{} {
    fill<0>(std::make_integer_sequence<int, NV>{});
    fill<1>(std::make_integer_sequence<int, NV>{});
  }
};

template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
                 int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  static constexpr MicroTable<T> table;
  constexpr int MR = Blocking<T>::MR, NV = Blocking<T>::NV, VL = Vec<T>::size();
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = T(0);
    return;
  }
  for (int64_t n0 = 0; n0 < N; n0 += NV * VL) {
    const int nv = int(std::min<int64_t>(NV, (N - n0) / VL));
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int mr = int(std::min<int64_t>(MR, M - m0));
      table.fn[accumulate][nv - 1][mr - 1](K, a + m0 * a_rs, a_rs, a_cs, b + n0, ldb, c + m0 * ldc + n0, ldc);
    }
  }
}

// gemm for products whose A holds exact zeros where the mask forbids a pair (P, dS):
// rows of B flagged in bad[0, K) (NaN or infinity) are applied only where A is non-zero,
// so a non-finite value in a masked-out key or query never leaks (0 * NaN = NaN) while a
// visible one still propagates. Without flagged rows this is plain gemm.
template <typename T>
inline void gemm_guarded(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
                         int64_t ldb, T* c, int64_t ldc, bool accumulate, const uint8_t* bad) {
  if (!bad || K <= 0 || !std::memchr(bad, 1, size_t(K))) {
    gemm(M, N, K, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
    return;
  }
  if (!accumulate)
    for (int64_t i = 0; i < M; ++i) std::memset(c + i * ldc, 0, size_t(N) * sizeof(T));
  for (int64_t k = 0; k < K;) {
    int64_t e = k;
    while (e < K && !bad[e]) ++e;
    gemm(M, N, e - k, a + k * a_cs, a_rs, a_cs, b + k * ldb, ldb, c, ldc, true);
    if (e == K) break;
    for (int64_t i = 0; i < M; ++i) {
      const T av = a[i * a_rs + e * a_cs];
      if (av != T(0))
        for (int64_t n = 0; n < N; ++n) c[i * ldc + n] += av * b[e * ldb + n];
    }
    k = e + 1;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
