// SIMT attention kernels: the exact path for fp32 and fp64 (gradcheck), and the
// fallback for fp16/bf16 shapes the tensor-core kernels do not take (head dim > 256,
// or a device without enough shared memory). Also the backward preprocessing (lse2,
// delta) and the dQ conversion shared with the tensor-core path.
//
// One warp per query row (forward, dQ) or per key row (dK, dV): the head dim is split
// over the lanes (d = lane + 32 c), dot products are warp reductions, and the loop
// visits only the keys (queries) of the row's band, with the per-element mask test
// unless row_interval() gives the row's allowed keys as one run. Every sum runs in a
// fixed order and no atomics are used: results are deterministic. Dropout: the forward
// weights V by P o Z (Z = keep / (1 - p), dropout.cuh); the backward's dV takes P o Z and
// dS = P o (dP o Z - delta).
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attention_params.h"
#include "dropout.cuh"
#include "softcap.cuh"

namespace attention_ext::cuda {
namespace {

constexpr int kWarps = 8;  // warps per block

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, typename A>
__device__ __forceinline__ T store_val(A x) {
  if constexpr (std::is_same_v<A, double>) return x;
  else return from_acc<T>(x);
}

__device__ __forceinline__ float ex2(float x) { return exp2f(x); }
__device__ __forceinline__ double ex2(double x) { return exp2(x); }
__device__ __forceinline__ float lg2(float x) { return log2f(x); }
__device__ __forceinline__ double lg2(double x) { return log2(x); }

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ int64_t off4(const Strides4& s, int64_t b, int64_t h, int64_t n, int64_t d) {
  return b * s.s[0] + h * s.s[1] + n * s.s[2] + d * s.s[3];
}

// A running sum of N values per lane over many terms (dQ over keys, dK / dV over every
// query row of a GQA group) in three tiers: terms go into `lo`, every kBlock terms lo
// moves into mid, every kBlock^2 mid into hi. A single fp32 running sum over n terms
// errs like n * eps; this one like (2 kBlock + n / kBlock^2) * eps, for two more
// registers per value. The order is fixed, so results stay deterministic.
template <typename A, int N>
struct BlockedSum {
  static constexpr int kBlock = 64;
  A lo[N], mid[N], hi[N];
  int n_lo = 0, n_mid = 0;

  __device__ __forceinline__ BlockedSum() {
#pragma unroll
    for (int c = 0; c < N; ++c) lo[c] = mid[c] = hi[c] = A(0);
  }
  // call once after adding a term to lo[]
  __device__ __forceinline__ void tick() {
    // fp64 (the gradcheck path) needs no blocking; its mid / hi stay 0 and fold away,
    // which keeps the D > 128 kernels from spilling
    if constexpr (std::is_same_v<A, double>) return;
    if (++n_lo < kBlock) return;
    n_lo = 0;
#pragma unroll
    for (int c = 0; c < N; ++c) mid[c] += lo[c], lo[c] = A(0);
    if (++n_mid < kBlock) return;
    n_mid = 0;
#pragma unroll
    for (int c = 0; c < N; ++c) hi[c] += mid[c], mid[c] = A(0);
  }
  __device__ __forceinline__ A total(int c) const { return hi[c] + (mid[c] + lo[c]); }
};

// Keys row i may see: [*j0, *j1). True when every one of them is allowed (the row's mask
// is one run), so the loop needs no per-element test.
__device__ __forceinline__ bool row_keys(const MaskSpec& mask, int64_t i, int64_t* j0, int64_t* j1) {
  key_tile_range(mask, i, i + 1, 1, j0, j1);
  int64_t r0, r1;
  const bool interval = row_interval(mask, i, &r0, &r1);
  if (interval) *j0 = ae_max(*j0, r0), *j1 = ae_min(*j1, r1);
  return interval;
}

template <typename T, typename A, int NPER>
__global__ void __launch_bounds__(32 * kWarps) simt_fwd_kernel(const SimtFwdParams p) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (w >= p.B * p.Hq * p.Nq) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const int64_t i = w % p.Nq, bh = w / p.Nq, h = bh % p.Hq, b = bh / p.Hq, hk = h / (p.Hq / p.Hkv);
  const MaskSpec& mask = p.mask;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const A c2 = A(p.scale) * A(1.4426950408889634);
  const A cap2 = A(p.softcap) * A(1.4426950408889634);  // base-2 units, 0 = off
  const A slope2 = alibi_slope<A>(p.mods, b, h) * A(1.4426950408889634);  // ALiBi in base 2, 0 = off

  A qr[NPER], o[NPER];
#pragma unroll
  for (int c = 0; c < NPER; ++c) {
    const int64_t d = lane + 32 * c;
    qr[c] = d < p.Dqk ? to_acc(q[off4(p.qs, b, h, i, d)]) * c2 : A(0);
    o[c] = A(0);
  }
  int64_t j0, j1;
  const bool interval = row_keys(mask, i, &j0, &j1);
  const DropoutDev drop(p.dropout);
  DropoutRowWalk<A> zw(drop, dropout_bh(p.dropout, p.Hq, b, h), i);

  A m = -INFINITY, l = A(0);
  for (int64_t j = j0; j < j1; ++j) {
    if (!interval && !allowed(mask, b, h, i, j)) continue;
    A s = A(0);
#pragma unroll
    for (int c = 0; c < NPER; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < p.Dqk) s += qr[c] * to_acc(k[off4(p.ks, b, hk, j, d)]);
    }
    s = warp_sum(s);
    if (cap2 > A(0)) s = cap2 * softcap_tanh(s / cap2);
    s += alibi_bias(slope2, i + mask.offset, j);  // after the softcap (score_mods.h)
    const A m_new = s > m ? s : m;  // s is finite, so m_new is
    const A alpha = ex2(m - m_new);  // 0 while m is -inf
    const A pj = ex2(s - m_new);
    l = l * alpha + pj;
    const A pz = drop.on() ? pj * zw.factor(j) : pj;  // the row sum counts every key, O the kept ones
#pragma unroll
    for (int c = 0; c < NPER; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < p.Dv) o[c] = o[c] * alpha + pz * to_acc(v[off4(p.vs, b, hk, j, d)]);
    }
    m = m_new;
  }
  const A alpha = p.mods.sinks ? fold_sink(sink_logit<A>(p.mods, h) * A(1.4426950408889634), m, l) : A(1);
  const bool none = l == A(0);
  const A inv = none ? A(0) : alpha / l;
  T* out = static_cast<T*>(p.out) + w * p.Dv;
#pragma unroll
  for (int c = 0; c < NPER; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < p.Dv) out[d] = store_val<T>(o[c] * inv);
  }
  if (lane == 0) static_cast<A*>(p.lse)[w] = none ? A(-INFINITY) : (m + lg2(l)) * A(0.6931471805599453);
}

template <typename T, typename A, int NPER>
__global__ void __launch_bounds__(32 * kWarps) simt_bwd_dq_kernel(const SimtBwdParams p) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (w >= p.B * p.Hq * p.Nq) return;
  const int lane = threadIdx.x & 31;
  const int64_t i = w % p.Nq, bh = w / p.Nq, h = bh % p.Hq, b = bh / p.Hq, hk = h / (p.Hq / p.Hkv);
  const MaskSpec& mask = p.mask;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  const A c2 = A(p.scale) * A(1.4426950408889634);
  const A cap2 = A(p.softcap) * A(1.4426950408889634), s_cap = p.softcap > 0 ? A(p.scale / p.softcap) : A(0);
  const A l2 = static_cast<const A*>(p.lse2)[bh * p.nq_pad + i];
  const A dl = static_cast<const A*>(p.delta)[bh * p.nq_pad + i];
  const A slope2 = alibi_slope<A>(p.mods, b, h) * A(1.4426950408889634);

  A qr[NPER], dor[NPER];
  BlockedSum<A, NPER> acc;
#pragma unroll
  for (int c = 0; c < NPER; ++c) {
    const int64_t d = lane + 32 * c;
    qr[c] = d < p.Dqk ? to_acc(q[off4(p.qs, b, h, i, d)]) : A(0);
    dor[c] = d < p.Dv ? to_acc(dout[off4(p.dos, b, h, i, d)]) : A(0);
  }
  int64_t j0, j1;
  const bool interval = row_keys(mask, i, &j0, &j1);
  if (l2 == A(INFINITY)) j1 = j0;  // the row saw no key: all of its P are 0
  const DropoutDev drop(p.dropout);
  DropoutRowWalk<A> zw(drop, dropout_bh(p.dropout, p.Hq, b, h), i);

  for (int64_t j = j0; j < j1; ++j) {
    if (!interval && !allowed(mask, b, h, i, j)) continue;
    A s = A(0), dp = A(0);
#pragma unroll
    for (int c = 0; c < NPER; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < p.Dqk) s += qr[c] * to_acc(k[off4(p.ks, b, hk, j, d)]);
      if (d < p.Dv) dp += dor[c] * to_acc(v[off4(p.vs, b, hk, j, d)]);
    }
    s = warp_sum(s);
    dp = warp_sum(dp);
    if (drop.on()) dp *= zw.factor(j);
    A ds;
    const A bias = alibi_bias(slope2, i + mask.offset, j);
    if (p.softcap > 0) {  // P = exp2(cap2 t + alibi - lse2), t = tanh(scale s / softcap); d(cap t)/d(scale s) = 1 - t^2
      const A t = softcap_tanh(s * s_cap);
      ds = ex2(cap2 * t + bias - l2) * (dp - dl) * (A(1) - t * t);
    } else {
      ds = ex2(s * c2 + bias - l2) * (dp - dl);
    }
#pragma unroll
    for (int c = 0; c < NPER; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < p.Dqk) acc.lo[c] += ds * to_acc(k[off4(p.ks, b, hk, j, d)]);
    }
    acc.tick();
  }
  T* dq = static_cast<T*>(p.dq) + w * p.Dqk;
#pragma unroll
  for (int c = 0; c < NPER; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < p.Dqk) dq[d] = store_val<T>(acc.total(c) * A(p.scale));
  }
}

template <typename T, typename A, int NPER>
__global__ void __launch_bounds__(32 * kWarps) simt_bwd_dkdv_kernel(const SimtBwdParams p) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (w >= p.B * p.Hkv * p.Nk) return;
  const int lane = threadIdx.x & 31;
  const int64_t j = w % p.Nk, bhk = w / p.Nk, hk = bhk % p.Hkv, b = bhk / p.Hkv;
  const int64_t group = p.Hq / p.Hkv;
  const MaskSpec& mask = p.mask;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  const A* lse2 = static_cast<const A*>(p.lse2);
  const A* delta = static_cast<const A*>(p.delta);
  const A c2 = A(p.scale) * A(1.4426950408889634);
  const A cap2 = A(p.softcap) * A(1.4426950408889634), s_cap = p.softcap > 0 ? A(p.scale / p.softcap) : A(0);

  A kr[NPER], vr[NPER];
  BlockedSum<A, 2 * NPER> dkv;  // dK in [0, NPER), dV in [NPER, 2 NPER), over the group's query rows
#pragma unroll
  for (int c = 0; c < NPER; ++c) {
    const int64_t d = lane + 32 * c;
    kr[c] = d < p.Dqk ? to_acc(k[off4(p.ks, b, hk, j, d)]) : A(0);
    vr[c] = d < p.Dv ? to_acc(v[off4(p.vs, b, hk, j, d)]) : A(0);
  }
  int64_t i0, i1;
  query_tile_range(mask, j, j + 1, 1, &i0, &i1);  // tiles of one query: the rows that may see key j
  const DropoutDev drop(p.dropout);
  DropoutColWalk<A> zw(drop, j);

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = b * p.Hq + h;
    const A slope2 = alibi_slope<A>(p.mods, b, h) * A(1.4426950408889634);
    zw.reset(dropout_bh(p.dropout, p.Hq, b, h));
    for (int64_t i = i0; i < i1; ++i) {
      const A l2 = lse2[bh * p.nq_pad + i];
      if (l2 == A(INFINITY) || !allowed(mask, b, h, i, j)) continue;
      const A dl = delta[bh * p.nq_pad + i];
      A qv[NPER], dov[NPER];
      A s = A(0), dp = A(0);
#pragma unroll
      for (int c = 0; c < NPER; ++c) {
        const int64_t d = lane + 32 * c;
        qv[c] = d < p.Dqk ? to_acc(q[off4(p.qs, b, h, i, d)]) : A(0);
        dov[c] = d < p.Dv ? to_acc(dout[off4(p.dos, b, h, i, d)]) : A(0);
        s += qv[c] * kr[c];
        dp += dov[c] * vr[c];
      }
      s = warp_sum(s);
      dp = warp_sum(dp);
      const A z = drop.on() ? zw.factor(i) : A(1);
      dp *= z;
      A pij, ds;
      const A bias = alibi_bias(slope2, i + mask.offset, j);
      if (p.softcap > 0) {
        const A t = softcap_tanh(s * s_cap);
        pij = ex2(cap2 * t + bias - l2);
        ds = pij * (dp - dl) * (A(1) - t * t);
      } else {
        pij = ex2(s * c2 + bias - l2);
        ds = pij * (dp - dl);
      }
#pragma unroll
      for (int c = 0; c < NPER; ++c) {
        dkv.lo[c] += ds * qv[c];
        dkv.lo[NPER + c] += pij * z * dov[c];
      }
      dkv.tick();
    }
  }
  T* dko = static_cast<T*>(p.dk) + w * p.Dqk;
  T* dvo = static_cast<T*>(p.dv) + w * p.Dv;
#pragma unroll
  for (int c = 0; c < NPER; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < p.Dqk) dko[d] = store_val<T>(dkv.total(c) * A(p.scale));
    if (d < p.Dv) dvo[d] = store_val<T>(dkv.total(NPER + c));
  }
}

// One warp per (b, h, row) of the padded row range.
template <typename T, typename A>
__global__ void __launch_bounds__(32 * kWarps) bwd_prep_kernel(const BwdPrepParams p) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (w >= p.B * p.Hq * p.nq_pad) return;
  const int lane = threadIdx.x & 31;
  const int64_t r = w % p.nq_pad, bh = w / p.nq_pad, h = bh % p.Hq, b = bh / p.Hq;
  A* lse2 = static_cast<A*>(p.lse2);
  A* delta = static_cast<A*>(p.delta);
  if (r >= p.Nq) {  // padding rows: P = 0, dS = 0
    if (lane == 0) lse2[w] = A(INFINITY), delta[w] = A(0);
    return;
  }
  const T* o = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  A acc = A(0);
  for (int64_t d = lane; d < p.Dv; d += 32) acc += to_acc(o[off4(p.os, b, h, r, d)]) * to_acc(dout[off4(p.dos, b, h, r, d)]);
  acc = warp_sum(acc);
  if (lane == 0) {
    const int64_t src = bh * p.Nq + r;
    const A l = static_cast<const A*>(p.lse)[src];
    // a row that saw no key (lse = -inf): +inf makes every P of the row exactly 0
    lse2[w] = l == A(-INFINITY) ? A(INFINITY) : l * A(1.4426950408889634);
    delta[w] = p.grad_lse ? acc - static_cast<const A*>(p.grad_lse)[src] : acc;
  }
}

template <typename T>
__global__ void dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dq[i] = from_acc<T>(acc[i] * scale);
}

unsigned warp_blocks(int64_t warps) { return static_cast<unsigned>((warps + kWarps - 1) / kWarps); }

template <typename T, typename A, int NPER>
void simt_fwd(const SimtFwdParams& p, cudaStream_t stream) {
  simt_fwd_kernel<T, A, NPER><<<warp_blocks(p.B * p.Hq * p.Nq), 32 * kWarps, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A, int NPER>
void simt_bwd(const SimtBwdParams& p, cudaStream_t stream) {
  simt_bwd_dq_kernel<T, A, NPER><<<warp_blocks(p.B * p.Hq * p.Nq), 32 * kWarps, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  simt_bwd_dkdv_kernel<T, A, NPER><<<warp_blocks(p.B * p.Hkv * p.Nk), 32 * kWarps, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A>
void simt_fwd_any(const SimtFwdParams& p, cudaStream_t stream) {
  if (p.Dqk <= 128 && p.Dv <= 128) simt_fwd<T, A, 4>(p, stream);
  else simt_fwd<T, A, 16>(p, stream);
}

template <typename T, typename A>
void simt_bwd_any(const SimtBwdParams& p, cudaStream_t stream) {
  if (p.Dqk <= 128 && p.Dv <= 128) simt_bwd<T, A, 4>(p, stream);
  else simt_bwd<T, A, 16>(p, stream);
}

template <typename T, typename A>
void bwd_prep(const BwdPrepParams& p, cudaStream_t stream) {
  bwd_prep_kernel<T, A><<<warp_blocks(p.B * p.Hq * p.nq_pad), 32 * kWarps, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_simt_fwd(DType dtype, const SimtFwdParams& p, cudaStream_t stream) {
  type_switch(dtype, [&](auto t, auto a) { simt_fwd_any<decltype(t), decltype(a)>(p, stream); });
}

void launch_simt_bwd(DType dtype, const SimtBwdParams& p, cudaStream_t stream) {
  type_switch(dtype, [&](auto t, auto a) { simt_bwd_any<decltype(t), decltype(a)>(p, stream); });
}

void launch_bwd_prep(DType dtype, const BwdPrepParams& p, cudaStream_t stream) {
  type_switch(dtype, [&](auto t, auto a) { bwd_prep<decltype(t), decltype(a)>(p, stream); });
}

void launch_dq_convert(DType dtype, const float* dq_accum, void* dq, int64_t n, float scale, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65536));
  tc_type_switch(dtype, [&](auto t) {
    using T = decltype(t);
    dq_convert_kernel<T><<<blocks, threads, 0, stream>>>(dq_accum, static_cast<T*>(dq), n, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attention_ext::cuda
