"""Public attention functions: argument checks -> mask spec -> op.

Every function here runs the same two custom ops, ``attention_ext::attention_fwd`` and
``attention_ext::attention_bwd`` (FlashAttention-2 tiling, online softmax, logsumexp
saved, backward recomputes tiles), with a different mask spec; see
``csrc/common/mask.h`` for the one predicate they share.

Conventions: q is ``(B, Hq, Nq, D)``, k/v are ``(B, Hkv, Nk, D)`` / ``(B, Hkv, Nk, Dv)``
with ``Hq % Hkv == 0`` (GQA/MQA, K/V are never repeated). When ``Nq != Nk`` queries are
aligned bottom-right: query ``i`` sits at key position ``i + Nk - Nq`` (as in
FlashAttention), which is what decoding with a KV cache needs. A query that sees no key
gets a zero output and ``lse = -inf``, never NaN. fp16/bf16 inputs accumulate in fp32.
"""

import torch

from . import _checks, _ops  # noqa: F401  (_ops registers fake kernels and autograd)

DENSE, WINDOW, NEIGHBORHOOD, BLOCK_LAYOUT = 0, 1, 2, 3


def _attention(q, k, v, *, kind, causal, scale, left=0, right=0, kernel_size=1, dilation=1, num_global=0,
               global_mask=None, layout=None, block_size=1):
    return torch.ops.attention_ext.attention_fwd(q, k, v, global_mask, layout, kind, causal, left, right,
                                                 kernel_size, dilation, num_global, block_size, scale)


def flash_attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """Exact softmax attention, ``softmax(q k^T * scale) v``, without an Nq x Nk buffer.

    Args:
        q: ``(B, Hq, Nq, D)``; float32, float64, bfloat16 or float16.
        k: ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0``.
        v: ``(B, Hkv, Nk, Dv)``.
        causal: query ``i`` sees keys ``j <= i + Nk - Nq`` (bottom-right aligned).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the logsumexp ``(B, Hq, Nq)`` of the scaled scores
            (float32; float64 for float64 inputs). It is differentiable.

    Returns:
        ``out (B, Hq, Nq, Dv)`` in q's dtype, and ``lse`` when ``return_lse``.
    """
    fn = "flash_attention"
    _checks.qkv(q, k, v, fn)
    causal = _checks.boolean(causal, "causal", fn)
    sc = _checks.scale(scale, q.shape[-1], fn)
    _checks.boolean(return_lse, "return_lse", fn)
    out, lse = _attention(q, k, v, kind=DENSE, causal=causal, scale=sc)
    return (out, lse) if return_lse else out
