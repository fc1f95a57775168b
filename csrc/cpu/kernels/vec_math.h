// Vector math for the CPU kernels, on ATen's Vectorized<T> so one source serves every
// ISA module (its width follows the module's compile flags).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// 2^x for float lanes. Softmax runs in base 2 (log2(e) is folded into the score scale),
// so this is the one transcendental on the hot path. Range reduction x = n + f with
// f in [-0.5, 0.5], 2^f by a degree-5 polynomial fitted for relative error (max
// relative error 2.2e-7, about 2 ulp, asserted in tests/test_cpu_paths.py), 2^n through the
// exponent bits. Inputs below -126 give exactly 0 (so -inf from masking gives 0);
// NaN stays NaN.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace exp2_coef {
constexpr float c0 = 1.0000001192092896f, c1 = 0.6931469440460205f, c2 = 0.24022121727466583f,
                c3 = 0.05550742521882057f, c4 = 0.009675459936261177f, c5 = 0.0013266970636323094f;
}
#endif

inline Vec<float> exp2_poly(Vec<float> x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using namespace exp2_coef;
#endif
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 xv = _mm512_min_ps(_mm512_set1_ps(127.f), x);
  const __mmask16 tiny = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-126.f), _CMP_LT_OQ);
  const __m512 n = _mm512_roundscale_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xv, n);
  __m512 p = _mm512_set1_ps(c5);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c0));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 r = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  return _mm512_mask_blend_ps(tiny, r, _mm512_setzero_ps());
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 xv = _mm256_min_ps(_mm256_set1_ps(127.f), x);  // NaN in x passes through
  const __m256 tiny = _mm256_cmp_ps(xv, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  const __m256 n = _mm256_round_ps(xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xv, n);
  __m256 p = _mm256_set1_ps(c5);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c0));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(tiny, r);
#else
  float buf[Vec<float>::size()];
  x.store(buf);
  for (int i = 0; i < Vec<float>::size(); ++i) buf[i] = buf[i] < -126.f ? 0.f : std::exp2(buf[i]);
  return Vec<float>::loadu(buf);
#endif
}

// float64 runs the exact library exp2: that path exists for gradcheck, not speed.
inline Vec<double> exp2_poly(Vec<double> x) {
  double buf[Vec<double>::size()];
  x.store(buf);
  for (int i = 0; i < Vec<double>::size(); ++i) buf[i] = std::exp2(buf[i]);
  return Vec<double>::loadu(buf);
}

template <typename T>
inline T exp2_scalar(T x) {
  return std::exp2(x);
}

// tanh for logit softcapping, at a few ulp and cheaper than ATen's (Sleef, 1 ulp): in a
// quick side-by-side run (not recorded) the softcap's forward overhead fell from ~1.5-1.9x
// to ~1.2-1.3x; RESULTS.md "softcap" has the cost measured with this one.
// |y| < 0.3 by the odd Taylor polynomial through y^11 (remainder < 1e-9), else
// 1 - 2 / (e^{2|y|} + 1) on exp2_poly with the sign restored (max relative error 4e-7,
// asserted in tests/test_cpu_paths.py). NaN stays NaN (minimum propagates it).
inline Vec<float> tanh_fast(Vec<float> y) {
  using V = Vec<float>;
  const V a = y.abs(), y2 = y * y;
  V p(-1382.f / 155925.f);
  p = at::vec::fmadd(p, y2, V(62.f / 2835.f));
  p = at::vec::fmadd(p, y2, V(-17.f / 315.f));
  p = at::vec::fmadd(p, y2, V(2.f / 15.f));
  p = at::vec::fmadd(p, y2, V(-1.f / 3.f));
  const V small = at::vec::fmadd(p * y2, y, y);
  const V e = exp2_poly(at::vec::minimum(a, V(15.f)) * V(2.8853900817779268f));  // e^{2|y|}
  const V big_abs = V(1.f) - V(2.f) / (e + V(1.f));
  const V big = big_abs | (y & V(-0.f));  // sign of y
  return V::blendv(big, small, a < V(0.3f));
}

// float64 runs the library tanh (the gradcheck path).
inline Vec<double> tanh_fast(Vec<double> y) { return y.tanh(); }

// max without ATen's NaN propagation (two fewer instructions): a NaN score still reaches
// the output through exp2, so the softmax stays NaN-propagating.
inline Vec<float> fast_max(Vec<float> a, Vec<float> b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}
inline Vec<double> fast_max(Vec<double> a, Vec<double> b) { return at::vec::maximum(a, b); }

template <typename T>
inline T hmax(Vec<T> v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return fast_max(a, b); }, v);
}

template <typename T>
inline T hsum(Vec<T> v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
