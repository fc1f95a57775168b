// Host-side checks and MaskSpec construction shared by the CPU and CUDA op bodies.
// The Python layer gives users friendlier messages; these checks keep direct
// torch.ops.attention_ext calls memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "mask.h"

namespace attention_ext {

struct MaskArgs {
  MaskSpec spec;
  at::Tensor global_prefix;  // keeps spec.global_prefix alive
  at::Tensor key_prefix;     // keeps spec.key_prefix alive
  at::Tensor layout;         // keeps spec.layout alive
};

// Shapes of a checked q/k/v triple.
struct AttnShape {
  int64_t B, Hq, Hkv, Nq, Nk, Dqk, Dv;
};

AttnShape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

MaskArgs make_mask(const AttnShape& s, const at::Tensor& q, const std::optional<at::Tensor>& global_mask,
                   const std::optional<at::Tensor>& layout, int64_t kind, bool causal, int64_t left,
                   int64_t right, int64_t kernel_size, int64_t dilation, int64_t num_global,
                   int64_t block_size, const std::optional<at::Tensor>& key_mask);

// softcap: 0 (off) or in [kMinSoftcap, kMaxSoftcap].
constexpr double kMinSoftcap = 1e-6, kMaxSoftcap = 1e6;
void check_softcap(double softcap);

// dtype of the saved logsumexp for inputs of dtype t.
inline at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace attention_ext
