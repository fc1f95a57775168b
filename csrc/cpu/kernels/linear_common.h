// Pieces shared by the linear-attention CPU kernels (linear_fwd.cpp, linear_bwd.cpp).
//
// Layouts inside one task (acc_t = float, double for float64 inputs; VL its vector width):
//   C = chunk rows, Cp = round_up(C, VL), Dp = round_up(D, VL), Dvp = round_up(Dv, VL)
//   fq  [C][Dp]    scale * phi(q) of one query head's chunk
//   fk  [C][Dp]    phi(k) rows (A operand of fk^T v read through strides, B of dA fk)
//   fkT [D][Cp]    phi(k)^T, transposed from fk (B operand of fq fk^T)
//   v   [C][Dvp]   v rows;  vT [Dv][Cp] (backward: B operand of g v^T)
//   state          S [D][Dvp] followed by z [Dp]: Dims::state elements
// Feature maps run vectorised on rows (features_row); phi' comes from the same pass.
// Padding rows/columns are zero, so products may run over padded widths.
//
// bf16 inputs where the module has bf16 tile products (linear_bf16.h) run the chunk
// products on bf16 operands with fp32 accumulation: phi(q), phi(k), the intra-chunk scores
// A and dA, g and the states S and G are rounded to bf16 as product operands only (as
// FlashAttention rounds P); the state deltas (fp32 fk^T v), the running states, z, the
// normaliser and every other sum stay fp32.
//
// Summation orders depend on the shape and the chunk size only: every task computes the
// same numbers whichever thread runs it and however the chunks are split into passes.
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../common/linear.h"
#include "gemm.h"
#include "kernels.h"
#include "linear_bf16.h"
#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace linear {

template <typename acc_t>
struct Dims {
  static constexpr int64_t VL = Vec<acc_t>::size();
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv, C;
  int64_t Cp, Dp, Dvp, group, state;

  Dims(int64_t B_, int64_t Hq_, int64_t Hkv_, int64_t Nq_, int64_t Nk_, int64_t D_, int64_t Dv_, int64_t chunk)
      : B(B_), Hq(Hq_), Hkv(Hkv_), Nq(Nq_), Nk(Nk_), D(D_), Dv(Dv_) {
    C = std::max<int64_t>(1, std::min(chunk, std::max(Nq, Nk)));
    Cp = round_up(C, VL);
    Dp = round_up(D, VL);
    Dvp = round_up(Dv, VL);
    group = Hq / Hkv;
    state = D * Dvp + Dp;
  }
};

// A run of rows with a state of its own: the queries [q0, q0 + nq) and keys [k0, k0 + nk)
// of batch row b, which is the whole row or (cu_seqlens) one document of it. Its chunks
// count from its start, ncq and nck of them. Segment g and kv head hk own state row
// g * Hkv + hk: the caller's states are (segments, Hkv, ...).
struct Segment {
  int64_t b, q0, nq, k0, nk, ncq, nck;
};

template <class Args>
std::vector<Segment> segments_of(const Args& a, int64_t C) {
  std::vector<Segment> segs(size_t(a.segments));
  for (int64_t g = 0; g < a.segments; ++g) {
    Segment& sg = segs[size_t(g)];
    if (a.cu_seqlens) {
      sg.b = 0, sg.q0 = sg.k0 = a.cu_seqlens[g];
      sg.nq = sg.nk = a.cu_seqlens[g + 1] - a.cu_seqlens[g];
    } else {
      sg.b = g, sg.q0 = sg.k0 = 0, sg.nq = a.Nq, sg.nk = a.Nk;
    }
    sg.ncq = (sg.nq + C - 1) / C;
    sg.nck = (sg.nk + C - 1) / C;
  }
  return segs;
}

// Per-chunk cells of rows 0..R-1 (a row: a segment and a head), row after row; row r has
// off[r + 1] - off[r] of them. Uniform counts (no cu_seqlens) give the [row][chunk] layout.
struct ChunkIndex {
  std::vector<int64_t> off;

  template <class Count>
  ChunkIndex(int64_t rows, const Count& count) : off(size_t(rows) + 1, 0) {
    for (int64_t r = 0; r < rows; ++r) off[size_t(r) + 1] = off[size_t(r)] + count(r);
  }
  int64_t rows() const { return int64_t(off.size()) - 1; }
  int64_t total() const { return off.back(); }
  int64_t count(int64_t r) const { return off[size_t(r) + 1] - off[size_t(r)]; }
  int64_t cell(int64_t r, int64_t c) const { return off[size_t(r)] + c; }
  // (row, chunk) of cell t < total()
  std::pair<int64_t, int64_t> locate(int64_t t) const {
    const int64_t r = int64_t(std::upper_bound(off.begin(), off.end(), t) - off.begin()) - 1;
    return {r, t - off[size_t(r)]};
  }
};

template <typename scalar_t>
inline const scalar_t* row_ptr(const Operand& op, int64_t b, int64_t h, int64_t n) {
  return static_cast<const scalar_t*>(op.data) + b * op.stride[0] + h * op.stride[1] + n * op.stride[2];
}

// x[c] = mult * phi(x[c]) for c < n, in place; dphi[c] = phi'(x[c]) when not null.
template <typename acc_t>
void features_row(acc_t* x, int64_t n, int64_t fmap, acc_t mult, acc_t* dphi) {
  using V = Vec<acc_t>;
  const V one(acc_t(1)), zero(acc_t(0)), m(mult);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V v = V::loadu(x + c);
    V f = v, g = one;
    if (fmap == kFeatureElu) {
      f = V::blendv(v.exp(), v + one, v > zero);
      g = at::vec::minimum(f, one);  // exp(x) for x <= 0, 1 above
    } else if (fmap == kFeatureRelu) {
      f = V::blendv(v, zero, v < zero);
      g = V::blendv(zero, one, v > zero);
    }
    (f * m).store(x + c);
    if (dphi) g.store(dphi + c);
  }
  for (; c < n; ++c) {
    if (dphi) dphi[c] = feature_grad<acc_t>(fmap, x[c]);
    x[c] = feature<acc_t>(fmap, x[c]) * mult;
  }
}

// dst[r][c] = mult * phi(src[r][c]) for r < rows, c < cols; zero up to ld and rows_pad.
// dphi (same layout, optional) gets phi'(src[r][c]).
template <typename scalar_t, typename acc_t>
void load_features(const scalar_t* src, int64_t s_row, int64_t s_col, int64_t rows, int64_t cols, int64_t fmap,
                   acc_t mult, acc_t* dst, int64_t ld, int64_t rows_pad, acc_t* dphi = nullptr) {
  load_rows(src, s_row, s_col, rows, cols, dst, ld, rows_pad);
  for (int64_t r = 0; r < rows; ++r) features_row(dst + r * ld, cols, fmap, mult, dphi ? dphi + r * ld : nullptr);
}

// dst[c][r] = src[r][c] for a dense acc_t block (rows x cols, leading dim lds) into
// dst with leading dim ldd; dst columns rows..ldd zero.
template <typename acc_t>
void transpose_block(const acc_t* src, int64_t lds, int64_t rows, int64_t cols, acc_t* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  // whole 16 x 16 blocks in registers (src rows readable to round_up(cols, 16), as the
  // padded layouts are); a per-element transpose costs about as much as a chunk product
  if constexpr (std::is_same_v<acc_t, float>) {
    if (ldd % 16 == 0 && lds >= round_up(cols, 16)) {
      for (int64_t r0 = 0; r0 < ldd; r0 += 16)
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
          __m512 t[16];
          load_transposed_16(src + r0 * lds + c0, lds, rows - r0, t);
          for (int64_t i = 0; i < std::min<int64_t>(16, cols - c0); ++i) _mm512_storeu_ps(dst + (c0 + i) * ldd + r0, t[i]);
        }
      return;
    }
  }
#endif
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = rows; r < ldd; ++r) dst[c * ldd + r] = acc_t(0);
  constexpr int64_t RB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += RB) {
    const int64_t r1 = std::min(rows, r0 + RB);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
}

// Row blocks of the micro kernel's height, so triangular products skip the zero half.
template <typename acc_t>
constexpr int64_t kRowBlock = Blocking<acc_t>::MR;

// Lower-triangular C = A B^T-shaped products: rows [0, m) of C (ld ldc), where row i
// needs columns j <= i only. Computes columns [0, round_up(min(i_end, ncols), VL)) of each
// row block; the caller masks the rest.
// T: the operand type of tile_gemm (acc_t, or bf16 with B in VNNI pairs).
template <typename T, typename acc_t>
void gemm_lower_cols(int64_t m, int64_t ncols, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb,
                     acc_t* c, int64_t ldc) {
  constexpr int64_t VL = Vec<acc_t>::size(), MR = kRowBlock<acc_t>;
  for (int64_t m0 = 0; m0 < m; m0 += MR) {
    const int64_t mr = std::min(MR, m - m0);
    const int64_t nc = round_up(std::min(m0 + mr, ncols), VL);
    tile_gemm(mr, nc, K, a + m0 * lda, lda, b, ldb, c + m0 * ldc, ldc, false);
  }
}

// C (+)= L B with L lower triangular (row i reads L[i][k] for k <= i): each row block
// runs K up to its last row.
template <typename T, typename acc_t>
void gemm_lower_a(int64_t m, int64_t N, const T* l, int64_t ldl, const T* b, int64_t ldb, acc_t* c, int64_t ldc,
                  bool accumulate) {
  constexpr int64_t MR = kRowBlock<acc_t>;
  for (int64_t m0 = 0; m0 < m; m0 += MR) {
    const int64_t mr = std::min(MR, m - m0);
    tile_gemm(mr, N, m0 + mr, l + m0 * ldl, ldl, b, ldb, c + m0 * ldc, ldc, accumulate);
  }
}

// C += U B with U (m x m) upper triangular held as rows (row j reads U[j][k] for k >= j):
// gemm_lower_t's product when L^T has been transposed into rows (bf16 A operands have no
// strides). Row blocks start on even K, as bf16 pairs need.
template <typename T, typename acc_t>
void gemm_upper_a(int64_t m, int64_t N, const T* u, int64_t ldu, const T* b, int64_t ldb, acc_t* c, int64_t ldc) {
  constexpr int64_t MR = kRowBlock<acc_t>;
  static_assert(MR % 2 == 0);
  for (int64_t j0 = 0; j0 < m; j0 += MR) {
    const int64_t mr = std::min(MR, m - j0);
    tile_gemm(mr, N, m - j0, u + j0 * ldu + j0, ldu, b_at(b, j0, ldb), ldb, c + j0 * ldc, ldc, true);
  }
}

// C (+)= L^T B with L (m x m, ld ldl) lower triangular: row j of C reads L[i][j] for
// i >= j, i < m.
template <typename acc_t>
void gemm_lower_t(int64_t m, int64_t N, const acc_t* l, int64_t ldl, const acc_t* b, int64_t ldb, acc_t* c,
                  int64_t ldc, bool accumulate) {
  constexpr int64_t MR = kRowBlock<acc_t>;
  for (int64_t j0 = 0; j0 < m; j0 += MR) {
    const int64_t mr = std::min(MR, m - j0);
    // A(i, k) = L[j0 + k][j0 + i]
    gemm<acc_t>(mr, N, m - j0, l + j0 * ldl + j0, 1, ldl, b + j0 * ldb, ldb, c + j0 * ldc, ldc, accumulate);
  }
}

// sum_x a[x] * b[x] for x < n, n a multiple of the vector width: in vector lanes, then
// across them (a serial chain of fp32 adds costs their latency per element).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using V = Vec<acc_t>;
  V s(acc_t(0));
  for (int64_t x = 0; x < n; x += V::size()) s = at::vec::fmadd(V::loadu(a + x), V::loadu(b + x), s);
  return hsum(s);
}

// y[0, n) += alpha * x[0, n), n a multiple of the vector width.
template <typename acc_t>
inline void axpy(acc_t alpha, const acc_t* x, int64_t n, acc_t* y) {
  using V = Vec<acc_t>;
  const V va(alpha);
  for (int64_t i = 0; i < n; i += V::size()) at::vec::fmadd(va, V::loadu(x + i), V::loadu(y + i)).store(y + i);
}

// dst[0, n) = src as scalar_t (bf16/fp16: vectorised rounding).
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>)
    std::copy(src, src + n, dst);
  else
    at::vec::convert(src, dst, n);
}

// Zeroes row r's columns (r, ld) of an m x ld lower-triangular tile (ld a multiple of the
// vector width); with rowsum != nullptr also stores sum_{j <= r} tile[r][j].
template <typename acc_t>
void mask_lower(int64_t m, acc_t* tile, int64_t ld, acc_t* rowsum) {
  constexpr int64_t VL = Vec<acc_t>::size();
  using V = Vec<acc_t>;
  for (int64_t r = 0; r < m; ++r) {
    acc_t* row = tile + r * ld;
    for (int64_t j = r + 1; j < ld; ++j) row[j] = acc_t(0);
    if (rowsum) {
      V s(acc_t(0));
      for (int64_t j = 0; j <= r; j += VL) s = s + V::loadu(row + j);
      rowsum[r] = hsum(s);
    }
  }
}

// bf16 tiles: one task's bf16 operands (linear_bf16.h), rows or VNNI pairs ("_pairs",
// along the product's K) of the fp32 blocks of the same name.
struct Bf16Ops {
  // key chunk: fk^T pairs along D (scores), v pairs along keys; backward: fk rows, fk
  // pairs along keys, v rows, v^T pairs along Dv
  bf16 *fkT_pairs, *v_pairs, *fk, *fk_pairs, *v, *vT_pairs;
  // states: S pairs along D (forward), S^T pairs along Dv, G^T pairs along Dv, G pairs along D
  bf16 *S_pairs, *ST_pairs, *GT_pairs, *G_pairs;
  // query chunk: fq rows, fq^T rows, fq pairs along queries, g rows and pairs, A, A^T, dA, dA^T rows
  bf16 *fq, *fqT, *fq_pairs, *g, *g_pairs, *A, *AT, *dA, *dAT;

  // Carves the operands from p (null: only counts); returns the elements used.
  template <typename acc_t>
  int64_t carve(const Dims<acc_t>& d, bf16* p) {
    int64_t used = 0;
    auto take = [&](bf16*& x, int64_t n) {
      x = p ? p + used : nullptr;
      used += n;
    };
    const int64_t CD = d.Cp * d.Dp, CV = d.Cp * d.Dvp, DV = d.Dp * d.Dvp, CC = d.Cp * d.Cp;
    take(fkT_pairs, CD), take(v_pairs, CV), take(fk, CD), take(fk_pairs, CD), take(v, CV);
    take(vT_pairs, CV), take(S_pairs, DV), take(ST_pairs, DV), take(GT_pairs, DV), take(G_pairs, DV);
    take(fq, CD), take(fqT, CD), take(fq_pairs, CD), take(g, CV), take(g_pairs, CV);
    take(A, CC), take(AT, CC), take(dA, CC), take(dAT, CC);
    return used;
  }
};

// Chunk state delta: dS = fk^T v (D x Dvp), dz = column sums of fk (Dp, keys summed in
// order), for the chunk's n keys held as fk [n][Dp] and v [n][Dvp]. fp32 products for
// bf16 inputs too: the returned state keeps fp32 accuracy (bf16 phi(k) would cost it
// about 2^-9 relative).
template <typename acc_t>
void chunk_state(const Dims<acc_t>& d, int64_t n, const acc_t* fk, const acc_t* v, acc_t* st) {
  gemm<acc_t>(d.D, d.Dvp, n, fk, 1, d.Dp, v, d.Dvp, st, d.Dvp, false);
  acc_t* z = st + d.D * d.Dvp;
  std::fill(z, z + d.Dp, acc_t(0));
  for (int64_t j = 0; j < n; ++j) {
    const acc_t* row = fk + j * d.Dp;
    for (int64_t x = 0; x < d.Dp; ++x) z[x] += row[x];
  }
}

// dst += src over n elements of one padded state (Dims::state of them).
template <typename acc_t>
inline void state_add(acc_t* dst, const acc_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// Unpacks a contiguous (D, Dv) + (D) state of the caller (or zeros) into the padded
// layout, and back.
template <typename acc_t>
void state_in(const Dims<acc_t>& d, const acc_t* S, const acc_t* z, acc_t* st) {
  std::fill(st, st + d.state, acc_t(0));
  if (S)
    for (int64_t x = 0; x < d.D; ++x) std::copy(S + x * d.Dv, S + (x + 1) * d.Dv, st + x * d.Dvp);
  if (z) std::copy(z, z + d.D, st + d.D * d.Dvp);
}

template <typename acc_t>
void state_out(const Dims<acc_t>& d, const acc_t* st, acc_t* S, acc_t* z) {
  for (int64_t x = 0; x < d.D; ++x) std::copy(st + x * d.Dvp, st + x * d.Dvp + d.Dv, S + x * d.Dv);
  std::copy(st + d.D * d.Dvp, st + d.D * d.Dvp + d.D, z);
}

// Scan of per-chunk states (Dims::state elements each, laid out by `index`) over each row's
// chunks, split across tasks by slices of the state. run[r] starts as the caller set it and
// ends as the sum of every delta of row r; with `exclusive` each cell becomes the running
// value before it; `reverse` walks the chunks backwards.
template <typename acc_t>
void scan_chunks(const ChunkIndex& index, int64_t state, acc_t* cells, acc_t* run_all, bool exclusive,
                 bool reverse) {
  const int64_t slice = 512, nslices = (state + slice - 1) / slice;
  parallel_tasks(index.rows() * nslices, [&](int64_t t) {
    const int64_t r = t / nslices, s0 = (t % nslices) * slice, len = std::min(slice, state - s0);
    const int64_t nc = index.count(r);
    acc_t* run = run_all + r * state + s0;
    for (int64_t i = 0; i < nc; ++i) {
      const int64_t c = reverse ? nc - 1 - i : i;
      acc_t* cell = cells + index.cell(r, c) * state + s0;
      if (exclusive)
        for (int64_t e = 0; e < len; ++e) {
          const acc_t delta = cell[e];
          cell[e] = run[e];
          run[e] += delta;
        }
      else
        state_add(run, cell, len);
    }
  });
}

// What the forward and backward kernels share: the call, its dims, and the loaders of the
// chunk operands and of the caller's states. Args: LinearFwdArgs or LinearBwdArgs.
template <typename scalar_t, typename acc_t, class Args>
struct ChunkKernel {
  static constexpr bool kBf16 = bf16_tiles<scalar_t>();
  const Args& a;
  Dims<acc_t> d;
  acc_t scale, eps;
  std::vector<Segment> segs;

  explicit ChunkKernel(const Args& args)
      : a(args),
        d(args.B, args.Hq, args.Hkv, args.Nq, args.Nk, args.D, args.Dv, args.chunk),
        scale(acc_t(args.scale)),
        eps(acc_t(args.eps)),
        segs(segments_of(args, d.C)) {}

  // State rows: (segment, kv head) pairs.
  int64_t state_rows() const { return a.segments * d.Hkv; }
  const Segment& seg_of_row(int64_t r) const { return segs[size_t(r / d.Hkv)]; }
  // Cells of the key chunks (kv rows), of the query chunks per kv row, and per query head row.
  ChunkIndex key_cells() const {
    return ChunkIndex(state_rows(), [&](int64_t r) { return seg_of_row(r).nck; });
  }
  ChunkIndex query_cells() const {
    return ChunkIndex(state_rows(), [&](int64_t r) { return seg_of_row(r).ncq; });
  }
  ChunkIndex head_query_cells() const {
    return ChunkIndex(a.segments * d.Hq, [&](int64_t r) { return segs[size_t(r / d.Hq)].ncq; });
  }
  // First row and row count of chunk c of a segment's queries / keys.
  int64_t q_begin(const Segment& sg, int64_t c) const { return sg.q0 + c * d.C; }
  int64_t q_len(const Segment& sg, int64_t c) const { return std::min(d.C, sg.nq - c * d.C); }
  int64_t k_begin(const Segment& sg, int64_t c) const { return sg.k0 + c * d.C; }
  int64_t k_len(const Segment& sg, int64_t c) const { return std::min(d.C, sg.nk - c * d.C); }

  // Key chunk of a kv head: phi(k) rows fk [C][Dp] and transposed fkT [D][Cp], v rows
  // [C][Dvp]; with_grad layouts (the backward) add phi'(k) dphi [C][Dp] and vT [Dv][Cp].
  struct KV {
    acc_t *fk, *fkT, *v, *dphi, *vT;
  };
  int64_t kv_size(bool with_grad) const {
    return d.C * d.Dp + d.D * d.Cp + d.C * d.Dvp + (with_grad ? d.C * d.Dp + d.Dv * d.Cp : 0);
  }
  KV kv_at(acc_t* p, bool with_grad) const {
    KV kv;
    kv.fk = p;
    kv.fkT = kv.fk + d.C * d.Dp;
    kv.v = kv.fkT + d.D * d.Cp;
    kv.dphi = with_grad ? kv.v + d.C * d.Dvp : nullptr;
    kv.vT = with_grad ? kv.dphi + d.C * d.Dp : nullptr;
    return kv;
  }
  // Key chunk kc of segment sg, kv head hk: rows always; the transposed forms when
  // `transposed` (vT where the layout has it), phi'(k) when `dphi`; bf16 tiles: the bf16
  // operands of those forms in `ops`. Returns the chunk's key count.
  int64_t load_kv(const Segment& sg, int64_t hk, int64_t kc, const KV& kv, bool transposed, bool dphi,
                  const Bf16Ops& ops) const {
    const int64_t k0 = k_begin(sg, kc), n = k_len(sg, kc);
    load_features(row_ptr<scalar_t>(a.k, sg.b, hk, k0), a.k.stride[2], a.k.stride[3], n, d.D, a.feature_map,
                  acc_t(1), kv.fk, d.Dp, d.C, dphi ? kv.dphi : nullptr);
    load_rows(row_ptr<scalar_t>(a.v, sg.b, hk, k0), a.v.stride[2], a.v.stride[3], n, d.Dv, kv.v, d.Dvp, d.C);
    if (transposed) {
      transpose_block(kv.fk, d.Dp, n, d.D, kv.fkT, d.Cp);
      if (kv.vT) transpose_block(kv.v, d.Dvp, n, d.Dv, kv.vT, d.Cp);
    }
    if constexpr (kBf16) {
      if (transposed) {  // the intra-chunk products
        pack_pairs(kv.fkT, d.Cp, d.D, d.Cp, ops.fkT_pairs, round_up(d.D, 2));
        pack_pairs(kv.v, d.Dvp, d.C, d.Dvp, ops.v_pairs, d.Cp);
        if (kv.vT) {
          pack_pairs(kv.fk, d.Dp, d.C, d.Dp, ops.fk_pairs, d.Cp);
          pack_pairs(kv.vT, d.Cp, d.Dv, d.Cp, ops.vT_pairs, round_up(d.Dv, 2));
        }
      }
      if (dphi) {  // key_finish
        round_rows(kv.fk, d.Dp, d.C, d.Dp, ops.fk, d.Dp, d.C);
        round_rows(kv.v, d.Dvp, d.C, d.Dvp, ops.v, d.Dvp, d.C);
      }
    }
    return n;
  }

  // This task's bf16 operands (bf16 tiles only; empty otherwise).
  Bf16Ops bf16_ops() const {
    Bf16Ops ops{};
    if constexpr (kBf16) ops.carve(d, task_scratch<bf16>(ops.carve(d, nullptr)));
    return ops;
  }

  // fq [C][Dp] = scale * phi(q) of query chunk qc of segment sg, head h; dphi (optional)
  // gets phi'(q). Returns the chunk's query count.
  int64_t load_queries(const Segment& sg, int64_t h, int64_t qc, acc_t* fq, acc_t* dphi) const {
    const int64_t q0 = q_begin(sg, qc), m = q_len(sg, qc);
    load_features(row_ptr<scalar_t>(a.q, sg.b, h, q0), a.q.stride[2], a.q.stride[3], m, d.D, a.feature_map, scale,
                  fq, d.Dp, m, dphi);
    return m;
  }

  // The padded state of state row bh from the caller's contiguous (segments, Hkv, D, Dv) +
  // (segments, Hkv, D) arrays (null: zeros), and back.
  void load_state(const void* S, const void* z, int64_t bh, acc_t* st) const {
    const auto* Sp = static_cast<const acc_t*>(S);
    const auto* zp = static_cast<const acc_t*>(z);
    state_in(d, Sp ? Sp + bh * d.D * d.Dv : nullptr, zp ? zp + bh * d.D : nullptr, st);
  }
  void store_state(void* S, void* z, int64_t bh, const acc_t* st) const {
    state_out(d, st, static_cast<acc_t*>(S) + bh * d.D * d.Dv, static_cast<acc_t*>(z) + bh * d.D);
  }
};

// Whether one task per state row (segment, kv head) keeps every thread busy; otherwise the kernels
// split the sequence into chunk tasks and scan the chunk states in a separate pass.
// Both ways run the same arithmetic in the same order, so the choice (which depends
// on the thread count) never changes a bit of the result.
inline bool one_task_per_head(int64_t bh) {
  const int64_t t = at::get_num_threads();
  return t <= 1 || (bh >= t && (bh % t == 0 || bh >= 4 * t));
}

}  // namespace linear
}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
