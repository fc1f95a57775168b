// Entry points of one ISA build of the CPU kernels.
#pragma once

#include "../kernel_table.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

void attention_fwd(const AttentionFwdArgs& a);
void attention_bwd(const AttentionBwdArgs& a);
void linear_fwd(const LinearFwdArgs& a);
void linear_bwd(const LinearBwdArgs& a);
void linear_step(const LinearStepArgs& a);
void exp2_array(const float* x, float* y, int64_t n);
void tanh_array(const float* x, float* y, int64_t n);
void decode_fwd(DecodeFwdArgs& a);
void tile_shapes(const MaskSpec& m, int64_t nq, int64_t nk, int64_t* out);

// The table this build exports (see kernel_table.h).
const KernelTable* kernel_table();

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
