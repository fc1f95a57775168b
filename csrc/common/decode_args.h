// attention_decode: attention of a few new queries over a KV cache (contiguous, rolling
// or paged), with the new keys appended in place first. The checks here keep every
// cache read and write inside the cache, also for direct op calls.
//
// Row b holds lengths[b] logical tokens after the append (cache_seqlens[b] + Nq with
// k/v, cache_seqlens[b] without); its query i sits at position lengths[b] - Nq + i.
// Logical token t lives in
//   contiguous  slot t of row b                       (k_cache (B, Hkv, Ncache, D))
//   rolling     slot t % Ncache of row b               (a ring; only the last Ncache tokens exist)
//   paged       page block_table[b][t / page_size], slot t % page_size
//                                                      (k_cache (num_pages, Hkv, page_size, D))
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "mask.h"
#include "score_mods.h"
#include "tensor_checks.h"

namespace attention_ext {

#define AE_DECODE_SCHEMA                                                                                      \
  "attention_decode(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, float scale, "   \
  "Tensor? k=None, Tensor? v=None, Tensor? block_table=None, bool rolling=False, float softcap=0.0, "         \
  "bool causal=True, int window_left=-1, int window_right=-1, Tensor? key_mask=None, Tensor? alibi_slopes=None, " \
  "Tensor? sinks=None) -> (Tensor out, Tensor lse)"

#define AE_DECODE_PARAMS                                                                                     \
  const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens, double scale, \
      const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,                                  \
      const std::optional<at::Tensor>& block_table, bool rolling, double softcap, bool causal,                 \
      int64_t window_left, int64_t window_right, const std::optional<at::Tensor>& key_mask,                 \
      const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& sinks

#define AE_DECODE_ARGS                                                                                     \
  q, k_cache, v_cache, cache_seqlens, scale, k, v, block_table, rolling, softcap, causal, window_left, \
      window_right, key_mask, alibi_slopes, sinks

struct DecodeInputs {
  int64_t B, Hq, Hkv, Nq, D, Dv;
  int64_t slots;       // Ncache (contiguous, rolling) or page_size (paged)
  int64_t max_pages;   // paged: block_table.size(1); else 0
  bool rolling, append;
  DType dtype;
  double scale, softcap;
  MaskSpec mask;  // kind, causal, left, right; nq / nk / offset are set per row
  bool windowed;
  std::vector<int64_t> lengths;  // per row, after the append
  at::Tensor block_table;        // host int32 (B, max_pages), or undefined
  at::Tensor key_mask;           // bool (B, M) on q's device, or undefined
  // ALiBi and sinks as in flash_attention (score_mods.h), query i of row b at its aligned
  // position lengths[b] - Nq + i, key t at its logical position
  ScoreMods mods;
  at::Tensor alibi, sinks;  // (B, Hq) / (Hq,) in the lse dtype, or undefined
};

DecodeInputs check_attention_decode_inputs(AE_DECODE_PARAMS);

// Logical tokens [lo, hi) of row b (keys, all heads) as a (1, Hkv, hi - lo, D) tensor:
// a view where the slots are contiguous, else gathered.
at::Tensor cache_rows(const DecodeInputs& in, const at::Tensor& cache, int64_t b, int64_t lo, int64_t hi);

// Writes src (B, Hkv, Nq, D) into the cache at logical tokens lengths[b] - Nq ... of each row.
void append_to_cache(const DecodeInputs& in, at::Tensor& cache, const at::Tensor& src);

// The first key row b needs: the window's reach behind its first query (0 without a
// window), never before the oldest token a rolling cache still holds.
int64_t first_key(const DecodeInputs& in, int64_t b);

}  // namespace attention_ext
