// tanh for logit softcapping (softcap * tanh(s / softcap)), shared by the SIMT and
// tensor-core kernels. The build uses --use_fast_math, under which the library tanhf's
// accuracy is not promised; this one is within a few ulp with approximate exp2 and
// division: |y| < 0.3 by the odd Taylor polynomial through y^11 (remainder < 1e-9),
// else 1 - 2 / (e^{2|y|} + 1) with the sign restored. NaN stays NaN.
#pragma once

#include <cuda_runtime.h>

namespace attention_ext::cuda {

__device__ __forceinline__ float softcap_tanh(float y) {
  const float a = fabsf(y), y2 = y * y;
  float p = -1382.f / 155925.f;
  p = fmaf(p, y2, 62.f / 2835.f);
  p = fmaf(p, y2, -17.f / 315.f);
  p = fmaf(p, y2, 2.f / 15.f);
  p = fmaf(p, y2, -1.f / 3.f);
  const float small = fmaf(p * y2, y, y);
  const float e = exp2f(fminf(a, 15.f) * 2.8853900817779268f);  // e^{2|y|}; tanh(15) rounds to 1
  const float big = copysignf(1.f - 2.f / (e + 1.f), y);
  return a < 0.3f ? small : a >= 0.3f ? big : y;
}

__device__ __forceinline__ double softcap_tanh(double y) { return tanh(y); }

}  // namespace attention_ext::cuda
