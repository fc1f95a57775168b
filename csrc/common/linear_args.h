// Host-side checks of the linear_* ops, shared by the CPU and CUDA backends through the one op
// body (linear_op.h). The Python layer (attention_ext/linear.py) gives users friendlier messages;
// these keep direct torch.ops.attention_ext calls memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "linear.h"
#include "tensor_checks.h"

namespace attention_ext {

// dtype of the state (S, z) for inputs of dtype t: float32, float64 for float64.
inline at::ScalarType linear_state_dtype(at::ScalarType t) { return acc_dtype(t); }

// The numbers of a linear_* call (linear_step: causal, chunk 1).
struct LinearOptions {
  int64_t feature_map;
  bool causal, normalize;
  double eps, scale;
  int64_t chunk;
};

// A checked call: shapes, numbers, and the states it reads as contiguous tensors of the
// state dtype on q's device (undefined when absent).
struct LinearInputs {
  QkvShape shape;
  LinearOptions options;
  // Packed documents: cu_seqlens (int32, documents + 1) on the CPU (a host copy of a CUDA
  // tensor), undefined when absent. A segment is a run of rows with its own state: a batch
  // row, or a document of the single batch row; the states are (segments, Hkv, ...).
  at::Tensor cu_seqlens;
  int64_t segments;
  at::Tensor S0, z0;          // linear_fwd / linear_bwd: the initial state; linear_step: the state (required)
  at::Tensor grad_S, grad_z;  // linear_bwd: the gradient of the final state, a missing half as zeros
};

// q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with D, Dv <= kLinearMaxDim (causal:
// Nq == Nk); the options; a state pair, both or neither, (G, Hkv, D, Dv) and (G, Hkv, D) for
// G segments. cu_seqlens (optional): int32 (S + 1,) on q's device, 0 = cu[0] <= ... <= cu[S] = N,
// with B == 1 and Nq == Nk = N; then G = S, else G = B. Its faults raise TypeError (dtype) or
// ValueError (the rest), every value read on the host before a kernel sees it.
LinearInputs check_linear_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
                                     const LinearOptions& options, const std::optional<at::Tensor>& cu_seqlens);

// The forward's checks, then grad_out and out (B, Hq, Nq, Dv) of q's dtype and device and the
// gradient of the final state, checked like a state.
LinearInputs check_linear_bwd_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_S,
                                     const std::optional<at::Tensor>& grad_z, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                     const std::optional<at::Tensor>& S0, const std::optional<at::Tensor>& z0,
                                     const LinearOptions& options, const std::optional<at::Tensor>& cu_seqlens);

// The forward's checks with Nq == Nk and the state required.
LinearInputs check_linear_step_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& S, const at::Tensor& z, const LinearOptions& options);

}  // namespace attention_ext
