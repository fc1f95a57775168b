// Checks of the tensors every op takes, shared by both op families (attention_*,
// linear_*) and both backends. The Python layer gives users friendlier messages first;
// these keep direct torch.ops.attention_ext calls memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "limits.h"

namespace attention_ext {

// Shapes of a checked q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) triple.
struct QkvShape {
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv;
};

// Rank, dtype (float32/64, bfloat16, float16, all alike), device, and shape agreement
// (Hq a multiple of Hkv), with D and Dv in [1, max_dim].
QkvShape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t max_dim);

// A tensor argument must sit on q's device. (A call mixing meta and real tensors is
// dispatched to the fake kernel, which refuses it in Python: attention_ext/_ops.py.)
void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q);
void check_device(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& q);

// t must have exactly this shape.
void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape);

DType dtype_of(at::ScalarType t);

// FlashAttention-style cumulative boundaries (cu_seqlens) after their shape checks: a host
// int32 copy viewed as (rows, S + 1) whose every row runs 0 = c[0] <= ... <= c[S] = n
// (ValueError otherwise). Every value is read here, so a kernel walking documents never
// leaves [0, n); on CUDA the copy is a sync.
at::Tensor host_boundaries(const char* op, const char* name, const at::Tensor& c, int64_t rows, int64_t n);

// dtype of accumulated statistics (the logsumexp, the linear state) for inputs of dtype t.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ceil(a / b) for a >= 0, b >= 1 without the overflow of (a + b - 1) / b.
inline int64_t cdiv_safe(int64_t a, int64_t b) { return a == 0 ? 0 : (a - 1) / b + 1; }

}  // namespace attention_ext
