// Linear attention forward on CPU, chunked (linear_fwd), and the recurrent step
// (linear_step).
//
// Causal: the sequence is cut into chunks of C rows. With S_c, z_c the state before chunk c,
//   A    = (fq fk^T) masked to j <= i              (C x C, inside the chunk)
//   num  = fq S_c + A v,   den = fq z_c + rowsum(A) + eps
//   S_{c+1} = S_c + fk^T v,   z_{c+1} = z_c + colsum(fk)
// so nothing of size N x N exists and the cost is linear in N. Non-causal: every query
// chunk uses the final state and no intra-chunk product.
//
// Segments (linear_common.h): each batch row, or with cu_seqlens each document, runs the
// above from its own initial state, its chunks counted from its first row.
//
// Parallelism: one task per (segment, kv head) walking its chunks in order when that fills
// the machine; otherwise three passes — chunk state deltas (one task per chunk), an
// exclusive scan of the deltas over chunks, then outputs (one task per query head and
// chunk). Both run the same operations in the same order (state = state + delta, chunk
// by chunk), so results are bitwise identical for any thread count.
#include "linear_common.h"

namespace attention_ext::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using namespace linear;

template <typename scalar_t, typename acc_t>
struct FwdKernel : ChunkKernel<scalar_t, acc_t, LinearFwdArgs> {
  using Base = ChunkKernel<scalar_t, acc_t, LinearFwdArgs>;
  using typename Base::KV;
  using Base::a, Base::d, Base::eps, Base::kBf16;
  using Base::load_kv, Base::load_queries, Base::load_state, Base::store_state;
  using Base::Base;

  int64_t kv_size() const { return Base::kv_size(false); }
  KV kv_at(acc_t* p) const { return Base::kv_at(p, false); }

  int64_t out_scratch() const { return d.C * d.Dp + d.C * d.Cp + d.C * d.Dvp + d.C; }

  // Output rows of query chunk qc of segment sg, head h, with `st` the state before the chunk
  // (causal) or the segment's final state (non-causal); fkT / v the same chunk's keys (causal,
  // bf16 tiles: their operands in ops).
  void out_chunk(const Segment& sg, int64_t h, int64_t qc, const acc_t* st, const acc_t* fkT, const acc_t* v,
                 const Bf16Ops& ops, acc_t* scratch) const {
    const int64_t q0 = this->q_begin(sg, qc);
    acc_t* fq = scratch;
    acc_t* A = fq + d.C * d.Dp;
    acc_t* num = A + d.C * d.Cp;
    acc_t* rowsum = num + d.C * d.Dvp;
    const int64_t m = load_queries(sg, h, qc, fq, nullptr);
    if constexpr (kBf16) {
      // A in bf16 for its product with v only: the normaliser sums the fp32 A
      round_rows(fq, d.Dp, m, d.Dp, ops.fq, d.Dp, m);
      pack_pairs(st, d.Dvp, d.D, d.Dvp, ops.S_pairs, round_up(d.D, 2));
      tile_gemm(m, d.Dvp, d.D, ops.fq, d.Dp, ops.S_pairs, 2 * d.Dvp, num, d.Dvp, false);
      if (a.causal) {
        gemm_lower_cols(m, m, d.D, ops.fq, d.Dp, ops.fkT_pairs, 2 * d.Cp, A, d.Cp);
        mask_lower<acc_t>(m, A, d.Cp, rowsum);
        round_rows(A, d.Cp, m, d.Cp, ops.A, d.Cp, m);
        gemm_lower_a(m, d.Dvp, ops.A, d.Cp, ops.v_pairs, 2 * d.Dvp, num, d.Dvp, true);
      }
    } else {
      gemm<acc_t>(m, d.Dvp, d.D, fq, d.Dp, 1, st, d.Dvp, num, d.Dvp, false);
      if (a.causal) {
        gemm_lower_cols(m, m, d.D, fq, d.Dp, fkT, d.Cp, A, d.Cp);
        mask_lower<acc_t>(m, A, d.Cp, rowsum);
        gemm_lower_a(m, d.Dvp, A, d.Cp, v, d.Dvp, num, d.Dvp, true);
      }
    }
    const acc_t* z = st + d.D * d.Dvp;
    scalar_t* out = static_cast<scalar_t*>(a.out) + ((sg.b * d.Hq + h) * d.Nq + q0) * d.Dv;
    for (int64_t r = 0; r < m; ++r) {
      acc_t* nr = num + r * d.Dvp;
      if (a.normalize) {
        acc_t den = dot(fq + r * d.Dp, z, d.Dp);
        if (a.causal) den += rowsum[r];
        den += eps;
        const Vec<acc_t> inv(acc_t(1) / den);
        for (int64_t c = 0; c < d.Dvp; c += Vec<acc_t>::size()) (Vec<acc_t>::loadu(nr + c) * inv).store(nr + c);
      }
      store_row(nr, d.Dv, out + r * d.Dv);
    }
  }

  // One task per state row (segment, kv head), chunks in order.
  void run_per_head() const {
    parallel_tasks(this->state_rows(), [&](int64_t bh) {
      const Segment& sg = this->seg_of_row(bh);
      const int64_t hk = bh % d.Hkv;
      acc_t* st = task_scratch<acc_t>(2 * d.state + kv_size() + out_scratch());
      acc_t* delta = st + d.state;
      const KV kv = kv_at(delta + d.state);
      acc_t* scratch = kv.v + d.C * d.Dvp;
      const Bf16Ops ops = this->bf16_ops();
      load_state(a.S0, a.z0, bh, st);
      for (int64_t kc = 0; kc < sg.nck; ++kc) {
        const int64_t n = load_kv(sg, hk, kc, kv, a.causal, false, ops);
        if (a.causal)
          for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
            out_chunk(sg, h, kc, st, kv.fkT, kv.v, ops, scratch);
        chunk_state(d, n, kv.fk, kv.v, delta);
        state_add(st, delta, d.state);
      }
      if (!a.causal)
        for (int64_t qc = 0; qc < sg.ncq; ++qc)
          for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
            out_chunk(sg, h, qc, st, nullptr, nullptr, ops, scratch);
      store_state(a.S, a.z, bh, st);
    });
  }

  // Chunk tasks: deltas, scan, outputs.
  void run_chunked() const {
    const int64_t rows = this->state_rows();
    // states[cell of (row, kc)]: the delta of key chunk kc, then (causal) the state before kc
    const ChunkIndex kcells = this->key_cells();
    Buffer<acc_t> states(std::max<int64_t>(kcells.total(), 1) * d.state);
    parallel_tasks(kcells.total(), [&](int64_t t) {
      const auto [bh, kc] = kcells.locate(t);
      const KV kv = kv_at(task_scratch<acc_t>(kv_size()));
      const Bf16Ops ops = this->bf16_ops();
      const int64_t n = load_kv(this->seg_of_row(bh), bh % d.Hkv, kc, kv, false, false, ops);
      chunk_state(d, n, kv.fk, kv.v, states.get() + t * d.state);
    });
    // exclusive scan over chunks (causal), the total into finals
    Buffer<acc_t> finals(rows * d.state);
    parallel_tasks(rows, [&](int64_t bh) { load_state(a.S0, a.z0, bh, finals.get() + bh * d.state); });
    scan_chunks(kcells, d.state, states.get(), finals.get(), /*exclusive=*/a.causal, /*reverse=*/false);
    const ChunkIndex qcells = this->head_query_cells();
    parallel_tasks(qcells.total(), [&](int64_t t) {
      const auto [gh, qc] = qcells.locate(t);
      const int64_t h = gh % d.Hq, hk = h / d.group, bh = gh / d.Hq * d.Hkv + hk;
      const Segment& sg = this->seg_of_row(bh);
      const KV kv = kv_at(task_scratch<acc_t>(kv_size() + out_scratch()));
      acc_t* scratch = kv.v + d.C * d.Dvp;
      const Bf16Ops ops = this->bf16_ops();
      const acc_t* st;
      if (a.causal) {  // Nq == Nk: query chunk qc is key chunk qc
        load_kv(sg, hk, qc, kv, true, false, ops);
        st = states.get() + kcells.cell(bh, qc) * d.state;
      } else {
        st = finals.get() + bh * d.state;
      }
      out_chunk(sg, h, qc, st, kv.fkT, kv.v, ops, scratch);
    });
    parallel_tasks(rows, [&](int64_t bh) { store_state(a.S, a.z, bh, finals.get() + bh * d.state); });
  }

  void run() const {
    if (one_task_per_head(this->state_rows()))
      run_per_head();
    else
      run_chunked();
  }
};

// Recurrent form, token by token: S += phi(k_t) v_t^T, z += phi(k_t), then every query
// head of the group reads the updated state.
template <typename scalar_t, typename acc_t>
void step_impl(const LinearStepArgs& a) {
  using V = Vec<acc_t>;
  const Dims<acc_t> d(a.B, a.Hq, a.Hkv, a.T, a.T, a.D, a.Dv, 1);
  const acc_t scale = acc_t(a.scale), eps = acc_t(a.eps);
  parallel_tasks(d.B * d.Hkv, [&](int64_t bh) {
    const int64_t b = bh / d.Hkv, hk = bh % d.Hkv;
    acc_t* st = task_scratch<acc_t>(d.state + d.Dp + d.Dvp + d.Dp + d.Dvp);
    acc_t* fk = st + d.state;
    acc_t* v = fk + d.Dp;
    acc_t* fq = v + d.Dvp;
    acc_t* num = fq + d.Dp;
    state_in(d, static_cast<const acc_t*>(a.S0) + bh * d.D * d.Dv, static_cast<const acc_t*>(a.z0) + bh * d.D, st);
    acc_t* z = st + d.D * d.Dvp;
    for (int64_t t = 0; t < a.T; ++t) {
      load_features(row_ptr<scalar_t>(a.k, b, hk, t), 0, a.k.stride[3], 1, d.D, a.feature_map, acc_t(1), fk, d.Dp, 1);
      load_rows(row_ptr<scalar_t>(a.v, b, hk, t), 0, a.v.stride[3], 1, d.Dv, v, d.Dvp, 1);
      for (int64_t x = 0; x < d.D; ++x) {
        const V f(fk[x]);
        acc_t* srow = st + x * d.Dvp;
        for (int64_t c = 0; c < d.Dvp; c += V::size())
          at::vec::fmadd(f, V::loadu(v + c), V::loadu(srow + c)).store(srow + c);
        z[x] += fk[x];
      }
      for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h) {
        load_features(row_ptr<scalar_t>(a.q, b, h, t), 0, a.q.stride[3], 1, d.D, a.feature_map, scale, fq, d.Dp, 1);
        gemm<acc_t>(1, d.Dvp, d.D, fq, d.Dp, 1, st, d.Dvp, num, d.Dvp, false);
        scalar_t* o = static_cast<scalar_t*>(a.out) + ((b * d.Hq + h) * a.T + t) * d.Dv;
        acc_t inv = 1;
        if (a.normalize) {
          acc_t den = 0;
          for (int64_t x = 0; x < d.D; ++x) den += fq[x] * z[x];
          inv = acc_t(1) / (den + eps);
        }
        for (int64_t c = 0; c < d.Dv; ++c) o[c] = from_acc<scalar_t>(a.normalize ? num[c] * inv : num[c]);
      }
    }
    state_out(d, st, static_cast<acc_t*>(a.S) + bh * d.D * d.Dv, static_cast<acc_t*>(a.z) + bh * d.D);
  });
}

}  // namespace

void linear_fwd(const LinearFwdArgs& a) {
  switch (a.dtype) {
    case DType::Float32: return FwdKernel<float, float>(a).run();
    case DType::Float64: return FwdKernel<double, double>(a).run();
    case DType::BFloat16: return FwdKernel<c10::BFloat16, float>(a).run();
    case DType::Float16: return FwdKernel<c10::Half, float>(a).run();
  }
}

void linear_step(const LinearStepArgs& a) {
  switch (a.dtype) {
    case DType::Float32: return step_impl<float, float>(a);
    case DType::Float64: return step_impl<double, double>(a);
    case DType::BFloat16: return step_impl<c10::BFloat16, float>(a);
    case DType::Float16: return step_impl<c10::Half, float>(a);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace attention_ext::cpu
