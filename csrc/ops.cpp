// Every schema of the attention_ext library, and nothing else. Implementations register
// per dispatch key (cpu/*_ops.cpp, cuda/*_ops.cu); fake kernels and autograd are
// registered once, in Python (attention_ext/_ops.py). The schemas are internal: the
// public functions are attention_ext.*.
//
// Exact attention: every pattern runs the same two ops; what differs is the spec, their
// trailing arguments (AE_ATTENTION_SPEC_SCHEMA in common/attention_args.h, built by
// attention_ext/_spec.py with the same names in the same order). mask_kind: 0 dense, 1 window, 2 neighborhood, 3 block layout
// (common/mask.h). softcap > 0 caps every scaled score s as softcap * tanh(s / softcap)
// before masking and softmax (Gemma 2); 0 turns it off. alibi_slopes / sinks: score terms
// (common/score_mods.h); dsinks is empty (0,) without sinks. key_mask / global_mask: bool
// (B, Nk); block_layout: bool (1 or Hq, ceil(Nq / block_size), ceil(Nk / block_size)).
#include <torch/library.h>

#include "common/attention_args.h"
#include "common/decode_args.h"

TORCH_LIBRARY(attention_ext, m) {
  m.def("attention_fwd("
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        AE_ATTENTION_SPEC_SCHEMA
        ") -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("attention_bwd("
        "Tensor grad_out, "
        "Tensor? grad_lse, "
        "Tensor q, "
        "Tensor k, "
        "Tensor v, "
        "Tensor out, "
        "Tensor lse, "
        AE_ATTENTION_SPEC_SCHEMA
        ") -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)",
        {at::Tag::pt2_compliant_tag});
  // Decoding over a KV cache (common/decode_args.h), forward only; k/v are written into
  // the cache in place, hence the (a!) / (b!) annotations.
  m.def(AE_DECODE_SCHEMA, {at::Tag::pt2_compliant_tag});
}

// Linear attention (common/linear.h): feature_map 0 identity, 1 elu + 1, 2 relu; the
// state (S, z) is (B, Hkv, D, Dv) + (B, Hkv, D), float32 (float64 for float64). cu_seqlens
// (int32, documents + 1; B == 1): packed documents, each with its own state (documents, Hkv, ...).
TORCH_LIBRARY_FRAGMENT(attention_ext, m) {
  m.def(
      "linear_fwd(Tensor q, Tensor k, Tensor v, Tensor? S0, Tensor? z0, int feature_map, bool causal, "
      "bool normalize, float eps, float scale, int chunk_size, Tensor? cu_seqlens=None) "
      "-> (Tensor out, Tensor S, Tensor z)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "linear_bwd(Tensor grad_out, Tensor? grad_S, Tensor? grad_z, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor? S0, Tensor? z0, int feature_map, bool causal, bool normalize, float eps, float scale, "
      "int chunk_size, Tensor? cu_seqlens=None) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dS0, Tensor dz0)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "linear_step(Tensor q, Tensor k, Tensor v, Tensor S, Tensor z, int feature_map, bool normalize, "
      "float eps, float scale) -> (Tensor out, Tensor S_new, Tensor z_new)",
      {at::Tag::pt2_compliant_tag});
}
