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
  a static cache's prefill, whose keys are the whole buffer, gets the key row of the
  written slots only (``(B, 1, 1, end)``: the keys end there);
  for packed sequences (position ids that restart, no padding mask and no cache, as
  ``DataCollatorWithFlattening`` produces them; transformers detects them the same way
  for eager and SDPA) it returns the documents' boundaries, int32 ``(B, 1, 1, S+1)``,
  which :func:`attention_forward` passes as the kernels' ``cu_seqlens`` (the layer's
  causal/window pattern then applies inside each document); with no mask at all,
  FlashAttention's ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs (one flattened row) are
  read as the FlashAttention-2 path reads them;
  anything else (or-/and-mask overlays such as Gemma 3's image tokens, chunked attention)
  gets transformers' exact dense boolean mask, which for one query (decoding, a static
  cache's steps included) is a ``(B, 1, 1, kv_length)`` row that the kernels take as
  ``key_mask``.
  Our masks are recognised by their shape, never by an attribute: ``generate`` copies
  the masks of a static cache (``.contiguous()``), and a copy keeps only shape, dtype
  and values (see :func:`attention_forward` for how each shape is read).

What runs where (``fallback_counts()`` counts every call by path; each fallback reason
warns once):

=================================  =================================================
``"kernel"``                       our ops (flash_attention / sliding_window_attention),
                                   padded batches included (``key_mask``), packed
                                   sequences (``cu_seqlens``), and every
                                   one-query (decoding) step whose mask is a bool row
``"dense_mask"``                   a mask only transformers can describe (see above)
                                   for more than one query: exact SDPA with that mask
``"dropout"``                      attention dropout > 0 with a dense mask or on CUDA: exact eager math
=================================  =================================================

``attn_logit_softcapping`` (Gemma 2) runs inside the kernels (``softcap`` of
:func:`attention_ext.flash_attention`); on a ``"dense_mask"`` fallback it runs as exact
eager math (SDPA has no softcap).

Attention sinks (gpt-oss's ``s_aux``) run inside the kernels (``sinks`` of
:func:`attention_ext.flash_attention`, differentiable); on a fallback, as exact eager math.
``output_attentions`` returns
no weights (as SDPA). Gemma 3 with ``use_bidirectional_attention`` (mask overlays) and
cross-attention run the ``"dense_mask"`` path (decoding steps: the kernels, with the row).

ModernBERT on transformers 4.57 does not use ``AttentionInterface``: registering also adds
``"attention_ext"`` to its own attention table, so its layers run on our kernels too, but
that version of the model builds its dense ``N x N`` masks itself (5.x does not).

The package, by job: ``attention.py`` (:func:`attention_forward`, its kernel / SDPA / eager
paths and the path counters), ``masks.py`` (:func:`mask_function`), ``layer_patterns.py``
(:func:`layer_types`, :func:`alternate`), ``modernbert_457.py`` (the transformers 4.57
ModernBERT shim); this file registers on import.
"""

from __future__ import annotations

import functools

from . import modernbert_457 as _modernbert_457
from .attention import attention_forward, fallback_counts, layer_spec, reset_counts
from .layer_patterns import alternate, layer_types
from .masks import mask_function

NAME = "attention_ext"
TRANSFORMERS_SUPPORTED = ">=4.57,<6"

__all__ = ["NAME", "TRANSFORMERS_SUPPORTED", "alternate", "attention_forward", "fallback_counts", "layer_spec",
           "layer_types", "mask_function", "register", "reset_counts"]


@functools.lru_cache(maxsize=None)
def register():
    """Registers ``"attention_ext"`` with transformers (done on import; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)
    _modernbert_457.install(NAME)  # transformers 4.57: ModernBERT dispatches through its own table
    return NAME


register()
