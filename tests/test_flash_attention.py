"""flash_attention against the float64 dense reference, plus the custom-op contract
(gradcheck, opcheck, torch.compile) and bad input."""


import pytest
import torch
import torch.nn.functional as F

import attention_ext as ae
from attention_ext._spec import AttentionSpec
import reference as R
from _harness import check_attention, check_compiles, make_qkv, opcheck_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (Nq, Nk, D, Hq, Hkv): odd sizes around the tile edges, Nq != Nk both ways, every head
# dim and GQA ratio of the issue, spread so each value meets several others.
SHAPES = [
    (1, 1, 16, 2, 1),
    (17, 17, 64, 8, 1),
    (127, 128, 80, 4, 2),
    (128, 127, 128, 8, 8),
    (129, 129, 16, 8, 1),
    (1000, 1000, 64, 2, 2),
    (17, 1000, 128, 8, 2),
    (1000, 17, 80, 2, 1),
    (1, 1000, 64, 8, 8),
    (129, 1, 16, 2, 2),
    (127, 129, 128, 8, 1),
]


def _flash(causal, scale=None):
    return lambda q, k, v: ae.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, dtype, shape, causal):
    Nq, Nk, D, Hq, Hkv = shape
    q, k, v = make_qkv(2, Hq, Hkv, Nq, Nk, D, dtype=dtype, device=device)
    mask = R.causal_mask(Nq, Nk) if causal else None
    # gradients on the smaller shapes keep the suite fast; the big ones check forward
    check_attention(_flash(causal), q, k, v, mask, grads=Nq * Nk <= 130_000 or dtype == torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value_head_dim_differs(device, dtype):
    q, k, v = make_qkv(1, 4, 2, 70, 90, 64, Dv=32, dtype=dtype, device=device)
    check_attention(_flash(True), q, k, v, R.causal_mask(70, 90))


def test_custom_scale_and_large_scores(device):
    q, k, v = make_qkv(1, 2, 2, 65, 65, 32, device=device, scale_inputs=8.0)
    check_attention(_flash(False, scale=0.3), q, k, v, None, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_inputs_match_contiguous(device, dtype):
    base = torch.randn(2, 150, 6, 3 * 64, device=device, dtype=dtype)  # (B, N, H, 3D) like a fused QKV projection
    q, k, v = (base[..., i * 64:(i + 1) * 64].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = ae.flash_attention(q, k, v, causal=True)
    ref = ae.flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, ref)


def test_expanded_grad_out(device):
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, device=device)
    out = ae.flash_attention(q, k, v)
    g = torch.randn(1, 1, 1, 16, device=device).expand_as(out)  # stride-0 upstream gradient
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    dq2, dk2, dv2 = torch.autograd.grad(ae.flash_attention(q, k, v), (q, k, v), g.contiguous())
    assert torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)


def test_rows_without_keys_are_zero(device):
    # causal with Nq > Nk: the first Nq - Nk queries sit before every key
    q, k, v = make_qkv(1, 2, 1, 50, 20, 32, device=device)
    out, lse = ae.flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :30] == 0) and torch.all(torch.isneginf(lse[:, :, :30]))
    assert torch.isfinite(lse[:, :, 30:]).all()
    dq, dk, dv = torch.autograd.grad(out.sum() + lse[:, :, 30:].sum(), (q, k, v))
    assert torch.all(dq[:, :, :30] == 0)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    check_attention(_flash(True), q, k, v, R.causal_mask(50, 20))


def test_zero_length_sequences(device):
    for nq, nk in ((0, 5), (5, 0), (0, 0)):
        q, k, v = make_qkv(1, 2, 1, nq, nk, 16, device=device)
        out, lse = ae.flash_attention(q, k, v, return_lse=True)
        assert out.shape == (1, 2, nq, 16) and lse.shape == (1, 2, nq)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert dq.shape == q.shape and torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)


def test_matches_sdpa(device):
    q, k, v = make_qkv(2, 8, 2, 300, 300, 64, device=device)
    for causal in (False, True):
        ours = ae.flash_attention(q, k, v, causal=causal)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_lse_gradient(device):
    # lse is differentiable: d lse_i / d s_ij = p_ij
    q, k, v = make_qkv(1, 2, 1, 33, 45, 16, device=device, dtype=torch.float64)
    torch.autograd.gradcheck(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, return_lse=True)[1],
                             (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(5, 7, 8, 2, 1), (9, 9, 16, 4, 2), (7, 3, 8, 2, 2), (70, 130, 8, 2, 1)])
def test_gradcheck(device, shape, causal):
    Nq, Nk, D, Hq, Hkv = shape
    q, k, v = make_qkv(1, Hq, Hkv, Nq, Nk, D, dtype=torch.float64, device=device)
    # lse only where every row sees a key (its -inf rows have no finite differences)
    with_lse = not (causal and Nq > Nk)
    torch.autograd.gradcheck(lambda q, k, v: ae.flash_attention(q, k, v, causal=causal, return_lse=with_lse),
                             (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    q, k, v = make_qkv(2, 4, 2, 19, 23, 16, dtype=dtype, device=device)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, causal=True))


def test_torch_compile_fullgraph(device):
    q, k, v = make_qkv(1, 4, 2, 65, 65, 32, device=device)
    check_compiles(lambda q, k, v: ae.flash_attention(q, k, v, causal=True).square().sum(), q, k, v)


def test_forward_is_deterministic(device):
    q, k, v = make_qkv(1, 4, 1, 300, 300, 64, device=device)
    a = ae.flash_attention(q, k, v, causal=True)
    b = ae.flash_attention(q, k, v, causal=True)
    assert torch.equal(a, b)


def test_backward_same_bits_for_any_thread_count():
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 threads")
    q, k, v = make_qkv(1, 2, 1, 500, 500, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, threads):
            torch.set_num_threads(n)
            out = ae.flash_attention(q, k, v, causal=True)
            results.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


BAD = [
    # (description, kwargs builder, exception type, message fragment)
    ("q not a tensor", lambda q, k, v: dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("3-D q", lambda q, k, v: dict(q=q[0]), ValueError, "q must be 4-D"),
    ("int dtype", lambda q, k, v: dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "q.dtype"),
    ("k dtype differs", lambda q, k, v: dict(k=k.double()), TypeError, "k.dtype"),
    ("v dtype differs", lambda q, k, v: dict(v=v.half()), TypeError, "v.dtype"),
    ("batch differs", lambda q, k, v: dict(k=k.expand(3, -1, -1, -1)), ValueError, "k.shape[0]"),
    ("heads not a multiple", lambda q, k, v: dict(k=k[:, :3], v=v[:, :3]), ValueError, "Hq=4"),
    ("v heads differ", lambda q, k, v: dict(v=v[:, :1]), ValueError, "v heads"),
    ("head_dim differs", lambda q, k, v: dict(k=k[..., :8]), ValueError, "k.shape[-1]"),
    ("seq differs", lambda q, k, v: dict(v=v[:, :, :3]), ValueError, "v.shape[2]"),
    ("head_dim too big", lambda q, k, v: dict(q=torch.zeros(1, 4, 5, 600), k=torch.zeros(1, 4, 5, 600),
                                              v=torch.zeros(1, 4, 5, 600)), ValueError, "head_dim"),
    ("negative scale", lambda q, k, v: dict(scale=-1.0), ValueError, "scale"),
    ("nan scale", lambda q, k, v: dict(scale=float("nan")), ValueError, "scale"),
    ("string scale", lambda q, k, v: dict(scale="1"), TypeError, "scale"),
    ("causal not bool", lambda q, k, v: dict(causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, build, exc, fragment = case
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16)
    kwargs = dict(q=q, k=k, v=v)
    kwargs.update(build(q, k, v))
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        ae.flash_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="k.device"):
        ae.flash_attention(q, q.cuda(), q)


def test_direct_op_call_is_checked():
    q = torch.randn(1, 4, 5, 16)
    with pytest.raises(RuntimeError, match="multiple of k/v heads"):
        AttentionSpec(scale=1.0).forward(q, q[:, :3], q[:, :3])
