"""attention_ext.linear_attention / linear_attention_step / FavorFeatures.

The reference (tests/reference.py, linear_attention) is written from the documented
formula (attention_ext/linear.py), in float64, as the explicit quadratic form
phi(Q) phi(K)^T with a causal mask; it never calls attention_ext.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import attention_ext
import reference as R
from _harness import check_compiles
from attention_ext import FavorFeatures, linear_attention, linear_attention_step

FMAPS = ["elu", "relu", "identity"]


# ---- the float64 reference (tests/reference.py) ----------------------------------------

reference = R.linear_attention
tol_for = R.linear_tol
assert_close = R.check_close_linear


def make(B=2, Hq=4, Hkv=2, Nq=37, Nk=None, D=24, Dv=40, *, dtype=torch.float64, device="cpu", fmap="elu",
         positive=None, requires_grad=False):
    """Random q, k, v. identity features are made positive (a well-conditioned normaliser)."""
    Nk = Nq if Nk is None else Nk
    q = torch.randn(B, Hq, Nq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, Dv, dtype=torch.float64)
    if positive or (positive is None and fmap == "identity"):
        q, k = q.abs() + 0.1, k.abs() + 0.1
    out = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return out


# ---- forward --------------------------------------------------------------------------

@pytest.mark.parametrize("fmap", FMAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_forward_matches_reference(device, fmap, causal, normalize):
    q, k, v = make(fmap=fmap, device=device)
    out, (S, z) = linear_attention(q, k, v, feature_map=fmap, causal=causal, normalize=normalize, chunk_size=16,
                                   return_state=True)
    ref, (rS, rz) = reference(q.cpu(), k.cpu(), v.cpu(), fmap=fmap, causal=causal, normalize=normalize)
    assert out.shape == (2, 4, 37, 40) and out.dtype == torch.float64
    assert S.shape == (2, 2, 24, 40) and z.shape == (2, 2, 24)
    assert_close(out, ref, torch.float64)
    assert_close(S, rS, torch.float64, "S")
    assert_close(z, rz, torch.float64, "z")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(device, dtype, causal):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=150, D=32, Dv=64, dtype=dtype, device=device)
    out, (S, z) = linear_attention(q, k, v, causal=causal, return_state=True)
    assert out.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
    # reference on the rounded inputs: what remains is fp32 accumulation + output rounding
    ref, (rS, rz) = reference(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    assert_close(out, ref, dtype)
    assert_close(S, rS, torch.float32, "S")
    assert_close(z, rz, torch.float32, "z")


@pytest.mark.parametrize("N,chunk", [(1, 64), (1, 1), (2, 1), (5, 3), (63, 64), (64, 64), (65, 64), (100, 7),
                                     (129, 128), (300, 1024)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_chunks(device, N, chunk, causal):
    q, k, v = make(B=1, Hq=3, Hkv=3, Nq=N, D=8, Dv=16, device=device)
    out = linear_attention(q, k, v, causal=causal, chunk_size=chunk)
    ref, _ = reference(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    assert_close(out, ref, torch.float64)


@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (6, 3), (2, 2)])
def test_gqa(device, Hq, Hkv):
    q, k, v = make(B=2, Hq=Hq, Hkv=Hkv, Nq=50, D=16, Dv=8, device=device, dtype=torch.float32)
    for causal in (False, True):
        out, (S, z) = linear_attention(q, k, v, causal=causal, chunk_size=16, return_state=True)
        ref, (rS, rz) = reference(q.cpu(), k.cpu(), v.cpu(), causal=causal)
        assert S.shape == (2, Hkv, 16, 8)
        assert_close(out, ref, torch.float32)
        assert_close(S, rS, torch.float32, "S")


def test_cross_lengths_non_causal(device):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=19, Nk=70, D=16, Dv=24, device=device)
    out = linear_attention(q, k, v, chunk_size=16)
    ref, _ = reference(q.cpu(), k.cpu(), v.cpu())
    assert_close(out, ref, torch.float64)


def test_empty_sequences(device):
    q, k, v = make(B=2, Hq=2, Hkv=1, Nq=0, D=8, Dv=8, device=device)
    for causal in (False, True):
        out, (S, z) = linear_attention(q, k, v, causal=causal, return_state=True)
        assert out.shape == (2, 2, 0, 8)
        assert S.abs().sum().item() == 0 and z.abs().sum().item() == 0
    # queries but no keys: zero state, so zero output
    q, k, v = make(B=1, Hq=1, Hkv=1, Nq=4, Nk=0, D=8, Dv=8, device=device)
    assert linear_attention(q, k, v).abs().sum().item() == 0


def test_scale_and_eps(device):
    q, k, v = make(B=1, Hq=2, Hkv=2, Nq=33, D=8, Dv=8, device=device)
    for normalize in (True, False):
        out = linear_attention(q, k, v, causal=True, scale=0.3, eps=0.5, normalize=normalize, chunk_size=8)
        ref, _ = reference(q.cpu(), k.cpu(), v.cpu(), causal=True, scale=0.3, eps=0.5, normalize=normalize)
        assert_close(out, ref, torch.float64)


def test_relu_zero_normaliser_gives_zero(device):
    # all-negative keys: relu features vanish, the normaliser is just eps, no NaN
    q, k, v = make(B=1, Hq=1, Hkv=1, Nq=20, D=8, Dv=8, device=device, fmap="relu")
    out = linear_attention(q, -k.abs() - 1, v, feature_map="relu", causal=True)
    assert torch.isfinite(out).all() and out.abs().max().item() == 0


def test_noncontiguous_inputs(device):
    # (B, N, H, D) storage seen through a transpose, and a sliced feature dim
    qb = torch.randn(2, 45, 4, 20, dtype=torch.float64, device=device)
    kb = torch.randn(2, 45, 2, 20, dtype=torch.float64, device=device)
    vb = torch.randn(2, 45, 2, 12, dtype=torch.float64, device=device)
    q, k, v = qb.transpose(1, 2)[..., :16], kb.transpose(1, 2)[..., :16], vb.transpose(1, 2)
    for causal in (False, True):
        out = linear_attention(q, k, v, causal=causal, chunk_size=8)
        ref, _ = reference(q.cpu(), k.cpu(), v.cpu(), causal=causal)
        assert_close(out, ref, torch.float64)


def test_long_sequence_fp32_state(device):
    # 64k tokens: an N x N buffer would not fit; the fp32 running state stays accurate
    N, D = 65536, 8
    q, k, v = (torch.randn(1, 1, N, D, device=device) * 0.5 for _ in range(3))
    out = linear_attention(q, k, v, causal=True)
    fq, fk, vv = (F.elu(q.double().cpu()) + 1)[0, 0], (F.elu(k.double().cpu()) + 1)[0, 0], v.double().cpu()[0, 0]
    S = torch.cumsum(fk.unsqueeze(-1) * vv.unsqueeze(-2), 0)
    z = torch.cumsum(fk, 0)
    ref = torch.einsum("nd,nde->ne", fq, S) / ((fq * z).sum(-1, keepdim=True) + 1e-6)
    assert_close(out[0, 0], ref, torch.float32)


# ---- state: prefill + steps, initial state ---------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fmap", FMAPS)
def test_prefill_then_steps_equals_full(device, normalize, fmap):
    q, k, v = make(B=2, Hq=4, Hkv=2, Nq=41, D=16, Dv=8, device=device, dtype=torch.float32, fmap=fmap)
    full = linear_attention(q, k, v, feature_map=fmap, causal=True, normalize=normalize, chunk_size=16)
    P = 29
    out, state = linear_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], feature_map=fmap, causal=True,
                                  normalize=normalize, chunk_size=16, return_state=True)
    outs = [out]
    t = P
    for width in (1, 1, 3, 1, 2, 4):  # one token or a few at a time
        o, state = linear_attention_step(q[:, :, t:t + width], k[:, :, t:t + width], v[:, :, t:t + width], state,
                                         feature_map=fmap, normalize=normalize)
        outs.append(o)
        t += width
    assert t == 41
    steps = torch.cat(outs, 2)
    assert_close(steps, full, torch.float32)
    _, (rS, rz) = reference(q.cpu(), k.cpu(), v.cpu(), fmap=fmap, causal=True)
    assert_close(state[0], rS, torch.float32, "S")
    assert_close(state[1], rz, torch.float32, "z")


def test_steps_from_empty_state(device):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=6, D=8, Dv=8, device=device)
    ref, _ = reference(q.cpu(), k.cpu(), v.cpu(), causal=True)
    state, outs = None, []
    for t in range(6):
        o, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(o)
    assert_close(torch.cat(outs, 2), ref, torch.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_initial_state(device, causal):
    q, k, v = make(B=2, Hq=2, Hkv=1, Nq=30, D=8, Dv=8, device=device)
    S0 = torch.randn(2, 1, 8, 8, dtype=torch.float64, device=device)
    z0 = torch.rand(2, 1, 8, dtype=torch.float64, device=device) + 1
    out, (S, z) = linear_attention(q, k, v, causal=causal, chunk_size=8, initial_state=(S0, z0), return_state=True)
    ref, (rS, rz) = reference(q.cpu(), k.cpu(), v.cpu(), causal=causal, state=(S0.cpu(), z0.cpu()))
    assert_close(out, ref, torch.float64)
    assert_close(S, rS, torch.float64, "S")
    assert_close(z, rz, torch.float64, "z")
    # the input state is not modified and not aliased
    assert S.data_ptr() != S0.data_ptr()


def test_split_prefill_equals_full(device):
    q, k, v = make(B=1, Hq=2, Hkv=2, Nq=50, D=8, Dv=8, device=device)
    full = linear_attention(q, k, v, causal=True, chunk_size=8)
    o1, st = linear_attention(q[:, :, :21], k[:, :, :21], v[:, :, :21], causal=True, chunk_size=8,
                              return_state=True)
    o2 = linear_attention(q[:, :, 21:], k[:, :, 21:], v[:, :, 21:], causal=True, chunk_size=8, initial_state=st)
    assert_close(torch.cat([o1, o2], 2), full, torch.float64)


# ---- autograd ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmap", FMAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(device, fmap, causal, normalize):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=11, D=5, Dv=6, device=device, fmap=fmap, requires_grad=True)
    if fmap == "relu":  # keep clear of relu's kink
        with torch.no_grad():
            q.add_(torch.sign(q) * 0.05)
            k.add_(torch.sign(k) * 0.05)

    def f(q, k, v):
        out, (S, z) = linear_attention(q, k, v, feature_map=fmap, causal=causal, normalize=normalize, chunk_size=4,
                                       eps=1e-3, scale=0.7, return_state=True)
        return out, S, z

    assert torch.autograd.gradcheck(f, (q, k, v), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_initial_state(device, causal):
    q, k, v = make(B=2, Hq=2, Hkv=2, Nq=9, D=4, Dv=3, device=device, requires_grad=True)
    S0 = torch.randn(2, 2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    z0 = (torch.rand(2, 2, 4, dtype=torch.float64, device=device) + 1).requires_grad_()

    def f(q, k, v, S0, z0):
        out, (S, z) = linear_attention(q, k, v, causal=causal, chunk_size=4, initial_state=(S0, z0),
                                       return_state=True)
        return out, S, z

    assert torch.autograd.gradcheck(f, (q, k, v, S0, z0), atol=1e-7, rtol=1e-6)


def test_gradcheck_step(device):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=3, D=4, Dv=3, device=device, requires_grad=True)
    S0 = torch.randn(1, 1, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    z0 = (torch.rand(1, 1, 4, dtype=torch.float64, device=device) + 1).requires_grad_()

    def f(q, k, v, S0, z0):
        out, (S, z) = linear_attention_step(q, k, v, (S0, z0), normalize=True)
        return out, S, z

    assert torch.autograd.gradcheck(f, (q, k, v, S0, z0), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_grads_match_reference(device, dtype, causal):
    q, k, v = make(B=2, Hq=4, Hkv=2, Nq=70, D=16, Dv=24, device=device, dtype=dtype, requires_grad=True)
    out = linear_attention(q, k, v, causal=causal, chunk_size=32)
    g = torch.randn_like(out)
    out.backward(g)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(qr, kr, vr, causal=causal)
    ref.backward(g.cpu().double())
    tol = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16}[dtype]
    for name, ours, r in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
        assert ours.dtype == dtype
        assert_close(ours, r, tol, name)


def test_grad_through_state_only(device):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=10, D=4, Dv=4, device=device, requires_grad=True)
    _, (S, z) = linear_attention(q, k, v, causal=True, return_state=True)
    (S.sum() + 2 * z.sum()).backward()
    qr, kr, vr = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    _, (rS, rz) = reference(qr, kr, vr, causal=True)
    (rS.sum() + 2 * rz.sum()).backward()
    assert q.grad.abs().max().item() == 0
    assert_close(k.grad, kr.grad, torch.float64, "dk")
    assert_close(v.grad, vr.grad, torch.float64, "dv")


# ---- custom-op machinery ------------------------------------------------------------------

def test_opcheck(device):
    ops = torch.ops.attention_ext
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=10, D=8, Dv=8, device=device, dtype=torch.float32, requires_grad=True)
    S0 = torch.randn(1, 1, 8, 8, device=device, requires_grad=True)
    z0 = (torch.rand(1, 1, 8, device=device) + 1).requires_grad_()
    for causal in (False, True):
        torch.library.opcheck(ops.linear_fwd.default, (q, k, v, None, None, 1, causal, True, 1e-6, 1.0, 4))
        torch.library.opcheck(ops.linear_fwd.default, (q, k, v, S0, z0, 2, causal, False, 1e-6, 0.5, 3))
        out = ops.linear_fwd(q, k, v, S0, z0, 1, causal, True, 1e-6, 1.0, 4)[0].detach()
        go = torch.randn_like(out)
        torch.library.opcheck(ops.linear_bwd.default, (go, None, None, q.detach(), k.detach(), v.detach(), out,
                                                       None, None, 1, causal, True, 1e-6, 1.0, 4))
    torch.library.opcheck(ops.linear_step.default, (q[:, :, :2], k[:, :, :2], v[:, :, :2], S0, z0, 1, True, 1e-6,
                                                    1.0))


def test_torch_compile_fullgraph(device):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=20, D=8, Dv=8, device=device, dtype=torch.float32, requires_grad=True)

    def f(q, k, v):
        out, (S, z) = linear_attention(q, k, v, causal=True, chunk_size=8, return_state=True)
        o2, _ = linear_attention_step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], (S, z))
        return out.sum() + o2.sum() + S.sum()

    check_compiles(f, q, k, v)


# ---- CPU specifics: determinism, ISA builds -------------------------------------------------

def _run_all(q, k, v, causal):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, (S, z) = linear_attention(q, k, v, causal=causal, chunk_size=16, return_state=True)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * g).sum().backward()
    return [out, S, z, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("B,Hkv", [(1, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_repeatable_across_threads(B, Hkv, causal, dtype):
    # thread counts change the work split (one task per head vs chunk tasks + scans):
    # the results must not change by a single bit (bf16: on the bf16 tile products where
    # the default build has them)
    q, k, v = make(B=B, Hq=2 * Hkv, Hkv=Hkv, Nq=100, D=12, Dv=20, dtype=dtype)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(_run_all(q, k, v, causal))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", attention_ext.available_cpu_isas())
def test_every_isa_build(isa):
    before = attention_ext.cpu_isa()
    try:
        attention_ext.set_cpu_isa(isa)
        for causal in (False, True):
            q, k, v = make(B=1, Hq=2, Hkv=1, Nq=45, D=12, Dv=20, dtype=torch.float32, requires_grad=True)
            out = linear_attention(q, k, v, causal=causal, chunk_size=16)
            out.backward(torch.ones_like(out))
            qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref, _ = reference(qr, kr, vr, causal=causal)
            ref.backward(torch.ones_like(ref))
            assert_close(out, ref, torch.float32)
            assert_close(k.grad, kr.grad, torch.float32, "dk")
            st = linear_attention_step(q[:, :, :3].detach(), k[:, :, :3].detach(), v[:, :, :3].detach(), None)[0]
            assert_close(st, reference(q[:, :, :3], k[:, :, :3], v[:, :, :3], causal=True)[0], torch.float32)
    finally:
        attention_ext.set_cpu_isa(before)


# ---- bf16 tile products (avx512bf16 build) ---------------------------------------------------
# bf16 inputs there run the chunk products on bf16 operands (phi(q), phi(k), A, dA, g, S, G
# rounded, fp32 accumulation; state deltas in fp32): the 2x-PyTorch-bf16-error rule of
# reference.check_close against the same quadratic form done by PyTorch in bf16.

needs_bf16_tiles = pytest.mark.skipif("avx512bf16" not in attention_ext.available_cpu_isas(),
                                      reason="CPU or build without AVX512-BF16")


@pytest.fixture
def bf16_tiles():
    before = attention_ext.cpu_isa()
    attention_ext.set_cpu_isa("avx512bf16")
    yield
    attention_ext.set_cpu_isa(before)


def _fwd_bwd(q, k, v, fn):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, state = fn(*leaves)
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    return [out, *state] + list(torch.autograd.grad(out, leaves, g.to(out.dtype)))


@needs_bf16_tiles
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 2, 150, 32, 64, 64), (1, 2, 1, 67, 19, 21, 16), (1, 3, 3, 100, 64, 40, 7)],
                         ids=["gqa", "odd_dims", "odd_chunk"])
def test_bf16_tiles_match_reference(bf16_tiles, causal, normalize, shape):
    B, Hq, Hkv, N, D, Dv, chunk = shape
    q, k, v = make(B=B, Hq=Hq, Hkv=Hkv, Nq=N, D=D, Dv=Dv, dtype=torch.bfloat16)
    kw = dict(causal=causal, normalize=normalize)
    ours = _fwd_bwd(q, k, v, lambda q, k, v: linear_attention(q, k, v, chunk_size=chunk, return_state=True, **kw))
    refs = _fwd_bwd(q, k, v, lambda q, k, v: reference(q, k, v, **kw))
    lowp = _fwd_bwd(q, k, v, lambda q, k, v: reference(q, k, v, dtype=torch.bfloat16, **kw))
    for name, o, r, lp in zip(("out", "S", "z", "dq", "dk", "dv"), ours, refs, lowp):
        if name in ("S", "z"):  # fp32 state deltas: the fp32 rule
            assert_close(o, r, torch.float32, name)
        else:
            R.check_close(o, r, lowp=lp, dtype=torch.bfloat16, what=name)


@needs_bf16_tiles
def test_bf16_tiles_really_run(bf16_tiles):
    # bf16 inputs: rounded product operands move every result away from the fp32-product
    # build (the state, from fp32 deltas, stays the same); fp32 inputs: the same bits
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=200, D=32, Dv=32, dtype=torch.bfloat16)
    x32 = [t.float() for t in (q, k, v)]

    def run(*x):
        return _fwd_bwd(*x, lambda q, k, v: linear_attention(q, k, v, causal=True, return_state=True))

    ours, f32 = run(q, k, v), run(*x32)
    attention_ext.set_cpu_isa("avx512")
    other, f32_avx512 = run(q, k, v), run(*x32)
    for name, a, b in zip(("out", "S", "z", "dq", "dk", "dv"), ours, other):
        assert torch.equal(a, b) == (name in ("S", "z")), name
    for a, b in zip(f32, f32_avx512):
        assert torch.equal(a, b)


# ---- bad inputs: exception type and the argument named ---------------------------------------

def test_bad_inputs(device):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=8, D=4, Dv=4, device=device, dtype=torch.float32)
    cases = [
        (dict(feature_map="gelu"), ValueError, "feature_map"),
        (dict(feature_map=1), ValueError, "feature_map"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=-3), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(chunk_size=4096), ValueError, "chunk_size"),
        (dict(eps=-1e-3), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps="small"), TypeError, "eps"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(causal=1), TypeError, "causal"),
        (dict(normalize=None), TypeError, "normalize"),
        (dict(return_state="yes"), TypeError, "return_state"),
    ]
    for kwargs, exc, name in cases:
        with pytest.raises(exc, match=name):
            linear_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match=r"k.shape\[-1\]"):
        linear_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"v.shape\[2\]"):
        linear_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match=r"q heads"):
        linear_attention(q[:, :1], k.expand(1, 2, 8, 4), v.expand(1, 2, 8, 4))
    with pytest.raises(ValueError, match=r"k.shape\[2\]"):
        linear_attention(q, k[:, :, :5], v[:, :, :5], causal=True)
    with pytest.raises(ValueError, match=r"q must be 4-D"):
        linear_attention(q[0], k, v)
    with pytest.raises(TypeError, match=r"k.dtype"):
        linear_attention(q, k.double(), v)
    with pytest.raises(TypeError, match=r"q.dtype"):
        linear_attention(q.int(), k.int(), v.int())
    with pytest.raises(TypeError, match=r"^v must be a torch.Tensor"):
        linear_attention(q, k, v.tolist())


def test_bad_state(device):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=1, D=4, Dv=6, device=device, dtype=torch.float32)
    S = torch.zeros(1, 1, 4, 6, device=device)
    z = torch.zeros(1, 1, 4, device=device)
    with pytest.raises(ValueError, match=r"state\[0\] \(S\) must have shape"):
        linear_attention_step(q, k, v, (S[..., :5], z))
    with pytest.raises(ValueError, match=r"state\[0\] \(S\) must have shape"):
        linear_attention_step(q, k, v, (S.expand(1, 2, 4, 6), z))  # per query head instead of kv head
    with pytest.raises(ValueError, match=r"state\[1\] \(z\) must have shape"):
        linear_attention_step(q, k, v, (S, z[..., :3]))
    with pytest.raises(TypeError, match=r"state\[0\] \(S\).dtype"):
        linear_attention_step(q, k, v, (S.double(), z))
    with pytest.raises(TypeError, match=r"state must be a pair"):
        linear_attention_step(q, k, v, S)
    with pytest.raises(ValueError, match=r"initial_state\[1\] \(z\) must have shape"):
        linear_attention(q, k, v, initial_state=(S, z[0]))
    with pytest.raises(ValueError, match=r"q.shape\[2\]"):
        linear_attention_step(q.expand(1, 2, 2, 4), k, v, (S, z))


def test_op_level_checks(device):
    ops = torch.ops.attention_ext
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=8, D=4, Dv=4, device=device, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="feature_map"):
        ops.linear_fwd(q, k, v, None, None, 7, False, True, 1e-6, 1.0, 64)
    with pytest.raises(RuntimeError, match="chunk_size"):
        ops.linear_fwd(q, k, v, None, None, 1, False, True, 1e-6, 1.0, 0)
    with pytest.raises(RuntimeError, match="initial state S must have shape"):
        ops.linear_fwd(q, k, v, torch.zeros(1, 2, 4, 4, device=device), torch.zeros(1, 1, 4, device=device), 1,
                       False, True, 1e-6, 1.0, 64)
    with pytest.raises(RuntimeError, match="state"):
        ops.linear_step(q, k, v, torch.zeros(1, 1, 4, 4, device=device, dtype=torch.float64),
                        torch.zeros(1, 1, 4, device=device, dtype=torch.float64), 1, True, 1e-6, 1.0)


# ---- packed documents (cu_seqlens) ----------------------------------------------------------
# The reference runs every document on its own (tests/reference.py on the slice, from that
# document's initial state), so it knows nothing of packing.

# lengths 0, 1, shorter than a chunk, a whole chunk, many chunks (chunk_size 8 below), 0 at the end
DOC_LENGTHS = [0, 1, 5, 8, 0, 37, 3, 0]


def packed(lengths, device="cpu"):
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return cu.to(device), int(cu[-1])


def per_document(q, k, v, cu, state=None, **kw):
    """The float64 reference document by document: (out, (S, z)) with per-document states;
    differentiable in float64 CPU inputs."""
    q, k, v = (t.cpu().double() for t in (q, k, v))
    bounds = cu.tolist()
    outs, Ss, zs = [], [], []
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        st = None if state is None else tuple(t.cpu()[s:s + 1] for t in state)
        o, (S, z) = reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state=st, **kw)
        outs.append(o)
        Ss.append(S)
        zs.append(z)
    return torch.cat(outs, 2), (torch.cat(Ss), torch.cat(zs))


def doc_state(n_docs, Hkv, D, Dv, device, requires_grad=False):
    S0 = torch.randn(n_docs, Hkv, D, Dv, dtype=torch.float64, device=device)
    z0 = torch.rand(n_docs, Hkv, D, dtype=torch.float64, device=device) + 1
    return S0.requires_grad_(requires_grad), z0.requires_grad_(requires_grad)


@pytest.mark.parametrize("fmap", FMAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_cu_seqlens_matches_per_document(device, fmap, causal, normalize, with_state):
    cu, N = packed(DOC_LENGTHS, device)
    q, k, v = make(B=1, Hq=4, Hkv=2, Nq=N, D=12, Dv=10, fmap=fmap, device=device)
    state = doc_state(len(DOC_LENGTHS), 2, 12, 10, device) if with_state else None
    out, (S, z) = linear_attention(q, k, v, feature_map=fmap, causal=causal, normalize=normalize, chunk_size=8,
                                   initial_state=state, return_state=True, cu_seqlens=cu)
    ref, (rS, rz) = per_document(q, k, v, cu, state, fmap=fmap, causal=causal, normalize=normalize)
    assert S.shape == (len(DOC_LENGTHS), 2, 12, 10) and z.shape == (len(DOC_LENGTHS), 2, 12)
    assert_close(out, ref, torch.float64)
    assert_close(S, rS, torch.float64, "S")
    assert_close(z, rz, torch.float64, "z")
    if with_state:  # an empty document hands its initial state back unchanged
        assert torch.equal(S[0], state[0][0]) and torch.equal(z[4], state[1][4])
    else:
        assert S[0].abs().max().item() == 0 and z[7].abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cu_seqlens_low_precision(device, dtype):
    cu, N = packed([70, 0, 130, 1, 55], device)
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=N, D=32, Dv=16, dtype=dtype, device=device)
    for causal in (False, True):
        out, (S, z) = linear_attention(q, k, v, causal=causal, return_state=True, cu_seqlens=cu)
        ref, (rS, rz) = per_document(q, k, v, cu, causal=causal)
        assert_close(out, ref, dtype)
        assert_close(S, rS, torch.float32, "S")
        assert_close(z, rz, torch.float32, "z")


def test_cu_seqlens_one_document_is_the_plain_call(device):
    # one document covering the row runs the very same arithmetic as no cu_seqlens
    q, k, v = make(B=1, Hq=2, Hkv=2, Nq=45, D=8, Dv=8, device=device, dtype=torch.float32)
    cu, _ = packed([45], device)
    for causal in (False, True):
        a = linear_attention(q, k, v, causal=causal, chunk_size=16, return_state=True)
        b = linear_attention(q, k, v, causal=causal, chunk_size=16, return_state=True, cu_seqlens=cu)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])


def test_cu_seqlens_no_documents(device):
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=0, D=4, Dv=6, device=device)
    out, (S, z) = linear_attention(q, k, v, causal=True, return_state=True,
                                   cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device))
    assert out.shape == (1, 2, 0, 6) and S.shape == (0, 1, 4, 6) and z.shape == (0, 1, 4)


@pytest.mark.parametrize("causal", [False, True])
def test_cu_seqlens_gradcheck(device, causal):
    cu, N = packed([3, 0, 1, 7, 2], device)
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=N, D=4, Dv=3, device=device, requires_grad=True)
    S0, z0 = doc_state(5, 1, 4, 3, device, requires_grad=True)

    def f(q, k, v, S0, z0):
        out, (S, z) = linear_attention(q, k, v, causal=causal, chunk_size=2, eps=1e-3, initial_state=(S0, z0),
                                       return_state=True, cu_seqlens=cu)
        return out, S, z

    assert torch.autograd.gradcheck(f, (q, k, v, S0, z0), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_cu_seqlens_grads_match_per_document(device, causal):
    cu, N = packed(DOC_LENGTHS, device)
    q, k, v = make(B=1, Hq=4, Hkv=2, Nq=N, D=8, Dv=6, device=device, requires_grad=True)
    S0, z0 = doc_state(len(DOC_LENGTHS), 2, 8, 6, device, requires_grad=True)
    out, (S, z) = linear_attention(q, k, v, causal=causal, chunk_size=8, initial_state=(S0, z0), return_state=True,
                                   cu_seqlens=cu)
    gs = [torch.randn_like(t) for t in (out, S, z)]
    torch.autograd.backward((out, S, z), gs)
    leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v, S0, z0)]
    ref, (rS, rz) = per_document(*leaves[:3], cu, leaves[3:], causal=causal)
    torch.autograd.backward((ref, rS, rz), [g.cpu() for g in gs])
    for name, ours, r in zip(("dq", "dk", "dv", "dS0", "dz0"), (q, k, v, S0, z0), leaves):
        assert_close(ours.grad, r.grad, torch.float64, name)


def test_cu_seqlens_opcheck(device):
    ops = torch.ops.attention_ext
    cu, N = packed([3, 0, 6, 1], device)
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=N, D=8, Dv=8, device=device, dtype=torch.float32, requires_grad=True)
    S0 = torch.randn(4, 1, 8, 8, device=device, requires_grad=True)
    z0 = (torch.rand(4, 1, 8, device=device) + 1).requires_grad_()
    for causal in (False, True):
        torch.library.opcheck(ops.linear_fwd.default, (q, k, v, None, None, 1, causal, True, 1e-6, 1.0, 4, cu))
        torch.library.opcheck(ops.linear_fwd.default, (q, k, v, S0, z0, 2, causal, False, 1e-6, 0.5, 3, cu))
        out = ops.linear_fwd(q, k, v, S0, z0, 1, causal, True, 1e-6, 1.0, 4, cu)[0].detach()
        go = torch.randn_like(out)
        torch.library.opcheck(ops.linear_bwd.default, (go, None, None, q.detach(), k.detach(), v.detach(), out,
                                                       S0.detach(), z0.detach(), 1, causal, True, 1e-6, 1.0, 4, cu))


def test_cu_seqlens_compile_does_not_recompile(device):
    import torch._dynamo

    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=24, D=8, Dv=8, device=device, dtype=torch.float32, requires_grad=True)

    def f(q, k, v, cu):
        out, (S, z) = linear_attention(q, k, v, causal=True, chunk_size=8, return_state=True, cu_seqlens=cu)
        return out.sum() + S.sum() + z.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    first, _ = packed([5, 0, 19], device)
    torch._dynamo.mark_dynamic(first, 0)
    compiled(q, k, v, first).backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([24, 0], [1, 2, 3, 4, 14], [10, 10, 4]):  # new boundaries, new numbers of documents
            cu, _ = packed(lengths, device)
            for t in (q, k, v):
                t.grad = None
            loss = compiled(q, k, v, cu)
            loss.backward()
            grads = [t.grad.clone() for t in (q, k, v)]
            for t in (q, k, v):
                t.grad = None
            eager = f(q, k, v, cu)
            eager.backward()
            torch.testing.assert_close(loss, eager)
            for a, b in zip(grads, (q.grad, k.grad, v.grad)):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_cu_seqlens_bitwise_repeatable_across_threads(causal):
    # 5 documents x 1 kv head: one thread walks each document, two threads split them into
    # chunk tasks (linear_common.h, one_task_per_head); forward and backward agree to the bit
    cu, N = packed([40, 0, 17, 43, 9])
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=N, D=12, Dv=20, dtype=torch.float32)
    S0, z0 = (t.float() for t in doc_state(5, 1, 12, 20, "cpu"))

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, S0, z0)]
        out, (S, z) = linear_attention(*leaves[:3], causal=causal, chunk_size=16, initial_state=tuple(leaves[3:]),
                                       return_state=True, cu_seqlens=cu)
        g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        ((out * g).sum() + S.sum() + z.sum()).backward()
        return [out, S, z] + [t.grad for t in leaves]

    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_cu_seqlens_vmap_matches_a_loop(device):
    cu, N = packed([4, 0, 9], device)
    qs, ks, vs = (torch.randn(3, 1, 2, N, 8, dtype=torch.float64, device=device) for _ in range(3))
    fn = lambda q, k, v: linear_attention(q, k, v, causal=True, chunk_size=4, cu_seqlens=cu)  # noqa: E731
    out = torch.func.vmap(fn)(qs, ks, vs)
    for i in range(3):
        assert torch.equal(out[i], fn(qs[i], ks[i], vs[i]))


def test_cu_seqlens_bad_inputs(device):
    cu, N = packed([3, 5], device)
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=N, D=4, Dv=4, device=device, dtype=torch.float32)
    cases = [
        (cu.long(), TypeError, r"cu_seqlens must be an int32 tensor"),
        (cu.float(), TypeError, r"cu_seqlens must be an int32"),
        (cu.tolist(), TypeError, r"cu_seqlens must be a torch.Tensor"),
        (cu.view(1, 3), ValueError, r"cu_seqlens must be 1-D"),
        (cu[:0], ValueError, r"cu_seqlens must be 1-D"),
        (cu.to("meta"), ValueError, r"cu_seqlens.device"),
        # the values: checked by the op
        (torch.tensor([1, 3, 8], dtype=torch.int32, device=device), ValueError, r"cu_seqlens must start at 0"),
        (torch.tensor([0, 3, 7], dtype=torch.int32, device=device), ValueError, r"cu_seqlens must end at .* 8"),
        (torch.tensor([0, 3, 9], dtype=torch.int32, device=device), ValueError, r"cu_seqlens must end at"),
        (torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=device), ValueError, r"cu_seqlens must be non-decr"),
        (torch.tensor([0, -2, 8], dtype=torch.int32, device=device), ValueError, r"cu_seqlens must be non-decr"),
    ]
    for bad, exc, msg in cases:
        for causal in (False, True):
            with pytest.raises(exc, match=msg):
                linear_attention(q, k, v, causal=causal, cu_seqlens=bad)
    with pytest.raises(ValueError, match=r"cu_seqlens needs batch size 1"):
        linear_attention(q.expand(2, 2, N, 4), k.expand(2, 1, N, 4), v.expand(2, 1, N, 4), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cu_seqlens needs as many queries as keys"):
        linear_attention(q[:, :, :5], k, v, cu_seqlens=cu)
    S = torch.zeros(1, 1, 4, 4, device=device)  # one per batch row, not per document
    with pytest.raises(ValueError, match=r"initial_state\[0\] \(S\) must have shape \(documents"):
        linear_attention(q, k, v, cu_seqlens=cu, initial_state=(S, torch.zeros(1, 1, 4, device=device)))


def test_cu_seqlens_op_level_checks(device):
    # direct op calls skip the Python checks: the op refuses every bad cu_seqlens itself
    # (nothing is read out of bounds), with the Python exception types
    ops = torch.ops.attention_ext
    cu, N = packed([3, 5], device)
    q, k, v = make(B=1, Hq=2, Hkv=1, Nq=N, D=4, Dv=4, device=device, dtype=torch.float32)
    go = torch.randn(1, 2, N, 4, device=device)
    bad = [
        (cu.long(), TypeError, "cu_seqlens must be int32"),
        (cu.view(1, 3), ValueError, "cu_seqlens must be 1-D"),
        (cu[:0], ValueError, "cu_seqlens must be 1-D"),
        (torch.tensor([2, 3, 8], dtype=torch.int32, device=device), ValueError, "start at 0"),
        (torch.tensor([0, 3, 1000], dtype=torch.int32, device=device), ValueError, "end at the sequence length 8"),
        (torch.tensor([0, 3, 2**31 - 1, 8], dtype=torch.int32, device=device), ValueError, "non-decreasing"),
    ]
    for t, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            ops.linear_fwd(q, k, v, None, None, 1, True, True, 1e-6, 1.0, 4, t)
        with pytest.raises(exc, match=msg):
            ops.linear_bwd(go, None, None, q, k, v, go, None, None, 1, False, True, 1e-6, 1.0, 4, t)
    with pytest.raises(ValueError, match="cu_seqlens needs batch size 1"):
        ops.linear_fwd(q.expand(2, 2, N, 4), k.expand(2, 1, N, 4), v.expand(2, 1, N, 4), None, None, 1, True, True,
                       1e-6, 1.0, 4, cu)
    with pytest.raises(RuntimeError, match="initial state S must have shape"):
        ops.linear_fwd(q, k, v, torch.zeros(1, 1, 4, 4, device=device), torch.zeros(1, 1, 4, device=device), 1,
                       False, True, 1e-6, 1.0, 64, cu)
    if device != "cpu":
        with pytest.raises(ValueError, match="cu_seqlens must be on q's device"):
            ops.linear_fwd(q, k, v, None, None, 1, True, True, 1e-6, 1.0, 4, cu.cpu())


# ---- FAVOR+ -------------------------------------------------------------------------------------

def _softmax_attention(q, k, v, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def test_favor_approximates_softmax(device):
    torch.manual_seed(0)
    B, H, N, D = 1, 2, 64, 16
    q = torch.randn(B, H, N, D, dtype=torch.float64, device=device) * 0.6
    k = torch.randn(B, H, N, D, dtype=torch.float64, device=device) * 0.6
    v = torch.randn(B, H, N, D, dtype=torch.float64, device=device)
    mask = torch.ones(N, N, dtype=torch.bool, device=device).tril()
    exact = {False: _softmax_attention(q, k, v), True: _softmax_attention(q, k, v, mask)}
    for causal in (False, True):
        errors = []
        for m in (16, 128, 1024):
            errs = []
            for seed in range(4):
                feats = FavorFeatures(D, m, seed=seed).to(device)
                approx = linear_attention(feats(q, is_query=True), feats(k, is_query=False), v,
                                          feature_map="identity", causal=causal, eps=0.0)
                errs.append((approx - exact[causal]).pow(2).mean().sqrt().item())
            errors.append(sum(errs) / len(errs))
        assert errors[0] > errors[1] > errors[2], errors
        assert errors[2] < 0.5 * errors[0], errors
        assert errors[2] < 0.05, errors


def test_favor_module_behaviour(device):
    f1 = FavorFeatures(8, 20, seed=3)
    f2 = FavorFeatures(8, 20, seed=3)
    assert torch.equal(f1.projection, f2.projection)
    assert f1.projection.shape == (20, 8)
    # orthogonal blocks: rows of one block are orthogonal
    w = f1.projection[:8].double()
    gram = w @ w.T
    assert (gram - torch.diag(torch.diag(gram))).abs().max().item() < 1e-4
    x = torch.randn(2, 3, 5, 8, device=device)
    f1 = f1.to(device)
    phi = f1(x, is_query=True)
    assert phi.shape == (2, 3, 5, 20) and (phi > 0).all() and phi.dtype == x.dtype
    assert f1(x.to(torch.bfloat16), is_query=False).dtype == torch.bfloat16
    # unstabilised keys: the exact positive-feature formula
    ref = torch.exp((x / 8 ** 0.25) @ f1.projection.T - (x / 8 ** 0.25).pow(2).sum(-1, keepdim=True) / 2) / 20 ** 0.5
    torch.testing.assert_close(f1(x, is_query=False, stabilize=False), ref)
    # redraw: fresh features in training mode only
    r = FavorFeatures(8, 8, redraw=True, seed=1).to(device)
    p0 = r.projection.clone()
    r.eval()
    r(x, is_query=True)
    assert torch.equal(r.projection, p0)
    r.train()
    r(x, is_query=True)
    assert not torch.equal(r.projection, p0)
    non_orth = FavorFeatures(8, 12, orthogonal=False, seed=0)
    assert non_orth.projection.shape == (12, 8)
    with pytest.raises(ValueError, match="num_features"):
        FavorFeatures(8, 0)
    with pytest.raises(TypeError, match="seed"):
        FavorFeatures(8, 4, seed="x")
    with pytest.raises(ValueError, match="head_dim=8"):
        f1(torch.randn(2, 5, 7, device=device), is_query=True)
    with pytest.raises(TypeError, match="is_query"):
        f1(x, is_query=None)
