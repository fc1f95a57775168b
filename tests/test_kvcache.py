"""attention_ext.KVCache: contiguous, rolling and paged layouts through attention_with_kvcache,
against a float64 reference over the whole history, the page allocator, memory, and
greedy generation of attention_ext.nn.TransformerLM on every layout."""

import pytest
import torch

import attention_ext as ae
import attention_ext.nn as aenn
import reference as R

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems (conftest.py)

LAYOUTS = {  # name -> KVCache keyword arguments
    "contiguous": dict(rolling=False),
    "rolling": dict(rolling=True),
    "paged": dict(rolling=False, page_size=3),
    "rolling+paged": dict(rolling=True, page_size=4),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_steps_match_the_whole_history(layout, dtype, device):
    """Three layers (full, window 3, window (5, 0)) fed a prefill chunk and then steps of 1 and
    3 tokens until the history is three times the rings: each step's output equals float64
    attention of its queries over every key so far with the layer's causal window
    (tolerances: reference.check_close, by dtype)."""
    B, Hq, Hkv, D, chunk = 2, 4, 2, 8, 4
    windows = [None, 3, (5, 0)]
    steps = [4, 1, 3] + [1] * 10 + [3, 1, 4, 2]  # 28 tokens; rings of 7 and 9 slots
    total = sum(steps)
    cache = ae.KVCache(B, Hkv, D, total, windows=windows, chunk=chunk, dtype=dtype, device=device,
                       **LAYOUTS[layout])
    g = torch.Generator().manual_seed(0)
    K = torch.randn(len(windows), B, Hkv, total, D, generator=g, dtype=torch.float64)
    V = torch.randn(len(windows), B, Hkv, total, D, generator=g, dtype=torch.float64)
    Q = torch.randn(len(windows), B, Hq, total, D, generator=g, dtype=torch.float64)
    start = 0
    for n in steps:
        end = start + n
        for i, w in enumerate(windows):
            q, k, v = (t[i, :, :, start:end].to(device=device, dtype=dtype) for t in (Q, K, V))
            out = ae.attention_with_kvcache(q, **cache.update(i, k, v))
            left = total if w is None else (w if isinstance(w, int) else w[0])
            mask = R.window_mask(n, end, left, 0, causal=True)
            # the references see the inputs rounded to the dtype, as the cache holds them
            args = (Q[i, :, :, start:end].to(dtype), K[i, :, :, :end].to(dtype), V[i, :, :, :end].to(dtype))
            want, _ = R.attention(*args, mask)
            lowp = R.attention_lowp(*args, mask) if dtype == torch.bfloat16 else None
            R.check_close(out, want, lowp=lowp, what=f"{layout} layer {i} tokens {start}..{end}")
        cache.advance(n)
        start = end
    assert cache.lengths == [total] * B and cache.cache_seqlens.tolist() == [total] * B
    rings = [cache.k[i].shape[2] for i in (1, 2)]
    if cache.rolling[1]:
        assert rings == [3 + chunk, 5 + chunk] and total >= 3 * max(rings)


@pytest.mark.parametrize("layout", ["contiguous", "rolling", "paged"])
def test_key_mask_hides_left_padding(layout, device):
    """A left-padded batch (row 1's first 3 of 6 prompt positions are padding): no query sees
    them, positions past the mask stay visible, also once a ring has overwritten them."""
    B, H, D, prompt = 2, 2, 8, 6
    pad = torch.ones(B, prompt, dtype=torch.bool, device=device)
    pad[1, :3] = False
    cache = ae.KVCache(B, H, D, 20, windows=[4], chunk=prompt, key_mask=pad, device=device, **LAYOUTS[layout])
    g = torch.Generator().manual_seed(1)
    Q, K, V = (torch.randn(B, H, 20, D, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    start = 0
    for n in [prompt] + [1] * 14:
        end = start + n
        out = ae.attention_with_kvcache(Q[:, :, start:end].float(), **cache.update(0, K[:, :, start:end].float(),
                                                                                   V[:, :, start:end].float()))
        keys = torch.ones(B, end, dtype=torch.bool)
        keys[:, :prompt] = pad.cpu()
        mask = R.window_mask(n, end, 4, 0, causal=True) & keys.view(B, 1, 1, end)
        want, _ = R.attention(Q[:, :, start:end].float(), K[:, :, :end].float(), V[:, :, :end].float(), mask)
        R.check_close(out, want, what=f"{layout} tokens {start}..{end}")
        cache.advance(n)
        start = end


def test_rolling_memory_does_not_grow_with_the_generated_length(device):
    """A model of local layers only: its rolling cache needs no max_len, holds the same bytes
    whatever it generates, and generates past three times its ring."""
    torch.manual_seed(0)
    lm = aenn.TransformerLM(61, 32, 4, pattern="L", num_layers=2, num_kv_heads=2, window=4).to(device).eval()
    sizes = []
    for new in (10, 40):
        cache = lm.new_caches(2, None, chunk=8)  # rings of 4 + 8 slots
        assert cache.max_len is None and all(cache.rolling)
        before = cache.nbytes()
        seq = lm.generate(torch.randint(0, 61, (2, 6), device=device), new, caches=cache)
        assert seq.shape == (2, 6 + new) and cache.nbytes() == before
        sizes.append(before)
    assert sizes[0] == sizes[1] == 2 * 2 * (2 * 2 * 12 * 8 * 4)  # layers x (k, v) x B x Hkv x slots x D x fp32
    with pytest.raises(ValueError, match="max_len"):
        ae.KVCache(1, 1, 8, None, windows=[None])


def test_paged_allocator():
    cache = ae.KVCache(3, 1, 4, 10, windows=[None, 2], page_size=4, rolling=True, num_pages=6)
    assert cache.block_table.shape == (3, 3) and cache.k[0].shape == (6, 1, 4, 4)
    assert cache.k[1].shape == (3, 1, 2 + cache.chunk, 4)  # the window layer rolls: no pages
    k = torch.zeros(3, 1, 5, 4)
    cache.update(0, k, k)  # 5 tokens: two pages per row, every page in use
    assert sorted(cache.block_table[:, :2].flatten().tolist()) == list(range(6))
    assert not cache._free
    cache.update(1, k, k)  # a rolling layer takes no pages
    cache.advance(5)
    cache.release(1)  # row 1 starts over; its two pages are free again
    assert cache.lengths == [5, 0, 5] and cache.cache_seqlens.tolist() == [5, 0, 5]
    assert cache.block_table[1].tolist() == [0, 0, 0]
    one = torch.zeros(3, 1, 1, 4)
    cache.update(0, one, one)  # rows 0, 2 still have room in their pages, row 1 takes one back
    assert len(cache._free) == 1
    table = cache.block_table.clone()
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.update(0, k[:, :, :4], k[:, :, :4])  # rows 0 and 2 need a third page each: 2 > 1 free
    assert torch.equal(cache.block_table, table) and len(cache._free) == 1  # nothing taken
    with pytest.raises(ValueError, match="max_len"):
        cache.update(0, torch.zeros(3, 1, 6, 4), torch.zeros(3, 1, 6, 4))


def test_argument_checks():
    cache = ae.KVCache(1, 1, 4, 8, windows=[None, 3, False], chunk=2)
    assert cache.num_layers == 3 and cache.k[2] is None and cache.capacity(1) == 5 and cache.capacity(0) == 8
    k = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="chunk"):
        cache.update(0, k, k)
    with pytest.raises(ValueError, match="no K/V"):
        cache.update(2, k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="layer"):
        cache.update(3, k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="windows"):
        ae.KVCache(1, 1, 4, 8, num_layers=2, windows=[None])
    with pytest.raises(TypeError, match="window"):
        ae.KVCache(1, 1, 4, 8, windows=["wide"])
    # a layer given a cache built for another window refuses it
    attn = aenn.Attention(16, 2, kind="local", window=3)
    with pytest.raises(ValueError, match="window"):
        attn(torch.zeros(1, 1, 16), ae.KVCache(1, 2, 8, 8, windows=[4]))


def greedy_without_cache(lm, idx, new):
    """Greedy tokens by recomputing the whole sequence for every new token."""
    seq = idx
    for _ in range(new):
        logits, _ = lm(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("pattern", ["LLG", "LR"])
def test_generate_on_every_layout_matches_recomputation(pattern, device):
    """Greedy generation with each cache layout (and prompts longer than a chunk) gives the
    tokens of recomputing the full sequence without a cache, for a model whose weights are
    large enough that the window decides the tokens."""
    torch.manual_seed(0)
    lm = aenn.TransformerLM(61, 48, 4, pattern=pattern, num_layers=3, num_kv_heads=2, window=5).to(device).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in lm.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g).to(device) * 0.25)
    idx = torch.randint(0, 61, (2, 11), device=device)
    new = 20
    with torch.no_grad():
        want = greedy_without_cache(lm, idx, new)
        for layout, kw in LAYOUTS.items():
            cache = lm.new_caches(2, 11 + new, chunk=4, **kw)
            got = lm.generate(idx, new, caches=cache)
            assert torch.equal(got, want), layout
        # the same tokens as the concatenating cache of the SDPA backend
        assert torch.equal(lm.set_backend("sdpa").generate(idx, new), want)
        lm.set_backend("attention_ext")
