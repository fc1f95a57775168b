// The boundary between the extension (_C: schemas, tensor checks, allocation) and the
// CPU kernels, which are compiled once per ISA into modules of their own
// (attention_ext._cpu_avx512, _cpu_avx2, and the portable build inside _C).
// Only plain data crosses it, so each ISA module can be built with its own flags and
// swapped at run time (attention_ext.set_cpu_isa).
#pragma once

#include <cstdint>

#include "../common/documents.h"
#include "../common/limits.h"
#include "../common/mask.h"
#include "../common/score_mods.h"

namespace attention_ext::cpu {

using attention_ext::DType;

// A strided 4-D operand (batch, head, seq, dim); strides in elements.
struct Operand {
  const void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

struct AttentionFwdArgs {
  DType dtype;
  int64_t B, Hq, Hkv, Nq, Nk, Dqk, Dv;
  Operand q, k, v;
  void* out;  // contiguous (B, Hq, Nq, Dv), dtype
  void* lse;  // contiguous (B, Hq, Nq), float32 (float64 for float64 inputs)
  MaskSpec mask;
  Documents docs;  // packed sequences (host boundaries), or none
  double scale;
  double softcap;  // 0 = off
  ScoreMods mods;  // ALiBi slopes, sinks (score_mods.h)
};

struct AttentionBwdArgs {
  DType dtype;
  int64_t B, Hq, Hkv, Nq, Nk, Dqk, Dv;
  Operand q, k, v, out, grad_out;
  const void* lse;       // contiguous (B, Hq, Nq), float32 (float64 for float64 inputs)
  const void* grad_lse;  // same layout as lse, or nullptr
  void *dq, *dk, *dv;    // contiguous, dtype
  MaskSpec mask;
  Documents docs;  // packed sequences (host boundaries), or none
  double scale;
  double softcap;  // 0 = off
  ScoreMods mods;  // ALiBi slopes, sinks (score_mods.h)
};

// Linear attention (csrc/common/linear.h has the math). States are contiguous
// (G, Hkv, D, Dv) and (G, Hkv, D) in the accumulation type: float32, float64 for
// float64 inputs, one per segment: G = B batch rows, or with cu_seqlens (B == 1) G
// documents along the sequence (checked: 0 = cu[0] <= ... <= cu[G] = Nq = Nk). A null
// initial state means zeros.
struct LinearFwdArgs {
  DType dtype;
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv;  // causal: Nq == Nk
  Operand q, k, v;
  const int32_t* cu_seqlens;  // (segments + 1) or nullptr
  int64_t segments;
  const void *S0, *z0;  // initial state or nullptr
  void* out;            // contiguous (B, Hq, Nq, Dv), dtype
  void *S, *z;          // final state
  int64_t feature_map, chunk;
  bool causal, normalize;
  double eps, scale;
};

struct LinearBwdArgs {
  DType dtype;
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv;
  Operand q, k, v, out, grad_out;
  const int32_t* cu_seqlens;    // (segments + 1) or nullptr
  int64_t segments;
  const void *S0, *z0;          // initial state or nullptr
  const void *grad_S, *grad_z;  // gradient of the final state or nullptr
  void *dq, *dk, *dv;           // contiguous, dtype
  void *dS0, *dz0;              // contiguous, state dtype
  int64_t feature_map, chunk;
  bool causal, normalize;
  double eps, scale;
};

// T tokens after the state (S0, z0), one at a time (decoding).
struct LinearStepArgs {
  DType dtype;
  int64_t B, Hq, Hkv, T, D, Dv;
  Operand q, k, v;
  const void *S0, *z0;  // required
  void* out;            // contiguous (B, Hq, T, Dv), dtype
  void *S, *z;          // state after the T tokens
  int64_t feature_map;
  bool normalize;
  double eps, scale;
};

struct KernelTable {
  int abi_version;
  const char* isa;
  void (*attention_fwd)(const AttentionFwdArgs&);
  void (*attention_bwd)(const AttentionBwdArgs&);
  void (*linear_fwd)(const LinearFwdArgs&);
  void (*linear_bwd)(const LinearBwdArgs&);
  void (*linear_step)(const LinearStepArgs&);
  // The vectorised exp2 of the softmax and tanh of the softcap, exposed so tests can
  // bound their error.
  void (*exp2)(const float* x, float* y, int64_t n);
  void (*tanh)(const float* x, float* y, int64_t n);
  // The float32 tile shapes {fwd BQ, fwd BK, bwd BQ, bwd BK} the kernels would use (the
  // size of their per-thread scratch), so tests can bound them.
  void (*tile_shapes)(const MaskSpec& m, int64_t nq, int64_t nk, int64_t* out);
};

constexpr int kKernelAbiVersion = 7;

}  // namespace attention_ext::cpu
