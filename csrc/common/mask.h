// The one mask family shared by every exact-attention kernel, CPU and CUDA.
//
// A query row i (0 <= i < nq) sits at position p = i + offset with offset = nk - nq:
// queries are aligned bottom-right against the keys, as in FlashAttention, so a query
// block that is the tail of a longer key sequence (decoding with a KV cache) sees the
// right keys. Every kind below reads positions, never raw row indices.
//
//   allowed(i, j) = (base(i, j) || global_query(p) || global_key(j)) && (!causal || j <= p)
//                   && key_ok(b, j)
//
// Packed documents (cu_seqlens) are separate problems: document_mask() gives the spec of
// one document, whose rows and keys are counted from the document's start. The kernels
// map a document's rows onto the tensors' rows; the predicates below never see packing.
//
// key_ok is an optional per-batch key mask (padding): false keys are never attended.
//
// base(i, j) by kind:
//   Dense        true
//   Window       -right*d <= p - j <= left*d and (p - j) % d == 0          (d = dilation)
//   Neighborhood NATTEN 1-D: inside the dilation group of p (positions with the same
//                residue mod d), the kernel_size group members centred on p, shifted
//                inwards at the group's edges; causal: the kernel_size members ending at p.
//                na_nd > 0: NATTEN's rule on a 1-3-D token grid (na_allowed below).
//   BlockLayout  layout[h][i / block_size][j / block_size]
//
// Kernels walk (query tile, key tile) pairs, ask classify() whether a pair is Empty
// (skipped: this is why local patterns cost N*window and not N^2), Full (no per-element
// test) or Partial (allowed() per element), and use the band functions to avoid even
// visiting tiles that cannot intersect the pattern.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AE_HD __host__ __device__ __forceinline__
#else
#define AE_HD inline
#endif

namespace attention_ext {

enum MaskKind : int64_t { kDense = 0, kWindow = 1, kNeighborhood = 2, kBlockLayout = 3 };
enum TileClass : int { kEmpty = 0, kFull = 1, kPartial = 2 };

struct MaskSpec {
  int64_t kind = kDense;
  bool causal = false;
  int64_t left = 0, right = 0;   // Window: reach in dilated steps
  int64_t kernel_size = 1;       // Neighborhood
  int64_t dilation = 1;          // Window, Neighborhood
  int64_t num_global = 0;        // leading global positions
  // Optional per-batch global positions: prefix counts (B, prefix_stride) int32, so that
  // "any global in [a, b)" and "is global" are O(1) on host and device alike.
  const int32_t* global_prefix = nullptr;
  // Optional per-batch key mask (padding) as prefix counts (B, prefix_stride) int32 of the keys
  // that may be attended, so that "how many in [a, b)" is O(1).
  const int32_t* key_prefix = nullptr;
  // BlockLayout: bool (layout_heads, nqb, nkb); layout_heads is 1 (shared) or Hq.
  const bool* layout = nullptr;
  int64_t layout_heads = 1, nqb = 0, nkb = 0, block_size = 1;
  int64_t nq = 0, nk = 0, offset = 0;
  // Rows of the prefix arrays are prefix_stride long (the tensors' Nk + 1); key 0 of this
  // spec is key key_base of the row (a packed document's first key).
  int64_t prefix_stride = 1, key_base = 0;
  // Neighborhood on a grid (na_nd = 1..3 spatial dims; 0: the 1-D fields above). Arrays are
  // padded in front to 3 dims (extent, kernel, tile 1), so every function loops over 3.
  int64_t na_nd = 0;
  int64_t na_extent[3] = {1, 1, 1}, na_kernel[3] = {1, 1, 1}, na_dilation[3] = {1, 1, 1};
  int64_t na_stride[3] = {1, 1, 1}, na_tile[3] = {1, 1, 1};
  bool na_causal[3] = {false, false, false};
};

AE_HD int64_t ae_min(int64_t a, int64_t b) { return a < b ? a : b; }
AE_HD int64_t ae_max(int64_t a, int64_t b) { return a > b ? a : b; }
// ceil(a / b) for a >= 0, b > 0, without forming a + b - 1 (no overflow near INT64_MAX)
AE_HD int64_t ae_cdiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

AE_HD bool has_global(const MaskSpec& s) { return s.num_global > 0 || s.global_prefix != nullptr; }

// Number of global positions in [a, b) (clipped to [0, nk)) for batch b_idx.
AE_HD int64_t global_count(const MaskSpec& s, int64_t b_idx, int64_t a, int64_t b) {
  a = ae_max(a, 0);
  b = ae_min(b, s.nk);
  if (a >= b) return 0;
  if (s.global_prefix) {
    const int32_t* pre = s.global_prefix + b_idx * s.prefix_stride + s.key_base;
    int64_t lead = ae_max(ae_min(b, s.num_global) - a, 0);
    // positions below num_global are counted once even if also set in the mask
    int64_t a2 = ae_max(a, s.num_global);
    int64_t rest = a2 < b ? int64_t(pre[b] - pre[a2]) : 0;
    return lead + rest;
  }
  return ae_max(ae_min(b, s.num_global) - a, 0);
}

// The spec of one packed document: nq queries and nk keys, the first key at key k0 of
// the row. Positions, causality, windows, globals and blocks all restart at the
// document's start; queries are bottom-right aligned inside it.
AE_HD MaskSpec document_mask(const MaskSpec& s, int64_t k0, int64_t nq, int64_t nk) {
  MaskSpec m = s;
  m.nq = nq, m.nk = nk, m.offset = nk - nq;
  m.key_base = s.key_base + k0;
  return m;
}

AE_HD bool is_global(const MaskSpec& s, int64_t b_idx, int64_t pos) {
  return global_count(s, b_idx, pos, pos + 1) > 0;
}

// Keys of [a, b) (clipped to [0, nk)) that batch b_idx may attend (all without a key mask).
AE_HD int64_t key_count(const MaskSpec& s, int64_t b_idx, int64_t a, int64_t b) {
  a = ae_max(a, 0);
  b = ae_min(b, s.nk);
  if (a >= b) return 0;
  if (!s.key_prefix) return b - a;
  const int32_t* pre = s.key_prefix + b_idx * s.prefix_stride + s.key_base;
  return pre[b] - pre[a];
}

// NATTEN window start (position) for position p inside its dilation group.
AE_HD int64_t neighborhood_start(const MaskSpec& s, int64_t p) {
  const int64_t d = s.dilation, K = s.kernel_size;
  const int64_t g = p % d, ip = p / d;
  const int64_t len = (s.nk - g + d - 1) / d;  // members of this dilation group
  int64_t st;
  if (s.causal) {
    st = ae_max(ip - (K - 1), 0);
  } else {
    const int64_t ns = K / 2;
    st = ae_max(ip - ns, 0);
    if (ip + ns >= len) st += len - ip - ns - 1;
    st = ae_max(st, 0);
  }
  return st * d + g;
}

// ---- Neighborhood on a grid (na_nd > 0) ---------------------------------------------
//
// Token order (the caller permutes q, k, v into it: attention_ext/_neighborhood.py):
// along each dim the coordinate x becomes x' = start(g) + x / d, g = x % d (d the
// dilation): each dilation group is a contiguous run of length L(g) = ceil((E - g) / d).
// Every run is cut into boxes of na_tile tokens (the last one shorter), and tokens are
// ordered by box (lexicographic over dims), then row-major inside their box. A kernel tile
// of one box volume is then one box of one dilation group, and NATTEN's dilated window is
// an undilated interval of x' per dim, so tile pairs are tight.

// The dilation group holding x' along dim d: its first x' and length.
AE_HD void na_group(const MaskSpec& s, int d, int64_t u, int64_t* start, int64_t* len) {
  const int64_t E = s.na_extent[d], dil = s.na_dilation[d], q = E / dil, r = E % dil;
  if (u < r * (q + 1)) {
    *start = u / (q + 1) * (q + 1), *len = q + 1;
  } else {
    *start = r * (q + 1) + (u - r * (q + 1)) / q * q, *len = q;
  }
}

// The box holding x' = u along dim d: its first x' and extent.
AE_HD void na_dim_box(const MaskSpec& s, int d, int64_t u, int64_t* lo, int64_t* n) {
  int64_t start, len;
  na_group(s, d, u, &start, &len);
  const int64_t T = s.na_tile[d], t = (u - start) / T * T;
  *lo = start + t, *n = ae_min(T, len - t);
}

// Token idx's box: its first token (returned), first x' and extents per dim.
AE_HD int64_t na_box(const MaskSpec& s, int64_t idx, int64_t* lo, int64_t* n) {
  int64_t first = 0, h = 1, after = s.na_extent[1] * s.na_extent[2];
  for (int d = 0; d < 3; ++d) {
    const int64_t slab = h * after;  // tokens per x' step along d, inside the boxes of dims < d
    na_dim_box(s, d, (idx - first) / slab, &lo[d], &n[d]);
    first += lo[d] * slab;
    h *= n[d];
    if (d < 2) after /= s.na_extent[d + 1];
  }
  return first;
}

// x' coordinates of token idx; lo/n: its box, as na_box.
AE_HD void na_coords(const MaskSpec& s, int64_t idx, int64_t* x, int64_t* lo, int64_t* n) {
  int64_t local = idx - na_box(s, idx, lo, n);
  for (int d = 2; d >= 0; --d) {
    x[d] = lo[d] + local % n[d];
    local /= n[d];
  }
}

// First token of the box holding x' coordinates x, and the box's volume.
AE_HD int64_t na_box_start(const MaskSpec& s, const int64_t* x, int64_t* volume) {
  int64_t first = 0, h = 1, after = s.na_extent[1] * s.na_extent[2];
  for (int d = 0; d < 3; ++d) {
    int64_t lo, n;
    na_dim_box(s, d, x[d], &lo, &n);
    first += lo * h * after;
    h *= n;
    if (d < 2) after /= s.na_extent[d + 1];
  }
  *volume = h;
  return first;
}

// NATTEN's window of the query at x' = u along dim d, as keys [*w0, *w1) of x'
// (csrc/include/natten/cuda/reference/mask.hpp: get_win_start / get_win_end on the
// dilation group's index i and length L; stride: the query's stride group leader's window).
AE_HD void na_window(const MaskSpec& s, int d, int64_t u, int64_t* w0, int64_t* w1) {
  int64_t start, L;
  na_group(s, d, u, &start, &L);
  const int64_t i = u - start, K = s.na_kernel[d], S = s.na_stride[d];
  const int64_t wl = K / 2, wr = K / 2 + K % 2 - 1;  // an even kernel reaches one less ahead
  int64_t st, en;
  if (s.na_causal[d]) {
    const int64_t leader = ae_min(i / S * S + S - 1, L - 1);
    st = ae_max(leader - wl - wr, 0);
    en = ae_min(i + 1, L);
  } else {
    const int64_t leader = ae_min(i / S * S + S / 2, L - 1);
    st = ae_max(leader - wl, 0) + (leader + wr >= L ? L - wr - leader - 1 : 0);
    en = st + K;
  }
  *w0 = start + st, *w1 = start + en;
}

// Per-dim key windows [w0, w1) of x' for query token i.
AE_HD void na_row_window(const MaskSpec& s, int64_t i, int64_t* w0, int64_t* w1) {
  int64_t x[3], lo[3], n[3];
  na_coords(s, i, x, lo, n);
  for (int d = 0; d < 3; ++d) na_window(s, d, x[d], &w0[d], &w1[d]);
}

AE_HD bool na_allowed(const MaskSpec& s, int64_t i, int64_t j) {
  int64_t w0[3], w1[3], y[3], lo[3], n[3];
  na_row_window(s, i, w0, w1);
  na_coords(s, j, y, lo, n);
  for (int d = 0; d < 3; ++d)
    if (y[d] < w0[d] || y[d] >= w1[d]) return false;
  return true;
}

// Per-dim x' bounds [*a, *b] (inclusive) of every token of [t0, t1) (non-empty); *exact:
// the range is one whole box. Lexicographic order: the dims up to the first one where the
// ends differ are bounded exactly, the later ones by their box or the whole extent.
AE_HD void na_range_bounds(const MaskSpec& s, int64_t t0, int64_t t1, int64_t* a, int64_t* b, bool* exact) {
  int64_t xa[3], xb[3], la[3], lb[3], na[3], nb[3];
  na_coords(s, t0, xa, la, na);
  na_coords(s, t1 - 1, xb, lb, nb);
  const bool same_box = la[0] == lb[0] && la[1] == lb[1] && la[2] == lb[2];
  *exact = same_box && xa[0] == la[0] && xa[1] == la[1] && xa[2] == la[2] &&
           t1 - t0 == na[0] * na[1] * na[2];
  bool split = false;  // an earlier dim already differs
  for (int d = 0; d < 3; ++d) {
    if (same_box) {
      a[d] = split ? la[d] : xa[d];
      b[d] = split ? la[d] + na[d] - 1 : xb[d];
      split |= xa[d] != xb[d];
    } else {
      a[d] = split ? 0 : la[d];
      b[d] = split ? s.na_extent[d] - 1 : lb[d] + nb[d] - 1;
      split |= la[d] != lb[d];
    }
  }
}

// Tokens [*t0, *t1) covering every token whose x' lies in the per-dim bounds [a, b]
// (boxes are ordered lexicographically, so the boxes of the two corners bound them all).
AE_HD void na_bounds_range(const MaskSpec& s, const int64_t* a, const int64_t* b, int64_t* t0, int64_t* t1) {
  int64_t vol;
  *t0 = na_box_start(s, a, &vol);
  *t1 = na_box_start(s, b, &vol) + vol;
}

// Keys that queries [q0, q1) may see: the union of their windows (w0, w1 grow with x').
AE_HD void na_key_band(const MaskSpec& s, int64_t q0, int64_t q1, int64_t* k0, int64_t* k1) {
  int64_t a[3], b[3], w0[3], w1[3], unused;
  bool exact;
  na_range_bounds(s, q0, q1, a, b, &exact);
  for (int d = 0; d < 3; ++d) {
    na_window(s, d, a[d], &w0[d], &unused);
    na_window(s, d, b[d], &unused, &w1[d]);
    w1[d] -= 1;
  }
  na_bounds_range(s, w0, w1, k0, k1);
}

// Queries that may see keys [k0, k1): a query sees keys within kernel + stride of it
// along every dim, inside its own dilation group.
AE_HD void na_query_band(const MaskSpec& s, int64_t k0, int64_t k1, int64_t* q0, int64_t* q1) {
  int64_t a[3], b[3], g0, g1, len;
  bool exact;
  na_range_bounds(s, k0, k1, a, b, &exact);
  for (int d = 0; d < 3; ++d) {
    const int64_t reach = s.na_kernel[d] + s.na_stride[d];
    na_group(s, d, a[d], &g0, &len);
    na_group(s, d, b[d], &g1, &len);
    a[d] = ae_max(a[d] - (s.na_causal[d] ? 0 : reach), g0);  // causal: only queries at or after a key
    b[d] = ae_min(b[d] + reach, g1 + len - 1);
  }
  na_bounds_range(s, a, b, q0, q1);
}

AE_HD int na_classify(const MaskSpec& s, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  int64_t qa[3], qb[3], ka[3], kb[3];
  bool q_exact, k_exact;
  na_range_bounds(s, q0, q1, qa, qb, &q_exact);
  na_range_bounds(s, k0, k1, ka, kb, &k_exact);
  bool full = q_exact && k_exact;
  for (int d = 0; d < 3; ++d) {
    int64_t a0, a1, b0, b1;  // windows of the first and last query x'
    na_window(s, d, qa[d], &a0, &a1);
    na_window(s, d, qb[d], &b0, &b1);
    if (kb[d] < a0 || ka[d] >= b1) return kEmpty;
    full &= b0 <= ka[d] && kb[d] < a1;
  }
  return full ? kFull : kPartial;
}

AE_HD bool base_allowed(const MaskSpec& s, int64_t h, int64_t i, int64_t j) {
  const int64_t p = i + s.offset;
  switch (s.kind) {
    case kWindow: {
      const int64_t delta = p - j, d = s.dilation;
      return delta <= s.left * d && -delta <= s.right * d && delta % d == 0;
    }
    case kNeighborhood: {
      if (s.na_nd) return na_allowed(s, i, j);
      const int64_t d = s.dilation;
      if ((j - p) % d != 0) return false;
      const int64_t st = neighborhood_start(s, p);
      return j >= st && j <= st + (s.kernel_size - 1) * d;
    }
    case kBlockLayout: {
      const int64_t lh = s.layout_heads == 1 ? 0 : h;
      return s.layout[(lh * s.nqb + i / s.block_size) * s.nkb + j / s.block_size];
    }
    default:
      return true;
  }
}

AE_HD bool allowed(const MaskSpec& s, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t p = i + s.offset;
  if (s.causal && j > p) return false;
  if (s.key_prefix && key_count(s, b, j, j + 1) == 0) return false;
  if (base_allowed(s, h, i, j)) return true;
  return has_global(s) && (is_global(s, b, p) || is_global(s, b, j));
}

// How far (in positions) the base pattern of `s` reaches behind (lo) and ahead (hi)
// of the query position: base(i, j) implies p - lo <= j <= p + hi.
AE_HD void base_reach(const MaskSpec& s, int64_t* lo, int64_t* hi) {
  switch (s.kind) {
    case kWindow:
      *lo = s.left * s.dilation;
      *hi = s.right * s.dilation;
      break;
    case kNeighborhood:
      *lo = (s.kernel_size - 1) * s.dilation;
      *hi = s.causal ? 0 : (s.kernel_size - 1) * s.dilation;
      break;
    default:
      *lo = s.nk + s.nq;
      *hi = s.nk + s.nq;
  }
  if (s.causal) *hi = ae_min(*hi, 0);
}

// Keys that queries [q0, q1) may see through the base pattern and causality:
// [*k0, *k1). Global keys outside it are found by classify().
AE_HD void key_band(const MaskSpec& s, int64_t q0, int64_t q1, int64_t* k0, int64_t* k1) {
  if (s.kind == kNeighborhood && s.na_nd) return na_key_band(s, q0, q1, k0, k1);
  int64_t lo, hi;
  base_reach(s, &lo, &hi);
  *k0 = ae_max(0, q0 + s.offset - lo);
  *k1 = ae_min(s.nk, q1 - 1 + s.offset + hi + 1);
}

// Queries that keys [k0, k1) may be seen by through the base pattern: [*q0, *q1).
AE_HD void query_band(const MaskSpec& s, int64_t k0, int64_t k1, int64_t* q0, int64_t* q1) {
  if (s.kind == kNeighborhood && s.na_nd) return na_query_band(s, k0, k1, q0, q1);
  int64_t lo, hi;
  base_reach(s, &lo, &hi);
  *q0 = ae_max(0, k0 - hi - s.offset);
  *q1 = ae_min(s.nq, k1 - 1 + lo - s.offset + 1);
}

// Key tiles of edge bk (tile t = keys [t * bk, (t + 1) * bk)) that queries [q0, q1) may
// touch: [*t0, *t1), empty when none. With global positions any tile may hold one, so
// all are returned (classify() then skips the Empty ones).
AE_HD void key_tile_range(const MaskSpec& s, int64_t q0, int64_t q1, int64_t bk, int64_t* t0, int64_t* t1) {
  if (has_global(s)) {
    *t0 = 0, *t1 = ae_cdiv(s.nk, bk);
    return;
  }
  int64_t k0, k1;
  key_band(s, q0, q1, &k0, &k1);
  *t0 = k0 / bk;
  *t1 = k1 > k0 ? ae_cdiv(k1, bk) : *t0;
}

// Query tiles of edge bq that keys [k0, k1) may be seen by: [*t0, *t1), as key_tile_range.
AE_HD void query_tile_range(const MaskSpec& s, int64_t k0, int64_t k1, int64_t bq, int64_t* t0, int64_t* t1) {
  if (has_global(s)) {
    *t0 = 0, *t1 = ae_cdiv(s.nq, bq);
    return;
  }
  int64_t a, b;
  query_band(s, k0, k1, &a, &b);
  *t0 = a / bq;
  *t1 = b > a ? ae_cdiv(b, bq) : *t0;
}

// Class of the base pattern alone on the tile [q0, q1) x [k0, k1) (both non-empty,
// already clipped to the sequence lengths).
AE_HD int classify_base(const MaskSpec& s, int64_t h, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  const int64_t p0 = q0 + s.offset, p1 = q1 - 1 + s.offset;
  if (s.causal && k0 > p1) return kEmpty;
  const bool causal_full = !s.causal || k1 - 1 <= p0;
  switch (s.kind) {
    case kWindow: {
      const int64_t L = s.left * s.dilation, R = s.right * s.dilation;
      if (p1 - k0 < -R || p0 - (k1 - 1) > L) return kEmpty;
      const bool full = s.dilation == 1 && p0 - (k1 - 1) >= -R && p1 - k0 <= L;
      return full && causal_full ? kFull : kPartial;
    }
    case kNeighborhood: {
      if (s.na_nd) return na_classify(s, q0, q1, k0, k1);
      const int64_t reach = (s.kernel_size - 1) * s.dilation;
      if (k0 > p1 + (s.causal ? 0 : reach) || k1 - 1 < p0 - reach) return kEmpty;
      return kPartial;
    }
    case kBlockLayout: {
      const int64_t lh = s.layout_heads == 1 ? 0 : h;
      const bool* row0 = s.layout + lh * s.nqb * s.nkb;
      bool any = false, all = true;
      for (int64_t qb = q0 / s.block_size; qb <= (q1 - 1) / s.block_size; ++qb)
        for (int64_t kb = k0 / s.block_size; kb <= (k1 - 1) / s.block_size; ++kb) {
          const bool v = row0[qb * s.nkb + kb];
          any |= v;
          all &= v;
        }
      if (!any) return kEmpty;
      return all && causal_full ? kFull : kPartial;
    }
    default:
      return causal_full ? kFull : kPartial;
  }
}

// Class of base, globals and causality on a tile, for batch b, head h.
AE_HD int classify_unpadded(const MaskSpec& s, int64_t b, int64_t h, int64_t q0, int64_t q1, int64_t k0,
                            int64_t k1) {
  const int cls = classify_base(s, h, q0, q1, k0, k1);
  if (cls == kFull || !has_global(s)) return cls;
  const int64_t p1 = q1 - 1 + s.offset;
  if (s.causal && k0 > p1) return kEmpty;
  if (global_count(s, b, q0 + s.offset, q1 + s.offset) > 0 || global_count(s, b, k0, k1) > 0)
    return kPartial;
  return cls;
}

// Class of the full mask (with the key mask) on a tile, for batch b, head h.
AE_HD int classify(const MaskSpec& s, int64_t b, int64_t h, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  const int cls = classify_unpadded(s, b, h, q0, q1, k0, k1);
  if (!s.key_prefix || cls == kEmpty) return cls;
  const int64_t n = key_count(s, b, k0, k1);
  if (n == 0) return kEmpty;
  return n < ae_min(k1, s.nk) - ae_max(k0, 0) ? kPartial : cls;
}

// Per-row allowed key interval [*j0, *j1) when the mask of row i is one contiguous run
// (dense, causal, undilated windows and neighborhoods, no globals, no key mask); returns
// false when the row needs the per-element test.
AE_HD bool row_interval(const MaskSpec& s, int64_t i, int64_t* j0, int64_t* j1) {
  if (has_global(s) || s.key_prefix || s.kind == kBlockLayout) return false;
  if (s.kind == kNeighborhood && s.na_nd) {
    // one run along the grid's last dim when it is the only one longer than 1
    if (s.na_extent[0] != 1 || s.na_extent[1] != 1) return false;
    int64_t w0[3], w1[3];
    na_row_window(s, i, w0, w1);
    *j0 = w0[2], *j1 = w1[2];
    return true;
  }
  if (s.dilation != 1) return false;
  const int64_t p = i + s.offset;
  if (s.kind == kNeighborhood) {
    const int64_t st = neighborhood_start(s, p);
    *j0 = st;
    *j1 = ae_min(st + s.kernel_size, s.causal ? p + 1 : s.nk);
    return true;
  }
  int64_t lo, hi;
  base_reach(s, &lo, &hi);
  *j0 = ae_max(0, p - lo);
  *j1 = ae_min(s.nk, p + hi + 1);
  return true;
}

}  // namespace attention_ext
