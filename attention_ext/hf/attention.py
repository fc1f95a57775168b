"""The attention function registered as ``"attention_ext"``: the layer's spec, the kernel
path (our ops, padding as ``key_mask``) and the exact PyTorch fallbacks (SDPA with a dense
mask, eager math for dropout, a softcap or sinks), with the counters of each path."""

from __future__ import annotations

import collections
import warnings

import torch
import torch.nn.functional as F

from .. import _layers
from .. import functional as _fn

_counts: collections.Counter = collections.Counter()
_warned: set = set()

_FALLBACK_WHY = {
    "dense_mask": "a mask pattern only transformers can describe (mask overlays, chunked "
                  "attention): exact SDPA with transformers' dense mask",
    "dropout": "attention dropout > 0 with a dense mask or on CUDA is not in the attention_ext kernels: exact eager math",
}


def _count(path):
    _counts[path] += 1
    if path in _FALLBACK_WHY and path not in _warned:
        _warned.add(path)
        warnings.warn(f"attention_ext.hf: {_FALLBACK_WHY[path]} (counted in attention_ext.hf.fallback_counts())",
                      stacklevel=3)


def fallback_counts():
    """Calls of :func:`attention_forward` by path since the last :func:`reset_counts`:
    ``{"kernel": n, "dense_mask": n, "dropout": n}``."""
    return {k: _counts.get(k, 0) for k in ("kernel", "dense_mask", "dropout")}


def reset_counts():
    _counts.clear()



# ---------------------------------------------------------------------------------
# The layer's attention spec
# ---------------------------------------------------------------------------------

def layer_spec(module, sliding_window=None, is_causal=None):
    """``(causal, window, model_window)`` for one attention call.

    ``window`` is ``None`` (global) or transformers' ``sliding_window`` value ``w``;
    ``model_window`` is what the model itself passed. The layer type in
    ``config.layer_types[module.layer_idx]`` wins over the passed ``sliding_window``
    ("full_attention" -> global; "sliding_attention" -> the passed value, else
    ``config.sliding_window``), so a pattern set by :func:`alternate` is honoured also
    by families whose modeling code ignores ``layer_types`` (Llama, Mistral).
    """
    config = getattr(module, "config", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
        if config is not None and getattr(config, "is_causal", True) is False:
            is_causal = False
    causal = bool(is_causal)
    model_window = sliding_window if sliding_window else None
    window = model_window
    layer_types = getattr(config, "layer_types", None) if config is not None else None
    idx = getattr(module, "layer_idx", None)
    if layer_types is not None and isinstance(idx, int) and 0 <= idx < len(layer_types):
        kind = layer_types[idx]
        if kind == "full_attention":
            window = None
        elif kind == "sliding_attention" and window is None:
            window = getattr(config, "sliding_window", None) or None
    return causal, window, model_window


def _reach(window, causal):
    """transformers' sliding_window -> our inclusive (left, right) reach."""
    return (window - 1, 0) if causal else (window - 1, window - 1)


def _band(nq, nk, causal, window, device):
    """Bool (1, 1, nq, nk): the layer's causal/window pattern, queries aligned bottom-right."""
    left, right = _reach(window, causal) if window is not None else (None, None)
    return _layers.band_mask(nq, nk, causal=causal, left=left, right=right, device=device).view(1, 1, nq, nk)


# ---------------------------------------------------------------------------------
# Attention function
# ---------------------------------------------------------------------------------

def _kernel(query, key, value, causal, window, scaling, softcap, key_mask, documents, sinks, dropout=0.0):
    kw = dict(causal=causal, scale=scaling, softcap=softcap, key_mask=key_mask, sinks=sinks, dropout_p=dropout,
              **documents)
    if window is None:
        return _fn.flash_attention(query, key, value, **kw)
    return _fn.sliding_window_attention(query, key, value, _reach(window, causal), **kw)


def _sdpa(query, key, value, mask, scaling):
    """Exact masked attention (bool or additive mask); rows with no key give zeros."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def _eager(query, key, value, mask, scaling, softcap, dropout, sinks=None):
    """Exact eager math (as transformers' eager path): scores, optional softcap, mask,
    fp32 softmax (with the sinks' column, gpt-oss's s_aux, dropped after it), dropout.
    K/V are grouped, not repeated."""
    B, Hq, Nq, D = query.shape
    Hkv = key.shape[1]
    q = query.reshape(B, Hkv, Hq // Hkv, Nq, D)
    scores = (q @ key.unsqueeze(2).transpose(-1, -2)) * (scaling if scaling is not None else D ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    empty = None
    if mask is not None:
        if mask.shape[1] == 1:
            m = mask.unsqueeze(2)  # (B or 1, 1, 1, Nq, Nk)
        else:  # per query head
            m = mask.reshape(mask.shape[0], Hkv, Hq // Hkv, *mask.shape[-2:])
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
            empty = ~m.any(-1, keepdim=True)
        else:
            scores = scores + m
    if sinks is None:
        p = torch.softmax(scores.float(), dim=-1)
    else:
        sink = sinks.float().reshape(1, Hkv, Hq // Hkv, 1, 1).expand(*scores.shape[:-1], 1)
        p = torch.softmax(torch.cat([scores.float(), sink], -1), dim=-1)[..., :-1]
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
    p = p.to(query.dtype)
    if dropout:
        p = F.dropout(p, p=dropout, training=True)
    out = p @ value.unsqueeze(2)
    return out.reshape(B, Hq, Nq, value.shape[-1])


def _fit_keys(mask, nk):
    """A mask whose key axis is longer than the layer's keys (a hybrid cache sized the
    mask for another layer type): keep its last nk columns (bottom-right aligned)."""
    if mask.shape[-1] == nk:
        return mask
    if mask.shape[-1] > nk:
        return mask[..., -nk:]
    raise NotImplementedError(
        f"attention_ext: the attention mask covers {mask.shape[-1]} keys but this layer has {nk}; "
        "this happens when a converted (alternate()) Mistral-type model runs a dense mask with a hybrid cache")


def _narrowed(window, model_window):
    """Whether a layer converted by :func:`alternate` to a narrower window than the model's
    own mask must add its band to that mask; a wider one cannot be recovered from a mask."""
    if window == model_window:
        return False
    if window is None or (model_window is not None and model_window < window):
        raise NotImplementedError(
            "attention_ext: this layer was converted to a wider pattern than the model's own mask, "
            "which cannot be recovered from a dense mask")
    return True


def _is_key_row(mask, batch):
    """A bool ``(B or 1, 1, 1, M)`` mask: one row per batch element for every query."""
    return (mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1
            and mask.shape[0] in (1, batch))


def _tagged_padding(info, nk, causal, module):
    """The key padding of the layer's nk keys from the padding our mask function saw
    (absolute positions ``[end - nk, end)``): exact also for a layer with more keys than the
    mask covers (a layer converted to a wider window than the model's mask)."""
    if info["causal"] is not None and info["causal"] != causal:
        raise RuntimeError(f"attention_ext: the model's mask is {'causal' if info['causal'] else 'bidirectional'} "
                           f"but layer {getattr(module, 'layer_idx', '?')} is "
                           f"{'causal' if causal else 'bidirectional'}")
    pad, end = info["padding"], info["end"]
    start = end - nk
    if start < 0:
        raise RuntimeError(f"attention_ext: {nk} keys end at position {end}")
    if pad.shape[-1] < end:
        pad = F.pad(pad, (0, end - pad.shape[-1]))
    return pad[:, start:end]


def _is_documents(mask, batch):
    """An int32 ``(B, 1, 1, S+1)`` mask: packed documents' ``cu_seqlens`` (only
    :func:`mask_function` returns one)."""
    return mask.dim() == 4 and mask.dtype == torch.int32 and mask.shape[1:3] == (1, 1) and mask.shape[0] == batch


def _flash_kwargs_documents(kwargs, batch, nq, nk):
    """The ``cu_seq_lens_q`` / ``cu_seq_lens_k`` that transformers' FlashAttention paths
    take (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): boundaries along
    the flattened batch, read as FlashAttention-2 reads them when no mask says otherwise."""
    cq, ck = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cq is None and ck is None:
        return {}
    if cq is None or ck is None or batch != 1 or nq != nk:
        raise NotImplementedError("attention_ext: cu_seq_lens_q/cu_seq_lens_k need both, one flattened row "
                                  f"(batch 1) and as many queries as keys; got batch {batch}, {nq} queries, {nk} keys")
    return dict(cu_seqlens_q=cq.to(torch.int32), cu_seqlens_k=ck.to(torch.int32))


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers attention function ``"attention_ext"``; returns ``(out (B, N, H, Dv), None)``.

    How ``attention_mask`` is read (by shape and dtype, so a copy reads the same):

    * ``None``: the layer's own pattern (causal/bidirectional, window), queries aligned
      bottom-right.
    * bool ``(B, 1, 1, M)`` with ``M < Nk``: the keys are the first ``M`` slots of a static
      cache (the later ones are not yet written), the row their padding; queries are the
      last ``Nq`` of those ``M`` keys and the layer's pattern applies. Only
      :func:`mask_function` builds it (a static cache's prefill), transformers never does.
    * bool ``(B, 1, 1, M)`` and ``Nq > 1``: key padding, which transformers never builds for
      more than one query (its masks have a query axis of ``Nq``); only :func:`mask_function`
      returns it, for a plain pattern whose queries are the last ``Nq`` of the keys. It is
      the kernels' ``key_mask`` (its last ``Nk`` columns), combined with the layer's own
      pattern. A 4-D bool mask of this shape given by the user reads the same way.
    * bool ``(B, 1, 1, M)`` and ``Nq == 1`` (decoding): the whole mask of that one query,
      passed as ``key_mask`` with no pattern of ours. transformers' rows (a static cache's
      full layers keep the query at its position, not at the last key, and mask the unused
      slots) hold the causal and window pattern already, and so does our own (for one
      query :func:`mask_function` returns transformers' exact row).
    * our mask with its attribute still on (``_attention_ext``, not copied): the same, with
      the padding of every position, so a layer converted to a wider window than the
      model's mask gets its key padding too.
    * int32 ``(B, 1, 1, S+1)``: packed sequences, the documents' ``cu_seqlens`` (from
      :func:`mask_function`); the layer's pattern applies inside each document.
    * ``None`` with ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs: those documents.
    * anything else: an exact dense mask (SDPA, or eager math with a softcap).
    """
    if kwargs.get("output_attentions", False) and "output_attentions" not in _warned:
        _warned.add("output_attentions")
        warnings.warn("attention_ext.hf: output_attentions=True returns no attention weights", stacklevel=2)
    causal, window, model_window = layer_spec(module, sliding_window, is_causal)
    B, _, Nq, _ = query.shape
    Nk = key.shape[2]
    dense = None  # the exact boolean/additive mask of a fallback, if one is needed
    key_mask = None  # padding, (B, Nk) bool: our kernels take it as is
    documents = {}  # packed sequences: the kernels' cu_seqlens (or cu_seqlens_q / cu_seqlens_k)

    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_ext: unsupported attention_mask type {type(attention_mask).__name__}")
    if attention_mask is None:
        documents = _flash_kwargs_documents(kwargs, B, Nq, Nk)
    elif _is_documents(attention_mask, B):
        documents = dict(cu_seqlens=attention_mask[:, 0, 0])
    elif _is_key_row(attention_mask, B):
        info = getattr(attention_mask, "_attention_ext", None)
        if info is not None:
            key_mask = _tagged_padding(info, Nk, causal, module)
        elif attention_mask.shape[-1] < Nk:  # the keys end with the row: a static buffer's unused slots follow
            Nk = attention_mask.shape[-1]
            key, value = key[:, :, :Nk], value[:, :, :Nk]
            key_mask = attention_mask[:, 0, 0].expand(B, Nk)
        else:
            key_mask = _fit_keys(attention_mask[:, 0, 0], Nk).expand(B, Nk)
            if Nq == 1 and not _narrowed(window, model_window):
                causal, window = False, None  # the row is the whole mask
        if bool(key_mask.all()):
            key_mask = None
    elif attention_mask is not None:
        if (attention_mask.dim() == 4 and Nq > 1 and (causal or window)
                and (attention_mask.shape[2] == 1 or attention_mask.stride(2) == 0)):
            # the same over all queries and not our bool key padding: it cannot be the whole pattern of a causal
            # or windowed layer, and whether it should be combined with one is a guess; refuse to guess
            raise RuntimeError("attention_ext: got a query-independent (key-padding) mask for a causal or windowed "
                               "layer; pass a 2-D attention_mask instead")
        dense = _fit_keys(attention_mask, Nk)
        if _narrowed(window, model_window):
            band = _band(Nq, Nk, causal, window, query.device)
            dense = dense & band if dense.dtype == torch.bool else dense.masked_fill(~band, float("-inf"))

    # dropout runs in the kernels (CPU); a dense mask, or CUDA (no dropout kernel yet), takes eager math
    if dropout and (dense is not None or query.device.type != "cpu"):
        _count("dropout")
        if dense is None:
            dense = _band(Nq, Nk, causal, window, query.device)
            if key_mask is not None:
                dense = key_mask.reshape(B, 1, 1, Nk) & dense
            if documents:  # Nq == Nk: inside a document the band on indices is the band on its positions
                cu = documents.get("cu_seqlens", documents.get("cu_seqlens_q"))
                if "cu_seqlens_k" in documents and not torch.equal(cu, documents["cu_seqlens_k"]):
                    raise NotImplementedError("attention_ext: attention dropout with cu_seq_lens_q != cu_seq_lens_k")
                dense = _layers.document_mask(cu, Nk) & dense
        out = _eager(query, key, value, dense, scaling, softcap, dropout, s_aux)
    elif dense is not None:
        _count("dense_mask")
        if softcap is not None or s_aux is not None:  # SDPA has neither softcap nor sinks
            out = _eager(query, key, value, dense, scaling, softcap, 0.0, s_aux)
        else:
            out = _sdpa(query, key, value, dense, scaling)
    else:
        _count("kernel")
        if value.dtype != query.dtype or key.dtype != query.dtype:
            key, value = key.to(query.dtype), value.to(query.dtype)
        out = _kernel(query, key, value, causal, window, scaling, softcap, key_mask, documents, s_aux, dropout or 0.0)
    return out.transpose(1, 2).contiguous(), None
