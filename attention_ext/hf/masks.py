"""The mask function registered as ``"attention_ext"``: recognises the plain patterns our
kernels run (causal / bidirectional / sliding window, with padding as key padding, and
packed sequences as ``cu_seqlens``) in transformers' mask functions, and leaves every
other mask to transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _layers


def _closure(fn):
    names = fn.__code__.co_freevars
    return {n: c.cell_contents for n, c in zip(names, fn.__closure__ or ())}


def _analyse(mask_function):
    """Describe an index-based transformers mask function as ``{"causal": bool|None,
    "window": ..., "padding": [...], "documents": (B, N) ids or None}``, or None when it is
    anything but an and-combination of causal / bidirectional / sliding-window / padding /
    packed-sequence masks.

    Packed sequences: transformers and-s its pattern with ``packed_sequence_mask_function``
    (document ids from position ids that do not step by 1); 5.x also wraps the pattern in
    ``remap_positions_for_packed_sequence`` (indices -> position ids). Inside a document
    the position ids step by 1, so either way it is the pattern on document-local
    positions: the kernels' ``cu_seqlens``."""
    out = {"causal": None, "window": None, "padding": [], "documents": None}
    remapped = False
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
        elif qn == "remap_positions_for_packed_sequence.<locals>.inner_mask":
            remapped = True
            stack.append(_closure(fn)["mask_function"])
        elif qn == "packed_sequence_mask_function.<locals>.inner_mask":
            packed = _closure(fn)["packed_sequence_mask"]
            if not bool((packed[:, -1] == 0).all()):  # 4.57 passes it also for one sequence per row
                out["documents"] = packed
        else:
            return None
    if out["causal"] is None or (remapped and out["documents"] is None):
        return None
    return out


def _padding(attention_mask, start, length, batch_size, device):
    """Bool (B, length): which of the key positions ``start ..`` are real tokens (past the
    2-D mask: not yet written, False, as transformers pads it); all True without a mask."""
    if attention_mask is None:
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    kv = attention_mask[:, start:start + length].to(torch.bool)
    return F.pad(kv, (0, length - kv.shape[-1])) if kv.shape[-1] < length else kv


def mask_function(batch_size, *args, mask_function=None, attention_mask=None, **kwargs):
    """transformers mask function ``"attention_ext"`` (AttentionMaskInterface).

    Packed sequences (position ids that restart, no padding mask and no cache, as
    ``DataCollatorWithFlattening`` gives them): their document boundaries, int32
    ``(B, 1, 1, S+1)`` (the kernels' ``cu_seqlens``, a row with fewer documents repeats its
    last value), computed once per mask, so once per forward and layer type, not per layer.

    Returns, for a plain pattern (the queries are the last ``q_length`` of the
    ``kv_length`` keys, no overlay), ``None`` without padding, else the key padding as a
    bool ``(B, 1, 1, kv_length)`` tensor: for one query transformers' exact row (the whole
    mask, window included), for more the padding alone (:func:`attention_forward` adds the
    layer's pattern). Both carry ``_attention_ext`` (the padding of every position) as
    extra information only: a copy drops it and reads the same, except in a layer converted
    to a wider window than the mask covers, which then raises. Every other case gets
    transformers' own exact dense boolean mask ``(B, 1, q_length, kv_length)``.

    A static cache's keys are its whole buffer, whose slots past the queries are not yet
    written: for several queries (a prefill) the mask is then the key row of the written
    slots only, bool ``(B, 1, 1, end)`` with ``end = q_offset + q_length`` (its shape tells
    :func:`attention_forward` where the keys end; no attribute).

    The cases, for transformers' caches (``q_offset``: position of the first query;
    ``kv_offset``/``kv_length``: positions of the keys; plain when
    ``q_offset + q_length == kv_offset + kv_length``):

    * no cache / dynamic caches (full and sliding layers): always plain.
    * static full layers: ``kv_length`` is the whole cache (unused slots masked), ``q_offset``
      a tensor on 5.x: a prefill gets the short key row, a decoding step transformers' own
      row (``(B, 1, 1, kv_length)``: the kernels take it as ``key_mask``).
    * static sliding layers (5.x keeps them in position order: it shifts the buffer, no
      ring): plain once the window is full, and when the new tokens fill or pass it (a
      prefill longer than the window: its keys are just the prompt, ``kv_length ==
      q_length``); while the tokens stay short of the window the keys are the whole
      window-sized buffer: the short key row for a prefill, transformers' row for one query.
    * decoding on a compileable cache on 5.x passes ``allow_is_causal_skip=False``: dense,
      which for one query is a row (kernels).
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
    device = kwargs.get("device", cache_position.device if cache_position is not None else None)

    dense_kwargs = dict(kwargs)
    dense_kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    if args:
        dense_kwargs["cache_position"] = cache_position

    def dense():
        return masking_utils.sdpa_mask(batch_size=batch_size, mask_function=mask_function,
                                       attention_mask=attention_mask, **dense_kwargs)

    spec = _analyse(mask_function)
    if spec is not None and spec["documents"] is not None:
        docs = spec["documents"]
        if (spec["padding"] or attention_mask is not None or not isinstance(q_offset, int) or q_offset
                or kv_offset or not q_length == kv_length == docs.shape[-1]):
            return dense()
        starts = F.pad(docs.diff(dim=-1) != 0, (1, 0))
        return _layers.cu_seqlens(starts.expand(batch_size, -1)).view(batch_size, 1, 1, -1)
    if spec is None or not skip_allowed or spec["padding"]:
        return dense()
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        # a static cache's offsets: read them for a prefill, not per token (a sync) nor while compiling
        if q_length == 1 or torch.compiler.is_compiling():
            return dense()
        q_offset, kv_offset = int(q_offset), int(kv_offset)
    end = int(q_offset) + q_length
    if end < kv_length and kv_offset == 0 and q_length > 1:
        # a static buffer whose slots from `end` on are unused: the key row stops at `end` (the
        # shape says where the keys end, so a copy reads the same), the layer adds its pattern
        return _padding(attention_mask, 0, end, batch_size, device).reshape(batch_size, 1, 1, end)
    if end != int(kv_offset) + kv_length:
        return dense()
    pad = attention_mask
    if pad is None or (pad.shape[-1] >= end and bool(pad[:, :end].all())):
        return None
    pad = pad.to(torch.bool)
    if q_length == 1:
        mask = dense()
    else:
        mask = _padding(pad, kv_offset, kv_length, batch_size, device).reshape(batch_size, 1, 1, kv_length)
    mask._attention_ext = {"padding": pad, "end": end, "causal": spec["causal"], "window": spec["window"]}
    return mask
