"""sliding_window_attention (windows, dilation, Longformer global tokens) against a
float64 dense reference built from an explicit boolean mask."""

import pytest
import torch

import attention_ext as ae
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R
from _harness import check_attention, check_compiles, make_qkv, opcheck_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _win(window, **kw):
    return lambda q, k, v: ae.sliding_window_attention(q, k, v, window, return_lse=True, **kw)


def _reach(window, causal):
    left, right = (window, window) if isinstance(window, int) else window
    return left, 0 if causal else right


# (Nq, Nk, window, causal, dilation): window 0, 1, equal to N, beyond N, one-sided,
# dilation with N not a multiple of it, Nq != Nk both ways.
CASES = [
    (300, 300, 0, False, 1),
    (300, 300, 1, False, 1),
    (300, 300, 1, True, 1),
    (257, 257, (17, 5), False, 1),
    (257, 257, (0, 33), False, 1),
    (300, 300, 300, True, 1),
    (200, 200, 5000, False, 1),
    (301, 301, (4, 2), False, 3),
    (301, 301, 7, True, 4),
    (100, 333, (20, 10), False, 1),
    (333, 100, (20, 10), True, 1),
    (1, 500, 64, True, 1),
    (700, 700, 128, True, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_matches_reference(device, dtype, case):
    Nq, Nk, window, causal, dilation = case
    q, k, v = make_qkv(2, 4, 2, Nq, Nk, 64, dtype=dtype, device=device)
    left, right = _reach(window, causal)
    mask = R.window_mask(Nq, Nk, left, right, dilation=dilation, causal=causal)
    check_attention(_win(window, causal=causal, dilation=dilation), q, k, v, mask,
                    grads=dtype == torch.float32 or Nq * Nk < 100_000)


def _global_mask(nk, positions):
    g = torch.zeros(nk, dtype=torch.bool)
    g[positions] = True
    return g


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_global_tokens(device, dtype, causal):
    N = 300
    q, k, v = make_qkv(2, 4, 1, N, N, 32, dtype=dtype, device=device)
    # global positions at both edges and in the middle
    g = _global_mask(N, [0, 1, 2, 150, N - 1])
    mask = R.window_mask(N, N, 16, 0 if causal else 16, causal=causal) | R.global_mask_2d(N, N, g, causal=causal)
    check_attention(_win(16, causal=causal, global_tokens=g.to(device)), q, k, v, mask)
    # the count form: the first g positions
    mask = R.window_mask(N, N, 16, 0 if causal else 16, causal=causal) | \
        R.global_mask_2d(N, N, _global_mask(N, list(range(7))), causal=causal)
    check_attention(_win(16, causal=causal, global_tokens=7), q, k, v, mask)


def test_global_mask_per_batch(device):
    N = 200
    q, k, v = make_qkv(2, 2, 2, N, N, 32, device=device)
    g = torch.zeros(2, N, dtype=torch.bool)
    g[0, [3, 100]] = True
    g[1, [N - 1]] = True
    mask = torch.stack([R.window_mask(N, N, 8, 8) | R.global_mask_2d(N, N, g[b]) for b in range(2)]).unsqueeze(1)
    check_attention(_win(8, global_tokens=g.to(device)), q, k, v, mask)


def test_global_with_dilation_and_unequal_lengths(device):
    Nq, Nk = 90, 150
    q, k, v = make_qkv(1, 2, 1, Nq, Nk, 16, device=device)
    g = _global_mask(Nk, [0, 149])
    mask = R.window_mask(Nq, Nk, 5, 3, dilation=2) | R.global_mask_2d(Nq, Nk, g)
    check_attention(_win((5, 3), dilation=2, global_tokens=g.to(device)), q, k, v, mask)


def test_full_window_equals_flash_attention(device):
    q, k, v = make_qkv(1, 4, 2, 190, 190, 64, device=device)
    a = ae.sliding_window_attention(q, k, v, 190)
    b = ae.flash_attention(q, k, v)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_causal_window_of_n_equals_causal(device):
    q, k, v = make_qkv(1, 4, 2, 190, 190, 64, device=device)
    a = ae.sliding_window_attention(q, k, v, (190, 0))
    b = ae.flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    c = ae.sliding_window_attention(q, k, v, 189, causal=True)
    torch.testing.assert_close(c, b, atol=1e-6, rtol=1e-5)


def test_gradcheck(device):
    q, k, v = make_qkv(1, 2, 1, 23, 23, 8, dtype=torch.float64, device=device)
    g = _global_mask(23, [0, 11]).to(device)
    for kw in (dict(window=(3, 1)), dict(window=2, causal=True, dilation=2), dict(window=1, global_tokens=g)):
        window = kw.pop("window")
        torch.autograd.gradcheck(lambda q, k, v: ae.sliding_window_attention(q, k, v, window, **kw), (q, k, v))


def test_opcheck(device):
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, device=device)
    g = torch.zeros(1, 40, dtype=torch.bool, device=device)
    g[0, 5] = True
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, mask_kind=MASK_KINDS["window"], causal=True, window_left=4,
                                             dilation=2, num_global=1, global_mask=g))


def test_torch_compile(device):
    q, k, v = make_qkv(1, 2, 1, 80, 80, 16, device=device)
    check_compiles(lambda q, k, v: ae.sliding_window_attention(q, k, v, 9, causal=True).sum(), q, k, v)


BAD = [
    (dict(window=-1), ValueError, "window"),
    (dict(window=(2, -3)), ValueError, "window right"),
    (dict(window=1.5), TypeError, "window"),
    (dict(window=(1, 2, 3)), ValueError, "window"),
    (dict(window=2, dilation=0), ValueError, "dilation"),
    (dict(window=2, dilation=1.0), TypeError, "dilation"),
    (dict(window=2, global_tokens=-1), ValueError, "global_tokens"),
    (dict(window=2, global_tokens=torch.zeros(1, 5)), TypeError, "global_tokens"),
    (dict(window=2, global_tokens=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "global_tokens"),
    (dict(window=2, causal="yes"), TypeError, "causal"),
    (dict(window=2, scale=0.0), ValueError, "scale"),
]


@pytest.mark.parametrize("case", BAD, ids=[str(c[0]) for c in BAD])
def test_bad_input(case):
    kwargs, exc, fragment = case
    q = torch.randn(1, 2, 5, 8)
    kwargs = dict(kwargs)
    window = kwargs.pop("window")
    with pytest.raises(exc, match=fragment):
        ae.sliding_window_attention(q, q, q, window, **kwargs)
