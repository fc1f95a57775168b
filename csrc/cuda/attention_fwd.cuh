// FlashAttention-2 forward on tensor cores (fp16/bf16 in, fp32 accumulation and
// softmax statistics), for the whole mask family of csrc/common/mask.h.
//
// One block = one (batch, query head, query tile of BM = 16 * MW * NWARPS rows); warp w
// owns rows [16 MW w, 16 MW (w + 1)) of the tile, so the softmax statistics of a row live
// in the 4 lanes that hold it and no cross-warp reduction is needed. The block walks the key
// tiles (BN keys) of the band key_band() gives (every tile when there are global
// tokens), skipping those classify() calls Empty. Shared memory holds Q (BM x D), one
// K tile and one V tile (BN x D each): the V load of tile j overlaps S = Q K^T and the
// softmax of tile j, the K load of tile j+1 overlaps O += P V of tile j (FA2's scheme).
#pragma once

#include <c10/cuda/CUDAException.h>

#include "attention_device.cuh"
#include "attention_launch.cuh"
#include "attention_params.h"
#include "dropout.cuh"
#include "softcap.cuh"

namespace attention_ext::cuda {

// DROP: dropout on (a separate instantiation, so that the kernel without it keeps its registers)
template <typename T, int D, bool DROP>
__global__ void __launch_bounds__(FwdCfg<D>::NTHREADS) tc_fwd_kernel(const TcFwdParams p) {
  using Cfg = FwdCfg<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, NT = Cfg::NTHREADS, MW = Cfg::MW;
  constexpr int SN = BN / 8;  // n-tiles of S
  constexpr int ON = D / 8;   // n-tiles of O
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;
  __shared__ __align__(16) unsigned char smask_raw[sizeof(MaskSpec)];  // MaskSpec is trivially copyable
  __shared__ SchedShared sched;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  // The mask spec is read from shared memory: the barriers of the loop then keep the
  // compiler from hoisting its fields into registers for the whole loop.
  if (tid == 0) *reinterpret_cast<MaskSpec*>(smask_raw) = p.mask;

  // Heavy query tiles of a head are scheduled first: the late ones under causal masks, the
  // first ones (Longformer's leading global rows, which see every key) under global masks.
  const int64_t nqt = ae_cdiv(p.Nq, BM);
  const int64_t bh = blockIdx.x / nqt;
  const int64_t qt = has_global(p.mask) ? blockIdx.x % nqt : nqt - 1 - blockIdx.x % nqt;
  const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hkv);
  const int64_t q0 = qt * BM;
  const int mq = static_cast<int>(ae_min(BM, p.Nq - q0));

  const T* qg = static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs + q0 * p.q_rs;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs;
  load_tile<BM, D, NT>(sQ, qg, p.q_rs, mq, p.dqk);
  cp_async_commit();
  __syncthreads();  // smask
  const MaskSpec& mask = *reinterpret_cast<const MaskSpec*>(smask_raw);

  const float slope2 = alibi_slope<float>(p.mods, b, h) * 1.4426950408889634f;  // base 2, 0 = off
  const DropoutDev drop(p.dropout);
  const uint32_t drop_bh = dropout_bh(p.dropout, p.Hq, b, h);
  int64_t kt_begin, kt_end;
  key_tile_range(mask, q0, q0 + mq, BN, &kt_begin, &kt_end);
  auto tile_class = [&](int64_t kt) {
    const int64_t k0 = kt * BN;
    return classify(mask, b, h, q0, q0 + mq, k0, ae_min(k0 + BN, p.Nk));
  };
  auto load_k = [&](int64_t kt) {
    const int64_t k0 = kt * BN;
    load_tile<BN, D, NT>(sK, kg + k0 * p.k_rs, p.k_rs, static_cast<int>(ae_min(BN, p.Nk - k0)), p.dqk);
    cp_async_commit();
  };

  // this lane's rows: r(m, rr) = warp * 16 * MW + 16 m + g + 8 rr
  float acc_o[MW][ON][4];
#pragma unroll
  for (int m = 0; m < MW; ++m) zero_acc(acc_o[m]);
  float m_run[MW][2], l_run[MW][2];  // running max of base-2 scores; this lane's part of the running sum
#pragma unroll
  for (int m = 0; m < MW; ++m) m_run[m][0] = m_run[m][1] = -INFINITY, l_run[m][0] = l_run[m][1] = 0.f;
  const int64_t row0 = q0 + warp * 16 * MW + g;  // row of (m = 0, rr = 0)

  int64_t pos = kt_begin;
  int n = sched_fill(sched, pos, kt_end, tile_class);
  if (n > 0) load_k(sched_index(sched.list[0]));
  while (n > 0) {
#pragma unroll 1
    for (int idx = 0; idx < n; ++idx) {
      const int32_t entry = sched.list[idx];
      const int64_t kt = sched_index(entry);
      const int cls = sched_class(entry);
      const int64_t nxt = idx + 1 < n ? sched_index(sched.list[idx + 1]) : -1;
      const int64_t k0 = kt * BN;
      const int nk = static_cast<int>(ae_min(BN, p.Nk - k0));

      cp_async_wait_all();
      __syncthreads();  // K tile (and Q) landed; every warp is done with the previous V tile
      load_tile<BN, D, NT>(sV, vg + k0 * p.v_rs, p.v_rs, nk, p.dv);
      cp_async_commit();

      const bool need_mask = cls == kPartial || k0 + BN > p.Nk || q0 + BM > p.Nq;
      uint32_t keep[MW];
#pragma unroll
      for (int m = 0; m < MW; ++m)
        keep[m] = need_mask ? keep_rows<SN>(mask, b, h, row0 + 16 * m, k0 + 2 * t, cls == kPartial) : 0u;
      uint32_t kept[MW];  // dropout: the elements of P that reach O
#pragma unroll
      for (int m = 0; m < MW; ++m) kept[m] = DROP ? dropout_bits_rows<SN>(drop, drop_bh, row0 + 16 * m, k0 + 2 * t) : 0u;

      float s[MW][SN][4];
#pragma unroll
      for (int m = 0; m < MW; ++m) zero_acc(s[m]);
      gemm_abt_mw<T, MW, SN, D>(s, sQ, warp * 16 * MW, sK, 0, p.dqk);

      uint32_t pa[MW][BN / 16][4];
#pragma unroll
      for (int m = 0; m < MW; ++m) {
        // base-2 scores; scale before masking so that a negative scale cannot turn -inf into +inf
#pragma unroll
        for (int nt = 0; nt < SN; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[m][nt][e] *= p.scale_log2;
        if (p.softcap_log2 > 0.f) {  // softcap before masking: tanh would turn -inf into -cap
          const float inv = 1.f / p.softcap_log2;
#pragma unroll
          for (int nt = 0; nt < SN; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[m][nt][e] = p.softcap_log2 * softcap_tanh(s[m][nt][e] * inv);
        }
        if (slope2 != 0.f) {  // ALiBi after the softcap (score_mods.h); rows g + 8 (e >> 1), keys 2t + (e & 1)
#pragma unroll
          for (int nt = 0; nt < SN; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              s[m][nt][e] += alibi_bias(slope2, row0 + 16 * m + 8 * (e >> 1) + mask.offset, k0 + nt * 8 + 2 * t + (e & 1));
        }
        if (need_mask) apply_keep(s[m], keep[m], -INFINITY);

        // online softmax, rows g (e = 0, 1) and g + 8 (e = 2, 3) of atom m
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < SN; ++nt) mx = fmaxf(mx, fmaxf(s[m][nt][2 * rr], s[m][nt][2 * rr + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m_run[m][rr], mx);
          // a row that has seen nothing yet keeps m = -inf; subtract a finite 0 instead
          // (exp2(-inf - 0) = 0) so that no -inf - -inf = NaN appears
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = exp2f(m_run[m][rr] - m_use);
          m_run[m][rr] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < SN; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float pv = exp2f(s[m][nt][2 * rr + e] - m_use);
              s[m][nt][2 * rr + e] = pv;
              sum += pv;
            }
          l_run[m][rr] = l_run[m][rr] * alpha + sum;
#pragma unroll
          for (int dt = 0; dt < ON; ++dt) {
            acc_o[m][dt][2 * rr] *= alpha;
            acc_o[m][dt][2 * rr + 1] *= alpha;
          }
        }
        // after the row sum: dropout acts on the normalised probabilities (its 1 / (1 - p) in the epilogue)
        if (DROP) apply_keep(s[m], kept[m], 0.f);
        acc_to_a<T, BN / 16>(pa[m], s[m]);
      }

      cp_async_wait_all();
      __syncthreads();  // V tile landed; every warp is done reading this K tile
      if (nxt >= 0) load_k(nxt);
      gemm_rb_mw<T, MW, ON, BN / 16, D>(acc_o, pa, sV, 0, 0, p.dv);
    }
    // every thread is past the last barrier of the chunk: the list can be refilled
    n = sched_fill(sched, pos, kt_end, tile_class);
    if (n > 0) load_k(sched_index(sched.list[0]));
  }
  cp_async_wait_all();  // the Q load when no key tile was visited

  // Epilogue: O / l and lse (with the sink folded in); rows that saw no key (l == 0) get 0
  // and -inf (the sink's logit with sinks).
#pragma unroll
  for (int m = 0; m < MW; ++m)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float l = l_run[m][rr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int64_t i = row0 + 16 * m + 8 * rr;
      if (i >= p.Nq) continue;
      float mr = m_run[m][rr];
      const float alpha = p.mods.sinks ? fold_sink(sink_logit<float>(p.mods, h) * 1.4426950408889634f, mr, l) : 1.f;
      const bool none = l == 0.f;
      const float inv = none ? 0.f : (DROP ? alpha / l * drop.scale : alpha / l);
      T* orow = static_cast<T*>(p.out) + (bh * p.Nq + i) * p.out_rs;
#pragma unroll
      for (int dt = 0; dt < ON; ++dt) {
        const int c = dt * 8 + 2 * t;
        if (dt * 8 < p.dv)
          *reinterpret_cast<uint32_t*>(orow + c) =
              MmaOp<T>::pack(acc_o[m][dt][2 * rr] * inv, acc_o[m][dt][2 * rr + 1] * inv);
      }
      if (t == 0) p.lse[bh * p.Nq + i] = none ? -INFINITY : (mr + log2f(l)) * kLn2;
    }
}

template <typename T, int D>
void launch_tc_fwd(const TcFwdParams& p, cudaStream_t stream) {
  using Cfg = FwdCfg<D>;
  launch_tiles(p.dropout.on() ? tc_fwd_kernel<T, D, true> : tc_fwd_kernel<T, D, false>, p, p.B * p.Hq, p.Nq, Cfg::BM,
               Cfg::NTHREADS, int(Cfg::SMEM), stream);
}

}  // namespace attention_ext::cuda
