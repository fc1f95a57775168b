// Pieces shared by the tiled CPU kernels: buffers, dtype conversion, packing, the
// work-sharing loop and the tile shape.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "../kernel_table.h"
#include "vec_math.h"
#include "workspace.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned scratch from the workspace pool (workspace.h); the kernels own their
// workspace so the ISA modules need no tensor machinery.
template <typename T>
struct Buffer {
  T* ptr = nullptr;
  size_t bytes = 0;
  explicit Buffer(int64_t n) {
    const size_t want = size_t(round_up(std::max<int64_t>(n, 1) * int64_t(sizeof(T)), 64));
    ptr = static_cast<T*>(Workspace::get().take(want, &bytes));
  }
  ~Buffer() { Workspace::get().give(ptr, bytes); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return ptr; }
  void zero(int64_t n) const { std::memset(ptr, 0, size_t(n) * sizeof(T)); }
};

// One task's scratch of at least n elements, reused across tasks of the same thread.
template <typename T>
T* task_scratch(int64_t n) {
  thread_local std::unique_ptr<Buffer<T>> buf;
  thread_local int64_t size = 0;
  if (size < n) {
    buf.reset();
    buf = std::make_unique<Buffer<T>>(n);
    size = n;
  }
  return buf->get();
}

template <typename T>
inline T to_acc(T x) { return x; }
inline float to_acc(c10::BFloat16 x) { return float(x); }
inline float to_acc(c10::Half x) { return float(x); }

template <typename S, typename T>
inline S from_acc(T x) { return static_cast<S>(x); }

// True when x[0, n) holds a NaN or infinity: x * 0 is NaN exactly for non-finite x.
template <typename T>
inline bool row_is_bad(const T* x, int64_t n) {
  T z = 0;
  for (int64_t c = 0; c < n; ++c) z += x[c] * T(0);
  return z != z;
}

// d[0, n) = acc_t(s[0, n)) * mult; bf16/fp16 rows convert whole vectors at a time (the
// scalar conversion is the slowest part of loading a tile).
template <typename scalar_t, typename acc_t>
inline void convert_row(const scalar_t* s, int64_t n, acc_t* d, acc_t mult) {
  int64_t c = 0;
  if constexpr (std::is_same_v<acc_t, float> && (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>)) {
    constexpr int64_t W = Vec<scalar_t>::size();
    for (; c + W <= n; c += W) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec<scalar_t>::loadu(s + c));
      (lo * Vec<float>(mult)).store(d + c);
      (hi * Vec<float>(mult)).store(d + c + W / 2);
    }
  }
  for (; c < n; ++c) d[c] = acc_t(to_acc(s[c])) * mult;
}

// Copy rows [r0, r0 + rows) x cols [0, cols) of a strided (seq, dim) matrix into a dense
// acc_t block with leading dimension ld, zero-filling cols..ld and rows..rows_pad.
// With `bad`, bad[r] = 1 marks rows holding a NaN or infinity (see gemm_guarded).
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, int64_t s_row, int64_t s_col, int64_t rows, int64_t cols, acc_t* dst,
               int64_t ld, int64_t rows_pad, acc_t mult = acc_t(1), uint8_t* bad = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * s_row;
    acc_t* d = dst + r * ld;
    if (s_col == 1)
      convert_row(s, cols, d, mult);
    else
      for (int64_t c = 0; c < cols; ++c) d[c] = acc_t(to_acc(s[c * s_col])) * mult;
    for (int64_t c = cols; c < ld; ++c) d[c] = acc_t(0);
    if (bad) bad[r] = row_is_bad(d, cols);
  }
  for (int64_t r = rows; r < rows_pad; ++r) {
    for (int64_t c = 0; c < ld; ++c) dst[r * ld + c] = acc_t(0);
    if (bad) bad[r] = 0;
  }
}

// The flags load_rows computes, for rows read in place (unit column stride) instead of
// copied: bad[r] for rows [0, rows), 0 for rows..rows_pad.
template <typename T>
void flag_bad_rows(const T* src, int64_t s_row, int64_t rows, int64_t cols, uint8_t* bad, int64_t rows_pad) {
  for (int64_t r = 0; r < rows; ++r) bad[r] = row_is_bad(src + r * s_row, cols);
  for (int64_t r = rows; r < rows_pad; ++r) bad[r] = 0;
}

// Transposed copy: dst[c * ld + r] = src[r][c] * mult for rows [0, rows), cols [0, cols);
// columns rows..ld of dst are zero.
template <typename scalar_t, typename acc_t>
void load_transposed(const scalar_t* src, int64_t s_row, int64_t s_col, int64_t rows, int64_t cols,
                     acc_t* dst, int64_t ld, acc_t mult = acc_t(1)) {
  for (int64_t c = 0; c < cols; ++c) {
    acc_t* d = dst + c * ld;
    for (int64_t r = rows; r < ld; ++r) d[r] = acc_t(0);
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (s_col == 1) {  // ATen's 16x16 register transposes; x * mult rounds as below
      at::vec::transpose_mxn<float>(src, s_row, dst, ld, int(rows), int(cols));
      if (mult != acc_t(1))
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t r = 0; r < rows; ++r) dst[c * ld + r] *= mult;
      return;
    }
  }
#endif
  // row-major reads, blocked so the strided writes stay in cache
  constexpr int64_t RB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += RB) {
    const int64_t r1 = std::min(rows, r0 + RB);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = r0; r < r1; ++r) dst[c * ld + r] = acc_t(to_acc(src[r * s_row + c * s_col])) * mult;
  }
}

// Runs fn(task) for task in [0, n) on ATen's thread pool with dynamic claiming, so
// uneven tasks (causal rows, window edges) balance. Each task's result depends only
// on the task, never on the thread that ran it: outputs are bitwise repeatable for any
// thread count.
template <typename Fn>
void parallel_tasks(int64_t n, const Fn& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < n; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t);
  });
}

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;

// The softmax runs in base 2; lse is returned in base e. Both conversions round once
// (in double), so the backward's base-2 lse is within about 1 ulp of the forward's.
template <typename acc_t>
inline acc_t lse_from_log2(acc_t row_max, acc_t row_sum) {
  return acc_t((double(row_max) + std::log2(double(row_sum))) * kLn2);
}
template <typename acc_t>
inline acc_t lse_to_log2(acc_t lse) {
  return acc_t(double(lse) * kLog2e);
}

// Query/key tile shape. BK is a multiple of the vector width (it is the N of the
// score product); BQ a multiple of the micro kernel's row block where it matters.
struct TileShape {
  int64_t bq, bk;
};

// Tile edge (at most cap) for a block layout of block size bs, aligned with the blocks
// so that classify() sees whole blocks (Full or Empty, no per-element test): a multiple
// of bs (at least `lo`) for bs <= cap, else the largest divisor of bs in [lo, cap]. A
// large bs without such a divisor gets cap: tiles then straddle blocks, which classify()
// marks Partial (correct, only slower). Never the block size itself above cap.
inline int64_t block_tile(int64_t bs, int64_t lo, int64_t cap) {
  if (bs <= cap) {
    const int64_t t = round_up(lo, bs);  // the smallest multiple of bs >= lo
    return t <= cap ? t : bs;
  }
  for (int64_t t = cap; t >= lo; --t)
    if (bs % t == 0) return t;
  return cap;
}

// Grid neighborhood: one box per tile (mask.h), so that tile pairs are tight.
inline int64_t na_box_tile(const MaskSpec& m) {
  return std::clamp<int64_t>(m.na_tile[0] * m.na_tile[1] * m.na_tile[2], 16, 256);
}

template <typename acc_t>
inline TileShape fwd_tiles(const MaskSpec& m, int64_t nq, int64_t nk) {
  constexpr int64_t VL = Vec<acc_t>::size();
  int64_t bq = 64, bk = 128;
  if (m.kind == kBlockLayout && m.block_size >= 16) bq = bk = block_tile(m.block_size, 32, 128);
  if (m.kind == kNeighborhood && m.na_nd) bq = bk = na_box_tile(m);
  bq = std::min(bq, std::max<int64_t>(nq, 1));
  bk = round_up(std::min(bk, std::max<int64_t>(nk, 1)), VL);
  return {bq, bk};
}

template <typename acc_t>
inline TileShape bwd_tiles(const MaskSpec& m, int64_t nq, int64_t nk) {
  constexpr int64_t VL = Vec<acc_t>::size();
  int64_t bq = 64, bk = 64;
  if (m.kind == kBlockLayout && m.block_size >= 16)
    bq = bk = m.block_size <= 128 ? m.block_size : block_tile(m.block_size, 32, 64);
  if (m.kind == kNeighborhood && m.na_nd) bq = bk = na_box_tile(m);
  bq = round_up(std::min(bq, std::max<int64_t>(nq, 1)), VL);
  bk = std::min(bk, std::max<int64_t>(nk, 1));
  return {bq, bk};
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
