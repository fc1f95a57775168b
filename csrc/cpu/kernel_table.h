// The boundary between the extension (_C: schemas, tensor checks, allocation) and the
// CPU kernels, which are compiled once per ISA into modules of their own
// (attention_ext._cpu_avx512, _cpu_avx2, and the portable build inside _C).
// Only plain data crosses it, so each ISA module can be built with its own flags and
// swapped at run time (attention_ext._set_cpu_isa).
#pragma once

#include <cstdint>

#include "../common/mask.h"

namespace attention_ext::cpu {

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

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
  double scale;
};

struct AttentionBwdArgs {
  DType dtype;
  int64_t B, Hq, Hkv, Nq, Nk, Dqk, Dv;
  Operand q, k, v, out, grad_out;
  const void* lse;       // contiguous (B, Hq, Nq), float32 (float64 for float64 inputs)
  const void* grad_lse;  // same layout as lse, or nullptr
  void *dq, *dk, *dv;    // contiguous, dtype
  MaskSpec mask;
  double scale;
};

struct KernelTable {
  int abi_version;
  const char* isa;
  void (*attention_fwd)(const AttentionFwdArgs&);
  void (*attention_bwd)(const AttentionBwdArgs&);
};

constexpr int kKernelAbiVersion = 1;

}  // namespace attention_ext::cpu
