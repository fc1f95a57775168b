"""Logit softcapping (softcap * tanh(s / softcap), Gemma 2) in every pattern of the
kernel family, forward and backward, against the float64 reference."""


import pytest
import torch

import attention_ext as ae
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R
from _harness import check_attention, check_compiles, make_qkv, opcheck_attention, pattern_cases

N = 150
CAP = 3.0  # the inputs below give scaled scores of std ~4: the cap binds on most of them
LAYOUT = ae.patterns.bigbird(N, 16, num_heads=4, seed=3)

CASES = pattern_cases(N, LAYOUT, nq_dense=130)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(device, case, dtype):
    _, fn, mask, nq = case
    q, k, v = make_qkv(1, 4, 2, nq, N, 64, dtype=dtype, device=device, scale_inputs=2.0)
    check_attention(lambda q, k, v: fn(q, k, v, softcap=CAP), q, k, v, mask, softcap=CAP)
    # the cap binds: without it the reference output is far from this one
    capped, _ = R.attention(q, k, v, mask, softcap=CAP)
    plain, _ = R.attention(q, k, v, mask)
    assert (capped - plain).abs().max() > 0.1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(9, 9, 16, 4, 2), (7, 12, 8, 2, 1), (70, 130, 8, 2, 2)])
def test_gradcheck(device, shape, causal):
    Nq, Nk, D, Hq, Hkv = shape
    q, k, v = make_qkv(1, Hq, Hkv, Nq, Nk, D, dtype=torch.float64, device=device, scale_inputs=2.0)
    torch.autograd.gradcheck(
        lambda q, k, v: ae.flash_attention(q, k, v, causal=causal, softcap=1.5, return_lse=True), (q, k, v))


def test_gradcheck_window_with_global_tokens(device):
    q, k, v = make_qkv(1, 2, 1, 40, 40, 8, dtype=torch.float64, device=device, scale_inputs=2.0)
    torch.autograd.gradcheck(
        lambda q, k, v: ae.sliding_window_attention(q, k, v, (5, 2), global_tokens=3, softcap=0.7,
                                                    return_lse=True), (q, k, v))


def test_off_and_far_caps(device):
    q, k, v = make_qkv(1, 2, 2, 65, 65, 32, device=device)
    plain = ae.flash_attention(q, k, v, causal=True)
    assert torch.equal(ae.flash_attention(q, k, v, causal=True, softcap=0), plain)
    assert torch.equal(ae.flash_attention(q, k, v, causal=True, softcap=None), plain)
    # scores of a few units under a cap of 1e4 move by ~s^3 / (3 cap^2) < 1e-7
    far = ae.flash_attention(q, k, v, causal=True, softcap=1e4)
    assert (far - plain).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    q, k, v = make_qkv(2, 4, 2, 19, 23, 16, dtype=dtype, device=device, scale_inputs=2.0)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, softcap=2.0, mask_kind=MASK_KINDS["window"], causal=True,
                                             window_left=5))


def test_torch_compile_fullgraph(device):
    q, k, v = make_qkv(1, 4, 2, 65, 65, 32, device=device, scale_inputs=2.0)
    check_compiles(lambda q, k, v: ae.sliding_window_attention(q, k, v, 8, causal=True, softcap=2.0).square().sum(),
                   q, k, v)


@pytest.mark.parametrize("value, exc", [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                        (1e-9, ValueError), (1e9, ValueError), ("1", TypeError), (True, TypeError)])
@pytest.mark.parametrize("fn", [
    lambda q, c: ae.flash_attention(q, q, q, softcap=c),
    lambda q, c: ae.sliding_window_attention(q, q, q, 2, softcap=c),
    lambda q, c: ae.neighborhood_attention(q, q, q, 3, softcap=c),
    lambda q, c: ae.block_sparse_attention(q, q, q, torch.ones(1, 1, 1, dtype=torch.bool), block_size=8, softcap=c),
], ids=["flash", "window", "neighborhood", "block_sparse"])
def test_bad_softcap(fn, value, exc):
    with pytest.raises(exc, match="softcap"):
        fn(torch.randn(1, 2, 5, 8), value)


def test_direct_op_call_checks_softcap():
    q = torch.randn(1, 2, 5, 8)
    for bad in (-2.0, 1e-40, 1e300):
        with pytest.raises(RuntimeError, match=r"softcap must be 0 \(off\) or in"):
            AttentionSpec(scale=1.0, softcap=bad).forward(q, q, q)
    out, lse = AttentionSpec(scale=1.0).forward(q, q, q)
    with pytest.raises(RuntimeError, match=r"softcap must be 0 \(off\) or in"):
        AttentionSpec(scale=1.0, softcap=float("nan")).backward(out, None, q, q, q, out, lse)
