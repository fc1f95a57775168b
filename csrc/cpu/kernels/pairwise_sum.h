// Pairwise (cascade) summation for the backward's dK / dV, which sum over every query
// row of a GQA group: a serial fp32 sum over N rows errs like N * eps, a pairwise one
// like log2(N) * eps (torch.sum sums this way too).
//
// Terms (tile products) are accumulated serially into a leaf of kLeaf terms (kLeaf
// query tiles; 4 doubled the MQA test's dV error, 1 costs one more add per tile),
// and leaves are summed by a binary counter: level l holds the sum of 2^l consecutive
// leaves, and a new leaf carries upwards while the levels are occupied. The tree depends
// only on the number of terms, so results are deterministic for any thread count.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

template <typename acc_t>
class PairwiseSum {
 public:
  static constexpr int64_t kLeaf = 2;

  // Sums of `size` values, at most `max_terms` terms between two reset()s.
  PairwiseSum(int64_t size, int64_t max_terms) {
    const int64_t leaves = ae_cdiv(std::max<int64_t>(max_terms, 1), kLeaf);
    while ((int64_t(1) << levels_) < leaves) ++levels_;
    ++levels_;
    buf_ = std::make_unique<Buffer<acc_t>>((levels_ + 1) * size);
    for (int l = 0; l <= levels_; ++l) slot_[l] = buf_->get() + l * size;
  }

  void reset() { leaves_ = 0, in_leaf_ = 0; }

  // The buffer the next term is added to (accumulated); only its first `used` values
  // are ever read.
  acc_t* leaf(int64_t used) {
    if (in_leaf_ == 0) std::fill(slot_[levels_], slot_[levels_] + used, acc_t(0));
    return slot_[levels_];
  }

  // Call after adding a term to leaf().
  void added(int64_t used) {
    if (++in_leaf_ == kLeaf) push(used);
  }

  // The total of the first `used` values into dst (zeros when nothing was added).
  void total(acc_t* dst, int64_t used) {
    if (in_leaf_ > 0) push(used);
    std::fill(dst, dst + used, acc_t(0));
    for (int l = 0; l < levels_; ++l)  // the small (recent) levels first
      if (leaves_ >> l & 1) add(dst, slot_[l], used);
  }

 private:
  void push(int64_t used) {
    acc_t* cur = slot_[levels_];
    int l = 0;
    for (uint64_t c = leaves_; c & 1; c >>= 1, ++l) add(cur, slot_[l], used);
    std::swap(slot_[l], slot_[levels_]);  // level l takes the carry; its old buffer is free
    ++leaves_;
    in_leaf_ = 0;
  }

  static void add(acc_t* dst, const acc_t* src, int64_t n) {
    using V = Vec<acc_t>;
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) (V::loadu(dst + i) + V::loadu(src + i)).store(dst + i);
    for (; i < n; ++i) dst[i] += src[i];
  }

  int levels_ = 0;
  uint64_t leaves_ = 0;
  int64_t in_leaf_ = 0;
  std::unique_ptr<Buffer<acc_t>> buf_;
  acc_t* slot_[66] = {};  // levels_ <= 64, plus the leaf being filled
};

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
