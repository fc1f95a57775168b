"""Attention dropout (dropout_p, SDPA's meaning) inside the kernels: the keep decisions
are Philox4x32-10 of (batch, head, query, key) under a seed drawn from the generator
(csrc/common/dropout.h), checked against an independent float64 reference that draws
the same decisions from its own Philox (tests/reference.py)."""

import math

import pytest
import torch

import attention_ext as ae
from attention_ext._spec import AttentionSpec
import reference as R
from _harness import check_attention, check_compiles, make_qkv, opcheck_attention, pattern_cases

N = 70
LAYOUT = ae.patterns.bigbird(N, 16, num_heads=4, seed=3)
CASES = pattern_cases(N, LAYOUT, nq_dense=50)
P = 0.3


def seed_of(generator):
    """The (seed, offset) tensor a call with this generator draws (from a copy of its state)."""
    g = torch.Generator(generator.device).set_state(generator.get_state())
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=g, device=generator.device).cpu()


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10: the reference generator is Philox
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in kat:
        assert tuple(int(w) for w in R.philox4x32_10(*ctr, *key)) == want


def kernel_keep(seed, p, B, H, Nq, Nk, device="cpu", **kw):
    """The kernel's own keep decisions, read back: uniform probabilities (q = 0) over an
    identity V give out[i, j] = keep_ij / (Nk (1 - p))."""
    q = torch.zeros(B, H, Nq, 8, device=device)
    k = torch.randn(B, H, Nk, 8, device=device)
    v = torch.eye(Nk, device=device).expand(B, H, Nk, Nk).contiguous()
    out, _ = torch.ops.attention_ext.attention_fwd(q, k, v, scale=1.0, dropout_p=p, dropout_seed=seed, **kw)
    scaled = out.cpu() * Nk * (1 - p)
    assert torch.allclose(scaled, scaled.round(), atol=1e-4)
    return scaled.round().bool()


def test_kernel_mask_is_the_reference_mask_and_keeps_1_minus_p(device):
    seed = torch.tensor([0x0123456789ABCDEF, 77], dtype=torch.int64)
    B, H, Nq, Nk = 2, 3, 130, 200  # odd key offsets and several key tiles
    keep = kernel_keep(seed.to(device), P, B, H, Nq, Nk, device=device)
    assert torch.equal(keep, R.dropout_keep(seed, P, B, H, Nq, Nk))
    # the keep rate over 156000 decisions is within 4 sigma of 1 - p
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - P)) <= 4 * math.sqrt(P * (1 - P) / n), rate
    # the words are not correlated across neighbouring keys or queries
    x = keep.double() - rate
    for dim in (-1, -2):
        a, b = x.narrow(dim, 0, x.shape[dim] - 1), x.narrow(dim, 1, x.shape[dim] - 1)
        corr = (a * b).mean().item() / (P * (1 - P))
        assert abs(corr) < 4 / math.sqrt(n), (dim, corr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(device, case, dtype):
    _, fn, mask, nq = case
    q, k, v = make_qkv(1, 4, 2, nq, N, 32, dtype=dtype, device=device)
    g = torch.Generator(device).manual_seed(5)
    Z = R.dropout_multiplier(seed_of(g), P, 1, 4, nq, N)
    check_attention(lambda q, k, v: fn(q, k, v, dropout_p=P, generator=g), q, k, v, mask, dropout=Z)


def test_gqa_key_mask_softcap_and_cross_lengths(device):
    q, k, v = make_qkv(2, 6, 2, 40, 90, 16, device=device)
    key_mask = (torch.rand(2, 90) > 0.3).to(device)
    g = torch.Generator(device).manual_seed(11)
    Z = R.dropout_multiplier(seed_of(g), 0.5, 2, 6, 40, 90)
    mask = key_mask.cpu()[:, None, None, :] & R.causal_mask(40, 90)
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, key_mask=key_mask, softcap=2.0,
                                                       dropout_p=0.5, generator=g, return_lse=True),
                    q, k, v, mask, softcap=2.0, dropout=Z)


def test_packed_documents_key_the_rows_of_the_tensors(device):
    # CUDA runs one call per document, keyed by the spec's row bases
    cu = torch.tensor([0, 13, 13, 50, 64], dtype=torch.int32)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, device=device)
    g = torch.Generator(device).manual_seed(3)
    Z = R.dropout_multiplier(seed_of(g), P, 1, 2, 64, 64)
    mask = R.packed_mask(cu[None], cu[None], R.causal_mask)
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, cu_seqlens=cu.to(device), dropout_p=P,
                                                       generator=g, return_lse=True), q, k, v, mask, dropout=Z)


def run(q, k, v, seed, p=P):
    out = ae.flash_attention(q, k, v, causal=True, dropout_p=p,
                             generator=torch.Generator(q.device).manual_seed(seed))
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return (out,) + grads


def test_same_seed_is_bitwise_repeatable_and_seeds_differ(device):
    q, k, v = make_qkv(1, 2, 1, 100, 100, 32, device=device)
    a, b, c = run(q, k, v, 1), run(q, k, v, 1), run(q, k, v, 2)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_default_generator_is_used_and_advanced():
    q, k, v = make_qkv(1, 2, 2, 30, 30, 16)
    torch.manual_seed(4)
    a = ae.flash_attention(q, k, v, dropout_p=P)
    b = ae.flash_attention(q, k, v, dropout_p=P)
    torch.manual_seed(4)
    assert torch.equal(ae.flash_attention(q, k, v, dropout_p=P), a)
    assert not torch.equal(a, b)


def test_p_zero_is_bitwise_no_dropout(device):
    q, k, v = make_qkv(1, 2, 2, 90, 90, 32, device=device)
    state = torch.get_rng_state()
    a = run(q, k, v, 0, p=0.0)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    out = ae.flash_attention(q, k, v, causal=True)
    b = (out,) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bitwise_the_same_on_1_and_2_threads(dtype):
    q, k, v = make_qkv(2, 4, 2, 200, 200, 32, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, v, 8)
        torch.set_num_threads(2)
        two = run(q, k, v, 8)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


def test_mean_over_seeds_converges_to_no_dropout():
    q, k, v = make_qkv(1, 1, 1, 16, 48, 16, dtype=torch.float64)
    want = ae.flash_attention(q, k, v)
    n = 400
    mean = sum(ae.flash_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(s))
               for s in range(n)) / n
    one = ae.flash_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(n))
    err, err1 = (mean - want).abs().max().item(), (one - want).abs().max().item()
    assert err < err1 / 8  # ~ 1/sqrt(n) = 1/20 of one sample's error
    assert err < 0.1


def test_gradcheck_with_a_fixed_generator():
    q, k, v = make_qkv(1, 2, 1, 9, 11, 4, dtype=torch.float64)
    fn = lambda q, k, v: ae.sliding_window_attention(q, k, v, 3, dropout_p=0.4,  # noqa: E731
                                                     generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck_and_compile():
    q, k, v = make_qkv(1, 2, 1, 20, 20, 16)
    seed = torch.tensor([5, 6], dtype=torch.int64)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, causal=True, dropout_p=P, dropout_seed=seed))

    def loss(q, k, v):
        spec = AttentionSpec(scale=0.25, causal=True, dropout_p=P, dropout_seed=torch.tensor([5, 6]))
        return spec.forward(q, k, v)[0].square().sum()

    check_compiles(loss, q, k, v)
    # the public call (a seed drawn from the default generator) traces in one graph too
    f = torch.compile(lambda q, k, v: ae.flash_attention(q, k, v, dropout_p=P).sum(), fullgraph=True,
                      backend="aot_eager")
    f(q, k, v).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout_p(p):
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="dropout_p"):
        ae.flash_attention(q, k, v, dropout_p=p)


def test_bad_arguments():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(TypeError, match="dropout_p"):
        ae.flash_attention(q, k, v, dropout_p="0.1")
    with pytest.raises(TypeError, match="dropout_p"):
        ae.sliding_window_attention(q, k, v, 2, dropout_p=True)
    with pytest.raises(TypeError, match="generator"):
        ae.flash_attention(q, k, v, dropout_p=0.1, generator=3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            ae.flash_attention(q, k, v, dropout_p=0.1, generator=torch.Generator("cuda"))
    op = torch.ops.attention_ext.attention_fwd
    with pytest.raises(ValueError, match="dropout_seed"):
        op(q, k, v, scale=1.0, dropout_p=0.1)
    with pytest.raises(TypeError, match="dropout_seed must be int64"):
        op(q, k, v, scale=1.0, dropout_p=0.1, dropout_seed=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="dropout_seed must have shape"):
        op(q, k, v, scale=1.0, dropout_p=0.1, dropout_seed=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        op(q, k, v, scale=1.0, dropout_p=1.0, dropout_seed=torch.zeros(2, dtype=torch.int64))


def test_nn_attention_drops_in_training_only():
    import attention_ext.nn as aenn

    torch.manual_seed(0)
    for kind in ("global", "local"):
        layer = aenn.Attention(32, 4, kind=kind, window=5, dropout=0.25)
        x = torch.randn(2, 19, 32)
        plain = aenn.Attention(32, 4, kind=kind, window=5)
        plain.load_state_dict(layer.state_dict())
        layer.eval()
        assert torch.equal(layer(x), plain(x))  # eval: no dropout
        layer.train()
        torch.manual_seed(1)
        a = layer(x)
        torch.manual_seed(1)
        assert torch.equal(layer(x), a)
        assert (a - plain(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="dropout"):
        aenn.Attention(32, 4, dropout=1.0)
