"""attention_with_kvcache: decoding over contiguous, rolling and paged caches against a
float64 reference that gathers each row's keys in logical order and applies the
window; the in-place append checked bitwise; the argument checks."""

import pytest
import torch

import attention_ext as ae
import reference as R

LOWP = (torch.float16, torch.bfloat16)


def reference_rows(q, keys, values, *, window=None, causal=True, key_mask=None, softcap=None):
    """Per row b: q[b] (Hq, Nq, D) over the logical keys[b] (Hkv, L_b, D), bottom-right
    aligned. Returns a list of float64 (out, lse) per row and the same-dtype outputs."""
    refs, lowps = [], []
    for b, (kb, vb) in enumerate(zip(keys, values)):
        nq, L = q.shape[2], kb.shape[1]
        if window is None:
            m = R.causal_mask(nq, L) if causal else torch.ones(nq, L, dtype=torch.bool)
        else:
            left, right = (window, 0 if causal else window) if isinstance(window, int) else window
            m = R.window_mask(nq, L, left, 0 if causal else right, causal=causal)
        if key_mask is not None:
            M = key_mask.shape[1]
            ok = torch.ones(L, dtype=torch.bool)
            ok[: min(M, L)] = key_mask[b, : min(M, L)].cpu()
            m = m & ok
        args = (q[b:b + 1], kb.unsqueeze(0), vb.unsqueeze(0), m)
        refs.append(R.attention(*args, softcap=softcap))
        lowps.append(R.attention_lowp(*args, softcap=softcap) if q.dtype in LOWP else None)
    return refs, lowps


def check_rows(out, lse, refs, lowps):
    for b, ((ro, rl), lp) in enumerate(zip(refs, lowps)):
        R.check_close(out[b:b + 1], ro, lowp=lp, what=f"out row {b}")
        tol = 1e-9 if out.dtype == torch.float64 else 1e-4
        assert (lse[b:b + 1].double().cpu() - rl).abs().max().item() <= tol * max(1.0, rl.abs().max().item())


def make(B, Hq, Hkv, Nq, ncache, D, dtype, device, lens):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64).to(device, dtype)
    kc = torch.randn(B, Hkv, ncache, D, generator=g, dtype=torch.float64).to(device, dtype)
    vc = torch.randn(B, Hkv, ncache, D, generator=g, dtype=torch.float64).to(device, dtype)
    k = torch.randn(B, Hkv, Nq, D, generator=g, dtype=torch.float64).to(device, dtype)
    v = torch.randn(B, Hkv, Nq, D, generator=g, dtype=torch.float64).to(device, dtype)
    return q, kc, vc, k, v, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nq", [1, 7, 128])
@pytest.mark.parametrize("window", [None, 20, (9, 3)], ids=["full", "w20", "w9_3"])
def test_contiguous_matches_reference(device, dtype, nq, window):
    lens = [0, 37, 150, 3]
    causal = window != (9, 3)
    q, kc, vc, k, v, cs = make(4, 8, 2, nq, 300, 32, dtype, device, lens)
    history_k = [torch.cat((kc[b, :, :lens[b]], k[b]), 1) for b in range(4)]
    history_v = [torch.cat((vc[b, :, :lens[b]], v[b]), 1) for b in range(4)]
    out, lse = ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v, window=window, causal=causal, return_lse=True)
    refs, lowps = reference_rows(q, history_k, history_v, window=window, causal=causal)
    check_rows(out, lse, refs, lowps)


def test_append_writes_only_its_slots(device):
    lens = [5, 0, 90]
    q, kc, vc, k, v, cs = make(3, 4, 4, 7, 100, 16, torch.float32, device, lens)
    before_k, before_v = kc.clone(), vc.clone()
    ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v)
    for b, s in enumerate(lens):
        assert torch.equal(kc[b, :, s:s + 7], k[b]) and torch.equal(vc[b, :, s:s + 7], v[b])
        for c, c0 in ((kc, before_k), (vc, before_v)):
            assert torch.equal(c[b, :, :s], c0[b, :, :s]) and torch.equal(c[b, :, s + 7:], c0[b, :, s + 7:])


def test_without_new_keys_reads_the_cache(device):
    q, kc, vc, _, _, cs = make(2, 4, 2, 3, 50, 16, torch.float64, device, [3, 41])
    out = ae.attention_with_kvcache(q, kc, vc, cs, window=8)
    refs, _ = reference_rows(q, [kc[0, :, :3], kc[1, :, :41]], [vc[0, :, :3], vc[1, :, :41]], window=8)
    for b in range(2):
        R.check_close(out[b:b + 1], refs[b][0])


def test_key_mask_and_softcap(device):
    lens = [20, 33]
    q, kc, vc, k, v, cs = make(2, 4, 2, 2, 64, 16, torch.float32, device, lens)
    km = torch.ones(2, 30, dtype=torch.bool)
    km[0, :12] = False  # left padding
    km[1, :3] = False
    out, lse = ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v, key_mask=km.to(device), softcap=2.0,
                                         return_lse=True)
    hk = [torch.cat((kc[b, :, :lens[b]], k[b]), 1) for b in range(2)]
    hv = [torch.cat((vc[b, :, :lens[b]], v[b]), 1) for b in range(2)]
    check_rows(out, lse, *reference_rows(q, hk, hv, key_mask=km, softcap=2.0))


@pytest.mark.parametrize("chunk", [1, 5])
def test_rolling_equals_sliding_window_over_the_history(device, chunk):
    # generate 3 x Ncache tokens into a ring of Ncache slots, one at a time and in chunks
    ncache, left, B, Hkv, D = 24, 16, 2, 2, 16
    total = 3 * ncache
    g = torch.Generator().manual_seed(3)
    qs, ks, vs = (torch.randn(B, h, total, D, generator=g, dtype=torch.float64) for h in (4, Hkv, Hkv))
    kc = torch.zeros(B, Hkv, ncache, D, dtype=torch.float64, device=device)
    vc = torch.zeros_like(kc)
    cs = torch.zeros(B, dtype=torch.int32, device=device)
    outs = []
    for t in range(0, total, chunk):
        sl = slice(t, t + chunk)
        outs.append(ae.attention_with_kvcache(qs[:, :, sl].to(device), kc, vc, cs, k=ks[:, :, sl].to(device),
                                              v=vs[:, :, sl].to(device), rolling=True, window=left))
        cs += chunk
    got = torch.cat(outs, 2)
    ref, _ = R.attention(qs, ks, vs, R.window_mask(total, total, left, 0, causal=True))
    R.check_close(got, ref)
    assert kc.shape[2] == ncache  # memory bounded by the ring


@pytest.mark.parametrize("page_size", [1, 16, 7])
def test_paged_equals_contiguous(device, page_size):
    lens = [40, 5, 70]
    B, Hkv, D, nq, ncache = 3, 2, 16, 4, 80
    q, kc, vc, k, v, cs = make(B, 4, Hkv, nq, ncache, D, torch.float32, device, lens)
    # rows 0 and 2 share their first 16 tokens (a common prefix), read-only
    kc[2, :, :16], vc[2, :, :16] = kc[0, :, :16], vc[0, :, :16]
    want = ae.attention_with_kvcache(q, kc.clone(), vc.clone(), cs, k=k, v=v, window=30)
    pages_per_row = -(-ncache // page_size)
    perm = torch.randperm(B * pages_per_row, generator=torch.Generator().manual_seed(1))
    table = perm.view(B, pages_per_row).to(torch.int32)
    shared = 16 // page_size
    table[2, :shared] = table[0, :shared]
    pool_k = torch.zeros(B * pages_per_row, Hkv, page_size, D, device=device)
    pool_v = torch.zeros_like(pool_k)
    for b in range(B):
        for p in range(pages_per_row):
            if b == 2 and p < shared:
                continue
            n = min(page_size, ncache - p * page_size)
            pool_k[table[b, p], :, :n] = kc[b, :, p * page_size:p * page_size + n]
            pool_v[table[b, p], :, :n] = vc[b, :, p * page_size:p * page_size + n]
    got = ae.attention_with_kvcache(q, pool_k, pool_v, cs, k=k, v=v, block_table=table.to(device), window=30)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the appended tokens landed in the right pages
    for b in range(B):
        for i in range(nq):
            t = lens[b] + i
            assert torch.equal(pool_k[table[b, t // page_size], :, t % page_size], k[b, :, i])


def test_opcheck_and_compile_with_mutation(device):
    q, kc, vc, k, v, cs = make(2, 4, 2, 1, 32, 16, torch.float32, device, [3, 10])
    torch.library.opcheck(torch.ops.attention_ext.attention_decode.default, (q, kc.clone(), vc.clone(), cs, 0.25),
                          dict(k=k, v=v, window_left=4, window_right=0))

    def step(q, kc, vc, cs, k, v):
        return ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v, window=8)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc2, vc2 = kc.clone(), vc.clone()
    torch.testing.assert_close(compiled(q, kc, vc, cs, k, v), step(q, kc2, vc2, cs, k, v))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)  # the compiled step appended in place too


def test_no_backward():
    q, kc, vc, k, v, cs = make(1, 2, 2, 1, 8, 8, torch.float64, "cpu", [2])
    q.requires_grad_()
    out = ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v)
    with pytest.raises(RuntimeError):
        out.sum().backward()


def _args(**over):
    q, kc, vc, k, v, cs = make(2, 4, 2, 3, 16, 8, torch.float32, "cpu", [2, 5])
    a = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=cs, k=k, v=v)
    a.update(over)
    return a


@pytest.mark.parametrize("over, exc, fragment", [
    (dict(cache_seqlens=torch.tensor([2, -1], dtype=torch.int32)), ValueError, r"cache_seqlens\[1\] must be >= 0"),
    (dict(cache_seqlens=torch.tensor([2, 14], dtype=torch.int32)), ValueError, r"exceeds the cache's 16 slots"),
    (dict(cache_seqlens=torch.tensor([2, 5], dtype=torch.int64)), TypeError, "cache_seqlens must be an int32"),
    (dict(cache_seqlens=torch.tensor([2], dtype=torch.int32)), ValueError, r"cache_seqlens must have shape"),
    (dict(k=torch.zeros(2, 2, 4, 8)), ValueError, "k must have shape"),
    (dict(v=None), ValueError, "k and v go together"),
    (dict(k_cache=torch.zeros(2, 3, 16, 8)), ValueError, "must match k_cache"),
    (dict(q=torch.zeros(2, 4, 3, 8, dtype=torch.float64)), TypeError, "must have q's dtype"),
    (dict(k=None, v=None, cache_seqlens=torch.tensor([2, 5], dtype=torch.int32)), ValueError, "must be >= Nq"),
])
def test_bad_input(over, exc, fragment):
    with pytest.raises(exc, match=fragment):
        ae.attention_with_kvcache(**_args(**over))


def test_bad_paged_and_rolling():
    q, kc, vc, k, v, cs = make(2, 4, 2, 3, 16, 8, torch.float32, "cpu", [2, 5])
    pool = torch.zeros(4, 2, 4, 8)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 9 is outside the pool of 4 pages"):
        ae.attention_with_kvcache(q, pool, pool.clone(), cs, k=k, v=v, block_table=table)
    with pytest.raises(ValueError, match="needs 3 pages of 4"):
        ae.attention_with_kvcache(q, pool, pool.clone(), torch.tensor([2, 7], dtype=torch.int32), k=k, v=v,
                                  block_table=table.clamp(max=3))
    with pytest.raises(ValueError, match="too small for window left=14"):
        ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v, rolling=True, window=14)
    with pytest.raises(ValueError, match="needs a window"):
        ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v, rolling=True)
    # the raw op refuses it too, before touching the cache
    before = kc.clone()
    with pytest.raises(ValueError, match="too small"):
        torch.ops.attention_ext.attention_decode(q, kc, vc, cs, 0.3, k, v, rolling=True, window_left=15,
                                                 window_right=0)
    assert torch.equal(kc, before)


# ---- the CPU decode kernel (split-K over the cache, csrc/cpu/kernels/decode_fwd.cpp) ----

def kernel_calls():
    return ae._C._cpu_decode_kernel_stats()


def run_counted(*args, **kw):
    """attention_with_kvcache on CPU; asserts the split-K decode kernel ran (not the
    per-row flash path) and returns its result and the split it used."""
    calls = kernel_calls()[0]
    res = ae.attention_with_kvcache(*args, **kw)
    n, split = kernel_calls()
    assert n == calls + 1, "the CPU decode kernel did not run"
    return res, split


def test_kernel_runs_for_single_tokens_not_for_prefill_chunks():
    q, kc, vc, k, v, cs = make(2, 8, 2, 1, 300, 16, torch.float32, "cpu", [40, 200])
    run_counted(q, kc, vc, cs, k=k, v=v)
    q, kc, vc, k, v, cs = make(2, 8, 2, 128, 300, 16, torch.float32, "cpu", [40, 100])
    calls = kernel_calls()[0]
    ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v)  # 4 x 128 query rows per kv head: the flash kernel
    assert kernel_calls()[0] == calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "gqa8"])
def test_kernel_split_edges(dtype, hq, hkv):
    # one row spanning several splits (not a multiple of the split), one shorter than a
    # split, one holding only the new token
    lens = [2999, 60, 0]
    q, kc, vc, k, v, cs = make(3, hq, hkv, 1, 3100, 40, dtype, "cpu", lens)
    (out, lse), split = run_counted(q, kc, vc, cs, k=k, v=v, return_lse=True)
    assert 61 < split < 3000 and 3000 % split != 0
    hk = [torch.cat((kc[b, :, :lens[b]], k[b]), 1) for b in range(3)]
    hv = [torch.cat((vc[b, :, :lens[b]], v[b]), 1) for b in range(3)]
    check_rows(out, lse, *reference_rows(q, hk, hv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_window_key_mask_softcap(dtype):
    lens = [700, 33, 260]
    nq = 3
    q, kc, vc, k, v, cs = make(3, 6, 2, nq, 800, 24, dtype, "cpu", lens)
    km = torch.ones(3, 400, dtype=torch.bool)
    km[0, 300:390] = False  # inside row 0's window
    km[1, :20] = False
    km[2, 100:400:3] = False
    for window, causal in ((None, True), (150, True), ((130, 2), False)):
        (out, lse), _ = run_counted(q, kc, vc, cs, k=k, v=v, window=window, causal=causal, key_mask=km,
                                    softcap=3.0, return_lse=True)
        hk = [torch.cat((kc[b, :, :lens[b]], k[b]), 1) for b in range(3)]
        hv = [torch.cat((vc[b, :, :lens[b]], v[b]), 1) for b in range(3)]
        check_rows(out, lse, *reference_rows(q, hk, hv, window=window, causal=causal, key_mask=km, softcap=3.0))


def test_kernel_row_without_keys_gives_zeros():
    q, kc, vc, k, v, cs = make(2, 4, 2, 1, 300, 16, torch.float32, "cpu", [250, 10])
    km = torch.ones(2, 300, dtype=torch.bool)
    km[1] = False  # row 1 may attend nothing
    (out, lse), _ = run_counted(q, kc, vc, cs, k=k, v=v, key_mask=km, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool((lse[1] == float("-inf")).all())
    assert bool(torch.isfinite(out[0]).all()) and bool(torch.isfinite(lse[0]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kernel_non_finite_keys_outside_the_range_never_leak(dtype):
    lens, window = [500, 90], 64
    q, kc, vc, k, v, cs = make(2, 8, 2, 2, 700, 16, dtype, "cpu", lens)
    km = torch.ones(2, 600, dtype=torch.bool)
    km[0, 470:480] = False
    want, _ = run_counted(q, kc.clone(), vc.clone(), cs, k=k, v=v, window=window, key_mask=km)
    for c, bad in ((kc, float("nan")), (vc, float("inf"))):
        c[0, :, 500 + 2:] = bad    # past the row's length
        c[1, :, :90 - window] = bad  # behind the window
        c[0, :, 470:480] = bad     # masked out
    got, _ = run_counted(q, kc, vc, cs, k=k, v=v, window=window, key_mask=km)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a visible non-finite value still propagates
    vc[1, :, 89] = float("nan")
    got, _ = run_counted(q, kc, vc, cs, k=k, v=v, window=window, key_mask=km)
    assert bool(torch.isnan(got[1]).all()) and bool(torch.isfinite(got[0]).all())


@pytest.mark.parametrize("page_size", [1, 5, 64, 100])
def test_kernel_paged_pages_straddle_splits(page_size):
    lens, B, Hkv, D = [613, 130], 2, 2, 16
    q, kc, vc, k, v, cs = make(B, 8, Hkv, 1, 700, D, torch.bfloat16, "cpu", lens)
    want, _ = run_counted(q, kc.clone(), vc.clone(), cs, k=k, v=v)
    pages = -(-700 // page_size)
    table = torch.randperm(B * pages, generator=torch.Generator().manual_seed(2)).view(B, pages).to(torch.int32)
    pool_k = torch.full((B * pages, Hkv, page_size, D), float("nan"), dtype=torch.bfloat16)
    pool_v = pool_k.clone()
    for b in range(B):
        for p in range(pages):
            n = min(page_size, 700 - p * page_size)
            pool_k[table[b, p], :, :n] = kc[b, :, p * page_size:p * page_size + n]
            pool_v[table[b, p], :, :n] = vc[b, :, p * page_size:p * page_size + n]
    got, _ = run_counted(q, pool_k, pool_v, cs, k=k, v=v, block_table=table)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kernel_ring_wraps_inside_a_split():
    # a ring of 300 slots after 1000 tokens: the window's keys wrap around slot 0
    ncache, left, total = 300, 250, 1000
    B, Hkv, D = 2, 2, 16
    g = torch.Generator().manual_seed(5)
    qs = torch.randn(B, 8, 1, D, generator=g, dtype=torch.float64)
    ks, vs = (torch.randn(B, Hkv, total, D, generator=g, dtype=torch.float64) for _ in range(2))
    ring = torch.arange(total - ncache, total) % ncache
    kc, vc = (torch.zeros(B, Hkv, ncache, D, dtype=torch.float64) for _ in range(2))
    kc[:, :, ring], vc[:, :, ring] = ks[:, :, total - ncache:], vs[:, :, total - ncache:]
    cs = torch.full((B,), total, dtype=torch.int32)
    got, _ = run_counted(qs, kc, vc, cs, rolling=True, window=left)
    ref, _ = R.attention(qs, ks, vs, R.window_mask(1, total, left, 0, causal=True))
    R.check_close(got, ref)


def test_kernel_bitwise_independent_of_threads():
    lens = [3000, 1234, 77]
    q, kc, vc, k, v, cs = make(3, 8, 2, 1, 3100, 64, torch.bfloat16, "cpu", lens)
    threads = torch.get_num_threads()
    try:
        res = []
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append(run_counted(q, kc.clone(), vc.clone(), cs, k=k, v=v, softcap=5.0, return_lse=True)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_kernel_value_dim_differs_from_key_dim():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 1, 24, generator=g, dtype=torch.float64)
    kc = torch.randn(2, 3, 500, 24, generator=g, dtype=torch.float64)
    vc = torch.randn(2, 3, 500, 40, generator=g, dtype=torch.float64)
    lens = [400, 77]
    (out, lse), _ = run_counted(q, kc, vc, torch.tensor(lens, dtype=torch.int32), window=100, return_lse=True)
    check_rows(out, lse, *reference_rows(q, [kc[b, :, :lens[b]] for b in range(2)],
                                         [vc[b, :, :lens[b]] for b in range(2)], window=100))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("D", [24, 100], ids=["D24", "D100"])
def test_kernel_head_dim_tails_and_row_blocks(dtype, group, D):
    # D not a multiple of the vector widths (16 / 32 lanes); group * Nq query rows per kv
    # head in blocks of 4 (Nq 5: a partial block for every group); a window and a ragged
    # batch, so chunks that every row sees whole and chunks with a boundary both run
    lens = [530, 61]
    for nq in (1, 5):
        q, kc, vc, k, v, cs = make(2, 2 * group, 2, nq, 600, D, dtype, "cpu", lens)
        hk = [torch.cat((kc[b, :, :lens[b]], k[b]), 1) for b in range(2)]
        hv = [torch.cat((vc[b, :, :lens[b]], v[b]), 1) for b in range(2)]
        for window in (None, 200):
            (out, lse), _ = run_counted(q, kc.clone(), vc.clone(), cs, k=k, v=v, window=window, return_lse=True)
            check_rows(out, lse, *reference_rows(q, hk, hv, window=window))


# ---- ALiBi and sinks (score_mods.h) --------------------------------------------------

def bias_rows(alibi, nq, lengths):
    """Per row b: R.alibi_bias (1, Hq, nq, L_b) of its slopes: query i at its aligned
    position L_b - nq + i, key j at its logical position."""
    return [R.alibi_bias(alibi[b] if alibi.dim() == 2 else alibi, nq, L) for b, L in enumerate(lengths)]


def paged_copy(kc, vc, page_size, seed=1):
    """The contiguous caches as pools of shuffled pages, and their block table."""
    B, Hkv, ncache, _ = kc.shape
    pages = -(-ncache // page_size)
    table = torch.randperm(B * pages, generator=torch.Generator().manual_seed(seed)).view(B, pages).to(torch.int32)
    pools = []
    for c in (kc, vc):
        pool = torch.zeros(B * pages, Hkv, page_size, c.shape[3], dtype=c.dtype, device=c.device)
        for b in range(B):
            for p in range(pages):
                n = min(page_size, ncache - p * page_size)
                pool[table[b, p], :, :n] = c[b, :, p * page_size:p * page_size + n]
        pools.append(pool)
    return pools[0], pools[1], table.to(kc.device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nq", [1, 7, 40])
@pytest.mark.parametrize("layout", ["contiguous", "paged", "rolling"])
def test_alibi_and_sinks_match_reference(device, dtype, nq, layout):
    # ragged lengths, GQA (8 query heads over 2); Nq 40 x 4 rows per kv head takes the
    # per-row path on CPU, 1 and 7 the decode kernel
    lens, B, Hq, Hkv, D, ncache = [0, 37, 150, 3], 4, 8, 2, 32, 300
    q, kc, vc, k, v, cs = make(B, Hq, Hkv, nq, ncache, D, dtype, device, lens)
    g = torch.Generator().manual_seed(11)
    sinks = torch.randn(Hq, generator=g).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    hk = [torch.cat((kc[b, :, :lens[b]], k[b]), 1) for b in range(B)]
    hv = [torch.cat((vc[b, :, :lens[b]], v[b]), 1) for b in range(B)]
    window = 60 if layout == "rolling" else None
    for alibi in (ae.alibi_slopes(Hq).to(device), torch.rand(B, Hq, generator=g).to(device) * 0.3):
        kw = dict(k=k, v=v, window=window, alibi_slopes=alibi, sinks=sinks, return_lse=True)
        if layout == "contiguous":
            out, lse = ae.attention_with_kvcache(q, kc.clone(), vc.clone(), cs, **kw)
        elif layout == "paged":
            pk, pv, table = paged_copy(kc, vc, 16)
            out, lse = ae.attention_with_kvcache(q, pk, pv, cs, block_table=table, **kw)
        else:  # a ring of window + nq slots holding each row's last tokens
            slots = window + nq
            ring_k = torch.zeros(B, Hkv, slots, D, dtype=dtype, device=device)
            ring_v = torch.zeros_like(ring_k)
            for b in range(B):
                pos = torch.arange(max(0, lens[b] - slots), lens[b])
                ring_k[b, :, pos % slots], ring_v[b, :, pos % slots] = kc[b, :, pos], vc[b, :, pos]
            out, lse = ae.attention_with_kvcache(q, ring_k, ring_v, cs, rolling=True, **kw)
        biases = bias_rows(alibi, nq, [L + nq for L in lens])
        refs, lowps = [], []
        for b in range(B):
            m = R.window_mask(nq, lens[b] + nq, window, 0, causal=True) if window else R.causal_mask(nq, lens[b] + nq)
            args = (q[b:b + 1], hk[b].unsqueeze(0), hv[b].unsqueeze(0), m)
            refs.append(R.attention(*args, bias=biases[b], sinks=sinks))
            lowps.append(R.attention_lowp(*args, bias=biases[b], sinks=sinks)
                         if dtype in LOWP else None)
        check_rows(out, lse, refs, lowps)


def test_kernel_alibi_sinks_window_key_mask_softcap():
    # the decode kernel with every term at once, splits and chunk edges included
    lens, nq = [2999, 60, 0], 2
    q, kc, vc, k, v, cs = make(3, 8, 2, nq, 3100, 40, torch.float32, "cpu", lens)
    km = torch.ones(3, 400, dtype=torch.bool)
    km[1, :20] = False
    km[0, 100:400:3] = False
    alibi = torch.rand(3, 8, generator=torch.Generator().manual_seed(2)) * 0.05
    sinks = torch.linspace(-2, 3, 8)
    hk = [torch.cat((kc[b, :, :lens[b]], k[b]), 1) for b in range(3)]
    hv = [torch.cat((vc[b, :, :lens[b]], v[b]), 1) for b in range(3)]
    for window in (None, 700):
        (out, lse), _ = run_counted(q, kc.clone(), vc.clone(), cs, k=k, v=v, window=window, key_mask=km,
                                    softcap=4.0, alibi_slopes=alibi, sinks=sinks, return_lse=True)
        biases = bias_rows(alibi, nq, [L + nq for L in lens])
        refs = []
        for b in range(3):
            L = lens[b] + nq
            m = R.window_mask(nq, L, window, 0, causal=True) if window else R.causal_mask(nq, L)
            ok = torch.ones(L, dtype=torch.bool)
            ok[:min(400, L)] = km[b, :min(400, L)]
            refs.append(R.attention(q[b:b + 1], hk[b].unsqueeze(0), hv[b].unsqueeze(0), m & ok, softcap=4.0,
                                    bias=biases[b], sinks=sinks))
        check_rows(out, lse, refs, [None] * 3)


def test_sinks_row_without_keys():
    # a row that may attend nothing: zeros, lse = its head's sink (kernel and per-row path)
    sinks = torch.linspace(-1, 1, 4)
    for nq in (1, 40):
        q, kc, vc, k, v, cs = make(2, 4, 2, nq, 300, 16, torch.float32, "cpu", [250, 10])
        km = torch.ones(2, 300, dtype=torch.bool)
        km[1] = False
        out, lse = ae.attention_with_kvcache(q, kc, vc, cs, k=k, v=v, key_mask=km, sinks=sinks, return_lse=True)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(lse[1], sinks.view(-1, 1).expand(4, nq))


@pytest.mark.parametrize("over, exc, fragment", [
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(Hq=4,\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.int32)), TypeError, "alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "alibi_slopes must hold finite"),
    (dict(sinks=torch.ones(2, 4)), ValueError, r"sinks must have shape \(Hq=4,\)"),
    (dict(sinks=torch.ones(4, dtype=torch.int64)), TypeError, "sinks must be a floating-point"),
    (dict(sinks=torch.tensor([0.0, float("inf"), 0.0, 0.0])), ValueError, "sinks must hold finite"),
])
def test_bad_alibi_and_sinks(over, exc, fragment):
    with pytest.raises(exc, match=fragment):
        ae.attention_with_kvcache(**_args(**over))


def test_bad_alibi_and_sinks_raw_op():
    a = _args()
    for kw, fragment in ((dict(alibi_slopes=torch.ones(2, 3)), "alibi_slopes has shape"),
                         (dict(sinks=torch.ones(4, dtype=torch.float64)), "sinks must be Float")):
        with pytest.raises((ValueError, TypeError), match=fragment):
            torch.ops.attention_ext.attention_decode(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], 0.3,
                                                     a["k"], a["v"], **kw)


def test_opcheck_alibi_and_sinks(device):
    q, kc, vc, k, v, cs = make(2, 4, 2, 1, 32, 16, torch.float32, device, [3, 10])
    torch.library.opcheck(torch.ops.attention_ext.attention_decode.default, (q, kc.clone(), vc.clone(), cs, 0.25),
                          dict(k=k, v=v, alibi_slopes=torch.rand(2, 4, device=device),
                               sinks=torch.randn(4, device=device)))
