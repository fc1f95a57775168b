"""neighborhood_attention on 1-3-D grids (kernel_size / dilation / stride / causal per dim)
against NATTEN's rule written out in reference.natten_mask, forward and backward."""

import math

import pytest
import torch

import attention_ext as ae
from attention_ext import _neighborhood
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R
from _harness import check_attention, check_compiles, make_qkv, opcheck_attention


def test_reference_rows_hold_kernel_volume():
    # NATTEN's shifted windows: every non-causal query sees prod(kernel_size) keys, stride or not
    for spatial, ks, dil, st in (((9, 10), (4, 3), (2, 1), (1, 3)), ((5, 6, 7), (5, 2, 3), (1, 3, 2), (5, 2, 1)),
                                 ((30,), (6,), (5,), (4,))):
        assert torch.all(R.natten_mask(spatial, ks, dil, st).sum(-1) == math.prod(ks))


def test_reference_stride_groups_share_windows():
    m = R.natten_window_1d(12, 4, 1, 4, False)  # stride == kernel: blocked attention
    assert torch.equal(m, torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3))


# (spatial, kernel_size, dilation, stride, causal), one tuple entry per dim
CASES = [
    ((40,), (6,), (1,), (1,), (False,)),
    ((41,), (4,), (3,), (2,), (True,)),
    ((33,), (5,), (2,), (3,), (False,)),
    ((70,), (9,), (1,), (4,), (True,)),
    ((13, 11), (3, 4), (1, 1), (1, 1), (False, False)),
    ((20, 18), (7, 7), (1, 1), (1, 1), (False, False)),
    ((17, 19), (5, 6), (2, 3), (2, 3), (False, True)),
    ((12, 16), (4, 4), (1, 1), (4, 4), (False, False)),
    ((10, 20), (5, 5), (2, 2), (1, 1), (True, True)),
    ((7, 6), (7, 6), (1, 1), (1, 1), (False, False)),        # extent == kernel
    ((14, 9), (7, 3), (2, 3), (3, 1), (True, False)),        # extent == kernel * dilation
    ((6, 7, 8), (3, 3, 4), (1, 2, 1), (1, 1, 2), (False, True, False)),
    ((4, 8, 9), (3, 5, 5), (1, 1, 1), (1, 1, 1), (False, False, False)),
    ((5, 5, 6), (5, 5, 3), (1, 1, 2), (1, 2, 3), (True, False, False)),
    ((8, 6, 6), (2, 3, 6), (4, 2, 1), (2, 3, 6), (False, False, True)),
]


def run(spatial, fn_kwargs):
    """fn(q, k, v) on flat (B, H, N, D) leaves through the grid function -> flat (out, lse)."""
    def fn(q, k, v):
        B, N = q.shape[0], q.shape[2]
        grid = [t.reshape(B, t.shape[1], *spatial, t.shape[-1]) for t in (q, k, v)]
        out, lse = ae.neighborhood_attention(*grid, return_lse=True, **fn_kwargs)
        assert out.shape == (B, q.shape[1], *spatial, v.shape[-1]) and lse.shape == (B, q.shape[1], *spatial)
        return out.reshape(B, q.shape[1], N, v.shape[-1]), lse.reshape(B, q.shape[1], N)
    return fn


def case_id(c):
    return "-".join("x".join(str(int(v)) for v in part) for part in c)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(device, dtype, case):
    spatial, ks, dil, st, causal = case
    N = math.prod(spatial)
    q, k, v = make_qkv(2, 4, 2, N, N, 16, dtype=dtype, device=device)
    check_attention(run(spatial, dict(kernel_size=ks, dilation=dil, stride=st, causal=causal)), q, k, v,
                    R.natten_mask(spatial, ks, dil, st, causal))


# grids whose dilation groups are whole boxes (8x8, 4x4x4): tile pairs are classified Full or
# trimmed to the rows and columns they need (csrc/cpu/kernels/na_tiles.h)
ALIGNED = [
    ((32, 32), (7, 7), (1, 1), (1, 1), (False, False)),
    ((16, 32), (8, 8), (1, 1), (8, 8), (False, False)),   # blocked: Full pairs only
    ((16, 16), (7, 7), (2, 2), (3, 1), (False, True)),
    ((8, 8, 8), (3, 5, 3), (1, 1, 1), (1, 2, 1), (False, False, True)),
    ((8, 16, 8), (4, 4, 4), (2, 1, 1), (1, 4, 1), (True, False, False)),
]


@pytest.mark.parametrize("case", ALIGNED, ids=case_id)
def test_aligned_boxes(device, case):
    spatial, ks, dil, st, causal = case
    N = math.prod(spatial)
    q, k, v = make_qkv(1, 2, 1, N, N, 16, device=device)
    check_attention(run(spatial, dict(kernel_size=ks, dilation=dil, stride=st, causal=causal)), q, k, v,
                    R.natten_mask(spatial, ks, dil, st, causal))


def test_many_tiles_and_int_arguments(device):
    # ints broadcast to every dim; a grid of several boxes per dim, with partial edge boxes
    spatial = (37, 29)
    q, k, v = make_qkv(1, 2, 1, math.prod(spatial), math.prod(spatial), 32, Dv=24, device=device)
    check_attention(run(spatial, dict(kernel_size=7, dilation=2, stride=2)), q, k, v,
                    R.natten_mask(spatial, (7, 7), (2, 2), (2, 2)))


def test_softcap_and_sinks(device):
    spatial = (9, 10)
    N = math.prod(spatial)
    q, k, v = make_qkv(1, 4, 1, N, N, 16, device=device, scale_inputs=3.0)
    sinks = torch.randn(4, device=device, requires_grad=True)
    check_attention(run(spatial, dict(kernel_size=(3, 4), causal=(True, False), softcap=5.0, sinks=sinks)),
                    q, k, v, R.natten_mask(spatial, (3, 4), None, None, (True, False)), softcap=5.0, sinks=sinks)


def test_key_mask_by_grid(device):
    spatial = (6, 8)
    N = math.prod(spatial)
    q, k, v = make_qkv(2, 2, 2, N, N, 8, device=device)
    km = torch.rand(2, *spatial, device=device) > 0.3
    mask = R.natten_mask(spatial, (3, 5)) & km.reshape(2, 1, 1, N).cpu()
    check_attention(run(spatial, dict(kernel_size=(3, 5), key_mask=km)), q, k, v, mask)


def test_one_dim_odd_stride_one_keeps_the_1d_kind(monkeypatch):
    # today's calls: no grid fields in the spec
    seen = []
    orig = AttentionSpec.forward
    monkeypatch.setattr(AttentionSpec, "forward", lambda self, *a: seen.append(self) or orig(self, *a))
    q = torch.randn(1, 2, 20, 8)
    ae.neighborhood_attention(q, q, q, 5, dilation=2, causal=True)
    assert seen[-1].spatial_shape == () and seen[-1].kernel_size == 5 and seen[-1].causal
    ae.neighborhood_attention(q, q, q, 4)
    assert seen[-1].spatial_shape == (20,) and seen[-1].na_kernel_size == (4,)


def test_full_kernel_equals_flash(device):
    q, k, v = make_qkv(1, 2, 1, 30, 30, 16, device=device)
    grid = [t.reshape(1, t.shape[1], 5, 6, 16) for t in (q, k, v)]
    out = ae.neighborhood_attention(*grid, (5, 6))
    torch.testing.assert_close(out.reshape(1, 2, 30, 16), ae.flash_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_tile_order_is_a_permutation_grouping_dilation():
    order, inverse = _neighborhood.orders((6, 9), (2, 3), (2, 2), "cpu")
    assert torch.equal(order[inverse], torch.arange(54))
    x, y = order // 9, order % 9
    # the first box: dilation group (0, 0), x' in {0, 1}, y' in {0, 1} -> x in {0, 2}, y in {0, 3}
    assert (x[:4].tolist(), y[:4].tolist()) == ([0, 0, 2, 2], [0, 3, 0, 3])


def test_gradcheck(device):
    for spatial, kw in (((5, 6), dict(kernel_size=(3, 4), stride=(1, 2), causal=(False, True))),
                        ((3, 4, 5), dict(kernel_size=(2, 3, 2), dilation=(1, 1, 2)))):
        N = math.prod(spatial)
        q, k, v = make_qkv(1, 2, 1, N, N, 4, dtype=torch.float64, device=device)
        torch.autograd.gradcheck(lambda q, k, v: run(spatial, kw)(q, k, v)[0], (q, k, v))


def test_opcheck(device):
    q, k, v = make_qkv(1, 2, 1, 60, 60, 8, device=device)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.3, mask_kind=MASK_KINDS["neighborhood"], spatial_shape=(6, 10),
                                             na_kernel_size=(3, 4), na_dilation=(2, 1), na_stride=(1, 2),
                                             na_causal=(0, 1), tile_shape=(2, 8)))


def test_compiles(device):
    q, k, v = make_qkv(1, 2, 2, 48, 48, 8, device=device)

    def loss(q, k, v):
        grid = [t.reshape(1, 2, 6, 8, 8) for t in (q, k, v)]
        return ae.neighborhood_attention(*grid, (3, 5), dilation=(2, 1), causal=(True, False)).square().sum()

    check_compiles(loss, q, k, v)


def test_compiles_dynamic():
    fn = torch.compile(lambda q: ae.neighborhood_attention(q, q, q, (3, 4), stride=(1, 2)), fullgraph=True,
                       dynamic=True, backend="aot_eager")
    for shape in ((1, 2, 6, 8, 8), (2, 2, 7, 9, 8)):  # the grid specializes: one graph per grid
        q = torch.randn(shape)
        torch.testing.assert_close(fn(q), ae.neighborhood_attention(q, q, q, (3, 4), stride=(1, 2)))


BAD = [
    (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a tuple of 2"),
    (dict(kernel_size=9), ValueError, r"kernel_size\[0\] = 9 exceeds the extent 8 of spatial dim 0"),
    (dict(kernel_size=(3, 5), dilation=(1, 3)), ValueError, r"kernel_size\[1\] \* dilation\[1\] = 5 \* 3"),
    (dict(kernel_size=(3, 5), stride=(1, 6)), ValueError, r"stride\[1\] = 6 exceeds kernel_size\[1\] = 5"),
    (dict(kernel_size=(3, 0)), ValueError, r"kernel_size\[1\] must be >= 1"),
    (dict(kernel_size=3.0), TypeError, "kernel_size"),
    (dict(kernel_size=3, causal=(True, 1)), TypeError, r"causal\[1\] must be a bool"),
    (dict(kernel_size=3, dilation=(1,)), ValueError, "dilation must be an int or a tuple of 2"),
    (dict(kernel_size=3, cu_seqlens=torch.tensor([0, 80], dtype=torch.int32)), ValueError, "cu_seqlens needs a 1-D"),
    (dict(kernel_size=3, alibi_slopes=torch.ones(2)), ValueError, "alibi_slopes needs a 1-D"),
]


@pytest.mark.parametrize("case", BAD, ids=[str(c[0]) for c in BAD])
def test_bad_input(case):
    kwargs, exc, fragment = case
    q = torch.randn(1, 2, 8, 10, 4)
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=fragment):
        ae.neighborhood_attention(q, q, q, kwargs.pop("kernel_size"), **kwargs)


def test_bad_shapes():
    q = torch.randn(1, 2, 8, 10, 4)
    with pytest.raises(ValueError, match=r"k spatial shape \(8, 9\) must equal q's \(8, 10\)"):
        ae.neighborhood_attention(q, torch.randn(1, 2, 8, 9, 4), q, 3)
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        x = torch.randn(1, 1, 3, 3, 3, 3, 2)
        ae.neighborhood_attention(x, x, x, 3)
    with pytest.raises(ValueError, match="stride"):  # 1-D even kernels take the grid path's checks
        x = torch.randn(1, 1, 10, 2)
        ae.neighborhood_attention(x, x, x, 4, stride=5)


def test_raw_op_rejects_inconsistent_grid():
    q = torch.randn(1, 1, 12, 4)
    with pytest.raises(ValueError, match="holds 10 tokens"):
        torch.ops.attention_ext.attention_fwd(q, q, q, 0.5, mask_kind=MASK_KINDS["neighborhood"], spatial_shape=[2, 5],
                                              na_kernel_size=[2, 2], na_dilation=[1, 1], na_stride=[1, 1],
                                              na_causal=[0, 0], tile_shape=[2, 2])
    with pytest.raises(ValueError, match="must have 2 entries"):
        torch.ops.attention_ext.attention_fwd(q, q, q, 0.5, mask_kind=MASK_KINDS["neighborhood"], spatial_shape=[3, 4],
                                              na_kernel_size=[2], na_dilation=[1, 1], na_stride=[1, 1],
                                              na_causal=[0, 0], tile_shape=[2, 2])


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_matches_natten_itself(case):
    """Against the natten package (its FlexAttention backend runs on the CPU, forward only),
    where it is installed: `pip install natten` builds it without CUDA."""
    natten = pytest.importorskip("natten")
    spatial, ks, dil, st, causal = case
    q, k, v = (torch.randn(2, 4, *spatial, 16, dtype=torch.float64) for _ in range(3))
    ours = ae.neighborhood_attention(q, k, v, ks, dilation=dil, stride=st, causal=causal)
    na = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(spatial)]
    heads_last = [t.movedim(1, -2).float() for t in (q, k, v)]  # NATTEN: (B, *spatial, H, D)
    theirs = na(*heads_last, kernel_size=ks, stride=st, dilation=dil, is_causal=causal, backend="flex-fna",
                torch_compile=False).movedim(-2, 1)
    torch.testing.assert_close(ours.float(), theirs, atol=2e-5, rtol=1e-4)
