// The boundary between the extension (_C: schemas, tensor checks, allocation) and the
// CPU kernels, which are compiled once per ISA into modules of their own
// (attention_ext._cpu_avx512, _cpu_avx2, and the portable build inside _C).
// Only plain data crosses it, so each ISA module can be built with its own flags and
// swapped at run time (attention_ext.set_cpu_isa).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

#include "../common/documents.h"
#include "../common/dropout.h"
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
  DropoutSpec dropout;
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
  DropoutSpec dropout;
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

// attention_decode (csrc/common/decode_args.h has the layouts): Nq new queries of each
// row over its cached keys [first[b], length[b]) in logical positions, read in place from
// a contiguous, rolling or paged cache (last dim contiguous).
struct DecodeFwdArgs {
  DType dtype;
  int64_t B, Hq, Hkv, Nq, D, Dv;
  Operand q;                   // (B, Hq, Nq, D)
  Operand k_cache, v_cache;    // (B or pages, Hkv, slots, D / Dv), stride[3] == 1
  int64_t slots;               // Ncache (contiguous, rolling) or page_size (paged)
  bool rolling;                // logical token t in slot t % slots
  const int32_t* block_table;  // host (B, max_pages), or nullptr
  int64_t max_pages;
  const int64_t* first;        // (B,) the first key each row needs
  const int64_t* length;       // (B,) tokens of each row; query i sits at length - Nq + i
  const bool* key_mask;        // contiguous (B, key_mask_len) or nullptr; positions >= len attendable
  int64_t key_mask_len;
  MaskSpec mask;               // kind (dense / window), causal, left, right; nq, nk, offset set per row
  double scale;
  double softcap;              // 0 = off
  ScoreMods mods;              // ALiBi slopes (B, Hq), sinks (score_mods.h); positions as the mask's
  void* out;                   // contiguous (B, Hq, Nq, Dv), dtype
  void* lse;                   // contiguous (B, Hq, Nq), float32 (float64 for float64 inputs)
  int64_t split;               // out: the keys per split the kernel used (tests aim at its edges)
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
  void (*decode_fwd)(DecodeFwdArgs&);
  // The bf16 tiles' VNNI packing (gemm_bf16.h pack_vnni) of a contiguous bf16 (kn, nn)
  // matrix into (k_pad / 2, ldn, 2) pairs plus its non-finite row flags, so tests can
  // round-trip it; nullptr in builds without bf16 tile products.
  void (*pack_vnni)(const c10::BFloat16* src, int64_t kn, int64_t nn, c10::BFloat16* dst, int64_t ldn,
                    int64_t k_pad, uint8_t* bad);
  // One bf16 tile product C (M x N, ld N) (+)= A (M x K rows, ld K rounded to even) * B
  // (VNNI pairs, ld 2N) on the kernels' gemm_bf16, for the tile-product benchmark against
  // oneDNN's brgemm; nullptr without bf16 tile products.
  void (*tile_product_bf16)(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, const c10::BFloat16* b,
                            float* c, bool accumulate);
  // Frees the scratch blocks this build keeps between calls (workspace.h), so that a
  // memory measurement sees what a call allocates.
  void (*release_workspace)();
};

constexpr int kKernelAbiVersion = 12;

}  // namespace attention_ext::cpu
