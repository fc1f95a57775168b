// Tensor-core backward (dK/dV kernel and deterministic dQ kernel), __nv_bfloat16, head-dim
// bucket 256.
#include "cuda_attn_bwd.cuh"

namespace attention_ext::cuda {
template void launch_tc_bwd_dkdv<__nv_bfloat16, 256>(const TcBwdParams&, cudaStream_t);
template void launch_tc_bwd_dq<__nv_bfloat16, 256>(const TcBwdParams&, cudaStream_t);
}  // namespace attention_ext::cuda
