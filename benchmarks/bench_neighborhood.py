"""neighborhood_attention on 2-D and 3-D token grids (NATTEN's semantics) vs compiled
FlexAttention with a neighborhood mask_mod (forward only: no CPU backward) and SDPA with
the dense boolean mask.

2-D: 64x64 and 128x128 tokens, kernels 7x7 and 13x13, dilation 1 and 2; 3-D: 16x32x32 with
kernel 3x7x7; B=1, H=4, D=32 and 64, fp32 and bf16. Peers run on row-major tokens; ours
takes (B, H, *spatial, D) and includes its token permutation (gather in and out). The last
column is our forward time per (token x kernel volume): constant when the cost grows with
tokens x kernel area.
"""

import argparse
import math

import torch
import torch.nn.functional as F

import attention_ext as ae

from . import _util as U

CONTENDERS = ("ours", "flex", "sdpa")
_2D = [((64, 64), (7, 7), (1, 1)), ((64, 64), (13, 13), (1, 1)), ((128, 128), (7, 7), (1, 1)),
       ((128, 128), (7, 7), (2, 2)), ((128, 128), (13, 13), (1, 1)), ((128, 128), (13, 13), (2, 2))]
_3D = [((16, 32, 32), (3, 7, 7), (1, 1, 1))]
SIZES = {"quick": dict(grids=[((32, 32), (7, 7), (1, 1))], dims=(32,), dtypes=(torch.float32,), rounds=1),
         "default": dict(grids=[_2D[0], _2D[2], _2D[5]], dims=(32,), dtypes=(torch.float32,), rounds=2),
         "full": dict(grids=_2D + _3D, dims=(32, 64), dtypes=(torch.float32, torch.bfloat16), rounds=3)}


def _window(x, n, k, d):
    """NATTEN's window along one dim for coordinates x (a tensor), stride 1, non-causal:
    (group residue, first and last in-group index)."""
    g, i = x % d, x // d
    L = (n - g + d - 1) // d
    left, right = k // 2, k // 2 + k % 2 - 1
    start = torch.clamp(i - left, min=0) + torch.where(i + right >= L, L - right - i - 1, 0)
    return g, start, start + k - 1


def neighbor(q_idx, kv_idx, spatial, kernel, dilation):
    """Whether key kv_idx is in query q_idx's neighborhood (row-major token indices)."""
    ok = None
    for dim in reversed(range(len(spatial))):
        n, k, d = spatial[dim], kernel[dim], dilation[dim]
        xq, xk = q_idx % n, kv_idx % n
        q_idx, kv_idx = q_idx // n, kv_idx // n
        g, lo, hi = _window(xq, n, k, d)
        here = (xk % d == g) & (xk // d >= lo) & (xk // d <= hi)
        ok = here if ok is None else ok & here
    return ok


_flex = {}


def flex_fn(spatial, kernel, dilation):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    n = math.prod(spatial)
    bm = create_block_mask(lambda b, h, qi, ki: neighbor(qi, ki, spatial, kernel, dilation), B=None, H=None,
                           Q_LEN=n, KV_LEN=n, device="cpu")
    return lambda q, k, v: _flex["fn"](q, k, v, block_mask=bm)


def dense_mask(spatial, kernel, dilation):
    idx = torch.arange(math.prod(spatial))
    return neighbor(idx.view(-1, 1), idx.view(1, -1), spatial, kernel, dilation)


def run_case(spatial, kernel, dilation, D, dtype, rounds):
    H, n = 4, math.prod(spatial)
    q, k, v = (torch.randn(1, H, n, D, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, D, dtype=dtype)

    def ours():
        grid = [t.view(1, H, *spatial, D) for t in (q, k, v)]
        return ae.neighborhood_attention(*grid, kernel, dilation=dilation).view(1, H, n, D)

    mask = dense_mask(spatial, kernel, dilation)
    fwd = {"ours": ours, "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    errors = {}

    def flex():
        fx = flex_fn(spatial, kernel, dilation)
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # forward only: no autograd graph to trace
        return lambda: fx(qd, kd, vd)

    U.add_peer(fwd, errors, "flex", flex)
    t_f, t_b, mem, e = U.fwd_and_fwd_bwd(fwd, (q, k, v), g, rounds=rounds, fwd_only=("flex",))
    return t_f, t_b, mem, {**errors, **e}


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks neighborhood")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--dims", type=int, nargs="+", default=None, help="head dims (default: the mode's)")
    opts = p.parse_args(rest)
    size = U.sized(args, SIZES)
    rounds = opts.rounds or size["rounds"]
    cases = [(grid, D, dtype) for dtype in size["dtypes"] for D in opts.dims or size["dims"] for grid in size["grids"]]
    U.raise_recompile_limit()
    rows = []
    label = lambda c: f"{str(c[2])[6:]} D={c[1]} {'x'.join(map(str, c[0][0]))} k={'x'.join(map(str, c[0][1]))}"
    for (spatial, kernel, dilation), D, dtype in U.progress(cases, label,
                                                            cost=lambda c: math.prod(c[0][0]) * math.prod(c[0][1])):
        t_f, t_b, mem, errs = run_case(spatial, kernel, dilation, D, dtype, rounds)
        n, area = math.prod(spatial), math.prod(kernel)
        row = {"dtype": str(dtype).replace("torch.", ""), "D": D, "tokens": "x".join(map(str, spatial)),
               "kernel": "x".join(map(str, kernel)), "dilation": "x".join(map(str, dilation)),
               **U.speed_columns(t_f, t_b, ("sdpa",), fwd_only=("flex",), fwd_flops=4 * 4 * D * n * area),
               **U.memory_columns(mem, ("ours", "sdpa")),
               "fwd ours ns/(token·key)": t_f["ours"] * 1e9 / (n * area)}
        rows.append(row)
        U.print_row(row, errs)
        if errs:
            row["notes"] = "; ".join(f"{k}: {v}" for k, v in errs.items())
    cols = list(dict.fromkeys(c for r in rows for c in r))
    notes = ("Ratios are peer time / our time (> 1: ours faster). FlexAttention (compiled, block mask from a "
             "NATTEN mask_mod) runs forward only (no CPU backward); SDPA takes the dense (N, N) boolean mask. "
             "Ours includes the gather of q, k, v into tile order and of the output back. GFLOP/s count 4·D "
             "flops per (query, key) pair of the neighborhoods. Targets (issue 22): fwd >= 1.5x Flex; f+b >= 10x "
             "SDPA at 128x128; ns/(token·key) flat across sizes and kernels.")
    U.report(args, "neighborhood", "neighborhood_attention (2-D, 3-D) vs compiled Flex + mask_mod and SDPA + "
             "dense mask; B=1 H=4", notes, rows, cols)
