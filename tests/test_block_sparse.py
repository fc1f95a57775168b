"""block_sparse_attention and the layouts of attention_ext.patterns."""

import pytest
import torch

import attention_ext as ae
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R
from _harness import check_attention, make_qkv, opcheck_attention

P = ae.patterns


def _bs(layout, bs, causal=False):
    return lambda q, k, v: ae.block_sparse_attention(q, k, v, layout, block_size=bs, causal=causal,
                                                     return_lse=True)


@pytest.mark.parametrize("bs", [16, 64, 50, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_random_layout(device, dtype, bs):
    Nq, Nk, H = 333, 300, 4
    q, k, v = make_qkv(2, H, 2, Nq, Nk, 64, dtype=dtype, device=device)
    layout = torch.rand(H, -(-Nq // bs), -(-Nk // bs)) < 0.4
    layout[1, 0] = False  # a block row with nothing: its queries get zeros
    check_attention(_bs(layout.to(device), bs), q, k, v, R.block_mask(layout, bs, Nq, Nk).unsqueeze(0))


@pytest.mark.parametrize("name", ["bigbird", "strided", "fixed", "longformer"])
def test_patterns(device, name):
    N, bs, H = 400, 32, 4
    q, k, v = make_qkv(1, H, 1, N, N, 32, device=device)
    build = {
        "bigbird": lambda: P.bigbird(N, bs, num_heads=H, seed=3),
        "strided": lambda: P.strided(N, bs, stride=3, num_heads=H),
        "fixed": lambda: P.fixed(N, bs, stride=4, num_summary_blocks=2, num_heads=H),
        "longformer": lambda: P.longformer(N, bs, window_blocks=2, global_blocks=1, num_heads=1),
    }[name]
    layout = build()
    causal = name in ("strided", "fixed")
    mask = R.block_mask(layout, bs, N, N).unsqueeze(0)
    if causal:
        mask = mask & R.causal_mask(N, N)
    check_attention(_bs(layout.to(device), bs, causal), q, k, v, mask)


def test_full_layout_equals_flash(device):
    q, k, v = make_qkv(1, 2, 1, 100, 130, 32, device=device)
    layout = torch.ones(1, 2, 3, dtype=torch.bool, device=device)
    torch.testing.assert_close(ae.block_sparse_attention(q, k, v, layout, block_size=64),
                               ae.flash_attention(q, k, v), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ae.block_sparse_attention(q, k, v, layout[0], block_size=64, causal=True),
                               ae.flash_attention(q, k, v, causal=True), atol=1e-6, rtol=1e-5)


def test_gradcheck(device):
    q, k, v = make_qkv(1, 2, 1, 20, 24, 8, dtype=torch.float64, device=device)
    layout = torch.tensor([[[1, 0, 1], [0, 1, 1], [1, 1, 0]], [[0, 0, 1], [1, 0, 0], [1, 1, 1]]],
                          dtype=torch.bool, device=device)
    torch.autograd.gradcheck(lambda q, k, v: ae.block_sparse_attention(q, k, v, layout, block_size=8), (q, k, v))


def test_opcheck(device):
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, device=device)
    layout = P.bigbird(40, 8, num_heads=2, seed=0).to(device)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, mask_kind=MASK_KINDS["block_layout"], block_layout=layout,
                                             block_size=8))


def test_bigbird_is_seeded_and_has_its_parts():
    a = P.bigbird(1024, 64, num_heads=2, seed=7)
    b = P.bigbird(1024, 64, num_heads=2, seed=7)
    c = P.bigbird(1024, 64, num_heads=2, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = 16
    assert a.shape == (2, n, n)
    assert a[:, :2].all() and a[:, :, :2].all()  # global blocks
    idx = torch.arange(n)
    assert a[:, idx, idx].all() and a[:, idx[1:], idx[:-1]].all()  # band
    # each non-global row: 3 band + 2 global + 3 random (fewer where they overlap)
    assert (a[:, 2:].sum(-1) <= 8).all() and (a[:, 4:-1].sum(-1) == 8).all()


def test_strided_and_fixed_shapes():
    s = P.strided(256, 32, stride=2, num_heads=2)
    assert s.shape == (2, 8, 8)
    assert torch.equal(s[0], torch.tensor([[0 <= i - j < 2 for j in range(8)] for i in range(8)]))
    assert torch.equal(s[1], torch.tensor([[(i - j) % 2 == 0 and j <= i for j in range(8)] for i in range(8)]))
    f = P.fixed(256, 32, stride=4, num_summary_blocks=1)
    assert f.shape == (1, 8, 8)
    assert f[0, 7, 3] and f[0, 5, 4] and not f[0, 5, 2] and not f[0, 2, 3]


BAD = [
    (lambda: torch.ones(1, 2, 2), TypeError, "layout must be a bool"),
    (lambda: torch.ones(1, 3, 2, dtype=torch.bool), ValueError, "layout must have shape"),
    (lambda: torch.ones(3, 2, 2, dtype=torch.bool), ValueError, "layout must have shape"),
    (lambda: [[True]], TypeError, "layout must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", BAD, ids=["dtype", "blocks", "heads", "type"])
def test_bad_layout(case):
    build, exc, fragment = case
    q = torch.randn(1, 2, 100, 8)
    with pytest.raises(exc, match=fragment):
        ae.block_sparse_attention(q, q, q, build(), block_size=64)


def test_bad_block_size():
    q = torch.randn(1, 2, 100, 8)
    with pytest.raises(ValueError, match="block_size"):
        ae.block_sparse_attention(q, q, q, torch.ones(1, 1, 1, dtype=torch.bool), block_size=0)


def test_bad_pattern_arguments():
    with pytest.raises(ValueError, match="num_window_blocks must be odd"):
        P.bigbird(100, 10, num_window_blocks=2)
    with pytest.raises(ValueError, match="seq_len"):
        P.strided(0, 10)
    with pytest.raises(ValueError, match="num_summary_blocks"):
        P.fixed(100, 10, stride=2, num_summary_blocks=3)


@pytest.mark.parametrize("bs", [256, 1024])
def test_large_block_sizes(bs):
    # blocks larger than the kernels' largest tile (128): tiles split the blocks; forward
    # and backward against the float64 reference, fp32 (and float64 for tight numbers)
    Nq, Nk = 1100, 1300
    layout = torch.rand(2, -(-Nq // bs), -(-Nk // bs)) < 0.6
    layout[:, :, 0] = True  # every query row sees a block
    layout[1, -1] = False   # ... but the last block row of head 1, whose queries get zeros
    mask = R.block_mask(layout, bs, Nq, Nk).unsqueeze(0)
    for dtype in (torch.float32, torch.float64):
        q, k, v = make_qkv(1, 2, 1, Nq, Nk, 32, dtype=dtype)
        check_attention(_bs(layout, bs), q, k, v, mask)


@pytest.mark.parametrize("bs", [16, 50, 128, 256, 1000, 1024, 4096])
def test_tiles_bounded_by_128(bs):
    # the CPU kernels' per-thread scratch is sized by their tiles: never by a large block
    (fq, fk), (bq, bk) = ae._C._cpu_tile_shapes(MASK_KINDS["block_layout"], bs, 8192, 8192)
    assert max(fq, fk, bq, bk) <= 128
    # where possible tiles stay aligned with the blocks (whole blocks or parts of one)
    if bs <= 128 or bs % 128 == 0:
        assert fq % bs == 0 or bs % fq == 0, (bs, fq)
    if bs % 64 == 0:
        assert bq % bs == 0 or bs % bq == 0, (bs, bq)
