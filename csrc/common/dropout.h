// Attention dropout, shared by every backend: the keep decision of (batch, head, query,
// key) is a pure function of those indices and a (seed, offset) pair drawn once per call
// from the torch generator, so the backward regenerates the forward's mask with nothing
// Nq x Nk stored, and the result never depends on tiling or the thread count.
//
// Generator: Philox4x32-10 (Salmon et al., SC'11; the generator of cuRAND and of
// PyTorch's CUDA RNG). One call yields four 32-bit words, eight 16-bit halves: the
// decisions of four keys of two query rows (16 bits resolve p to 2^-16; FlashAttention
// uses 8). Keys go in blocks of 64, j = 64 m + 16 w + l (w < 4, l < 16), rows in pairs:
//   key     = (seed_lo, seed_hi)
//   counter = (16 m + l, i >> 1, b * Hq + h, offset)    word w, half i & 1 (low: even i)
// with i, j the query and key rows of the tensors (packed documents keep their rows).
// So 16 consecutive counters give a row pair's 64 consecutive keys in order (16 SIMD
// lanes, a word each per 16 keys), and one counter for 16 consecutive row pairs gives
// 32 consecutive rows in order (the halves of 16 lanes): the forward's rows and the
// backward's transposed tiles (64 keys) both read them with contiguous vector loads, and
// no word is computed for a key outside the tile.
// A key is kept when its half < threshold = round((1 - p) * 2^16); kept probabilities
// are scaled by 1 / (1 - p).
#pragma once

#include <cstdint>

#include "mask.h"  // AE_HD

namespace attention_ext {

struct DropoutSpec {
  double p = 0.0;  // 0 = off
  uint64_t seed = 0;
  uint32_t offset = 0;
  // Where this call's rows sit in the full problem, so that a backend that splits a call
  // (per packed document, per batch row) keys the generator by the full indices.
  int64_t b0 = 0, q0 = 0, k0 = 0;

  AE_HD bool on() const { return p > 0.0; }
  // keep iff half < threshold; p in (0, 1) so the threshold is in [1, 2^16] (2^16: p
  // below 2^-17 keeps every key, as the rounding says)
  AE_HD uint32_t threshold() const {
    const double t = (1.0 - p) * 65536.0 + 0.5;
    return t >= 65536.0 ? 65536u : t < 1.0 ? 1u : uint32_t(t);
  }
  AE_HD double inv_keep() const { return 1.0 / (1.0 - p); }
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Philox4x32-10 of one counter (c[4]) under a key (k0, k1), in place.
AE_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(kPhiloxM0) * c[0], p1 = uint64_t(kPhiloxM1) * c[2];
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0, n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[0] = n0, c[1] = uint32_t(p1), c[2] = n2, c[3] = uint32_t(p0);
    k0 += kPhiloxW0, k1 += kPhiloxW1;
  }
}

constexpr int kDropoutBlockLog2 = 6;  // 64 keys: 16 counters of 4 words

// The first counter word of key j (its word is (j >> 4) & 3).
AE_HD uint32_t dropout_counter(int64_t j) {
  return uint32_t(((j >> kDropoutBlockLog2) << 4) | (j & 15));
}

// The generator's third counter word: the full-problem (batch, head).
AE_HD uint32_t dropout_bh(const DropoutSpec& d, int64_t Hq, int64_t b, int64_t h) {
  return uint32_t((b + d.b0) * Hq + h);
}

// The four words of the counter holding full-problem key jj of full-problem query row ii
// (keys 64 (jj >> 6) + 16 w + (jj & 15), w < 4, of rows ii & ~1 and ii | 1).
AE_HD void dropout_words(const DropoutSpec& d, uint32_t bh, int64_t ii, int64_t jj, uint32_t c[4]) {
  c[0] = dropout_counter(jj), c[1] = uint32_t(ii >> 1), c[2] = bh, c[3] = d.offset;
  philox4x32_10(c, uint32_t(d.seed), uint32_t(d.seed >> 32));
}

// The half of full-problem (row ii, key jj) in the words c of its counter, without a
// dynamic index (which would put c in local memory on CUDA).
AE_HD uint32_t dropout_half_of(const uint32_t c[4], int64_t ii, int64_t jj) {
  const int64_t w = (jj >> 4) & 3;
  const uint32_t word = w == 0 ? c[0] : w == 1 ? c[1] : w == 2 ? c[2] : c[3];
  return (word >> (16 * (ii & 1))) & 0xFFFFu;
}

// The keep decision of one (b, h, i, j) (indices relative to the call; the spec's bases
// are added), for hosts, CUDA and tests. CPU kernels generate 16 counters at a time.
AE_HD bool dropout_keep(const DropoutSpec& d, int64_t Hq, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t ii = i + d.q0, jj = j + d.k0;
  uint32_t c[4];
  dropout_words(d, dropout_bh(d, Hq, b, h), ii, jj, c);
  return dropout_half_of(c, ii, jj) < d.threshold();
}

}  // namespace attention_ext
