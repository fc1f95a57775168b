"""A small transformers model per layer pattern, on attention_ext vs the same model on SDPA.

A Qwen2 (native per-layer `layer_types`, so SDPA honours the pattern too: dense boolean
masks for its sliding layers, `is_causal` for the global ones) built with from_config:
6 layers, hidden 128, 2 query heads / 1 KV head of dim 64, MLP 256, byte vocabulary,
fp32, batch 1, sliding_window 512. Patterns all global (G), LG, LLLLLG and all local (L),
converted with attention_ext.hf.alternate. Measures forward+backward of the
cross-entropy loss (time and the process's peak RSS above the start) at N = 8k..32k.
"""

import argparse
import os
import time

import torch

from . import _util as U

PATTERNS = ("G", "LG", "LLLLLG", "L")
CONTENDERS = ("attention_ext", "sdpa")
SIZES = {"quick": dict(sizes=[512, 1024], patterns=("G", "LG"), rounds=0),
         "default": dict(sizes=[2048, 4096], patterns=None, rounds=1),
         "full": dict(sizes=None, patterns=None, rounds=None)}  # None: --sizes, --patterns, --rounds


def build(pattern, impl, window, n, device):
    import attention_ext.hf as aehf
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=n,
                      tie_word_embeddings=True)
    aehf.alternate(cfg, pattern, window=window)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).to(device).train()


def step_fn(model, ids):
    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    return run


def run_case(pattern, n, window, rounds, device, impls):
    ids = torch.randint(0, 256, (1, n), device=device)
    fns, models = {}, {}
    for impl in impls:
        models[impl] = build(pattern, impl, window, n, device)
        fns[impl] = step_fn(models[impl], ids)
    models["sdpa"].load_state_dict(models["attention_ext"].state_dict()) if "sdpa" in models else None
    times, mem, errors = {k: float("inf") for k in fns}, {}, {}
    for name, fn in fns.items():  # first call: warm-up and peak memory, timed too
        try:
            t0 = time.perf_counter()
            mem[name] = U.peak_memory_mb(fn, device)
            U.sync(device)
            times[name] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a failing peer is a result
            errors[name] = U.reason(e)
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            t0 = time.perf_counter()
            fn()
            U.sync(device)
            times[name] = min(times[name], time.perf_counter() - t0)
    return {k: (None if k in errors else v) for k, v in times.items()}, mem, errors


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks hf")
    p.add_argument("--rounds", type=int, default=1, help="timed calls after the warm-up (N < 32k)")
    p.add_argument("--sizes", default="8192,16384,32768")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (1 keeps a shared, loaded machine from stalling on thread barriers)")
    p.add_argument("--max-sdpa-mask-n", type=int, default=16384,
                   help="largest N at which SDPA runs patterns with local layers: its forward+backward with "
                        "dense N x N masks takes ~27 bytes x N^2 (1.8 GiB at 8k, ~28 GiB at 32k)")
    opts = p.parse_args(rest)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    load_start, t_start = os.getloadavg()[0], time.perf_counter()
    import attention_ext.hf  # noqa: F401  (registers "attention_ext")
    import transformers

    size = U.sized(args, SIZES)
    sizes = size["sizes"] or [int(s) for s in opts.sizes.split(",")]
    patterns = size["patterns"] or opts.patterns.split(",")
    rows = []
    for n, pattern in U.progress([(n, pt) for n in sizes for pt in patterns], lambda c: f"N={c[0]} pattern {c[1]}",
                                 cost=lambda c: c[0] ** 1.5):
        impls = ["attention_ext"]
        if "L" not in pattern or n <= opts.max_sdpa_mask_n:
            impls.append("sdpa")
        rounds = 0 if size["rounds"] == 0 or n >= 32768 else (size["rounds"] or opts.rounds)
        t0 = time.perf_counter()
        times, mem, errs = run_case(pattern, n, opts.window, rounds, args.device, impls)
        row = {
            "pattern": pattern, "N": n,
            "f+b ours s": times.get("attention_ext"), "f+b sdpa s": times.get("sdpa"),
            "sdpa/ours": (times["sdpa"] / times["attention_ext"]
                          if times.get("sdpa") and times.get("attention_ext") else None),
            "mem ours MiB": mem.get("attention_ext"), "mem sdpa MiB": mem.get("sdpa"),
            "calls": 1 + rounds,
        }
        if errs:
            row["notes"] = "; ".join(f"{k}: {v}" for k, v in errs.items())
        elif "sdpa" not in impls:
            row["notes"] = (f"sdpa not run: dense masks need ~{27 * n * n / 2**30:.0f} GiB here "
                            f"(--max-sdpa-mask-n {opts.max_sdpa_mask_n})")
        rows.append(row)
        skipped = {"sdpa": row["notes"]} if "sdpa" not in impls else None
        U.print_row({**row, "case s": time.perf_counter() - t0}, errs or skipped)
    cols = ["pattern", "N", "f+b ours s", "f+b sdpa s", "sdpa/ours", "mem ours MiB", "mem sdpa MiB", "calls"]
    if any("notes" in r for r in rows):
        cols.append("notes")
    U.report(args, "hf", "Layer patterns on a small transformers model (Qwen2): attention_ext vs SDPA, "
             "forward+backward",
             (f"transformers {transformers.__version__}. Qwen2 from_config: 6 layers, hidden 128, 2 query heads / "
              f"1 KV head of dim 64, MLP 256, vocabulary 256, fp32, batch 1, sliding_window {opts.window} "
              f"(a query sees {opts.window} keys, itself included); the pattern repeats over the 6 layers (G global, L local) "
              "and is set with `attention_ext.hf.alternate`. One step = forward, cross-entropy loss, backward. "
              "Time: best of `calls` calls (the first call also measures memory; N >= 32k runs one call). "
              f"1-minute load average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on "
              f"{os.cpu_count()} cores (a shared machine; other jobs ran alongside), "
              f"{(time.perf_counter() - t_start) / 60:.0f} minutes in all. "
              "Memory: the process's peak RSS above the start during one step (weights, activations, masks, "
              "gradients). SDPA runs the same weights with transformers' masks: `is_causal` for global layers and "
              "a dense N x N boolean mask for the sliding ones; attention_ext builds no mask."),
             rows, cols)
