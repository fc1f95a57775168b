// FlashAttention-2 backward on CPU for the whole mask family.
//
// One task = (batch, KV head, key chunk): it owns dK and dV of its key tiles (summed
// over the query heads of its GQA group) and walks the query tiles of the same
// document (segments.h) that classify() keeps, recomputing P from the saved logsumexp. dQ is accumulated per key chunk in a
// private partial buffer and the partials are summed in a fixed order afterwards: no
// atomics, and the chunking depends on the problem size only, so the result is bitwise
// the same for any thread count.
//
// dK and dV sum over every query row of the group: the (query head, query tile) products
// are summed pairwise (pairwise_sum.h), so the error grows like log(Nq * group), not like
// Nq * group.
// P is recomputed from scores made exactly like the forward's (Q pre-multiplied by
// scale * log2(e), the same products in the same order), so only lse's rounding
// separates it from the forward's P.
//
// Tiles are held transposed (rows = keys, columns = queries) so every product is an
// A * B with contiguous B rows:
//   S^T  = K  * Q^T      dP^T = V * dO^T      dS^T = P^T o (dP^T - delta)
//   dV  += P^T * dO      dK  += dS^T * Q      dQ  += dS * K   (dS read through strides)
// bf16 inputs on AVX512-BF16 (gemm_bf16.h) run every product on bf16 operands (B in
// VNNI pairs), P and dS rounded to bf16 before their products as FlashAttention does on
// GPUs; the scores are made like the forward's bf16 scores. The pairs are packed per
// tile into the task's scratch (K once per key tile, Q and dO once per query tile and
// block of KB key tiles): whole-sequence packs would cost 2x the inputs' size.
#include "../../common/mask.h"
#include "dropout_tile.h"
#include "gemm.h"
#include "gemm_bf16.h"
#include "kernels.h"
#include "na_tiles.h"
#include "pairwise_sum.h"
#include "segments.h"
#include "softmax_tile.h"
#include "tile_util.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Zeroes P^T entries (key row j, query column c) that the mask forbids; kt0: the start of
// the key tile holding keys [k0, k0 + nk), for grid neighborhoods (na).
template <typename acc_t>
void mask_tile_t(const MaskSpec& m, const NaTiles& na, int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t kt0,
                 int64_t k0, int64_t nk, acc_t* pt, int64_t ld) {
  for (int64_t c = 0; c < mq; ++c) {
    int64_t j0, j1;
    if (na.on()) {
      na.masked_runs(q0 + c, kt0, k0, nk, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) pt[r * ld + c] = acc_t(0);
      });
    } else if (row_interval(m, q0 + c, &j0, &j1)) {
      const int64_t a = std::clamp<int64_t>(j0 - k0, 0, nk), e = std::clamp<int64_t>(j1 - k0, a, nk);
      for (int64_t r = 0; r < a; ++r) pt[r * ld + c] = acc_t(0);
      for (int64_t r = e; r < nk; ++r) pt[r * ld + c] = acc_t(0);
    } else {
      for (int64_t r = 0; r < nk; ++r)
        if (!allowed(m, b, h, q0 + c, k0 + r)) pt[r * ld + c] = acc_t(0);
    }
  }
}

template <typename scalar_t, typename acc_t>
void bwd_impl(const AttentionBwdArgs& a) {
  using V = Vec<acc_t>;
  using bf16_t = c10::BFloat16;
  constexpr int64_t VL = V::size();
  constexpr bool kBf16 = bf16_tiles<scalar_t>();
  const auto [BQ, BK] = bwd_tiles<acc_t>(a.mask, a.Nq, a.Nk);
  const Segments segs = make_segments(a.docs, a.mask, a.B, a.Nq, a.Nk, BQ, BK);
  const NaTiles na(a.mask, BQ, BK);  // grid neighborhoods: tile bounds and query windows, once
  const int64_t D = a.Dqk, Dp = round_up(D, VL), Dv = a.Dv, Dvp = round_up(Dv, VL);
  const int64_t D2 = round_up(D, 2), Dv2 = round_up(Dv, 2), BK2 = round_up(BK, 2);
  const int64_t nqt = int64_t(segs.qtiles.size()), nkt = int64_t(segs.ktiles.size());
  const int64_t group = a.Hq / a.Hkv;
  // the forward's constants: scores in base 2, the softcap in base-2 units
  const acc_t qmult = acc_t(a.scale * kLog2e);
  const bool softcap = a.softcap > 0;
  const acc_t cap2 = acc_t(a.softcap * kLog2e), inv_cap2 = softcap ? acc_t(1) / cap2 : acc_t(0);

  // Inputs already in acc_t, with unit column strides and widths of whole vectors, are
  // read in place as the row operands: no copies of Q, dO, K and V, so the backward's
  // memory is little more than its outputs (the copies were 2x Q's size and 2x K's).
  const bool in_place = std::is_same_v<scalar_t, acc_t> && D == Dp && Dv == Dvp && a.q.stride[3] == 1 &&
                        a.grad_out.stride[3] == 1 && a.k.stride[3] == 1 && a.v.stride[3] == 1;

  // Query side, per (query tile, hq) = qh: Q and dO as rows (unless in place) and as
  // transposed tiles, lse in base 2 and delta_i = dO_i . O_i (- dlse_i). bf16 tiles keep
  // only lse2 and delta here; their Q and dO pairs are packed per tile in the main loop.
  const int64_t fq = kBf16 ? 0 : 1, fr = kBf16 || in_place ? 0 : 1;
  const int64_t q_side = BQ * (fr * (Dp + Dvp) + fq * (D + Dv) + 2);
  Buffer<acc_t> qbuf(nqt * a.Hq * q_side);
  auto q_rows = [&](int64_t qh) { return qbuf.get() + qh * q_side; };
  auto do_rows = [&](int64_t qh) { return q_rows(qh) + fr * BQ * Dp; };
  auto q_t = [&](int64_t qh) { return do_rows(qh) + fr * BQ * Dvp; };
  auto do_t = [&](int64_t qh) { return q_t(qh) + fq * BQ * D; };
  auto lse2 = [&](int64_t qh) { return do_t(qh) + fq * BQ * Dv; };
  auto delta = [&](int64_t qh) { return lse2(qh) + BQ; };
  // rows of Q and dO holding NaN/inf, per (query tile, hq); bf16 tiles flag them per pack
  Buffer<uint8_t> q_bad(kBf16 ? 0 : nqt * a.Hq * BQ), do_bad(kBf16 ? 0 : nqt * a.Hq * BQ);
  const auto* lse_in = static_cast<const acc_t*>(a.lse);
  const auto* glse = static_cast<const acc_t*>(a.grad_lse);
  auto at4 = [](const Operand& op, int64_t b, int64_t h, int64_t n) {
    return static_cast<const scalar_t*>(op.data) + b * op.stride[0] + h * op.stride[1] + n * op.stride[2];
  };
  parallel_tasks(nqt * a.Hq, [&](int64_t qh) {
    const TileRef& tile = segs.qtiles[qh / a.Hq];
    const Segment& sg = segs.seg[tile.seg];
    const int64_t h = qh % a.Hq, b = sg.b, bh = b * a.Hq + h;
    const int64_t mq = std::min(BQ, sg.span.nq - tile.start), row0 = sg.span.q0 + tile.start;
    const scalar_t* qs = at4(a.q, b, h, row0);
    const scalar_t* dos = at4(a.grad_out, b, h, row0);
    const scalar_t* os = at4(a.out, b, h, row0);
    if constexpr (!kBf16) {
      if (in_place) {
        flag_bad_rows(qs, a.q.stride[2], mq, D, q_bad.get() + qh * BQ, BQ);
        flag_bad_rows(dos, a.grad_out.stride[2], mq, Dv, do_bad.get() + qh * BQ, BQ);
      } else {
        load_rows(qs, a.q.stride[2], a.q.stride[3], mq, D, q_rows(qh), Dp, BQ, acc_t(1), q_bad.get() + qh * BQ);
        load_rows(dos, a.grad_out.stride[2], a.grad_out.stride[3], mq, Dv, do_rows(qh), Dvp, BQ, acc_t(1),
                  do_bad.get() + qh * BQ);
      }
      load_transposed(qs, a.q.stride[2], a.q.stride[3], mq, D, q_t(qh), BQ, qmult);
      load_transposed(dos, a.grad_out.stride[2], a.grad_out.stride[3], mq, Dv, do_t(qh), BQ);
    }
    acc_t* l2 = lse2(qh);
    acc_t* dl = delta(qh);
    if constexpr (!kBf16) {
      // delta_i = dO_i . O_i across VL rows at once, from dO^T and O^T: each lane keeps the
      // order of the fused scalar loop below, so the sums are the same bits
      acc_t* o_t = task_scratch<acc_t>(Dv * BQ);
      load_transposed(os, a.out.stride[2], a.out.stride[3], mq, Dv, o_t, BQ);
      const acc_t* dot = do_t(qh);
      for (int64_t r = 0; r < BQ; r += VL) {
        V d(acc_t(0));
        for (int64_t c = 0; c < Dv; ++c) d = at::vec::fmadd(V::loadu(dot + c * BQ + r), V::loadu(o_t + c * BQ + r), d);
        d.store(dl + r);
      }
    }
    for (int64_t r = 0; r < BQ; ++r) {
      if (r >= mq) {  // padding columns: P = exp2(-inf) = 0
        l2[r] = std::numeric_limits<acc_t>::infinity();
        dl[r] = acc_t(0);
        continue;
      }
      const acc_t lv = lse_in[bh * a.Nq + row0 + r];
      // a row that saw no key has lse = -inf; +inf makes all its P exactly 0
      l2[r] = lv == kNegInf<acc_t> ? std::numeric_limits<acc_t>::infinity() : lse_to_log2(lv);
      // fused, in the order of the dP product: where O_i = V_j (one visible key) delta_i
      // equals dP_ij exactly and dS is exactly 0
      acc_t d = dl[r];
      if constexpr (kBf16) {
        const scalar_t* dor = dos + r * a.grad_out.stride[2];
        d = 0;
        for (int64_t c = 0; c < Dv; ++c)
          d = std::fma(acc_t(to_acc(dor[c * a.grad_out.stride[3]])),
                       acc_t(to_acc(os[r * a.out.stride[2] + c * a.out.stride[3]])), d);
      }
      dl[r] = glse ? d - glse[bh * a.Nq + row0 + r] : d;
    }
  });

  // Key side, per (b, hkv): K rows padded to Dp (B operand of dQ), V rows (A operand).
  // bf16 tiles pack theirs per key tile in the main loop.
  const int64_t k_side = kBf16 || in_place ? 0 : a.Nk * (Dp + Dv);
  // bf16 tiles read K and V rows in place where they are whole pairs
  const bool kb_in_place = kBf16 && D == D2 && Dv == Dv2 && a.k.stride[3] == 1 && a.v.stride[3] == 1;
  Buffer<acc_t> kbuf(a.B * a.Hkv * k_side);
  Buffer<uint8_t> k_bad(kBf16 ? 0 : a.B * a.Hkv * a.Nk);
  if constexpr (!kBf16) parallel_tasks(nkt * a.Hkv, [&](int64_t t) {
    const TileRef& tile = segs.ktiles[t / a.Hkv];
    const Segment& sg = segs.seg[tile.seg];
    const int64_t h = t % a.Hkv, b = sg.b, bh = b * a.Hkv + h;
    const int64_t k0 = sg.span.k0 + tile.start, n = std::min(BK, sg.span.nk - tile.start);
    if (in_place) {
      flag_bad_rows(at4(a.k, b, h, k0), a.k.stride[2], n, D, k_bad.get() + bh * a.Nk + k0, n);
    } else {
      acc_t* base = kbuf.get() + bh * k_side;
      load_rows(at4(a.k, b, h, k0), a.k.stride[2], a.k.stride[3], n, D, base + k0 * Dp, Dp, n, acc_t(1),
                k_bad.get() + bh * a.Nk + k0);
      load_rows(at4(a.v, b, h, k0), a.v.stride[2], a.v.stride[3], n, Dv, base + a.Nk * Dp + k0 * Dv, Dv, n);
    }
  });

  // Key chunks: enough tasks to fill the machine when B * Hkv is small, bounded in the
  // memory their dQ partials take. Depends on shapes only (determinism).
  const int64_t bhk = a.B * a.Hkv;
  const int64_t part = a.B * a.Hq * a.Nq * Dp;
  int64_t chunks = std::clamp<int64_t>(ae_cdiv(8, bhk), 1, std::max<int64_t>(segs.max_row_ktiles, 1));
  while (chunks > 1 && chunks * part * int64_t(sizeof(acc_t)) > (int64_t(256) << 20)) --chunks;
  // one chunk in acc_t: dQ accumulates in the output itself (the same sums, no partials);
  // one chunk otherwise: each task owns its group's dQ rows, summed in a buffer of its
  // own (group * Nq rows, not B * Hq * Nq for the whole call)
  auto* dq = static_cast<scalar_t*>(a.dq);
  const bool dq_in_place = chunks == 1 && std::is_same_v<scalar_t, acc_t> && D == Dp;
  const bool dq_per_task = chunks == 1 && !dq_in_place;
  Buffer<acc_t> dq_part(dq_in_place || dq_per_task ? 0 : chunks * part);
  acc_t* dq_sum = dq_in_place ? reinterpret_cast<acc_t*>(dq) : dq_part.get();
  if (!dq_per_task) std::memset(dq_sum, 0, size_t(chunks * part) * sizeof(acc_t));
  // dQ rows [r0, r1) of (b, hq) = bh from their chunk partials, src[c * part + r * Dp]
  auto write_dq = [&](const acc_t* src, int64_t bh, int64_t r0, int64_t r1) {
    const acc_t sc = acc_t(a.scale);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t x = 0; x < D; ++x) {
        acc_t sum = 0;
        for (int64_t c = 0; c < chunks; ++c) sum += src[c * part + r * Dp + x];
        dq[(bh * a.Nq + r) * D + x] = from_acc<scalar_t>(sum * sc);
      }
  };

  auto* dk = static_cast<scalar_t*>(a.dk);
  auto* dv = static_cast<scalar_t*>(a.dv);
  const DropoutTile dropout(a.dropout, a.Hq);
  parallel_tasks(bhk * chunks, [&](int64_t t) {
    const int64_t c = t % chunks, bh = t / chunks, b = bh / a.Hkv, hk = bh % a.Hkv;
    // The task's key tiles are walked KB at a time for bf16 tiles, so that a query tile's
    // packs serve KB key tiles (packed per key tile they took a third of the products'
    // time). Every sum keeps its order: a key tile's dK and dV take the same terms in the
    // same order, and a dQ row takes the key tiles in ascending order.
    constexpr int64_t KB = kBf16 ? 4 : 1;
    // dropout: the multiplier tile (BK x BQ); bf16 tiles: then P^T and dS^T (BK x BQ) and dS (BQ x BK2), the
    // query tile's pairs (qb_size), KB key tiles' (kb_size each) and their NaN/inf flags, in bf16 and bytes
    const int64_t keep_size = a.dropout.on() ? BK * BQ : 0;
    const int64_t qb_size = BQ * (D2 + Dv2 + Dp + Dvp), kb_size = BK2 * Dp + (kb_in_place ? 0 : BK * (D2 + Dv2));
    const int64_t bf16_size = 2 * BK * BQ + BQ * BK2 + qb_size + KB * kb_size + ae_cdiv(2 * BQ + KB * BK2, 2);
    const int64_t need = 2 * BK * BQ + BK * (Dp + Dvp) + keep_size + (kBf16 ? ae_cdiv(bf16_size, 2) : 0);
    acc_t* st = task_scratch<acc_t>(need);
    acc_t* dpt = st + BK * BQ;
    acc_t* dkv_sum = dpt + BK * BQ;
    acc_t* keep = dkv_sum + BK * (Dp + Dvp);  // dropout multipliers, transposed like st
    [[maybe_unused]] auto* ptb = reinterpret_cast<bf16_t*>(keep + keep_size);
    [[maybe_unused]] bf16_t* dstb = ptb + BK * BQ;
    [[maybe_unused]] bf16_t* dsb = dstb + BK * BQ;
    // the query tile's Q^T, dO^T (pairs along D, Dv) and Q, dO (pairs along queries)
    [[maybe_unused]] bf16_t* q_tb = dsb + BQ * BK2;
    [[maybe_unused]] bf16_t* do_tb = q_tb + BQ * D2;
    [[maybe_unused]] bf16_t* q_pb = do_tb + BQ * Dv2;
    [[maybe_unused]] bf16_t* do_pb = q_pb + BQ * Dp;
    // per key tile of a block (kb_size apart): K pairs along keys (B of dQ), then K and V
    // rows unless read in place
    [[maybe_unused]] bf16_t* k_pairs = do_pb + BQ * Dvp;
    [[maybe_unused]] auto* qb_bad = reinterpret_cast<uint8_t*>(k_pairs + KB * kb_size);
    [[maybe_unused]] uint8_t* dob_bad = qb_bad + BQ;
    [[maybe_unused]] uint8_t* kb_bad = dob_bad + BQ;  // BK2 apart
    Buffer<acc_t> task_dq(dq_per_task ? group * a.Nq * Dp : 0);
    if (dq_per_task) task_dq.zero(group * a.Nq * Dp);
    // partials per key tile of a block: nk rows of dK (Dp wide), then nk rows of dV (Dvp wide)
    std::vector<PairwiseSum<acc_t>> dkvs;
    dkvs.reserve(KB);
    for (int64_t s = 0; s < KB; ++s) dkvs.emplace_back(BK * (Dp + Dvp), group * segs.max_seg_qtiles);
    struct KeyTile {
      const Segment* sg = nullptr;
      int64_t k0 = 0, nk = 0, used = 0, gq_begin = 0, gq_end = 0;  // its query tiles: segs.qtiles[gq_begin, gq_end)
      const bf16_t* kb_rows = nullptr;  // bf16 tiles: K and V rows (ldkb, ldvb apart), K pairs, NaN/inf keys
      const bf16_t* vb_rows = nullptr;
      const bf16_t* k_pairs = nullptr;
      const uint8_t* kb_bad = nullptr;
    };
    KeyTile kts[KB];
    [[maybe_unused]] const int64_t ldkb = kb_in_place ? a.k.stride[2] : D2, ldvb = kb_in_place ? a.v.stride[2] : Dv2;

    const int64_t kt_end = segs.row_kt[b + 1];
    for (int64_t kt_first = segs.row_kt[b] + c; kt_first < kt_end; kt_first += KB * chunks) {
      const int64_t nkb = std::min(KB, ae_cdiv(kt_end - kt_first, chunks));
      int64_t gq_lo = std::numeric_limits<int64_t>::max(), gq_hi = 0;
      for (int64_t s = 0; s < nkb; ++s) {
        KeyTile& kt = kts[s];
        const TileRef& tile = segs.ktiles[kt_first + s * chunks];
        kt.sg = &segs.seg[tile.seg];
        const Segment& sg = *kt.sg;
        kt.k0 = tile.start;
        kt.nk = std::min(BK, sg.mask.nk - kt.k0);
        kt.used = kt.nk * (Dp + Dvp);
        if constexpr (kBf16) {
#if defined(AE_BF16_TILES)
          const scalar_t* ks = at4(a.k, b, hk, sg.span.k0 + kt.k0);
          const scalar_t* vs = at4(a.v, b, hk, sg.span.k0 + kt.k0);
          bf16_t* pairs = k_pairs + s * kb_size;
          bf16_t* rows = pairs + BK2 * Dp;
          uint8_t* flags = kb_bad + s * BK2;
          if (kb_in_place) {
            kt.kb_rows = reinterpret_cast<const bf16_t*>(ks);
            kt.vb_rows = reinterpret_cast<const bf16_t*>(vs);
          } else {
            copy_rows_bf16(ks, a.k.stride[2], a.k.stride[3], kt.nk, D, rows, D2, kt.nk);
            copy_rows_bf16(vs, a.v.stride[2], a.v.stride[3], kt.nk, Dv, rows + BK * D2, Dv2, kt.nk);
            kt.kb_rows = rows;
            kt.vb_rows = rows + BK * D2;
          }
          pack_vnni(ks, a.k.stride[2], a.k.stride[3], kt.nk, D, pairs, Dp, BK2, flags);
          kt.k_pairs = pairs;
          kt.kb_bad = flags;
#endif
        }
        dkvs[s].reset();
        int64_t qt_begin, qt_end;
        query_tile_range(sg.mask, kt.k0, kt.k0 + kt.nk, BQ, &qt_begin, &qt_end);
        kt.gq_begin = sg.qt0 + qt_begin;
        kt.gq_end = sg.qt0 + qt_end;
        if (qt_begin < qt_end) gq_lo = std::min(gq_lo, kt.gq_begin), gq_hi = std::max(gq_hi, kt.gq_end);
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t bhq = b * a.Hq + h;
        const acc_t slope2 = alibi_slope<acc_t>(a.mods, b, h) * acc_t(kLog2e);  // the forward's ALiBi, 0 = off
        AlibiRamp<acc_t> alibi(slope2, 1);
        for (int64_t gqt = gq_lo; gqt < gq_hi; ++gqt) {
          [[maybe_unused]] bool packed = false;  // bf16 tiles: this query tile's pairs, packed for its first key tile
          for (int64_t s = 0; s < nkb; ++s) {
            const KeyTile& kt = kts[s];
            if (gqt < kt.gq_begin || gqt >= kt.gq_end) continue;
            const Segment& sg = *kt.sg;
            const MaskSpec& mask = sg.mask;
            const int64_t k0 = kt.k0, nk = kt.nk, used = kt.used, qt = gqt - sg.qt0;
            PairwiseSum<acc_t>& dkv = dkvs[s];
            // the document's K and V rows (ldk, ldv apart); k0 counts from the document's start
            const acc_t* k_rows = in_place ? reinterpret_cast<const acc_t*>(at4(a.k, b, hk, sg.span.k0))
                                           : kbuf.get() + bh * k_side + sg.span.k0 * Dp;
            const acc_t* v_rows = in_place ? reinterpret_cast<const acc_t*>(at4(a.v, b, hk, sg.span.k0))
                                           : kbuf.get() + bh * k_side + a.Nk * Dp + sg.span.k0 * Dv;
            const int64_t ldk = in_place ? a.k.stride[2] : Dp, ldv = in_place ? a.v.stride[2] : Dv;
            const uint8_t* k_bad_doc = k_bad.get() + (kBf16 ? 0 : bh * a.Nk + sg.span.k0);
            [[maybe_unused]] const bf16_t* kb_rows = kt.kb_rows;
            [[maybe_unused]] const bf16_t* vb_rows = kt.vb_rows;
            [[maybe_unused]] const bf16_t* k_pairs = kt.k_pairs;
            [[maybe_unused]] const uint8_t* kb_bad = kt.kb_bad;
            acc_t* dq_acc = dq_per_task ? task_dq.get() + ((h - hk * group) * a.Nq + sg.span.q0) * Dp
                                        : dq_sum + c * part + (bhq * a.Nq + sg.span.q0) * Dp;
            const int64_t q0 = qt * BQ, mq = std::min(BQ, mask.nq - q0), qh = (sg.qt0 + qt) * a.Hq + h;
            // this tile's Q and dO rows, ldq and ldo apart
            const acc_t* q_r = in_place ? reinterpret_cast<const acc_t*>(at4(a.q, b, h, sg.span.q0 + q0)) : q_rows(qh);
            const acc_t* do_r =
                in_place ? reinterpret_cast<const acc_t*>(at4(a.grad_out, b, h, sg.span.q0 + q0)) : do_rows(qh);
            const int64_t ldq = in_place ? a.q.stride[2] : Dp, ldo = in_place ? a.grad_out.stride[2] : Dvp;
            const int cls = na.on() ? na.classify(q0, k0) : classify(mask, b, h, q0, q0 + mq, k0, k0 + nk);
            if (cls == kEmpty) continue;
            // queries [i0, i1) x keys [j0, j1) of the tile hold everything allowed
            int64_t i0 = 0, i1 = mq, j0 = 0, j1 = nk;
            if (cls == kPartial && (na.on() ? na.trim(q0, k0, &i0, &i1, &j0, &j1)
                                             : trim_tile(mask, q0, mq, k0, nk, &i0, &i1, &j0, &j1))) {
              if (i0 >= i1) continue;
              i0 -= i0 % VL;  // queries are the columns of the transposed products
              if constexpr (kBf16) j0 -= j0 % 2;  // keys pair up in the bf16 dQ product
            }
            const int64_t ni = i1 - i0, nj = j1 - j0, ni_vec = round_up(ni, VL);
            acc_t* st0 = st + j0 * BQ + i0;
            acc_t* dpt0 = dpt + j0 * BQ + i0;
            if constexpr (kBf16) {
#if defined(AE_BF16_TILES)
              const scalar_t* qs = at4(a.q, b, h, sg.span.q0 + q0);
              const scalar_t* dos = at4(a.grad_out, b, h, sg.span.q0 + q0);
              if (!packed) {
                pack_vnni(qs, a.q.stride[3], a.q.stride[2], D, mq, q_tb, BQ, D2);
                pack_vnni(dos, a.grad_out.stride[3], a.grad_out.stride[2], Dv, mq, do_tb, BQ, Dv2);
                pack_vnni(qs, a.q.stride[2], a.q.stride[3], mq, D, q_pb, Dp, BQ, qb_bad);
                pack_vnni(dos, a.grad_out.stride[2], a.grad_out.stride[3], mq, Dv, do_pb, Dvp, BQ, dob_bad);
                packed = true;
              }
              gemm_bf16(nj, ni_vec, D, kb_rows + j0 * ldkb, ldkb, q_tb + 2 * i0, 2 * BQ, st0, BQ, false,
                        float(qmult));
              gemm_bf16(nj, ni_vec, Dv, vb_rows + j0 * ldvb, ldvb, do_tb + 2 * i0, 2 * BQ, dpt0, BQ, false);
#endif
            } else {
              gemm<acc_t>(nj, ni_vec, D, k_rows + (k0 + j0) * ldk, ldk, 1, q_t(qh) + i0, BQ, st0, BQ, false);
              gemm<acc_t>(nj, ni_vec, Dv, v_rows + (k0 + j0) * ldv, ldv, 1, do_t(qh) + i0, BQ, dpt0, BQ, false);
            }
            const acc_t* l2 = lse2(qh) + i0;
            const acc_t* dl = delta(qh) + i0;
            // dropout: the output saw P o Z, so dP enters as dP o Z and dV takes P o Z
            if (a.dropout.on()) {
              dropout.fill_transposed(b, h, sg.span.q0 + q0 + i0, ni_vec, sg.span.k0 + k0 + j0, nj, keep, BQ);
              multiply_tile(dpt0, BQ, keep, BQ, nj, ni_vec);
            }
            if (softcap) {
              // P = exp2(cap2 * t + alibi - lse2) with t = tanh(s2 / cap2) as in softcap_row;
              // the cap's derivative 1 - t^2 enters dS
              for (int64_t r = 0; r < nj; ++r) {
                acc_t* pr = st0 + r * BQ;
                acc_t* dr = dpt0 + r * BQ;
                alibi.start(q0 + i0 + mask.offset - (k0 + j0 + r));  // p - j of column 0
                for (int64_t i = 0; i < ni_vec; i += VL) {
                  const V t = tanh_fast(V::loadu(pr + i) * V(inv_cap2));
                  V z = V(cap2) * t;
                  if (slope2 != acc_t(0)) z = alibi.add(z);
                  const V p = exp2_poly(z - V::loadu(l2 + i));
                  p.store(pr + i);
                  (p * (V::loadu(dr + i) - V::loadu(dl + i)) * at::vec::fnmadd(t, t, V(acc_t(1)))).store(dr + i);
                }
              }
            } else {
              for (int64_t r = 0; r < nj; ++r) {
                acc_t* pr = st0 + r * BQ;
                acc_t* dr = dpt0 + r * BQ;
                alibi.start(q0 + i0 + mask.offset - (k0 + j0 + r));
                for (int64_t i = 0; i < ni_vec; i += VL) {
                  V z = V::loadu(pr + i);
                  if (slope2 != acc_t(0)) z = alibi.add(z);
                  const V p = exp2_poly(z - V::loadu(l2 + i));
                  p.store(pr + i);
                  (p * (V::loadu(dr + i) - V::loadu(dl + i))).store(dr + i);
                }
              }
            }
            if (a.dropout.on()) multiply_tile(st0, BQ, keep, BQ, nj, ni_vec);
            if (cls == kPartial) {
              mask_tile_t(mask, na, b, h, q0 + i0, ni, k0, k0 + j0, nj, st0, BQ);
              mask_tile_t(mask, na, b, h, q0 + i0, ni, k0, k0 + j0, nj, dpt0, BQ);
            }
            // dpt now holds dS^T; only columns [i0, i1) and rows [j0, j1) enter the products
            acc_t* dk_part = dkv.leaf(used);
            acc_t* dv_part = dk_part + nk * Dp;
            if constexpr (kBf16) {
#if defined(AE_BF16_TILES)
              const int64_t qrow = sg.span.q0 + q0 + i0;  // the tile's first query in the tensors
              bf16_products(nj, ni, st0, dpt0, BQ, ptb + j0 * BQ + i0, dstb + j0 * BQ + i0, dsb + i0 * BK2 + j0, BK2);
              gemm_bf16(nj, Dvp, ni, ptb + j0 * BQ + i0, BQ, do_pb + i0 * Dvp, 2 * Dvp, dv_part + j0 * Dvp, Dvp,
                        true);
              add_bad_rows(nj, ni, ptb + j0 * BQ + i0, BQ, 1, dob_bad + i0,
                           [&](int64_t i, float p, float* row) {
                             add_row(p, at4(a.grad_out, b, h, qrow + i), a.grad_out.stride[3], Dv, row);
                           }, dv_part + j0 * Dvp, Dvp);
              gemm_bf16(nj, Dp, ni, dstb + j0 * BQ + i0, BQ, q_pb + i0 * Dp, 2 * Dp, dk_part + j0 * Dp, Dp, true);
              add_bad_rows(nj, ni, dstb + j0 * BQ + i0, BQ, 1, qb_bad + i0,
                           [&](int64_t i, float ds, float* row) {
                             add_row(ds, at4(a.q, b, h, qrow + i), a.q.stride[3], D, row);
                           }, dk_part + j0 * Dp, Dp);
              dkv.added(used);
              gemm_bf16(ni, Dp, nj, dsb + i0 * BK2 + j0, BK2, k_pairs + j0 * Dp, 2 * Dp, dq_acc + (q0 + i0) * Dp, Dp,
                        true);
              add_bad_rows(ni, nj, dsb + i0 * BK2 + j0, BK2, 1, kb_bad + j0,
                           [&](int64_t j, float ds, float* row) {
                             add_row(ds, at4(a.k, b, hk, sg.span.k0 + k0 + j0 + j), a.k.stride[3], D, row);
                           }, dq_acc + (q0 + i0) * Dp, Dp);
#endif
            } else {
              gemm_guarded<acc_t>(nj, Dvp, ni, st0, BQ, 1, do_r + i0 * ldo, ldo, dv_part + j0 * Dvp, Dvp, true,
                                  do_bad.get() + qh * BQ + i0);
              gemm_guarded<acc_t>(nj, Dp, ni, dpt0, BQ, 1, q_r + i0 * ldq, ldq, dk_part + j0 * Dp, Dp, true,
                                  q_bad.get() + qh * BQ + i0);
              dkv.added(used);
              gemm_guarded<acc_t>(ni, Dp, nj, dpt0, 1, BQ, k_rows + (k0 + j0) * ldk, ldk, dq_acc + (q0 + i0) * Dp, Dp,
                                  true, k_bad_doc + k0 + j0);
            }
          }
        }
      }
      for (int64_t s = 0; s < nkb; ++s) {
        const Segment& sg = *kts[s].sg;
        const int64_t k0 = kts[s].k0, nk = kts[s].nk;
        dkvs[s].total(dkv_sum, kts[s].used);
        const acc_t* dk_acc = dkv_sum;
        const acc_t* dv_acc = dkv_sum + nk * Dp;
        scalar_t* dk_out = dk + (bh * a.Nk + sg.span.k0 + k0) * D;
        scalar_t* dv_out = dv + (bh * a.Nk + sg.span.k0 + k0) * Dv;
        const acc_t sc = acc_t(a.scale);
        for (int64_t r = 0; r < nk; ++r) {
          for (int64_t x = 0; x < D; ++x) dk_out[r * D + x] = from_acc<scalar_t>(dk_acc[r * Dp + x] * sc);
          for (int64_t x = 0; x < Dv; ++x) dv_out[r * Dv + x] = from_acc<scalar_t>(dv_acc[r * Dvp + x]);
        }
      }
    }
    if (dq_in_place) {  // one chunk: this task alone summed the dQ rows of its heads, in the output
      acc_t* rows = dq_sum + b * a.Hq * a.Nq * D + hk * group * a.Nq * D;
      const V sc(acc_t(a.scale));
      for (int64_t i = 0; i < group * a.Nq * D; i += VL) (V::loadu(rows + i) * sc).store(rows + i);
    }
    if (dq_per_task)
      for (int64_t g = 0; g < group; ++g) write_dq(task_dq.get() + g * a.Nq * Dp, b * a.Hq + hk * group + g, 0, a.Nq);
  });

  if (dq_in_place) return;  // each task scaled its own dQ rows
  const int64_t rows_per_task = 64;
  const int64_t q_tasks = (a.Nq + rows_per_task - 1) / rows_per_task;
  if (!dq_per_task) parallel_tasks(a.B * a.Hq * q_tasks, [&](int64_t t) {
    const int64_t bh = t / q_tasks, r0 = (t % q_tasks) * rows_per_task;
    write_dq(dq_sum + bh * a.Nq * Dp, bh, r0, std::min(a.Nq, r0 + rows_per_task));
  });
}

}  // namespace

void attention_bwd(const AttentionBwdArgs& a) {
  switch (a.dtype) {
    case DType::Float32: return bwd_impl<float, float>(a);
    case DType::Float64: return bwd_impl<double, double>(a);
    case DType::BFloat16: return bwd_impl<c10::BFloat16, float>(a);
    case DType::Float16: return bwd_impl<c10::Half, float>(a);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
