"""Train a small byte-level causal LM whose layers alternate local and global attention,
on attention_ext and then on PyTorch SDPA, and compare them.

    python examples/train_alternating_lm.py                       # attention_ext.nn.TransformerLM, pattern LG
    python examples/train_alternating_lm.py --pattern LLLLLG --layers 6 --seq 1024 --window 128
    python examples/train_alternating_lm.py --impl hf             # a transformers Qwen2, alternate()d
    python examples/train_alternating_lm.py --tiny                # a few seconds (the test suite runs this)

Data: the text files of this repository (README, sources, docs; nothing is downloaded),
read as bytes (vocabulary 256), the last 10% held out for validation. Both runs start
from the same weights and see the same batches, so their losses agree up to rounding;
the comparison is tokens/s and peak memory. Logs loss, tokens/s and peak memory as it
goes (tqdm progress bar when installed) and ends with one comparison line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import attention_ext.nn as aenn  # noqa: E402
from benchmarks._memory import Peak  # noqa: E402  (one way to measure peak memory)

TEXT_SUFFIXES = {".md", ".py", ".txt", ".toml", ".cpp", ".h", ".cu", ".cuh", ".sh"}


def load_corpus(paths=None):
    """Bytes of the given files, or of every text file of the repository."""
    if paths:
        files = [Path(p) for p in paths]
    else:
        skip = {".git", ".venv", "venv", "build", "__pycache__", ".pytest_cache", ".hypothesis"}
        files = sorted(p for p in ROOT.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                       and not skip.intersection(p.relative_to(ROOT).parts))
    data = b"\n".join(f.read_bytes() for f in files)
    if len(data) < 4096:
        raise SystemExit(f"corpus too small ({len(data)} bytes)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), len(files)


class Batches:
    """Seeded random windows of seq + 1 bytes; the same sequence for every run."""

    def __init__(self, data, batch, seq, seed):
        self.data, self.batch, self.seq = data, batch, seq
        self.gen = torch.Generator().manual_seed(seed)

    def __next__(self):
        start = torch.randint(0, len(self.data) - self.seq - 1, (self.batch,), generator=self.gen)
        chunk = torch.stack([self.data[s: s + self.seq + 1] for s in start.tolist()])
        return chunk[:, :-1], chunk[:, 1:]


def build_model(args, backend):
    torch.manual_seed(args.seed)
    if args.impl == "nn":
        return aenn.TransformerLM(256, args.dim, args.heads, pattern=args.pattern, num_layers=args.layers,
                                  num_kv_heads=args.kv_heads, window=args.window - 1, backend=backend)
    import attention_ext.hf as aehf
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=256, hidden_size=args.dim, intermediate_size=4 * args.dim,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(4096, args.seq), tie_word_embeddings=True)
    aehf.alternate(cfg, args.pattern, window=args.window)
    impl = "attention_ext" if backend == "attention_ext" else "sdpa"
    return HFWrapper(AutoModelForCausalLM.from_config(cfg, attn_implementation=impl))


class HFWrapper(torch.nn.Module):
    """(idx, targets) -> (logits, loss) for a transformers causal LM (targets already shifted)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets=None):
        logits = self.model(input_ids=idx, use_cache=False).logits
        loss = None
        if targets is not None:
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return logits, loss


def progress(total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and enabled:
        return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stdout)
    return None


@torch.no_grad()
def evaluate(model, data, args):
    model.eval()
    batches = Batches(data, args.batch, args.seq, seed=1234)
    losses = [model(*next(batches))[1].item() for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def optimizer_step(model, opt, x, y, device):
    """One training step (gradients clipped to norm 1): (loss, seconds)."""
    t0 = time.perf_counter()
    _, loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - t0


def train(args, backend, train_data, val_data):
    model = build_model(args, backend).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    batches = Batches(train_data, args.batch, args.seq, seed=args.seed)
    log = []
    bar = progress(args.steps, f"{backend:>13}", not args.no_progress)
    tokens, elapsed = 0, 0.0
    with Peak(args.device) as peak:
        for step in range(1, args.steps + 1):
            lr = args.lr * min(1.0, step / max(1, args.warmup)) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            for g in opt.param_groups:
                g["lr"] = max(lr, args.lr * 0.05)
            x, y = (t.to(args.device) for t in next(batches))
            loss, seconds = optimizer_step(model, opt, x, y, args.device)
            elapsed += seconds
            tokens += x.numel()
            log.append(loss)
            tps = tokens / elapsed
            if bar is not None:
                bar.set_postfix(loss=f"{log[-1]:.3f}", tok_s=f"{tps:,.0f}", peak_MiB=f"{peak.read() or 0:.0f}")
                bar.update(1)
            elif step == 1 or step % args.log_every == 0 or step == args.steps:
                print(f"[{backend}] step {step:5d}/{args.steps}  loss {log[-1]:.4f}  tokens/s {tps:,.0f}  "
                      f"peak {peak.read() or 0:.0f} MiB", flush=True)
        peak_mb = peak.read()
    if bar is not None:
        bar.close()
    val = evaluate(model, val_data, args) if args.eval_batches else None
    k = max(1, min(10, len(log) // 4))
    result = {"backend": backend, "first_loss": sum(log[:k]) / k, "last_loss": sum(log[-k:]) / k, "losses": log,
              "val_loss": val, "tokens_per_s": tokens / elapsed, "peak_mb": peak_mb,
              "params": sum(p.numel() for p in model.parameters())}
    print(f"[{backend}] loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} (mean of first/last {k} steps)"
          + (f", validation {val:.3f}" if val is not None else "")
          + f", {result['tokens_per_s']:,.0f} tokens/s, peak {peak_mb or 0:.0f} MiB", flush=True)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["nn", "hf"], default="nn",
                   help="attention_ext.nn.TransformerLM, or a transformers Qwen2 converted with attention_ext.hf.alternate")
    p.add_argument("--pattern", default="LG", help="layer pattern: L local, G global (nn also R linear)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--window", type=int, default=64, help="keys a local layer sees, itself included")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--corpus", nargs="*", help="text files to train on (default: this repository's text files)")
    p.add_argument("--no-compare", action="store_true", help="skip the SDPA run")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--tiny", action="store_true", help="a few-second smoke run (the test suite's)")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.dim, args.heads, args.kv_heads = 2, 32, 2, 1
        args.seq, args.batch, args.window, args.steps, args.warmup, args.eval_batches = 64, 4, 16, 12, 2, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, nfiles = load_corpus(args.corpus)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    print(f"corpus: {len(data):,} bytes from {nfiles} files; model {args.impl}, pattern {args.pattern.upper()} x "
          f"{args.layers} layers, dim {args.dim}, heads {args.heads}/{args.kv_heads}, window {args.window}, "
          f"seq {args.seq}, batch {args.batch}, {args.steps} steps on {args.device} "
          f"({torch.get_num_threads()} threads, pid {os.getpid()})", flush=True)
    results = {"attention_ext": train(args, "attention_ext", train_data, val_data)}
    if not args.no_compare:
        results["sdpa"] = train(args, "sdpa", train_data, val_data)
    ours = results["attention_ext"]
    fell = ours["last_loss"] < ours["first_loss"]
    print(f"loss {'fell' if fell else 'DID NOT FALL'}: {ours['first_loss']:.3f} -> {ours['last_loss']:.3f}")
    if "sdpa" in results:
        s = results["sdpa"]
        mem = (f"peak {ours['peak_mb']:.0f} vs {s['peak_mb']:.0f} MiB"
               if ours["peak_mb"] is not None and s["peak_mb"] is not None else "peak memory n/a")
        print(f"attention_ext vs sdpa: final loss {ours['last_loss']:.4f} vs {s['last_loss']:.4f}, "
              f"tokens/s {ours['tokens_per_s']:,.0f} vs {s['tokens_per_s']:,.0f} "
              f"({ours['tokens_per_s'] / s['tokens_per_s']:.2f}x), {mem}", flush=True)
    return results


if __name__ == "__main__":
    main()
