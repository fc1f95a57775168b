// Every schema of the attention_ext library, and nothing else. Implementations register
// per dispatch key (cpu/*_ops.cpp, cuda/*.cu); fake kernels and autograd are registered
// once, in Python (attention_ext/_ops.py).
//
// The exact-attention ops carry the mask spec of csrc/common/mask.h as plain arguments:
// kind (0 dense, 1 window, 2 neighborhood, 3 block layout), causal, left/right window
// reach, kernel_size, dilation, num_global leading global tokens, an optional bool
// global_mask (B, Nk), an optional bool block layout (H or 1, ceil(Nq/bs), ceil(Nk/bs))
// and block_size. softcap > 0 caps every scaled score s as softcap * tanh(s / softcap)
// before masking and softmax (Gemma 2's attn_logit_softcapping); 0 turns it off.
// key_mask: optional bool (B, Nk), false for keys no query may attend (padding).
#include <torch/library.h>

TORCH_LIBRARY(attention_ext, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? global_mask, Tensor? layout, int kind, "
      "bool causal, int left, int right, int kernel_size, int dilation, int num_global, int block_size, "
      "float scale, float softcap=0.0, Tensor? key_mask=None) -> (Tensor out, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? global_mask, Tensor? layout, int kind, bool causal, int left, int right, "
      "int kernel_size, int dilation, int num_global, int block_size, float scale, float softcap=0.0, "
      "Tensor? key_mask=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv)",
      {at::Tag::pt2_compliant_tag});
}

// Linear attention (csrc/common/linear.h): feature_map 0 identity, 1 elu + 1, 2 relu;
// the state (S, z) is (B, Hkv, D, Dv) + (B, Hkv, D), float32 (float64 for float64).
TORCH_LIBRARY_FRAGMENT(attention_ext, m) {
  m.def(
      "linear_fwd(Tensor q, Tensor k, Tensor v, Tensor? S0, Tensor? z0, int feature_map, bool causal, "
      "bool normalize, float eps, float scale, int chunk_size) -> (Tensor out, Tensor S, Tensor z)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "linear_bwd(Tensor grad_out, Tensor? grad_S, Tensor? grad_z, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor? S0, Tensor? z0, int feature_map, bool causal, bool normalize, float eps, float scale, "
      "int chunk_size) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dS0, Tensor dz0)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "linear_step(Tensor q, Tensor k, Tensor v, Tensor S, Tensor z, int feature_map, bool normalize, "
      "float eps, float scale) -> (Tensor out, Tensor S_new, Tensor z_new)",
      {at::Tag::pt2_compliant_tag});
}
