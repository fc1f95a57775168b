// FlashAttention-2 forward on CPU for the whole mask family.
//
// One task = (query head, query tile of one document; segments.h). It walks the key
// tiles of that document that classify() does not rule out, keeping the running row
// max / sum and the output accumulator of its query tile in a private buffer, so
// nothing of size Nq x Nk ever exists.
// K tiles are packed transposed (and converted to acc_t) once per call, shared by every
// query tile and every query head of a GQA group. bf16 inputs on AVX512-BF16
// (gemm_bf16.h) keep K^T, V, Q and P in bf16 (K^T and V in VNNI pairs, P rounded as
// FlashAttention does on GPUs) and fold the softmax scale into the fp32 scores.
#include "../../common/mask.h"
#include "dropout_tile.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "kernels.h"
#include "na_tiles.h"
#include "segments.h"
#include "softmax_tile.h"
#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t, typename acc_t>
void fwd_impl(const AttentionFwdArgs& a) {
  constexpr int64_t VL = Vec<acc_t>::size();
  constexpr bool kBf16 = bf16_tiles<scalar_t>();
  const auto [BQ, BK] = fwd_tiles<acc_t>(a.mask, a.Nq, a.Nk);
  const Segments segs = make_segments(a.docs, a.mask, a.B, a.Nq, a.Nk, BQ, BK);
  const NaTiles na(a.mask, BQ, BK);  // grid neighborhoods: tile bounds and query windows, once
  const int64_t D = a.Dqk, Dvp = round_up(a.Dv, VL);
  const int64_t group = a.Hq / a.Hkv;
  const auto* q = static_cast<const scalar_t*>(a.q.data);
  const auto* k = static_cast<const scalar_t*>(a.k.data);
  const auto* v = static_cast<const scalar_t*>(a.v.data);
  auto* out = static_cast<scalar_t*>(a.out);
  auto* lse = static_cast<acc_t*>(a.lse);

  // Packed operands: K^T tiles [key tile][Hkv][D][BK], V rows [B][Hkv][Nk][Dvp]; bf16
  // tiles: K^T in VNNI pairs along D [key tile][Hkv][D2 / 2][BK][2], V in VNNI pairs
  // along keys [key tile][Hkv][BK / 2][Dvp][2] (BK is even).
  const int64_t kt_tile = D * BK;
  const int64_t nkt = int64_t(segs.ktiles.size());
  const int64_t D2 = round_up(D, 2), ktb_tile = D2 * BK, vb_tile = BK * Dvp;
  // V already in acc_t, with unit column stride and whole vectors per row, is read in
  // place as the P.V operand (a copy would be V's size again)
  const bool v_in_place = std::is_same_v<scalar_t, acc_t> && a.Dv == Dvp && a.v.stride[3] == 1;
  Buffer<acc_t> kT(kBf16 ? 0 : nkt * a.Hkv * kt_tile);
  Buffer<acc_t> vP(kBf16 || v_in_place ? 0 : a.B * a.Hkv * a.Nk * Dvp);
  Buffer<c10::BFloat16> kTb(kBf16 ? nkt * a.Hkv * ktb_tile : 0), vPb(kBf16 ? nkt * a.Hkv * vb_tile : 0);
  // rows of V holding NaN/inf: [B][Hkv][Nk]; bf16 tiles: [key tile][Hkv][BK]
  Buffer<uint8_t> v_bad(kBf16 ? nkt * a.Hkv * BK : a.B * a.Hkv * a.Nk);
  parallel_tasks(nkt * a.Hkv, [&](int64_t t) {
    const TileRef& tile = segs.ktiles[t / a.Hkv];
    const Segment& sg = segs.seg[tile.seg];
    const int64_t h = t % a.Hkv, b = sg.b, bh = b * a.Hkv + h;
    const int64_t k0 = sg.span.k0 + tile.start, n = std::min(BK, sg.span.nk - tile.start);
    const scalar_t* ks = k + b * a.k.stride[0] + h * a.k.stride[1] + k0 * a.k.stride[2];
    const scalar_t* vs = v + b * a.v.stride[0] + h * a.v.stride[1] + k0 * a.v.stride[2];
    if constexpr (kBf16) {
#if defined(AE_BF16_TILES)
      pack_vnni(ks, a.k.stride[3], a.k.stride[2], D, n, kTb.get() + t * ktb_tile, BK, D2);
      pack_vnni(vs, a.v.stride[2], a.v.stride[3], n, a.Dv, vPb.get() + t * vb_tile, Dvp, BK, v_bad.get() + t * BK);
#endif
    } else {
      load_transposed(ks, a.k.stride[2], a.k.stride[3], n, D, kT.get() + t * kt_tile, BK);
      if (v_in_place)
        flag_bad_rows(vs, a.v.stride[2], n, a.Dv, v_bad.get() + bh * a.Nk + k0, n);
      else
        load_rows(vs, a.v.stride[2], a.v.stride[3], n, a.Dv, vP.get() + (bh * a.Nk + k0) * Dvp, Dvp, n, acc_t(1),
                v_bad.get() + bh * a.Nk + k0);
    }
  });

  // log2(e) is folded into the query so that the softmax runs on exp2 (bf16 tiles: into
  // the fp32 scores, so Q stays exact).
  const acc_t qmult = acc_t(a.scale * kLog2e);
  const acc_t cap2 = acc_t(a.softcap * kLog2e);  // softcap in base-2 units, 0 = off
  const int64_t nqt = int64_t(segs.qtiles.size());
  const DropoutTile dropout(a.dropout, a.Hq);
  parallel_tasks(nqt * a.Hq, [&](int64_t t) {
    // heavy (late, under causal) query tiles first
    const TileRef& tile = segs.qtiles[nqt - 1 - t / a.Hq];
    const Segment& sg = segs.seg[tile.seg];
    const MaskSpec& mask = sg.mask;
    const int64_t h = t % a.Hq, b = sg.b, bh = b * a.Hq + h, hk = h / group;
    // q0: the tile's first row in the document; row0: in the tensors
    const int64_t q0 = tile.start, mq = std::min(BQ, sg.span.nq - q0), row0 = sg.span.q0 + q0;
    // bf16 tiles: Q (BQ x D2 bf16) lives in the BQ x D floats of qs, P (BQ x BK bf16) after row_sum
    const int64_t need = BQ * D + BQ * BK + BQ * Dvp + 2 * BQ + (kBf16 ? BQ * BK / 2 : 0);
    acc_t* qs = task_scratch<acc_t>(need);
    acc_t* s = qs + BQ * D;
    acc_t* o = s + BQ * BK;
    acc_t* row_max = o + BQ * Dvp;
    acc_t* row_sum = row_max + BQ;

    const scalar_t* q_tile = q + b * a.q.stride[0] + h * a.q.stride[1] + row0 * a.q.stride[2];
    [[maybe_unused]] auto* qb = reinterpret_cast<c10::BFloat16*>(qs);
    [[maybe_unused]] auto* pb = reinterpret_cast<c10::BFloat16*>(row_sum + BQ);
    if constexpr (kBf16) {
#if defined(AE_BF16_TILES)
      copy_rows_bf16(q_tile, a.q.stride[2], a.q.stride[3], mq, D, qb, D2, mq);
#endif
    } else {
      load_rows(q_tile, a.q.stride[2], a.q.stride[3], mq, D, qs, D, mq, qmult);
    }
    std::fill(o, o + mq * Dvp, acc_t(0));
    std::fill(row_max, row_max + mq, kNegInf<acc_t>);
    std::fill(row_sum, row_sum + mq, acc_t(0));

    const acc_t slope2 = alibi_slope<acc_t>(a.mods, b, h) * acc_t(kLog2e);  // base 2, 0 = off
    AlibiRamp<acc_t> alibi(slope2, -1);
    int64_t kt_begin, kt_end;
    key_tile_range(mask, q0, q0 + mq, BK, &kt_begin, &kt_end);
    // the document's keys: K^T tiles and V rows
    const acc_t* kT_doc = kT.get() + sg.kt0 * a.Hkv * kt_tile + hk * kt_tile;
    [[maybe_unused]] const scalar_t* v_src = v + b * a.v.stride[0] + hk * a.v.stride[1] + sg.span.k0 * a.v.stride[2];
    const acc_t* v_doc = v_in_place ? reinterpret_cast<const acc_t*>(v_src)
                                    : vP.get() + ((b * a.Hkv + hk) * a.Nk + sg.span.k0) * Dvp;
    const int64_t ldv = v_in_place ? a.v.stride[2] : Dvp;
    const uint8_t* v_bad_doc = v_bad.get() + (b * a.Hkv + hk) * a.Nk + sg.span.k0;
    [[maybe_unused]] const c10::BFloat16* kTb_doc = kTb.get() + (sg.kt0 * a.Hkv + hk) * ktb_tile;
    [[maybe_unused]] const c10::BFloat16* vb_doc = vPb.get() + (sg.kt0 * a.Hkv + hk) * vb_tile;
    [[maybe_unused]] const uint8_t* vb_bad_doc = v_bad.get() + (sg.kt0 * a.Hkv + hk) * BK;
    for (int64_t kt = kt_begin; kt < kt_end; ++kt) {
      const int64_t k0 = kt * BK, nk = std::min(BK, mask.nk - k0);
      const int cls = na.on() ? na.classify(q0, k0) : classify(mask, b, h, q0, q0 + mq, k0, k0 + nk);
      if (cls == kEmpty) continue;
      // rows [r0, r1) x columns [c0, c1) of the tile hold everything allowed
      int64_t r0 = 0, r1 = mq, c0 = 0, c1 = nk;
      if (cls == kPartial && (na.on() ? na.trim(q0, k0, &r0, &r1, &c0, &c1)
                                       : trim_tile(mask, q0, mq, k0, nk, &r0, &r1, &c0, &c1))) {
        if (r0 >= r1) continue;
        c0 -= c0 % VL;  // the score product's columns start on a vector boundary
      }
      const int64_t nc = c1 - c0;
      acc_t* s0 = s + c0;
      if constexpr (kBf16) {
#if defined(AE_BF16_TILES)
        gemm_bf16(r1 - r0, round_up(nc, VL), D, qb + r0 * D2, D2, kTb_doc + kt * a.Hkv * ktb_tile + 2 * c0, 2 * BK,
                  s0 + r0 * BK, BK, false, float(qmult));
#endif
      } else {
        gemm<acc_t>(r1 - r0, round_up(nc, VL), D, qs + r0 * D, D, 1, kT_doc + kt * a.Hkv * kt_tile + c0, BK,
                    s0 + r0 * BK, BK, false);
      }
      for (int64_t r = r0; r < r1; ++r) {
        acc_t* row = s0 + r * BK;
        if (cap2 > acc_t(0)) softcap_row(row, nc, cap2);
        if (cls == kPartial && na.on())
          na.masked_runs(q0 + r, k0, k0 + c0, nc, [&](int64_t u, int64_t w) { std::fill(row + u, row + w, kNegInf<acc_t>); });
        else if (cls == kPartial)
          mask_row(mask, b, h, q0 + r, k0 + c0, nc, row);
        // ALiBi after the softcap, in the softmax's first pass
        const acc_t alpha = online_softmax_row(row, nc, row_max[r], row_sum[r], slope2 != acc_t(0) ? &alibi : nullptr,
                                               q0 + r + mask.offset - (k0 + c0));
        if (alpha != acc_t(1)) scale_row(o + r * Dvp, Dvp, alpha);
      }
      // after the row sums: dropout acts on the normalised probabilities only
      if (a.dropout.on()) dropout.apply_rows(b, h, row0 + r0, r1 - r0, sg.span.k0 + k0 + c0, nc, s0 + r0 * BK, BK);
      if constexpr (kBf16) {
#if defined(AE_BF16_TILES)
        for (int64_t r = r0; r < r1; ++r) round_row_bf16(s0 + r * BK, nc, pb + r * BK);
        gemm_bf16(r1 - r0, Dvp, nc, pb + r0 * BK, BK, vb_doc + kt * a.Hkv * vb_tile + c0 * Dvp, 2 * Dvp,
                  o + r0 * Dvp, Dvp, true);
        // V rows holding NaN/inf were packed as zeros: add them where P is non-zero
        add_bad_rows(r1 - r0, nc, pb + r0 * BK, BK, 1, vb_bad_doc + kt * a.Hkv * BK + c0,
                     [&](int64_t j, float p, float* o_row) {
                       add_row(p, v_src + (k0 + c0 + j) * a.v.stride[2], a.v.stride[3], a.Dv, o_row);
                     }, o + r0 * Dvp, Dvp);
#endif
      } else {
        gemm_guarded<acc_t>(r1 - r0, Dvp, nc, s0 + r0 * BK, BK, 1, v_doc + (k0 + c0) * ldv, ldv, o + r0 * Dvp, Dvp,
                            true, v_bad_doc + k0 + c0);
      }
    }

    scalar_t* out_t = out + (bh * a.Nq + row0) * a.Dv;
    acc_t* lse_t = lse + bh * a.Nq + row0;
    const bool sink = a.mods.sinks != nullptr;
    const acc_t sink2 = sink ? sink_logit<acc_t>(a.mods, h) * acc_t(kLog2e) : acc_t(0);
    for (int64_t r = 0; r < mq; ++r) {
      // l == 0: the row saw no key (zeros; lse -inf, or the sink). A NaN l (NaN input)
      // falls through and stays NaN.
      acc_t l = row_sum[r], m = row_max[r];
      const acc_t alpha = sink ? fold_sink(sink2, m, l) : acc_t(1);
      const bool none = l == acc_t(0);
      const acc_t inv = none ? acc_t(0) : alpha / l;
      for (int64_t c = 0; c < a.Dv; ++c) out_t[r * a.Dv + c] = from_acc<scalar_t>(o[r * Dvp + c] * inv);
      lse_t[r] = none ? kNegInf<acc_t> : lse_from_log2(m, l);
    }
  });
}

}  // namespace

void attention_fwd(const AttentionFwdArgs& a) {
  switch (a.dtype) {
    case DType::Float32: return fwd_impl<float, float>(a);
    case DType::Float64: return fwd_impl<double, double>(a);
    case DType::BFloat16: return fwd_impl<c10::BFloat16, float>(a);
    case DType::Float16: return fwd_impl<c10::Half, float>(a);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
