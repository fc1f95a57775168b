"""neighborhood_attention against NATTEN's 1-D semantics, written out in
reference.neighborhood_mask."""

import pytest
import torch

import attention_ext as ae
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R
from _harness import check_attention, make_qkv, opcheck_attention


def test_reference_mask_has_kernel_size_keys_per_row():
    # the property NATTEN's shifted windows guarantee (non-causal)
    for n, ks, d in ((30, 7, 1), (31, 5, 3), (64, 9, 7), (9, 9, 1)):
        assert torch.all(R.neighborhood_mask(n, ks, dilation=d).sum(-1) == ks)


# (N, kernel_size, dilation, causal): edges, dilation not dividing N, kernel == N
CASES = [
    (300, 7, 1, False),
    (300, 1, 1, False),
    (301, 5, 3, False),
    (257, 13, 4, False),
    (64, 63, 1, False),
    (40, 9, 4, False),
    (300, 7, 1, True),
    (301, 5, 3, True),
    (200, 31, 2, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(device, dtype, case):
    N, ks, d, causal = case
    q, k, v = make_qkv(2, 4, 2, N, N, 32, dtype=dtype, device=device)
    mask = R.neighborhood_mask(N, ks, dilation=d, causal=causal)
    check_attention(lambda q, k, v: ae.neighborhood_attention(q, k, v, ks, dilation=d, causal=causal,
                                                              return_lse=True), q, k, v, mask)


def test_full_kernel_equals_flash(device):
    q, k, v = make_qkv(1, 2, 1, 33, 33, 16, device=device)
    torch.testing.assert_close(ae.neighborhood_attention(q, k, v, 33), ae.flash_attention(q, k, v), atol=1e-6,
                               rtol=1e-5)


def test_gradcheck(device):
    q, k, v = make_qkv(1, 2, 1, 19, 19, 8, dtype=torch.float64, device=device)
    for ks, d, c in ((5, 1, False), (3, 3, False), (5, 2, True)):
        torch.autograd.gradcheck(lambda q, k, v: ae.neighborhood_attention(q, k, v, ks, dilation=d, causal=c),
                                 (q, k, v))


def test_opcheck(device):
    q, k, v = make_qkv(1, 2, 2, 30, 30, 16, device=device)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, mask_kind=MASK_KINDS["neighborhood"], kernel_size=5,
                                             dilation=2))


BAD = [
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=3.0), TypeError, "kernel_size"),
    (dict(kernel_size=7, dilation=2), ValueError, "exceeds the sequence length"),
    (dict(kernel_size=3, dilation=0), ValueError, "dilation"),
]


@pytest.mark.parametrize("case", BAD, ids=[str(c[0]) for c in BAD])
def test_bad_input(case):
    kwargs, exc, fragment = case
    q = torch.randn(1, 2, 10, 8)
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=fragment):
        ae.neighborhood_attention(q, q, q, kwargs.pop("kernel_size"), **kwargs)


def test_unequal_lengths_rejected():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="Nq=10, Nk=12"):
        ae.neighborhood_attention(q, torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), 3)
