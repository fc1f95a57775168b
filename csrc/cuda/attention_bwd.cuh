// FlashAttention-2 backward on tensor cores (fp16/bf16 in, fp32 accumulation).
//
// Kernel 1 (dK, dV, optionally dQ by atomics): one block = one (batch, KV head, key
// tile of BN keys). It keeps its K and V tiles in shared memory and dK / dV in
// registers, and walks every (query head of the GQA group, query tile) pair that
// query_band() and classify() leave, recomputing P from the saved logsumexp:
//   S^T = K Q^T, P^T = exp2(S^T * scale * log2e - lse2), dV += P^T dO,
//   dP^T = V dO^T, dS^T = P^T o (dP^T - delta), dK += dS^T Q,
//   dQ += dS K   (dS^T goes through shared memory; fp32 atomicAdd into dq_accum).
// Tiles are transposed (rows = keys) so that warp w owns keys [16 kg, 16 kg + 16) of
// the tile (kg = w / WK) and its dK / dV rows never leave its registers.
//
// Kernel 2 (deterministic dQ, no atomics): one block = one (batch, query head, query
// tile), walking its key tiles like the forward pass:
//   S = Q K^T, P = exp2(S * scale * log2e - lse2), dP = dO V^T, dS = P o (dP - delta),
//   dQ += dS K.
// With a softcap, S * scale becomes softcap * tanh(S * scale / softcap) in P, and dS takes
// the factor 1 - tanh^2. ALiBi (score_mods.h) adds its bias to the exponent after the cap;
// the sinks' gradient is the op body's (attention_op.h). Dropout (dropout.cuh): the forward
// used P o Z (Z = keep / (1 - p)), so dV takes P o Z and dS = P o (dP o Z - delta).
#pragma once

#include <c10/cuda/CUDAException.h>

#include "attention_device.cuh"
#include "attention_launch.cuh"
#include "attention_params.h"
#include "dropout.cuh"
#include "softcap.cuh"

namespace attention_ext::cuda {

// DROP: dropout on (a separate instantiation, so that the kernels without it keep their registers)
template <typename T, int D, bool DROP>
__global__ void __launch_bounds__(BwdCfg<D>::NTHREADS) tc_bwd_dkdv_kernel(const TcBwdParams p) {
  using Cfg = BwdCfg<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, NT = Cfg::NTHREADS, WK = Cfg::WK, STAGES = Cfg::STAGES;
  constexpr int NWARPS = Cfg::NWARPS;
  constexpr int DC = D / WK;       // dK / dV columns per warp
  constexpr int SN = BM / 8;       // n-tiles of S^T (query columns)
  constexpr int MT = BM / 16;      // 16-row query tiles of the dQ product
  constexpr int QP = NWARPS / MT;  // warps sharing one of them
  // The QP warps of a query tile split the dQ columns when each part stays a whole
  // number of 8-chunk swizzle groups (what LaneOffsets needs), else they split the keys
  // (and both add their partial sums atomically).
  constexpr bool SPLIT_COLS = (D / QP) % 64 == 0;
  constexpr int DQ = SPLIT_COLS ? D / QP : D;    // dQ columns per warp
  constexpr int KQ = SPLIT_COLS ? BN : BN / QP;  // keys per warp in the dQ product
  static_assert(NWARPS % MT == 0 && KQ % 16 == 0 && DC % 64 == 0, "bad backward tiling");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;             // STAGES x BM x D
  T* sdO = sQ + STAGES * BM * D;   // STAGES x BM x D
  T* sdS = sdO + STAGES * BM * D;  // BN x BM, dS^T
  float* sL = reinterpret_cast<float*>(sdS + BN * BM);  // STAGES x BM
  float* sDl = sL + STAGES * BM;                          // STAGES x BM
  __shared__ __align__(16) unsigned char smask_raw[sizeof(MaskSpec)];  // MaskSpec is trivially copyable
  __shared__ SchedShared sched;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kg = warp / WK, cpart = warp % WK;
  if (tid == 0) *reinterpret_cast<MaskSpec*>(smask_raw) = p.mask;

  const int64_t nkt = ae_cdiv(p.Nk, BN);
  const int64_t bhk = blockIdx.x / nkt;
  const int64_t kt = blockIdx.x % nkt;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int64_t group = p.Hq / p.Hkv, h0 = hk * group;
  const int64_t k0 = kt * BN;
  const int nk = static_cast<int>(ae_min(BN, p.Nk - k0));

  load_tile<BN, D, NT>(sK, static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs + k0 * p.k_rs, p.k_rs, nk, p.dqk);
  load_tile<BN, D, NT>(sV, static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs + k0 * p.v_rs, p.v_rs, nk, p.dv);
  cp_async_commit();
  __syncthreads();  // smask
  const MaskSpec& mask = *reinterpret_cast<const MaskSpec*>(smask_raw);

  int64_t qt_begin, qt_end;
  query_tile_range(mask, k0, k0 + nk, BM, &qt_begin, &qt_end);
  // Work items: it = (h - h0) * nqr + (qt - qt_begin), for every query head of the group.
  const int64_t nqr = qt_end - qt_begin;
  const int64_t total = group * nqr;
  auto item_h = [&](int64_t it) { return h0 + it / nqr; };
  auto item_q0 = [&](int64_t it) { return (qt_begin + it % nqr) * BM; };
  auto item_class = [&](int64_t it) {
    const int64_t q0 = item_q0(it);
    return classify(mask, b, item_h(it), q0, ae_min(q0 + BM, p.Nq), k0, k0 + nk);
  };
  auto load_q_side = [&](int64_t it, int stage) {
    const int64_t h = item_h(it), q0 = item_q0(it);
    const int mq = static_cast<int>(ae_min(BM, p.Nq - q0));
    const int64_t bh = b * p.Hq + h;
    load_tile<BM, D, NT>(sQ + stage * BM * D, static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs + q0 * p.q_rs,
                         p.q_rs, mq, p.dqk);
    load_tile<BM, D, NT>(sdO + stage * BM * D,
                         static_cast<const T*>(p.dout) + b * p.do_bs + h * p.do_hs + q0 * p.do_rs, p.do_rs, mq, p.dv);
    // padded to nq_pad rows (+inf / 0 past Nq), so whole BM-row chunks are in bounds
    load_floats<BM, NT>(sL + stage * BM, p.lse2 + bh * p.nq_pad + q0);
    load_floats<BM, NT>(sDl + stage * BM, p.delta + bh * p.nq_pad + q0);
    cp_async_commit();
  };

  float acc_dk[DC / 8][4], acc_dv[DC / 8][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);
  const bool with_dq = p.dq_accum != nullptr;
  const DropoutDev drop(p.dropout);
  int stage = 0;

  int64_t pos = 0;
  int n = sched_fill(sched, pos, total, item_class);
  if (n > 0) load_q_side(sched_index(sched.list[0]), stage);
  while (n > 0) {
#pragma unroll 1
    for (int idx = 0; idx < n; ++idx) {
      const int32_t entry = sched.list[idx];
      const int64_t it = sched_index(entry);
      const int cls = sched_class(entry);
      const int64_t nxt = idx + 1 < n ? sched_index(sched.list[idx + 1]) : -1;
      const int64_t h = item_h(it), q0 = item_q0(it);

      cp_async_wait_all();
      // This stage's Q, dO, lse2, delta (and K, V) landed; every warp is done with the
      // previous step (its reads of the other stage and of sdS).
      __syncthreads();
      if (STAGES == 2 && nxt >= 0) load_q_side(nxt, stage ^ 1);
      const T* cQ = sQ + stage * BM * D;
      const T* cdO = sdO + stage * BM * D;
      const float* cL = sL + stage * BM;
      const float* cDl = sDl + stage * BM;
      const bool need_mask = cls == kPartial || k0 + BN > p.Nk || q0 + BM > p.Nq;
      const uint32_t keep = need_mask ? keep_cols<SN>(mask, b, h, k0 + kg * 16 + g, q0 + 2 * t, cls == kPartial) : 0u;
      const uint32_t kept = DROP ? dropout_bits_cols<SN>(drop, dropout_bh(p.dropout, p.Hq, b, h), k0 + kg * 16 + g,
                                                              q0 + 2 * t)
                                      : 0u;

      // the forward's ALiBi (base 2) of entry (nt, e): key row kg * 16 + g + 8 (e >> 1), query 2t + (e & 1)
      const float slope2 = alibi_slope<float>(p.mods, b, h) * 1.4426950408889634f;
      auto bias = [&](int nt, int e) {
        return slope2 == 0.f ? 0.f
                             : alibi_bias(slope2, q0 + nt * 8 + 2 * t + (e & 1) + mask.offset,
                                          k0 + kg * 16 + g + 8 * (e >> 1));
      };
      // P^T (this warp's 16 keys x BM queries)
      float st[SN][4];
      zero_acc(st);
      gemm_abt<T, SN, D>(st, sK, kg * 16, cQ, 0, p.dqk);
      if (p.softcap_log2 > 0.f) {
#pragma unroll
        for (int nt = 0; nt < SN; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            st[nt][e] = exp2f(p.softcap_log2 * softcap_tanh(st[nt][e] * p.scale_over_cap) + bias(nt, e) -
                              cL[nt * 8 + 2 * t + (e & 1)]);
      } else {
#pragma unroll
        for (int nt = 0; nt < SN; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            st[nt][e] = exp2f(st[nt][e] * p.scale_log2 + bias(nt, e) - cL[nt * 8 + 2 * t + (e & 1)]);
      }
      // masked entries may have overflowed above; they are replaced by exact zeros
      if (need_mask) apply_keep(st, keep, 0.f);

      {  // dV += P^T dO (P o Z: the dropped elements here, 1 / (1 - p) on dV at the end)
        uint32_t pa[BM / 16][4];
        if constexpr (DROP) acc_to_a_kept<T, BM / 16>(pa, st, kept);
        else acc_to_a<T, BM / 16>(pa, st);
        gemm_rb<T, DC / 8, BM / 16, D>(acc_dv, pa, cdO, 0, cpart * (DC / 8), p.dv);
      }
      if (p.softcap_log2 > 0.f) {
        // dS takes the cap's derivative 1 - tanh^2; tanh is recovered from P (log2 P + lse2 -
        // alibi = softcap_log2 * tanh) rather than kept in registers. P = 0 (masked, underflow) stays 0.
#pragma unroll
        for (int nt = 0; nt < SN; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float th = (log2f(st[nt][e]) + cL[nt * 8 + 2 * t + (e & 1)] - bias(nt, e)) / p.softcap_log2;
            st[nt][e] = st[nt][e] > 0.f ? st[nt][e] * (1.f - th * th) : 0.f;
          }
      }

      // dS^T = P^T o (dP^T - delta), dP^T = V dO^T
      float ds[SN][4];
      zero_acc(ds);
      gemm_abt<T, SN, D>(ds, sV, kg * 16, cdO, 0, p.dv);
#pragma unroll
      for (int nt = 0; nt < SN; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float dp = DROP ? ((kept >> (4 * nt + e)) & 1u ? ds[nt][e] * drop.scale : 0.f) : ds[nt][e];
          ds[nt][e] = st[nt][e] * (dp - cDl[nt * 8 + 2 * t + (e & 1)]);
        }

      uint32_t da[BM / 16][4];
      acc_to_a<T, BM / 16>(da, ds);
      gemm_rb<T, DC / 8, BM / 16, D>(acc_dk, da, cQ, 0, cpart * (DC / 8), p.dqk);  // dK += dS^T Q

      if (with_dq && cpart == 0) {  // both warps of a key group hold the same dS^T
        const int r0 = kg * 16 + g;
#pragma unroll
        for (int ks = 0; ks < BM / 16; ++ks) {
          *reinterpret_cast<uint32_t*>(sdS + swz<BM>(r0, 2 * ks) + 2 * t) = da[ks][0];
          *reinterpret_cast<uint32_t*>(sdS + swz<BM>(r0 + 8, 2 * ks) + 2 * t) = da[ks][1];
          *reinterpret_cast<uint32_t*>(sdS + swz<BM>(r0, 2 * ks + 1) + 2 * t) = da[ks][2];
          *reinterpret_cast<uint32_t*>(sdS + swz<BM>(r0 + 8, 2 * ks + 1) + 2 * t) = da[ks][3];
        }
      }
      // sdS complete; every warp is done with this stage's Q / dO / lse2 / delta
      __syncthreads();
      if (STAGES == 1 && nxt >= 0) load_q_side(nxt, 0);

      if (with_dq) {  // dQ (BM x D) += dS (BM x BN) K (BN x D)
        const int mw = warp % MT, part = warp / MT;
        const int c_base = SPLIT_COLS ? part * (DQ / 8) : 0;  // first chunk, a multiple of 8
        const int k_base = SPLIT_COLS ? 0 : part * KQ;        // first key, a multiple of 16
        float acc_dq[DQ / 8][4];
        zero_acc(acc_dq);
        // A = dS read through the transposed tile: matrices (q lo, k lo), (q hi, k lo),
        // (q lo, k hi), (q hi, k hi); rows = keys, one fixed chunk (2 mw + lane bit)
        const int a_row = (lane & 7) + ((lane >> 4) << 3);
        const T* pa = sdS + k_base * BM + swz<BM>(a_row, 2 * mw + ((lane >> 3) & 1));
        const LaneOffsets<D> lb((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
        const T* pk = sK + k_base * D + c_base * 8;
#pragma unroll
        for (int ks = 0; ks < KQ / 16; ++ks) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, pa + ks * 16 * BM);
#pragma unroll
          for (int nt = 0; nt < DQ / 8; nt += 2) {
            if ((c_base + nt) * 8 >= p.dqk) break;
            uint32_t bb[4];
            ldmatrix_x4_trans(bb, pk + lb.at(ks * 16, nt));
            MmaOp<T>::mma(acc_dq[nt], a, bb[0], bb[1]);
            MmaOp<T>::mma(acc_dq[nt + 1], a, bb[2], bb[3]);
          }
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int64_t i = q0 + mw * 16 + g + 8 * rr;
          if (i >= p.Nq) continue;
          float* row = p.dq_accum + ((b * p.Hq + h) * p.Nq + i) * p.dqk;
#pragma unroll
          for (int nt = 0; nt < DQ / 8; ++nt) {
            const int c = (c_base + nt) * 8 + 2 * t;
            if (c < p.dqk) {
              atomicAdd(row + c, acc_dq[nt][2 * rr]);
              atomicAdd(row + c + 1, acc_dq[nt][2 * rr + 1]);
            }
          }
        }
      }
      if (STAGES == 2) stage ^= 1;
    }
    // every thread is past the last barrier of the chunk: the list can be refilled, and
    // the stage the next item uses is no longer read
    n = sched_fill(sched, pos, total, item_class);
    if (n > 0) load_q_side(sched_index(sched.list[0]), stage);
  }
  cp_async_wait_all();  // the K / V loads when no query tile was visited

  // dK, dV rows of this warp; dK carries the softmax scale of S = scale * Q K^T, dV dropout's 1 / (1 - p).
  const float dv_scale = DROP ? drop.scale : 1.f;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t j = k0 + kg * 16 + g + 8 * rr;
    if (j >= p.Nk) continue;
    T* dkr = static_cast<T*>(p.dk) + (bhk * p.Nk + j) * p.dqk;
    T* dvr = static_cast<T*>(p.dv_out) + (bhk * p.Nk + j) * p.dv;
#pragma unroll
    for (int dt = 0; dt < DC / 8; ++dt) {
      const int c = cpart * DC + dt * 8 + 2 * t;
      if (c < p.dqk)
        *reinterpret_cast<uint32_t*>(dkr + c) =
            MmaOp<T>::pack(acc_dk[dt][2 * rr] * p.scale, acc_dk[dt][2 * rr + 1] * p.scale);
      if (c < p.dv)
        *reinterpret_cast<uint32_t*>(dvr + c) =
            MmaOp<T>::pack(acc_dv[dt][2 * rr] * dv_scale, acc_dv[dt][2 * rr + 1] * dv_scale);
    }
  }
}

template <typename T, int D, bool DROP>
__global__ void __launch_bounds__(DqCfg<D>::NTHREADS) tc_bwd_dq_kernel(const TcBwdParams p) {
  using Cfg = DqCfg<D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, NT = Cfg::NTHREADS;
  constexpr int SN = BN / 8;
  constexpr int ON = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * D;
  T* sK = sdO + BM * D;
  T* sV = sK + BN * D;
  float* sL = reinterpret_cast<float*>(sV + BN * D);
  float* sDl = sL + BM;
  __shared__ __align__(16) unsigned char smask_raw[sizeof(MaskSpec)];  // MaskSpec is trivially copyable
  __shared__ SchedShared sched;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  if (tid == 0) *reinterpret_cast<MaskSpec*>(smask_raw) = p.mask;

  const int64_t nqt = ae_cdiv(p.Nq, BM);
  const int64_t bh = blockIdx.x / nqt;
  const int64_t qt = nqt - 1 - blockIdx.x % nqt;
  const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hkv);
  const int64_t q0 = qt * BM;
  const int mq = static_cast<int>(ae_min(BM, p.Nq - q0));
  const T* kg = static_cast<const T*>(p.k) + b * p.k_bs + hk * p.k_hs;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_bs + hk * p.v_hs;

  load_tile<BM, D, NT>(sQ, static_cast<const T*>(p.q) + b * p.q_bs + h * p.q_hs + q0 * p.q_rs, p.q_rs, mq, p.dqk);
  load_tile<BM, D, NT>(sdO, static_cast<const T*>(p.dout) + b * p.do_bs + h * p.do_hs + q0 * p.do_rs, p.do_rs, mq,
                       p.dv);
  load_floats<BM, NT>(sL, p.lse2 + bh * p.nq_pad + q0);
  load_floats<BM, NT>(sDl, p.delta + bh * p.nq_pad + q0);
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

  // this lane's rows: warp * 16 + g and + 8
  float acc_dq[ON][4];
  zero_acc(acc_dq);
  int64_t pos = kt_begin;
  int n = sched_fill(sched, pos, kt_end, tile_class);
  while (n > 0) {
#pragma unroll 1
    for (int idx = 0; idx < n; ++idx) {
      const int32_t entry = sched.list[idx];
      const int64_t kt = sched_index(entry);
      const int cls = sched_class(entry);
      const int64_t k0 = kt * BN;
      const int nk = static_cast<int>(ae_min(BN, p.Nk - k0));
      // the previous iteration ended with a barrier: K, V are free
      load_tile<BN, D, NT>(sK, kg + k0 * p.k_rs, p.k_rs, nk, p.dqk);
      load_tile<BN, D, NT>(sV, vg + k0 * p.v_rs, p.v_rs, nk, p.dv);
      cp_async_commit();
      const bool need_mask = cls == kPartial || k0 + BN > p.Nk || q0 + BM > p.Nq;
      const uint32_t keep =
          need_mask ? keep_rows<SN>(mask, b, h, q0 + warp * 16 + g, k0 + 2 * t, cls == kPartial) : 0u;
      const uint32_t kept = DROP ? dropout_bits_rows<SN>(drop, drop_bh, q0 + warp * 16 + g, k0 + 2 * t) : 0u;
      cp_async_wait_all();
      __syncthreads();  // K, V (and Q, dO, lse2, delta) landed

      const float lr[2] = {sL[warp * 16 + g], sL[warp * 16 + g + 8]};
      const float dr[2] = {sDl[warp * 16 + g], sDl[warp * 16 + g + 8]};
      // the forward's ALiBi (base 2) of entry (nt, e): query row g + 8 (e >> 1), key 2t + (e & 1)
      auto bias = [&](int nt, int e) {
        return slope2 == 0.f ? 0.f
                             : alibi_bias(slope2, q0 + warp * 16 + g + 8 * (e >> 1) + mask.offset,
                                          k0 + nt * 8 + 2 * t + (e & 1));
      };
      float s[SN][4];
      zero_acc(s);
      gemm_abt<T, SN, D>(s, sQ, warp * 16, sK, 0, p.dqk);
      if (p.softcap_log2 > 0.f) {  // s = P (1 - tanh^2): only dS needs it here
#pragma unroll
        for (int nt = 0; nt < SN; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float th = softcap_tanh(s[nt][e] * p.scale_over_cap);
            s[nt][e] = exp2f(p.softcap_log2 * th + bias(nt, e) - lr[e >> 1]) * (1.f - th * th);
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < SN; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] = exp2f(s[nt][e] * p.scale_log2 + bias(nt, e) - lr[e >> 1]);
      }
      if (need_mask) apply_keep(s, keep, 0.f);
      float dp[SN][4];
      zero_acc(dp);
      gemm_abt<T, SN, D>(dp, sdO, warp * 16, sV, 0, p.dv);
#pragma unroll
      for (int nt = 0; nt < SN; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float z = DROP ? ((kept >> (4 * nt + e)) & 1u ? dp[nt][e] * drop.scale : 0.f) : dp[nt][e];
          dp[nt][e] = s[nt][e] * (z - dr[e >> 1]);
        }
      uint32_t da[BN / 16][4];
      acc_to_a<T, BN / 16>(da, dp);
      gemm_rb<T, ON, BN / 16, D>(acc_dq, da, sK, 0, 0, p.dqk);
      __syncthreads();  // every warp is done with this K / V tile
    }
    n = sched_fill(sched, pos, kt_end, tile_class);
  }
  cp_async_wait_all();

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t i = q0 + warp * 16 + g + 8 * rr;
    if (i >= p.Nq) continue;
    T* row = static_cast<T*>(p.dq) + (bh * p.Nq + i) * p.dqk;
#pragma unroll
    for (int dt = 0; dt < ON; ++dt) {
      const int c = dt * 8 + 2 * t;
      if (c < p.dqk)
        *reinterpret_cast<uint32_t*>(row + c) =
            MmaOp<T>::pack(acc_dq[dt][2 * rr] * p.scale, acc_dq[dt][2 * rr + 1] * p.scale);
    }
  }
}

template <typename T, int D>
void launch_tc_bwd_dkdv(const TcBwdParams& p, cudaStream_t stream) {
  using Cfg = BwdCfg<D>;
  launch_tiles(p.dropout.on() ? tc_bwd_dkdv_kernel<T, D, true> : tc_bwd_dkdv_kernel<T, D, false>, p, p.B * p.Hkv,
               p.Nk, Cfg::BN, Cfg::NTHREADS, int(Cfg::SMEM), stream);
}

template <typename T, int D>
void launch_tc_bwd_dq(const TcBwdParams& p, cudaStream_t stream) {
  using Cfg = DqCfg<D>;
  launch_tiles(p.dropout.on() ? tc_bwd_dq_kernel<T, D, true> : tc_bwd_dq_kernel<T, D, false>, p, p.B * p.Hq, p.Nq,
               Cfg::BM, Cfg::NTHREADS, int(Cfg::SMEM), stream);
}

}  // namespace attention_ext::cuda
