"""ALiBi (alibi_slopes) and attention sinks (sinks) in every pattern of the kernel family,
forward and backward (sinks' own gradient included), against the float64 reference."""

import math

import pytest
import torch

import attention_ext as ae
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R
from _harness import check_attention, check_compiles, make_qkv, opcheck_attention, pattern_cases

N = 150
LAYOUT = ae.patterns.bigbird(N, 16, num_heads=4, seed=3)
CASES = pattern_cases(N, LAYOUT, nq_dense=130)
# slopes large enough that the bias moves the result (checked below), sinks around the scores
SLOPES = torch.tensor([0.5, 0.25, 0.06, 0.01])
SINKS = torch.tensor([3.0, -1.0, 5.0, 0.0])
MODS = ["alibi", "sinks", "alibi_sinks_softcap"]


def _sinks(device, dtype=torch.float32, n=4):
    """A fresh leaf copy of SINKS[:n] that requires grad."""
    return SINKS[:n].to(device, dtype).clone().requires_grad_()


def _mods(name, nq, nk, dtype, device, batch=1, cu_q=None, cu_k=None):
    """(function kwargs, reference kwargs, sinks tensor or None) of a modifier case."""
    kw, ref = {}, {}
    sinks = None
    if "alibi" in name:
        slopes = SLOPES if batch == 1 else torch.stack([SLOPES * (b + 1) for b in range(batch)])
        kw["alibi_slopes"] = slopes.to(device)
        ref["bias"] = R.alibi_bias(slopes, nq, nk, cu_q, cu_k)
    if "sinks" in name:
        sinks = _sinks(device, torch.float64 if dtype == torch.float64 else torch.float32)
        kw["sinks"] = sinks
        ref["sinks"] = sinks
    if "softcap" in name:
        kw["softcap"] = ref["softcap"] = 3.0
    return kw, ref


def _check(fn, q, k, v, mask, name, **extra):
    kw, ref = _mods(name, q.shape[2], k.shape[2], q.dtype, q.device, batch=q.shape[0], **extra)
    return check_attention(lambda q, k, v: fn(q, k, v, **kw), q, k, v, mask, **ref)


# every pattern with all terms at once (they compose), each term alone on dense and windowed
PAIRS = [(c, "alibi_sinks_softcap") for c in CASES] + [(c, m) for c in (CASES[0], CASES[2]) for m in MODS[:2]]


@pytest.mark.parametrize("case, mod", PAIRS, ids=[f"{c[0]}-{m}" for c, m in PAIRS])
def test_patterns_match_reference(device, case, mod):
    _, fn, mask, nq = case
    q, k, v = make_qkv(1, 4, 2, nq, N, 32, device=device, scale_inputs=1.5)
    _check(fn, q, k, v, mask, mod)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mod", ["alibi", "alibi_sinks_softcap"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
def test_dtypes_match_reference(device, case, mod, dtype):
    _, fn, mask, nq = case
    q, k, v = make_qkv(1, 4, 2, nq, N, 64, dtype=dtype, device=device, scale_inputs=1.5)
    _check(fn, q, k, v, mask, mod)


def test_terms_bind():
    """Neither term is negligible for the inputs above (else the tests could not fail)."""
    q, k, v = make_qkv(1, 4, 2, 130, N, 32, scale_inputs=1.5)
    plain, plain_lse = R.attention(q, k, v)
    biased, _ = R.attention(q, k, v, bias=R.alibi_bias(SLOPES, 130, N))
    sunk, sunk_lse = R.attention(q, k, v, sinks=SINKS)
    assert (biased - plain).abs().max() > 0.1
    assert (sunk - plain).abs().max() > 0.1 and (sunk_lse - plain_lse).abs().max() > 0.1


def test_alibi_is_symmetric_and_causal_is_the_papers():
    """Bidirectional rows see -slope * |p - j| on both sides; under causal only j <= p exist
    and the bias is the paper's -slope * (p - j), whatever the query offset."""
    b = R.alibi_bias(torch.tensor([1.0]), 3, 5)[0, 0]
    assert torch.equal(b, -torch.tensor([[2.0, 1, 0, 1, 2], [3, 2, 1, 0, 1], [4, 3, 2, 1, 0]]))
    # the public function against a literal dense computation for one head, causal, Nq < Nk
    q, k, v = make_qkv(1, 1, 1, 3, 5, 8)
    out = ae.flash_attention(q, k, v, causal=True, alibi_slopes=torch.tensor([0.7]))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    i, j = torch.arange(3).view(-1, 1) + 2, torch.arange(5)
    s = (s - 0.7 * (i - j)).masked_fill(j > i, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


def test_per_batch_slopes_gqa_and_key_mask(device):
    B, Nq, Nk = 3, 40, 57
    q, k, v = make_qkv(B, 4, 1, Nq, Nk, 16, device=device)
    key_mask = torch.rand(B, Nk) > 0.3
    key_mask[2] = False  # a row with no key: zeros, lse = the sink
    kw, ref = _mods("alibi_sinks_softcap", Nq, Nk, q.dtype, device, batch=B)
    out, lse = check_attention(
        lambda q, k, v: ae.flash_attention(q, k, v, causal=True, key_mask=key_mask.to(device), return_lse=True, **kw),
        q, k, v, R.causal_mask(Nq, Nk) & key_mask.view(B, 1, 1, Nk), **ref)
    assert torch.equal(out[2].cpu(), torch.zeros_like(out[2].cpu()))
    torch.testing.assert_close(lse[2].cpu(), SINKS.view(4, 1).expand(4, Nq))


@pytest.mark.parametrize("packing", ["shared", "cross"])
def test_packed_documents(device, packing):
    """ALiBi positions are document-local (bottom-right per document), sinks per row."""
    if packing == "shared":
        cu = [0, 30, 30, 75, 100]
        cu_q = cu_k = cu
        kw = dict(cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device))
    else:
        cu_q, cu_k = [0, 10, 10, 35, 40], [0, 30, 42, 75, 100]
        kw = dict(cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
                  cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device))
    q, k, v = make_qkv(1, 4, 2, cu_q[-1], cu_k[-1], 16, device=device)
    mask = R.packed_mask(cu_q, cu_k, R.causal_mask)
    mods, ref = _mods("alibi_sinks_softcap", cu_q[-1], cu_k[-1], q.dtype, device, cu_q=cu_q, cu_k=cu_k)
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, return_lse=True, **kw, **mods),
                    q, k, v, mask, **ref)
    # windows within documents compose too
    mask = R.packed_mask(cu_q, cu_k, lambda a, b: R.window_mask(a, b, 6, 3))
    check_attention(
        lambda q, k, v: ae.sliding_window_attention(q, k, v, (6, 3), return_lse=True, **kw, **mods), q, k, v, mask,
        **ref)


def test_no_keys_at_all(device):
    q = torch.randn(1, 4, 5, 8, device=device)
    k = torch.randn(1, 2, 0, 8, device=device)
    sinks = _sinks(device)
    out, lse = ae.flash_attention(q, k, k, sinks=sinks, alibi_slopes=SLOPES.to(device), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks.detach().view(1, 4, 1).expand(1, 4, 5))
    (lse.sum() * 2).backward()  # lse = sink on every row: d/dsink = 2 per row
    torch.testing.assert_close(sinks.grad, torch.full((4,), 10.0, device=device))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(device, causal):
    q, k, v = make_qkv(1, 2, 1, 6, 9, 4, dtype=torch.float64, device=device, scale_inputs=2.0)
    sinks = _sinks(device, torch.float64, 2)
    slopes = SLOPES[:2].to(device)
    torch.autograd.gradcheck(
        lambda q, k, v, s: ae.flash_attention(q, k, v, causal=causal, softcap=2.0, alibi_slopes=slopes, sinks=s,
                                              return_lse=True), (q, k, v, sinks))


def test_gradcheck_window_packed(device):
    q, k, v = make_qkv(1, 2, 1, 12, 12, 4, dtype=torch.float64, device=device)
    sinks = _sinks(device, torch.float64, 2)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    torch.autograd.gradcheck(
        lambda q, k, v, s: ae.sliding_window_attention(q, k, v, (3, 1), cu_seqlens=cu, sinks=s,
                                                       alibi_slopes=SLOPES[:2].to(device), return_lse=True),
        (q, k, v, sinks), fast_mode=True)


def test_sinks_gradient_does_not_depend_on_threads():
    q, k, v = make_qkv(2, 4, 2, 300, 300, 32)
    sinks = _sinks("cpu")
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = ae.flash_attention(q, k, v, causal=True, alibi_slopes=SLOPES, sinks=sinks)
            grads.append(torch.autograd.grad(out, (q, k, v, sinks), torch.ones_like(out)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    q, k, v = make_qkv(2, 4, 2, 19, 23, 16, dtype=dtype, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sinks = _sinks(device, acc)
    slopes = torch.stack([SLOPES, SLOPES / 2]).to(device, acc)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, softcap=2.0, mask_kind=MASK_KINDS["window"], causal=True,
                                             window_left=5, alibi_slopes=slopes, sinks=sinks))


def test_torch_compile_fullgraph(device):
    q, k, v = make_qkv(1, 4, 2, 65, 65, 32, device=device)
    sinks = _sinks(device)
    slopes = SLOPES.to(device)
    check_compiles(lambda q, k, v, s: ae.sliding_window_attention(q, k, v, 8, causal=True, alibi_slopes=slopes,
                                                                  sinks=s).square().sum(), q, k, v, sinks)


def test_alibi_slopes_function():
    # the paper's geometric sequence for powers of two, 2^(-8/n) ...
    torch.testing.assert_close(ae.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # other head counts: the closest power of two's slopes, then every other slope of the next
    torch.testing.assert_close(ae.alibi_slopes(12),
                               torch.cat([ae.alibi_slopes(8), ae.alibi_slopes(16)[0::2][:4]]))
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n in (1, 3, 5, 6, 12, 16, 20, 40):
        # BLOOM's alibi at position 1 is its slope
        bloom = build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]
        torch.testing.assert_close(ae.alibi_slopes(n), bloom, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="num_heads"):
        ae.alibi_slopes(0)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_nn_attention_alibi_matches_sdpa_backend(kind):
    torch.manual_seed(0)
    layer = ae.nn.Attention(64, 4, num_kv_heads=2, kind=kind, window=9, position="alibi")
    assert layer.rope is None and "position=alibi" in repr(layer)
    x = torch.randn(2, 37, 64)
    ours = layer(x)
    layer.backend = "sdpa"
    torch.testing.assert_close(ours, layer(x), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="position"):
        ae.nn.Attention(64, 4, position="sinusoidal")


_FN = [
    lambda q, **kw: ae.flash_attention(q, q, q, **kw),
    lambda q, **kw: ae.sliding_window_attention(q, q, q, 2, **kw),
    lambda q, **kw: ae.neighborhood_attention(q, q, q, 3, **kw),
    lambda q, **kw: ae.block_sparse_attention(q, q, q, torch.ones(1, 1, 1, dtype=torch.bool), block_size=8, **kw),
]


@pytest.mark.parametrize("arg, value, exc, match", [
    ("alibi_slopes", torch.ones(3), ValueError, "alibi_slopes must have shape"),
    ("alibi_slopes", torch.ones(2, 2), ValueError, "alibi_slopes must have shape"),
    ("alibi_slopes", torch.ones(2, dtype=torch.float16), TypeError, "alibi_slopes must be float32"),
    ("alibi_slopes", [0.5, 0.25], TypeError, "alibi_slopes must be a torch.Tensor"),
    ("alibi_slopes", torch.tensor([0.5, float("nan")]), ValueError, "alibi_slopes must hold finite"),
    ("alibi_slopes", torch.ones(2, requires_grad=True), ValueError, "alibi_slopes get no gradient"),
    ("alibi_slopes", torch.ones(2, device="meta"), ValueError, "alibi_slopes.device"),
    ("sinks", torch.ones(3), ValueError, "sinks must have shape"),
    ("sinks", torch.ones(1, 2), ValueError, "sinks must have shape"),
    ("sinks", torch.ones(2, dtype=torch.int64), TypeError, "sinks must be a floating-point"),
    ("sinks", torch.tensor([0.0, float("inf")]), ValueError, "sinks must hold finite"),
    ("sinks", torch.ones(2, device="meta"), ValueError, "sinks.device"),
])
@pytest.mark.parametrize("fn", _FN, ids=["flash", "window", "neighborhood", "block_sparse"])
def test_bad_input(fn, arg, value, exc, match):
    with pytest.raises(exc, match=match):
        fn(torch.randn(1, 2, 5, 8), **{arg: value})


def test_direct_op_call_checks():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match="sinks must be Float"):
        AttentionSpec(scale=1.0, sinks=torch.ones(2, dtype=torch.float64)).forward(q, q, q)
    with pytest.raises(ValueError, match=r"alibi_slopes has shape \[2, 3\]"):
        AttentionSpec(scale=1.0, alibi_slopes=torch.ones(2, 3)).forward(q, q, q)


def test_vmap_and_func_grad():
    """torch.vmap folds per-batch slopes into the batch; with sinks the backward runs per
    vmap index (dsinks sums over the batch), and torch.func.grad reaches sinks."""
    q = torch.randn(3, 2, 4, 10, 8, dtype=torch.float64)  # vmapped dim 3 over batch 2
    k, v = (torch.randn(3, 2, 2, 12, 8, dtype=torch.float64) for _ in range(2))
    slopes = SLOPES.double()

    def f(q, k, v, s):
        return ae.flash_attention(q, k, v, causal=True, alibi_slopes=slopes, sinks=s)

    s = SINKS.double()
    torch.testing.assert_close(torch.vmap(f, in_dims=(0, 0, 0, None))(q, k, v, s),
                               torch.stack([f(q[i], k[i], v[i], s) for i in range(3)]))
    grads = torch.vmap(torch.func.grad(lambda q, s: f(q, k[0], v[0], s).square().sum(), argnums=(0, 1)),
                       in_dims=(0, None))(q, s)
    for i in range(3):
        qi, si = q[i].clone().requires_grad_(), s.clone().requires_grad_()
        f(qi, k[0], v[0], si).square().sum().backward()
        torch.testing.assert_close(grads[0][i], qi.grad)
        torch.testing.assert_close(grads[1][i], si.grad)


@pytest.mark.parametrize("kind", ["global", "local"])
@pytest.mark.parametrize("page_size", [None, 4])
def test_nn_attention_alibi_decodes_through_a_kvcache(kind, page_size):
    # a prompt chunk, then one token at a time, equals the full forward; every single-token
    # step runs the CPU decode kernel (no per-row fallback, no concatenation)
    torch.manual_seed(0)
    layer = ae.nn.Attention(64, 4, num_kv_heads=2, kind=kind, window=9, position="alibi").eval()
    x = torch.randn(2, 30, 64)
    window = (layer.left, 0) if kind == "local" else None
    cache = ae.KVCache(2, 2, 16, 30, windows=[window], chunk=8, page_size=page_size)
    with torch.no_grad():
        full = layer(x)
        parts = [layer(x[:, :8], cache)]
        cache.advance(8)
        calls = ae._C._cpu_decode_kernel_stats()[0]
        for t in range(8, 30):
            parts.append(layer(x[:, t:t + 1], cache))
            cache.advance(1)
        assert ae._C._cpu_decode_kernel_stats()[0] == calls + 22
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=2e-5)
