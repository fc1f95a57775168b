// Scratch blocks kept between kernel calls. A short call allocates its packed operands
// and partials afresh each time; blocks above glibc's mmap threshold then come back as
// new mappings whose pages fault in on every call (hundreds per call at N = 128). The
// pool hands freed blocks to the next call instead, holding at most kWorkspaceKeep bytes
// between calls, in blocks of at most kWorkspaceBlock: a long call's big blocks would sit
// dead in the pool while its next pass allocates others (its peak memory grew by them),
// and their page faults are small next to that call's work. One pool per ISA module;
// thread-safe.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

constexpr size_t kWorkspaceKeep = size_t(16) << 20, kWorkspaceBlock = size_t(2) << 20;

class Workspace {
 public:
  static Workspace& get() {
    static Workspace* pool = new Workspace;  // never destroyed: kernels may run at exit
    return *pool;
  }

  // A 64-byte aligned block of at least `bytes` (a multiple of 64); its size in *got.
  void* take(size_t bytes, size_t* got) {
    if (bytes > kWorkspaceBlock) {
      // a block the pool never keeps: a long call, whose other blocks would not match
      // what the pool holds either, so the kept ones go (else they sit dead under its peak)
      release();
    } else {
      std::lock_guard<std::mutex> lock(mu_);
      // the smallest free block that fits without wasting more than its request
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].bytes >= bytes && free_[i].bytes <= 2 * bytes &&
            (best == free_.size() || free_[i].bytes < free_[best].bytes))
          best = i;
      if (best != free_.size()) {
        const Block b = free_[best];
        free_[best] = free_.back();
        free_.pop_back();
        kept_ -= b.bytes;
        *got = b.bytes;
        return b.ptr;
      }
    }
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    *got = bytes;
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes <= kWorkspaceBlock && kept_ + bytes <= kWorkspaceKeep) {
        free_.push_back({p, bytes});
        kept_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  // Frees every kept block (memory measurements start from an empty pool).
  void release() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      kept_ = 0;
    }
    for (const Block& b : blocks) std::free(b.ptr);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  std::mutex mu_;
  std::vector<Block> free_;
  size_t kept_ = 0;
};

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
