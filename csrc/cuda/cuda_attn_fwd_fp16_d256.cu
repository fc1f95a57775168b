// Tensor-core forward, __half, head-dim bucket 256 (one instantiation per file so that
// the build compiles them in parallel).
#include "cuda_attn_fwd.cuh"

namespace attention_ext::cuda {
template void launch_tc_fwd<__half, 256>(const TcFwdParams&, cudaStream_t);
}  // namespace attention_ext::cuda
