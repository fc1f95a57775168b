// CUDA op bodies of the linear_* ops (linear_fwd.cu, linear_bwd.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace attention_ext::cuda_linear {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_S, const std::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0, int64_t feature_map, bool causal,
    bool normalize, double eps, double scale, int64_t chunk_size);

}  // namespace attention_ext::cuda_linear
