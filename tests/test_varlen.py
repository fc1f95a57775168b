"""Packed sequences (cu_seqlens): every exact-attention pattern against the float64
reference with explicit per-document masks (reference.packed_mask), forward and
backward, plus the spec machinery (gradcheck, opcheck, compile), the reliability
properties and the argument checks."""

import pytest
import torch

import attention_ext as ae
from attention_ext._spec import MASK_KINDS, AttentionSpec
import reference as R
from _harness import check_attention, check_compiles, make_qkv, opcheck_attention


def cu(lengths):
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32)


# lengths 0 and 1, shorter than a tile (64), and spanning several tiles
LENS = [0, 1, 5, 70, 200, 3, 130, 0, 17]
N = sum(LENS)
CU = cu(LENS)
# a packing per batch row; the second row has fewer documents and repeats its last value
CU_ROWS = torch.stack([CU, cu([150, 1, 0, 63, 64, 148] + [0, 0, 0])])
# queries and keys packed differently: documents with queries but no keys and keys but
# no queries, queries shorter than keys (bottom-right aligned in each document)
LENS_Q = [0, 1, 5, 30, 64, 3, 1, 0, 2]
LENS_K = [3, 1, 9, 70, 200, 0, 130, 0, 2]
LAYOUT = torch.rand(4, -(-N // 16), -(-N // 16), generator=torch.Generator().manual_seed(1)) < 0.4

PATTERNS = [
    ("dense", lambda **kw: ae.flash_attention, {}, lambda nq, nk: torch.ones(nq, nk, dtype=torch.bool)),
    ("causal", lambda **kw: ae.flash_attention, dict(causal=True), R.causal_mask),
    ("window_causal", lambda **kw: ae.sliding_window_attention, dict(window=16, causal=True),
     lambda nq, nk: R.window_mask(nq, nk, 16, 0, causal=True)),
    ("window_dilated_global", lambda **kw: ae.sliding_window_attention,
     dict(window=(9, 4), dilation=2, global_tokens=2),
     lambda nq, nk: R.window_mask(nq, nk, 9, 4, dilation=2) | R.global_mask_2d(nq, nk, torch.arange(nk) < 2)),
    ("neighborhood", lambda **kw: ae.neighborhood_attention, dict(kernel_size=7, dilation=2),
     lambda nq, nk: R.neighborhood_mask(nq, 7, dilation=2)),
    ("neighborhood_causal", lambda **kw: ae.neighborhood_attention, dict(kernel_size=5, causal=True),
     lambda nq, nk: R.neighborhood_mask(nq, 5, causal=True)),
    ("block_sparse", lambda **kw: ae.block_sparse_attention, dict(layout=LAYOUT, block_size=16, causal=True),
     lambda nq, nk: R.block_mask(LAYOUT, 16, nq, nk) & R.causal_mask(nq, nk)),
]


def call(fn, q, k, v, kw, **extra):
    kw = dict(kw, **extra)
    if fn is ae.sliding_window_attention:
        return fn(q, k, v, kw.pop("window"), return_lse=True, **kw)
    if fn is ae.neighborhood_attention:
        return fn(q, k, v, kw.pop("kernel_size"), return_lse=True, **kw)
    if fn is ae.block_sparse_attention:
        return fn(q, k, v, kw.pop("layout").to(q.device), return_lse=True, **kw)
    return fn(q, k, v, return_lse=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", PATTERNS, ids=[c[0] for c in PATTERNS])
def test_patterns_match_reference(device, case, dtype):
    _, fn, kw, doc_mask = case
    fn = fn()
    cu_rows = CU_ROWS.to(device)
    q, k, v = make_qkv(2, 4, 2, N, N, 16, dtype=dtype, device=device)
    check_attention(lambda q, k, v: call(fn, q, k, v, kw, cu_seqlens=cu_rows), q, k, v,
                    R.packed_mask(CU_ROWS, CU_ROWS, doc_mask))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_queries_and_keys_packed_differently(device, dtype, causal):
    cq, ck = cu(LENS_Q), cu(LENS_K)
    q, k, v = make_qkv(1, 6, 2, int(cq[-1]), int(ck[-1]), 16, Dv=24, dtype=dtype, device=device)
    doc = R.causal_mask if causal else (lambda nq, nk: torch.ones(nq, nk, dtype=torch.bool))
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=causal, cu_seqlens_q=cq.to(device),
                                                       cu_seqlens_k=ck.to(device), return_lse=True),
                    q, k, v, R.packed_mask(cq, ck, doc))
    # a window, bottom-right aligned inside each document
    check_attention(lambda q, k, v: ae.sliding_window_attention(q, k, v, (6, 2), causal=causal,
                                                                cu_seqlens_q=cq.to(device),
                                                                cu_seqlens_k=ck.to(device), return_lse=True),
                    q, k, v, R.packed_mask(cq, ck, lambda nq, nk: R.window_mask(nq, nk, 6, 2, causal=causal)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_with_key_mask_and_softcap(device, dtype):
    km = torch.rand(2, N, generator=torch.Generator().manual_seed(2)) > 0.3
    km[0, 6:76] = False  # a whole document masked: its queries see nothing
    q, k, v = make_qkv(2, 4, 4, N, N, 32, dtype=dtype, device=device, scale_inputs=3.0)
    mask = R.packed_mask(CU_ROWS, CU_ROWS, R.causal_mask) & km.view(2, 1, 1, N)
    check_attention(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, softcap=5.0, key_mask=km.to(device),
                                                       cu_seqlens=CU_ROWS.to(device), return_lse=True),
                    q, k, v, mask, softcap=5.0)


def test_global_mask_positions_are_the_rows(device):
    # a bool global mask flags positions of the packed row; a flagged key is global in
    # its own document only
    g = torch.zeros(1, N, dtype=torch.bool)
    g[0, [3, 80, 300]] = True
    q, k, v = make_qkv(1, 2, 1, N, N, 16, dtype=torch.float64, device=device)

    def doc_of(pos):
        return int((CU[1:] <= pos).sum())

    mask = R.packed_mask(CU, CU, lambda nq, nk: R.window_mask(nq, nk, 4, 4))
    for p in (3, 80, 300):
        d = doc_of(p)
        a, b = int(CU[d]), int(CU[d + 1])
        mask[0, 0, a:b, p] = True
        mask[0, 0, p, a:b] = True
    check_attention(lambda q, k, v: ae.sliding_window_attention(q, k, v, 4, global_tokens=g.to(device),
                                                                cu_seqlens=CU.to(device), return_lse=True),
                    q, k, v, mask)


def test_one_document_equals_unpacked(device):
    q, k, v = make_qkv(2, 4, 2, 100, 100, 16, device=device)
    whole = torch.tensor([0, 100], dtype=torch.int32, device=device)
    for fn in (lambda **kw: ae.flash_attention(q, k, v, causal=True, **kw),
               lambda **kw: ae.sliding_window_attention(q, k, v, 9, dilation=2, global_tokens=3, **kw)):
        assert torch.equal(fn(cu_seqlens=whole), fn())


def test_equals_a_loop_over_documents(device):
    # the kernels walk documents themselves; the result is the one each document gives alone
    q, k, v = make_qkv(1, 4, 2, N, N, 32, device=device)
    out = ae.flash_attention(q, k, v, causal=True, cu_seqlens=CU.to(device))
    parts = []
    for a, b in zip(CU[:-1].tolist(), CU[1:].tolist()):
        if b > a:
            parts.append(ae.flash_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True))
    torch.testing.assert_close(out, torch.cat(parts, 2), rtol=0, atol=0)


def test_gradcheck(device):
    c = torch.tensor([[0, 3, 3, 9, 13], [0, 1, 7, 13, 13]], dtype=torch.int32, device=device)
    q, k, v = make_qkv(2, 4, 2, 13, 13, 8, dtype=torch.float64, device=device)
    torch.autograd.gradcheck(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, cu_seqlens=c,
                                                                return_lse=True), (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: ae.sliding_window_attention(q, k, v, 2, global_tokens=1,
                                                                         cu_seqlens=c), (q, k, v))
    cq = torch.tensor([0, 2, 2, 5], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 4, 6, 11], dtype=torch.int32, device=device)
    q, k, v = make_qkv(1, 2, 1, 5, 11, 8, dtype=torch.float64, device=device)
    torch.autograd.gradcheck(lambda q, k, v: ae.flash_attention(q, k, v, causal=True, cu_seqlens_q=cq,
                                                                cu_seqlens_k=ck), (q, k, v))


def test_opcheck(device):
    q, k, v = make_qkv(2, 4, 2, 23, 23, 16, device=device)
    c = torch.tensor([[0, 5, 5, 23], [0, 1, 20, 23]], dtype=torch.int32, device=device)
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, mask_kind=MASK_KINDS["window"], causal=True,
                                             window_left=5, cu_seqlens_q=c, cu_seqlens_k=c))
    # the raw op takes a shared 1-D packing too
    opcheck_attention(q, k, v, AttentionSpec(scale=0.25, cu_seqlens_q=c[1], cu_seqlens_k=c[1]))


def test_compile_does_not_recompile_for_new_documents(device):
    from torch._dynamo.testing import CompileCounter

    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, device=device)

    def loss(q, k, v, c):
        return ae.flash_attention(q, k, v, causal=True, cu_seqlens=c).square().sum()

    c1 = torch.tensor([0, 10, 40], dtype=torch.int32, device=device)
    check_compiles(lambda q, k, v: loss(q, k, v, c1), q, k, v)
    counter = CompileCounter()
    compiled = torch.compile(loss, fullgraph=True, backend=counter, dynamic=True)
    for c in ([0, 10, 40], [0, 3, 7, 40], [0, 1, 2, 3, 40], [0, 40]):
        c = torch.tensor(c, dtype=torch.int32, device=device)
        torch.testing.assert_close(compiled(q, k, v, c), loss(q, k, v, c))
    assert counter.frame_count == 1, f"recompiled {counter.frame_count - 1} times for new boundaries"


def test_nan_in_another_document_never_leaks():
    q, k, v = make_qkv(1, 2, 1, N, N, 16)
    k2, v2, q2 = (t.detach().clone() for t in (k, v, q))
    a, b = int(CU[4]), int(CU[5])  # the 200-long document
    k2[:, :, a:b], v2[:, :, a:b], q2[:, :, a:b] = float("nan"), float("inf"), float("nan")
    for t in (q2, k2, v2):
        t.requires_grad_()
    out = ae.flash_attention(q, k, v, causal=True, cu_seqlens=CU)
    out2 = ae.flash_attention(q2, k2, v2, causal=True, cu_seqlens=CU)
    keep = torch.ones(N, dtype=torch.bool)
    keep[a:b] = False
    assert torch.equal(out[:, :, keep], out2[:, :, keep])
    g = torch.randn_like(out)
    g[:, :, ~keep] = 0
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads2 = torch.autograd.grad(out2, (q2, k2, v2), g)
    for x, y in zip(grads, grads2):
        assert torch.equal(x[:, :, keep], y[:, :, keep])


def test_backward_bitwise_equal_for_1_and_2_threads():
    q, k, v = make_qkv(2, 4, 2, N, N, 32, dtype=torch.bfloat16)
    c = CU_ROWS
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = ae.sliding_window_attention(q, k, v, 20, causal=True, cu_seqlens=c)
            results.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kwargs, exc, fragment", [
    (dict(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int64)), TypeError, "cu_seqlens must be an int32"),
    (dict(cu_seqlens=[0, 4, 9]), TypeError, "cu_seqlens must be a torch.Tensor"),
    (dict(cu_seqlens=torch.tensor([[[0, 9]]], dtype=torch.int32)), ValueError, r"cu_seqlens must have shape"),
    (dict(cu_seqlens=torch.tensor([[0, 9]] * 3, dtype=torch.int32)), ValueError, r"batch=2"),
    (dict(cu_seqlens=torch.tensor([9], dtype=torch.int32)), ValueError, "S >= 1"),
    (dict(cu_seqlens=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError, "must start at 0 and end at"),
    (dict(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "must start at 0 and end at"),
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 9], dtype=torch.int32)), ValueError, "must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([[0, 9], [0, 10]], dtype=torch.int32)), ValueError, "end at"),
    (dict(cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32)), ValueError, "go together"),
    (dict(cu_seqlens=torch.tensor([0, 9], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)),
     ValueError, "not both"),
    (dict(cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 3, 9], dtype=torch.int32)),
     ValueError, "same number of documents"),
])
def test_bad_cu_seqlens(kwargs, exc, fragment):
    q = torch.randn(2, 2, 9, 8)
    with pytest.raises(exc, match=fragment):
        ae.flash_attention(q, q, q, **kwargs)


def test_bad_cu_seqlens_device():
    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="cu_seqlens.device"):
        ae.flash_attention(q, q, q, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32, device="meta"))


@pytest.mark.parametrize("c, fragment", [
    (torch.tensor([0, 12, 9], dtype=torch.int32), "non-decreasing"),
    (torch.tensor([0, 4, 99], dtype=torch.int32), "end at the sequence length 9"),
    (torch.tensor([-3, 4, 9], dtype=torch.int32), "start at 0"),
    (torch.tensor([0, 9], dtype=torch.int64), "must be int32"),
])
def test_raw_op_checks_values(c, fragment):
    # a direct op call (as under torch.compile) never reads out of bounds
    q = torch.randn(1, 2, 9, 8)
    with pytest.raises((ValueError, TypeError), match=fragment):
        torch.ops.attention_ext.attention_fwd(q, q, q, 0.5, cu_seqlens_q=c, cu_seqlens_k=c)
    out, lse = torch.ops.attention_ext.attention_fwd(q, q, q, 0.5)
    with pytest.raises((ValueError, TypeError), match=fragment):
        torch.ops.attention_ext.attention_bwd(out, None, q, q, q, out, lse, 0.5, cu_seqlens_q=c, cu_seqlens_k=c)


def test_neighborhood_needs_one_packing():
    q = torch.randn(1, 2, 9, 8)
    c = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="same documents"):
        torch.ops.attention_ext.attention_fwd(q, q, q, 0.5, mask_kind=MASK_KINDS["neighborhood"], kernel_size=3,
                                              cu_seqlens_q=c, cu_seqlens_k=torch.tensor([0, 5, 9],
                                                                                        dtype=torch.int32))


def test_vmap_folds_into_the_batch():
    # a (B, S + 1) packing is a batch tensor: vmap over q, k, v (and the packing) folds
    q, k, v = make_qkv(3, 2, 1, 40, 40, 8)
    c = torch.tensor([[0, 10, 40], [0, 39, 40]], dtype=torch.int32)
    qs, ks, vs = (t.detach().view(3, 1, *t.shape[1:]).expand(3, 2, *t.shape[1:]) for t in (q, k, v))

    def f(q, k, v, c):
        return ae.flash_attention(q, k, v, causal=True, cu_seqlens=c)

    got = torch.vmap(f, in_dims=(0, 0, 0, None))(qs, ks, vs, c)
    for i in range(3):
        torch.testing.assert_close(got[i], f(qs[i], ks[i], vs[i], c), rtol=0, atol=0)
    cs = torch.stack([c, c.flip(0)])[[0, 1, 0]]
    got = torch.vmap(f)(qs, ks, vs, cs)
    for i in range(3):
        torch.testing.assert_close(got[i], f(qs[i], ks[i], vs[i], cs[i]), rtol=0, atol=0)
