// The spec of an exact-attention call as attention_fwd / attention_bwd receive it, and
// the checks that turn it into a MaskSpec, shared by the CPU and CUDA op bodies
// (attention_op.h).
//
// The spec is one list, in schema order, written in three places that must agree:
//   AE_ATTENTION_SPEC_SCHEMA below  (the ops' trailing arguments, csrc/ops.cpp)
//   AE_ATTENTION_SPEC_PARAMS below  (how the op bodies receive them)
//   attention_ext/_spec.py          (AttentionSpec, whose fields carry the same names)
// A new modifier (packed sequences, cache lengths, score terms) is one more entry in each,
// a field of MaskSpec or of the score path in csrc/common, and one place per backend.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "documents.h"
#include "dropout.h"
#include "mask.h"
#include "score_mods.h"
#include "tensor_checks.h"

namespace attention_ext {

// Trailing arguments of both ops, one per line. Not keyword-only: the Python autograd
// and vmap kernels (attention_ext/_autograd.py) receive every argument positionally.
#define AE_ATTENTION_SPEC_SCHEMA      \
  "float scale, "                     \
  "float softcap=0.0, "               \
  "int mask_kind=0, "                 \
  "bool causal=False, "               \
  "int window_left=0, "               \
  "int window_right=0, "              \
  "int dilation=1, "                  \
  "int kernel_size=1, "               \
  "int num_global=0, "                \
  "Tensor? global_mask=None, "        \
  "Tensor? block_layout=None, "       \
  "int block_size=1, "                \
  "Tensor? key_mask=None, "           \
  "Tensor? cu_seqlens_q=None, "       \
  "Tensor? cu_seqlens_k=None, "       \
  "Tensor? alibi_slopes=None, "       \
  "Tensor? sinks=None, "              \
  "float dropout_p=0.0, "             \
  "Tensor? dropout_seed=None, "       \
  "int[] spatial_shape=[], "          \
  "int[] na_kernel_size=[], "         \
  "int[] na_dilation=[], "            \
  "int[] na_stride=[], "              \
  "int[] na_causal=[], "              \
  "int[] tile_shape=[]"

#define AE_ATTENTION_SPEC_PARAMS                                                                                 \
  double scale, double softcap, int64_t mask_kind, bool causal, int64_t window_left, int64_t window_right,     \
      int64_t dilation, int64_t kernel_size, int64_t num_global, const std::optional<at::Tensor>& global_mask,  \
      const std::optional<at::Tensor>& block_layout, int64_t block_size, const std::optional<at::Tensor>& key_mask, \
      const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,             \
      const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks, double dropout_p,   \
      const std::optional<at::Tensor>& dropout_seed, at::IntArrayRef spatial_shape, at::IntArrayRef na_kernel_size, \
      at::IntArrayRef na_dilation, at::IntArrayRef na_stride, at::IntArrayRef na_causal, at::IntArrayRef tile_shape

#define AE_ATTENTION_SPEC_ARGS                                                                                   \
  scale, softcap, mask_kind, causal, window_left, window_right, dilation, kernel_size, num_global, global_mask, \
      block_layout, block_size, key_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks, dropout_p, dropout_seed, \
      spatial_shape, na_kernel_size, na_dilation, na_stride, na_causal, tile_shape

struct AttentionSpecArgs {
  double scale, softcap;
  int64_t mask_kind;
  bool causal;
  int64_t window_left, window_right, dilation, kernel_size, num_global;
  const std::optional<at::Tensor>& global_mask;
  const std::optional<at::Tensor>& block_layout;
  int64_t block_size;
  const std::optional<at::Tensor>& key_mask;
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& cu_seqlens_k;
  const std::optional<at::Tensor>& alibi_slopes;  // (Hq,) or (B, Hq), lse dtype
  const std::optional<at::Tensor>& sinks;         // (Hq,), lse dtype
  double dropout_p;
  const std::optional<at::Tensor>& dropout_seed;  // int64 (2,): Philox seed and offset
  // neighborhood on a grid (mask.h, na_nd > 0): per spatial dim, all empty or all of one length
  at::IntArrayRef spatial_shape, na_kernel_size, na_dilation, na_stride, na_causal, tile_shape;
};

// A checked call: shapes, dtype, the mask spec and the tensors its pointers read.
struct AttentionInputs {
  QkvShape shape;
  DType dtype;
  MaskSpec mask;
  double scale, softcap;
  at::Tensor global_prefix, key_prefix, block_layout;  // keep mask's pointers alive
  // packed documents: host int32 (rows, S + 1) boundaries; undefined when unpacked
  at::Tensor cu_q, cu_k;
  // score terms (score_mods.h); alibi is (B, Hq) contiguous, sinks (Hq,), both undefined when off
  ScoreMods mods;
  at::Tensor alibi, sinks;
  DropoutSpec dropout;
  Documents documents() const;
};

// attention_fwd(q, k, v, *spec): every tensor's device, dtype and shape, and every number.
AttentionInputs check_attention_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const AttentionSpecArgs& spec);

// attention_bwd(grad_out, grad_lse, q, k, v, out, lse, *spec): the forward's checks plus
// grad_out/out (B, Hq, Nq, Dv) of q's dtype, lse/grad_lse (B, Hq, Nq) of the lse dtype.
AttentionInputs check_attention_bwd_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                                           const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           const AttentionSpecArgs& spec);

// alibi_slopes ((Hq,) or (B, Hq)) and sinks ((Hq,)) of a call of B rows and Hq query heads:
// the lse dtype, q's device, finite values. *alibi becomes (B, Hq) contiguous, *sinks_kept
// (Hq,); *mods points at them (null = off). attention_decode takes them too.
void check_score_mods(const char* op, const std::optional<at::Tensor>& alibi_slopes,
                      const std::optional<at::Tensor>& sinks, const at::Tensor& q, int64_t B, int64_t Hq,
                      ScoreMods* mods, at::Tensor* alibi, at::Tensor* sinks_kept);

// Largest head dim the exact-attention ops take on q's device (limits.h).
int64_t attention_max_head_dim(const at::Device& device);

}  // namespace attention_ext
