// Host-side checks of the linear_* ops shared by the CPU and CUDA op bodies. The Python
// layer (attention_ext/linear.py) gives users friendlier messages; these keep direct
// torch.ops.attention_ext calls memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "linear.h"
#include "tensor_checks.h"

namespace attention_ext {

// dtype of the state (S, z) for inputs of dtype t: float32, float64 for float64.
inline at::ScalarType linear_state_dtype(at::ScalarType t) { return acc_dtype(t); }

// q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with D, Dv <= kLinearMaxDim;
// causal needs Nq == Nk.
QkvShape check_linear_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          bool causal);

void check_linear_params(const char* op, int64_t feature_map, int64_t chunk, double eps, double scale);

// Optional state pair: both or neither, (B, Hkv, D, Dv) and (B, Hkv, D), state dtype,
// on q's device. Returns contiguous copies (undefined tensors when absent).
std::pair<at::Tensor, at::Tensor> check_linear_state(const char* op, const char* name, const QkvShape& s,
                                                     const at::Tensor& q, const std::optional<at::Tensor>& S,
                                                     const std::optional<at::Tensor>& z);

// linear_bwd's extra inputs: grad_out and out (B, Hq, Nq, Dv) of q's dtype and device, and the
// gradient of the final state, checked like a state, where a missing half counts as zero.
// Returns the contiguous state-gradient pair (undefined tensors when neither half is given).
std::pair<at::Tensor, at::Tensor> check_linear_bwd_inputs(const char* op, const QkvShape& s, const at::Tensor& q,
                                                          const at::Tensor& grad_out, const at::Tensor& out,
                                                          const std::optional<at::Tensor>& grad_S,
                                                          const std::optional<at::Tensor>& grad_z);

}  // namespace attention_ext
