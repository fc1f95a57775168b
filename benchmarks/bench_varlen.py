"""Packed sequences (varlen): flash_attention / sliding_window_attention with cu_seqlens vs
SDPA with the dense block-diagonal causal mask, compiled FlexAttention with a document
mask_mod (forward only: FlexAttention has no CPU backward), and a Python loop of our own
function over the documents.

B=1, H=8, causal, one row of documents packed to N in {8192, 32768}; document lengths from
a fixed-seed log-uniform draw in [64, 4096], and a short-document case in [64, 256].
D in {64, 128}, fp32 and bf16, forward and forward+backward. A sliding-window row (window
512 inside each document, D=64) runs against Flex with a document-and-window mask_mod.
Reports times, peer/ours ratios, GFLOP/s, peak memory, and how far each peer's output is
from ours (the contenders compute the same function).
"""

import argparse
import math

import torch
import torch.nn.functional as F

import attention_ext as ae
from attention_ext import _layers

from . import _util as U

H = 8
DOCS = {"64-4096": (64, 4096), "64-256": (64, 256)}
WINDOW = 512
CONTENDERS = ("ours", "sdpa", "flex", "loop")
# N per mode; quick and default run two cases (one global, one windowed: each case compiles
# Flex anew, ~8 s on 2 cores), full every (dtype, D, documents) and the windowed rows
SIZES = {"quick": dict(sizes=[1024], all_cases=False), "default": dict(sizes=[2048, 8192], all_cases=False),
         "full": dict(sizes=[8192, 32768], all_cases=True)}


def doc_lengths(n, lo, hi, seed=0):
    """Log-uniform lengths in [lo, hi] (fixed seed) until they fill n; the last is cut to fit."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < n:
        u = torch.rand((), generator=g).item()
        length = min(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))), n - total)
        lengths.append(length)
        total += length
    return lengths


def allowed_pairs(lengths, window):
    """(query, key) pairs a causal query sees inside its document (window: keys i-w..i)."""
    def one(n):
        if window is None or n <= window + 1:
            return n * (n + 1) // 2
        return (window + 1) * (window + 2) // 2 + (n - window - 1) * (window + 1)
    return sum(one(n) for n in lengths)


_flex_cache = {}


def flex_fn(cu, n, window):
    """Compiled flex_attention (compiled once) and the block mask of these documents (built
    here, outside the timed call: a model builds it once per batch for all its layers)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex_cache:
        _flex_cache["fn"] = torch.compile(flex_attention, dynamic=False)
    doc = torch.searchsorted(cu[1:], torch.arange(n, dtype=cu.dtype), right=True)

    def document(b, h, q_idx, kv_idx):
        allowed = (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        return allowed if window is None else allowed & (q_idx - kv_idx <= window)

    # uncompiled, create_block_mask materialises ~10 bytes per (query, key) pair (10 GiB at N=32768)
    bm = create_block_mask(document, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu", _compile=n > 8192)
    fn = _flex_cache["fn"]
    return lambda q, k, v: fn(q, k, v, block_mask=bm)


def sdpa_bytes(n, dtype):
    """SDPA's forward+backward CPU peak with the dense mask built as below, per (query, key)
    pair: measured at N=8192 (fp32 7-8.5, bf16 5.7-5.8 bytes, the mask's build included), rounded up."""
    return (9 if dtype == torch.float32 else 6) * n * n


def run_case(n, d, dtype, docs, window, rounds, sdpa_budget):
    lengths = doc_lengths(n, *DOCS[docs])
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q, k, v = (torch.randn(1, H, n, d, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, d, dtype=dtype)
    if window is None:
        def attend(q, k, v, **kw):
            return ae.flash_attention(q, k, v, causal=True, **kw)
    else:
        def attend(q, k, v, **kw):
            return ae.sliding_window_attention(q, k, v, window, causal=True, **kw)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    fwd = {
        "ours": lambda: attend(q, k, v, cu_seqlens=cu),
        "loop": lambda: torch.cat([attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in bounds], 2),
    }
    errors = {}
    if sdpa_bytes(n, dtype) <= sdpa_budget:
        def sdpa():
            # built per call, as a model builds its mask per forward
            left = None if window is None else window
            mask = _layers.document_mask(cu, n) & _layers.band_mask(n, n, causal=True, left=left)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        fwd["sdpa"] = sdpa
    else:
        errors["sdpa"] = (f"skipped: its dense mask needs ~{sdpa_bytes(n, dtype) / 2**30:.1f} GiB, over the "
                          f"{sdpa_budget / 2**30:.1f} GiB budget (--sdpa-budget-gib)")
    try:
        fx = flex_fn(cu, n, window)
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # forward only: no autograd graph to trace
        fwd["flex"] = lambda: fx(qd, kd, vd)
    except Exception as e:  # noqa: BLE001 - a failing peer is a result, not a crash
        errors["flex"] = U.reason(e)
    with torch.no_grad():
        want = fwd["ours"]().float()
        diff = max((fn().float() - want).abs().max().item() for name, fn in fwd.items() if name != "ours")
        fwd_mem = {name: U.peak_memory_mb(fwd[name]) for name in ("ours", "flex") if name in fwd}
    t_f, t_b, mem, e = U.fwd_and_fwd_bwd(fwd, (q, k, v), g, rounds=rounds, fwd_only=("flex",))
    fl = 4 * H * d * allowed_pairs(lengths, window)
    row = {
        "dtype": str(dtype).replace("torch.", ""), "N": n, "D": d, "docs": f"{docs} ({len(lengths)})",
        "window": window or "–",
        **U.speed_columns(t_f, t_b, ("sdpa", "loop"), fwd_only=("flex",), fwd_flops=fl),
        **U.memory_columns(mem, ("ours", "sdpa", "loop")),
        **{f"mem {name} fwd MiB": m for name, m in fwd_mem.items()},
        "max diff vs ours": f"{diff:.1e}",
    }
    return row, {**errors, **e}


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks varlen")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="total tokens N of the packed row")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--sdpa-budget-gib", type=float, default=12.0,
                   help="skip SDPA where its dense mask and buffers would need more (this machine: 24 GiB)")
    opts = p.parse_args(rest)
    size = U.sized(args, SIZES)
    sizes = opts.sizes or size["sizes"]
    rounds = opts.rounds or {"quick": 1, "default": 2}.get(U.mode(args), 3)
    budget = opts.sdpa_budget_gib * 2**30
    U.raise_recompile_limit()
    cases = []  # (dtype, D, docs, window)
    for dtype in (torch.float32, torch.bfloat16):
        cases += [(dtype, d, docs, None) for d in (64, 128) for docs in DOCS]
        cases.append((dtype, 64, "64-4096", WINDOW))
    if not size["all_cases"]:  # each case compiles Flex anew (~8 s on 2 cores): one global, one windowed
        cases = [(torch.float32, 64, "64-256", None), (torch.bfloat16, 64, "64-4096", WINDOW)]
    rows = []
    for n, (dtype, d, docs, window) in U.progress([(n, c) for n in sizes for c in cases],
                                                  lambda c: f"N={c[0]} {str(c[1][0])[6:]} D={c[1][1]} docs {c[1][2]}",
                                                  cost=lambda c: c[0] ** 2):
        row, errs = run_case(n, d, dtype, docs, window, rounds, budget)
        rows.append(row)
        U.print_row(row, errs)
        if errs:
            row["notes"] = "; ".join(f"{k}: {v}" for k, v in errs.items())
    cols = list(dict.fromkeys(c for r in rows for c in r))  # every column once, "notes" only if some row has one
    U.report(args, "varlen",
             "packed sequences (cu_seqlens) vs SDPA + block-diagonal mask, compiled FlexAttention with a document "
             "mask_mod, a loop over the documents; causal, B=1 H=8",
             ("Ratios are peer time / our time (> 1: ours faster). 'docs': the range of the log-uniform document "
              f"lengths (fixed seed) and how many documents fill N; 'window': {WINDOW} keys back inside each "
              "document (sliding_window_attention; Flex with a document-and-window mask_mod). SDPA's dense "
              "mask is built inside the timed call, as a model builds it per forward, and runs where its "
              f"estimated peak (sdpa_bytes: ~9 bytes per (query, key) pair in fp32, 6 in bf16) stays under "
              f"{opts.sdpa_budget_gib:g} GiB (rows without it say so in 'notes'); Flex's block mask once, "
              "outside it (a model reuses it across layers). FlexAttention runs forward only (no CPU backward). "
              "'loop' calls our function once per document. GFLOP/s count 4·D flops per allowed (query, key) "
              "pair. Peak memory: forward+backward (and forward alone for ours and Flex), process peak RSS "
              "above the start (MiB). 'max diff vs ours': the largest output difference of any peer."),
             rows, cols)
    return rows
