"""Hugging Face ``transformers`` integration: run every attention layer on attention_ext.

    import attention_ext.hf            # registers "attention_ext" (idempotent)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attention_ext")
    model.set_attn_implementation("attention_ext")          # or switch an existing model
    attention_ext.hf.alternate(model, "LLLLLG", window=512)  # Gemma 3 style 5 local : 1 global

Importing this module registers two functions under the name ``"attention_ext"``
(transformers 4.57 and 5.x, ``transformers>=4.57,<6``):

* :func:`attention_forward` in ``AttentionInterface``: the attention of every layer.
  Layout ``(B, H, N, D)`` as transformers passes it; K/V keep their ``num_key_value_heads``
  (GQA is never repeated); ``scaling`` is passed through; causal/bidirectional comes from
  the ``is_causal`` kwarg, else ``module.is_causal`` (and ``config.is_causal = False``
  makes it bidirectional, as transformers' masks do); the window comes from the layer
  (``config.layer_types[layer_idx]`` and the ``sliding_window`` kwarg, see :func:`layer_spec`).
  transformers' ``sliding_window = w`` means a causal query sees the ``w`` keys
  ``i - w < j <= i`` (itself included), i.e. our ``window=(w - 1, 0)``; a bidirectional
  layer given ``w`` (ModernBERT passes ``config.sliding_window + 1``) sees ``|i - j| < w``,
  our ``(w - 1, w - 1)``. Queries are aligned bottom-right, which is what a KV cache needs.
* :func:`mask_function` in ``AttentionMaskInterface``: returns ``None`` when the layer mask
  is plain causal / bidirectional / sliding-window and there is no padding, so no
  ``N x N`` mask is ever built; with padding it returns the *key padding* as a bool
  ``(B, 1, 1, kv_length)`` tensor (O(B * N) memory), which :func:`attention_forward`
  passes to the kernels as ``key_mask`` next to the layer's own causal/window spec;
  anything else (packed sequences, or-/and-mask overlays such as Gemma 3's image tokens,
  chunked attention, a static cache's full layers and its sliding layers while shorter
  than the window) gets transformers' exact dense boolean mask, which for one query
  (decoding) is a ``(B, 1, 1, kv_length)`` row that the kernels take as ``key_mask``.
  Our masks are recognised by their shape, never by an attribute: ``generate`` copies
  the masks of a static cache (``.contiguous()``), and a copy keeps only shape, dtype
  and values (see :func:`attention_forward` for how each shape is read).

What runs where (``fallback_counts()`` counts every call by path; each fallback reason
warns once):

=================================  =================================================
``"kernel"``                       our ops (flash_attention / sliding_window_attention),
                                   padded batches included (``key_mask``)
``"dense_mask"``                   a mask only transformers can describe (see above):
                                   exact SDPA with that mask
``"dropout"``                      attention dropout > 0 while training: exact eager math
=================================  =================================================

``attn_logit_softcapping`` (Gemma 2) runs inside the kernels (``softcap`` of
:func:`attention_ext.flash_attention`); on a ``"dense_mask"`` fallback it runs as exact
eager math (SDPA has no softcap).

Attention sinks (``s_aux``) raise ``NotImplementedError``. ``output_attentions`` returns
no weights (as SDPA). Gemma 3 with ``use_bidirectional_attention`` (mask overlays) and
cross-attention run the ``"dense_mask"`` path.

ModernBERT on transformers 4.57 does not use ``AttentionInterface``: registering also adds
``"attention_ext"`` to its own attention table, so its layers run on our kernels too, but
that version of the model builds its dense ``N x N`` masks itself (5.x does not).
"""

from __future__ import annotations

import collections
import functools
import warnings

import torch
import torch.nn.functional as F

from . import _layers
from . import functional as _fn

NAME = "attention_ext"
TRANSFORMERS_SUPPORTED = ">=4.57,<6"

_counts: collections.Counter = collections.Counter()
_warned: set = set()

_FALLBACK_WHY = {
    "dense_mask": "a mask pattern only transformers can describe (packed sequences, mask overlays, chunked "
                  "attention or a static cache): exact SDPA with transformers' dense mask",
    "dropout": "attention dropout > 0 in training is not supported by the attention_ext kernels: exact eager math",
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

def _kernel(query, key, value, causal, window, scaling, softcap, key_mask):
    if window is None:
        return _fn.flash_attention(query, key, value, causal=causal, scale=scaling, softcap=softcap,
                                   key_mask=key_mask)
    return _fn.sliding_window_attention(query, key, value, _reach(window, causal), causal=causal, scale=scaling,
                                        softcap=softcap, key_mask=key_mask)


def _sdpa(query, key, value, mask, scaling):
    """Exact masked attention (bool or additive mask); rows with no key give zeros."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def _eager(query, key, value, mask, scaling, softcap, dropout):
    """Exact eager math (as transformers' eager path): scores, optional softcap, mask,
    fp32 softmax, dropout. K/V are grouped, not repeated."""
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
    p = torch.softmax(scores.float(), dim=-1)
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


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers attention function ``"attention_ext"``; returns ``(out (B, N, H, Dv), None)``.

    How ``attention_mask`` is read (by shape and dtype, so a copy reads the same):

    * ``None``: the layer's own pattern (causal/bidirectional, window), queries aligned
      bottom-right.
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
    * anything else: an exact dense mask (SDPA, or eager math with a softcap).
    """
    if s_aux is not None:
        raise NotImplementedError("attention_ext: attention sinks (s_aux) are not supported")
    if kwargs.get("output_attentions", False) and "output_attentions" not in _warned:
        _warned.add("output_attentions")
        warnings.warn("attention_ext.hf: output_attentions=True returns no attention weights", stacklevel=2)
    causal, window, model_window = layer_spec(module, sliding_window, is_causal)
    B, _, Nq, _ = query.shape
    Nk = key.shape[2]
    dense = None  # the exact boolean/additive mask of a fallback, if one is needed
    key_mask = None  # padding, (B, Nk) bool: our kernels take it as is

    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_ext: unsupported attention_mask type {type(attention_mask).__name__}")
    if attention_mask is not None and _is_key_row(attention_mask, B):
        info = getattr(attention_mask, "_attention_ext", None)
        if info is not None:
            key_mask = _tagged_padding(info, Nk, causal, module)
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

    if dropout:
        _count("dropout")
        if dense is None:
            dense = _band(Nq, Nk, causal, window, query.device)
            if key_mask is not None:
                dense = key_mask.reshape(B, 1, 1, Nk) & dense
        out = _eager(query, key, value, dense, scaling, softcap, dropout)
    elif dense is not None:
        _count("dense_mask")
        if softcap is not None:  # SDPA has no softcap
            out = _eager(query, key, value, dense, scaling, softcap, 0.0)
        else:
            out = _sdpa(query, key, value, dense, scaling)
    else:
        _count("kernel")
        if value.dtype != query.dtype or key.dtype != query.dtype:
            key, value = key.to(query.dtype), value.to(query.dtype)
        out = _kernel(query, key, value, causal, window, scaling, softcap, key_mask)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------
# Mask function
# ---------------------------------------------------------------------------------

def _closure(fn):
    names = fn.__code__.co_freevars
    return {n: c.cell_contents for n, c in zip(names, fn.__closure__ or ())}


def _analyse(mask_function):
    """Describe an index-based transformers mask function as ``{"causal": bool|None,
    "window": ..., "padding": [...]}``, or None when it is anything but an and-combination
    of causal / bidirectional / sliding-window / padding / unpacked-sequence masks."""
    out = {"causal": None, "window": None, "padding": []}
    stack = [mask_function]
    while stack:
        fn = stack.pop()
        qn = getattr(fn, "__qualname__", "")
        if qn == "and_masks.<locals>.and_mask":
            stack.extend(_closure(fn).get("mask_functions", ()))
        elif qn == "causal_mask_function":
            out["causal"] = True
        elif qn == "bidirectional_mask_function":
            out["causal"] = False if out["causal"] is None else out["causal"]
        elif qn == "sliding_window_overlay.<locals>.inner_mask":
            out["window"] = ("causal", _closure(fn)["sliding_window"])
        elif qn == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
            out["window"] = ("bidirectional", _closure(fn)["sliding_window"])
            out["causal"] = False if out["causal"] is None else out["causal"]
        elif qn == "padding_mask_function.<locals>.inner_mask":
            out["padding"].append(_closure(fn)["padding_mask"])
        elif qn == "packed_sequence_mask_function.<locals>.inner_mask":
            packed = _closure(fn)["packed_sequence_mask"]
            if not bool((packed[:, -1] == 0).all()):  # several sequences in a row: not ours
                return None
        else:
            return None
    if out["causal"] is None:
        return None
    return out


def mask_function(batch_size, *args, mask_function=None, attention_mask=None, **kwargs):
    """transformers mask function ``"attention_ext"`` (AttentionMaskInterface).

    Returns, for a plain pattern (the queries are the last ``q_length`` of the
    ``kv_length`` keys, no overlay), ``None`` without padding, else the key padding as a
    bool ``(B, 1, 1, kv_length)`` tensor: for one query transformers' exact row (the whole
    mask, window included), for more the padding alone (:func:`attention_forward` adds the
    layer's pattern). Both carry ``_attention_ext`` (the padding of every position) as
    extra information only: a copy drops it and reads the same, except in a layer converted
    to a wider window than the mask covers, which then raises. Every other case gets
    transformers' own exact dense boolean mask ``(B, 1, q_length, kv_length)``.

    The cases, for transformers' caches (``q_offset``: position of the first query;
    ``kv_offset``/``kv_length``: positions of the keys; plain when
    ``q_offset + q_length == kv_offset + kv_length``):

    * no cache / dynamic caches (full and sliding layers): always plain.
    * static full layers: ``kv_length`` is the whole cache (unused slots masked) and
      ``q_offset`` a tensor on 5.x: dense, prefill and decoding alike (a decoding row then
      runs on the kernels as ``key_mask``); on 4.57 plain only when the queries end at the
      last slot.
    * static sliding layers: plain once the window is full, and when the new tokens fill or
      pass it (a prefill longer than the window: its keys are just the prompt,
      ``kv_length == q_length``; this is where a tag lost in generate's copy made the layer
      run with no causal mask and no window); dense while the tokens stay short of the
      window (the keys are the whole window-sized buffer, the queries at its top).
    * decoding on a compileable cache on 5.x passes ``allow_is_causal_skip=False``: dense.
    """
    from transformers import masking_utils

    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    cache_position = kwargs.get("cache_position", args[0] if args else None)
    if "q_length" in kwargs:  # transformers 5.x
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
        skip_allowed = kwargs.get("allow_is_causal_skip", True) or kwargs.get("allow_is_bidirectional_skip", False)
    else:  # 4.57: queries at cache_position
        q_length = cache_position.shape[0]
        q_offset = int(cache_position[0]) if q_length else 0
        skip_allowed = True  # 4.57 clears allow_is_causal_skip for every forward with position_ids
    kv_length, kv_offset = kwargs["kv_length"], kwargs.get("kv_offset", 0)

    dense_kwargs = dict(kwargs)
    dense_kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    if args:
        dense_kwargs["cache_position"] = cache_position

    def dense():
        return masking_utils.sdpa_mask(batch_size=batch_size, mask_function=mask_function,
                                       attention_mask=attention_mask, **dense_kwargs)

    spec = _analyse(mask_function)
    plain = (spec is not None and skip_allowed and not spec["padding"]
             and not isinstance(q_offset, torch.Tensor) and not isinstance(kv_offset, torch.Tensor)
             and int(q_offset) + q_length == int(kv_offset) + kv_length)
    if not plain:
        return dense()
    end = int(q_offset) + q_length
    pad = attention_mask
    if pad is None or (pad.shape[-1] >= end and bool(pad[:, :end].all())):
        return None
    pad = pad.to(torch.bool)
    if q_length == 1:
        mask = dense()
    else:
        kv = pad[:, kv_offset:kv_offset + kv_length]
        if kv.shape[-1] < kv_length:
            kv = F.pad(kv, (0, kv_length - kv.shape[-1]))
        mask = kv.reshape(batch_size, 1, 1, kv_length)
    mask._attention_ext = {"padding": pad, "end": end, "causal": spec["causal"], "window": spec["window"]}
    return mask


# ---------------------------------------------------------------------------------
# ModernBERT on transformers 4.57 (its own attention table, dense masks built by the model)
# ---------------------------------------------------------------------------------

def _modernbert_457_forward(module, qkv, attention_mask, sliding_window_mask, position_ids, local_attention, bs,
                            dim, output_attentions=False, **_kwargs):
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    cos, sin = module.rotary_emb(qkv, position_ids=position_ids)
    query, key, value = qkv.transpose(3, 1).unbind(dim=2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    scale = module.head_dim ** -0.5
    local = tuple(local_attention) != (-1, -1)
    padded = attention_mask is not None and bool((attention_mask != 0).any())
    key_mask = None
    if padded:
        # the model's additive (B, 1, N, N) mask expands its key padding over the queries
        m = attention_mask[:, 0]
        if bool((m == m[:, :1]).all()):
            key_mask = m[:, 0] == 0
    if module.training and module.attention_dropout:
        _count("dropout")
        out = _eager(query, key, value, sliding_window_mask if local else attention_mask, scale, None,
                     module.attention_dropout)
    elif padded and key_mask is None:
        _count("dense_mask")
        out = _sdpa(query, key, value, sliding_window_mask if local else attention_mask, scale)
    else:
        _count("kernel")
        if local:
            out = _fn.sliding_window_attention(query, key, value, tuple(local_attention), scale=scale,
                                               key_mask=key_mask)
        else:
            out = _fn.flash_attention(query, key, value, scale=scale, key_mask=key_mask)
    out = out.transpose(1, 2).contiguous().view(bs, -1, dim)
    return (out,)


# ---------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def register():
    """Registers ``"attention_ext"`` with transformers (done on import; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)
    try:  # transformers 4.57: ModernBERT dispatches through its own table
        from transformers.models.modernbert import modeling_modernbert as mb
    except ImportError:  # pragma: no cover
        mb = None
    table = getattr(mb, "MODERNBERT_ATTENTION_FUNCTION", None)
    if table is not None:
        table[NAME] = _modernbert_457_forward
    return NAME


# ---------------------------------------------------------------------------------
# Layer patterns
# ---------------------------------------------------------------------------------

_PATTERN_KINDS = {"L": "sliding_attention", "G": "full_attention"}


def _pattern_message(pattern, bad):
    shown = pattern.upper() if isinstance(pattern, str) else pattern
    return f"pattern must be a non-empty string of 'L' (local) and 'G' (global), got {shown!r}"


def layer_types(pattern, num_layers):
    """``"LG"`` -> ``["sliding_attention", "full_attention", ...]`` for ``num_layers``
    layers (the pattern repeats from layer 0; ``L`` local, ``G`` global)."""
    return _layers.expand_pattern(pattern, num_layers, _PATTERN_KINDS, _pattern_message)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def alternate(model_or_config, pattern="LG", window=None):
    """Converts a transformers model (in place) or config to a local/global layer pattern.

    Layer ``i`` is local when ``pattern[i % len(pattern)] == "L"`` and global when it is
    ``"G"``: ``"LG"`` alternates, ``"LLLLLG"`` is Gemma 3's 5:1, ``"GLL"`` ModernBERT's.
    ``window`` is transformers' ``sliding_window`` of the family (causal: a query sees
    ``window`` keys, itself included; ModernBERT: ``|i - j| <= window``); None keeps the
    config's value.

    Sets ``config.layer_types`` and ``config.sliding_window`` (and the attributes that
    attention modules copy at construction), so the pattern is honoured by
    ``attn_implementation="attention_ext"`` and by the KV cache. Families:

    * ``layer_types`` natively (Qwen2, Gemma 2, Gemma 3, ModernBERT on 5.x and other
      hybrid models): honoured by every attention implementation, eager and SDPA too.
    * Llama, Mistral and other families without per-layer types: honoured by
      ``"attention_ext"`` only (their own eager/SDPA masks ignore ``layer_types``).
    * ModernBERT on transformers 4.57 (no ``layer_types``): configs only, for patterns
      ``"G" + "L" * (n - 1)`` (``global_attn_every_n_layers = n``).

    Returns the model or config.
    """
    is_model = isinstance(model_or_config, torch.nn.Module)
    config = _text_config(model_or_config.config if is_model else model_or_config)
    n = config.num_hidden_layers
    types = layer_types(pattern, n)
    if hasattr(config, "global_attn_every_n_layers") and not hasattr(config, "layer_types"):
        return _alternate_modernbert_457(model_or_config, config, pattern, window, is_model)
    if window is None:
        window = getattr(config, "sliding_window", None)
        if window is None and "sliding_attention" in types:
            raise ValueError("alternate: window is required (the config has no sliding_window)")
    if window is not None:
        window = int(window)
        if window < 1:
            raise ValueError(f"alternate: window must be >= 1, got {window}")
    if hasattr(config, "use_sliding_window"):  # Qwen2-type flag
        config.use_sliding_window = "sliding_attention" in types
    if hasattr(config, "max_window_layers"):
        config.max_window_layers = 0
    config.sliding_window = window
    config.layer_types = types
    if hasattr(config, "sliding_window_pattern"):  # Gemma 3's 4.x field, kept consistent
        try:
            config.sliding_window_pattern = len(pattern)
        except AttributeError:
            pass
    if is_model:
        _update_modules(model_or_config, config, types, window)
    return model_or_config


def _layer_index(m):
    for owner in (m, getattr(m, "self_attn", None), getattr(m, "attn", None), getattr(m, "attention", None)):
        idx = getattr(owner, "layer_idx", None) if owner is not None else None
        if isinstance(idx, int):
            return idx
    return None


def _update_modules(model, config, types, window):
    """The attributes that modules copy from the config at construction."""
    modernbert = type(config).__name__.startswith("ModernBert")
    replace = []
    for name, m in model.named_modules():
        if hasattr(m, "has_sliding_layers"):  # Qwen2-type models build the sliding mask only if set
            m.has_sliding_layers = "sliding_attention" in types
        own = getattr(m, "layer_types", None)
        if isinstance(own, list) and "Rotary" in type(m).__name__ and set(types) - set(own):
            replace.append(name)  # per-layer-type RoPE (Gemma 3, ModernBERT 5.x) lacks a new type
        idx = _layer_index(m)
        if idx is None or not 0 <= idx < len(types):
            continue
        local = types[idx] == "sliding_attention"
        if hasattr(m, "attention_type"):
            m.attention_type = types[idx]
        if hasattr(m, "layer_type"):
            m.layer_type = types[idx]
        if hasattr(m, "is_sliding"):
            m.is_sliding = local
        if hasattr(m, "sliding_window") and getattr(m, "layer_idx", None) == idx:
            m.sliding_window = (window + 1 if modernbert else window) if local else None
    for name in replace:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        buf = next(old.buffers(), None)
        new = type(old)(old.config)
        if buf is not None:
            new = new.to(buf.device)
        setattr(parent, attr, new)


def _alternate_modernbert_457(model_or_config, config, pattern, window, is_model):
    p = pattern.upper()
    n = len(p)
    if is_model:
        raise NotImplementedError("alternate: ModernBERT on transformers 4.57 can be converted as a config only "
                                  "(its layers fix the pattern at construction); build the model from the config")
    if p != "G" + "L" * (n - 1):
        raise NotImplementedError(f"alternate: ModernBERT on transformers 4.57 supports patterns 'G' + 'L' * (n - 1) "
                                  f"(global_attn_every_n_layers = n), got {pattern!r}")
    config.global_attn_every_n_layers = n
    if window is not None:
        config.local_attention = 2 * int(window)
    return model_or_config


register()
