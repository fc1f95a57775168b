"""``KVCache``: the K/V buffers of a model's layers for :func:`attention_ext.attention_with_kvcache`.

    cache = KVCache(batch_size=2, num_kv_heads=2, head_dim=64, max_len=4096, num_layers=12,
                    windows=[512, 512, None] * 4)          # local layers roll, global ones are contiguous
    for i, layer in enumerate(layers):                      # one decoding step (or a prefill chunk)
        out = attention_with_kvcache(q_i, **cache.update(i, k_i, v_i), causal=True)
    cache.advance(n)                                        # once per step, after every layer

``update`` writes nothing itself: it returns the op's cache arguments (buffers, lengths,
``block_table``, ``rolling``, ``window``, ``key_mask``) and the new ``k``/``v``, which the op
appends in place at ``cache_seqlens`` before attending. Every layer of a step sees the same
``cache_seqlens``, so the lengths advance once per step, as in FlashAttention.

Layouts, per layer:

* contiguous: ``(B, Hkv, max_len, D)``;
* rolling (``rolling=True`` and a layer window): a ring of ``left + chunk`` slots per row,
  position ``p`` in slot ``p % capacity``; its memory does not grow with the generated length;
* paged (``page_size``): pools ``(num_pages, Hkv, page_size, D)`` shared by the rows through one
  ``block_table (B, ceil(max_len / page_size))``; pages are handed out from a free list as the
  rows grow, and ``release(row)`` gives a row's pages back.

``chunk`` is the most new tokens one ``update`` may bring (a rolling ring must hold the window
and the chunk); a longer prompt is fed in chunks (``TransformerLM`` does so).
"""

from __future__ import annotations

import torch

from . import _checks

_FN = "KVCache"


class KVCache:
    """K/V buffers of ``num_layers`` layers and the rows' lengths ``cache_seqlens`` (int32 ``(B,)``).

    Args:
        batch_size, num_kv_heads, head_dim: the cache's rows, K/V heads and key head dim
            (``v_head_dim`` defaults to ``head_dim``).
        max_len: the most tokens a row holds (contiguous and paged layers); may be None when
            every layer rolls.
        num_layers: layers (default ``len(windows)``, else 1).
        windows: per layer ``None`` (full attention) or the window of
            :func:`attention_ext.sliding_window_attention` (an int ``w`` = ``(w, 0)`` causal, or
            ``(left, right)``); passed to the op. ``False``: the layer keeps no K/V (a
            linear-attention layer; ``extra[layer]`` holds its own state). A list has one
            entry per layer; an int, a ``(left, right)`` tuple or None applies to every layer.
        rolling: windowed layers get a ring buffer (else the layout of full layers).
        page_size: full-attention layers are paged with this page size (None: contiguous).
        num_pages: pages per pool (default: enough for every row to reach ``max_len``).
        chunk: the most tokens one ``update`` appends (sizes the rings).
        key_mask: optional bool ``(B, M)``, False for positions ``t < M`` no query may attend
            (left padding of a batched prompt); passed to the op.
    """

    def __init__(self, batch_size, num_kv_heads, head_dim, max_len=None, *, num_layers=None, windows=None,
                 rolling=True, page_size=None, num_pages=None, chunk=256, v_head_dim=None, key_mask=None,
                 dtype=torch.float32, device=None):
        B = _checks.integer(batch_size, "batch_size", _FN, minimum=1)
        H = _checks.integer(num_kv_heads, "num_kv_heads", _FN, minimum=1)
        D = _checks.integer(head_dim, "head_dim", _FN, minimum=1)
        Dv = D if v_head_dim is None else _checks.integer(v_head_dim, "v_head_dim", _FN, minimum=1)
        self.chunk = _checks.integer(chunk, "chunk", _FN, minimum=1)
        if num_layers is None:
            num_layers = len(windows) if isinstance(windows, list) else 1
        num_layers = _checks.integer(num_layers, "num_layers", _FN, minimum=1)
        if not isinstance(windows, list):
            windows = [windows] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{_FN}: windows has {len(windows)} entries for num_layers={num_layers}")
        self.kv = [w is not False for w in windows]
        self.windows = [None if w is None or w is False else _checks.window(w, True, _FN) for w in windows]
        self.rolling = [bool(rolling) and w is not None for w in self.windows]
        if max_len is None and not all(r or not kv for r, kv in zip(self.rolling, self.kv)):
            raise ValueError(f"{_FN}: max_len is needed unless every layer has a window and rolling=True")
        self.max_len = None if max_len is None else _checks.integer(max_len, "max_len", _FN, minimum=1)
        self.page_size = None if page_size is None else _checks.integer(page_size, "page_size", _FN, minimum=1)
        self.batch_size, self.dtype = B, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")

        paged = self.page_size is not None and any(kv and not r for r, kv in zip(self.rolling, self.kv))
        self.block_table = None
        if paged:
            pages_per_row = -(-self.max_len // self.page_size)
            num_pages = B * pages_per_row if num_pages is None else _checks.integer(num_pages, "num_pages", _FN,
                                                                                     minimum=1)
            # entries past a row's pages stay 0: a valid page the op never reads for that row
            self.block_table = torch.zeros(B, pages_per_row, dtype=torch.int32, device=self.device)
            self._free = list(range(num_pages - 1, -1, -1))
            self._row_pages = [[] for _ in range(B)]

        def buffers(slots_shape):
            return (torch.zeros(*slots_shape, D, dtype=dtype, device=self.device),
                    torch.zeros(*slots_shape, Dv, dtype=dtype, device=self.device))

        self.k, self.v = [], []
        for w, ring, kv in zip(self.windows, self.rolling, self.kv):
            if not kv:
                self.k.append(None)
                self.v.append(None)
                continue
            if ring:
                shape = (B, H, w[0] + self.chunk)
            elif paged:
                shape = (num_pages, H, self.page_size)
            else:
                shape = (B, H, self.max_len)
            k, v = buffers(shape)
            self.k.append(k)
            self.v.append(v)
        self.cache_seqlens = torch.zeros(B, dtype=torch.int32, device=self.device)
        self.lengths = [0] * B  # host copy of cache_seqlens: page allocation and bounds need no sync
        if key_mask is not None:
            key_mask = _checks.key_bools(_checks.tensor(key_mask, "key_mask"), "key_mask", B, key_mask.shape[-1],
                                         self.device, _FN)
        self.key_mask = key_mask
        self.extra = [dict() for _ in range(num_layers)]  # per-layer room for state that is not K/V (linear layers)

    @property
    def num_layers(self):
        return len(self.k)

    def capacity(self, layer):
        """Slots per row of a layer: its ring size, or ``max_len``."""
        return self.k[layer].shape[2] if self.rolling[layer] else self.max_len

    def nbytes(self):
        """Bytes held by the K/V buffers of every layer."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def update(self, layer, k, v):
        """The keyword arguments of :func:`attention_with_kvcache` that append ``k``/``v``
        ``(B, Hkv, n, D)`` to ``layer`` and attend over its cache (pass them with ``q``)."""
        layer = _checks.integer(layer, "layer", _FN, minimum=0, maximum=self.num_layers - 1)
        if not self.kv[layer]:
            raise ValueError(f"{_FN}: layer {layer} keeps no K/V (its window entry is False)")
        n = k.shape[-2]
        if n > self.chunk:
            raise ValueError(f"{_FN}: {n} new tokens exceed chunk={self.chunk}; feed them in chunks")
        if not self.rolling[layer]:
            ends = [t + n for t in self.lengths]
            if max(ends) > self.max_len:
                raise ValueError(f"{_FN}: a row would hold {max(ends)} tokens, more than max_len={self.max_len}")
            if self.block_table is not None:
                self._reserve(ends)
        paged = self.block_table is not None and not self.rolling[layer]
        return dict(k_cache=self.k[layer], v_cache=self.v[layer], cache_seqlens=self.cache_seqlens, k=k, v=v,
                    block_table=self.block_table if paged else None, rolling=self.rolling[layer],
                    window=self.windows[layer], key_mask=self.key_mask)

    def advance(self, n):
        """After every layer of a step: each row now holds ``n`` more tokens."""
        n = _checks.integer(n, "n", _FN, minimum=0)
        self.cache_seqlens += n
        self.lengths = [t + n for t in self.lengths]

    def release(self, row):
        """Row ``row`` starts over (length 0); its pages go back to the free list."""
        row = _checks.integer(row, "row", _FN, minimum=0, maximum=self.batch_size - 1)
        if self.block_table is not None:
            self._free.extend(reversed(self._row_pages[row]))
            self._row_pages[row] = []
            self.block_table[row] = 0
        self.cache_seqlens[row] = 0
        self.lengths[row] = 0

    def _reserve(self, ends):
        """Pages for row ``b`` to hold ``ends[b]`` tokens (all or none: a failed step takes none)."""
        new = [max(0, -(-end // self.page_size) - len(pages)) for end, pages in zip(ends, self._row_pages)]
        if sum(new) > len(self._free):
            raise RuntimeError(f"{_FN}: out of pages ({len(self._free)} free, this step needs {sum(new)})")
        for row, (pages, n) in enumerate(zip(self._row_pages, new)):
            if n:
                got = [self._free.pop() for _ in range(n)]
                self.block_table[row, len(pages):len(pages) + n] = torch.tensor(got, dtype=torch.int32)
                pages.extend(got)
