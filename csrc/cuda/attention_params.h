// Plain-data parameters and launcher declarations shared by the CUDA op bodies
// (attention_ops.cu, which includes ATen) and the kernel sources (which do not, so that
// they compile quickly and in parallel).
//
// Two kernel families:
//   tensor-core (fp16/bf16, head dims padded into buckets of 64/128/256, inputs with a
//     contiguous last dim, 16-byte aligned rows and head dims that are multiples of 8:
//     the op body copies anything else into that form);
//   SIMT (fp32, fp64, and fp16/bf16 beyond the tensor-core limits): any strides.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../common/limits.h"
#include "../common/mask.h"
#include "../common/dropout.h"
#include "../common/score_mods.h"

namespace attention_ext::cuda {

// ---- tensor-core path ------------------------------------------------------------

struct TcFwdParams {
  const void *q, *k, *v;
  int64_t q_bs, q_hs, q_rs;  // batch / head / row strides in elements (last dim contiguous)
  int64_t k_bs, k_hs, k_rs;
  int64_t v_bs, v_hs, v_rs;
  void* out;       // (B, Hq, Nq, out_rs) contiguous, columns [0, dv) written
  int64_t out_rs;  // row stride of out
  float* lse;      // (B, Hq, Nq) contiguous, natural log
  int64_t B, Hq, Hkv, Nq, Nk;
  int dqk, dv;       // head dims, multiples of 8, <= the bucket
  float scale_log2;  // scale * log2(e)
  float softcap_log2;  // softcap * log2(e); 0 = no softcap
  MaskSpec mask;
  ScoreMods mods;  // ALiBi slopes, sinks (device pointers; score_mods.h)
  DropoutSpec dropout;  // p = 0: off (dropout.h; dropout.cuh)
};

struct TcBwdParams {
  const void *q, *k, *v, *dout;
  int64_t q_bs, q_hs, q_rs;
  int64_t k_bs, k_hs, k_rs;
  int64_t v_bs, v_hs, v_rs;
  int64_t do_bs, do_hs, do_rs;
  // Per query row, padded to nq_pad rows per (b, h): lse * log2(e) (+inf where lse is
  // -inf, so that every P of the row is exactly 0) and delta = dO . O - dlse.
  const float* lse2;
  const float* delta;
  int64_t nq_pad;
  float* dq_accum;  // (B, Hq, Nq, dqk) fp32, zeroed; atomics target (may be null: deterministic mode)
  void* dq;         // (B, Hq, Nq, dqk) contiguous; written by the deterministic dQ kernel
  void* dk;         // (B, Hkv, Nk, dqk) contiguous
  void* dv_out;     // (B, Hkv, Nk, dv) contiguous
  int64_t B, Hq, Hkv, Nq, Nk;
  int dqk, dv;
  float scale;       // softmax scale (dK, dQ are scaled by it)
  float scale_log2;  // scale * log2(e)
  // softcap: P = exp2(softcap_log2 * tanh(S * scale_over_cap) - lse2); softcap_log2 = 0: off
  float softcap_log2, scale_over_cap;
  MaskSpec mask;
  ScoreMods mods;  // ALiBi slopes, sinks (device pointers; score_mods.h)
  DropoutSpec dropout;  // p = 0: off (dropout.h; dropout.cuh)
};

// Rows of lse2 / delta per (b, h): a multiple of every query tile used by the kernels.
constexpr int64_t kLseRowPad = 128;

// Tile configurations per head-dim bucket D (64, 128, 256); 16-bit elements.

// Forward: BM query rows (16 * MW per warp) x BN keys; smem Q + K + V. Measured on an H100
// (benchmarks/RESULTS.md): for D = 128 two 16-row atoms per warp with 4 warps beat one atom
// with 8 warps by 5-10%, although both run at the 255-register limit.
template <int D>
struct FwdCfg {
  static constexpr int MW = D <= 128 ? 2 : 1;  // 16-row atoms per warp (D = 256: the O accumulator allows one)
  static constexpr int NWARPS = 4;
  static constexpr int BM = 16 * MW * NWARPS;
  static constexpr int BN = D <= 64 ? 64 : D == 128 ? 64 : 32;
  static constexpr int NTHREADS = 32 * NWARPS;
  static constexpr size_t SMEM = size_t(BM + 2 * BN) * D * 2;
};

// Backward dK/dV (+ atomic dQ): BN keys per block (16 per key group of WK warps; with
// WK = 2 the two warps of a group split the dK/dV columns, which keeps the accumulators
// within the register file), BM queries per step, Q/dO/lse/delta in STAGES buffers.
template <int D>
struct BwdCfg {
  static constexpr int NWARPS = 8;
  static constexpr int WK = D == 256 ? 2 : 1;
  static constexpr int STAGES = D == 256 ? 1 : 2;
  static constexpr int BM = 64;
  static constexpr int BN = 16 * NWARPS / WK;
  static constexpr int NTHREADS = 32 * NWARPS;
  static constexpr size_t SMEM = size_t(2 * BN * D + STAGES * 2 * BM * D + BN * BM) * 2 + size_t(STAGES) * 2 * BM * 4;
};

// Deterministic dQ: BM query rows (16 per warp) x BN keys; smem Q, dO, K, V, lse, delta.
template <int D>
struct DqCfg {
  static constexpr int NWARPS = 4;
  static constexpr int BM = 16 * NWARPS;
  static constexpr int BN = D == 256 ? 32 : 64;
  static constexpr int NTHREADS = 32 * NWARPS;
  static constexpr size_t SMEM = size_t(2 * BM * D + 2 * BN * D) * 2 + size_t(2) * BM * 4;
};

// Calls f(std::integral_constant<int, D>{}) for the head-dim bucket D of the tensor-core
// kernels (64, 128 or 256), like FlashAttention's HEADDIM_SWITCH.
template <class F>
void head_dim_switch(int bucket, F&& f) {
  switch (bucket) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(std::integral_constant<int, 256>{});
  }
}

// Calls f(T{}) with the CUDA type of a 16-bit dtype (the tensor-core kernels).
template <class F>
void tc_type_switch(DType dtype, F&& f) {
  if (dtype == DType::Float16) return f(__half{});
  return f(__nv_bfloat16{});
}

// Calls f(T{}, A{}) with the storage and accumulation types of dtype (the SIMT kernels).
template <class F>
void type_switch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{}, float{});
    case DType::Float64: return f(double{}, double{});
    case DType::Float16: return f(__half{}, float{});
    default: return f(__nv_bfloat16{}, float{});
  }
}

// Explicitly instantiated in generated/attention_{fwd,bwd}_<dtype>_d<bucket>.cu (written by
// scripts/gen_cuda_instantiations.py) for T in {__half, __nv_bfloat16} and D in {64, 128, 256}.
template <typename T, int D>
void launch_tc_fwd(const TcFwdParams& p, cudaStream_t stream);
// dK, dV (and, when p.dq_accum is set, dQ through fp32 atomics)
template <typename T, int D>
void launch_tc_bwd_dkdv(const TcBwdParams& p, cudaStream_t stream);
// dQ alone, one block per query tile, no atomics (deterministic mode)
template <typename T, int D>
void launch_tc_bwd_dq(const TcBwdParams& p, cudaStream_t stream);

// ---- SIMT path ---------------------------------------------------------------------

struct Strides4 {
  int64_t s[4];
};

struct SimtFwdParams {
  const void *q, *k, *v;
  Strides4 qs, ks, vs;
  void* out;  // (B, Hq, Nq, Dv) contiguous
  void* lse;  // (B, Hq, Nq) acc_t
  int64_t B, Hq, Hkv, Nq, Nk, Dqk, Dv;
  double scale;
  double softcap;  // 0 = off
  MaskSpec mask;
  ScoreMods mods;  // ALiBi slopes, sinks (device pointers; score_mods.h)
  DropoutSpec dropout;  // p = 0: off (dropout.h; dropout.cuh)
};

struct SimtBwdParams {
  const void *q, *k, *v, *dout;
  Strides4 qs, ks, vs, dos;
  const void* lse2;   // acc_t, (B*Hq, nq_pad)
  const void* delta;  // acc_t, (B*Hq, nq_pad)
  int64_t nq_pad;
  void *dq, *dk, *dv;  // contiguous
  int64_t B, Hq, Hkv, Nq, Nk, Dqk, Dv;
  double scale;
  double softcap;  // 0 = off
  MaskSpec mask;
  ScoreMods mods;  // ALiBi slopes, sinks (device pointers; score_mods.h)
  DropoutSpec dropout;  // p = 0: off (dropout.h; dropout.cuh)
};

// Accumulation in fp32 (fp64 for fp64).
void launch_simt_fwd(DType dtype, const SimtFwdParams& p, cudaStream_t stream);
void launch_simt_bwd(DType dtype, const SimtBwdParams& p, cudaStream_t stream);

// Backward preprocessing shared by both paths: lse2 and delta (acc_t buffers of
// (B*Hq, nq_pad) rows, padding rows get +inf / 0). grad_lse may be null.
struct BwdPrepParams {
  const void *out, *dout;
  Strides4 os, dos;
  const void* lse;       // acc_t, (B, Hq, Nq) contiguous
  const void* grad_lse;  // acc_t, (B, Hq, Nq) contiguous, or null
  void *lse2, *delta;    // acc_t
  int64_t nq_pad;
  int64_t B, Hq, Nq, Dv;
};
void launch_bwd_prep(DType dtype, const BwdPrepParams& p, cudaStream_t stream);

// dq[i] = T(dq_accum[i] * scale) over n elements (dq contiguous)
void launch_dq_convert(DType dtype, const float* dq_accum, void* dq, int64_t n, float scale, cudaStream_t stream);

}  // namespace attention_ext::cuda
