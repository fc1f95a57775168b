"""key_mask (per-batch key padding) in every pattern of the kernel family, forward and
backward, against the float64 reference with the same keys masked."""


import pytest
import torch

import attention_ext as ae
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R
from _harness import check_attention, check_compiles, make_qkv, opcheck_attention, pattern_cases

N = 150
LAYOUT = ae.patterns.bigbird(N, 16, num_heads=4, seed=3)


def key_mask(batch, nk, *, empty_row=True):
    """Left padding, right padding, scattered holes and (optionally) a row with no key."""
    g = torch.Generator().manual_seed(5)
    m = torch.ones(batch, nk, dtype=torch.bool)
    m[0, : nk // 7] = False
    m[1, nk - nk // 5:] = False
    m[2] = torch.rand(nk, generator=g) > 0.3
    if empty_row:
        m[3] = False
    return m


def full_mask(pattern, km):
    """(B, 1, Nq, Nk): the 2-D (or per-head) pattern and the key mask together."""
    p = torch.ones(1, 1, 1, km.shape[1], dtype=torch.bool) if pattern is None else pattern
    if p.dim() == 2:
        p = p.view(1, 1, *p.shape)
    elif p.dim() == 3:
        p = p.unsqueeze(0)
    return p & km.view(km.shape[0], 1, 1, -1)


CASES = pattern_cases(N, LAYOUT, nq_dense=70)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(device, case, dtype):
    _, fn, pattern, nq = case
    q, k, v = make_qkv(4, 4, 2, nq, N, 32, dtype=dtype, device=device)
    km = key_mask(4, N)
    check_attention(lambda q, k, v: fn(q, k, v, key_mask=km.to(device)), q, k, v, full_mask(pattern, km))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_whole_tiles_masked(device, dtype):
    # long runs of padding cover whole key tiles (skipped) next to partly masked ones
    n = 700
    q, k, v = make_qkv(2, 2, 1, n, n, 64, dtype=dtype, device=device)
    km = torch.ones(2, n, dtype=torch.bool)
    km[0, :333] = False  # left padding, as in batched generation
    km[1, 401:] = False  # right padding
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, key_mask=km.to(device),
                                                       return_lse=True),
                    q, k, v, full_mask(R.causal_mask(n, n), km))


def test_all_true_equals_no_mask(device):
    q, k, v = make_qkv(2, 2, 2, 65, 65, 32, device=device)
    ones = torch.ones(2, 65, dtype=torch.bool, device=device)
    plain = ae.flash_attention(q, k, v, causal=True)
    assert torch.equal(ae.flash_attention(q, k, v, causal=True, key_mask=ones), plain)
    # a 1-D mask is shared by the batch
    km = key_mask(4, 65)[2]
    a = ae.sliding_window_attention(q, k, v, 8, key_mask=km.to(device))
    b = ae.sliding_window_attention(q, k, v, 8, key_mask=km.expand(2, -1).to(device))
    assert torch.equal(a, b)


def test_masked_keys_do_not_matter():
    # NaN / inf in masked keys and values changes nothing, gradients included (the CPU
    # kernels guard their products as for any unseen key; see test_reliability)
    q, k, v = make_qkv(4, 2, 1, 40, 40, 16)
    km = key_mask(4, 40, empty_row=False)
    out = ae.flash_attention(q, k, v, key_mask=km)
    k2, v2 = k.detach().clone(), v.detach().clone()
    bad = ~km.view(4, 1, 40, 1).expand_as(k2)
    k2[bad], v2[bad] = float("nan"), float("inf")
    k2.requires_grad_(), v2.requires_grad_()
    out2 = ae.flash_attention(q, k2, v2, key_mask=km)
    assert torch.equal(out, out2)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    dq2, dk2, dv2 = torch.autograd.grad(out2, (q, k2, v2), g)
    assert torch.equal(dq, dq2)
    assert dk2[bad].eq(0).all() and dv2[bad].eq(0).all()


def test_gradcheck(device):
    q, k, v = make_qkv(4, 2, 1, 9, 12, 8, dtype=torch.float64, device=device)
    km = key_mask(4, 12, empty_row=False).to(device)
    torch.autograd.gradcheck(lambda q, k, v: ae.flash_attention(q, k, v, key_mask=km, return_lse=True), (q, k, v))
    # causal with left padding leaves early rows without a key: output only
    km[3, :5] = False
    torch.autograd.gradcheck(lambda q, k, v: ae.sliding_window_attention(q, k, v, 4, causal=True, key_mask=km),
                             (q, k, v))


def test_opcheck_and_compile(device):
    q, k, v = make_qkv(4, 4, 2, 19, 23, 16, device=device)
    km = key_mask(4, 23).to(device)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, mask_kind=MASK_KINDS["window"], causal=True, window_left=5,
                                             key_mask=km))
    check_compiles(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, key_mask=km).square().sum(), q, k, v)


@pytest.mark.parametrize("value, exc, fragment", [
    (torch.ones(2, 5, dtype=torch.long), TypeError, "key_mask must be a bool tensor"),
    (torch.ones(3, 5, dtype=torch.bool), ValueError, r"key_mask must have shape \(batch=2, Nk=5\)"),
    (torch.ones(2, 4, dtype=torch.bool), ValueError, "key_mask must have shape"),
    ([True] * 5, TypeError, "key_mask must be a torch.Tensor"),
])
def test_bad_key_mask(value, exc, fragment):
    q = torch.randn(2, 2, 5, 8)
    for fn in (lambda m: ae.flash_attention(q, q, q, key_mask=m),
               lambda m: ae.sliding_window_attention(q, q, q, 2, key_mask=m),
               lambda m: ae.neighborhood_attention(q, q, q, 3, key_mask=m),
               lambda m: ae.block_sparse_attention(q, q, q, torch.ones(1, 1, 1, dtype=torch.bool), block_size=8,
                                                   key_mask=m)):
        with pytest.raises(exc, match=fragment):
            fn(value)


def test_direct_op_call_checks_key_mask():
    q = torch.randn(2, 2, 5, 8)
    with pytest.raises(RuntimeError, match=r"key_mask must have shape \[2, 5\]"):
        AttentionSpec(scale=1.0, key_mask=torch.ones(2, 4, dtype=torch.bool)).forward(q, q, q)
    with pytest.raises(RuntimeError, match="key_mask must be bool"):
        AttentionSpec(scale=1.0, key_mask=torch.ones(2, 5)).forward(q, q, q)
