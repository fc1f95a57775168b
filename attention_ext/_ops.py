"""Loads the extension and registers, once, the fake (meta) kernels and autograd of
every op. Public functions live in functional.py."""

import torch

from . import _C  # noqa: F401  (registers the torch.ops.attention_ext schemas and kernels)

_lib = "attention_ext"


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- attention_fwd / attention_bwd: every exact-attention pattern -------------------

@torch.library.register_fake(f"{_lib}::attention_fwd")
def _attention_fwd_fake(q, k, v, global_mask, layout, kind, causal, left, right, kernel_size, dilation,
                        num_global, block_size, scale, softcap=0.0, key_mask=None):
    B, Hq, Nq, _ = q.shape
    out = q.new_empty((B, Hq, Nq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Nq), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake(f"{_lib}::attention_bwd")
def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, global_mask, layout, kind, causal, left, right,
                        kernel_size, dilation, num_global, block_size, scale, softcap=0.0, key_mask=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


# inputs: q, k, v, global_mask, layout, then the 9 mask/scale numbers, softcap and key_mask
# (the last two only where given).
_N_SPEC = 10


def _attention_setup_context(ctx, inputs, output):
    q, k, v, global_mask, layout, *spec = inputs
    key_mask = spec[_N_SPEC] if len(spec) > _N_SPEC else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, global_mask, layout, key_mask)
    ctx.spec = spec[:_N_SPEC]
    ctx.n_inputs = len(inputs)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, global_mask, layout, key_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.attention_ext.attention_bwd(grad_out, grad_lse, q, k, v, out, lse, global_mask, layout,
                                                       *ctx.spec, key_mask=key_mask)
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


torch.library.register_autograd(f"{_lib}::attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)


# ---- linear_fwd / linear_bwd / linear_step: linear attention -----------------------

def _linear_state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear_state_like(q, k, v):
    B, Hkv, D, Dv = q.shape[0], k.shape[1], q.shape[-1], v.shape[-1]
    sd = _linear_state_dtype(q.dtype)
    return q.new_empty((B, Hkv, D, Dv), dtype=sd), q.new_empty((B, Hkv, D), dtype=sd)


@torch.library.register_fake(f"{_lib}::linear_fwd")
def _linear_fwd_fake(q, k, v, S0, z0, feature_map, causal, normalize, eps, scale, chunk_size):
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
    return (out,) + _linear_state_like(q, k, v)


@torch.library.register_fake(f"{_lib}::linear_bwd")
def _linear_bwd_fake(grad_out, grad_S, grad_z, q, k, v, out, S0, z0, feature_map, causal, normalize, eps, scale,
                     chunk_size):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)) + _linear_state_like(q, k, v)


@torch.library.register_fake(f"{_lib}::linear_step")
def _linear_step_fake(q, k, v, S, z, feature_map, normalize, eps, scale):
    out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
    return (out,) + _linear_state_like(q, k, v)


# The backward saves q, k, v and out (plus the initial state); linear_bwd recomputes the
# per-chunk states instead of keeping them from the forward.
def _linear_setup_context(ctx, inputs, output):
    q, k, v, S0, z0, feature_map, causal, normalize, eps, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, output[0], S0, z0)
    ctx.params = (feature_map, causal, normalize, eps, scale, chunk_size)


def _linear_backward(ctx, grad_out, grad_S, grad_z):
    q, k, v, out, S0, z0 = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dS0, dz0 = torch.ops.attention_ext.linear_bwd(grad_out, grad_S, grad_z, q, k, v, out, S0, z0,
                                                              *ctx.params)
    has_state = S0 is not None
    return (dq, dk, dv, dS0 if has_state else None, dz0 if has_state else None) + (None,) * 6


torch.library.register_autograd(f"{_lib}::linear_fwd", _linear_backward, setup_context=_linear_setup_context)


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
    dq, dk, dv, dS, dz = torch.ops.attention_ext.linear_bwd(grad_out, grad_S, grad_z, q, k, v, out, S, z,
                                                            *ctx.params)
    return (dq, dk, dv, dS, dz) + (None,) * 4


torch.library.register_autograd(f"{_lib}::linear_step", _linear_step_backward,
                                setup_context=_linear_step_setup_context)
