// The kernels' view of a tensor argument (kernel_table.h's Operand), shared by the CPU backends.
#pragma once

#include <ATen/ATen.h>

#include "kernel_table.h"

namespace attention_ext::cpu {

inline Operand operand(const at::Tensor& t) {
  Operand o;
  o.data = t.data_ptr();
  for (int i = 0; i < 4; ++i) o.stride[i] = t.stride(i);
  return o;
}

}  // namespace attention_ext::cpu
