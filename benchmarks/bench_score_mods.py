"""Score modifiers: ALiBi (alibi_slopes), attention sinks (sinks) and attention dropout
(dropout_p) in our kernels, what each costs against plain flash_attention, and what a
user runs instead.

One row per (dtype, modifier): "ours" is flash_attention with that modifier, "cost" its
time over plain flash_attention (no modifier), all measured in one interleaved group.
Peers: for ALiBi, SDPA with a dense additive ALiBi float mask (forward and backward;
N x N) and compiled FlexAttention with an ALiBi score_mod and a causal block mask
(forward only: no CPU backward); for dropout, SDPA with dropout_p (the same p); sinks
have none. B=1, H=8, D=64, causal, fp32 and bf16, N=4096 (--quick: 512); dropout_p=0.1.
"""

import argparse

import torch

import attention_ext as ae

from . import _util as U

H = 8
P_DROP = 0.1
MODS = ("alibi", "sinks", "dropout")
PEERS = {"alibi": ("sdpa_alibi", "flex"), "sinks": (), "dropout": ("sdpa_dropout",)}
FWD_ONLY = ("flex",)
_flex = {}


def flex_fn(n, slopes):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex:
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    bm = create_block_mask(causal, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
    fn = _flex["fn"]
    return lambda q, k, v: fn(q, k, v, score_mod=alibi, block_mask=bm)


def alibi_mask(n, slopes, dtype):
    """The dense additive mask a user builds for SDPA: -slope * (i - j), -inf above the diagonal."""
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    bias = -slopes.view(-1, 1, 1) * (i - j).abs()
    return bias.masked_fill(j > i, float("-inf")).to(dtype).unsqueeze(0)


def run_case(n, dtype, rounds):
    """Times of every contender (one interleaved group): plain, each modifier, the peers."""
    q, k, v = (torch.randn(1, H, n, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, 64, dtype=dtype)
    slopes = ae.alibi_slopes(H)
    sinks = torch.randn(H)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mask = alibi_mask(n, slopes, dtype)
    fwd = {
        "plain": lambda: ae.flash_attention(q, k, v, causal=True),
        "alibi": lambda: ae.flash_attention(q, k, v, causal=True, alibi_slopes=slopes),
        "sinks": lambda: ae.flash_attention(q, k, v, causal=True, sinks=sinks),
        "dropout": lambda: ae.flash_attention(q, k, v, causal=True, dropout_p=P_DROP),
        "sdpa_alibi": lambda: sdpa(q, k, v, attn_mask=mask),
        "sdpa_dropout": lambda: sdpa(q, k, v, is_causal=True, dropout_p=P_DROP),
    }
    errors = {}

    def flex():
        fx = flex_fn(n, slopes)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        return lambda: fx(qd, kd, vd)

    U.add_peer(fwd, errors, "flex", flex)
    t_f, t_b, mem, e = U.fwd_and_fwd_bwd(fwd, (q, k, v), g, rounds=rounds, fwd_only=FWD_ONLY)
    return t_f, t_b, mem, {**errors, **e}


def mod_row(mod, t_f, t_b, mem):
    """The timing and memory columns of one modifier's row: its contender is 'ours', its
    peers go under their short names (sdpa, flex); a peer it lacks leaves its cells empty."""
    names = {"ours": mod, "plain": "plain", **{p.split("_")[0]: p for p in PEERS[mod]}}

    def view(t):
        return {short: t.get(name) for short, name in names.items()}

    return {**U.speed_columns(view(t_f), view(t_b), ("sdpa",), fwd_only=FWD_ONLY, ratios={"cost": ("ours", "plain")}),
            **U.memory_columns(view(mem), ("ours", "sdpa"))}


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks score_mods")
    p.add_argument("--rounds", type=int, default=3)
    opts = p.parse_args(rest)
    U.raise_recompile_limit()
    n = 512 if args.quick else 4096
    rounds = 1 if args.quick else opts.rounds
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        t_f, t_b, mem, errs = run_case(n, dtype, rounds)
        for mod in MODS:
            row = {"dtype": str(dtype).replace("torch.", ""), "N": n, "modifier": mod, **mod_row(mod, t_f, t_b, mem)}
            rows.append(row)
            U.print_row(row, {k: v for k, v in errs.items() if k in (mod, *PEERS[mod])})
    U.report(args, "score-mods",
             "score modifiers (ALiBi, attention sinks, dropout) vs plain flash_attention, SDPA (a dense ALiBi mask; "
             "dropout_p) and compiled FlexAttention with an ALiBi score_mod, causal, B=1 H=8 D=64",
             ("'ours' is flash_attention with the row's modifier (dropout: dropout_p=0.1); peer ratios are peer time / "
              "that time (> 1: ours faster). 'cost' is that time over plain flash_attention's, measured in the same "
              "interleaved rounds (1.0: free). Peers: ALiBi, SDPA with a dense (1, H, N, N) additive float mask and "
              "FlexAttention (forward only: no CPU backward); dropout, SDPA with the same dropout_p; sinks, none. "
              "Peak memory: forward+backward, process peak RSS above the start (MiB)."),
             rows)
