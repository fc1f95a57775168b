"""Loads the extension and registers, once, the fake (meta) kernels and autograd of
every op. Public functions live in functional.py and linear.py.

Autograd covers first-order reverse mode (backward, torch.autograd.grad, torch.func.grad /
vjp / jacrev / vmap through the public functions, which call the ops through
``ATTENTION_FWD``, ``LINEAR_FWD`` and ``LINEAR_STEP``: see _autograd.py). Double backward
and forward-mode AD (torch.func.jvp, forward_ad) raise a RuntimeError that says so; they
never return zeros.
"""

import torch

from . import _C  # noqa: F401  (registers the torch.ops.attention_ext schemas and kernels)
from ._autograd import register_batch_vmap, register_op_autograd
from ._spec import AttentionSpec

_lib = "attention_ext"


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _one_device(op, q, **tensors):
    """Every tensor on q's device. A call mixing meta and real tensors reaches the fake
    kernel, which must not return uninitialised memory for real ones."""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise RuntimeError(f"attention_ext::{op}: {name} is on {t.device} but q is on {q.device}; "
                               "every tensor must be on one device")


def _spec_tensors(op, args, kwargs):
    """The spec's tensor arguments of a call of op, by schema name (None when absent)."""
    names = [a.name for a in op._schema.arguments]
    bound = dict(zip(names, args), **kwargs)
    return {n: bound.get(n) for n in AttentionSpec.TENSORS}


def _check_qkv(q, k, v):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D")
    torch._check(k.shape[0] == q.shape[0], lambda: "k and q batch sizes differ")
    torch._check(v.shape[0] == q.shape[0], lambda: "v and q batch sizes differ")
    torch._check(v.shape[1] == k.shape[1], lambda: "k and v head counts differ")
    torch._check(v.shape[2] == k.shape[2], lambda: "k and v sequence lengths differ")
    torch._check(k.shape[3] == q.shape[3], lambda: "q and k head dims differ")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "q heads must be a multiple of k/v heads")


# ---- attention_fwd / attention_bwd: every exact-attention pattern -------------------

@torch.library.register_fake(f"{_lib}::attention_fwd")
def _attention_fwd_fake(q, k, v, *args, **kwargs):
    _one_device("attention_fwd", q, k=k, v=v,
                **_spec_tensors(torch.ops.attention_ext.attention_fwd.default, (q, k, v) + args, kwargs))
    _check_qkv(q, k, v)
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, Nq, v.shape[-1])), q.new_empty((B, Hq, Nq), dtype=_acc_dtype(q.dtype))


@torch.library.register_fake(f"{_lib}::attention_bwd")
def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, *args, **kwargs):
    _one_device("attention_bwd", q, grad_out=grad_out, grad_lse=grad_lse, k=k, v=v, out=out, lse=lse,
                **_spec_tensors(torch.ops.attention_ext.attention_bwd.default,
                                (grad_out, grad_lse, q, k, v, out, lse) + args, kwargs))
    _check_qkv(q, k, v)
    torch._check(grad_out.shape == out.shape, lambda: "grad_out and out shapes differ")
    sinks = _spec_tensors(torch.ops.attention_ext.attention_bwd.default, (grad_out, grad_lse, q, k, v, out, lse) + args,
                          kwargs)["sinks"]
    dsinks = lse.new_empty((0,)) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _attention_setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    spec = AttentionSpec.from_op_inputs(torch.ops.attention_ext.attention_fwd.default, inputs)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *spec.tensors())
    ctx.spec = spec.without_tensors()
    ctx.n_inputs = len(inputs)
    ctx.has_sinks = spec.sinks is not None


# where attention_fwd takes sinks: their gradient goes there; alibi_slopes get none (constants,
# as in FlashAttention)
_SINKS_INPUT = [a.name for a in torch.ops.attention_ext.attention_fwd.default._schema.arguments].index("sinks")


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dsinks = ctx.spec.with_tensors(tensors).backward(grad_out, grad_lse, q, k, v, out, lse,
                                                                 autograd=True)
    grads = [dq, dk, dv] + [None] * (ctx.n_inputs - 3)
    if ctx.has_sinks:
        grads[_SINKS_INPUT] = dsinks
    return tuple(grads)


_EXACT = ("flash_attention, sliding_window_attention, neighborhood_attention and block_sparse_attention "
          "(op attention_ext::attention_fwd)")
ATTENTION_FWD = register_op_autograd(f"{_lib}::attention_fwd", _attention_backward, _attention_setup_context,
                                  functions=_EXACT)
ATTENTION_BWD = register_op_autograd(f"{_lib}::attention_bwd", None, None, functions=_EXACT)
register_batch_vmap(f"{_lib}::attention_fwd", {"q", "k", "v", *AttentionSpec.BATCH_TENSORS})
# dsinks sums over the batch: a call with sinks runs per vmap index
register_batch_vmap(f"{_lib}::attention_bwd", {"grad_out", "grad_lse", "q", "k", "v", "out", "lse",
                                               *AttentionSpec.BATCH_TENSORS}, per_index_with=("sinks",))


# ---- linear_fwd / linear_bwd / linear_step: linear attention -----------------------

def linear_segments(q, cu_seqlens):
    """Rows of the linear state: one per batch row, or per document of cu_seqlens."""
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _linear_state_like(q, k, v, cu_seqlens=None):
    G, Hkv, D, Dv = linear_segments(q, cu_seqlens), k.shape[1], q.shape[-1], v.shape[-1]
    sd = _acc_dtype(q.dtype)
    return q.new_empty((G, Hkv, D, Dv), dtype=sd), q.new_empty((G, Hkv, D), dtype=sd)


def _check_cu_seqlens(q, k, cu_seqlens):
    # the values (0 first, N last, non-decreasing) only the kernel can read
    if cu_seqlens is not None:
        torch._check(cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32,
                     lambda: "cu_seqlens must be a 1-D int32 tensor")
        torch._check(q.shape[0] == 1 and q.shape[2] == k.shape[2],
                     lambda: "cu_seqlens needs batch size 1 and as many queries as keys")


@torch.library.register_fake(f"{_lib}::linear_fwd")
def _linear_fwd_fake(q, k, v, S0, z0, feature_map, causal, normalize, eps, scale, chunk_size, cu_seqlens=None):
    _one_device("linear_fwd", q, k=k, v=v, S0=S0, z0=z0, cu_seqlens=cu_seqlens)
    _check_qkv(q, k, v)
    _check_cu_seqlens(q, k, cu_seqlens)
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
    return (out,) + _linear_state_like(q, k, v, cu_seqlens)


@torch.library.register_fake(f"{_lib}::linear_bwd")
def _linear_bwd_fake(grad_out, grad_S, grad_z, q, k, v, out, S0, z0, feature_map, causal, normalize, eps, scale,
                     chunk_size, cu_seqlens=None):
    _one_device("linear_bwd", q, grad_out=grad_out, grad_S=grad_S, grad_z=grad_z, k=k, v=v, out=out, S0=S0, z0=z0,
                cu_seqlens=cu_seqlens)
    _check_qkv(q, k, v)
    _check_cu_seqlens(q, k, cu_seqlens)
    return ((q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
            + _linear_state_like(q, k, v, cu_seqlens))


@torch.library.register_fake(f"{_lib}::linear_step")
def _linear_step_fake(q, k, v, S, z, feature_map, normalize, eps, scale):
    _one_device("linear_step", q, k=k, v=v, S=S, z=z)
    _check_qkv(q, k, v)
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
    return (out,) + _linear_state_like(q, k, v)


# The backward saves q, k, v and out (plus the initial state and cu_seqlens); linear_bwd
# recomputes the per-chunk states instead of keeping them from the forward.
def _linear_setup_context(ctx, inputs, output):
    q, k, v, S0, z0, feature_map, causal, normalize, eps, scale, chunk_size, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, output[0], S0, z0, cu_seqlens)
    ctx.params = (feature_map, causal, normalize, eps, scale, chunk_size)


def _linear_backward(ctx, grad_out, grad_S, grad_z):
    q, k, v, out, S0, z0, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dS0, dz0 = LINEAR_BWD(grad_out, grad_S, grad_z, q, k, v, out, S0, z0, *ctx.params, cu_seqlens)
    has_state = S0 is not None
    return (dq, dk, dv, dS0 if has_state else None, dz0 if has_state else None) + (None,) * 7


# linear_step is the causal recurrence over its T tokens from the state (S, z), so its
# gradient is linear_bwd's with that initial state (chunked; same math, other rounding).
def _linear_step_setup_context(ctx, inputs, output):
    q, k, v, S, z, feature_map, normalize, eps, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], S, z)
    ctx.params = (feature_map, True, normalize, eps, scale, 64)


def _linear_step_backward(ctx, grad_out, grad_S, grad_z):
    q, k, v, out, S, z = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dS, dz = LINEAR_BWD(grad_out, grad_S, grad_z, q, k, v, out, S, z, *ctx.params, None)
    return (dq, dk, dv, dS, dz) + (None,) * 4


_LINEAR = "linear_attention and linear_attention_step (ops attention_ext::linear_fwd / linear_step)"
LINEAR_FWD = register_op_autograd(f"{_lib}::linear_fwd", _linear_backward, _linear_setup_context, functions=_LINEAR)
LINEAR_STEP = register_op_autograd(f"{_lib}::linear_step", _linear_step_backward, _linear_step_setup_context,
                                functions=_LINEAR)
LINEAR_BWD = register_op_autograd(f"{_lib}::linear_bwd", None, None, functions=_LINEAR)
# cu_seqlens needs batch 1 (its states are per document): a call with it runs per vmap index
register_batch_vmap(f"{_lib}::linear_fwd", {"q", "k", "v", "S0", "z0"}, per_index_with=("cu_seqlens",))
register_batch_vmap(f"{_lib}::linear_bwd", {"grad_out", "grad_S", "grad_z", "q", "k", "v", "out", "S0", "z0"},
                    per_index_with=("cu_seqlens",))
register_batch_vmap(f"{_lib}::linear_step", {"q", "k", "v", "S", "z"})


# ---- attention_decode: a few queries over a KV cache (forward only) ----------------

@torch.library.register_fake(f"{_lib}::attention_decode")
def _attention_decode_fake(q, k_cache, v_cache, cache_seqlens, scale, k=None, v=None, block_table=None,
                           rolling=False, softcap=0.0, causal=True, window_left=-1, window_right=-1, key_mask=None,
                           alibi_slopes=None, sinks=None):
    _one_device("attention_decode", q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k=k, v=v,
                block_table=block_table, key_mask=key_mask, alibi_slopes=alibi_slopes, sinks=sinks)
    torch._check(q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4, lambda: "q and the caches must be 4-D")
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, Nq, v_cache.shape[-1])), q.new_empty((B, Hq, Nq), dtype=_acc_dtype(q.dtype))



class DecodeForwardOnly(torch.autograd.Function):
    """Ties attention_decode's outputs to its differentiable inputs so that a backward
    through them raises (the op is forward only; a mutating op cannot carry an autograd
    formula) instead of silently giving no gradient."""

    @staticmethod
    def forward(ctx, out, lse, *inputs):
        return out.view_as(out), lse.view_as(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        raise RuntimeError("attention_ext.attention_with_kvcache (op attention_ext::attention_decode) is forward "
                           "only: it has no backward; train with flash_attention / sliding_window_attention")
