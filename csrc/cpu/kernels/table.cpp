#include "gemm_bf16.h"
#include "kernels.h"
#include "tile_util.h"
#include "vec_math.h"
#include "workspace.h"

#define AE_STR2(x) #x
#define AE_STR(x) AE_STR2(x)

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {

void exp2_array(const float* x, float* y, int64_t n) {
  constexpr int64_t VL = Vec<float>::size();
  int64_t i = 0;
  for (; i + VL <= n; i += VL) exp2_poly(Vec<float>::loadu(x + i)).store(y + i);
  if (i < n) exp2_poly(Vec<float>::loadu(x + i, n - i)).store(y + i, n - i);
}

void tanh_array(const float* x, float* y, int64_t n) {
  constexpr int64_t VL = Vec<float>::size();
  int64_t i = 0;
  for (; i + VL <= n; i += VL) tanh_fast(Vec<float>::loadu(x + i)).store(y + i);
  if (i < n) tanh_fast(Vec<float>::loadu(x + i, n - i)).store(y + i, n - i);
}

void tile_shapes(const MaskSpec& m, int64_t nq, int64_t nk, int64_t* out) {
  const TileShape f = fwd_tiles<float>(m, nq, nk), b = bwd_tiles<float>(m, nq, nk);
  out[0] = f.bq, out[1] = f.bk, out[2] = b.bq, out[3] = b.bk;
}

#if defined(AE_BF16_TILES)
void pack_vnni_rows(const c10::BFloat16* src, int64_t kn, int64_t nn, c10::BFloat16* dst, int64_t ldn, int64_t k_pad,
                    uint8_t* bad) {
  pack_vnni(src, nn, int64_t(1), kn, nn, dst, ldn, k_pad, bad);
}
void tile_product_bf16(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, const c10::BFloat16* b, float* c,
                       bool accumulate) {
  gemm_bf16(M, N, K, a, round_up(K, 2), b, 2 * N, c, N, accumulate);
}
constexpr auto kPackVnni = &pack_vnni_rows;
constexpr auto kTileProductBf16 = &tile_product_bf16;
#else
constexpr decltype(KernelTable::pack_vnni) kPackVnni = nullptr;
constexpr decltype(KernelTable::tile_product_bf16) kTileProductBf16 = nullptr;
#endif

void release_workspace() { Workspace::get().release(); }

const KernelTable* kernel_table() {
  static const KernelTable table{kKernelAbiVersion, AE_STR(CPU_CAPABILITY), &attention_fwd, &attention_bwd,
                                 &linear_fwd,       &linear_bwd,            &linear_step,   &exp2_array,
                                 &tanh_array,       &tile_shapes,           &decode_fwd,    kPackVnni,
                                 kTileProductBf16, &release_workspace};
  return &table;
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
