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
// Parallelism: one task per (batch, kv head) walking its chunks in order when that fills
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
struct FwdKernel {
  const LinearFwdArgs& a;
  Dims<acc_t> d;
  acc_t scale, eps;

  explicit FwdKernel(const LinearFwdArgs& args)
      : a(args),
        d(args.B, args.Hq, args.Hkv, args.Nq, args.Nk, args.D, args.Dv, args.chunk),
        scale(acc_t(args.scale)),
        eps(acc_t(args.eps)) {}

  // Key chunk kc of kv head (b, hk) at p: fk [C][Dp], fkT [D][Cp], v [C][Dvp].
  struct KV {
    acc_t *fk, *fkT, *v;
  };
  int64_t kv_size() const { return d.C * d.Dp + d.D * d.Cp + d.C * d.Dvp; }
  KV kv_at(acc_t* p) const { return {p, p + d.C * d.Dp, p + d.C * d.Dp + d.D * d.Cp}; }
  // Returns the chunk's key count; the transposed form only when `transposed`.
  int64_t load_kv(int64_t b, int64_t hk, int64_t kc, const KV& kv, bool transposed) const {
    const int64_t k0 = kc * d.C, n = std::min(d.C, d.Nk - k0);
    load_features(row_ptr<scalar_t>(a.k, b, hk, k0), a.k.stride[2], a.k.stride[3], n, d.D, a.feature_map, acc_t(1),
                  kv.fk, d.Dp, n);
    if (transposed) transpose_block(kv.fk, d.Dp, n, d.D, kv.fkT, d.Cp);
    load_rows(row_ptr<scalar_t>(a.v, b, hk, k0), a.v.stride[2], a.v.stride[3], n, d.Dv, kv.v, d.Dvp, d.C);
    return n;
  }

  int64_t out_scratch() const { return d.C * d.Dp + d.C * d.Cp + d.C * d.Dvp + d.C; }

  // Output rows of query chunk qc of head (b, h), with `st` the state before the chunk
  // (causal) or the final state (non-causal); fkT / v the same chunk's keys (causal).
  void out_chunk(int64_t b, int64_t h, int64_t qc, const acc_t* st, const acc_t* fkT, const acc_t* v,
                 acc_t* scratch) const {
    const int64_t q0 = qc * d.C, m = std::min(d.C, d.Nq - q0);
    acc_t* fq = scratch;
    acc_t* A = fq + d.C * d.Dp;
    acc_t* num = A + d.C * d.Cp;
    acc_t* rowsum = num + d.C * d.Dvp;
    load_features(row_ptr<scalar_t>(a.q, b, h, q0), a.q.stride[2], a.q.stride[3], m, d.D, a.feature_map, scale, fq,
                  d.Dp, m);
    gemm<acc_t>(m, d.Dvp, d.D, fq, d.Dp, 1, st, d.Dvp, num, d.Dvp, false);
    if (a.causal) {
      gemm_lower_cols<acc_t>(m, m, d.D, fq, d.Dp, fkT, d.Cp, A, d.Cp);
      mask_lower<acc_t>(m, A, d.Cp, rowsum);
      gemm_lower_a<acc_t>(m, d.Dvp, A, d.Cp, v, d.Dvp, num, d.Dvp, true);
    }
    const acc_t* z = st + d.D * d.Dvp;
    scalar_t* out = static_cast<scalar_t*>(a.out) + ((b * d.Hq + h) * d.Nq + q0) * d.Dv;
    for (int64_t r = 0; r < m; ++r) {
      const acc_t* nr = num + r * d.Dvp;
      scalar_t* o = out + r * d.Dv;
      if (!a.normalize) {
        for (int64_t c = 0; c < d.Dv; ++c) o[c] = from_acc<scalar_t>(nr[c]);
        continue;
      }
      acc_t den = 0;
      const acc_t* fr = fq + r * d.Dp;
      for (int64_t x = 0; x < d.D; ++x) den += fr[x] * z[x];
      if (a.causal) den += rowsum[r];
      den += eps;
      const acc_t inv = acc_t(1) / den;
      for (int64_t c = 0; c < d.Dv; ++c) o[c] = from_acc<scalar_t>(nr[c] * inv);
    }
  }

  void store_state(int64_t bh, const acc_t* st) const {
    state_out(d, st, static_cast<acc_t*>(a.S) + bh * d.D * d.Dv, static_cast<acc_t*>(a.z) + bh * d.D);
  }
  void load_state(int64_t bh, acc_t* st) const {
    const auto* S0 = static_cast<const acc_t*>(a.S0);
    const auto* z0 = static_cast<const acc_t*>(a.z0);
    state_in(d, S0 ? S0 + bh * d.D * d.Dv : nullptr, z0 ? z0 + bh * d.D : nullptr, st);
  }

  // One task per (batch, kv head), chunks in order.
  void run_per_head() const {
    parallel_tasks(d.B * d.Hkv, [&](int64_t bh) {
      const int64_t b = bh / d.Hkv, hk = bh % d.Hkv;
      acc_t* st = task_scratch<acc_t>(2 * d.state + kv_size() + out_scratch());
      acc_t* delta = st + d.state;
      const KV kv = kv_at(delta + d.state);
      acc_t* scratch = kv.v + d.C * d.Dvp;
      load_state(bh, st);
      for (int64_t kc = 0; kc < d.nck; ++kc) {
        const int64_t n = load_kv(b, hk, kc, kv, a.causal);
        if (a.causal)
          for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
            out_chunk(b, h, kc, st, kv.fkT, kv.v, scratch);
        chunk_state(d, n, kv.fk, kv.v, delta);
        state_add(st, delta, d.state);
      }
      if (!a.causal)
        for (int64_t qc = 0; qc < d.ncq; ++qc)
          for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h)
            out_chunk(b, h, qc, st, nullptr, nullptr, scratch);
      store_state(bh, st);
    });
  }

  // Chunk tasks: deltas, scan, outputs.
  void run_chunked() const {
    const int64_t bhk = d.B * d.Hkv, nck = d.nck;
    // states[bh][kc]: the delta of key chunk kc, then (causal) the state before kc
    Buffer<acc_t> states(bhk * std::max<int64_t>(nck, 1) * d.state);
    parallel_tasks(bhk * nck, [&](int64_t t) {
      const int64_t bh = t / nck, kc = t % nck;
      const KV kv = kv_at(task_scratch<acc_t>(kv_size()));
      const int64_t n = load_kv(bh / d.Hkv, bh % d.Hkv, kc, kv, false);
      chunk_state(d, n, kv.fk, kv.v, states.get() + t * d.state);
    });
    // exclusive scan over chunks, split over slices of the state
    const int64_t slice = 512, nslices = (d.state + slice - 1) / slice;
    Buffer<acc_t> finals(bhk * d.state);
    parallel_tasks(bhk, [&](int64_t bh) { load_state(bh, finals.get() + bh * d.state); });
    parallel_tasks(bhk * nslices, [&](int64_t t) {
      const int64_t bh = t / nslices, s0 = (t % nslices) * slice, len = std::min(slice, d.state - s0);
      acc_t* run = finals.get() + bh * d.state + s0;
      for (int64_t kc = 0; kc < nck; ++kc) {
        acc_t* cell = states.get() + (bh * nck + kc) * d.state + s0;
        if (a.causal)
          for (int64_t i = 0; i < len; ++i) {
            const acc_t delta = cell[i];
            cell[i] = run[i];
            run[i] += delta;
          }
        else
          state_add(run, cell, len);
      }
    });
    parallel_tasks(d.B * d.Hq * d.ncq, [&](int64_t t) {
      const int64_t qc = t % d.ncq, bh = t / d.ncq, b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group;
      const int64_t bhk_i = b * d.Hkv + hk;
      const KV kv = kv_at(task_scratch<acc_t>(kv_size() + out_scratch()));
      acc_t* scratch = kv.v + d.C * d.Dvp;
      const acc_t* st;
      if (a.causal) {
        load_kv(b, hk, qc, kv, true);
        st = states.get() + (bhk_i * nck + qc) * d.state;
      } else {
        st = finals.get() + bhk_i * d.state;
      }
      out_chunk(b, h, qc, st, kv.fkT, kv.v, scratch);
    });
    parallel_tasks(bhk, [&](int64_t bh) { store_state(bh, finals.get() + bh * d.state); });
  }

  void run() const {
    if (one_task_per_head(d.B * d.Hkv))
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
