// Score terms beyond the mask, shared by every exact-attention kernel, CPU and CUDA:
//
//   ALiBi (Press et al.; FlashAttention 2's alibi_slopes): the scaled score of query row i
//     (aligned position p = i + offset, mask.h) and key j gains -slope[b][h] * |p - j|,
//     after the softcap and before masking, as in FlashAttention 2 (so the cap never
//     flattens the bias). Bidirectional rows get the symmetric form; for causal rows it is
//     the paper's -slope * (p - j). The kernels run in base 2: slopes enter times log2(e).
//   Sinks (gpt-oss's s_aux): every row of head h has a virtual key of logit sink[h] and no
//     value: it enters the softmax denominator (and lse) only. A row with no allowed key
//     outputs zeros and lse = sink[h].
//
// Packed documents: positions are document-local (document_mask()); document_inputs()
// moves alibi to the document's batch row.
#pragma once

#include <cmath>
#include <cstdint>

#include "mask.h"

namespace attention_ext {

struct ScoreMods {
  // Both in the accumulation type (float32; float64 for float64 inputs), on q's device.
  const void* alibi = nullptr;  // (B, Hq) slopes; null = off
  const void* sinks = nullptr;  // (Hq,) logits; null = off
  int64_t hq = 0;
};

template <typename A>
AE_HD A alibi_slope(const ScoreMods& s, int64_t b, int64_t h) {
  return s.alibi ? static_cast<const A*>(s.alibi)[b * s.hq + h] : A(0);
}

template <typename A>
AE_HD A sink_logit(const ScoreMods& s, int64_t h) {
  return static_cast<const A*>(s.sinks)[h];
}

// The ALiBi term of (query position p, key j) for a slope in any units.
template <typename A>
AE_HD A alibi_bias(A slope, int64_t p, int64_t j) {
  const int64_t d = p - j;
  return -slope * A(d < 0 ? -d : d);
}

template <typename A>
AE_HD A ae_exp2(A x) {
#if defined(__CUDA_ARCH__)
  return exp2(x);
#else
  return A(std::exp2(double(x)));
#endif
}

// Folds a sink (base-2 logit sink2) into a row's running softmax state (base-2 max m,
// sum l): afterwards l also counts exp2(sink2), relative to the new m. Returns the factor
// the row's output accumulator takes before the division by l (0 for a row that saw no
// key: its output stays 0 and its lse becomes sink2).
template <typename A>
AE_HD A fold_sink(A sink2, A& m, A& l) {
  const A mm = m > sink2 ? m : sink2;
  const A alpha = l == A(0) ? A(0) : ae_exp2(m - mm);
  l = l * alpha + ae_exp2(sink2 - mm);
  m = mm;
  return alpha;
}

}  // namespace attention_ext
