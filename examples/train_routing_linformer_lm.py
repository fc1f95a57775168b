"""Train a small byte-level masked LM with one routing layer and one Linformer layer
(pattern "CP"), on attention_ext and then on PyTorch SDPA, and compare them.

    python examples/train_routing_linformer_lm.py                    # seq 1024, 8 clusters of 128
    python examples/train_routing_linformer_lm.py --pattern CPCP --seq 2048 --clusters 16 --window 128
    python examples/train_routing_linformer_lm.py --tiny             # a few seconds (the test suite runs this)

Linformer is bidirectional, so the model is too: a masked-byte objective (15% of the
bytes replaced by a mask token, the loss on those), not next-byte prediction, which a
bidirectional layer would read off its input. The routing layer has half its heads local
and half routed by k-means centroids that move in training only. Data, logging and the
comparison are those of train_alternating_lm.py: the repository's own text files, the
same weights and batches for both runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "examples"):  # run from a checkout without installing
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import attention_ext.nn as aenn  # noqa: E402
from benchmarks._memory import Peak  # noqa: E402
from train_alternating_lm import Batches, load_corpus, optimizer_step  # noqa: E402

MASK = 256  # the mask token, after the 256 bytes


class MaskedBatches(Batches):
    """Windows of ``seq`` bytes with a seeded 15% of them masked: (inputs, targets), the
    targets -100 where nothing is masked."""

    def __next__(self):
        x, _ = super().__next__()
        masked = torch.rand(x.shape, generator=self.gen) < 0.15
        return x.masked_fill(masked, MASK), x.masked_fill(~masked, -100)


def build_model(args, backend):
    torch.manual_seed(args.seed)
    return aenn.TransformerLM(257, args.dim, args.heads, pattern=args.pattern, num_kv_heads=args.kv_heads,
                              window=args.window, causal=False, backend=backend, num_clusters=args.clusters,
                              proj_len=args.proj_len, max_len=args.seq)


def train(args, backend, data):
    model = build_model(args, backend).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    batches = MaskedBatches(data, args.batch, args.seq, seed=args.seed)
    log, tokens, elapsed = [], 0, 0.0
    with Peak(args.device) as peak:
        for step in range(1, args.steps + 1):
            x, y = (t.to(args.device) for t in next(batches))
            loss, seconds = optimizer_step(model, opt, x, y, args.device)
            elapsed += seconds
            tokens += x.numel()
            log.append(loss)
            if step == 1 or step % args.log_every == 0 or step == args.steps:
                print(f"[{backend}] step {step:5d}/{args.steps}  loss {log[-1]:.4f}  tokens/s {tokens / elapsed:,.0f}  "
                      f"peak {peak.read() or 0:.0f} MiB", flush=True)
        peak_mb = peak.read()
    k = max(1, min(10, len(log) // 4))
    return {"backend": backend, "first_loss": sum(log[:k]) / k, "last_loss": sum(log[-k:]) / k, "losses": log,
            "tokens_per_s": tokens / elapsed, "peak_mb": peak_mb}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", default="CP", help="layer pattern: C routing, P linformer (also G, L)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4, help="even: half local, half routing")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024, help="also Linformer's max_len")
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--window", type=int, default=128, help="tokens per cluster, and the local heads' reach")
    p.add_argument("--proj-len", type=int, default=128, help="Linformer's projected length")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-compare", action="store_true", help="skip the SDPA run")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--tiny", action="store_true", help="a few-second smoke run (the test suite's)")
    args = p.parse_args(argv)
    if args.tiny:
        args.dim, args.heads, args.kv_heads, args.seq, args.batch = 32, 4, 2, 64, 4
        args.clusters, args.window, args.proj_len, args.steps = 4, 16, 16, 12
    return args


def main(argv=None):
    args = parse_args(argv)
    data, nfiles = load_corpus()
    print(f"corpus: {len(data):,} bytes from {nfiles} files; pattern {args.pattern.upper()}, dim {args.dim}, heads "
          f"{args.heads}/{args.kv_heads}, {args.clusters} clusters of {args.window}, proj_len {args.proj_len}, "
          f"seq {args.seq}, batch {args.batch}, {args.steps} steps on {args.device}", flush=True)
    results = {"attention_ext": train(args, "attention_ext", data)}
    if not args.no_compare:
        results["sdpa"] = train(args, "sdpa", data)
    ours = results["attention_ext"]
    fell = ours["last_loss"] < ours["first_loss"]
    print(f"loss {'fell' if fell else 'DID NOT FALL'}: {ours['first_loss']:.3f} -> {ours['last_loss']:.3f}")
    if "sdpa" in results:
        s = results["sdpa"]
        print(f"attention_ext vs sdpa: final loss {ours['last_loss']:.4f} vs {s['last_loss']:.4f}, tokens/s "
              f"{ours['tokens_per_s']:,.0f} vs {s['tokens_per_s']:,.0f}", flush=True)
    return results


if __name__ == "__main__":
    main()
