"""Local/global layer patterns for transformers models: ``layer_types`` from a pattern
string and :func:`alternate`, which converts a model or config to a pattern."""

from __future__ import annotations

import torch

from .. import _layers
from . import modernbert_457


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
        return modernbert_457.alternate_config(model_or_config, config, pattern, window, is_model)
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
