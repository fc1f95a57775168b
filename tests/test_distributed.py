"""attention_ext.distributed on gloo (CPU, loopback): 2 and 4 ranks spawned once each, every
check run inside that spawn. Each rank compares its shard of the output and of dq/dk/dv
with the single-process op on the whole sequence (float64: the sums differ only in
order, so 1e-10 relative), and counts the bytes it sends against the theory."""

import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attention_ext as ae
from attention_ext import distributed as cp

TIMEOUT = datetime.timedelta(seconds=60)
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _full(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=F64) for s in shapes]


def _compare(dist_fn, ref_fn, full, group, layout="contiguous", what=""):
    """Runs dist_fn on this rank's shards and ref_fn on the whole sequences; compares this
    rank's output and gradients (of sum(out * w), w random and shared)."""
    shards = [cp.shard_sequence(x, group, layout).clone().requires_grad_() for x in full]
    ref_in = [x.clone().requires_grad_() for x in full]
    out = dist_fn(*shards)
    ref = ref_fn(*ref_in)
    (w,) = _full([ref.shape], 99)
    (ref * w).sum().backward()
    (out * cp.shard_sequence(w, group, layout)).sum().backward()
    torch.testing.assert_close(out, cp.shard_sequence(ref.detach(), group, layout), **TOL, msg=f"{what} out")
    for name, s, r in zip("qkv", shards, ref_in):
        torch.testing.assert_close(s.grad, cp.shard_sequence(r.grad, group, layout), **TOL,
                                   msg=f"{what} d{name}")


def _nbytes(*shapes):
    return sum(torch.Size(s).numel() for s in shapes) * 8


def check_ring(P, r, group):
    for i, (B, Hq, Hkv, n, D, Dv, causal, layout, softcap) in enumerate([
            (1, 2, 1, 6, 8, 8, True, "contiguous", None), (2, 2, 2, 4, 4, 6, False, "contiguous", 5.0),
            (1, 4, 2, 6, 8, 8, True, "zigzag", None), (1, 1, 1, 2, 4, 4, False, "zigzag", None)]):
        N = n * P
        full = _full([(B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, Dv)], i)
        with cp.count_sent_bytes() as sent:
            _compare(lambda q, k, v: cp.ring_attention(q, k, v, group=group, causal=causal, softcap=softcap,
                                                       layout=layout),
                     lambda q, k, v: ae.flash_attention(q, k, v, causal=causal, softcap=softcap), full, group, layout,
                     what=f"ring {i}")
        kv = _nbytes((B, Hkv, n, D), (B, Hkv, n, Dv))
        # forward: P - 1 K/V shards; backward: P - 1 K/V shards and P dK/dV shards (none alone)
        assert sent["p2p"] == (P - 1) * kv + (P - 1) * kv + (P if P > 1 else 0) * kv, (sent, kv)


def _errors(fn, full, group, layout, dtype):
    """Max abs error vs the float64 result of fn, of out and dq, dk, dv, for fn on the
    whole sequence in dtype (this rank's shard of it) and on this rank's shards."""
    (w,) = _full([(full[0].shape[0], full[0].shape[1], full[0].shape[2], full[2].shape[-1])], 98)

    def run(xs, shard):
        xs = [x.detach().to(dtype).clone().requires_grad_() for x in xs]
        out = fn(*xs)
        ww = cp.shard_sequence(w, group, layout) if shard else w
        (out.double() * ww).sum().backward()
        res = [out.detach()] + [x.grad for x in xs]
        return [t if shard else cp.shard_sequence(t, group, layout) for t in res]

    return run


def check_lowp(P, r, group):
    """float32 / bfloat16: the sharded result's error vs float64 is at most twice the
    single-process op's in the same dtype (plus a rounding unit)."""
    cases = [("ring", "zigzag", lambda g: (lambda q, k, v: cp.ring_attention(q, k, v, group=g, causal=True,
                                                                               layout="zigzag")),
              lambda q, k, v: ae.flash_attention(q, k, v, causal=True)),
             ("window", "contiguous", lambda g: (lambda q, k, v: cp.sliding_window_attention(
                 q, k, v, 5, group=g, causal=True, global_tokens=2)),
              lambda q, k, v: ae.sliding_window_attention(q, k, v, 5, causal=True, global_tokens=2))]
    for name, layout, dist_fn, ref_fn in cases:
        full = _full([(1, 2, 8 * P, 16)] * 3, 60)
        exact = _errors(ref_fn, full, group, layout, F64)(full, False)
        for dtype, unit in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
            single = _errors(ref_fn, full, group, layout, dtype)(full, False)
            sharded = _errors(dist_fn(group), full, group, layout, dtype)(
                [cp.shard_sequence(x, group, layout) for x in full], True)
            for what, e, s1, d in zip(("out", "dq", "dk", "dv"), exact, single, sharded):
                err_single = (s1.double() - e).abs().max().item()
                err = (d.double() - e).abs().max().item()
                assert err <= 2 * err_single + unit, (name, dtype, what, err, err_single)


def _halo_theory(P, r, n, hl, hr, row_bytes):
    """(forward, backward) bytes of rank r, from the positions: forward, the rows of its
    shard inside another rank's halo; backward, the gradients of the rows of its own halo
    that other ranks hold (inside the sequence)."""
    halo = lambda s: set(range(s * n - hl, s * n)) | set(range((s + 1) * n, (s + 1) * n + hr))  # noqa: E731
    mine = set(range(r * n, (r + 1) * n))
    fwd = sum(len(halo(s) & mine) for s in range(P) if s != r)
    bwd = len(halo(r) & set(range(P * n)))
    return fwd * row_bytes, bwd * row_bytes


def check_window(P, r, group):
    cases = [  # window, causal, dilation, global tokens, n
        (3, True, 1, 0, 5), ((2, 3), False, 1, 0, 4), (4, True, 2, 0, 3),  # 4 * 2 > n: spans two ranks
        ((3, 2), False, 3, 0, 4), (2, True, 1, 3, 4), ((2, 1), False, 2, 6, 4), (1, True, 1, 5, 3)]
    for i, (window, causal, dil, g, n) in enumerate(cases):
        B, H, D = 1, 2, 4
        N = n * P
        full = _full([(B, H, N, D)] * 3, 10 + i)
        left, right = (window, 0 if causal else window) if isinstance(window, int) else window
        if max(left, right) * dil >= N:
            continue
        kw = dict(causal=causal, dilation=dil, **(dict(scale=0.3, softcap=2.0) if i == 5 else {}))
        with cp.count_sent_bytes() as sent:
            _compare(lambda q, k, v: cp.sliding_window_attention(q, k, v, window, group=group, global_tokens=g,
                                                                 **kw),
                     lambda q, k, v: ae.sliding_window_attention(q, k, v, window, global_tokens=g or None, **kw),
                     full, group, what=f"window {i}")
        hr = 0 if causal else right * dil
        assert sent["p2p"] == sum(_halo_theory(P, r, n, left * dil, hr, B * H * 2 * D * 8)), (i, sent)
        if not g:
            assert sent["collective"] == 0, sent


def check_linear(P, r, group):
    for i, (Hq, Hkv, n, normalize) in enumerate([(2, 2, 5, True), (4, 2, 70, False)]):
        full = _full([(1, Hq, n * P, 4), (1, Hkv, n * P, 4), (1, Hkv, n * P, 3)], 30 + i)
        kw = dict(normalize=normalize, feature_map="elu", chunk_size=16)
        _compare(lambda q, k, v: cp.linear_attention(q, k, v, group=group, **kw),
                 lambda q, k, v: ae.linear_attention(q, k, v, causal=True, **kw), full, group, what=f"linear {i}")


def check_ulysses(P, r, group):
    H, n = 4, 4
    N = n * P
    full = _full([(1, H, N, 8), (1, H if P == 4 else 2, N, 8), (1, H if P == 4 else 2, N, 8)], 40)
    _compare(lambda q, k, v: cp.ulysses_attention(q, k, v, group=group, causal=True),
             lambda q, k, v: ae.flash_attention(q, k, v, causal=True), full, group, what="ulysses flash")
    _compare(lambda q, k, v: cp.ulysses_attention(q, k, v, group=group, attn=ae.sliding_window_attention, window=3,
                                                  global_tokens=2, layout="zigzag"),
             lambda q, k, v: ae.sliding_window_attention(q, k, v, 3, global_tokens=2), full, group, "zigzag",
             what="ulysses window zigzag")
    cu = torch.tensor([0, 3, N], dtype=torch.int32)
    _compare(lambda q, k, v: cp.ulysses_attention(q, k, v, group=group, attn=ae.linear_attention, causal=True,
                                                  cu_seqlens=cu),
             lambda q, k, v: ae.linear_attention(q, k, v, causal=True, cu_seqlens=cu), full, group,
             what="ulysses linear packed")


def check_gather(P, r, group):
    (x,) = _full([(2, 3, 4 * P, 5)], 50)
    for layout in cp.LAYOUTS:
        s = cp.shard_sequence(x, group, layout).clone().requires_grad_()
        y = cp.gather_sequence(s, group, layout)
        assert torch.equal(y, x)
        y.sum().backward()  # every rank's loss sees every position once: P per element
        assert torch.equal(s.grad, torch.full_like(s, P))


def _raises_everywhere(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def check_errors(P, r, group):
    q = torch.randn(1, 2, 4 + (2 if r == 1 else 0), 4, dtype=F64)  # rank 1's shard is longer
    _raises_everywhere(lambda: cp.ring_attention(q, q, q, group=group), "differ|invalid")
    q = torch.randn(1, 2, 4, 4, dtype=F64)
    _raises_everywhere(lambda: cp.sliding_window_attention(q, q, q, 4 * P, group=group, causal=True), "wider than the whole")
    x = torch.randn(1, P + 1, 4, 4)
    _raises_everywhere(lambda: cp.ulysses_attention(x, x, x, group=group), "not divisible by the group size")
    bad = torch.randn(1, 2, 4, 4, dtype=F64) if r else torch.randn(1, 2, 4, 4, dtype=torch.float32)
    _raises_everywhere(lambda: cp.ring_attention(bad, bad, bad, group=group), "differ")
    # a local error on one rank only: the others raise too instead of waiting for it
    w = 2 if r else -1
    _raises_everywhere(lambda: cp.sliding_window_attention(q, q, q, w, group=group), "window|invalid")
    t = torch.ones(1)
    dist.all_reduce(t, group=group)  # the group still works
    assert t.item() == P


def check_model(P, r, group):
    """A TransformerLM (local, global and linear layers) on a sharded sequence: the
    shard's logits, and the parameter gradients summed over the ranks (as DDP would)."""
    torch.manual_seed(0)
    model = ae.nn.TransformerLM(64, dim=32, num_heads=4, num_kv_heads=2, pattern="LGR", window=3).double()
    idx = torch.randint(0, 64, (1, 4 * P), generator=torch.Generator().manual_seed(1))
    ref, _ = model(idx)
    (w,) = _full([ref.shape], 7)
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out, _ = model(cp.shard_sequence(idx, group, dim=1), context_parallel=group)
    torch.testing.assert_close(out, cp.shard_sequence(ref.detach(), group, dim=1), **TOL)
    (out * cp.shard_sequence(w, group, dim=1)).sum().backward()
    for p, g in zip(model.parameters(), ref_grads):
        dist.all_reduce(p.grad, group=group)
        torch.testing.assert_close(p.grad, g, **TOL)


CHECKS = [check_gather, check_ring, check_window, check_linear, check_ulysses, check_errors, check_model, check_lowp]
ONE_RANK = (check_gather, check_ring, check_window, check_linear, check_ulysses)  # no peer: nothing to disagree


def _worker(rank, path, names):
    """4 ranks: each alone (a group of one), the pairs {0, 1} and {2, 3} as two groups at
    once (group ranks differ from global ranks), then the 4 ranks as one group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/rdzv", rank=rank, world_size=4, timeout=TIMEOUT)
    singles = [dist.new_group([i], timeout=TIMEOUT) for i in range(4)]
    pairs = [dist.new_group([0, 1], timeout=TIMEOUT), dist.new_group([2, 3], timeout=TIMEOUT)]
    failures = []
    try:
        for size, group in ((1, singles[rank]), (2, pairs[rank // 2]), (4, dist.group.WORLD)):
            for check in CHECKS:
                if names and check.__name__ not in names or size == 1 and check not in ONE_RANK:
                    continue
                try:
                    check(size, dist.get_rank(group), group)
                except Exception:
                    failures.append(f"{size} ranks, {check.__name__}: {traceback.format_exc()}")
            if failures:
                break  # a failed check may leave peers mid-collective
            dist.barrier()
    finally:
        with open(os.path.join(path, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        dist.destroy_process_group()


def test_context_parallel():
    names = [n for n in os.environ.get("CP_CHECKS", "").split(",") if n]  # run a subset while debugging
    with tempfile.TemporaryDirectory() as path:
        ctx = mp.start_processes(_worker, args=(path, names), nprocs=4, join=False, start_method="spawn")
        try:
            for _ in range(360):  # at most 180 s, then kill (never hang CI)
                if ctx.join(timeout=0.5):
                    break
            else:
                pytest.fail("the ranks did not finish in time")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        report = [open(os.path.join(path, f"rank{r}.txt")).read() for r in range(4)]
    bad = [f"rank {r}: {t}" for r, t in enumerate(report) if t]
    assert not bad, "\n".join(bad)
