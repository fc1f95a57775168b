// Tensor-core forward, __nv_bfloat16, head-dim bucket 64 (one instantiation per file so that
// the build compiles them in parallel).
#include "cuda_attn_fwd.cuh"

namespace attention_ext::cuda {
template void launch_tc_fwd<__nv_bfloat16, 64>(const TcFwdParams&, cudaStream_t);
}  // namespace attention_ext::cuda
