// Linear attention on CUDA: the backward's per-row normalisers, dq and dk/dv tiles, read
// from the recomputed chunk states and the reverse-scanned gradient states (linear_state.cuh).
#pragma once

#include "linear_device.cuh"

namespace attention_ext::cuda::linear {

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

}  // namespace attention_ext::cuda::linear
