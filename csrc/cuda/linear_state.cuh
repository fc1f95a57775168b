// Linear attention on CUDA: chunk deltas of the state (keys: fk^T v, colsum(fk); queries:
// the gradient deltas) and their scan over chunks (linear_device.cuh has the layout).
#pragma once

#include "linear_device.cuh"

namespace attention_ext::cuda::linear {

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

// ---- host-side launchers (current stream; callers hold a device guard)

// Chunk deltas into buf [BH][nc][E]: keys (x = k, y = v, den = dd = nullptr) or, with
// QUERY, the gradient deltas of the queries (x = q, y = dout; den, dd without
// normalisation nullptr).
template <typename scalar_t, typename acc_t, bool QUERY>
void launch_deltas(const LinParams& p, const scalar_t* x, const scalar_t* y, const acc_t* den, const acc_t* dd,
                   acc_t* buf, int64_t nc, cudaStream_t stream) {
  const int64_t bh = p.B * p.Hkv;
  if (nc == 0 || bh == 0) return;
  const int tilesD = int(cdiv(p.D, kTile)), tilesE = int(cdiv(p.Dv, kTile));
  outer_kernel<scalar_t, acc_t, QUERY><<<dim3(unsigned(nc), unsigned(bh), unsigned(tilesD * tilesE)), kThreads, 0,
                                         stream>>>(p, x, y, den, dd, buf, nc, tilesE);
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

}  // namespace attention_ext::cuda::linear
