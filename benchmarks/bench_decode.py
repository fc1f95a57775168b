"""Decoding with a KV cache: attention_with_kvcache against SDPA the ways transformers' caches run it.

One step appends Nq new tokens per row to a cache of `context` tokens and attends over it:
Nq = 1 (a decoding step) and Nq = 128 (a prefill chunk). B in {1, 8}, context in {4096, 32768},
Hq=32, Hkv=8, D=128, bf16 and fp32. Ours: a contiguous cache (also with ALiBi, for its
cost), paged with pages of 16 and 256 (a shuffled page table), and a rolling cache of window
4096 (its ring holds 4096 + Nq slots, so it reads at most the window). Peers, interleaved in
the same rounds: SDPA over the concatenated cache (DynamicCache: `torch.cat` of the past and
the new keys every step) and SDPA over StaticCache's whole buffer (`index_copy_` of the new
keys, a mask of the written slots). Reported: time per step, tokens per second, and the K/V
bytes our contiguous step reads per second next to the machine's memory bandwidth measured in
the same run (a large tensor copy: bytes read + written per second). Then end to end: a tiny
transformers Mistral generating 256 tokens greedily on attention_ext and on sdpa.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import attention_ext as ae

from . import _util as U

HQ, HKV, D = 32, 8, 128
GEN_ROOM = 512  # StaticCache's buffer (and our contiguous cache) hold `context` + this many slots
WINDOW = 4096
CONTENDERS = ("ours", "alibi", "paged16", "paged256", "rolling", "sdpa_concat", "sdpa_static")
# per mode: cache lengths, batches, Nq (a decoding step, a prefill chunk), rounds, end-to-end tokens
SIZES = {"quick": dict(contexts=[512], batches=[1], chunks=(1, 16), rounds=1, new_tokens=16, e2e_rounds=1,
                       generated=(256, 1024)),
         "default": dict(contexts=[4096], batches=[1], chunks=(1, 128), rounds=3, new_tokens=64, e2e_rounds=1,
                         generated=(1024, 4096)),
         "full": dict(contexts=None, batches=None, chunks=(1, 128), rounds=None, new_tokens=256, e2e_rounds=3,
                      generated=(1024, 4096, 16384))}
# the rolling-memory table: one layer, B=1, Hkv=2, D=32, window 256, one token per step
ROLL = dict(heads=8, dim=128, window=256)


def copy_bandwidth(device, nbytes, rounds):
    """GB/s of a large tensor copy (bytes read + written): decode's roof, measured here."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    best, _ = U.interleaved({"copy": lambda: y.copy_(x)}, rounds=rounds, device=device)
    return 2 * nbytes / best["copy"] / 1e9


def bottom_right_causal(nq, nk, device):
    """Bool (nq, nk): query i sits at key position nk - nq + i."""
    i = torch.arange(nq, device=device).view(-1, 1) + (nk - nq)
    return torch.arange(nk, device=device).view(1, -1) <= i


def paged(cache, table):
    """The contiguous cache (B, H, N, D) as a pool of pages laid out by `table` (B, N / page_size)."""
    B, H, N, Dh = cache.shape
    pages = table.shape[1]
    size = N // pages
    pool = torch.empty(B * pages, H, size, Dh, dtype=cache.dtype, device=cache.device)
    pool[table.flatten().long()] = cache.view(B, H, pages, size, Dh).transpose(1, 2).reshape(B * pages, H, size, Dh)
    return pool


def ring(cache, context, slots):
    """The last `slots` positions before `context` of a contiguous cache, in ring order
    (position p in slot p % slots)."""
    pos = torch.arange(max(0, context - slots), context, device=cache.device)
    out = torch.zeros(*cache.shape[:2], slots, cache.shape[3], dtype=cache.dtype, device=cache.device)
    out[:, :, pos % slots] = cache[:, :, pos]
    return out


def run_case(dtype, B, context, nq, rounds, device, gen):
    n_cache = context + GEN_ROOM
    kc, vc = (torch.randn(B, HKV, n_cache, D, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(B, HQ, nq, D, device=device, dtype=dtype)
    k, v = (torch.randn(B, HKV, nq, D, device=device, dtype=dtype) for _ in range(2))
    seqlens = torch.full((B,), context, dtype=torch.int32, device=device)
    slots = torch.arange(context, context + nq, device=device)
    tables = {size: torch.randperm(B * n_cache // size, generator=gen).view(B, -1).to(torch.int32).to(device)
              for size in (16, 256)}  # shuffled pages
    kr, vr = ring(kc, context, WINDOW + nq), ring(vc, context, WINDOW + nq)
    past_k, past_v = kc[:, :, :context].contiguous(), vc[:, :, :context].contiguous()  # DynamicCache's tensors
    static_mask = torch.zeros(B, 1, nq, n_cache, dtype=torch.bool, device=device)
    static_mask[..., :context + nq] = bottom_right_causal(nq, context + nq, device)
    concat_mask = None if nq == 1 else bottom_right_causal(nq, context + nq, device)

    def ours(kcache, vcache, table=None, rolling=False, alibi=None):
        return lambda: ae.attention_with_kvcache(q, kcache, vcache, seqlens, k=k, v=v, block_table=table,
                                                 rolling=rolling, window=WINDOW if rolling else None,
                                                 alibi_slopes=alibi)

    def sdpa_concat():
        K, V = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
        return F.scaled_dot_product_attention(q, K, V, attn_mask=concat_mask, enable_gqa=True)

    def sdpa_static():
        kc.index_copy_(2, slots, k)
        vc.index_copy_(2, slots, v)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=static_mask, enable_gqa=True)

    fns = {"ours": ours(kc, vc), "alibi": ours(kc, vc, alibi=ae.alibi_slopes(HQ).to(device))}
    fns.update({f"paged{size}": ours(paged(kc, t), paged(vc, t), t) for size, t in tables.items()})
    fns.update(rolling=ours(kr, vr, rolling=True), sdpa_concat=sdpa_concat, sdpa_static=sdpa_static)
    outs = {}

    def keeping(name, fn):  # the last output of each contender, to compare them
        return lambda: outs.__setitem__(name, fn())

    with torch.no_grad():
        times, errors = U.interleaved({n: keeping(n, f) for n, f in fns.items()}, rounds=rounds, device=device)
    outs = {n: o.float() for n, o in outs.items()}
    same = [n for n in ("paged16", "paged256", "sdpa_concat", "sdpa_static") if n in outs and "ours" in outs]
    if context + nq <= WINDOW + 1 and "rolling" in outs:  # the window covers the whole history
        same.append("rolling")
    diff = max(((outs[n] - outs["ours"]).abs().max().item() for n in same), default=None)
    return times, diff, errors


def kv_bytes(dtype, B, keys):
    return B * HKV * keys * 2 * D * torch.empty((), dtype=dtype).element_size()


def end_to_end(device, new_tokens, rounds):
    """A tiny transformers Mistral (4 layers, hidden 256, 8 query / 2 KV heads of 32,
    sliding_window 128), batch 1, a 32-token prompt, greedy: tokens/s on each
    implementation with the default (dynamic) cache and with cache_implementation="static"."""
    import attention_ext.hf  # noqa: F401  (registers "attention_ext")
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=32, sliding_window=128,
                        max_position_embeddings=4096)
    torch.manual_seed(0)
    models = {impl: AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).to(device).eval()
              for impl in ("attention_ext", "sdpa")}
    models["sdpa"].load_state_dict(models["attention_ext"].state_dict())
    ids = torch.randint(1, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for cache in (None, "static"):
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  cache_implementation=cache)
        seqs = {}

        def gen(impl):
            def run():
                seqs[impl] = models[impl].generate(ids, **kw)
            return run

        with torch.no_grad():
            times, errors = U.interleaved({impl: gen(impl) for impl in models}, rounds=rounds, device=device)
        row = {"cache": cache or "dynamic", "new tokens": new_tokens}
        for impl in models:
            row[f"{impl} tok/s"] = new_tokens / times[impl] if times[impl] else None
        row["sdpa/ours"] = U.ratio(times, "sdpa", "attention_ext")
        row["same tokens"] = ("yes" if len(seqs) == 2 and torch.equal(seqs["attention_ext"], seqs["sdpa"])
                              else "no")
        if errors:
            row["notes"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
        rows.append(row)
        U.print_row(row, errors)
    return rows


def rolling_memory(lengths):
    """Generating T tokens one at a time through KVCache: a rolling cache's buffers and the
    process's peak memory stay the same for every T; a contiguous cache's grow with T."""
    rows = []
    h, d, w = ROLL["heads"], ROLL["dim"], ROLL["window"]
    x = torch.randn(1, h, 1, d)
    warm = ae.KVCache(1, h, d, num_layers=1, chunk=1, windows=w)  # first-call allocations out of the table
    ae.attention_with_kvcache(x, **warm.update(0, x, x), causal=True)
    for t in lengths:
        row = {"generated tokens": t}
        for name, kw in (("rolling", dict(max_len=None, windows=w, rolling=True)),
                         ("contiguous", dict(max_len=t, windows=w, rolling=False))):
            held = []

            def generate():
                cache = ae.KVCache(1, h, d, num_layers=1, chunk=1, **kw)
                for _ in range(t):
                    ae.attention_with_kvcache(x, **cache.update(0, x, x), causal=True)
                    cache.advance(1)
                held.append(cache.nbytes())

            row[f"{name} peak MiB"] = U.peak_memory_mb(generate)
            row[f"{name} cache MiB"] = held[0] / 2**20
        rows.append(row)
        U.print_row(row)
    return rows


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks decode")
    p.add_argument("--rounds", type=int, default=None, help="default: the mode's (--full: 5)")
    # "--batches 1 8" and "--batches 1,8" alike; given flags win over the mode's sizes
    p.add_argument("--contexts", nargs="+", default=None, help="--full: 4096,32768 (default: 4096, quick: 512)")
    p.add_argument("--batches", nargs="+", default=None, help="--full: 1,8 (default, quick: 1)")
    opts = p.parse_args(rest)
    device = args.device
    quick = args.quick

    def ints(values):
        return [int(x) for v in values for x in v.split(",") if x]

    size = U.sized(args, SIZES)
    contexts = ints(opts.contexts) if opts.contexts else size["contexts"] or [4096, 32768]
    batches = ints(opts.batches) if opts.batches else size["batches"] or [1, 8]
    chunks = size["chunks"]
    rounds = opts.rounds or size["rounds"] or 5
    t_start = time.perf_counter()
    bw = copy_bandwidth(device, (64 if quick else 1024) << 20, rounds=max(rounds, 3))
    U.say(f"copy bandwidth {bw:.1f} GB/s (read + write)")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)  # the page shuffles
    rows = []
    cases = [(dtype, B, context, nq) for dtype in (torch.bfloat16, torch.float32) for B in batches
             for context in contexts for nq in chunks]
    for dtype, B, context, nq in U.progress(cases, lambda c: f"{str(c[0])[6:]} B={c[1]} context={c[2]} Nq={c[3]}",
                                            cost=lambda c: c[1] * c[2] * (1 + c[3] / 32)):
        times, diff, errors = run_case(dtype, B, context, nq, rounds, device, gen)
        t = times.get("ours")
        read = kv_bytes(dtype, B, context + nq)
        row = {"dtype": str(dtype).replace("torch.", ""), "B": B, "context": context, "Nq": nq}
        row.update({f"{n} ms": (times[n] * 1e3 if times.get(n) else None) for n in times})
        row["concat/ours"] = U.ratio(times, "sdpa_concat")
        row["static/ours"] = U.ratio(times, "sdpa_static")
        row["alibi/ours"] = U.ratio(times, "alibi")
        row["ours tok/s"] = B * nq / t if t else None
        row["ours K/V GB/s"] = read / t / 1e9 if t else None
        row["% of copy"] = 100 * read / t / 1e9 / bw if t else None
        row["max diff vs ours"] = None if diff is None else f"{diff:.1e}"  # not rounded to 0.00
        if errors:
            row["notes"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
        rows.append(row)
        U.print_row(row, errors)
    e2e = end_to_end(device, size["new_tokens"], rounds=size["e2e_rounds"])
    roll = rolling_memory(size["generated"]) if device == "cpu" else []
    cols = ["dtype", "B", "context", "Nq", "ours ms", "paged16 ms", "paged256 ms", "rolling ms", "sdpa_concat ms",
            "sdpa_static ms", "concat/ours", "static/ours", "alibi/ours", "ours tok/s", "ours K/V GB/s", "% of copy",
            "max diff vs ours"]
    if any("notes" in r for r in rows):
        cols.append("notes")
    import transformers

    notes = (f"Hq={HQ}, Hkv={HKV}, D={D}; a step appends Nq tokens per row to `context` cached ones and attends "
             f"over all of them (causal). `ours`: a contiguous cache of context + {GEN_ROOM} slots; `paged16` / "
             f"`paged256`: the same keys in shuffled pages; `rolling`: a ring of {WINDOW} + Nq slots, window "
             f"({WINDOW}, 0), so at context > {WINDOW} it reads less than the others (a different function there). "
             "`sdpa_concat`: DynamicCache's way, `torch.cat` of past and new keys, then SDPA (a bottom-right causal "
             "mask for Nq > 1); `sdpa_static`: StaticCache's way, `index_copy_` into the buffer, then SDPA over the "
             "whole buffer with a mask of the written slots (mask built once, not per step). Ratios: peer time / "
             "our contiguous time (> 1: ours faster); `alibi/ours`: the cost of ALiBi, the contiguous step with "
             "`alibi_slopes` (the paper's slopes) over the plain one (target <= 1.10). K/V GB/s: the bytes of the keys and values a contiguous step "
             f"must read, per second; the machine's copy bandwidth measured in this run: {bw:.1f} GB/s (read + "
             "written). `max diff vs ours`: the largest difference of the paged, SDPA (and, where the window "
             "covers the context, rolling) outputs from ours. Best of rounds, interleaved. "
             f"{(time.perf_counter() - t_start) / 60:.1f} minutes.")
    body = U.header("Decoding with a KV cache: attention_with_kvcache vs SDPA", U.command_line()) + "\n"
    body += notes + "\n\n" + U.table(rows, cols) + "\n\n"
    body += (f"End to end (transformers {transformers.__version__}): a tiny Mistral (4 layers, hidden 256, 8 query "
             "/ 2 KV heads of dim 32, sliding_window 128, fp32) generating greedily from a 32-token prompt, "
             "batch 1; tokens/s of the whole `generate` call, best of rounds.\n\n")
    body += U.table(e2e, list(e2e[0].keys()))
    if roll:
        body += (f"\n\nMemory against the generated length: one layer, B=1, Hkv={ROLL['heads']}, D={ROLL['dim']}, "
                 f"window {ROLL['window']}, fp32, T tokens generated one at a time through `KVCache` and "
                 "`attention_with_kvcache`. `cache MiB`: the K/V buffers (`KVCache.nbytes()`); `peak MiB`: the "
                 "process's peak RSS above the start while allocating the cache and generating. The rolling ring holds window + 1 slots "
                 "whatever T; the contiguous cache holds T.\n\n")
        body += U.table(roll, list(roll[0].keys()))
    U.publish(args, "decode", body)
