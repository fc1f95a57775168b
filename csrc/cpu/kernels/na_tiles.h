// Grid neighborhoods (mask.h, na_nd > 0) on the CPU: what mask.h computes per call of
// classify() / allowed() from token indices (coordinate decoding, a few dozen integer
// divisions), computed once per op call: every query's windows, every tile's bounds and
// boxes. Tile pairs are then classified and masked with comparisons only.
#pragma once

#include <vector>

#include "../../common/mask.h"
#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

class NaTiles {
 public:
  // Off (on() false) unless m is a grid neighborhood without a key mask.
  NaTiles(const MaskSpec& m, int64_t bq, int64_t bk) : m_(m), bq_(bq), bk_(bk) {
    if (m.kind != kNeighborhood || !m.na_nd || m.key_prefix) return;
    on_ = true;
    win_.resize(m.nq * 6);
    parallel_tasks(ae_cdiv(m.nq, 256), [&](int64_t t) {
      for (int64_t i = t * 256; i < ae_min(m.nq, (t + 1) * 256); ++i) na_row_window(m, i, &win_[i * 6], &win_[i * 6 + 3]);
    });
    for (int64_t q0 = 0; q0 < m.nq; q0 += bq) {
      Bounds t = bounds(q0, ae_min(q0 + bq, m.nq));
      for (int d = 0; d < 3; ++d) {  // windows grow with x': the first and last x' bound them all
        int64_t w[4];
        na_window(m, d, t.a[d], &w[0], &w[1]);
        na_window(m, d, t.b[d], &w[2], &w[3]);
        t.w_first_end[d] = w[1], t.w_last_begin[d] = w[2];
        t.a[d] = w[0], t.b[d] = w[3] - 1;  // from here on: the keys the tile's windows cover
      }
      qt_.push_back(t);
    }
    for (int64_t k0 = 0; k0 < m.nk; k0 += bk) {
      const int64_t k1 = ae_min(k0 + bk, m.nk);
      kt_.push_back(bounds(k0, k1));
      kt_.back().box0 = int64_t(boxes_.size());
      for (int64_t k = k0; k < k1;) {
        Box x;
        x.first = na_box(m, k, x.lo, x.n);
        x.stop = ae_min(x.first + x.n[0] * x.n[1] * x.n[2], k1);
        boxes_.push_back(x);
        k = x.stop;
      }
      kt_.back().box1 = int64_t(boxes_.size());
    }
  }

  bool on() const { return on_; }

  // classify() of query tile [q0, q0 + bq) x key tile [k0, k0 + bk).
  int classify(int64_t q0, int64_t k0) const {
    const Bounds &q = qt_[q0 / bq_], &k = kt_[k0 / bk_];
    bool full = q.exact && k.exact;
    for (int d = 0; d < 3; ++d) {
      if (k.b[d] < q.a[d] || k.a[d] > q.b[d]) return kEmpty;
      full &= q.w_last_begin[d] <= k.a[d] && k.b[d] < q.w_first_end[d];
    }
    return full ? kFull : kPartial;
  }

  // trim_tile() (softmax_tile.h) of a pair of whole boxes: along a box's leading dim of
  // extent > 1 a range of coordinates is a run of tokens, so the keys outside the query
  // box's windows and the queries whose windows miss the key box are cut there. False
  // (nothing trimmed) unless both tiles are whole boxes; an empty rectangle when no pair is
  // allowed.
  bool trim(int64_t q0, int64_t k0, int64_t* r0, int64_t* r1, int64_t* c0, int64_t* c1) const {
    const Bounds &q = qt_[q0 / bq_], &k = kt_[k0 / bk_];
    if (!q.exact || !k.exact) return false;
    const int dq = lead(q.n), dk = lead(k.n);
    const int64_t u0 = ae_min(ae_max(q.a[dk] - k.lo[dk], 0), k.n[dk]);
    const int64_t u1 = ae_min(ae_max(q.b[dk] + 1 - k.lo[dk], u0), k.n[dk]);
    const int64_t qstep = step(q.n, dq), kstep = step(k.n, dk);
    int64_t l0 = q.n[dq], l1 = 0;
    for (int64_t l = 0; l < q.n[dq]; ++l) {  // a query's window along dq depends on its x'[dq] only
      const int64_t* w = &win_[(q0 + l * qstep) * 6];
      if (w[3 + dq] > k.lo[dq] && w[dq] < k.lo[dq] + k.n[dq]) l0 = ae_min(l0, l), l1 = l + 1;
    }
    if (u0 >= u1 || l0 >= l1) {
      *r0 = *r1 = *c0 = *c1 = 0;
      return true;
    }
    *r0 = l0 * qstep, *r1 = l1 * qstep, *c0 = u0 * kstep, *c1 = u1 * kstep;
    return true;
  }

  // Calls off(c0, c1) for every run [c0, c1) of keys k0 + c (0 <= c < n, inside the key tile
  // starting at tile0) that query i may not see: along the last dim of each box, a row of
  // the box is a run of tokens.
  template <class F>
  void masked_runs(int64_t i, int64_t tile0, int64_t k0, int64_t n, F&& off) const {
    const int64_t *w0 = &win_[i * 6], *w1 = w0 + 3, end = k0 + n;
    const Bounds& t = kt_[tile0 / bk_];
    for (int64_t bi = t.box0; bi < t.box1; ++bi) {
      const Box& x = boxes_[bi];
      if (x.stop <= k0 || x.first >= end) continue;
      const int64_t a2 = ae_min(ae_max(w0[2] - x.lo[2], 0), x.n[2]), b2 = ae_min(ae_max(w1[2] - x.lo[2], a2), x.n[2]);
      const int64_t lo = ae_max(x.first, k0), hi = ae_min(x.stop, end);
      auto emit = [&](int64_t u, int64_t v) {
        u = ae_max(u, lo), v = ae_min(v, hi);
        if (u < v) off(u - k0, v - k0);
      };
      for (int64_t r = (lo - x.first) / x.n[2], base = x.first + r * x.n[2]; base < hi; ++r, base += x.n[2]) {
        const int64_t x0 = x.lo[0] + r / x.n[1], x1 = x.lo[1] + r % x.n[1];
        if (x0 >= w0[0] && x0 < w1[0] && x1 >= w0[1] && x1 < w1[1]) {
          emit(base, base + a2);
          emit(base + b2, base + x.n[2]);
        } else {
          emit(base, base + x.n[2]);
        }
      }
    }
  }

 private:
  struct Bounds {
    int64_t a[3], b[3];  // x' bounds (inclusive); of a query tile: of the keys its windows cover
    bool exact;          // the tile is one whole box
    int64_t w_first_end[3], w_last_begin[3];  // query tiles: the first x's window end, the last x's start
    int64_t box0 = 0, box1 = 0;               // key tiles: their boxes in boxes_
    int64_t lo[3], n[3];                      // exact tiles: the box's first x' and extents
  };
  struct Box {
    int64_t first, stop, lo[3], n[3];
  };

  Bounds bounds(int64_t t0, int64_t t1) const {
    Bounds t;
    na_range_bounds(m_, t0, t1, t.a, t.b, &t.exact);
    if (t.exact) na_box(m_, t0, t.lo, t.n);
    return t;
  }

  // A box's leading dim of extent > 1 (the last one if none), and tokens per step along it.
  static int lead(const int64_t* n) { return n[0] > 1 ? 0 : n[1] > 1 ? 1 : 2; }
  static int64_t step(const int64_t* n, int d) { return (d < 1 ? n[1] : 1) * (d < 2 ? n[2] : 1); }

  MaskSpec m_;
  int64_t bq_, bk_;
  bool on_ = false;
  std::vector<int64_t> win_;  // [nq][w0 x 3, w1 x 3]
  std::vector<Bounds> qt_, kt_;
  std::vector<Box> boxes_;
};

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
