"""Logit softcapping (Gemma 2): our kernels with softcap vs what a user runs instead.

Peers: compiled FlexAttention with a tanh score_mod and a block mask (forward only:
FlexAttention has no CPU backward), and the eager math transformers runs for Gemma 2
(scores, tanh, mask, fp32 softmax, product; N x N), where it fits. Also ours without
softcap, to show what the cap costs. B=1, H=8, D=64, softcap 50 (Gemma 2's value):
full causal attention at N = 2048 and 4096 (Gemma 2's global layers) and a causal window
of 1024 at N = 16384 (its local layers, scaled down), fp32 and bf16.
"""

import argparse
import math

import torch

import attention_ext as ae

from . import _util as U

CAP = 50.0
CONTENDERS = ("ours", "ours no cap", "flex", "eager")
# (N, causal window or None: full causal) per mode; every case compiles FlexAttention anew (~8 s on 2 cores)
SIZES = {"quick": [(512, None), (1024, 128)],
         "default": [(512, None), (1024, None), (8192, 1024), (16384, 1024)],
         "full": [(2048, None), (4096, None), (16384, 1024)]}
_flex = {}


def flex_fn(n, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)

    def softcap(score, b, h, q_idx, kv_idx):
        return CAP * torch.tanh(score / CAP)

    def mask(b, h, q_idx, kv_idx):
        m = kv_idx <= q_idx
        return m & (q_idx - kv_idx <= window) if window else m

    bm = create_block_mask(mask, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
    fn = _flex["fn"]
    return lambda q, k, v: fn(q, k, v, score_mod=softcap, block_mask=bm)


def eager(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = CAP * torch.tanh(s / CAP)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")).float(), dim=-1).to(q.dtype)
    return p @ v


def band(n, window):
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    m = j <= i
    return m & (i - j <= window) if window else m


def run_case(n, window, dtype, rounds):
    q, k, v = (torch.randn(1, 8, n, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 8, n, 64, dtype=dtype)
    if window:
        def ours(cap):
            return lambda: ae.sliding_window_attention(q, k, v, window, causal=True, softcap=cap)
    else:
        def ours(cap):
            return lambda: ae.flash_attention(q, k, v, causal=True, softcap=cap)
    fwd = {"ours": ours(CAP), "ours no cap": ours(None)}
    errors = {}
    try:
        fx = flex_fn(n, window)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        fwd["flex"] = lambda: fx(qd, kd, vd)
    except Exception as e:  # noqa: BLE001
        errors["flex"] = U.reason(e)
    if n <= 4096:
        allowed = band(n, window)
        fwd["eager"] = lambda: eager(q, k, v, allowed)
    t_f, t_b, mem, e = U.fwd_and_fwd_bwd(fwd, (q, k, v), g, rounds=rounds, fwd_only=("flex",))
    return t_f, t_b, mem, {**errors, **e}


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks softcap")
    p.add_argument("--rounds", type=int, default=None)
    opts = p.parse_args(rest)
    U.raise_recompile_limit()
    rounds = opts.rounds or {"quick": 1, "default": 2}.get(U.mode(args), 3)
    cases = [(dtype, n, window) for dtype in (torch.float32, torch.bfloat16) for n, window in U.sized(args, SIZES)]
    rows = []
    for dtype, n, window in U.progress(cases, lambda c: f"{str(c[0])[6:]} N={c[1]} window={c[2] or 'full'}",
                                       cost=lambda c: c[1] * (c[2] or c[1])):
        t_f, t_b, mem, errs = run_case(n, window, dtype, rounds)
        row = {
            "dtype": str(dtype).replace("torch.", ""), "N": n, "window": window or "full",
            **U.speed_columns(t_f, t_b, ("eager",), fwd_only=("flex",),
                              ratios={"cap cost": ("ours", "ours no cap")}),
            **U.memory_columns(mem, ("ours", "eager")),
        }
        rows.append(row)
        U.print_row(row, errs)
    U.report(args, "softcap",
             "softcap (Gemma 2 logit softcapping, cap 50) vs compiled FlexAttention score_mod and eager math, "
             "causal, B=1 H=8 D=64",
             ("Ratios are peer time / our time (> 1: ours faster). 'cap cost' is our time with softcap / our "
              "time without (what the tanh costs). FlexAttention runs forward only (no CPU backward); eager math "
              "(transformers' Gemma 2 path) only up to N=4096. Peak memory: forward+backward, process peak RSS "
              "above the start (MiB)."),
             rows)
