"""routing_attention vs dense flash_attention and vs sliding_window_attention with the
same number of keys per query.

B=1, H=8, D=64, fp32, N=16384 (``--sizes`` for others), C=64 clusters of window N/C
(the paper's C * window = N), bidirectional and causal. Routing's time includes its
assignment (scores against the centroids, top-window per cluster) and the gathers and
scatters around the packed-document kernels. The sliding window sees ``window`` keys per
query: ``(window // 2, window - 1 - window // 2)`` bidirectional, ``(window - 1, 0)``
causal (a causal routed query sees the keys before it in its cluster: at most
``window``, about half on average). Reports times, peer/ours ratios and peak memory.
"""

import argparse

import torch

import attention_ext as ae

from . import _util as U

CONTENDERS = ("ours", "dense", "window")
SIZES = {"quick": [1024], "default": [2048, 4096], "full": [16384]}  # N

H, D = 8, 64


def run_case(n, clusters, causal, rounds):
    window = n // clusters
    q, k, v = (torch.randn(1, H, n, D, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, D)
    cents = torch.randn(H, clusters, D)
    reach = (window - 1, 0) if causal else (window // 2, window - 1 - window // 2)
    fwd = {
        "ours": lambda: ae.routing_attention(q, k, v, cents, window=window, causal=causal),
        "dense": lambda: ae.flash_attention(q, k, v, causal=causal),
        "window": lambda: ae.sliding_window_attention(q, k, v, reach, causal=causal),
    }
    with torch.no_grad():
        fwd_mem = {name: U.peak_memory_mb(fn) for name, fn in fwd.items()}
    t_f, t_b, mem, errors = U.fwd_and_fwd_bwd(fwd, (q, k, v), g, rounds=rounds)
    row = {
        "N": n, "causal": causal, "clusters": clusters, "window": window,
        **U.speed_columns(t_f, t_b, ("dense", "window")),
        **U.memory_columns(mem, ("ours", "dense", "window")),
        **{f"mem {name} fwd MiB": m for name, m in fwd_mem.items()},
    }
    return row, errors


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks routing")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="sequence lengths N (default 16384)")
    p.add_argument("--clusters", type=int, default=64)
    p.add_argument("--rounds", type=int, default=None)
    opts = p.parse_args(rest)
    sizes = opts.sizes or U.sized(args, SIZES)
    rounds = opts.rounds or {"quick": 1, "default": 2}.get(U.mode(args), 3)
    rows = []
    for n, causal in U.progress([(n, c) for n in sizes for c in (False, True)], lambda c: f"N={c[0]} causal={c[1]}",
                                cost=lambda c: c[0] ** 2):
        row, errs = run_case(n, opts.clusters, causal, rounds)
        rows.append(row)
        U.print_row(row, errs)
        if errs:
            row["notes"] = "; ".join(f"{k}: {v}" for k, v in errs.items())
    cols = list(dict.fromkeys(c for r in rows for c in r))
    U.report(args, "routing",
             f"routing_attention vs flash_attention (dense) and sliding_window_attention; fp32, B=1 H={H} D={D}",
             ("Ratios are peer time / our time (> 1: routing faster). Routing: `clusters` clusters of `window` "
              "= N / clusters tokens (random centroids), its assignment included in the time; causal "
              "clusters run as documents of 2 * window merged query/key slots (4x the bidirectional work). "
              "'window': sliding_window_attention with `window` keys per query. Peak memory: "
              "forward+backward and forward alone, process peak RSS above the start (MiB)."),
             rows, cols)
    return rows
