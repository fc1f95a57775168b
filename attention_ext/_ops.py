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
                        num_global, block_size, scale):
    B, Hq, Nq, _ = q.shape
    out = q.new_empty((B, Hq, Nq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Nq), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake(f"{_lib}::attention_bwd")
def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, global_mask, layout, kind, causal, left, right,
                        kernel_size, dilation, num_global, block_size, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, global_mask, layout, *spec = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, global_mask, layout)
    ctx.spec = spec


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, global_mask, layout = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.attention_ext.attention_bwd(grad_out, grad_lse, q, k, v, out, lse, global_mask, layout,
                                                       *ctx.spec)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.spec))


torch.library.register_autograd(f"{_lib}::attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)
