"""Padded batches: our kernels with key_mask vs SDPA with the dense boolean mask (what the
transformers integration ran for a padded batch before key_mask), and ours on the same
batch without padding (what the mask costs).

Causal, B=2, H=8, D=64; the second sequence has a quarter of left padding (batched
generation), the first none. fp32 and bf16, N = 2048 and 8192.
"""

import argparse

import torch
import torch.nn.functional as F

import attention_ext as ae

from . import _util as U

CONTENDERS = ("ours", "ours unpadded", "sdpa")
SIZES = {"quick": [256, 512], "default": [1024, 2048, 4096], "full": [2048, 8192]}


def run_case(n, dtype, rounds):
    q, k, v = (torch.randn(2, 8, n, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 8, n, 64, dtype=dtype)
    key_mask = torch.ones(2, n, dtype=torch.bool)
    key_mask[1, : n // 4] = False
    fwd = {
        "ours": lambda: ae.flash_attention(q, k, v, causal=True, key_mask=key_mask),
        "ours unpadded": lambda: ae.flash_attention(q, k, v, causal=True),
    }

    def sdpa():
        # built per call, as a model does per forward
        mask = torch.ones(n, n, dtype=torch.bool).tril() & key_mask.view(2, 1, 1, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    fwd["sdpa"] = sdpa
    return U.fwd_and_fwd_bwd(fwd, (q, k, v), g, rounds=rounds)


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks padding")
    p.add_argument("--rounds", type=int, default=None)
    opts = p.parse_args(rest)
    rounds = opts.rounds or {"quick": 1, "default": 2}.get(U.mode(args), 3)
    cases = [(dtype, n) for dtype in (torch.float32, torch.bfloat16) for n in U.sized(args, SIZES)]
    rows = []
    for dtype, n in U.progress(cases, lambda c: f"{str(c[0])[6:]} N={c[1]}", cost=lambda c: c[1] ** 2):
        t_f, t_b, mem, errs = run_case(n, dtype, rounds)
        row = {
            "dtype": str(dtype).replace("torch.", ""), "N": n,
            **U.speed_columns(t_f, t_b, ("sdpa",), ratios={"unpadded/ours": ("ours unpadded", "ours")}),
            **U.memory_columns(mem, ("ours", "sdpa")),
        }
        rows.append(row)
        U.print_row(row, errs)
    U.report(args, "padding",
             "padded batch (causal, B=2, 1/4 left padding in one sequence) with key_mask vs SDPA with the "
             "dense boolean mask, H=8 D=64",
             ("Ratios are peer time / our time (> 1: ours faster). 'unpadded/ours' compares our run without "
              "key_mask on the same batch: above 1 means the padded run is faster (its fully padded key tiles are "
              "skipped). SDPA's mask is built inside the timed call, as a model builds it per forward. Peak "
              "memory: forward+backward, process peak RSS above the start (MiB)."),
             rows)
