"""Routing attention (attention_ext.routing_attention, nn.Attention(kind="routing")) and
Linformer (nn.Attention(kind="linformer")): the assignment against its definition, the
routed attention against float64 dense-mask references of the same assignment (forward
and backward), gradcheck, the EMA k-means update, the pattern letters, bad input."""

import pytest
import torch
import torch.nn.functional as F

import attention_ext as ae
import attention_ext.nn as aenn
import reference as R
from _harness import LOWP, check_compiles, make_qkv
from attention_ext._content_layers import LinformerProjection, RoutingHeads
from attention_ext.routing import routing_assignment

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems (conftest.py)

# (B, Hq, Hkv, Nq, Nk, C, window): C * window below, at and above N (tokens in no cluster
# and in several), GQA, queries shorter than keys (bottom-right aligned), several tiles
CASES = [(2, 4, 2, 37, 37, 5, 7), (1, 2, 1, 20, 45, 3, 20), (1, 2, 2, 150, 150, 4, 70), (2, 2, 2, 16, 16, 2, 8)]


def _cents(Hq, C, D, device, dtype=torch.float32):
    return torch.randn(Hq, C, D, dtype=dtype, device=device)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_assignment_is_each_clusters_top_window(device, shared_qk):
    B, Hq, Hkv, N, C, w = 2, 4, 2, 50, 6, 9
    q, k, _ = make_qkv(B, Hq, Hkv, N, N, 16, dtype=torch.float64, device=device)
    cents = _cents(Hq, C, 16, device)
    q_idx, k_idx = routing_assignment(q, k, cents, w, shared_qk=shared_qk)
    assert q_idx.shape == k_idx.shape == (B, Hq, C, w)
    assert q_idx.tolist() == R.routing_top_k(q, cents, w)
    # keys of GQA head h // 2 are scored against query head h's centroids
    assert k_idx.tolist() == (q_idx.tolist() if shared_qk else R.routing_top_k(k, cents, w, group=Hq // Hkv))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,shared_qk", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("case", CASES, ids=[f"N{c[3]}x{c[4]}_C{c[5]}_w{c[6]}" for c in CASES])
def test_matches_dense_reference(device, case, causal, shared_qk, dtype):
    B, Hq, Hkv, Nq, Nk, C, w = case
    if shared_qk and Nq != Nk:
        pytest.skip("shared_qk needs Nq == Nk")
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, 16, Dv=12, dtype=dtype, device=device)
    cents = _cents(Hq, C, 16, device)
    out = ae.routing_attention(q, k, v, cents, window=w, causal=causal, shared_qk=shared_qk)
    assert out.shape == (B, Hq, Nq, 12) and out.dtype == dtype and not out.isnan().any()
    q_idx, k_idx = routing_assignment(q, k, cents, w, shared_qk=shared_qk)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = R.routing_attention(q64, k64, v64, q_idx, k_idx, causal=causal)
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    lowp = (R.routing_attention(ql, kl, vl, q_idx, k_idx, causal=causal, attend=R.attention_lowp)
            if dtype in LOWP else None)
    R.check_close(out, ref, lowp=lowp)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (q64, k64, v64), g.double().cpu())
    lows = torch.autograd.grad(lowp, (ql, kl, vl), g) if lowp is not None else (None,) * 3
    for name, a, b, lp in zip(("dq", "dk", "dv"), ours, refs, lows):
        assert a.shape == b.shape and not a.isnan().any()
        R.check_close(a, b, lowp=lp, what=name, fp32_rel=1e-4)


def test_tokens_in_no_cluster_get_zeros_and_no_gradient(device):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, dtype=torch.float64, device=device)
    cents = _cents(2, 2, 8, device)
    out = ae.routing_attention(q, k, v, cents, window=5, causal=True)
    q_idx, _ = routing_assignment(q, k, cents, 5)
    routed = torch.zeros(1, 2, 40, dtype=torch.bool, device=device)
    routed.scatter_(-1, q_idx.flatten(2), True)
    assert (~routed).sum() >= 2 * (40 - 10)
    assert (out[~routed] == 0).all() and out[routed].abs().sum() > 0
    dq, = torch.autograd.grad(out.sum(), q)
    assert (dq[~routed] == 0).all()


@pytest.mark.parametrize("causal,shared_qk", [(False, False), (True, False), (True, True)])
def test_gradcheck(device, causal, shared_qk):
    q, k, v = make_qkv(1, 2, 1, 10, 10, 4, dtype=torch.float64, device=device)
    cents = _cents(2, 3, 4, device, torch.float64)
    fn = lambda q, k, v: ae.routing_attention(q, k, v, cents, window=5, causal=causal,  # noqa: E731
                                              shared_qk=shared_qk)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    # the assignment is discrete: nothing flows to the centroids
    cents.requires_grad_()
    out = fn(q, k, v)
    assert torch.autograd.grad(out.sum(), (q, cents), allow_unused=True)[1] is None


@pytest.mark.parametrize("causal", [False, True])
def test_compiles_fullgraph(causal):
    q, k, v = make_qkv(1, 2, 1, 48, 48, 8)
    cents = _cents(2, 4, 8, "cpu")
    check_compiles(lambda q, k, v: ae.routing_attention(q, k, v, cents, window=12, causal=causal).square().sum(),
                   q, k, v)


def _expected_ema(heads, q, k):
    """One EMA k-means step from its definition, in float64."""
    old = heads.centroids.detach().double().cpu()
    H, C, D = old.shape
    c = F.normalize(old, dim=-1)
    new = old.clone()
    for h in range(H):
        toks = [F.normalize(q[:, h].double().cpu(), dim=-1).reshape(-1, D),
                F.normalize(k[:, h * k.shape[1] // H].double().cpu(), dim=-1).reshape(-1, D)]
        toks = torch.cat(toks)
        nearest = (toks @ c[h].T).argmax(-1)
        for cl in range(C):
            members = toks[nearest == cl]
            if len(members):
                new[h, cl] = F.normalize(members.sum(0), dim=0)
    return heads.decay * old + (1 - heads.decay) * new, new


def test_ema_moves_centroids_towards_their_means_in_training_only(device):
    heads = RoutingHeads(4, 8, num_clusters=6, window=5, decay=0.9).to(device)
    q, k, v = make_qkv(2, 4, 2, 30, 30, 8, device=device)
    before = heads.centroids.clone()
    heads.eval()
    heads(q, k, v, True, "attention_ext")
    assert torch.equal(heads.centroids, before)
    heads.train()
    expected, means = _expected_ema(heads, q, k)
    heads(q, k, v, True, "attention_ext")
    assert (heads.centroids.cpu().double() - expected).abs().max() < 1e-6
    moved = (means - before.cpu().double()).norm(dim=-1) > 0
    assert moved.any()
    dist_before = (before.cpu().double() - means).norm(dim=-1)[moved]
    dist_after = (heads.centroids.cpu().double() - means).norm(dim=-1)[moved]
    assert (dist_after < dist_before).all()
    assert not heads.centroids.requires_grad and "centroids" in heads.state_dict()


def test_layer_updates_centroids_in_training_never_in_eval():
    attn = aenn.Attention(32, 4, num_kv_heads=2, kind="routing", num_clusters=3, window=6)
    x = torch.randn(2, 20, 32)
    attn.eval()
    before = attn.router.centroids.clone()
    with torch.no_grad():
        attn(x)
    attn(x).sum().backward()
    assert torch.equal(attn.router.centroids, before)
    attn.train()
    attn(x)
    assert not torch.equal(attn.router.centroids, before)


@pytest.mark.parametrize("causal", [True, False])
def test_routing_layer_ours_vs_sdpa(causal):
    """The layer on our ops against its plain-PyTorch path (per-cluster SDPA and a dense
    band for the local half), same weights."""
    torch.manual_seed(1)
    attn = aenn.Attention(32, 4, num_kv_heads=2, kind="C", num_clusters=4, window=8, causal=causal).double().eval()
    x = torch.randn(2, 30, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    g, = torch.autograd.grad(out.sum(), x)
    attn.backend = "sdpa"
    ref = attn(x)
    gr, = torch.autograd.grad(ref.sum(), x)
    assert (out - ref).abs().max() < 1e-10 and (g - gr).abs().max() < 1e-10
    # the local half is the sliding window; the routing half is what routing_attention gives
    assert attn.left == 8 and attn.right == (0 if causal else 8)


@pytest.mark.parametrize("n", [24, 40])
def test_linformer_matches_dense_reference(device, n):
    lin = LinformerProjection(proj_len=6, max_len=40).to(device)
    q, k, v = make_qkv(2, 4, 2, n, n, 8, device=device)
    out = lin(q, k, v, "attention_ext")
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, lin.E, lin.F)]
    ref = R.linformer_attention(*leaves)
    R.check_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, lin.E, lin.F), g)
    refs = torch.autograd.grad(ref, leaves, g.double().cpu())
    for name, a, b in zip(("dq", "dk", "dv", "dE", "dF"), grads, refs):
        R.check_close(a, b, what=name, fp32_rel=1e-4)
    # the columns past n are never read
    assert grads[3][:, n:].abs().sum() == 0 and grads[3][:, :n].abs().sum() > 0
    with torch.no_grad():
        lin.E[:, n:] = 1e3
    assert torch.equal(lin(q, k, v, "attention_ext"), out)


def test_linformer_layer_gradients_match_reference():
    torch.manual_seed(2)
    attn = aenn.Attention(32, 4, kind="P", proj_len=5, max_len=32, causal=False).double()
    x = torch.randn(1, 20, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    grads = torch.autograd.grad(out.sum(), (x, attn.linformer.E, attn.linformer.F))
    attn.backend = "sdpa"
    ref = attn(x)
    refs = torch.autograd.grad(ref.sum(), (x, attn.linformer.E, attn.linformer.F))
    assert (out - ref).abs().max() < 1e-10
    for a, b in zip(grads, refs):
        assert (a - b).abs().max() < 1e-10


def test_transformer_lm_pattern_letters():
    lm = aenn.TransformerLM(64, 32, 4, pattern="CPG", causal=False, num_clusters=4, window=8, proj_len=8, max_len=32)
    assert lm.kinds == ["routing", "linformer", "global"]
    idx = torch.randint(0, 64, (2, 32))
    logits, loss = lm(idx, idx)
    loss.backward()
    assert logits.shape == (2, 32, 64) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="causal"):
        aenn.TransformerLM(64, 32, 4, pattern="P", proj_len=8, max_len=32)  # causal by default
    with pytest.raises(ValueError, match="max_len"):
        lm(torch.randint(0, 64, (1, 40)))
    with pytest.raises(NotImplementedError):
        aenn.TransformerLM(64, 32, 4, pattern="C", num_clusters=2, window=4).generate(idx[:, :4], 2)


def test_bad_input():
    q, k, v = make_qkv(1, 2, 1, 16, 16, 8)
    c = torch.randn(2, 3, 8)
    fn = ae.routing_attention
    for bad in (torch.randn(3, 3, 8), torch.randn(2, 3, 4), torch.randn(3, 8), torch.randn(2, 0, 8)):
        with pytest.raises(ValueError, match="centroids"):
            fn(q, k, v, bad, window=4)
    with pytest.raises(TypeError, match="centroids"):
        fn(q, k, v, c.long(), window=4)
    for w in (0, -1, 17):
        with pytest.raises(ValueError, match="window"):
            fn(q, k, v, c, window=w)
    with pytest.raises(TypeError, match="window"):
        fn(q, k, v, c, window=2.0)
    with pytest.raises(ValueError, match="shared_qk"):
        fn(q[:, :, :8], k, v, c, window=4, shared_qk=True)
    with pytest.raises(ValueError, match="proj_len"):
        aenn.Attention(32, 4, kind="linformer", proj_len=0, max_len=16, causal=False)
    with pytest.raises(ValueError, match="num_clusters"):
        aenn.Attention(32, 4, kind="routing", num_clusters=0, window=4)
    with pytest.raises(ValueError, match="window"):
        aenn.Attention(32, 4, kind="routing", num_clusters=2, window=0)
    with pytest.raises(ValueError, match="num_heads"):
        aenn.Attention(32, 1, kind="routing", num_clusters=2, window=4)


@pytest.mark.parametrize("causal", [False, True])
def test_nothing_quadratic_is_saved_for_backward(causal):
    N, D = 1024, 16
    q, k, v = make_qkv(1, 1, 1, N, N, D)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ae.routing_attention(q, k, v, torch.randn(1, 8, D), window=N // 8, causal=causal)
    assert saved and max(saved) <= 4 * N * D, f"a saved tensor has {max(saved)} elements (N^2 = {N * N})"
    torch.autograd.grad(out.sum(), (q, k, v))
