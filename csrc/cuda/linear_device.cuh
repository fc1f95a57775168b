// Linear attention on CUDA: what every pass shares (math in csrc/common/linear.h; the CPU
// kernels in csrc/cpu/kernels/linear_*.cpp are the same algorithm).
//
// Chunks of kTile = 64 rows (the CUDA kernels use this fixed chunk; chunk_size only tunes
// the CPU kernels). A block of 256 threads owns a 64 x 64 output tile, 4 x 4 per thread
// (rows ty + 16 i, columns tx + 16 j), accumulating in acc_t (float; double for double)
// from shared-memory slabs of KS rows of the reduction dimension.
//
// State buffers hold, per (batch * kv head, chunk), one state of E = D * Dv + D elements:
// S row-major (D, Dv) then z (D). Kernels read states through a StateView, which also
// covers the split (S, z) tensors of the op's inputs and outputs.
//
// The passes, one header each (linear_ops.cu runs them):
// Forward:  outer_kernel<key>  chunk deltas fk^T v, colsum(fk)         [BH][nc][E]   linear_state.cuh
//           scan_kernel        exclusive prefix over chunks (causal) / total; final state out
//           fwd_out_kernel     out = (fq S_c + (fq fk^T masked) v) / (fq z_c + rowsum + eps)  linear_fwd.cuh
// Backward: outer_kernel<key> + scan_kernel (chunk states, recomputed)
//           rowstats_kernel    den_i, dd_i = -(dout_i . out_i) / den_i     (normalize)   linear_bwd.cuh
//           outer_kernel<query> gradient deltas fq^T g, fq^T dd (g = dout / den)
//           scan_kernel        reverse exclusive: gradient of the state after each chunk
//           dq_kernel, dkv_kernel                                                      linear_bwd.cuh
// Step:     step_kernel        the recurrence, token by token                          linear_step.cuh
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/linear.h"

namespace attention_ext::cuda::linear {

constexpr int kTile = 64;
constexpr int kLd = kTile + 1;
constexpr int kThreads = 256;

template <typename acc_t>
struct Slab {
  static constexpr int KS = sizeof(acc_t) == 8 ? 8 : 16;  // keeps double tiles under 48 KiB
};

struct LinParams {
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv, group;
  int64_t fmap;
  bool causal, normalize;
  double eps, scale;
};

template <typename acc_t>
struct StateView {
  const acc_t* S;
  const acc_t* z;
  int64_t s_bh, s_c, z_bh, z_c;
  __device__ __forceinline__ const acc_t* Sp(int64_t bh, int64_t c) const { return S + bh * s_bh + c * s_c; }
  __device__ __forceinline__ const acc_t* zp(int64_t bh, int64_t c) const { return z + bh * z_bh + c * z_c; }
};

// Chunked buffer [BH][nc][E] and split (B, Hkv, D, Dv) / (B, Hkv, D) tensors.
template <typename acc_t>
inline StateView<acc_t> chunk_view(const acc_t* buf, int64_t nc, int64_t D, int64_t Dv) {
  const int64_t E = D * Dv + D;
  return {buf, buf + D * Dv, nc * E, E, nc * E, E};
}
template <typename acc_t>
inline StateView<acc_t> split_view(const acc_t* S, const acc_t* z, int64_t D, int64_t Dv) {
  return {S, z, D * Dv, 0, D, 0};
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t ld(const scalar_t* p) {
  return static_cast<acc_t>(p[0]);
}

// s[k][m] = f(k, m) for k < KS, m < kTile (row length kLd). K_FAST: consecutive threads
// take consecutive k (for sources contiguous along k), else consecutive m.
template <int KS, bool K_FAST, typename acc_t, typename F>
__device__ __forceinline__ void fill_slab(acc_t* s, const F& f) {
  for (int e = threadIdx.x; e < KS * kTile; e += kThreads) {
    const int k = K_FAST ? e % KS : e / kTile;
    const int m = K_FAST ? e / KS : e % kTile;
    s[k * kLd + m] = f(k, m);
  }
}

// acc[i][j] += sum_k A[ty + 16 i][k] * b[k][tx + 16 j]   (b: [KS][kLd]), A[r][k] = a[r * RS + k * KSTRIDE]
template <int KS, int RS, int KSTRIDE, typename acc_t>
__device__ __forceinline__ void mma_tile(acc_t (&acc)[4][4], const acc_t* a, const acc_t* b, int ty, int tx) {
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    acc_t av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = a[(ty + 16 * i) * RS + k * KSTRIDE];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[k * kLd + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// A = a^T for a slab a [KS][kLd]: acc[i][j] += sum_k a[k][ty + 16 i] * b[k][tx + 16 j]
template <int KS, typename acc_t>
__device__ __forceinline__ void mma_slab(acc_t (&acc)[4][4], const acc_t* a, const acc_t* b, int ty, int tx) {
  mma_tile<KS, 1, kLd>(acc, a, b, ty, tx);
}

// A = columns [k0, k0 + KS) of a row-major tile t [kTile][kLd]
template <int KS, typename acc_t>
__device__ __forceinline__ void mma_rows(acc_t (&acc)[4][4], const acc_t* t, int k0, const acc_t* b, int ty,
                                         int tx) {
  mma_tile<KS, kLd, 1>(acc, t + k0, b, ty, tx);
}

template <typename acc_t>
__device__ __forceinline__ void zero4x4(acc_t (&a)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) a[i][j] = acc_t(0);
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace attention_ext::cuda::linear
