"""Reliability: fuzzed shapes against the float64 reference, numerics at the edges,
determinism, what autograd saves, and bad input for every public function.

Hypothesis runs derandomised (the same examples every run); `-m slow` runs the long
sweep with many more examples."""

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attention_ext as ae
import reference as R
from attention_ext._spec import MASK_KINDS, AttentionSpec

FUZZ = settings(derandomize=True, deadline=None, max_examples=60, suppress_health_check=list(HealthCheck))
FUZZ_SLOW = settings(derandomize=True, deadline=None, max_examples=600, suppress_health_check=list(HealthCheck))


@st.composite
def attention_case(draw):
    kind = draw(st.sampled_from(["flash", "window", "neighborhood", "block"]))
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4]))
    Nq = draw(st.integers(1, 160))
    Nk = Nq if kind == "neighborhood" else draw(st.integers(1, 160))
    D = draw(st.sampled_from([8, 16, 24, 40, 64, 72]))
    Dv = draw(st.sampled_from([D, 16]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    causal = draw(st.booleans())
    layout_q = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    grad_layout = draw(st.sampled_from(["contiguous", "expanded"]))
    spec = {}
    if kind == "window":
        spec["window"] = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
        spec["dilation"] = draw(st.integers(1, 4))
        g = draw(st.sampled_from(["none", "count", "mask"]))
        if g == "count":
            spec["global_tokens"] = draw(st.integers(0, 5))
        elif g == "mask":
            spec["global_tokens"] = draw(st.lists(st.integers(0, Nk - 1), max_size=4))
    elif kind == "neighborhood":
        d = draw(st.integers(1, min(3, Nk)))
        kmax = Nk // d  # NATTEN: kernel_size * dilation <= N
        spec["kernel_size"] = draw(st.integers(0, (kmax - 1) // 2)) * 2 + 1
        spec["dilation"] = d
    elif kind == "block":
        bs = draw(st.sampled_from([8, 16, 32, 48]))
        spec["block_size"] = bs
        spec["seed"] = draw(st.integers(0, 1000))
    spec["softcap"] = draw(st.sampled_from([None, None, 0.5, 5.0]))
    spec["key_mask"] = draw(st.sampled_from(["none", "none", "left", "right", "random"]))
    return kind, B, Hkv, group, Nq, Nk, D, Dv, dtype, causal, layout_q, grad_layout, spec


def _key_mask(how, B, Nk, gen):
    """Per-batch padding: left/right runs of random length (a row may lose every key) or holes."""
    if how == "random":
        return torch.rand(B, Nk, generator=gen) > 0.4
    cut = torch.randint(0, Nk + 1, (B, 1), generator=gen)
    pos = torch.arange(Nk).view(1, -1)
    return pos >= cut if how == "left" else pos < cut


def _make(shape, dtype, layout, gen):
    B, H, N, D = shape
    base = torch.randn(B, N, H, D + 3, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "transposed":  # (B, N, H, D+3) viewed as (B, H, N, D): non-contiguous
        t = base[..., :D].transpose(1, 2)
    elif layout == "sliced":
        t = base.transpose(1, 2).contiguous()[..., 1:D + 1]
    else:
        t = base[..., :D].transpose(1, 2).contiguous()
    return t.requires_grad_()


def _run(case):
    kind, B, Hkv, group, Nq, Nk, D, Dv, dtype, causal, layout_q, grad_layout, spec = case
    Hq = Hkv * group
    gen = torch.Generator().manual_seed(Nq * 1000 + Nk)
    q = _make((B, Hq, Nq, D), dtype, layout_q, gen)
    k = _make((B, Hkv, Nk, D), dtype, "contiguous", gen)
    v = _make((B, Hkv, Nk, Dv), dtype, "sliced", gen)
    km = None if spec["key_mask"] == "none" else _key_mask(spec["key_mask"], B, Nk, gen)
    extra = dict(softcap=spec["softcap"], key_mask=km)
    if kind == "flash":
        fn = lambda q, k, v: ae.flash_attention(q, k, v, causal=causal, return_lse=True, **extra)  # noqa: E731
        mask = R.causal_mask(Nq, Nk) if causal else None
    elif kind == "window":
        left, right = spec["window"]
        right = 0 if causal else right
        gt = spec.get("global_tokens")
        mask = R.window_mask(Nq, Nk, left, right, dilation=spec["dilation"], causal=causal)
        if isinstance(gt, list):
            g = torch.zeros(Nk, dtype=torch.bool)
            g[gt] = True
            mask = mask | R.global_mask_2d(Nq, Nk, g, causal=causal)
            gt = g
        elif isinstance(gt, int) and gt > 0:
            g = torch.zeros(Nk, dtype=torch.bool)
            g[:gt] = True
            mask = mask | R.global_mask_2d(Nq, Nk, g, causal=causal)
        fn = lambda q, k, v: ae.sliding_window_attention(  # noqa: E731
            q, k, v, spec["window"], causal=causal, dilation=spec["dilation"], global_tokens=gt, return_lse=True,
            **extra)
    elif kind == "neighborhood":
        mask = R.neighborhood_mask(Nq, spec["kernel_size"], dilation=spec["dilation"], causal=causal)
        fn = lambda q, k, v: ae.neighborhood_attention(  # noqa: E731
            q, k, v, spec["kernel_size"], dilation=spec["dilation"], causal=causal, return_lse=True, **extra)
    else:
        bs = spec["block_size"]
        lg = torch.Generator().manual_seed(spec["seed"])
        layout = torch.rand(Hq, -(-Nq // bs), -(-Nk // bs), generator=lg) < 0.5
        mask = R.block_mask(layout, bs, Nq, Nk).unsqueeze(0)
        if causal:
            mask = mask & R.causal_mask(Nq, Nk)
        fn = lambda q, k, v: ae.block_sparse_attention(  # noqa: E731
            q, k, v, layout, block_size=bs, causal=causal, return_lse=True, **extra)
    if km is not None:
        mask = (torch.ones(Nq, Nk, dtype=torch.bool) if mask is None else mask) & km.view(B, 1, 1, Nk)
    out, lse = fn(q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = R.attention(q64, k64, v64, mask, softcap=spec["softcap"])
    lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        lowp_out = R.attention_lowp(ql, kl, vl, mask, softcap=spec["softcap"])
        lowp = lowp_out
    R.check_close(out, ref, lowp=lowp, what=f"{kind} out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse.to(lse.dtype)))
    # from the example's own generator: the same example gives the same result (hypothesis
    # calls an example again to check a failure)
    if grad_layout == "expanded":
        g = torch.randn(1, 1, 1, Dv, dtype=torch.float64, generator=gen).to(dtype).expand_as(out)
    else:
        g = torch.randn(out.shape, dtype=torch.float64, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    lowp_grads = (None,) * 3
    if lowp is not None:
        lowp_grads = torch.autograd.grad(lowp, (ql, kl, vl), g)
    for name, a, r, lg_ in zip("qkv", grads, ref_grads, lowp_grads):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        R.check_close(a, r, lowp=lg_, what=f"{kind} d{name}", fp32_rel=2e-4)


@FUZZ
@given(attention_case())
def test_fuzz_attention(case):
    _run(case)


@pytest.mark.slow
@FUZZ_SLOW
@given(attention_case())
def test_fuzz_attention_long(case):
    _run(case)


@st.composite
def linear_case(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4]))
    causal = draw(st.booleans())
    Nq = draw(st.integers(1, 200))
    Nk = Nq if causal else draw(st.integers(1, 200))
    D = draw(st.sampled_from([4, 8, 16, 33, 64]))
    Dv = draw(st.sampled_from([D, 7, 16]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    # relu's normaliser can sit near eps; with 16-bit rounding of q and k that is ill-conditioned
    fmaps = ["elu", "identity"] + (["relu"] if dtype in (torch.float32, torch.float64) else [])
    fmap = draw(st.sampled_from(fmaps))
    normalize = draw(st.booleans())
    chunk = draw(st.integers(1, 130))
    scale = draw(st.sampled_from([None, 0.5]))
    with_state = draw(st.booleans())
    split = draw(st.integers(0, Nq)) if causal else None  # prefill length before linear_attention_step
    layout_q = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    grad_layout = draw(st.sampled_from(["contiguous", "expanded"]))
    return (B, Hkv, group, Nq, Nk, D, Dv, dtype, fmap, causal, normalize, chunk, scale, with_state, split, layout_q,
            grad_layout)


def _run_linear(case):
    (B, Hkv, group, Nq, Nk, D, Dv, dtype, fmap, causal, normalize, chunk, scale, with_state, split, layout_q,
     grad_layout) = case
    Hq = Hkv * group
    gen = torch.Generator().manual_seed(Nq * 1000 + Nk + D)
    q = _make((B, Hq, Nq, D), dtype, layout_q, gen)
    k = _make((B, Hkv, Nk, D), dtype, "contiguous", gen)
    v = _make((B, Hkv, Nk, Dv), dtype, "sliced", gen)
    if fmap == "identity":  # caller-made features are positive (as FAVOR+'s are)
        q, k = (((t.detach().abs() + 0.1) * 0.5).to(dtype).requires_grad_() for t in (q, k))
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    state = None
    if with_state:
        S0 = torch.randn(B, Hkv, D, Dv, generator=gen, dtype=torch.float64).to(sd).requires_grad_()
        z0 = (torch.rand(B, Hkv, D, generator=gen, dtype=torch.float64) * 3).to(sd).requires_grad_()
        state = (S0, z0)
    kw = dict(feature_map=fmap, normalize=normalize, scale=scale)
    out = ae.linear_attention(q, k, v, causal=causal, chunk_size=chunk, initial_state=state, **kw)
    inputs = (q, k, v) + (state if with_state else ())
    f64 = [t.detach().double().requires_grad_() for t in inputs]
    ref, _ = R.linear_attention(*f64[:3], fmap=fmap, causal=causal, normalize=normalize,
                                scale=1.0 if scale is None else scale, state=tuple(f64[3:]) if with_state else None)
    R.check_close_linear(out, ref, dtype, "linear out")
    if grad_layout == "expanded":
        g = torch.randn(1, 1, 1, Dv, generator=gen, dtype=torch.float64).to(dtype).expand_as(out)
    else:
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    # (un-normalised, z0 does not reach the output: its gradient is absent or zero)
    grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, f64, g.double(), allow_unused=True)
    for name, a, r, x in zip(["dq", "dk", "dv", "dS0", "dz0"], grads, ref_grads, inputs):
        a = torch.zeros_like(x) if a is None else a
        r = torch.zeros_like(x, dtype=torch.float64) if r is None else r
        if a.dtype == torch.float16 and r.abs().max() > torch.finfo(torch.float16).max / 4:
            continue  # un-normalised sums over long sequences: the true gradient leaves fp16's range
        assert torch.isfinite(a).all(), f"{name} not finite"
        R.check_close_linear(a, r, dtype, f"linear {name}")
    if split is not None:
        # prefill `split` tokens, then the rest through the recurrent step: the same outputs
        with torch.no_grad():
            head, st_ = ae.linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], causal=True,
                                            chunk_size=chunk, initial_state=state, return_state=True, **kw)
            tail, _ = ae.linear_attention_step(q[:, :, split:], k[:, :, split:], v[:, :, split:], st_, **kw)
        R.check_close_linear(torch.cat([head, tail], 2), ref, dtype, "prefill + step")


@FUZZ
@given(linear_case())
def test_fuzz_linear_attention(case):
    _run_linear(case)


@pytest.mark.slow
@FUZZ_SLOW
@given(linear_case())
def test_fuzz_linear_attention_long(case):
    _run_linear(case)


# ---- numerics at the edges ------------------------------------------------------------

def _qkv(B=1, H=2, Nq=64, Nk=64, D=16, dtype=torch.float32):
    return [torch.randn(B, H, n, D, dtype=dtype, requires_grad=True) for n in (Nq, Nk, Nk)]


def test_nan_in_masked_key_or_value_does_not_leak():
    q, k, v = _qkv(Nq=64, Nk=64)
    with torch.no_grad():
        k[:, :, 40] = float("nan")
        v[:, :, 41] = float("nan")
    # causal window 8: key 40 is seen by queries 40..48 only, key 41 by 41..49
    out = ae.sliding_window_attention(q, k, v, 8, causal=True)
    seen = torch.zeros(64, dtype=torch.bool)
    seen[40:50] = True
    assert torch.isnan(out[:, :, seen]).all(dim=-1).all()  # visible NaN propagates
    assert torch.isfinite(out[:, :, ~seen]).all()  # masked NaN does not leak


@pytest.mark.parametrize("op", ["window", "block", "neighborhood"])
def test_nan_in_unseen_keys_leaves_everything_finite(op):
    # keys nobody sees hold NaN; some share a computed tile with keys that are seen
    if op == "window":  # 32 queries at positions 32..63, causal window 8: keys >= 24 seen
        q, k, v = _qkv(Nq=32, Nk=64)
        bad_k, bad_v = [10, 22], [11, 23]
        fn = lambda q, k, v: ae.sliding_window_attention(q, k, v, 8, causal=True)  # noqa: E731
    elif op == "block":  # key block 0 (keys 0..15) is seen by nobody
        q, k, v = _qkv(Nq=32, Nk=64)
        bad_k, bad_v = [10, 15], [11, 14]
        layout = torch.tensor([[False, True, True, True]] * 2).expand(2, 2, 4)
        fn = lambda q, k, v: ae.block_sparse_attention(q, k, v, layout, block_size=16)  # noqa: E731
    else:  # dilation 2: even keys are seen by even queries only; query rows 0..63 even only
        q, k, v = _qkv(Nq=64, Nk=64)
        bad_k, bad_v = [5, 41], [7, 63]
        fn = lambda q, k, v: ae.neighborhood_attention(q, k, v, 5, dilation=2)  # noqa: E731
    with torch.no_grad():
        k[:, :, bad_k] = float("nan")
        v[:, :, bad_v] = float("nan")
    out = fn(q, k, v)
    if op == "neighborhood":  # odd queries see the NaN keys; even ones must stay clean
        even = torch.arange(64) % 2 == 0
        assert torch.isnan(out[:, :, ~even]).any() and torch.isfinite(out[:, :, even]).all()
        g = torch.zeros_like(out)
        g[:, :, even] = torch.randn_like(out[:, :, even])
        with torch.no_grad():
            q[:, :, ~even] = 0.0  # odd rows: not in the loss; their NaN output has no gradient path
        out = fn(q, k, v)
        out = torch.where(even.view(1, 1, -1, 1), out, torch.zeros_like(out))
    else:
        assert torch.isfinite(out).all()
        g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    if op == "neighborhood":
        dq = dq[:, :, even]
        dk, dv = dk[:, :, even], dv[:, :, even]
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_nan_in_masked_query_or_upstream_grad_does_not_leak():
    q, k, v = _qkv(Nq=64, Nk=64)
    with torch.no_grad():
        q[:, :, 10] = float("nan")
    out = ae.sliding_window_attention(q, k, v, 4, causal=True)
    assert torch.isnan(out[:, :, 10]).all() and torch.isfinite(out[:, :, torch.arange(64) != 10]).all()
    g = torch.randn_like(out)
    g[:, :, 20] = float("nan")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    # query 10 sees keys 6..10, query 20 sees keys 16..20: other keys' grads stay finite
    far = torch.ones(64, dtype=torch.bool)
    far[6:11] = False
    far[16:21] = False
    assert torch.isfinite(dk[:, :, far]).all() and torch.isfinite(dv[:, :, far]).all()
    assert torch.isfinite(dq[:, :, far]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_scores_do_not_overflow(device, dtype):
    q, k, v = (torch.randn(1, 2, 100, 64, device=device).to(dtype) * s for s in (30.0, 30.0, 1.0))
    # scores reach ~1e4 * scale: beyond fp16's range before the max is subtracted
    out = ae.flash_attention(q, k, v, causal=True)
    ref, _ = R.attention(q, k, v, R.causal_mask(100, 100))
    assert torch.isfinite(out).all()
    R.check_close(out, ref, lowp=R.attention_lowp(q, k, v, R.causal_mask(100, 100)))


def test_fully_masked_rows_everywhere(device):
    q, k, v = [t.to(device).detach().requires_grad_() for t in _qkv(Nq=40, Nk=40)]
    layout = torch.zeros(2, 3, 3, dtype=torch.bool, device=device)
    layout[0, 1, 1] = True  # head 0: only block (1, 1); head 1: nothing at all
    out, lse = ae.block_sparse_attention(q, k, v, layout, block_size=16, return_lse=True)
    assert torch.all(out[:, 1] == 0) and torch.isneginf(lse[:, 1]).all()
    assert torch.all(out[:, 0, :16] == 0) and torch.all(out[:, 0, 32:] == 0)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.all(dq[:, 1] == 0) and torch.all(dq[:, 0, :16] == 0)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_empty_tensors_for_every_pattern(device):
    for nq, nk in ((0, 0), (0, 7), (7, 0)):
        q, k, v = [t.to(device).detach().requires_grad_() for t in _qkv(Nq=nq, Nk=nk)]
        outs = [ae.flash_attention(q, k, v), ae.sliding_window_attention(q, k, v, 3)]
        if nq == nk:
            outs.append(ae.neighborhood_attention(q, k, v, 1))
        outs.append(ae.block_sparse_attention(q, k, v, torch.ones(1, -(-nq // 8), -(-nk // 8), dtype=torch.bool,
                                                                   device=device), block_size=8))
        for o in outs:
            assert o.shape == (1, 2, nq, 16) and torch.all(o == 0)


# ---- determinism ------------------------------------------------------------------------

def _all_ops(q, k, v):
    n = q.shape[2]
    return [
        ae.flash_attention(q, k, v, causal=True),
        ae.sliding_window_attention(q, k, v, 37, dilation=2, global_tokens=3),
        ae.neighborhood_attention(q, k, v, 9, dilation=2),
        ae.block_sparse_attention(q, k, v, ae.patterns.bigbird(n, 32, num_heads=q.shape[1]), block_size=32),
        ae.linear_attention(q, k, v, causal=True, chunk_size=48),
        ae.linear_attention(q, k, v, feature_map="relu"),
    ]


def test_forward_and_backward_bitwise_repeatable_across_thread_counts():
    q, k, v = _qkv(B=1, H=2, Nq=333, Nk=333, D=32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1, max(2, threads)):
            torch.set_num_threads(n)
            res = []
            for out in _all_ops(q, k, v):
                res.append(out.detach())
                res.extend(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
            runs.append(res)
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ---- memory: nothing Nq x Nk is saved ---------------------------------------------------

def test_nothing_quadratic_is_saved_for_backward():
    N, D = 1024, 16
    q, k, v = _qkv(B=1, H=1, Nq=N, Nk=N, D=D)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = _all_ops(q, k, v)
    assert saved, "the ops saved nothing: the hook did not see them"
    assert max(saved) <= 4 * N * D, f"a saved tensor has {max(saved)} elements (N^2 = {N * N})"
    torch.autograd.grad(sum(o.sum() for o in outs), (q, k, v))


# ---- bad input: every argument of every public function ---------------------------------

def _base():
    return torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)


COMMON = [
    # (argument, override, exception, fragment)
    ("q", dict(q="x"), TypeError, "q must be a torch.Tensor"),
    ("q rank", dict(q=torch.randn(4, 10, 8)), ValueError, "q must be 4-D"),
    ("k rank", dict(k=torch.randn(2, 10, 8)), ValueError, "k must be 4-D"),
    ("v rank", dict(v=torch.randn(1, 1, 2, 10, 8)), ValueError, "v must be 4-D"),
    ("q dtype", dict(q=torch.zeros(1, 4, 10, 8, dtype=torch.int32)), TypeError, "q.dtype"),
    ("k dtype", dict(k=torch.randn(1, 2, 10, 8, dtype=torch.float64)), TypeError, "k.dtype"),
    ("v dtype", dict(v=torch.randn(1, 2, 10, 8, dtype=torch.bfloat16)), TypeError, "v.dtype"),
    ("k batch", dict(k=torch.randn(2, 2, 10, 8)), ValueError, r"k.shape\[0\]"),
    ("heads", dict(k=torch.randn(1, 3, 10, 8), v=torch.randn(1, 3, 10, 8)), ValueError, "Hkv=3"),
    ("v heads", dict(v=torch.randn(1, 1, 10, 8)), ValueError, "v heads"),
    ("k head_dim", dict(k=torch.randn(1, 2, 10, 4)), ValueError, r"k.shape\[-1\]"),
    ("v seq", dict(v=torch.randn(1, 2, 9, 8)), ValueError, r"v.shape\[2\]"),
    ("scale", dict(scale=0), ValueError, "scale"),
    ("scale type", dict(scale=[1.0]), TypeError, "scale"),
    ("return_lse", dict(return_lse=None), TypeError, "return_lse"),
]

FUNCTIONS = {
    "flash_attention": (lambda q, k, v, **kw: ae.flash_attention(q, k, v, **kw), [
        ("causal", dict(causal=None), TypeError, "causal"),
    ]),
    "sliding_window_attention": (lambda q, k, v, window=3, **kw: ae.sliding_window_attention(q, k, v, window, **kw), [
        ("window", dict(window=-2), ValueError, "window"),
        ("window type", dict(window="3"), TypeError, "window"),
        ("window pair", dict(window=(1,)), ValueError, "window"),
        ("causal", dict(causal=0), TypeError, "causal"),
        ("dilation", dict(dilation=0), ValueError, "dilation"),
        ("window beyond int64", dict(window=2**64), ValueError, "window"),
        ("dilation beyond int64", dict(dilation=2**64), ValueError, "dilation"),
        ("global_tokens beyond int64", dict(global_tokens=2**63), ValueError, "global_tokens"),
        ("global_tokens", dict(global_tokens=-3), ValueError, "global_tokens"),
        ("global_tokens dtype", dict(global_tokens=torch.ones(1, 10)), TypeError, "global_tokens"),
        ("global_tokens shape", dict(global_tokens=torch.ones(1, 11, dtype=torch.bool)), ValueError, "global_tokens"),
    ]),
    "neighborhood_attention": (lambda q, k, v, kernel_size=3, **kw: ae.neighborhood_attention(q, k, v, kernel_size,
                                                                                               **kw), [
        ("kernel_size", dict(kernel_size=0), ValueError, "kernel_size"),
        ("kernel_size type", dict(kernel_size=None), TypeError, "kernel_size"),
        ("kernel_size too big", dict(kernel_size=11), ValueError, "kernel_size"),
        ("kernel_size beyond int64", dict(kernel_size=2**64 + 1), ValueError, "kernel_size"),
        ("dilation beyond int64", dict(dilation=2**64), ValueError, "dilation"),
        ("dilation", dict(dilation=-1), ValueError, "dilation"),
        ("causal", dict(causal="no"), TypeError, "causal"),
        ("lengths", dict(k=torch.randn(1, 2, 12, 8), v=torch.randn(1, 2, 12, 8)), ValueError, "Nq=10, Nk=12"),
    ]),
    "block_sparse_attention": (lambda q, k, v, layout=None, **kw: ae.block_sparse_attention(
        q, k, v, torch.ones(1, 1, 1, dtype=torch.bool) if layout is None else layout, **kw), [
        ("layout type", dict(layout=1), TypeError, "layout"),
        ("layout dtype", dict(layout=torch.ones(1, 1, 1)), TypeError, "layout"),
        ("layout shape", dict(layout=torch.ones(1, 2, 1, dtype=torch.bool)), ValueError, "layout"),
        ("block_size", dict(block_size=0), ValueError, "block_size"),
        ("block_size type", dict(block_size=2.5), TypeError, "block_size"),
        ("block_size beyond int64", dict(block_size=2**64), ValueError, "block_size"),
        ("causal", dict(causal=1), TypeError, "causal"),
    ]),
}

TABLE = [(fn, *case) for fn, (_, extra) in FUNCTIONS.items() for case in COMMON + extra]


@pytest.mark.parametrize("fn,arg,override,exc,fragment", TABLE, ids=[f"{t[0]}-{t[1]}" for t in TABLE])
def test_bad_input_table(fn, arg, override, exc, fragment):
    call, _ = FUNCTIONS[fn]
    q, k, v = _base()
    kwargs = dict(q=q, k=k, v=v)
    if fn == "block_sparse_attention":
        kwargs["block_size"] = 16
    kwargs.update(override)
    with pytest.raises(exc, match=fragment):
        call(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def test_scale_default_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(D=16)
    torch.testing.assert_close(ae.flash_attention(q, k, v), ae.flash_attention(q, k, v, scale=1 / math.sqrt(16)))


# ---- the adversarial probe's cases (issue "Silent wrong gradients ...") ----------------

def test_huge_block_size_with_its_one_block_layout():
    # ceil(N / block_size) must not overflow: with block_size = 2**63 - 1 everything is one block
    q, k, v = _qkv(B=1, H=2, Nq=9, Nk=9, D=8)
    layout = torch.ones(1, 1, 1, dtype=torch.bool)
    out = ae.block_sparse_attention(q, k, v, layout, block_size=2**63 - 1)
    torch.testing.assert_close(out, ae.flash_attention(q, k, v))
    with pytest.raises(ValueError, match=r"layout must have shape \(1 or Hq=2, 1, 1\)"):
        ae.block_sparse_attention(q, k, v, torch.ones(1, 2, 1, dtype=torch.bool), block_size=2**63 - 1)


def test_raw_op_kernel_size_times_dilation_does_not_wrap():
    q = torch.randn(1, 1, 16, 8)
    spec = AttentionSpec(scale=1.0, mask_kind=MASK_KINDS["neighborhood"], kernel_size=2**62 + 1, dilation=4)
    with pytest.raises(RuntimeError, match=r"kernel_size .* \* dilation .* must not exceed the sequence length"):
        spec.forward(q, q, q)


def test_raw_op_huge_window_and_dilation_are_clamped_not_wrapped():
    q, k, v = _qkv(B=1, H=1, Nq=20, Nk=20, D=8)
    spec = AttentionSpec(scale=0.3, mask_kind=MASK_KINDS["window"], window_left=2**63 - 1, window_right=2**63 - 1,
                         dilation=1)
    torch.testing.assert_close(spec.forward(q, k, v)[0], ae.flash_attention(q, k, v, scale=0.3))


@pytest.mark.parametrize("which", ["k", "v", "block_layout", "key_mask", "global_mask", "cu_seqlens_q",
                                   "cu_seqlens_k", "alibi_slopes", "sinks", "dropout_seed", "grad_out", "lse"])
def test_raw_op_mixing_meta_and_cpu_raises(which):
    q = torch.randn(1, 2, 16, 8)
    cu = torch.tensor([[0, 5, 16]], dtype=torch.int32)
    tensors = dict(k=q, v=q, block_layout=torch.ones(1, 1, 1, dtype=torch.bool), key_mask=torch.ones(1, 16,
                   dtype=torch.bool), global_mask=torch.zeros(1, 16, dtype=torch.bool), cu_seqlens_q=cu,
                   cu_seqlens_k=cu, alibi_slopes=torch.ones(1, 2), sinks=torch.zeros(2),
                   dropout_seed=torch.tensor([1, 2]))
    spec = dict(mask_kind=MASK_KINDS["block_layout"], block_size=16, dropout_p=0.1)
    out, lse = AttentionSpec(scale=0.5, **spec, block_layout=tensors["block_layout"],
                             dropout_seed=tensors["dropout_seed"]).forward(q, q, q)
    extra = dict(grad_out=out, lse=lse)
    if which in tensors:
        tensors[which] = tensors[which].to("meta")
    else:
        extra[which] = extra[which].to("meta")
    s = AttentionSpec(scale=0.5, **spec, **{n: tensors[n] for n in AttentionSpec.TENSORS})
    with pytest.raises(RuntimeError, match="one device|must be on q's device"):
        if which in ("grad_out", "lse"):
            s.backward(extra["grad_out"], None, q, tensors["k"], tensors["v"], out, extra["lse"])
        else:
            s.forward(q, tensors["k"], tensors["v"])


def test_raw_linear_op_mixing_meta_and_cpu_raises():
    q = torch.randn(1, 2, 16, 8)
    S, z = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.attention_ext.linear_fwd(q, q, q, S.to("meta"), z, 1, True, True, 1e-6, 1.0, 64)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.attention_ext.linear_step(q, q.to("meta"), q, S, z, 1, True, 1e-6, 1.0)


def test_spec_fields_are_the_schema_arguments():
    # AttentionSpec.op_args() passes the fields positionally: their order is the schema's
    for op, first in ((torch.ops.attention_ext.attention_fwd.default, 3),
                      (torch.ops.attention_ext.attention_bwd.default, 7)):
        names = [a.name for a in op._schema.arguments[first:]]
        assert names == [f.name for f in dataclasses.fields(AttentionSpec)]


# ---- limits are written once (csrc/common/limits.h) and hold on every path -------------

LIMITS = ae._C.limits


def test_head_dim_limit_cpu():
    top = LIMITS["cpu_max_head_dim"]
    q = torch.randn(1, 1, 3, top)
    assert torch.isfinite(ae.flash_attention(q, q, q)).all()
    big = torch.randn(1, 1, 3, top + 1)
    with pytest.raises(ValueError, match=rf"q.shape\[-1\] \(head_dim\) = {top + 1} is not supported on cpu"):
        ae.flash_attention(big, big, big)
    v = torch.randn(1, 1, 3, top + 1)
    with pytest.raises(ValueError, match=r"v.shape\[-1\] \(head_dim\)"):
        ae.flash_attention(q, q, v)
    with pytest.raises(RuntimeError, match=rf"head dims must be in \[1, {top}\]"):
        AttentionSpec(scale=1.0).forward(big, big, big)


@pytest.mark.skipif(not (torch.cuda.is_available() and ae._C.cuda_built), reason="needs a CUDA device")
def test_head_dim_limits_cuda():
    top, tc = LIMITS["cuda_max_head_dim"], LIMITS["cuda_tensor_core_max_head_dim"]
    for d in (tc, tc + 1, top):
        q = torch.randn(1, 1, 3, d, device="cuda", dtype=torch.bfloat16)
        assert torch.isfinite(ae.flash_attention(q, q, q)).all()
    assert ae.explain(q, q, q)["path"] == "simt"
    big = torch.randn(1, 1, 3, top + 1, device="cuda")
    with pytest.raises(ValueError, match=r"head_dim\) = .* is not supported on cuda"):
        ae.flash_attention(big, big, big)


def test_linear_dim_limit():
    top = LIMITS["linear_max_dim"]
    q = torch.randn(1, 1, 1, top) * 0.01
    v = torch.randn(1, 1, 1, 2)
    assert torch.isfinite(ae.linear_attention(q, q, v)).all()
    big = torch.randn(1, 1, 1, top + 1)
    with pytest.raises(ValueError, match=rf"q.shape\[-1\] = {top + 1} must be in 1..{top}"):
        ae.linear_attention(big, big, v)


def test_softcap_range():
    lo, hi = LIMITS["softcap_min"], LIMITS["softcap_max"]
    q = torch.randn(1, 1, 5, 8)
    for ok in (lo, hi):
        assert torch.isfinite(ae.flash_attention(q, q, q, softcap=ok)).all()
    for bad in (lo * (1 - 1e-9), hi * (1 + 1e-9)):
        with pytest.raises(ValueError, match="softcap must be None or 0"):
            ae.flash_attention(q, q, q, softcap=bad)
        with pytest.raises(RuntimeError, match="softcap must be 0"):
            AttentionSpec(scale=1.0, softcap=bad).forward(q, q, q)


def test_explain_names_the_path():
    q = torch.randn(1, 2, 8, 16)
    info = ae.explain(q, q, q)
    assert info["device"] == "cpu" and info["path"] == f"cpu-{ae.cpu_isa()}"
    assert info["max_head_dim"] == LIMITS["cpu_max_head_dim"]


def test_linear_chunk_limit():
    top = LIMITS["linear_max_chunk"]
    q = torch.randn(1, 1, 40, 8)
    ref = ae.linear_attention(q, q, q, causal=True, chunk_size=40)
    torch.testing.assert_close(ae.linear_attention(q, q, q, causal=True, chunk_size=top), ref)
    with pytest.raises(ValueError, match=f"chunk_size must be <= {top}"):
        ae.linear_attention(q, q, q, causal=True, chunk_size=top + 1)
    with pytest.raises(RuntimeError, match=rf"chunk_size must be in \[1, {top}\]"):
        torch.ops.attention_ext.linear_fwd(q, q, q, None, None, 1, True, True, 1e-6, 1.0, top + 1)
