// Attention dropout in the CUDA kernels: the keep decisions of common/dropout.h (the same
// Philox counters, so CUDA and the CPU keep the same elements bitwise), generated where
// the kernels need them, nothing N x N stored.
//
// Tensor-core tiles take them as 32-bit masks in the accumulator layout of keep_rows /
// keep_cols (attention_device.cuh), computed in rolled loops before the GEMM of the
// tile like the attention mask. SIMT warps share one Philox call per lane: 16 lanes give
// the 64 keys of a block (forward, dQ), 32 lanes 32 query rows (dK, dV).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dropout.h"

namespace attention_ext::cuda {

// What a kernel reads of the spec, converted once: keep iff half < thr; kept
// probabilities are scaled by 1 / (1 - p) (scale, in float; scale64 for fp64 kernels).
// d refers to the kernel's parameter (constant memory), not a copy in registers.
struct DropoutDev {
  const DropoutSpec& d;
  uint32_t thr;
  double scale64;
  float scale;
  __device__ __forceinline__ explicit DropoutDev(const DropoutSpec& s)
      : d(s), thr(s.on() ? s.threshold() : 0u), scale64(s.on() ? s.inv_keep() : 1.0), scale(float(scale64)) {}
  __device__ __forceinline__ bool on() const { return d.p > 0.0; }
};

// Row-oriented tile (rows = query rows i0 + 8 rr, rr < 2; columns = keys j0 + 8 nt + e,
// nt < NT, e < 2; indices of the call): bit 4 nt + 2 rr + e set where the element is kept.
// Keys 16 apart share a counter inside a 64-key block, so each (rr, nt % 2, e) walks its
// keys with one counter at a time (one Philox call per row and 16 keys of a block).
template <int NT>
__device__ __forceinline__ uint32_t dropout_bits_rows(const DropoutDev& dd, uint32_t bh, int64_t i0, int64_t j0) {
  static_assert(NT * 4 <= 32, "one bit per element");
  const DropoutSpec& d = dd.d;
  uint32_t bits = 0;
#pragma unroll 1
  for (int x = 0; x < 8; ++x) {  // x = (rr, nt % 2, e)
    const int rr = x >> 2, n1 = (x >> 1) & 1, e = x & 1;
    const int64_t ii = i0 + 8 * rr + d.q0;
    int64_t blk = -1;
    uint32_t c[4];
#pragma unroll 1
    for (int nt = n1; nt < NT; nt += 2) {
      const int64_t jj = j0 + 8 * nt + e + d.k0;
      if ((jj >> kDropoutBlockLog2) != blk) {
        blk = jj >> kDropoutBlockLog2;
        dropout_words(d, bh, ii, jj, c);
      }
      bits |= uint32_t(dropout_half_of(c, ii, jj) < dd.thr) << (4 * nt + 2 * rr + e);
    }
  }
  return bits;
}

// Transposed tile (rows = keys j0 + 8 rr; columns = query rows i0 + 8 nt + e), the bit
// layout of keep_cols. Every element has a counter of its own here.
template <int NT>
__device__ __forceinline__ uint32_t dropout_bits_cols(const DropoutDev& dd, uint32_t bh, int64_t j0, int64_t i0) {
  static_assert(NT * 4 <= 32, "one bit per element");
  const DropoutSpec& d = dd.d;
  uint32_t bits = 0;
#pragma unroll 1
  for (int x = 0; x < 4 * NT; ++x) {  // x = (nt, rr, e)
    const int nt = x >> 2, rr = (x >> 1) & 1, e = x & 1;
    const int64_t jj = j0 + 8 * rr + d.k0;
    uint32_t c[4];
    const int64_t ii = i0 + 8 * nt + e + d.q0;
    dropout_words(d, bh, ii, jj, c);
    bits |= uint32_t(dropout_half_of(c, ii, jj) < dd.thr) << x;
  }
  return bits;
}

// The SIMT walk along one query row's keys (forward, dQ): the multiplier of key j of
// row i (scale or 0). Lanes 0-15 (and again 16-31) hold the 16 counters of the current
// 64-key block; a key's half comes from its lane by a shuffle. Every lane of the warp
// must call it with the same j (the kernels' key loops are warp-uniform).
template <typename A>
struct DropoutRowWalk {
  const DropoutDev& dd;
  uint32_t bh;
  int64_t ii;
  int64_t blk = -1;
  uint32_t c[4];
  __device__ __forceinline__ DropoutRowWalk(const DropoutDev& d, uint32_t bh_, int64_t i)
      : dd(d), bh(bh_), ii(i + d.d.q0) {}
  __device__ __forceinline__ A factor(int64_t j) {
    const int64_t jj = j + dd.d.k0;
    if ((jj >> kDropoutBlockLog2) != blk) {
      blk = jj >> kDropoutBlockLog2;
      dropout_words(dd.d, bh, ii, (blk << kDropoutBlockLog2) + (threadIdx.x & 15), c);
    }
    const uint32_t w = __shfl_sync(0xffffffffu, dropout_half_of(c, ii, jj), int(jj & 15));
    return w < dd.thr ? A(dd.scale64) : A(0);
  }
};

// The SIMT walk along one key's query rows (dK, dV): lane l holds the half of row
// base + l. Warp-uniform like DropoutRowWalk; a new head restarts it (reset()).
template <typename A>
struct DropoutColWalk {
  const DropoutDev& dd;
  int64_t jj;
  uint32_t bh = 0;
  int64_t base = 0;
  bool valid = false;
  uint32_t word = 0;
  __device__ __forceinline__ DropoutColWalk(const DropoutDev& d, int64_t j) : dd(d), jj(j + d.d.k0) {}
  __device__ __forceinline__ void reset(uint32_t bh_) { bh = bh_, valid = false; }
  __device__ __forceinline__ A factor(int64_t i) {
    if (!valid || i < base || i >= base + 32) {
      base = i, valid = true;
      uint32_t c[4];
      const int64_t ii = base + (threadIdx.x & 31) + dd.d.q0;
      dropout_words(dd.d, bh, ii, jj, c);
      word = dropout_half_of(c, ii, jj);
    }
    const uint32_t w = __shfl_sync(0xffffffffu, word, int(i - base));
    return w < dd.thr ? A(dd.scale64) : A(0);
  }
};

}  // namespace attention_ext::cuda
