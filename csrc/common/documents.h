// Packed sequences: several documents in one batch row, given by FlashAttention's
// cumulative boundaries (cu_seqlens). A document is a problem of its own: the kernels
// walk documents, and document_mask() (mask.h) gives each one its local mask.
#pragma once

#include <cstdint>

namespace attention_ext {

struct Documents {
  // host int32 (rows, count + 1), rows 1 (shared by every batch row) or B
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t rows = 0, count = 0;  // count 0: unpacked, one document per batch row
};

// Queries [q0, q0 + nq) and keys [k0, k0 + nk) of one document of a batch row.
struct DocSpan {
  int64_t q0, nq, k0, nk;
};

inline int64_t doc_count(const Documents& d) { return d.count ? d.count : 1; }

// Document i of batch row b; the whole row when unpacked.
inline DocSpan doc_span(const Documents& d, int64_t b, int64_t i, int64_t Nq, int64_t Nk) {
  if (!d.count) return {0, Nq, 0, Nk};
  const int64_t row = (d.rows == 1 ? 0 : b) * (d.count + 1) + i;
  return {d.cu_q[row], d.cu_q[row + 1] - d.cu_q[row], d.cu_k[row], d.cu_k[row + 1] - d.cu_k[row]};
}

}  // namespace attention_ext
