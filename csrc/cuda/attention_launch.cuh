// One launch of a tensor-core attention kernel: one block per (batch x heads, tile of
// `rows`). It always opts in to the dynamic shared memory: the kernel's static shared
// memory (mask spec, tile schedule) counts against the default 48 KB too.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/mask.h"

namespace attention_ext::cuda {

template <typename Params>
void launch_tiles(void (*kernel)(const Params), const Params& p, int64_t heads, int64_t rows, int tile,
                  int threads, int smem, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t blocks = heads * ae_cdiv(rows, tile);
  kernel<<<dim3(static_cast<unsigned>(blocks)), threads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attention_ext::cuda
