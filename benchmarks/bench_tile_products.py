"""Our bf16 tile product (gemm_bf16.h on AVX512-BF16) against oneDNN's brgemm through
ATen (at::native::cpublas::brgemm, B packed once with cpublas::pack), at the tile shapes
our attention kernels multiply: forward S = Q K^T and O += P V, backward S^T, dP^T,
dV, dK and dQ, for D in {64, 128}. One thread, as inside the kernels; each call is timed
in C++ (attention_ext._C._tile_product_seconds), the two interleaved, best of rounds.
Needs the avx512bf16 CPU build (a CPU with AVX512-BF16); elsewhere the suite says so.
"""

import argparse

import torch

import attention_ext as ae

from . import _util as U

CONTENDERS = ("ours", "brgemm")
SIZES = {"quick": dict(dims=(64,), rounds=3, reps=200), "default": dict(dims=(64, 128), rounds=5, reps=500),
         "full": dict(dims=(64, 128), rounds=7, reps=2000)}
# (product, M, N, K) per head dim d; forward tiles BQ=64, BK=128, backward 64 x 64
SHAPES = (("fwd S = Q K^T", 64, 128, "d"), ("fwd O += P V", 64, "d", 128),
          ("bwd S^T, dP^T", 64, 64, "d"), ("bwd dV, dK, dQ", 64, "d", 64))


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks tile_products")
    p.add_argument("--rounds", type=int, default=None)
    opts = p.parse_args(rest)
    size = U.sized(args, SIZES)
    if "avx512bf16" not in ae.available_cpu_isas():
        U.say(f"tile_products: no bf16 tile products on this CPU (CPU paths {ae.available_cpu_isas()}); nothing to time")
        return
    before = ae.cpu_isa()
    ae.set_cpu_isa("avx512bf16")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        cases = [(name, m, n, k, d) for d in size["dims"] for name, m, n, k in SHAPES]
        for name, m, n, k, d in U.progress(cases, lambda c: f"{c[0]} D={c[4]}"):
            m, n, k = (d if x == "d" else x for x in (m, n, k))
            ours, onednn, diff = ae._C._tile_product_seconds(m, n, k, opts.rounds or size["rounds"], size["reps"])
            row = {"product": name, "D": d, "M": m, "N": n, "K": k, "ours us": ours * 1e6,
                   "brgemm us": onednn * 1e6, "brgemm/ours": onednn / ours,
                   "ours GFLOP/s": 2 * m * n * k / ours / 1e9, "brgemm GFLOP/s": 2 * m * n * k / onednn / 1e9,
                   "max diff": diff}
            rows.append(row)
            U.print_row(row)
    finally:
        torch.set_num_threads(threads)
        ae.set_cpu_isa(before)
    U.report(args, "tile-products", "bf16 tile products: ours (gemm_bf16, AVX512-BF16) vs oneDNN brgemm, 1 thread",
             ("Ratios are brgemm time / our time (> 1: ours faster). C = A B with A (M x K) bf16 rows, B (K x N) "
              "packed once (our VNNI pairs; cpublas::pack for brgemm), fp32 C, not accumulated. 'max diff': the "
              "largest difference of the two C (fp32 sums in different orders). The faster one runs in the "
              "attention kernels."), rows)
