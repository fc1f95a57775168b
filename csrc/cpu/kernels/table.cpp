#include "kernels.h"

#define AE_STR2(x) #x
#define AE_STR(x) AE_STR2(x)

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

const KernelTable* kernel_table() {
  static const KernelTable table{kKernelAbiVersion, AE_STR(CPU_CAPABILITY), &attention_fwd, &attention_bwd,
                                   &linear_fwd,    &linear_bwd,    &linear_step};
  return &table;
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
