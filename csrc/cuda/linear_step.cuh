// Linear attention on CUDA: the recurrent step (decoding), token by token.
#pragma once

#include "linear_device.cuh"

namespace attention_ext::cuda::linear {

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

}  // namespace attention_ext::cuda::linear
