// Device building blocks of the tensor-core kernels: PTX wrappers (mma.sync m16n8k16,
// ldmatrix, cp.async), the swizzled shared-memory tile layout, warp-level GEMMs on those
// tiles, and the per-element mask of Partial tiles.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16/.f16 inputs, f32 accumulators);
// lane = 4 * g + t (g = lane / 4 in [0, 8), t = lane % 4 in [0, 4)):
//   A (16x16, row major), 4 x b32: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//                                  a3 = (g+8, 2t+8..)
//   B (16x8, k x n), 2 x b32:      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16x8, f32), 4 floats:       c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of
// matrix m, and register m of every lane receives (row g, cols 2t..2t+1) of matrix m
// (with .trans: (rows 2t..2t+1, col g), i.e. the transposed matrix).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/mask.h"

namespace attention_ext::cuda {

#define AE_DEV __device__ __forceinline__

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- PTX wrappers ------------------------------------------------------------------

AE_DEV uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

AE_DEV void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

AE_DEV void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// 16-byte global -> shared copy; when !valid the destination is zero-filled and nothing
// is read (src-size 0), but src must still be a mapped address.
AE_DEV void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_size));
}

AE_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
AE_DEV void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__nv_bfloat16> {
  static AE_DEV void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // (lo, hi) -> packed pair, lo in the low 16 bits (the lower column index)
  static AE_DEV uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct MmaOp<__half> {
  static AE_DEV void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static AE_DEV uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// ---- shared-memory tiles -----------------------------------------------------------
// A tile is row major with COLS 16-bit elements per row (COLS a multiple of 64). The
// 16-byte chunk c of row r is stored at chunk c ^ (r % 8): the 8 rows an ldmatrix (or a
// cp.async wave) touches at one logical chunk then hit 8 different bank groups.
template <int COLS>
AE_DEV int swz(int row, int chunk) {
  static_assert(COLS % 64 == 0, "swizzled tiles need rows of >= 8 chunks");
  return row * COLS + ((chunk ^ (row & 7)) << 3);
}

// Asynchronously copies rows [0, rows_valid) x columns [0, cols_valid) of a global tile
// (row stride `rs` elements, 16-byte aligned rows, cols_valid a multiple of 8) into a
// ROWS x COLS shared tile; everything outside is zero-filled.
template <int ROWS, int COLS, int NTHREADS, typename T>
AE_DEV void load_tile(T* smem, const T* g, int64_t rs, int rows_valid, int cols_valid) {
  constexpr int CPR = COLS / 8;
  constexpr int TOTAL = ROWS * CPR;
#pragma unroll
  for (int it = 0; it < (TOTAL + NTHREADS - 1) / NTHREADS; ++it) {
    const int id = it * NTHREADS + static_cast<int>(threadIdx.x);
    if (TOTAL % NTHREADS == 0 || id < TOTAL) {
      const int r = id / CPR, c = id % CPR;
      const bool ok = r < rows_valid && c * 8 < cols_valid;
      cp_async16(smem + swz<COLS>(r, c), ok ? g + r * rs + c * 8 : g, ok);
    }
  }
}

// Copies n floats (n a multiple of 4, 16-byte aligned, all in bounds) to shared memory.
template <int N, int NTHREADS>
AE_DEV void load_floats(float* smem, const float* g) {
  static_assert(N % 4 == 0 && N / 4 <= NTHREADS, "one 16-byte chunk per thread");
  const int id = threadIdx.x;
  if (id < N / 4) cp_async16(smem + id * 4, g + id * 4, true);
}

// Per-lane element offsets for ldmatrix on a swizzled tile when the lane addresses row
// r0 + rl and chunk c0 + cl, with r0 % 8 == 0, c0 even (both known at compile time
// after unrolling, or a multiple of 8 rows / chunks folded into the base pointer),
// rl % 8 == lane % 8 and cl in {0, 1}. Since c0 + cl = c0 ^ cl, the stored chunk is
// c0 ^ y with y = cl ^ (rl % 8) < 8, i.e. (c0 & ~7) + ((c0 & 7) ^ y): four per-lane
// values cover every c0, and the rest of the address is an immediate. (Hoisted, fully
// materialised swizzled addresses would otherwise take dozens of registers.)
template <int COLS>
struct LaneOffsets {
  int off[4];
  AE_DEV LaneOffsets(int rl, int cl) {
    const int y = cl ^ (rl & 7);
#pragma unroll
    for (int k = 0; k < 4; ++k) off[k] = rl * COLS + (((2 * k) ^ y) << 3);
  }
  AE_DEV int at(int r0, int c0) const { return r0 * COLS + ((c0 & ~7) << 3) + off[(c0 >> 1) & 3]; }
};

// ---- warp GEMMs ----------------------------------------------------------------------

// acc (16 x 8*NT) += A (16 x K) * B^T where A = rows [a_row0, a_row0 + 16) of sA and B =
// rows [b_row0, b_row0 + 8*NT) of sB (a_row0, b_row0 multiples of 8), both tiles with
// COLS columns; K runs over the first k_valid columns (rounded up to 16; columns past
// k_valid are zero in the tiles).
template <typename T, int NT, int COLS>
AE_DEV void gemm_abt(float (&acc)[NT][4], const T* sA, int a_row0, const T* sB, int b_row0, int k_valid) {
  static_assert(NT % 2 == 0, "B is loaded two n-tiles at a time");
  const int lane = threadIdx.x & 31;
  // A matrices: (rows lo, k lo), (rows hi, k lo), (rows lo, k hi), (rows hi, k hi)
  const LaneOffsets<COLS> la(lane & 15, lane >> 4);
  // B matrices: (n-tile nt, k lo), (nt, k hi), (nt + 1, k lo), (nt + 1, k hi)
  const LaneOffsets<COLS> lb((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  const T* pa = sA + a_row0 * COLS;
  const T* pb = sB + b_row0 * COLS;
#pragma unroll
  for (int ks = 0; ks < COLS / 16; ++ks) {
    if (ks * 16 >= k_valid) break;
    uint32_t a[4];
    ldmatrix_x4(a, pa + la.at(0, 2 * ks));
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      ldmatrix_x4(b, pb + lb.at(nt * 8, 2 * ks));
      MmaOp<T>::mma(acc[nt], a, b[0], b[1]);
      MmaOp<T>::mma(acc[nt + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x 8*NT) += A (16 x 16*KS, register fragments) * B, where B = rows
// [b_row0, b_row0 + 16*KS) x columns [8*chunk0, 8*chunk0 + 8*NT) of sB (COLS columns;
// b_row0 and chunk0 multiples of 8). n-tiles at or past n_valid columns (a multiple of
// 8) are skipped: they are padding.
template <typename T, int NT, int KS, int COLS>
AE_DEV void gemm_rb(float (&acc)[NT][4], const uint32_t (&a)[KS][4], const T* sB, int b_row0, int chunk0,
                    int n_valid) {
  static_assert(NT % 2 == 0, "B is loaded two n-tiles at a time");
  const int lane = threadIdx.x & 31;
  // matrices (k lo, n-tile nt), (k hi, nt), (k lo, nt + 1), (k hi, nt + 1), transposed
  const LaneOffsets<COLS> lb((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
  const T* pb = sB + b_row0 * COLS + chunk0 * 8;
#pragma unroll
  for (int nt = 0; nt < NT; nt += 2) {
    if ((chunk0 + nt) * 8 >= n_valid) break;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, pb + lb.at(ks * 16, nt));
      MmaOp<T>::mma(acc[nt], a[ks], b[0], b[1]);
      MmaOp<T>::mma(acc[nt + 1], a[ks], b[2], b[3]);
    }
  }
}

// Multi-row versions: a warp owns MW 16-row atoms (rows a_row0 + 16 m), so every B
// fragment loaded from shared memory feeds MW mma instead of one (MW = 2 halves the
// shared-memory traffic per flop of the forward pass).
template <typename T, int MW, int NT, int COLS>
AE_DEV void gemm_abt_mw(float (&acc)[MW][NT][4], const T* sA, int a_row0, const T* sB, int b_row0, int k_valid) {
  static_assert(NT % 2 == 0, "B is loaded two n-tiles at a time");
  const int lane = threadIdx.x & 31;
  const LaneOffsets<COLS> la(lane & 15, lane >> 4);
  const LaneOffsets<COLS> lb((lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  const T* pa = sA + a_row0 * COLS;
  const T* pb = sB + b_row0 * COLS;
#pragma unroll
  for (int ks = 0; ks < COLS / 16; ++ks) {
    if (ks * 16 >= k_valid) break;
    uint32_t a[MW][4];
#pragma unroll
    for (int m = 0; m < MW; ++m) ldmatrix_x4(a[m], pa + la.at(16 * m, 2 * ks));
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      ldmatrix_x4(b, pb + lb.at(nt * 8, 2 * ks));
#pragma unroll
      for (int m = 0; m < MW; ++m) {
        MmaOp<T>::mma(acc[m][nt], a[m], b[0], b[1]);
        MmaOp<T>::mma(acc[m][nt + 1], a[m], b[2], b[3]);
      }
    }
  }
}

template <typename T, int MW, int NT, int KS, int COLS>
AE_DEV void gemm_rb_mw(float (&acc)[MW][NT][4], const uint32_t (&a)[MW][KS][4], const T* sB, int b_row0, int chunk0,
                       int n_valid) {
  static_assert(NT % 2 == 0, "B is loaded two n-tiles at a time");
  const int lane = threadIdx.x & 31;
  const LaneOffsets<COLS> lb((lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
  const T* pb = sB + b_row0 * COLS + chunk0 * 8;
#pragma unroll
  for (int nt = 0; nt < NT; nt += 2) {
    if ((chunk0 + nt) * 8 >= n_valid) break;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, pb + lb.at(ks * 16, nt));
#pragma unroll
      for (int m = 0; m < MW; ++m) {
        MmaOp<T>::mma(acc[m][nt], a[m][ks], b[0], b[1]);
        MmaOp<T>::mma(acc[m][nt + 1], a[m][ks], b[2], b[3]);
      }
    }
  }
}

// Accumulators of a 16 x 16*KS product -> A fragments of the next product (the C layout
// of n-tiles 2ks, 2ks+1 is exactly the A layout of k-step ks).
template <typename T, int KS>
AE_DEV void acc_to_a(uint32_t (&a)[KS][4], const float (&c)[2 * KS][4]) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    a[ks][0] = MmaOp<T>::pack(c[2 * ks][0], c[2 * ks][1]);
    a[ks][1] = MmaOp<T>::pack(c[2 * ks][2], c[2 * ks][3]);
    a[ks][2] = MmaOp<T>::pack(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[ks][3] = MmaOp<T>::pack(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}

// acc_to_a with the elements whose bit 4 nt + e is clear (a keep mask of the layout below)
// replaced by zeros.
template <typename T, int KS>
AE_DEV void acc_to_a_kept(uint32_t (&a)[KS][4], const float (&c)[2 * KS][4], uint32_t bits) {
  auto v = [&](int nt, int e) { return (bits >> (4 * nt + e)) & 1u ? c[nt][e] : 0.f; };
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    a[ks][0] = MmaOp<T>::pack(v(2 * ks, 0), v(2 * ks, 1));
    a[ks][1] = MmaOp<T>::pack(v(2 * ks, 2), v(2 * ks, 3));
    a[ks][2] = MmaOp<T>::pack(v(2 * ks + 1, 0), v(2 * ks + 1, 1));
    a[ks][3] = MmaOp<T>::pack(v(2 * ks + 1, 2), v(2 * ks + 1, 3));
  }
}

template <int NT>
AE_DEV void zero_acc(float (&c)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// ---- masks -------------------------------------------------------------------------
// A warp's accumulator tile holds, in this lane, 2 rows x (2 * NT) columns (C layout);
// element [nt][2 * rr + e] is bit 4 * nt + 2 * rr + e of a 32-bit "keep" mask. The
// masks are computed in rolled loops (one inlined copy of allowed()) before the GEMM
// that produces the tile, while few registers are live, and applied after it.

// Row-oriented tile: rows = queries i0 + 8 rr, columns = keys j0 + 8 nt + e.
// partial: the tile is Partial (per-element test, or the row's interval); otherwise only
// the sequence bounds are applied (a Full tile sticking out of [0, Nq) x [0, Nk)).
template <int NT>
AE_DEV uint32_t keep_rows(const MaskSpec& m, int64_t b, int64_t h, int64_t i0, int64_t j0, bool partial) {
  static_assert(NT * 4 <= 32, "one bit per element");
  uint32_t bits = 0;
#pragma unroll 1
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t i = i0 + 8 * rr;
    if (i >= m.nq) continue;  // padding rows keep nothing
    int64_t lo = 0, hi = m.nk;
    const bool interval = !partial || row_interval(m, i, &lo, &hi);
    hi = ae_min(hi, m.nk);
#pragma unroll 1
    for (int x = 0; x < 2 * NT; ++x) {
      const int64_t j = j0 + 8 * (x >> 1) + (x & 1);
      const bool ok = interval ? (j >= lo && j < hi) : (j < m.nk && allowed(m, b, h, i, j));
      bits |= uint32_t(ok) << (4 * (x >> 1) + 2 * rr + (x & 1));
    }
  }
  return bits;
}

// Transposed tile: rows = keys j0 + 8 rr, columns = queries i0 + 8 nt + e.
template <int NT>
AE_DEV uint32_t keep_cols(const MaskSpec& m, int64_t b, int64_t h, int64_t j0, int64_t i0, bool partial) {
  static_assert(NT * 4 <= 32, "one bit per element");
  uint32_t bits = 0;
#pragma unroll 1
  for (int x = 0; x < 2 * NT; ++x) {
    const int64_t i = i0 + 8 * (x >> 1) + (x & 1);
    if (i >= m.nq) continue;
    int64_t lo = 0, hi = m.nk;
    const bool interval = !partial || row_interval(m, i, &lo, &hi);
    hi = ae_min(hi, m.nk);
#pragma unroll 1
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t j = j0 + 8 * rr;
      const bool ok = interval ? (j >= lo && j < hi) : (j < m.nk && allowed(m, b, h, i, j));
      bits |= uint32_t(ok) << (4 * (x >> 1) + 2 * rr + (x & 1));
    }
  }
  return bits;
}

template <int NT>
AE_DEV void apply_keep(float (&s)[NT][4], uint32_t bits, float fill) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (!((bits >> (4 * nt + e)) & 1u)) s[nt][e] = fill;
}

// ---- tile schedule ---------------------------------------------------------------
// The non-Empty tiles a block visits are listed in shared memory ahead of the loop that
// computes them, in chunks of at most kSchedCap entries (index << 2 | class). classify()
// then runs in a rolled loop of warp 0 while no accumulator is live, instead of inside
// the pipelined loop, where its int64 arithmetic costs registers the GEMMs need.
constexpr int kSchedCap = 256;

struct SchedShared {
  int32_t list[kSchedCap];
  int count;
};

// Warp 0 lists the next non-Empty items of [pos, end) (whole 32-item batches, at most
// kSchedCap entries) and advances pos (meaningful in warp 0 only). Returns the number
// listed to every thread; 0 means the range is exhausted. Must be called by all threads
// at a point where no thread still reads the previous list (a barrier since).
template <typename ClassFn>
AE_DEV int sched_fill(SchedShared& sh, int64_t& pos, int64_t end, ClassFn cls_of) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int cnt = 0;
#pragma unroll 1
    while (pos < end && cnt + 32 <= kSchedCap) {
      const int64_t it = pos + lane;
      const int c = it < end ? cls_of(it) : int(kEmpty);
      const unsigned keep = __ballot_sync(0xffffffffu, c != kEmpty);
      if (c != kEmpty) sh.list[cnt + __popc(keep & ((1u << lane) - 1u))] = static_cast<int32_t>(it << 2) | c;
      cnt += __popc(keep);
      pos += 32;
    }
    if (lane == 0) sh.count = cnt;
  }
  __syncthreads();
  return sh.count;
}

// attention_ops.cu reserves 2 KB of shared memory for what the kernels declare statically
static_assert(sizeof(MaskSpec) + sizeof(SchedShared) + 64 <= 2048, "static shared memory exceeds its reserve");
static_assert(std::is_trivially_copyable_v<MaskSpec>, "the mask spec is copied into shared memory as bytes");

AE_DEV int64_t sched_index(int32_t e) { return e >> 2; }
AE_DEV int sched_class(int32_t e) { return e & 3; }

}  // namespace attention_ext::cuda
