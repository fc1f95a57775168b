// The tiles of a call, document by document: every batch row is split into its packed
// documents (one per row when unpacked), and each document into query and key tiles
// counted from its start. The kernels' task lists are these flat tile lists, so one
// parallel loop covers every document and no tile pairs rows of two documents.
#pragma once

#include <cstdint>
#include <vector>

#include "../../common/documents.h"
#include "../../common/mask.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

struct Segment {
  int64_t b;
  DocSpan span;    // its rows in the tensors
  MaskSpec mask;   // document_mask(): document-local positions
  int64_t qt0;     // its first query tile in Segments::qtiles
  int64_t kt0;     // its first key tile in Segments::ktiles
};

// A tile: rows [start, start + BQ or BK) of segment seg, clipped to its length.
struct TileRef {
  int64_t seg, start;
};

struct Segments {
  std::vector<Segment> seg;
  std::vector<TileRef> qtiles, ktiles;
  std::vector<int64_t> row_kt;  // key tiles of batch row b: [row_kt[b], row_kt[b + 1])
  int64_t max_seg_qtiles = 0;   // most query tiles of one segment
  int64_t max_row_ktiles = 0;   // most key tiles of one batch row
};

inline Segments make_segments(const Documents& docs, const MaskSpec& mask, int64_t B, int64_t Nq, int64_t Nk,
                              int64_t BQ, int64_t BK) {
  Segments s;
  s.row_kt.push_back(0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < doc_count(docs); ++i) {
      const DocSpan d = doc_span(docs, b, i, Nq, Nk);
      if (d.nq == 0 && d.nk == 0) continue;
      const int64_t id = int64_t(s.seg.size());
      s.seg.push_back({b, d, document_mask(mask, d.k0, d.nq, d.nk), int64_t(s.qtiles.size()),
                       int64_t(s.ktiles.size())});
      for (int64_t q0 = 0; q0 < d.nq; q0 += BQ) s.qtiles.push_back({id, q0});
      for (int64_t k0 = 0; k0 < d.nk; k0 += BK) s.ktiles.push_back({id, k0});
      s.max_seg_qtiles = std::max(s.max_seg_qtiles, ae_cdiv(d.nq, BQ));
    }
    s.row_kt.push_back(int64_t(s.ktiles.size()));
    s.max_row_ktiles = std::max(s.max_row_ktiles, s.row_kt[b + 1] - s.row_kt[b]);
  }
  return s;
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
