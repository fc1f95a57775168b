"""attention_ext.nn: the Attention module and TransformerLM against the same layers on
PyTorch's SDPA (backend="sdpa"), incremental decoding, pattern strings."""

import pytest
import torch

import attention_ext.nn as aenn
import reference as R


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def randomize(module, std=0.3):
    """Weights large enough that attention patterns, not residuals, dominate the output."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (std if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    return module


def assert_close(ours, ref, what, rel=1e-4):
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    err = (ours - ref).abs().max().item()
    tol = rel * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e}"


def test_parse_pattern():
    assert aenn.parse_pattern("LG", 5) == ["local", "global", "local", "global", "local"]
    assert aenn.parse_pattern("LLLLLG") == ["local"] * 5 + ["global"]
    assert aenn.parse_pattern("llg", 3) == ["local", "local", "global"]
    assert aenn.parse_pattern("R") == ["linear"]
    for bad in ("", "LX", 3):
        with pytest.raises(ValueError):
            aenn.parse_pattern(bad)
    with pytest.raises(ValueError, match="num_layers"):
        aenn.parse_pattern("LG", 0)


def test_attention_arguments():
    with pytest.raises(ValueError, match="kind"):
        aenn.Attention(32, 4, kind="dense")
    with pytest.raises(ValueError, match="num_kv_heads"):
        aenn.Attention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="backend"):
        aenn.Attention(32, 4, backend="flash")
    with pytest.raises(ValueError, match="window"):
        aenn.Attention(32, 4, kind="local", window=-1)
    a = aenn.Attention(32, 4, num_kv_heads=2, kind="L", window=(3, 1), causal=False, bias=True)
    assert (a.kind, a.left, a.right) == ("local", 3, 1)
    assert a.k_proj.out_features == 16 and a.q_proj.bias is not None
    assert "window=(3, 1)" in repr(a)


CASES = [  # kind, window, causal, num_kv_heads, bias, rope
    ("global", None, True, 2, False, True),
    ("global", None, False, 4, True, False),
    ("local", 5, True, 1, False, True),
    ("local", (4, 2), False, 2, True, True),
]


@pytest.mark.parametrize("kind,window,causal,kv,bias,rope", CASES)
def test_attention_matches_sdpa_and_reference(kind, window, causal, kv, bias, rope, device):
    kw = dict(num_kv_heads=kv, kind=kind, causal=causal, bias=bias, rope=rope)
    if window is not None:
        kw["window"] = window
    ours = randomize(aenn.Attention(48, 4, **kw)).to(device)
    peer = randomize(aenn.Attention(48, 4, backend="sdpa", **kw)).to(device)
    x = torch.randn(2, 37, 48, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 37, 48, device=device)
    out = ours(x1)
    ref = peer(x2)
    assert_close(out, ref, "out")
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert_close(x1.grad, x2.grad, "dx")
    # k_proj.bias has an exactly-zero gradient without RoPE (softmax is shift invariant): its
    # rounding noise is measured against the layer's gradient scale
    scale = max(q.grad.abs().max().item() for q in peer.parameters())
    for (name, p), q in zip(ours.named_parameters(), peer.parameters()):
        assert_close(p.grad / scale, q.grad / scale, f"grad {name}")
    # and against the float64 reference with an explicit mask (no projections in the way)
    q = torch.randn(1, 4, 37, 12, dtype=torch.float64)
    k = torch.randn(1, kv, 37, 12, dtype=torch.float64)
    v = torch.randn(1, kv, 37, 12, dtype=torch.float64)
    a = aenn.Attention(48, 4, **kw)
    got = a._softmax(q.to(device), k.to(device), v.to(device))
    if kind == "global":
        mask = R.causal_mask(37, 37) if causal else None
    else:
        left, right = (window, window) if isinstance(window, int) else window
        mask = R.window_mask(37, 37, left, 0 if causal else right, causal=causal)
    want, _ = R.attention(q, k, v, mask)
    assert_close(got, want, "softmax core vs float64 reference", rel=1e-9)


def test_local_window_covering_the_sequence_is_global(device):
    g = randomize(aenn.Attention(32, 4, kind="global")).to(device)
    l_ = randomize(aenn.Attention(32, 4, kind="local", window=64)).to(device)
    x = torch.randn(1, 40, 32, device=device)
    assert_close(l_(x), g(x), "local with a covering window")


@pytest.mark.parametrize("pattern", ["G", "L", "LG", "LLLLLG", "LLG"])
def test_transformer_lm_backends_agree(pattern, device):
    torch.manual_seed(0)
    lm = randomize(aenn.TransformerLM(61, 48, 4, pattern=pattern, num_layers=6, num_kv_heads=2, window=6),
                   std=0.2).to(device)
    assert [b.attn.kind for b in lm.blocks] == aenn.parse_pattern(pattern, 6)
    idx = torch.randint(0, 61, (2, 40), device=device)
    results = {}
    for backend in ("sdpa", "attention_ext"):
        lm.set_backend(backend)
        lm.zero_grad()
        logits, loss = lm(idx, idx)
        loss.backward()
        results[backend] = (logits, [p.grad.clone() for p in lm.parameters()])
    assert_close(results["attention_ext"][0], results["sdpa"][0], "logits")
    for a, b in zip(results["attention_ext"][1], results["sdpa"][1]):
        assert_close(a, b, "grad")


@pytest.mark.parametrize("backend", ["attention_ext", "sdpa"])
def test_incremental_decoding_matches_full_forward(backend, device):
    torch.manual_seed(0)
    lm = randomize(aenn.TransformerLM(61, 48, 4, pattern="LLG", num_layers=3, num_kv_heads=2, window=5,
                                      backend=backend), std=0.2).to(device).eval()
    idx = torch.randint(0, 61, (2, 30), device=device)
    with torch.no_grad():
        full, _ = lm(idx)
        caches = lm.new_caches(2, 30, chunk=8)  # attention_ext: a KVCache, fed in chunks of 8
        parts = [lm(idx[:, :12], caches=caches)[0], lm(idx[:, 12:20], caches=caches)[0]]
        parts += [lm(idx[:, t:t + 1], caches=caches)[0] for t in range(20, 30)]
    assert_close(torch.cat(parts, 1), full, "cached decoding")
    # local layers keep only their reach of keys: the concatenating cache its last 5, the KVCache a ring of the
    # reach and one chunk
    if backend == "sdpa":
        assert caches[0]["k"].shape[2] == 5 and caches[2]["k"].shape[2] == 30
    else:
        assert caches.rolling[:2] == [True, True] and caches.k[0].shape[2] == 5 + 8 and caches.k[2].shape[2] == 30
        assert caches.lengths == [30, 30]
    gen = lm.generate(idx[:, :8], 6)
    assert gen.shape == (2, 14) and torch.equal(gen[:, :8], idx[:, :8])


def test_linear_layers(device):
    lm = aenn.TransformerLM(61, 32, 4, pattern="LR", num_layers=2, window=4, backend="sdpa").to(device)
    idx = torch.randint(0, 61, (1, 20), device=device)
    with torch.no_grad():
        full, _ = lm(idx)
        caches = lm.new_caches()
        inc = torch.cat([lm(idx[:, :9], caches=caches)[0]] + [lm(idx[:, t:t + 1], caches=caches)[0]
                                                               for t in range(9, 20)], 1)
    assert_close(inc, full, "plain-PyTorch linear layers, cached")
    lm = randomize(lm, std=0.2)
    with torch.no_grad():
        ref, _ = lm(idx)
        lm.set_backend("attention_ext")
        ours, _ = lm(idx)
    assert_close(ours, ref, "linear layers on attention_ext.linear_attention")


DOCS = [[7, 15, 3, 11], [20, 16]]  # document lengths of two packed rows (36 tokens each)


def packed_rows(dtype=torch.float64):
    """A float64 LM (local layers see 5 keys back, GQA) and two rows packed differently:
    (idx, cu_seqlens (2, 5), the short row repeating its end)."""
    torch.manual_seed(0)
    lm = randomize(aenn.TransformerLM(61, 48, 4, pattern="LG", num_layers=4, num_kv_heads=2, window=5),
                   std=0.2).to(dtype)
    idx = torch.randint(0, 61, (2, 36), generator=torch.Generator().manual_seed(7))
    cu = torch.zeros(2, 5, dtype=torch.int32)
    for row, lengths in enumerate(DOCS):
        cu[row, 1:] = torch.tensor(lengths + [0] * (4 - len(lengths))).cumsum(0)
    return lm, idx, cu


def documents(row):
    start = 0
    for length in DOCS[row]:
        yield start, start + length
        start += length


@pytest.mark.parametrize("backend", ["attention_ext", "sdpa"])
def test_packed_documents_match_separate_runs(backend, device):
    """Each document of a packed row gives the logits, and the same gradient contribution,
    as running it alone. float64 throughout except RMSNorm, which normalises in float32:
    the two runs round the same values there, so they agree to float32 rounding (1e-6)."""
    lm, idx, cu = packed_rows()
    lm = lm.to(device).set_backend(backend)
    idx, cu = idx.to(device), cu.to(device)
    w = torch.randn(2, 36, 61, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(device)
    logits, _ = lm(idx, cu_seqlens=cu)
    (logits * w).sum().backward()
    packed_grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    for row in range(2):
        for a, b in documents(row):
            alone, _ = lm(idx[row:row + 1, a:b])
            assert_close(logits[row:row + 1, a:b], alone, f"row {row} document {a}:{b}", rel=1e-6)
            (alone * w[row:row + 1, a:b]).sum().backward()  # the gradients of all documents add up
    for (name, p), g in zip(lm.named_parameters(), packed_grads):
        assert_close(g, p.grad, f"grad {name}", rel=1e-6)


def test_packed_position_ids_and_shared_boundaries(device):
    """position_ids that restart at 0 are the same documents as their cu_seqlens; one
    (S+1,) row of boundaries serves every batch row."""
    lm, idx, cu = packed_rows()
    lm, idx, cu = lm.to(device), idx.to(device), cu.to(device)
    pos = torch.cat([torch.arange(b - a) for a, b in documents(0)]).to(device)
    with torch.no_grad():
        by_cu, _ = lm(idx, cu_seqlens=cu[0])
        by_pos, _ = lm(idx, position_ids=pos)
        by_rows, _ = lm(idx, position_ids=pos.expand(2, -1))
        want, _ = lm(idx[:1], cu_seqlens=cu[:1])
    assert torch.equal(by_pos, by_cu)
    assert_close(by_rows, by_cu, "per-row boundaries", rel=1e-12)
    assert_close(by_cu[:1], want, "shared boundaries", rel=1e-12)
    with pytest.raises(ValueError, match="not both"):
        lm(idx, cu_seqlens=cu, position_ids=pos)
    with pytest.raises(ValueError, match="cache"):
        lm(idx, cu_seqlens=cu, caches=lm.new_caches(idx.shape[0], 64))
    lin = aenn.TransformerLM(61, 32, 4, pattern="R", num_layers=1).to(device)
    with pytest.raises(NotImplementedError, match="linear"):
        lin(idx, cu_seqlens=cu)


def test_packed_rotary_positions_restart(device, monkeypatch):
    """RoPE restarts at each document: the rotated queries and keys that reach the kernel are
    those of the document alone. (The logits cannot show it: scores depend only on position
    differences, so a missed restart changes them by rounding alone.)"""
    from attention_ext import functional

    lm, idx, cu = packed_rows()
    lm, idx, cu = lm.to(device), idx.to(device), cu.to(device)
    seen = []
    orig = functional.flash_attention

    def spy(q, k, v, **kw):
        seen.append((q, k))
        return orig(q, k, v, **kw)

    monkeypatch.setattr(functional, "flash_attention", spy)
    with torch.no_grad():
        lm(idx, cu_seqlens=cu)
        (q, k), = seen[:1]
        for a, b in documents(1):
            seen.clear()
            lm(idx[1:, a:b])
            qa, ka = seen[0]
            assert_close(q[1:, :, a:b], qa, f"rotated queries {a}:{b}", rel=1e-6)
            assert_close(k[1:, :, a:b], ka, f"rotated keys {a}:{b}", rel=1e-6)
