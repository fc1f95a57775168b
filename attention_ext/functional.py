"""Public attention functions: argument checks -> spec -> op.

Every function here runs the same two custom ops, ``attention_ext::attention_fwd`` and
``attention_ext::attention_bwd`` (FlashAttention-2 tiling, online softmax, logsumexp
saved, backward recomputes tiles), with a different :class:`~attention_ext._spec.AttentionSpec`;
see ``csrc/common/mask.h`` for the one predicate they share.

Conventions: q is ``(B, Hq, Nq, D)``, k/v are ``(B, Hkv, Nk, D)`` / ``(B, Hkv, Nk, Dv)``
with ``Hq % Hkv == 0`` (GQA/MQA, K/V are never repeated). When ``Nq != Nk`` queries are
aligned bottom-right: query ``i`` sits at key position ``i + Nk - Nq`` (as in
FlashAttention), which is what decoding with a KV cache needs. A query that sees no key
gets a zero output and ``lse = -inf`` (its sink's logit with ``sinks``), never NaN.
fp16/bf16 inputs accumulate in fp32.
"""

import math

import torch

from . import _checks, _neighborhood, _ops  # noqa: F401  (_ops registers fake kernels and autograd)
from ._spec import MASK_KINDS, AttentionSpec


def _common(q, k, v, fn, causal, scale, softcap, key_mask, return_lse, cu_seqlens=None, cu_seqlens_q=None,
            cu_seqlens_k=None, alibi_slopes=None, sinks=None, *, dropout_p=0.0, generator=None):
    """The checks every exact-attention function shares -> (shape, spec fields)."""
    shape = B, Hq, _, Nq, Nk = _checks.qkv(q, k, v, fn)
    fields = dict(causal=_checks.boolean(causal, "causal", fn), scale=_checks.scale(scale, q.shape[-1], fn),
                  softcap=_checks.softcap(softcap, fn),
                  key_mask=_checks.key_mask(key_mask, B, Nk, q.device, fn),
                  alibi_slopes=_checks.alibi_slopes(alibi_slopes, B, Hq, q, fn),
                  sinks=_checks.sinks(sinks, Hq, q, fn),
                  **_checks.documents(cu_seqlens, cu_seqlens_q, cu_seqlens_k, B, Nq, Nk, q.device, fn))
    _checks.boolean(return_lse, "return_lse", fn)
    # last: the seed is drawn only for a call that passed every other check
    fields.update(_checks.dropout(dropout_p, generator, q.device, fn))
    return shape, fields


def _run(q, k, v, spec, return_lse):
    out, lse = spec.forward(q, k, v)
    return (out, lse) if return_lse else out


def flash_attention(q, k, v, *, causal=False, scale=None, softcap=None, key_mask=None, cu_seqlens=None,
                    cu_seqlens_q=None, cu_seqlens_k=None, alibi_slopes=None, sinks=None, dropout_p=0.0, generator=None,
                    return_lse=False):
    """Exact softmax attention, ``softmax(q k^T * scale) v``, without an Nq x Nk buffer.

    Args:
        q: ``(B, Hq, Nq, D)``; float32, float64, bfloat16 or float16.
        k: ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0``.
        v: ``(B, Hkv, Nk, Dv)``.
        causal: query ``i`` sees keys ``j <= i + Nk - Nq`` (bottom-right aligned).
        scale: score scale, default ``1 / sqrt(D)``.
        softcap: logit softcapping (Gemma 2's ``attn_logit_softcapping``): each scaled
            score ``s`` becomes ``softcap * tanh(s / softcap)`` before masking and
            softmax, in the forward and the backward. ``None`` (or 0) turns it off;
            otherwise it must lie in [1e-6, 1e6].
        key_mask: bool ``(B, Nk)`` (or ``(Nk,)``), ``False`` for keys no query may
            attend (padding; e.g. transformers' ``attention_mask.bool()``). Tiles of
            masked keys are skipped; a query left with no key gets zeros. NaN/inf in
            masked keys or values never reach the result on the CPU; the CUDA
            tensor-core kernels do not guard them (keep padding finite there).
        cu_seqlens: packed sequences (documents) along the sequence axis, FlashAttention's
            ``cu_seqlens``: int32 ``(S + 1,)`` cumulative boundaries ``0 = c[0] <= ... <=
            c[S] = N``, shared by every batch row, or ``(B, S + 1)`` for a packing per row
            (rows with fewer documents repeat their last value). Document ``s`` holds
            positions ``c[s] .. c[s + 1] - 1``. Every position (causality, windows,
            globals, blocks, the bottom-right alignment) counts from its document's
            start, no query sees another document's key, and the cost is the sum over
            documents. Needs ``Nq == Nk``.
        cu_seqlens_q, cu_seqlens_k: instead of ``cu_seqlens``, for queries and keys packed
            differently (cross-attention, a query chunk per document): the same number of
            documents, ending at Nq and Nk; each document's queries are aligned
            bottom-right against its keys.
        alibi_slopes: ALiBi (Press et al.), FlashAttention's ``alibi_slopes``: float32
            ``(Hq,)`` or ``(B, Hq)``. Each scaled score of query ``i`` (at aligned position
            ``p``, document-local under cu_seqlens) and key ``j`` gains
            ``-slope * |p - j|``, applied after the softcap (as FlashAttention 2 does) and
            before masking; bidirectional attention gets this symmetric form. The lse
            includes the bias (FlashAttention's causal kernel adds ``slope * j`` instead,
            which gives the same output but shifts lse by ``slope * p``). The slopes are
            constants: no gradient (one that requires grad raises). See
            :func:`attention_ext.alibi_slopes`.
        sinks: attention sinks (gpt-oss's learned ``sinks``): ``(Hq,)`` logits, one per
            query head. Each row's softmax denominator gains ``exp(sinks[h])``, a virtual
            key with no value, so rows may give less than all their weight to the keys;
            lse includes it, a row with no allowed key still outputs zeros (its lse is then
            ``sinks[h]``). Differentiable: ``sinks.grad`` is returned (in sinks' dtype;
            the kernels use float32, float64 for float64 inputs).
        dropout_p: attention dropout, as SDPA's ``dropout_p``: each probability is
            dropped with probability ``dropout_p`` and the kept ones are scaled by
            ``1 / (1 - dropout_p)``. It applies whenever it is > 0 (pass 0 in eval). The
            keep decision of (batch, head, query, key) is Philox4x32-10 of those indices
            under a seed drawn from ``generator`` (16 bits a decision: ``dropout_p`` is
            resolved to 2^-16); the backward regenerates it, nothing
            ``Nq x Nk`` is stored, and the same generator state gives bitwise the same
            result on any thread count; CPU and CUDA keep the same elements. ``lse`` is
            that of the probabilities before dropout.
        generator: the ``torch.Generator`` the seed is drawn from (default: the default
            generator of q's device).
        return_lse: also return the logsumexp ``(B, Hq, Nq)`` of the (capped, biased)
            scaled scores (float32; float64 for float64 inputs). It is differentiable.

    Returns:
        ``out (B, Hq, Nq, Dv)`` in q's dtype, and ``lse`` when ``return_lse``.
    """
    _, fields = _common(q, k, v, "flash_attention", causal, scale, softcap, key_mask, return_lse, cu_seqlens,
                        cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks,
                        dropout_p=dropout_p, generator=generator)
    return _run(q, k, v, AttentionSpec(mask_kind=MASK_KINDS["dense"], **fields), return_lse)


def sliding_window_attention(q, k, v, window, *, causal=False, dilation=1, global_tokens=None, scale=None,
                             softcap=None, key_mask=None, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                             alibi_slopes=None, sinks=None, dropout_p=0.0, generator=None,
                             return_lse=False):
    """Local attention: each query sees the keys of a window around its position.

    Query ``i`` (at key position ``p = i + Nk - Nq``) sees key ``j`` iff
    ``p - left*dilation <= j <= p + right*dilation`` and ``(p - j) % dilation == 0``
    (Longformer's dilated windows). Cost grows with ``N * window``: key tiles outside the
    window are never visited.

    Args:
        window: ``(left, right)`` reach in (dilated) steps, inclusive; an int ``w`` means
            ``(w, w)``, or ``(w, 0)`` with ``causal``. ``(N, 0)`` with causal equals full
            causal attention; a window covering the sequence equals flash_attention.
        causal: also require ``j <= p`` (a right reach is then ignored).
        dilation: stride between attended keys (>= 1).
        global_tokens: Longformer global attention. An int ``g`` makes the first ``g`` key
            positions global; a bool ``(B, Nk)`` (or ``(Nk,)``) mask flags any positions.
            A global position attends to every key and every query attends to it
            (causality, when on, still applies). Queries are global when their aligned
            position is. With packed documents, ``g`` counts from each document's start,
            and a mask flags positions of the row.
        scale, softcap, key_mask, cu_seqlens, cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks,
            dropout_p, generator, return_lse: as in :func:`flash_attention`.
    """
    fn = "sliding_window_attention"
    (B, _, _, _, Nk), fields = _common(q, k, v, fn, causal, scale, softcap, key_mask, return_lse, cu_seqlens,
                                       cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks, dropout_p=dropout_p,
                                       generator=generator)
    left, right = _checks.window(window, fields["causal"], fn)
    dilation = _checks.integer(dilation, "dilation", fn, minimum=1)
    num_global, gmask = _checks.global_tokens(global_tokens, B, Nk, q.device, fn)
    spec = AttentionSpec(mask_kind=MASK_KINDS["window"], window_left=left, window_right=right, dilation=dilation,
                         num_global=num_global, global_mask=gmask, **fields)
    return _run(q, k, v, spec, return_lse)


def neighborhood_attention(q, k, v, kernel_size, *, dilation=1, stride=1, causal=False, scale=None, softcap=None,
                           key_mask=None, cu_seqlens=None, alibi_slopes=None, sinks=None, dropout_p=0.0, generator=None,
                           return_lse=False):
    """Neighborhood attention in 1, 2 or 3 dims with NATTEN's semantics (self-attention).

    Along every spatial dim, inside the dilation group of the query (coordinates with the
    same ``x % dilation``), the query sees the ``kernel_size`` group members around it; at
    the edges the window shifts inwards, so it always holds ``kernel_size`` members. An even
    kernel reaches one member less ahead than behind. ``stride`` groups queries: the
    ``stride`` queries of a group share the window of their group's centre (NATTEN's
    generalized neighborhood attention; ``stride == kernel_size`` is blocked attention).
    ``causal`` (per dim): the window ends at the query; its start is the one of the group's
    last query. A key is seen when it is in the window along every dim.

    Args:
        q: ``(B, Hq, *spatial, D)`` with 1 to 3 spatial dims; k, v: ``(B, Hkv, *spatial, D)``
            and ``(B, Hkv, *spatial, Dv)``. The output is ``(B, Hq, *spatial, Dv)``, lse
            ``(B, Hq, *spatial)``.
        kernel_size, dilation, stride: an int or a tuple of one per spatial dim, with
            ``kernel_size * dilation <= extent`` and ``1 <= stride <= kernel_size``.
        causal: a bool or a tuple of one per spatial dim.
        key_mask: bool ``(B, *spatial)`` or ``(B, N)``, as in :func:`flash_attention`.
        cu_seqlens: packed 1-D documents, as in :func:`flash_attention` (1-D, odd kernel,
            stride 1 only): each document is a sequence of its own, with its own edges. A
            document shorter than ``kernel_size * dilation`` has queries that see their
            whole dilation group.
        alibi_slopes: 1-D, odd kernel, stride 1 only.
        scale, softcap, sinks, dropout_p, generator, return_lse: as in :func:`flash_attention`.
    """
    fn = "neighborhood_attention"
    spatial = _neighborhood.grid_qkv(q, k, v, fn)
    nd = len(spatial)
    ks = _neighborhood.per_dim(kernel_size, "kernel_size", nd, fn)
    dil = _neighborhood.per_dim(dilation, "dilation", nd, fn)
    st = _neighborhood.per_dim(stride, "stride", nd, fn)
    cz = _neighborhood.per_dim(causal, "causal", nd, fn, boolean=True)
    if nd == 1 and ks[0] % 2 == 1 and st[0] == 1:  # the 1-D kind of mask.h: packed documents, ALiBi
        return _neighborhood_1d(q, k, v, ks[0], dil[0], cz[0], scale, softcap, key_mask, cu_seqlens, alibi_slopes,
                                sinks, dropout_p, generator, return_lse, fn)
    for name, x in (("cu_seqlens", cu_seqlens), ("alibi_slopes", alibi_slopes)):
        if x is not None:
            raise ValueError(f"{fn}: {name} needs a 1-D neighborhood with an odd kernel_size and stride 1, got "
                             f"spatial shape {spatial}, kernel_size={ks}, stride={st}")
    spatial = tuple(int(n) for n in spatial)  # torch.compile(dynamic=True): the grid specializes (its token order)
    _neighborhood.check_against_extents(spatial, ks, dil, st, fn)
    B, Hq, N = q.shape[0], q.shape[1], math.prod(spatial)
    if key_mask is not None and isinstance(key_mask, torch.Tensor) and tuple(key_mask.shape[1:]) == spatial:
        key_mask = key_mask.reshape(key_mask.shape[0], N)
    flat = [t.reshape(t.shape[0], t.shape[1], N, t.shape[-1]) for t in (q, k, v)]
    _, fields = _common(*flat, fn, False, scale, softcap, key_mask, return_lse, sinks=sinks, dropout_p=dropout_p,
                        generator=generator)
    tile = _neighborhood.tile_shape(spatial, dil)
    identity = _neighborhood.is_identity(spatial, dil)
    if not identity:
        order, inverse = _neighborhood.orders(spatial, dil, tile, q.device)
        flat = [_neighborhood.gather(t, order) for t in flat]
        if fields["key_mask"] is not None:
            fields["key_mask"] = fields["key_mask"].index_select(1, order)
    spec = AttentionSpec(mask_kind=MASK_KINDS["neighborhood"], spatial_shape=spatial, na_kernel_size=ks,
                         na_dilation=dil, na_stride=st, na_causal=tuple(int(c) for c in cz), tile_shape=tile,
                         **fields)
    out, lse = spec.forward(*flat)
    if not identity:
        out, lse = _neighborhood.gather(out, inverse), _neighborhood.gather(lse, inverse)
    out = out.reshape(B, Hq, *spatial, out.shape[-1])
    return (out, lse.reshape(B, Hq, *spatial)) if return_lse else out


def _neighborhood_1d(q, k, v, kernel_size, dilation, causal, scale, softcap, key_mask, cu_seqlens, alibi_slopes,
                     sinks, dropout_p, generator, return_lse, fn):
    """The 1-D kind (mask.h's kernel_size / dilation / causal): odd kernel, stride 1."""
    (_, _, _, Nq, Nk), fields = _common(q, k, v, fn, causal, scale, softcap, key_mask, return_lse, cu_seqlens,
                                        alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
                                        generator=generator)
    if Nq != Nk:
        raise ValueError(f"{fn}: q and k must have the same sequence length, got Nq={Nq}, Nk={Nk}")
    if Nk > 0 and kernel_size * dilation > Nk:
        raise ValueError(f"{fn}: kernel_size * dilation = {kernel_size * dilation} exceeds the sequence length {Nk}")
    spec = AttentionSpec(mask_kind=MASK_KINDS["neighborhood"], kernel_size=kernel_size, dilation=dilation, **fields)
    return _run(q, k, v, spec, return_lse)


def block_sparse_attention(q, k, v, layout, *, block_size=64, causal=False, scale=None, softcap=None,
                           key_mask=None, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None, alibi_slopes=None,
                           sinks=None, dropout_p=0.0, generator=None, return_lse=False):
    """Attention restricted to the (query block, key block) pairs set in ``layout``.

    Args:
        layout: bool ``(H, ceil(Nq / block_size), ceil(Nk / block_size))`` with ``H`` 1
            (shared by all heads) or ``Hq``; a 2-D layout is shared by all heads. Build
            one with :mod:`attention_ext.patterns` (BigBird, Sparse Transformer strided /
            fixed, Longformer).
        block_size: tokens per layout block (>= 1).
        causal: additionally mask keys after the query (needed inside diagonal blocks of
            autoregressive patterns).
        cu_seqlens, cu_seqlens_q, cu_seqlens_k: packed documents, as in
            :func:`flash_attention`; blocks are counted from each document's start, so
            every document reads the top-left corner of the layout (which keeps the
            shape of the whole row).
        scale, softcap, key_mask, alibi_slopes, sinks, dropout_p, generator, return_lse: as
            in :func:`flash_attention`.
    """
    fn = "block_sparse_attention"
    (_, Hq, _, Nq, Nk), fields = _common(q, k, v, fn, causal, scale, softcap, key_mask, return_lse, cu_seqlens,
                                         cu_seqlens_q, cu_seqlens_k, alibi_slopes, sinks, dropout_p=dropout_p,
                                         generator=generator)
    block_size = _checks.integer(block_size, "block_size", fn, minimum=1)
    _checks.tensor(layout, "layout")
    if layout.dtype != torch.bool:
        raise TypeError(f"{fn}: layout must be a bool tensor, got dtype {layout.dtype}")
    if layout.dim() == 2:
        layout = layout.unsqueeze(0)
    nqb, nkb = -(-Nq // block_size), -(-Nk // block_size)
    if layout.dim() != 3 or layout.shape[0] not in (1, Hq) or tuple(layout.shape[1:]) != (nqb, nkb):
        raise ValueError(f"{fn}: layout must have shape (1 or Hq={Hq}, {nqb}, {nkb}) for Nq={Nq}, Nk={Nk}, "
                         f"block_size={block_size}; got {tuple(layout.shape)}")
    if layout.device != q.device:
        raise ValueError(f"{fn}: layout.device ({layout.device}) must equal q.device ({q.device})")
    spec = AttentionSpec(mask_kind=MASK_KINDS["block_layout"], block_layout=layout.contiguous(),
                         block_size=block_size, **fields)
    return _run(q, k, v, spec, return_lse)
