// Linear attention backward on CPU (linear_bwd), reverse-chunked.
//
// Saved from the forward: q, k, v and out only. The chunk states S_c, z_c are
// recomputed here (a forward scan of the chunk deltas), never saved: the forward keeps
// no O(N D Dv / C) buffer alive between the passes. With g_i = dout_i / den_i and
// dd_i = -(g_i . out_i) (normalize; otherwise g = dout, dd = 0), and G_c, gz_c the
// gradient of the state after chunk c (the final state's gradient plus everything later
// queries contributed, a reverse scan):
//   dA   = (g v^T + dd 1^T) masked to j <= i
//   dfq  = g S_c^T + dd z_c^T + dA fk                                   -> dq
//   dfk  = dA^T fq + v G_c^T + 1 gz_c^T,   dv = A^T g + fk G_c           -> dk, dv
//   G_{c-1} = G_c + sum_heads fq^T g,   gz_{c-1} = gz_c + sum_heads fq^T dd
// and the initial state's gradient is G before chunk 0. GQA: dk, dv and G sum over the
// query heads of the kv head; nothing is repeated.
//
// Segments (batch rows, or cu_seqlens documents) and parallelism as in linear_fwd.cpp: one
// task per (segment, kv head) walking the chunks
// (forward scan, then backwards), or chunk tasks in five passes (deltas, scan, gradient
// deltas, reverse scan, gradients) when batch x kv heads cannot fill the machine. Same
// operations in the same order either way: bitwise identical for any thread count.
#include "linear_common.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using namespace linear;

template <typename scalar_t, typename acc_t>
struct BwdKernel : ChunkKernel<scalar_t, acc_t, LinearBwdArgs> {
  using Base = ChunkKernel<scalar_t, acc_t, LinearBwdArgs>;
  using typename Base::KV;
  using Base::a, Base::d, Base::scale, Base::eps, Base::kBf16;
  using Base::load_kv, Base::load_queries, Base::load_state, Base::store_state;
  using Base::Base;

  int64_t kv_size() const { return Base::kv_size(true); }
  KV kv_at(acc_t* p) const { return Base::kv_at(p, true); }
  acc_t* kv_end(const KV& kv) const { return kv.vT + d.Dv * d.Cp; }

  int64_t query_scratch() const { return 3 * d.C * d.Dp + d.C * d.Dvp + 2 * d.C * d.Cp + 2 * d.C + d.Dvp; }

  // Query chunk qc of segment sg, head h. st: state before the chunk (causal) or final state;
  // stT: S of st transposed [Dv][Dp] (full only; bf16 tiles: in ops.ST_pairs instead).
  // Accumulates fq^T g, fq^T dd into gdelta (when not null); full: writes dq and (causal)
  // accumulates the intra-chunk dfk [C][Dp] and dv [C][Dvp].
  void query_chunk(const Segment& sg, int64_t h, int64_t qc, const acc_t* st, const acc_t* stT, const KV& kv,
                   const Bf16Ops& ops, acc_t* gdelta, acc_t* dfk, acc_t* dvacc, bool full, acc_t* scratch) const {
    const int64_t b = sg.b, q0 = this->q_begin(sg, qc);
    acc_t* fq = scratch;
    acc_t* g = fq + d.C * d.Dp;
    acc_t* A = g + d.C * d.Dvp;
    acc_t* dA = A + d.C * d.Cp;
    acc_t* dfq = dA + d.C * d.Cp;
    acc_t* rowsum = dfq + d.C * d.Dp;
    acc_t* dd = rowsum + d.C;
    acc_t* dphi = dd + d.C;
    acc_t* orow = dphi + d.C * d.Dp;  // one row of out in acc_t
    const int64_t m = load_queries(sg, h, qc, fq, full ? dphi : nullptr);
    load_rows(row_ptr<scalar_t>(a.grad_out, b, h, q0), a.grad_out.stride[2], a.grad_out.stride[3], m, d.Dv, g, d.Dvp,
              m);
    const bool need_A = a.causal && (a.normalize || full);
    if constexpr (kBf16) round_rows(fq, d.Dp, m, d.Dp, ops.fq, d.Dp, m);
    if (need_A) {
      if constexpr (kBf16)
        gemm_lower_cols(m, m, d.D, ops.fq, d.Dp, ops.fkT_pairs, 2 * d.Cp, A, d.Cp);
      else
        gemm_lower_cols(m, m, d.D, fq, d.Dp, kv.fkT, d.Cp, A, d.Cp);
      mask_lower<acc_t>(m, A, d.Cp, a.normalize ? rowsum : nullptr);
    }
    const acc_t* z = st + d.D * d.Dvp;
    if (a.normalize) {
      const scalar_t* op = row_ptr<scalar_t>(a.out, b, h, q0);
      for (int64_t r = 0; r < m; ++r) {
        acc_t den = dot(fq + r * d.Dp, z, d.Dp);
        if (a.causal) den += rowsum[r];
        den += eps;
        const Vec<acc_t> inv(acc_t(1) / den);
        acc_t* gr = g + r * d.Dvp;
        for (int64_t c = 0; c < d.Dvp; c += Vec<acc_t>::size()) (Vec<acc_t>::loadu(gr + c) * inv).store(gr + c);
        load_rows(op + r * a.out.stride[2], 0, a.out.stride[3], 1, d.Dv, orow, d.Dvp, 1);
        dd[r] = -dot(gr, orow, d.Dvp);
      }
    }
    if constexpr (kBf16) {
      round_rows(g, d.Dvp, m, d.Dvp, ops.g, d.Dvp, m);
      pack_pairs(g, d.Dvp, m, d.Dvp, ops.g_pairs, round_up(m, 2));
    }
    if (gdelta) {
      if constexpr (kBf16) {
        transpose_round(fq, d.Dp, m, d.D, ops.fqT, d.Cp);
        tile_gemm(d.D, d.Dvp, m, ops.fqT, d.Cp, ops.g_pairs, 2 * d.Dvp, gdelta, d.Dvp, true);
      } else {
        gemm<acc_t>(d.D, d.Dvp, m, fq, 1, d.Dp, g, d.Dvp, gdelta, d.Dvp, true);
      }
      if (a.normalize) {
        acc_t* gz = gdelta + d.D * d.Dvp;
        for (int64_t r = 0; r < m; ++r) axpy(dd[r], fq + r * d.Dp, d.Dp, gz);
      }
    }
    if (!full) return;
    if constexpr (kBf16)
      tile_gemm(m, d.Dp, d.Dv, ops.g, d.Dvp, ops.ST_pairs, 2 * d.Dp, dfq, d.Dp, false);
    else
      gemm<acc_t>(m, d.Dp, d.Dv, g, d.Dvp, 1, stT, d.Dp, dfq, d.Dp, false);
    if (a.normalize)
      for (int64_t r = 0; r < m; ++r) axpy(dd[r], z, d.Dp, dfq + r * d.Dp);
    if (a.causal) {
      if constexpr (kBf16)
        gemm_lower_cols(m, m, d.Dv, ops.g, d.Dvp, ops.vT_pairs, 2 * d.Cp, dA, d.Cp);
      else
        gemm_lower_cols(m, m, d.Dv, g, d.Dvp, kv.vT, d.Cp, dA, d.Cp);
      if (a.normalize)
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = 0; j <= r; ++j) dA[r * d.Cp + j] += dd[r];
      mask_lower<acc_t>(m, dA, d.Cp, nullptr);
      if constexpr (kBf16) {
        // dA and A rounded like P and dS in FlashAttention; the transposed products read
        // their transposes as rows
        round_rows(dA, d.Cp, m, d.Cp, ops.dA, d.Cp, m);
        gemm_lower_a(m, d.Dp, ops.dA, d.Cp, ops.fk_pairs, 2 * d.Dp, dfq, d.Dp, true);
        transpose_round(dA, d.Cp, m, m, ops.dAT, d.Cp);
        pack_pairs(fq, d.Dp, m, d.Dp, ops.fq_pairs, round_up(m, 2));
        gemm_upper_a(m, d.Dp, ops.dAT, d.Cp, ops.fq_pairs, 2 * d.Dp, dfk, d.Dp);
        transpose_round(A, d.Cp, m, m, ops.AT, d.Cp);
        gemm_upper_a(m, d.Dvp, ops.AT, d.Cp, ops.g_pairs, 2 * d.Dvp, dvacc, d.Dvp);
      } else {
        gemm_lower_a(m, d.Dp, dA, d.Cp, kv.fk, d.Dp, dfq, d.Dp, true);
        gemm_lower_t<acc_t>(m, d.Dp, dA, d.Cp, fq, d.Dp, dfk, d.Dp, true);
        gemm_lower_t<acc_t>(m, d.Dvp, A, d.Cp, g, d.Dvp, dvacc, d.Dvp, true);
      }
    }
    scalar_t* dq = static_cast<scalar_t*>(a.dq) + ((b * d.Hq + h) * d.Nq + q0) * d.D;
    const Vec<acc_t> vs(scale);
    for (int64_t r = 0; r < m; ++r) {
      acc_t* row = dfq + r * d.Dp;
      for (int64_t x = 0; x < d.Dp; x += Vec<acc_t>::size())
        (Vec<acc_t>::loadu(row + x) * vs * Vec<acc_t>::loadu(dphi + r * d.Dp + x)).store(row + x);
      store_row(row, d.D, dq + r * d.D);
    }
  }

  // dk, dv of key chunk kc of segment sg: dfk / dvacc hold the intra-chunk part (zero if none); G is the
  // gradient of the state after the chunk, GT its S part transposed [Dv][Dp] (bf16 tiles:
  // both in VNNI pairs in ops).
  void key_finish(const Segment& sg, int64_t hk, int64_t kc, const KV& kv, const acc_t* G, const acc_t* GT,
                  const Bf16Ops& ops, acc_t* dfk, acc_t* dvacc) const {
    const int64_t b = sg.b, k0 = this->k_begin(sg, kc), n = this->k_len(sg, kc);
    if constexpr (kBf16) {
      pack_pairs(GT, d.Dp, d.Dv, d.Dp, ops.GT_pairs, round_up(d.Dv, 2));
      pack_pairs(G, d.Dvp, d.D, d.Dvp, ops.G_pairs, round_up(d.D, 2));
      tile_gemm(n, d.Dp, d.Dv, ops.v, d.Dvp, ops.GT_pairs, 2 * d.Dp, dfk, d.Dp, true);
      tile_gemm(n, d.Dvp, d.D, ops.fk, d.Dp, ops.G_pairs, 2 * d.Dvp, dvacc, d.Dvp, true);
    } else {
      gemm<acc_t>(n, d.Dp, d.Dv, kv.v, d.Dvp, 1, GT, d.Dp, dfk, d.Dp, true);
      gemm<acc_t>(n, d.Dvp, d.D, kv.fk, d.Dp, 1, G, d.Dvp, dvacc, d.Dvp, true);
    }
    const acc_t* gz = G + d.D * d.Dvp;
    scalar_t* dk = static_cast<scalar_t*>(a.dk) + ((b * d.Hkv + hk) * d.Nk + k0) * d.D;
    scalar_t* dv = static_cast<scalar_t*>(a.dv) + ((b * d.Hkv + hk) * d.Nk + k0) * d.Dv;
    for (int64_t r = 0; r < n; ++r) {
      acc_t* row = dfk + r * d.Dp;
      for (int64_t x = 0; x < d.Dp; x += Vec<acc_t>::size())
        ((Vec<acc_t>::loadu(row + x) + Vec<acc_t>::loadu(gz + x)) * Vec<acc_t>::loadu(kv.dphi + r * d.Dp + x))
            .store(row + x);
      store_row(row, d.D, dk + r * d.D);
      store_row(dvacc + r * d.Dvp, d.Dv, dv + r * d.Dv);
    }
  }

  void store_grad_state(int64_t bh, const acc_t* G) const { store_state(a.dS0, a.dz0, bh, G); }
  void transpose_state(const acc_t* st, acc_t* stT) const { transpose_block(st, d.Dvp, d.D, d.Dv, stT, d.Dp); }
  // S^T of the state before a query chunk, for dfq = g S^T (bf16 tiles: in VNNI pairs)
  void state_operand(const acc_t* st, acc_t* stT, const Bf16Ops& ops) const {
    transpose_state(st, stT);
    if constexpr (kBf16) pack_pairs(stT, d.Dp, d.Dv, d.Dp, ops.ST_pairs, round_up(d.Dv, 2));
  }

  // ---- one task per state row (segment, kv head) -------------------------------------
  void run_per_head() const {
    parallel_tasks(this->state_rows(), [&](int64_t bh) {
      const Segment& sg = this->seg_of_row(bh);
      const int64_t hk = bh % d.Hkv;
      const int64_t TT = d.Dv * d.Dp;
      acc_t* st = task_scratch<acc_t>(3 * d.state + 2 * TT + kv_size() + d.C * (d.Dp + d.Dvp) + query_scratch());
      acc_t* G = st + d.state;
      acc_t* gdelta = G + d.state;
      acc_t* stT = gdelta + d.state;
      acc_t* GT = stT + TT;
      const KV kv = kv_at(GT + TT);
      acc_t* dfk = kv_end(kv);
      acc_t* dvacc = dfk + d.C * d.Dp;
      acc_t* scratch = dvacc + d.C * d.Dvp;
      const Bf16Ops ops = this->bf16_ops();
      // forward scan; causal keeps the state before every chunk
      Buffer<acc_t> before(a.causal ? std::max<int64_t>(sg.nck, 1) * d.state : 1);
      load_state(a.S0, a.z0, bh, st);
      for (int64_t kc = 0; kc < sg.nck; ++kc) {
        const int64_t n = load_kv(sg, hk, kc, kv, false, false, ops);
        if (a.causal) std::copy(st, st + d.state, before.get() + kc * d.state);
        chunk_state(d, n, kv.fk, kv.v, gdelta);
        state_add(st, gdelta, d.state);
      }
      load_state(a.grad_S, a.grad_z, bh, G);
      if (a.causal) {
        for (int64_t kc = sg.nck - 1; kc >= 0; --kc) {
          const acc_t* sb = before.get() + kc * d.state;
          load_kv(sg, hk, kc, kv, true, true, ops);
          state_operand(sb, stT, ops);
          transpose_state(G, GT);
          std::fill(gdelta, gdelta + d.state, acc_t(0));
          std::fill(dfk, dfk + d.C * (d.Dp + d.Dvp), acc_t(0));
          for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
            query_chunk(sg, h, kc, sb, stT, kv, ops, gdelta, dfk, dvacc, true, scratch);
          key_finish(sg, hk, kc, kv, G, GT, ops, dfk, dvacc);
          state_add(G, gdelta, d.state);
        }
      } else {
        state_operand(st, stT, ops);
        for (int64_t qc = 0; qc < sg.ncq; ++qc) {
          std::fill(gdelta, gdelta + d.state, acc_t(0));
          for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
            query_chunk(sg, h, qc, st, stT, kv, ops, gdelta, nullptr, nullptr, true, scratch);
          state_add(G, gdelta, d.state);
        }
        transpose_state(G, GT);
        for (int64_t kc = 0; kc < sg.nck; ++kc) {
          load_kv(sg, hk, kc, kv, false, true, ops);
          std::fill(dfk, dfk + d.C * (d.Dp + d.Dvp), acc_t(0));
          key_finish(sg, hk, kc, kv, G, GT, ops, dfk, dvacc);
        }
      }
      store_grad_state(bh, G);
    });
  }

  // ---- chunk tasks ------------------------------------------------------------------
  void run_chunked() const {
    const int64_t rows = this->state_rows();
    const int64_t TT = d.Dv * d.Dp;
    // 1. chunk deltas; 2. scan: states[cell of (row, kc)] = state before kc (causal), finals = last
    const ChunkIndex kcells = this->key_cells();
    Buffer<acc_t> states(std::max<int64_t>(kcells.total(), 1) * d.state);
    Buffer<acc_t> finals(rows * d.state);
    parallel_tasks(kcells.total(), [&](int64_t t) {
      const auto [bh, kc] = kcells.locate(t);
      const KV kv = kv_at(task_scratch<acc_t>(kv_size()));
      const Bf16Ops ops = this->bf16_ops();
      const int64_t n = load_kv(this->seg_of_row(bh), bh % d.Hkv, kc, kv, false, false, ops);
      chunk_state(d, n, kv.fk, kv.v, states.get() + t * d.state);
    });
    parallel_tasks(rows, [&](int64_t bh) { load_state(a.S0, a.z0, bh, finals.get() + bh * d.state); });
    scan_chunks(kcells, d.state, states.get(), finals.get(), /*exclusive=*/a.causal, /*reverse=*/false);
    // 3. gradient deltas per query chunk (non-causal: with dq as well). Causal has Nq == Nk,
    //    so qcells == kcells: cell t is chunk t of both.
    const ChunkIndex qcells = this->query_cells();
    Buffer<acc_t> gstates(std::max<int64_t>(qcells.total(), 1) * d.state);
    parallel_tasks(qcells.total(), [&](int64_t t) {
      const auto [bh, qc] = qcells.locate(t);
      const Segment& sg = this->seg_of_row(bh);
      const int64_t hk = bh % d.Hkv;
      acc_t* stT = task_scratch<acc_t>(TT + kv_size() + query_scratch());
      const KV kv = kv_at(stT + TT);
      acc_t* scratch = kv_end(kv);
      const Bf16Ops ops = this->bf16_ops();
      acc_t* gdelta = gstates.get() + t * d.state;
      std::fill(gdelta, gdelta + d.state, acc_t(0));
      const acc_t* st;
      if (a.causal) {
        load_kv(sg, hk, qc, kv, true, false, ops);
        st = states.get() + t * d.state;
      } else {
        st = finals.get() + bh * d.state;
        state_operand(st, stT, ops);
      }
      for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
        query_chunk(sg, h, qc, st, stT, kv, ops, gdelta, nullptr, nullptr, !a.causal, scratch);
    });
    // 4. scan of the gradient deltas: causal backwards and exclusive (gstates[cell of c] =
    //    gradient of the state after chunk c), non-causal a plain sum in chunk order
    Buffer<acc_t> gfinal(rows * d.state);
    parallel_tasks(rows, [&](int64_t bh) { load_state(a.grad_S, a.grad_z, bh, gfinal.get() + bh * d.state); });
    scan_chunks(qcells, d.state, gstates.get(), gfinal.get(), /*exclusive=*/a.causal, /*reverse=*/a.causal);
    // 5. gradients per key chunk (causal: with dq and the intra-chunk terms)
    parallel_tasks(kcells.total(), [&](int64_t t) {
      const auto [bh, kc] = kcells.locate(t);
      const Segment& sg = this->seg_of_row(bh);
      const int64_t hk = bh % d.Hkv;
      acc_t* stT = task_scratch<acc_t>(2 * TT + kv_size() + d.C * (d.Dp + d.Dvp) + query_scratch());
      acc_t* GT = stT + TT;
      const KV kv = kv_at(GT + TT);
      acc_t* dfk = kv_end(kv);
      acc_t* dvacc = dfk + d.C * d.Dp;
      acc_t* scratch = dvacc + d.C * d.Dvp;
      const Bf16Ops ops = this->bf16_ops();
      std::fill(dfk, dfk + d.C * (d.Dp + d.Dvp), acc_t(0));
      const acc_t* G;
      if (a.causal) {
        const acc_t* sb = states.get() + t * d.state;
        G = gstates.get() + t * d.state;
        load_kv(sg, hk, kc, kv, true, true, ops);
        state_operand(sb, stT, ops);
        for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
          query_chunk(sg, h, kc, sb, stT, kv, ops, nullptr, dfk, dvacc, true, scratch);
      } else {
        G = gfinal.get() + bh * d.state;
        load_kv(sg, hk, kc, kv, false, true, ops);
      }
      transpose_state(G, GT);
      key_finish(sg, hk, kc, kv, G, GT, ops, dfk, dvacc);
    });
    parallel_tasks(rows, [&](int64_t bh) { store_grad_state(bh, gfinal.get() + bh * d.state); });
  }

  void run() const {
    if (one_task_per_head(this->state_rows()))
      run_per_head();
    else
      run_chunked();
  }
};

}  // namespace

void linear_bwd(const LinearBwdArgs& a) {
  switch (a.dtype) {
    case DType::Float32: return BwdKernel<float, float>(a).run();
    case DType::Float64: return BwdKernel<double, double>(a).run();
    case DType::BFloat16: return BwdKernel<c10::BFloat16, float>(a).run();
    case DType::Float16: return BwdKernel<c10::Half, float>(a).run();
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
