"""Autograd beyond plain backward, for every public function: double backward and
forward-mode AD are refused with a clear error (never a zero), torch.func grad / vjp /
jacrev / vmap give the same numbers as eager autograd, and torch.compile(fullgraph=True,
dynamic=True) traces every function once for changing sequence lengths."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import attention_ext as ae

EXACT_MSG = "flash_attention, sliding_window_attention, neighborhood_attention and block_sparse_attention"
LINEAR_MSG = "linear_attention and linear_attention_step"


def _layout(n, bs=4):
    nb = -(-n // bs)
    return torch.tril(torch.ones(1, nb, nb, dtype=torch.bool))


# name, fn(q, k, v) for self-attention of any length n, message fragment
FUNCTIONS = [
    ("flash", lambda q, k, v: ae.flash_attention(q, k, v, causal=True), EXACT_MSG),
    ("window", lambda q, k, v: ae.sliding_window_attention(q, k, v, 3, causal=True, global_tokens=1), EXACT_MSG),
    ("neighborhood", lambda q, k, v: ae.neighborhood_attention(q, k, v, 3), EXACT_MSG),
    ("block_sparse", lambda q, k, v: ae.block_sparse_attention(q, k, v, _layout(q.shape[2]), block_size=4,
                                                               causal=True), EXACT_MSG),
    ("linear", lambda q, k, v: ae.linear_attention(q, k, v, causal=True), LINEAR_MSG),
    ("linear_step", lambda q, k, v: ae.linear_attention_step(q, k, v, (torch.ones(1, 1, 4, 4, dtype=q.dtype),
                                                                       torch.ones(1, 1, 4, dtype=q.dtype)))[0],
     LINEAR_MSG),
]
IDS = [f[0] for f in FUNCTIONS]


def _qkv(n=12, requires_grad=False):
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(1, 1, n, 4, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
                 for _ in range(3))


@pytest.mark.parametrize("name, fn, msg", FUNCTIONS, ids=IDS)
def test_double_backward_raises(name, fn, msg):
    # the probe's case: g = d/dq sum(o^2) with create_graph, then d/dq sum(g); the true
    # value is far from zero, so a zero would be a silent wrong answer
    q, k, v = _qkv(requires_grad=True)
    o = fn(q, k, v)
    (g,) = torch.autograd.grad((o * o).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=f"double backward .* not supported by {msg}"):
        torch.autograd.grad(g.sum(), q)


@pytest.mark.parametrize("name, fn, msg", FUNCTIONS, ids=IDS)
def test_first_order_with_create_graph_still_works(name, fn, msg):
    q, k, v = _qkv(requires_grad=True)
    (g,) = torch.autograd.grad(fn(q, k, v).square().sum(), q, create_graph=True)
    (ref,) = torch.autograd.grad(fn(q, k, v).square().sum(), q)
    torch.testing.assert_close(g.detach(), ref)


@pytest.mark.parametrize("name, fn, msg", FUNCTIONS, ids=IDS)
def test_forward_mode_raises(name, fn, msg):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=f"forward-mode AD .* not supported by {msg}"):
        torch.func.jvp(lambda q: fn(q, k, v), (q,), (torch.ones_like(q),))
    with pytest.raises(RuntimeError, match=f"forward-mode AD .* not supported by {msg}"):
        with fwAD.dual_level():
            fn(fwAD.make_dual(q, torch.ones_like(q)), k, v)


@pytest.mark.parametrize("name, fn, msg", FUNCTIONS, ids=IDS)
def test_torch_func_transforms_match_autograd(name, fn, msg):
    q, k, v = _qkv()
    ql = q.clone().requires_grad_()
    (ref,) = torch.autograd.grad(fn(ql, k, v).square().sum(), ql)
    torch.testing.assert_close(torch.func.grad(lambda q: fn(q, k, v).square().sum())(q), ref)
    out, pullback = torch.func.vjp(lambda q: fn(q, k, v), q)
    torch.testing.assert_close(pullback(2 * out)[0], ref)
    jac = torch.func.jacrev(lambda q: fn(q, k, v))(q)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(lambda q: fn(q, k, v), q))
    assert jac.abs().max() > 0


@pytest.mark.parametrize("name, fn, msg", FUNCTIONS, ids=IDS)
def test_vmap_matches_a_loop(name, fn, msg):
    qs = torch.randn(3, 1, 1, 12, 4, dtype=torch.float64)
    _, k, v = _qkv()
    out = torch.func.vmap(lambda q: fn(q, k, v))(qs)
    torch.testing.assert_close(out, torch.stack([fn(qs[i], k, v) for i in range(3)]))


def test_vmap_folds_masks_into_the_batch():
    qs = torch.randn(3, 2, 2, 12, 4)
    k, v = torch.randn(2, 2, 12, 4), torch.randn(2, 2, 12, 4)
    km = torch.rand(3, 2, 12) > 0.3
    out = torch.func.vmap(lambda q, m: ae.sliding_window_attention(q, k, v, 4, key_mask=m))(qs, km)
    ref = torch.stack([ae.sliding_window_attention(qs[i], k, v, 4, key_mask=km[i]) for i in range(3)])
    torch.testing.assert_close(out, ref)


def test_grad_of_grad_under_torch_func_raises():
    q, k, v = _qkv()

    def inner(q):
        return torch.func.grad(lambda q: ae.flash_attention(q, k, v).square().sum())(q).sum()

    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(inner)(q)


def test_raw_op_under_torch_func_says_so():
    q, k, v = _qkv()
    spec = ae._spec.AttentionSpec(scale=0.5)
    with pytest.raises(RuntimeError, match="call flash_attention"):
        torch.func.grad(lambda q: torch.ops.attention_ext.attention_fwd(q, k, v, **spec.op_kwargs())[0].sum())(q)


@pytest.mark.parametrize("name, fn, msg", FUNCTIONS, ids=IDS)
def test_compile_dynamic_no_recompile_per_length(name, fn, msg):
    torch._dynamo.reset()
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda q, k, v: fn(q, k, v).square().sum(), fullgraph=True, dynamic=True,
                             backend=backend)
    for n in (12, 20, 33):
        q, k, v = _qkv(n, requires_grad=True)
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
        ref = fn(q, k, v).square().sum()
        torch.testing.assert_close(loss, ref)
        for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v))):
            torch.testing.assert_close(a, b)
    assert len(frames) == 1, f"compiled {len(frames)} times for 3 sequence lengths"


def test_functionalize_and_compile_around_the_public_functions():
    q, k, v = _qkv()
    torch.testing.assert_close(torch.func.functionalize(lambda q: ae.flash_attention(q, k, v))(q),
                               ae.flash_attention(q, k, v))
    torch.testing.assert_close(torch.func.functionalize(lambda q: ae.linear_attention(q, k, v))(q),
                               ae.linear_attention(q, k, v))


def test_torch_func_inside_compile_says_so():
    q, k, v = _qkv()
    g = torch.compile(lambda q: torch.func.grad(lambda q: ae.flash_attention(q, k, v).sum())(q), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(Exception, match="inside torch.compile are not supported"):
        g(q)


def test_vmap_over_nothing_is_refused():
    with pytest.raises(ValueError, match="size 0"):
        torch.func.vmap(lambda q: ae.flash_attention(q, q, q))(torch.randn(0, 1, 1, 5, 4))
