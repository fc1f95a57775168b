"""ModernBERT on transformers 4.57: its layers dispatch through the model's own attention
table (not ``AttentionInterface``) and the model builds its dense masks itself; and its
config has no ``layer_types``, only ``global_attn_every_n_layers``."""

from __future__ import annotations

from .. import functional as _fn
from .attention import _count, _eager, _sdpa


def attention_forward(module, qkv, attention_mask, sliding_window_mask, position_ids, local_attention, bs,
                      dim, output_attentions=False, **_kwargs):
    """4.57 ModernBERT's attention function (its own signature: packed ``qkv``, the model's
    additive masks); the key padding is read back from the mask when it is one row per batch
    element, else the mask runs on exact SDPA. Counted in the same fallback_counts()."""
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
    dropout = module.attention_dropout if module.training else 0.0
    if dropout and (qkv.device.type != "cpu" or (padded and key_mask is None)):
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
                                               key_mask=key_mask, dropout_p=dropout)
        else:
            out = _fn.flash_attention(query, key, value, scale=scale, key_mask=key_mask, dropout_p=dropout)
    out = out.transpose(1, 2).contiguous().view(bs, -1, dim)
    return (out,)


def install(name):
    """Adds ``name`` to 4.57's ModernBERT attention table (5.x has none: nothing to do)."""
    try:
        from transformers.models.modernbert import modeling_modernbert as mb
    except ImportError:  # pragma: no cover
        return
    table = getattr(mb, "MODERNBERT_ATTENTION_FUNCTION", None)
    if table is not None:
        table[name] = attention_forward


def alternate_config(model_or_config, config, pattern, window, is_model):
    """:func:`alternate` for 4.57 ModernBERT configs: ``"G" + "L" * (n - 1)`` only, as
    ``global_attn_every_n_layers = n``; ``local_attention`` is twice the window."""
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
