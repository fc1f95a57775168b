// CPU backend of attention_fwd / attention_bwd / attention_decode: the shared op bodies
// (common/attention_op.h, common/decode_op.h) check and allocate; this hands plain
// pointers to the active ISA build of the kernels.
#include <torch/library.h>

#include <atomic>

#include "../common/attention_op.h"
#include "../common/decode_op.h"
#include "isa.h"
#include "operand.h"

namespace attention_ext::cpu {
namespace {

// Query rows per (batch row, kv head) up to which the decode kernel (split-K, cache read
// in place) beats the flash kernel on a view of each row's keys; measured, see
// benchmarks/bench_decode.py. A 128-token prefill chunk stays on the flash kernel.
constexpr int64_t kDecodeKernelMaxRows = 64;

// Calls that ran the decode kernel, and its last split (_C._cpu_decode_kernel_stats).
std::atomic<int64_t> decode_calls{0}, decode_last_split{0};

// The kernels' view of a checked call (the fields both passes share).
template <class Args>
Args kernel_args(const AttentionInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const QkvShape& s = in.shape;
  Args a{};
  a.dtype = in.dtype;
  a.B = s.B, a.Hq = s.Hq, a.Hkv = s.Hkv, a.Nq = s.Nq, a.Nk = s.Nk, a.Dqk = s.D, a.Dv = s.Dv;
  a.q = operand(q), a.k = operand(k), a.v = operand(v);
  a.mask = in.mask;
  a.docs = in.documents();
  a.scale = in.scale, a.softcap = in.softcap;
  a.mods = in.mods;
  a.dropout = in.dropout;
  return a;
}

struct CpuBackend {
  static constexpr bool kDocuments = true;  // the kernels walk packed documents (segments.h)

  static void fwd(const AttentionInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  at::Tensor& out, at::Tensor& lse) {
    auto a = kernel_args<AttentionFwdArgs>(in, q, k, v);
    a.out = out.data_ptr(), a.lse = lse.data_ptr();
    active_kernels().attention_fwd(a);
  }

  static void bwd(const AttentionInputs& in, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
    auto a = kernel_args<AttentionBwdArgs>(in, q, k, v);
    a.out = operand(out), a.grad_out = operand(grad_out);
    a.lse = lse.data_ptr(), a.grad_lse = grad_lse.defined() ? grad_lse.data_ptr() : nullptr;
    a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
    active_kernels().attention_bwd(a);
  }

  static bool decode(const DecodeInputs& in, const at::Tensor& q, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, at::Tensor& out, at::Tensor& lse) {
    if (in.Nq * (in.Hq / in.Hkv) > kDecodeKernelMaxRows || k_cache.stride(3) != 1 || v_cache.stride(3) != 1)
      return false;
    std::vector<int64_t> first(in.B);
    for (int64_t b = 0; b < in.B; ++b) first[b] = first_key(in, b);
    const at::Tensor key_mask = in.key_mask.defined() ? in.key_mask.contiguous() : at::Tensor();
    DecodeFwdArgs a{};
    a.dtype = in.dtype;
    a.B = in.B, a.Hq = in.Hq, a.Hkv = in.Hkv, a.Nq = in.Nq, a.D = in.D, a.Dv = in.Dv;
    a.q = operand(q), a.k_cache = operand(k_cache), a.v_cache = operand(v_cache);
    a.slots = in.slots, a.rolling = in.rolling;
    a.block_table = in.block_table.defined() ? in.block_table.data_ptr<int32_t>() : nullptr;
    a.max_pages = in.max_pages;
    a.first = first.data(), a.length = in.lengths.data();
    a.key_mask = key_mask.defined() ? key_mask.data_ptr<bool>() : nullptr;
    a.key_mask_len = key_mask.defined() ? key_mask.size(1) : 0;
    a.mask = in.mask;
    a.scale = in.scale, a.softcap = in.softcap;
    a.mods = in.mods;
    a.out = out.data_ptr(), a.lse = lse.data_ptr();
    active_kernels().decode_fwd(a);
    decode_calls.fetch_add(1);
    decode_last_split.store(a.split);
    return true;
  }
};

}  // namespace

std::pair<int64_t, int64_t> decode_kernel_stats() { return {decode_calls.load(), decode_last_split.load()}; }

TORCH_LIBRARY_IMPL(attention_ext, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_op<CpuBackend>);
  m.impl("attention_bwd", &attention_bwd_op<CpuBackend>);
  m.impl("attention_decode", &attention_decode_op<CpuBackend>);
}

}  // namespace attention_ext::cpu
