"""Decoding with a KV cache: a few new queries attend to a contiguous, rolling or paged
cache, after their keys and values are written into it in place (FlashAttention's
``flash_attn_with_kvcache``, in our head-major layout, plus a rolling cache).

One op, ``attention_ext::attention_decode`` (forward only; ``csrc/common/decode_args.h``
has the layouts). On CPU, a few query rows per kv head (a decoding step) run a split-K
kernel that reads each row's keys in place, once, in the cache's dtype
(``csrc/cpu/kernels/decode_fwd.cpp``); longer chunks, and CUDA, run the exact-attention
kernels of each batch row over the keys that row needs: its window, the live part of its
ring, its pages.
"""

import torch

from . import _checks, _ops  # noqa: F401  (_ops registers the fake kernel)


def _cache_shape(k_cache, v_cache, fn):
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch or pages, kv heads, slots, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"{fn}: v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)} "
                         "in its first three dims")


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, block_table=None, rolling=False,
                           window=None, causal=True, softcap=None, scale=None, key_mask=None, alibi_slopes=None,
                           sinks=None, return_lse=False):
    """Attention of new queries over a KV cache, appending their keys and values first.

    Forward only: there is no backward (a gradient through it raises).

    Args:
        q: ``(B, Hq, Nq, D)``, ``Nq >= 1``: one decoding step or a chunk of prefill.
        k_cache, v_cache: the cache, written in place when ``k``/``v`` are given.
            Contiguous or rolling: ``(B, Hkv, Ncache, D)`` / ``(B, Hkv, Ncache, Dv)``.
            Paged (with ``block_table``): pools ``(num_pages, Hkv, page_size, D)``.
        cache_seqlens: int32 ``(B,)``, the tokens already in each row's cache. The caller
            advances it (``cache_seqlens += Nq``) after the call, as with FlashAttention.
        k, v: ``(B, Hkv, Nq, D)`` / ``(B, Hkv, Nq, Dv)``, written at positions
            ``cache_seqlens[b] .. cache_seqlens[b] + Nq - 1``; row b then attends to its
            ``cache_seqlens[b] + Nq`` tokens. Omitted: the cache already holds the new
            tokens, and row b has ``cache_seqlens[b]`` (>= Nq) of them.
        block_table: int32 ``(B, max_pages)``: row b's token t lives in page
            ``block_table[b, t // page_size]`` at slot ``t % page_size``. Any page size
            works. The CPU decoding kernel reads pages in place, as fast at any size; the
            other paths gather a row's pages into one buffer per call, so pages of 16 or
            more keep those gathers few. Rows may share read-only pages (a common prompt
            prefix).
        rolling: the cache is a ring of Ncache slots per row; position p lives in slot
            ``p % Ncache``, so memory stays bounded by the window however long generation
            runs. Needs ``window`` with ``Ncache >= left + Nq``.
        window: as in :func:`attention_ext.sliding_window_attention` (an int ``w``, or
            ``(left, right)``; ``(w, 0)`` with ``causal``); None: every cached token.
        causal: row b's query i sits at position ``L_b - Nq + i`` (``L_b`` its tokens after
            the append, bottom-right aligned) and sees keys up to it.
        softcap, scale: as in :func:`attention_ext.flash_attention`.
        key_mask: bool ``(B, M)``: False marks logical positions ``t < M`` no query may
            attend (the left padding of a batched prompt); positions ``>= M`` are always
            attendable, so a rolling cache can generate past M.
        alibi_slopes, sinks: as in :func:`attention_ext.flash_attention` (FlashAttention's
            ``alibi_slopes`` in ``flash_attn_with_kvcache``): each scaled score of query i of
            row b, at position ``L_b - Nq + i``, and the key at logical position j gains
            ``-slope * |p - j|`` after the softcap; ``sinks`` ``(Hq,)`` add ``exp(sinks[h])``
            to every row's softmax denominator (and lse). No gradient (forward only).
        return_lse: also return the logsumexp ``(B, Hq, Nq)``.

    Returns:
        ``out (B, Hq, Nq, Dv)`` (and ``lse``).
    """
    fn = "attention_with_kvcache"
    _checks.tensor(q, "q")
    if q.dim() != 4:
        raise ValueError(f"{fn}: q must be 4-D (batch, heads, Nq, head_dim), got shape {tuple(q.shape)}")
    _cache_shape(k_cache, v_cache, fn)
    # dtypes, devices, head counts and dims, lengths and pages are checked by the op
    # (ValueError / TypeError naming the argument), which no direct call can bypass
    _checks.tensor(cache_seqlens, "cache_seqlens")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"{fn}: cache_seqlens must be an int32 tensor, got dtype {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (q.shape[0],):
        raise ValueError(f"{fn}: cache_seqlens must have shape (batch={q.shape[0]},), got {tuple(cache_seqlens.shape)}")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: k and v go together (pass both, or neither)")
    if block_table is not None:
        _checks.tensor(block_table, "block_table")
        if block_table.dtype != torch.int32:
            raise TypeError(f"{fn}: block_table must be an int32 tensor, got dtype {block_table.dtype}")
    causal = _checks.boolean(causal, "causal", fn)
    rolling = _checks.boolean(rolling, "rolling", fn)
    left, right = (-1, -1) if window is None else _checks.window(window, causal, fn)
    if rolling and window is None:
        raise ValueError(f"{fn}: rolling=True needs a window (a ring keeps only the last Ncache tokens)")
    if key_mask is not None:
        _checks.tensor(key_mask, "key_mask")
        if key_mask.dtype != torch.bool:
            raise TypeError(f"{fn}: key_mask must be a bool tensor, got dtype {key_mask.dtype}")
    _checks.boolean(return_lse, "return_lse", fn)
    B, Hq = q.shape[:2]
    out, lse = torch.ops.attention_ext.attention_decode(
        q, k_cache, v_cache, cache_seqlens, _checks.scale(scale, q.shape[-1], fn), k, v, block_table, rolling,
        _checks.softcap(softcap, fn), causal, left, right, key_mask, _checks.alibi_slopes(alibi_slopes, B, Hq, q, fn),
        _checks.sinks(sinks, Hq, q, fn))
    inputs = [t for t in (q, k, v, k_cache, v_cache, sinks) if t is not None and t.requires_grad]
    if inputs and torch.is_grad_enabled():
        out, lse = _ops.DecodeForwardOnly.apply(out, lse, *inputs)
    return (out, lse) if return_lse else out
