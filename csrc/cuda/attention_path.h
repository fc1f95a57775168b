// Which CUDA kernels an exact-attention call runs, and why: the op bodies
// (attention_ops.cu) follow it and attention_ext.explain() reports it.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace attention_ext::cuda {

struct CudaPath {
  bool tensor_core = false;  // else the SIMT kernels
  int bucket = 0;            // head-dim bucket of the tensor-core kernels (64, 128, 256)
  std::string reason;
};

// For the current CUDA device.
CudaPath attention_path(at::ScalarType dtype, int64_t head_dim, int64_t value_dim, bool backward,
                        bool deterministic);

}  // namespace attention_ext::cuda
