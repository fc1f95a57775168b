// Linear attention on CUDA: the forward output tiles, read from the chunk states of
// linear_state.cuh.
#pragma once

#include "linear_device.cuh"

namespace attention_ext::cuda::linear {

// ---- forward output tile: query chunk c of head (b, h), value columns [e0, e0 + 64).
// st: state before each chunk (causal) or the final state (non-causal).
// grid (ncq, B * Hq, tilesE)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    fwd_out_kernel(LinParams p, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, StateView<acc_t> st, scalar_t* __restrict__ out) {
  constexpr int KS = Slab<acc_t>::KS;
  __shared__ acc_t sQ[KS * kLd], sK[KS * kLd], sS[KS * kLd], sA[kTile * kLd], sZ[KS];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t c = blockIdx.x, bhq = blockIdx.y, b = bhq / p.Hq, h = bhq % p.Hq, hk = h / p.group;
  const int64_t bhk = b * p.Hkv + hk, e0 = int64_t(blockIdx.z) * kTile;
  const int64_t r0 = c * kTile;
  const int n = int(p.Nq - r0 < kTile ? p.Nq - r0 : kTile);
  const int64_t D = p.D, Dv = p.Dv;
  const acc_t scale = acc_t(p.scale);
  const scalar_t* qb = q + ((b * p.Hq + h) * p.Nq + r0) * D;
  const scalar_t* kb = k + ((b * p.Hkv + hk) * p.Nk + r0) * D;
  const scalar_t* vb = v + ((b * p.Hkv + hk) * p.Nk + r0) * Dv;
  const acc_t* S = st.Sp(bhk, c);
  const acc_t* z = st.zp(bhk, c);
  acc_t num[4][4], A[4][4], den[4] = {0, 0, 0, 0};
  zero4x4(num);
  zero4x4(A);
  for (int64_t d0 = 0; d0 < D; d0 += KS) {
    fill_slab<KS, true>(sQ, [&](int kk, int m) {
      const int64_t d = d0 + kk;
      return (m < n && d < D) ? feature<acc_t>(p.fmap, ld<acc_t>(qb + m * D + d)) * scale : acc_t(0);
    });
    if (p.causal)
      fill_slab<KS, true>(sK, [&](int kk, int m) {
        const int64_t d = d0 + kk;
        return (m < n && d < D) ? feature<acc_t>(p.fmap, ld<acc_t>(kb + m * D + d)) : acc_t(0);
      });
    fill_slab<KS, false>(sS, [&](int kk, int m) {
      const int64_t d = d0 + kk, e = e0 + m;
      return (d < D && e < Dv) ? S[d * Dv + e] : acc_t(0);
    });
    if (tid < KS) sZ[tid] = d0 + tid < D ? z[d0 + tid] : acc_t(0);
    __syncthreads();
    mma_slab<KS>(num, sQ, sS, ty, tx);
    if (p.causal) mma_slab<KS>(A, sQ, sK, ty, tx);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) den[i] += sQ[kk * kLd + ty + 16 * i] * sZ[kk];
    __syncthreads();
  }
  if (p.causal) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = ty + 16 * i, col = tx + 16 * j;
        sA[row * kLd + col] = col <= row ? A[i][j] : acc_t(0);
      }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = ty + 16 * i;
      acc_t s = 0;
      for (int col = 0; col <= row; ++col) s += sA[row * kLd + col];
      den[i] += s;
    }
    for (int j0 = 0; j0 < n; j0 += KS) {
      fill_slab<KS, false>(sS, [&](int kk, int m) {
        const int j = j0 + kk;
        const int64_t e = e0 + m;
        return (j < n && e < Dv) ? ld<acc_t>(vb + j * Dv + e) : acc_t(0);
      });
      __syncthreads();
      mma_rows<KS>(num, sA, j0, sS, ty, tx);
      __syncthreads();
    }
  }
  scalar_t* ob = out + ((b * p.Hq + h) * p.Nq + r0) * Dv;
  const acc_t eps = acc_t(p.eps);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = ty + 16 * i;
    if (row >= n) continue;
    const acc_t inv = acc_t(1) / (den[i] + eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = e0 + tx + 16 * j;
      if (e < Dv) ob[row * Dv + e] = static_cast<scalar_t>(p.normalize ? num[i][j] * inv : num[i][j]);
    }
  }
}

}  // namespace attention_ext::cuda::linear
