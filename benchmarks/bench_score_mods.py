"""Score modifiers: ALiBi (alibi_slopes) and attention sinks (sinks) in our kernels, what
each costs against plain flash_attention, and what a user runs instead for ALiBi.

"ours" is flash_attention with ALiBi, "plain" without any modifier, "sinks" with sinks
only. Peers (ALiBi): SDPA with a dense additive ALiBi float mask (forward and backward;
N x N) and compiled FlexAttention with an ALiBi score_mod and a causal block mask (forward
only: no CPU backward). B=1, H=8, D=64, causal, fp32 and bf16, N=4096 (--quick: 512).
"""

import argparse

import torch

import attention_ext as ae

from . import _util as U

H = 8
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
    q, k, v = (torch.randn(1, H, n, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, 64, dtype=dtype)
    slopes = ae.alibi_slopes(H)
    sinks = torch.randn(H)
    fwd = {
        "ours": lambda: ae.flash_attention(q, k, v, causal=True, alibi_slopes=slopes),
        "plain": lambda: ae.flash_attention(q, k, v, causal=True),
        "sinks": lambda: ae.flash_attention(q, k, v, causal=True, sinks=sinks),
    }
    errors = {}
    mask = alibi_mask(n, slopes, dtype)
    fwd["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def flex():
        fx = flex_fn(n, slopes)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        return lambda: fx(qd, kd, vd)

    U.add_peer(fwd, errors, "flex", flex)
    t_f, t_b, mem, e = U.fwd_and_fwd_bwd(fwd, (q, k, v), g, rounds=rounds, fwd_only=("flex",))
    return t_f, t_b, mem, {**errors, **e}


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks score_mods")
    p.add_argument("--rounds", type=int, default=3)
    opts = p.parse_args(rest)
    U.keep_heap()
    U.raise_recompile_limit()
    n = 512 if args.quick else 4096
    rounds = 1 if args.quick else opts.rounds
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        t_f, t_b, mem, errs = run_case(n, dtype, rounds)
        row = {
            "dtype": str(dtype).replace("torch.", ""), "N": n,
            **U.speed_columns(t_f, t_b, ("sdpa",), fwd_only=("flex",),
                              ratios={"alibi cost": ("ours", "plain"), "sinks cost": ("sinks", "plain")}),
            **U.memory_columns(mem, ("ours", "sdpa")),
        }
        rows.append(row)
        U.print_row(row, errs)
    U.report(args, "score-mods",
             "score modifiers (ALiBi, attention sinks) vs plain flash_attention, SDPA with a dense ALiBi mask and "
             "compiled FlexAttention with an ALiBi score_mod, causal, B=1 H=8 D=64",
             ("'ours' is flash_attention with ALiBi; peer ratios are peer time / that time (> 1: ours faster). "
              "'alibi cost' and 'sinks cost' are our time with ALiBi / with sinks over plain flash_attention (1.0: "
              "free). SDPA gets a dense (1, H, N, N) additive float mask; FlexAttention runs forward only (no CPU "
              "backward). Peak memory: forward+backward, process peak RSS above the start (MiB)."),
             rows)
