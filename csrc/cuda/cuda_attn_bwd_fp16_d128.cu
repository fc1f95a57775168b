// Tensor-core backward (dK/dV kernel and deterministic dQ kernel), __half, head-dim
// bucket 128.
#include "cuda_attn_bwd.cuh"

namespace attention_ext::cuda {
template void launch_tc_bwd_dkdv<__half, 128>(const TcBwdParams&, cudaStream_t);
template void launch_tc_bwd_dq<__half, 128>(const TcBwdParams&, cudaStream_t);
}  // namespace attention_ext::cuda
