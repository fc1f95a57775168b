"""flash_attention vs PyTorch SDPA (its CPU flash kernel) and a naive matmul-softmax-matmul.

B=1, H=8, N in {1024, 4096, 8192}, D in {64, 128}, causal and not, fp32 and bf16, forward
and forward+backward. Reports best-of-rounds times, SDPA/ours ratios (> 1: ours is
faster), achieved GFLOP/s next to the machine's GEMM GFLOP/s for the dtype (measured in
the same run), and the peak memory each contender adds. On the avx512bf16 build, bf16 rows
also time our avx512 build (bf16 converted to fp32 tiles) as the peer "ours_avx512".
"""

import argparse
import math

import torch
import torch.nn.functional as F

import attention_ext as ae

from . import _util as U

CONTENDERS = ("ours", "sdpa", "naive")
# N, head dims, rounds per mode (--full: the RESULTS.md sizes); short: the short-sequence
# table (section "flash-short", with --short or --full), B in short_batches at H=8
SIZES = {"quick": dict(sizes=[256, 512], dims=(64,), rounds=1, short=[128, 256], short_batches=(1,)),
         "default": dict(sizes=[1024, 2048, 4096], dims=(64,), rounds=2, short=[128, 512, 1024],
                         short_batches=(1, 4)),
         "full": dict(sizes=[1024, 4096, 8192], dims=(64, 128), rounds=3, short=[128, 256, 512, 1024],
                      short_batches=(1, 4))}
# a short call takes a few ms: repeat it for at least this long per timed round
SHORT_MIN_TIME = 0.05


def naive(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


gemm_gflops = U.gemm_gflops


def attention_flops(n, d, causal, h=8, b=1):
    f = 4 * b * h * n * n * d
    return f / 2 if causal else f


def on_isa(isa, fn):
    """fn on the CPU kernel build `isa`: the forward sets it, so the backward that follows
    in the same timed call runs there too."""
    def run():
        ae.set_cpu_isa(isa)
        return fn()
    return run


def run_case(dtype, n, d, causal, rounds, with_naive, b=1, min_time=0.0):
    q, k, v = (torch.randn(b, 8, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(b, 8, n, d, dtype=dtype)
    def ours():
        return ae.flash_attention(q, k, v, causal=causal)

    fwd = {
        "ours": ours,
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    if with_naive:
        fwd["naive"] = lambda: naive(q, k, v, causal)
    isa = ae.cpu_isa()
    if dtype == torch.bfloat16 and isa == "avx512bf16":
        fwd["ours"] = on_isa(isa, ours)
        fwd["ours_avx512"] = on_isa("avx512", ours)
    try:
        return U.fwd_and_fwd_bwd(fwd, (q, k, v), g, rounds=rounds, min_time=min_time)
    finally:
        ae.set_cpu_isa(isa)


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks flash")
    p.add_argument("--sizes", type=int, nargs="*", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--short", action="store_true", help="only the short-sequence table (flash-short)")
    opts = p.parse_args(rest)
    size = U.sized(args, SIZES)
    sizes = opts.sizes or size["sizes"]
    rounds = opts.rounds or size["rounds"]
    if opts.short or U.mode(args) == "full":
        short_table(args, size, opts.rounds or max(rounds, 3))
    if opts.short:
        return
    rows = []
    gemm = {}
    cases = [(dtype, d, n, causal) for dtype in (torch.float32, torch.bfloat16) for d in size["dims"]
             for n in sizes for causal in (False, True)]
    for dtype, d, n, causal in U.progress(cases, lambda c: f"{str(c[0])[6:]} N={c[2]} D={c[1]} causal={c[3]}",
                                          cost=lambda c: attention_flops(c[2], c[1], c[3])):
        if dtype not in gemm:
            gemm[dtype] = gemm_gflops(dtype)
        with_naive = n <= 4096 and (dtype == torch.float32 or n <= 1024)
        t_f, t_b, mem, errs = run_case(dtype, n, d, causal, rounds, with_naive)
        fl = attention_flops(n, d, causal)
        row = {
            "dtype": str(dtype).replace("torch.", ""), "N": n, "D": d, "causal": causal,
            **U.speed_columns(t_f, t_b, ("sdpa", "naive") + (("ours_avx512",) if "ours_avx512" in t_f else ()),
                              fwd_flops=fl),
            "f+b GFLOP/s": 3.5 * fl / t_b["ours"] / 1e9,
            **U.memory_columns(mem, ("ours", "sdpa", "naive")),
        }
        rows.append(row)
        U.print_row(row, errs)
    cols = list(dict.fromkeys(c for r in rows for c in r))  # bf16 rows may add ours_avx512
    U.report(args, "flash", "flash_attention vs SDPA (CPU flash) and naive, B=1 H=8",
             (f"CPU tile products: `{ae.cpu_isa()}` (bf16 inputs multiply bf16 tiles on AVX512-BF16 there; "
              "ours_avx512: the same kernels with bf16 converted to fp32 tiles). "
              "Ratios are peer time / our time (> 1: ours faster). GFLOP/s count 4·N²·D per head "
              "(half with causal) forward and 3.5x that for forward+backward. GEMM roof measured in this run: "
              + ", ".join(f"{str(k).replace('torch.', '')} {v:.0f} GFLOP/s" for k, v in gemm.items() if v)
              + ". Peak memory: forward+backward, process peak RSS above the start (MiB); the naive "
              "contender runs only where it fits in reasonable time."),
             rows, cols, roofs={str(k).replace("torch.", ""): v for k, v in gemm.items()})


def short_table(args, size, rounds):
    """N <= 1024, where most transformers calls are: per-call costs (packing, dispatch,
    tile shapes) weigh most here. B*H in {8, 32}."""
    rows = []
    cases = [(dtype, d, b, n, causal) for dtype in (torch.float32, torch.bfloat16) for d in (64, 128)
             for b in size["short_batches"] for n in size["short"] for causal in (False, True)]
    for dtype, d, b, n, causal in U.progress(
            cases, lambda c: f"{str(c[0])[6:]} B={c[2]} N={c[3]} D={c[1]} causal={c[4]}",
            cost=lambda c: c[2] * attention_flops(c[3], c[1], c[4])):
        t_f, t_b, _, errs = run_case(dtype, n, d, causal, rounds, False, b=b, min_time=SHORT_MIN_TIME)
        row = {"dtype": str(dtype).replace("torch.", ""), "B": b, "N": n, "D": d, "causal": causal,
               **U.speed_columns(t_f, t_b, ("sdpa",) + (("ours_avx512",) if "ours_avx512" in t_f else ()))}
        rows.append(row)
        U.print_row(row, errs)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    U.report(args, "flash-short", "flash_attention vs SDPA at short sequences (N <= 1024), H=8",
             (f"CPU tile products: `{ae.cpu_isa()}`. B*H in {{8, 32}}. Ratios are peer time / our time "
              f"(> 1: ours faster); each timed round repeats a call for at least {SHORT_MIN_TIME * 1e3:.0f} ms, "
              "best of rounds, contenders interleaved."), rows, cols)
