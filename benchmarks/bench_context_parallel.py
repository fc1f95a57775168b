"""Context parallelism on this machine: 1 rank against 2 ranks (gloo on 127.0.0.1, one
thread each) for a causal sliding window (N=65536, w=512) and full causal attention
(N=16384), B=1 H=8 D=64 fp32, forward and forward+backward.

Strategies on 2 ranks: the baseline all-gather K/V then local attention, our halo exchange
(windows), ring (contiguous and zigzag) and Ulysses (all_to_all). Each rank's time is the
slowest rank's (an all_reduce max after a barrier per call); bytes are those one rank sends
for one forward+backward (the most of any rank). ``--sizes WN,FN`` runs small.
"""

import argparse
import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attention_ext as ae
from attention_ext import distributed as cp

from . import _util as U

B, H, D = 1, 8, 64
CONTENDERS = ("1 rank (local)", "all-gather K/V", "halo", "ring", "ring zigzag", "ulysses")
SIZES = {"quick": "2048,1024", "default": "8192,2048", "full": "65536,16384"}  # the window case's N, the full case's


def _strategies(kind, w, group):
    """name -> fn(q, k, v) on this rank's shards (contiguous unless the name says zigzag)."""
    rank = dist.get_rank(group)

    def gathered(q, k, v):  # the baseline: every rank gathers all K/V, keeps the causal prefix it needs
        n = q.shape[2]
        kf, vf = (cp.gather_sequence(t, group)[:, :, :(rank + 1) * n] for t in (k, v))
        if kind == "window":
            return ae.sliding_window_attention(q, kf, vf, w, causal=True)
        return ae.flash_attention(q, kf, vf, causal=True)

    fns = {"all-gather K/V": gathered}
    if kind == "window":
        fns["halo"] = lambda q, k, v: cp.sliding_window_attention(q, k, v, w, group=group, causal=True)
        fns["ulysses"] = lambda q, k, v: cp.ulysses_attention(q, k, v, group=group, attn=ae.sliding_window_attention,
                                                              window=w, causal=True)
    else:
        fns["ring"] = lambda q, k, v: cp.ring_attention(q, k, v, group=group, causal=True)
        fns["ring zigzag"] = lambda q, k, v: cp.ring_attention(q, k, v, group=group, causal=True, layout="zigzag")
        fns["ulysses"] = lambda q, k, v: cp.ulysses_attention(q, k, v, group=group, causal=True)
    return fns


def _local(kind, w):
    if kind == "window":
        return lambda q, k, v: ae.sliding_window_attention(q, k, v, w, causal=True)
    return lambda q, k, v: ae.flash_attention(q, k, v, causal=True)


def _timed(fn, inputs, grad):
    def f():
        with torch.no_grad():
            fn(*inputs)

    def fb():
        torch.autograd.grad(fn(*inputs), inputs, grad)

    return f, fb


def _slowest_rank(call):
    """Seconds of one call, started together (barrier), on the slowest rank."""
    dist.barrier()
    t0 = time.perf_counter()
    call()
    el = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(el, op=dist.ReduceOp.MAX)
    return el.item()


def _worker(rank, path, cases, rounds, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/rdzv", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=1800))
    group = dist.group.WORLD
    rows = []
    for kind, n_full, w in cases:
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(B, H, n_full, D, generator=g) for _ in range(4)]
        if rank == 0:  # one rank alone on the whole sequence (the other waits at the barrier)
            inputs = [t.clone().requires_grad_() for t in full[:3]]
            f, fb = _timed(_local(kind, w), inputs, full[3])
            t, _ = U.interleaved({"fwd": f, "f+b": fb}, rounds=rounds)
            rows.append(dict(kind=kind, N=n_full, window=w, strategy="1 rank (local)", ranks=1, fwd=t["fwd"],
                             fb=t["f+b"], sent=0))
        dist.barrier()
        for name, fn in _strategies(kind, w, group).items():
            layout = "zigzag" if "zigzag" in name else "contiguous"
            inputs = [cp.shard_sequence(t, group, layout).clone().requires_grad_() for t in full[:3]]
            f, fb = _timed(fn, inputs, cp.shard_sequence(full[3], group, layout))
            with cp.count_sent_bytes() as sent:
                fb()
            f()  # warm-up (fb ran above)
            times = {tag: min(_slowest_rank(call) for _ in range(rounds)) for tag, call in (("fwd", f), ("f+b", fb))}
            nbytes = torch.tensor([float(sent["p2p"] + sent["collective"])], dtype=torch.float64)
            dist.all_reduce(nbytes, op=dist.ReduceOp.MAX)
            rows.append(dict(kind=kind, N=n_full, window=w, strategy=name, ranks=2, fwd=times["fwd"], fb=times["f+b"],
                             sent=nbytes.item()))
            if rank == 0:
                r = rows[-1]
                U.print_row({"kind": kind, "N": n_full, "window": w, "strategy": name, "fwd ms": r["fwd"] * 1e3,
                             "f+b ms": r["fb"] * 1e3, "sent MiB/rank": r["sent"] / 2**20})
    if rank == 0:
        torch.save(rows, results)
    dist.destroy_process_group()


NOTES = """Per-rank volume sent, P ranks, shard n = N / P, s bytes per element, kv = B Hkv (D + Dv) s per \
position (forward; the backward sends the same again unless noted):

- all-gather K/V: (P - 1) n kv (the backward's all_reduce of dK/dV: 2 (P - 1) N kv / P).
- ring: (P - 1) n kv; backward (P - 1) n kv plus P dK/dV shards (fp32). Grows with N, constant in P per rank.
- halo (window (L, R), dilation d): at most (L + R) d kv, independent of N and P (whole halo while \
(L + R) d <= n, then from several neighbours).
- Ulysses: (P - 1) / P of the q, k, v shards and of the output shard: (P - 1) n (B Hq (D + Dv) s + kv) / P.
- linear (state scan): P B Hkv (D Dv + D) 4 bytes per pass, independent of N.

Here gloo moves bytes through loopback TCP with one thread per rank, so the ring's overlap of \
send and compute is partial and latency per message is ~100 us; on NCCL (NVLink/IB) the ring's P2P \
hides behind the block compute while N / P is large enough that a block's O(n^2 D) flops outlast \
its O(n D) bytes, Ulysses' all_to_all runs at bisection bandwidth, and the halo exchange becomes \
latency-bound (two small messages per layer). In larger groups, the ring's and all-gather's per-rank \
bytes stay ~N kv while compute per rank falls like N^2 / P^2 (communication-bound once n is small), \
the halo stays (L + R) d kv per rank while compute falls like n w (efficient until n ~ w), and \
Ulysses needs P | Hkv."""


def main(args, rest):
    p = argparse.ArgumentParser(prog="python -m benchmarks context_parallel")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--sizes", default=None, help="WN,FN: the window case's N and the full case's N "
                                                 "(--full 65536,16384; default 8192,2048; --quick 2048,1024)")
    p.add_argument("--window", type=int, default=512)
    opts = p.parse_args(rest)
    wn, fn_ = map(int, (opts.sizes or U.sized(args, SIZES)).split(","))
    w = min(opts.window, wn // 4)
    rounds = opts.rounds or {"quick": 1, "default": 2}.get(U.mode(args), 3)
    cases = [("window", wn, w), ("full", fn_, None)]
    torch.set_num_threads(1)  # as every rank (the header reports this process's threads)
    with tempfile.TemporaryDirectory() as path:
        results = os.path.join(path, "rows.pt")
        mp.start_processes(_worker, args=(path, cases, rounds, results), nprocs=2, start_method="spawn")
        rows = torch.load(results)
    base = {(r["kind"], r["N"]): r for r in rows if r["ranks"] == 1}
    gathered = {(r["kind"], r["N"]): r for r in rows if r["strategy"] == "all-gather K/V"}
    out = []
    for r in rows:
        key = (r["kind"], r["N"])
        out.append({"pattern": "causal window" if r["kind"] == "window" else "full causal", "N": r["N"],
                    "window": r["window"], "strategy": r["strategy"], "ranks": r["ranks"], "fwd ms": r["fwd"] * 1e3,
                    "f+b ms": r["fb"] * 1e3, "f+b speedup vs 1 rank": base[key]["fb"] / r["fb"],
                    "sent MiB/rank (f+b)": r["sent"] / 2 ** 20,
                    "sent / all-gather": r["sent"] / gathered[key]["sent"] if r["ranks"] > 1 else None})
    U.report(args, "context-parallel", f"Context parallelism, 1 vs 2 ranks (gloo, 1 thread each); B={B} H={H} "
             f"D={D} fp32", NOTES, out)
