// CUDA kernels of linear attention (math in csrc/common/linear.h; the CPU kernels in
// csrc/cpu/kernels/linear_*.cpp are the same algorithm).
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
// Forward:  outer_kernel<key>  chunk deltas fk^T v, colsum(fk)         [BH][nc][E]
//           scan_kernel        exclusive prefix over chunks (causal) / total; final state out
//           fwd_out_kernel     out = (fq S_c + (fq fk^T masked) v) / (fq z_c + rowsum + eps)
// Backward: outer_kernel<key> + scan_kernel (chunk states, recomputed)
//           rowstats_kernel    den_i, dd_i = -(dout_i . out_i) / den_i     (normalize)
//           outer_kernel<query> gradient deltas fq^T g, fq^T dd (g = dout / den)
//           scan_kernel        reverse exclusive: gradient of the state after each chunk
//           dq_kernel, dkv_kernel
// Step:     step_kernel        the recurrence, token by token
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/linear.h"

namespace attention_ext::cuda_linear {

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

// acc[i][j] += sum_k a[k][ty + 16 i] * b[k][tx + 16 j]   (a, b: [KS][kLd])
template <int KS, typename acc_t>
__device__ __forceinline__ void mma_slab(acc_t (&acc)[4][4], const acc_t* a, const acc_t* b, int ty, int tx) {
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    acc_t av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = a[k * kLd + ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[k * kLd + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// acc[i][j] += sum_k t[ty + 16 i][k0 + k] * b[k][tx + 16 j]   (t: [kTile][kLd] row-major)
template <int KS, typename acc_t>
__device__ __forceinline__ void mma_rows(acc_t (&acc)[4][4], const acc_t* t, int k0, const acc_t* b, int ty,
                                         int tx) {
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    acc_t av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = t[(ty + 16 * i) * kLd + k0 + k];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[k * kLd + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

template <typename acc_t>
__device__ __forceinline__ void zero4x4(acc_t (&a)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) a[i][j] = acc_t(0);
}

// ---- chunk deltas: out[bh][c] = sum over the chunk's rows (and the group's heads) of
// X^T Y (D x Dv) and X^T w (D). Keys: X = phi(k), Y = v, w = 1. Queries: X = scale phi(q),
// Y = dout / den, w = dd (den = 1, dd = 0 without normalisation).
// grid (nc, B * Hkv, tilesD * tilesE)
template <typename scalar_t, typename acc_t, bool QUERY>
__global__ void __launch_bounds__(kThreads)
    outer_kernel(LinParams p, const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                 const acc_t* __restrict__ den, const acc_t* __restrict__ dd, acc_t* __restrict__ out, int64_t nc,
                 int tilesE) {
  constexpr int KS = Slab<acc_t>::KS;
  __shared__ acc_t sX[KS * kLd], sY[KS * kLd], sW[KS];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t c = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, hk = bh % p.Hkv;
  const int64_t d0 = int64_t(blockIdx.z / tilesE) * kTile, e0 = int64_t(blockIdx.z % tilesE) * kTile;
  const bool first_e = blockIdx.z % tilesE == 0;
  const int64_t N = QUERY ? p.Nq : p.Nk, H = QUERY ? p.Hq : p.Hkv;
  const int64_t r0 = c * kTile;
  const int n = int(N - r0 < kTile ? N - r0 : kTile);
  const acc_t mult = QUERY ? acc_t(p.scale) : acc_t(1);
  const int64_t D = p.D, Dv = p.Dv;
  acc_t acc[4][4], zacc[4] = {0, 0, 0, 0};
  zero4x4(acc);
  const int64_t h_begin = QUERY ? hk * p.group : hk, h_end = QUERY ? (hk + 1) * p.group : hk + 1;
  for (int64_t h = h_begin; h < h_end; ++h) {
    const int64_t row0 = (b * H + h) * N + r0;
    const scalar_t* xb = x + row0 * D;
    const scalar_t* yb = y + row0 * Dv;
    const acc_t* denb = den ? den + row0 : nullptr;
    const acc_t* ddb = dd ? dd + row0 : nullptr;
    for (int k0 = 0; k0 < n; k0 += KS) {
      fill_slab<KS, false>(sX, [&](int k, int m) {
        const int r = k0 + k;
        const int64_t d = d0 + m;
        return (r < n && d < D) ? feature<acc_t>(p.fmap, ld<acc_t>(xb + r * D + d)) * mult : acc_t(0);
      });
      fill_slab<KS, false>(sY, [&](int k, int m) {
        const int r = k0 + k;
        const int64_t e = e0 + m;
        if (r >= n || e >= Dv) return acc_t(0);
        const acc_t val = ld<acc_t>(yb + r * Dv + e);
        return denb ? val * (acc_t(1) / denb[r]) : val;
      });
      if (tid < KS) {
        const int r = k0 + tid;
        sW[tid] = r < n ? (QUERY ? (ddb ? ddb[r] : acc_t(0)) : acc_t(1)) : acc_t(0);
      }
      __syncthreads();
      mma_slab<KS>(acc, sX, sY, ty, tx);
      if (first_e && tx == 0) {
#pragma unroll
        for (int k = 0; k < KS; ++k)
#pragma unroll
          for (int i = 0; i < 4; ++i) zacc[i] += sX[k * kLd + ty + 16 * i] * sW[k];
      }
      __syncthreads();
    }
  }
  const int64_t E = D * Dv + D;
  acc_t* o = out + (bh * nc + c) * E;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t d = d0 + ty + 16 * i;
    if (d >= D) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t e = e0 + tx + 16 * j;
      if (e < Dv) o[d * Dv + e] = acc[i][j];
    }
    if (first_e && tx == 0) o[D * Dv + d] = zacc[i];
  }
}

// ---- scan over chunks of every state element. Each element keeps a running value that
// starts at the initial state (or 0); with `exclusive` every chunk's delta is replaced by
// the running value before it. `reverse` walks the chunks backwards. The final value goes
// to (Sf, zf) when given. grid (ceil(E / 256), B * Hkv)
template <typename acc_t>
__global__ void scan_kernel(acc_t* __restrict__ buf, int64_t nc, int64_t D, int64_t Dv, const acc_t* __restrict__ S0,
                            const acc_t* __restrict__ z0, acc_t* __restrict__ Sf, acc_t* __restrict__ zf,
                            bool reverse, bool exclusive) {
  const int64_t DDv = D * Dv, E = DDv + D;
  const int64_t bh = blockIdx.y, e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const bool isS = e < DDv;
  acc_t run = isS ? (S0 ? S0[bh * DDv + e] : acc_t(0)) : (z0 ? z0[bh * D + e - DDv] : acc_t(0));
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t c = reverse ? nc - 1 - i : i;
    acc_t* cell = buf + (bh * nc + c) * E + e;
    const acc_t delta = *cell;
    if (exclusive) *cell = run;
    run += delta;
  }
  if (Sf) {
    if (isS)
      Sf[bh * DDv + e] = run;
    else
      zf[bh * D + e - DDv] = run;
  }
}

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

// ---- per-row normaliser and dd_i = -(dout_i . out_i) / den_i (normalize only).
// den_i = fq_i . z_i + eps with z_i the running z at row i. grid (ncq, B * Hq), 64 threads
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTile)
    rowstats_kernel(LinParams p, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                    const scalar_t* __restrict__ dout, const scalar_t* __restrict__ out, StateView<acc_t> st,
                    acc_t* __restrict__ den_out, acc_t* __restrict__ dd_out) {
  constexpr int DS = 32;
  __shared__ acc_t sZ[kTile][DS + 1];
  const int r = threadIdx.x;
  const int64_t c = blockIdx.x, bhq = blockIdx.y, b = bhq / p.Hq, h = bhq % p.Hq, hk = h / p.group;
  const int64_t bhk = b * p.Hkv + hk, r0 = c * kTile;
  const int n = int(p.Nq - r0 < kTile ? p.Nq - r0 : kTile);
  const int64_t D = p.D, Dv = p.Dv;
  const acc_t scale = acc_t(p.scale);
  const scalar_t* qb = q + ((b * p.Hq + h) * p.Nq + r0) * D;
  const scalar_t* kb = k + ((b * p.Hkv + hk) * p.Nk + r0) * D;
  const acc_t* z = st.zp(bhk, c);
  acc_t dsum = 0;
  for (int64_t d0 = 0; d0 < D; d0 += DS) {
    if (p.causal) {
      for (int e = r; e < kTile * DS; e += kTile) {
        const int j = e / DS, kk = e % DS;
        sZ[j][kk] = (j < n && d0 + kk < D) ? feature<acc_t>(p.fmap, ld<acc_t>(kb + j * D + d0 + kk)) : acc_t(0);
      }
      __syncthreads();
      if (r < DS) {
        acc_t run = d0 + r < D ? z[d0 + r] : acc_t(0);
        for (int j = 0; j < kTile; ++j) {
          run += sZ[j][r];
          sZ[j][r] = run;
        }
      }
      __syncthreads();
    }
    if (r < n)
      for (int kk = 0; kk < DS && d0 + kk < D; ++kk) {
        const acc_t fq = feature<acc_t>(p.fmap, ld<acc_t>(qb + r * D + d0 + kk)) * scale;
        dsum += fq * (p.causal ? sZ[r][kk] : z[d0 + kk]);
      }
    __syncthreads();
  }
  if (r >= n) return;
  const acc_t den = dsum + acc_t(p.eps);
  const int64_t row = (b * p.Hq + h) * p.Nq + r0 + r;
  acc_t s = 0;
  for (int64_t e = 0; e < Dv; ++e) s += ld<acc_t>(dout + row * Dv + e) * ld<acc_t>(out + row * Dv + e);
  den_out[row] = den;
  dd_out[row] = -s * (acc_t(1) / den);
}

// ---- dq tile: query chunk c of head (b, h), feature columns [d0, d0 + 64).
// dfq = g S_c^T + dd z_c^T + (g v^T + dd) masked . fk. grid (ncq, B * Hq, tilesD)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dq_kernel(LinParams p, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
              const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout, const acc_t* __restrict__ den,
              const acc_t* __restrict__ dd, StateView<acc_t> st, scalar_t* __restrict__ dq) {
  constexpr int KS = Slab<acc_t>::KS;
  __shared__ acc_t s1[KS * kLd], s2[KS * kLd], s3[KS * kLd], sA[kTile * kLd], sInv[kTile], sDd[kTile];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t c = blockIdx.x, bhq = blockIdx.y, b = bhq / p.Hq, h = bhq % p.Hq, hk = h / p.group;
  const int64_t bhk = b * p.Hkv + hk, d0 = int64_t(blockIdx.z) * kTile, r0 = c * kTile;
  const int n = int(p.Nq - r0 < kTile ? p.Nq - r0 : kTile);
  const int64_t D = p.D, Dv = p.Dv;
  const int64_t row0 = (b * p.Hq + h) * p.Nq + r0;
  const scalar_t* qb = q + row0 * D;
  const scalar_t* dob = dout + row0 * Dv;
  const scalar_t* kb = k + ((b * p.Hkv + hk) * p.Nk + r0) * D;
  const scalar_t* vb = v + ((b * p.Hkv + hk) * p.Nk + r0) * Dv;
  const acc_t* S = st.Sp(bhk, c);
  const acc_t* z = st.zp(bhk, c);
  if (tid < kTile) {
    const bool in = tid < n && p.normalize;
    sInv[tid] = in ? acc_t(1) / den[row0 + tid] : acc_t(1);
    sDd[tid] = in ? dd[row0 + tid] : acc_t(0);
  }
  __syncthreads();
  acc_t dfq[4][4], dA[4][4];
  zero4x4(dfq);
  zero4x4(dA);
  for (int64_t e0 = 0; e0 < Dv; e0 += KS) {
    fill_slab<KS, true>(s1, [&](int kk, int m) {  // g^T
      const int64_t e = e0 + kk;
      return (m < n && e < Dv) ? ld<acc_t>(dob + m * Dv + e) * sInv[m] : acc_t(0);
    });
    fill_slab<KS, true>(s2, [&](int kk, int m) {  // S^T
      const int64_t e = e0 + kk, d = d0 + m;
      return (e < Dv && d < D) ? S[d * Dv + e] : acc_t(0);
    });
    if (p.causal)
      fill_slab<KS, true>(s3, [&](int kk, int m) {  // v^T
        const int64_t e = e0 + kk;
        return (m < n && e < Dv) ? ld<acc_t>(vb + m * Dv + e) : acc_t(0);
      });
    __syncthreads();
    mma_slab<KS>(dfq, s1, s2, ty, tx);
    if (p.causal) mma_slab<KS>(dA, s1, s3, ty, tx);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t d = d0 + tx + 16 * j;
      dfq[i][j] += sDd[ty + 16 * i] * (d < D ? z[d] : acc_t(0));
    }
  if (p.causal) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = ty + 16 * i, col = tx + 16 * j;
        sA[row * kLd + col] = col <= row ? dA[i][j] + sDd[row] : acc_t(0);
      }
    __syncthreads();
    for (int j0 = 0; j0 < n; j0 += KS) {
      fill_slab<KS, false>(s1, [&](int kk, int m) {  // fk rows
        const int j = j0 + kk;
        const int64_t d = d0 + m;
        return (j < n && d < D) ? feature<acc_t>(p.fmap, ld<acc_t>(kb + j * D + d)) : acc_t(0);
      });
      __syncthreads();
      mma_rows<KS>(dfq, sA, j0, s1, ty, tx);
      __syncthreads();
    }
  }
  scalar_t* dqb = dq + row0 * D;
  const acc_t scale = acc_t(p.scale);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = ty + 16 * i;
    if (row >= n) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t d = d0 + tx + 16 * j;
      if (d < D)
        dqb[row * D + d] =
            static_cast<scalar_t>(dfq[i][j] * scale * feature_grad<acc_t>(p.fmap, ld<acc_t>(qb + row * D + d)));
    }
  }
}

// ---- dk or dv tile of key chunk c of kv head (b, hk). blockIdx.z < tilesD: dk columns
// [64 z, ...), else dv columns. G: gradient of the state after each chunk (causal) or of
// the final state (non-causal).
//   dfk = sum_h (g_h v^T + dd_h) masked ^T fq_h + v G^T + gz,   dk = dfk * phi'(k)
//   dv  = sum_h (fq_h fk^T) masked ^T g_h + fk G
// grid (nck, B * Hkv, tilesD + tilesE)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dkv_kernel(LinParams p, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
               const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout, const acc_t* __restrict__ den,
               const acc_t* __restrict__ dd, StateView<acc_t> G, scalar_t* __restrict__ dk, scalar_t* __restrict__ dv,
               int tilesD) {
  constexpr int KS = Slab<acc_t>::KS;
  __shared__ acc_t s1[KS * kLd], s2[KS * kLd], sM[kTile * kLd], sInv[kTile], sDd[kTile];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t c = blockIdx.x, bh = blockIdx.y, b = bh / p.Hkv, hk = bh % p.Hkv;
  const bool is_dk = int(blockIdx.z) < tilesD;
  const int64_t t0 = int64_t(is_dk ? blockIdx.z : blockIdx.z - tilesD) * kTile;
  const int64_t j0 = c * kTile;
  const int n = int(p.Nk - j0 < kTile ? p.Nk - j0 : kTile);
  const int64_t D = p.D, Dv = p.Dv;
  const scalar_t* kb = k + (bh * p.Nk + j0) * D;
  const scalar_t* vb = v + (bh * p.Nk + j0) * Dv;
  const acc_t* Gs = G.Sp(bh, c);
  const acc_t* Gz = G.zp(bh, c);
  const acc_t scale = acc_t(p.scale);
  acc_t acc[4][4];
  zero4x4(acc);
  if (p.causal) {
    for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
      const int64_t row0 = (b * p.Hq + h) * p.Nq + j0;  // queries of the same positions
      const scalar_t* qb = q + row0 * D;
      const scalar_t* dob = dout + row0 * Dv;
      if (tid < kTile) {
        const bool in = tid < n && p.normalize;
        sInv[tid] = in ? acc_t(1) / den[row0 + tid] : acc_t(1);
        sDd[tid] = in ? dd[row0 + tid] : acc_t(0);
      }
      __syncthreads();
      acc_t M[4][4];  // rows: queries i, columns: keys j
      zero4x4(M);
      if (is_dk) {
        for (int64_t e0 = 0; e0 < Dv; e0 += KS) {
          fill_slab<KS, true>(s1, [&](int kk, int m) {  // g^T
            const int64_t e = e0 + kk;
            return (m < n && e < Dv) ? ld<acc_t>(dob + m * Dv + e) * sInv[m] : acc_t(0);
          });
          fill_slab<KS, true>(s2, [&](int kk, int m) {  // v^T
            const int64_t e = e0 + kk;
            return (m < n && e < Dv) ? ld<acc_t>(vb + m * Dv + e) : acc_t(0);
          });
          __syncthreads();
          mma_slab<KS>(M, s1, s2, ty, tx);
          __syncthreads();
        }
      } else {
        for (int64_t d0 = 0; d0 < D; d0 += KS) {
          fill_slab<KS, true>(s1, [&](int kk, int m) {  // fq^T
            const int64_t d = d0 + kk;
            return (m < n && d < D) ? feature<acc_t>(p.fmap, ld<acc_t>(qb + m * D + d)) * scale : acc_t(0);
          });
          fill_slab<KS, true>(s2, [&](int kk, int m) {  // fk^T
            const int64_t d = d0 + kk;
            return (m < n && d < D) ? feature<acc_t>(p.fmap, ld<acc_t>(kb + m * D + d)) : acc_t(0);
          });
          __syncthreads();
          mma_slab<KS>(M, s1, s2, ty, tx);
          __syncthreads();
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = ty + 16 * i, col = tx + 16 * j;
          const acc_t val = is_dk ? M[i][j] + sDd[row] : M[i][j];
          sM[row * kLd + col] = (col <= row && row < n) ? val : acc_t(0);
        }
      __syncthreads();
      // acc[j][col] += sum_i sM[i][j] F[i][col], F = fq (dk) or g (dv)
      for (int i0 = 0; i0 < n; i0 += KS) {
        fill_slab<KS, false>(s1, [&](int kk, int m) {
          const int i = i0 + kk;
          const int64_t col = t0 + m;
          if (i >= n) return acc_t(0);
          if (is_dk) return col < D ? feature<acc_t>(p.fmap, ld<acc_t>(qb + i * D + col)) * scale : acc_t(0);
          return col < Dv ? ld<acc_t>(dob + i * Dv + col) * sInv[i] : acc_t(0);
        });
        __syncthreads();
        mma_slab<KS>(acc, sM + i0 * kLd, s1, ty, tx);
        __syncthreads();
      }
    }
  }
  if (is_dk) {
    for (int64_t e0 = 0; e0 < Dv; e0 += KS) {  // v G^T
      fill_slab<KS, true>(s1, [&](int kk, int m) {
        const int64_t e = e0 + kk;
        return (m < n && e < Dv) ? ld<acc_t>(vb + m * Dv + e) : acc_t(0);
      });
      fill_slab<KS, true>(s2, [&](int kk, int m) {
        const int64_t e = e0 + kk, d = t0 + m;
        return (e < Dv && d < D) ? Gs[d * Dv + e] : acc_t(0);
      });
      __syncthreads();
      mma_slab<KS>(acc, s1, s2, ty, tx);
      __syncthreads();
    }
    scalar_t* dkb = dk + (bh * p.Nk + j0) * D;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = ty + 16 * i;
      if (row >= n) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t d = t0 + tx + 16 * j;
        if (d < D)
          dkb[row * D + d] = static_cast<scalar_t>((acc[i][j] + Gz[d]) *
                                                   feature_grad<acc_t>(p.fmap, ld<acc_t>(kb + row * D + d)));
      }
    }
  } else {
    for (int64_t d0 = 0; d0 < D; d0 += KS) {  // fk G
      fill_slab<KS, true>(s1, [&](int kk, int m) {
        const int64_t d = d0 + kk;
        return (m < n && d < D) ? feature<acc_t>(p.fmap, ld<acc_t>(kb + m * D + d)) : acc_t(0);
      });
      fill_slab<KS, false>(s2, [&](int kk, int m) {
        const int64_t d = d0 + kk, e = t0 + m;
        return (d < D && e < Dv) ? Gs[d * Dv + e] : acc_t(0);
      });
      __syncthreads();
      mma_slab<KS>(acc, s1, s2, ty, tx);
      __syncthreads();
    }
    scalar_t* dvb = dv + (bh * p.Nk + j0) * Dv;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = ty + 16 * i;
      if (row >= n) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = t0 + tx + 16 * j;
        if (e < Dv) dvb[row * Dv + e] = static_cast<scalar_t>(acc[i][j]);
      }
    }
  }
}

// ---- the recurrence for T tokens. Block (b * Hkv + hk, 32 value columns): thread
// (ty < 8, tx < 32) owns state rows ty, ty + 8, ... of its column, kept in S_out.
// grid (B * Hkv, ceil(Dv / 32)), 256 threads, dynamic shared memory (2 D + 256) acc_t.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    step_kernel(LinParams p, int64_t T, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                const scalar_t* __restrict__ v, const acc_t* __restrict__ S0, const acc_t* __restrict__ z0,
                scalar_t* __restrict__ out, acc_t* __restrict__ S, acc_t* __restrict__ z) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* sF = reinterpret_cast<acc_t*>(smem_raw);  // phi(k_t), then scale * phi(q_t)
  acc_t* sZ = sF + p.D;
  acc_t* sRed = sZ + p.D;  // [8][32] partial numerators
  __shared__ acc_t sV[32], sDen[kThreads / 32];
  const int tid = threadIdx.x, ty = tid / 32, tx = tid % 32;
  const int64_t bh = blockIdx.x, b = bh / p.Hkv, hk = bh % p.Hkv;
  const int64_t D = p.D, Dv = p.Dv, e = int64_t(blockIdx.y) * 32 + tx;
  const bool col_ok = e < Dv;
  const acc_t scale = acc_t(p.scale);
  acc_t* Sb = S + bh * D * Dv;
  const acc_t* S0b = S0 + bh * D * Dv;
  if (col_ok)
    for (int64_t d = ty; d < D; d += 8) Sb[d * Dv + e] = S0b[d * Dv + e];
  for (int64_t d = tid; d < D; d += kThreads) sZ[d] = z0[bh * D + d];
  for (int64_t t = 0; t < T; ++t) {
    __syncthreads();
    const scalar_t* kt = k + ((b * p.Hkv + hk) * T + t) * D;
    for (int64_t d = tid; d < D; d += kThreads) sF[d] = feature<acc_t>(p.fmap, ld<acc_t>(kt + d));
    if (tid < 32) {
      const int64_t ev = int64_t(blockIdx.y) * 32 + tid;
      sV[tid] = ev < Dv ? ld<acc_t>(v + ((b * p.Hkv + hk) * T + t) * Dv + ev) : acc_t(0);
    }
    __syncthreads();
    if (col_ok)
      for (int64_t d = ty; d < D; d += 8) Sb[d * Dv + e] += sF[d] * sV[tx];
    for (int64_t d = tid; d < D; d += kThreads) sZ[d] += sF[d];
    for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
      __syncthreads();
      const scalar_t* qt = q + ((b * p.Hq + h) * T + t) * D;
      for (int64_t d = tid; d < D; d += kThreads) sF[d] = feature<acc_t>(p.fmap, ld<acc_t>(qt + d)) * scale;
      __syncthreads();
      acc_t part = 0;
      if (col_ok)
        for (int64_t d = ty; d < D; d += 8) part += sF[d] * Sb[d * Dv + e];
      sRed[ty * 32 + tx] = part;
      acc_t dpart = 0;
      for (int64_t d = tid; d < D; d += kThreads) dpart += sF[d] * sZ[d];
      for (int off = 16; off > 0; off /= 2) dpart += __shfl_down_sync(0xffffffffu, dpart, off);
      if (tx == 0) sDen[ty] = dpart;
      __syncthreads();
      if (ty == 0 && col_ok) {
        acc_t num = 0, den = 0;
        for (int g = 0; g < 8; ++g) num += sRed[g * 32 + tx];
        for (int g = 0; g < kThreads / 32; ++g) den += sDen[g];
        const acc_t o = p.normalize ? num / (den + acc_t(p.eps)) : num;
        out[((b * p.Hq + h) * T + t) * Dv + e] = static_cast<scalar_t>(o);
      }
    }
  }
  __syncthreads();
  if (blockIdx.y == 0)
    for (int64_t d = tid; d < D; d += kThreads) z[bh * D + d] = sZ[d];
}

}  // namespace attention_ext::cuda_linear

// ---- host-side launch helpers (current stream; callers hold a device guard) ----------
namespace attention_ext::cuda_linear {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_grid(int64_t y, const char* op) {
  TORCH_CHECK(y <= 65535, op, ": batch x heads = ", y, " exceeds the CUDA grid limit 65535");
}

// Chunk deltas of the keys into buf [BH][nck][E].
template <typename scalar_t, typename acc_t>
void launch_key_deltas(const LinParams& p, const scalar_t* k, const scalar_t* v, acc_t* buf, int64_t nck,
                       cudaStream_t stream) {
  const int64_t bh = p.B * p.Hkv;
  if (nck == 0 || bh == 0) return;
  const int tilesD = int(cdiv(p.D, kTile)), tilesE = int(cdiv(p.Dv, kTile));
  outer_kernel<scalar_t, acc_t, false><<<dim3(unsigned(nck), unsigned(bh), unsigned(tilesD * tilesE)), kThreads, 0,
                                         stream>>>(p, k, v, nullptr, nullptr, buf, nck, tilesE);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_scan(acc_t* buf, int64_t bh, int64_t nc, int64_t D, int64_t Dv, const acc_t* S0, const acc_t* z0,
                 acc_t* Sf, acc_t* zf, bool reverse, bool exclusive, cudaStream_t stream) {
  if (bh == 0) return;
  const int64_t E = D * Dv + D;
  scan_kernel<acc_t><<<dim3(unsigned(cdiv(E, 256)), unsigned(bh)), 256, 0, stream>>>(buf, nc, D, Dv, S0, z0, Sf, zf,
                                                                                     reverse, exclusive);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
inline const acc_t* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

}  // namespace attention_ext::cuda_linear
