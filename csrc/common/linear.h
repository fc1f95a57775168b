// Linear attention: the feature maps shared by the CPU and CUDA kernels.
//
//   out_i = f_i . S_i / (f_i . z_i + eps)        (normalize)
//   out_i = f_i . S_i                            (normalize == false)
//   f_i = scale * phi(q_i),  S_i = S0 + sum_j phi(k_j) v_j^T,  z_i = z0 + sum_j phi(k_j)
// with j over all keys (non-causal) or j <= i (causal). The state (S, z) belongs to a
// key/value head: (B, Hkv, D, Dv) and (B, Hkv, D), float32 (float64 for float64 inputs).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AE_LIN_HD __host__ __device__ __forceinline__
#else
#define AE_LIN_HD inline
#endif

namespace attention_ext {

// Feature map codes of the linear_* ops (attention_ext/linear.py maps names to them).
enum FeatureMap : int64_t { kFeatureIdentity = 0, kFeatureElu = 1, kFeatureRelu = 2 };

template <typename T>
AE_LIN_HD T lin_exp(T x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);  // the CUDA math API overloads float and double
#else
  return std::exp(x);
#endif
}

// phi(x): identity; elu(x) + 1 (= x + 1 for x > 0, exp(x) otherwise); relu.
template <typename T>
AE_LIN_HD T feature(int64_t fmap, T x) {
  if (fmap == kFeatureElu) return x > T(0) ? x + T(1) : lin_exp(x);
  if (fmap == kFeatureRelu) return x < T(0) ? T(0) : x;  // NaN stays NaN
  return x;
}

// phi'(x); relu'(0) = 0 (as torch.relu's backward). From phi(x) alone: elu
// min(phi, 1), relu phi > 0, identity 1 (what the CPU kernels use).
template <typename T>
AE_LIN_HD T feature_grad(int64_t fmap, T x) {
  if (fmap == kFeatureElu) return x > T(0) ? T(1) : lin_exp(x);
  if (fmap == kFeatureRelu) return x > T(0) ? T(1) : T(0);
  return T(1);
}

}  // namespace attention_ext
