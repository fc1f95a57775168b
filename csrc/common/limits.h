// Limits and codes of every op, written once. attention_ext._C exports them
// (csrc/module.cpp) and the Python checks read them from there.
#pragma once

#include <cstdint>

namespace attention_ext {

// Element types of every op, numbered alike on every backend.
enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

// Largest head dim (q/k and v) of the exact-attention ops, per path. The CUDA SIMT
// kernels hold a row in 16 registers per lane (512 = 16 x 32 lanes); the tensor-core
// kernels take head-dim buckets up to 256 and leave the rest to SIMT.
constexpr int64_t kCpuMaxHeadDim = 512;
constexpr int64_t kCudaMaxHeadDim = 512;
constexpr int64_t kCudaTensorCoreMaxHeadDim = 256;

// softcap: 0 (off) or in [kMinSoftcap, kMaxSoftcap]; the kernels hold softcap * log2(e),
// its inverse and scale / softcap in float32.
constexpr double kMinSoftcap = 1e-6, kMaxSoftcap = 1e6;

// Largest q/k feature and v head dim of the linear-attention ops, and their largest
// chunk (the intra-chunk products hold chunk x chunk scores per task).
constexpr int64_t kLinearMaxDim = 4096;
constexpr int64_t kLinearMaxChunk = 1024;

}  // namespace attention_ext
