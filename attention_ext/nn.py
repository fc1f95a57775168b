"""``torch.nn`` modules on attention_ext: an attention layer and a small transformer LM
whose layers follow a local/global pattern string.

    import attention_ext.nn as aenn
    attn = aenn.Attention(512, 8, num_kv_heads=2, kind="local", window=256)      # (B, N, 512) -> (B, N, 512)
    lm = aenn.TransformerLM(vocab_size=256, dim=256, num_heads=4, pattern="LLLLLG", num_layers=12, window=512)
    logits, loss = lm(idx, targets)

Layer kinds, one character each in a pattern (it repeats from layer 0 to ``num_layers``):

* ``G`` / ``"global"``: exact softmax attention over the whole sequence (:func:`flash_attention`).
* ``L`` / ``"local"``: sliding-window attention (:func:`sliding_window_attention`); ``window``
  follows that function: an int ``w`` is the reach ``(w, w)``, or ``(w, 0)`` when causal, so
  a causal query sees ``w + 1`` keys, itself included (transformers' ``sliding_window`` counts
  ``w`` keys including itself); a ``(left, right)`` pair gives both reaches.
* ``R`` / ``"linear"``: linear attention (``attention_ext.linear_attention``, elu + 1
  features).
* ``C`` / ``"routing"``: the Routing Transformer's layer: half the heads local (as ``L``,
  with ``window``), half routing (:func:`attention_ext.routing_attention`, ``num_clusters``
  clusters of ``window`` tokens; k-means centroids updated by EMA in training only).
* ``P`` / ``"linformer"``: Linformer (keys and values projected along the sequence to
  ``proj_len`` rows by learned ``(proj_len, max_len)`` matrices); bidirectional only.

Every module takes ``backend="attention_ext"`` (our ops) or ``backend="sdpa"`` (the same
layer on PyTorch: ``F.scaled_dot_product_attention``, with a dense boolean mask for
windows, and a plain-PyTorch cumulative-sum form for linear layers), so the same weights
can be compared and timed on both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _content_layers, _layers
from . import alibi as _alibi
from . import functional as _fn
from . import linear as _linear
from ._na_modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D  # noqa: F401
from .decode import attention_with_kvcache
from .kvcache import KVCache

KINDS = {"G": "global", "L": "local", "R": "linear", "C": "routing", "P": "linformer"}
BACKENDS = ("attention_ext", "sdpa")


def _pattern_message(pattern, bad):
    if not bad:
        return (f"pattern must be a non-empty string of G (global), L (local), R (linear), C (routing), "
                f"P (linformer); got {pattern!r}")
    return (f"pattern {pattern!r} has unknown layer kinds {bad}; use G (global), L (local), R (linear), "
            "C (routing), P (linformer)")


def parse_pattern(pattern, num_layers=None):
    """``"LG"`` -> ``["local", "global"]`` repeated to ``num_layers`` (default: one per character)."""
    kinds = _layers.expand_pattern(pattern, num_layers, KINDS, _pattern_message)
    if not kinds:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return kinds


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half convention, as Llama) for ``(B, H, N, D)``."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x, offset=0, positions=None):
        """``positions``: ``(B or 1, N)`` token positions (packed documents restart at 0),
        instead of ``offset, offset + 1, ...``."""
        n = x.shape[-2]
        if positions is None:
            freqs = torch.outer(torch.arange(offset, offset + n, device=x.device, dtype=torch.float32),
                                self.inv_freq.to(x.device))
        else:  # (B, 1, N, D / 2): the same products as the outer product above
            freqs = (positions.to(x.device, torch.float32).unsqueeze(-1) * self.inv_freq.to(x.device)).unsqueeze(1)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _torch_linear(q, k, v, causal, eps=1e-6, state=None):
    """Reference linear attention (elu + 1 features) in plain PyTorch; returns (out, state)."""
    group = q.shape[1] // k.shape[1]
    fq, fk = F.elu(q.float()) + 1, F.elu(k.float()) + 1
    fk = fk.repeat_interleave(group, 1)
    vv = v.float().repeat_interleave(group, 1)
    S0 = z0 = None
    if state is not None:
        S0, z0 = (t.repeat_interleave(group, 1) for t in state)
    if causal:
        kv = torch.einsum("bhnd,bhne->bhnde", fk, vv).cumsum(2)
        z = fk.cumsum(2)
        if S0 is not None:
            kv, z = kv + S0.unsqueeze(2), z + z0.unsqueeze(2)
        num = torch.einsum("bhnd,bhnde->bhne", fq, kv)
        den = torch.einsum("bhnd,bhnd->bhn", fq, z).unsqueeze(-1)
        S, zf = kv[:, :, -1], z[:, :, -1]
    else:
        S, zf = torch.einsum("bhnd,bhne->bhde", fk, vv), fk.sum(2)
        if S0 is not None:
            S, zf = S + S0, zf + z0
        num, den = fq @ S, (fq @ zf.unsqueeze(-1))
    out = (num / (den + eps)).to(q.dtype)
    Hkv = k.shape[1]
    return out, (S.view(S.shape[0], Hkv, group, *S.shape[2:])[:, :, 0], zf.view(zf.shape[0], Hkv, group, -1)[:, :, 0])


class Attention(nn.Module):
    """Multi-head attention ``(B, N, embed_dim) -> (B, N, embed_dim)`` on attention_ext ops.

    Args:
        embed_dim, num_heads: model width and query heads (``head_dim = embed_dim // num_heads``
            unless given).
        num_kv_heads: K/V heads (GQA/MQA; ``num_heads % num_kv_heads == 0``), default num_heads.
            K/V are passed to the op with their own head count, never repeated.
        kind: ``"global"``, ``"local"``, ``"linear"``, ``"routing"`` or ``"linformer"``
            (see the module docstring).
        window: local reach, an int or ``(left, right)`` as in
            :func:`attention_ext.sliding_window_attention` (``kind="local"``); for
            ``kind="routing"`` an int: the local heads' reach and the tokens per cluster
            (capped at the sequence length).
        num_clusters: clusters of the routing heads (``kind="routing"``; ``num_heads`` even,
            ``num_kv_heads`` 1 or even: the first half of the heads is local).
        proj_len, max_len: Linformer's projected length and longest sequence
            (``kind="linformer"``, which needs ``causal=False``).
        causal: autoregressive masking (queries aligned bottom-right with a cache).
        bias: biases in the q/k/v/out projections.
        rope: rotary position embedding on q and k (``rope_base``), default True.
        position: how positions enter: ``"rope"`` (default, when ``rope``), ``"alibi"``
            (ALiBi biases with :func:`attention_ext.alibi_slopes`, no RoPE; softmax layers,
            decoding through a KVCache too) or ``"none"``.
        backend: ``"attention_ext"`` or ``"sdpa"`` (PyTorch built-ins, for comparisons).
        dropout: attention dropout on the probabilities in training (as
            ``nn.MultiheadAttention``'s ``dropout``; the kernels' ``dropout_p``), never in eval
            or cached decoding.

    ``forward(x, cache=None, cu_seqlens=None)``: pass a :class:`~attention_ext.KVCache` to
    decode incrementally (layer ``layer_idx`` of it; the caller advances it after every
    layer, as :class:`TransformerLM` does): the new keys/values are appended in place by
    :func:`attention_ext.attention_with_kvcache`, local layers into a ring of their window.
    A dict is the concatenating cache of the ``"sdpa"`` backend (transformers'
    DynamicCache's way): it keeps the keys/values (local layers the last ``left``), a linear
    layer's state and the RoPE offset. ``cu_seqlens`` (int32 ``(S+1,)`` or ``(B, S+1)``, as
    :func:`attention_ext.flash_attention`) packs documents along the sequence: RoPE positions
    restart at each document, and no query sees another document (softmax layers; not with
    a cache).
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kind="global", window=256, causal=True,
                 bias=False, rope=True, rope_base=10000.0, head_dim=None, backend="attention_ext", position=None,
                 num_clusters=None, proj_len=None, max_len=None, dropout=0.0):
        super().__init__()
        position = ("rope" if rope else "none") if position is None else position
        if position not in ("rope", "alibi", "none"):
            raise ValueError(f"position must be 'rope', 'alibi' or 'none', got {position!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        kind = KINDS.get(kind, kind) if isinstance(kind, str) and len(kind) == 1 else kind
        if kind not in KINDS.values():
            raise ValueError(f"kind must be one of {sorted(KINDS.values())}, got {kind!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        head_dim = head_dim or embed_dim // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1 (embed_dim={embed_dim}, num_heads={num_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.kind, self.causal, self.backend = kind, bool(causal), backend
        self.window = tuple(window) if isinstance(window, (tuple, list)) else window
        self.left, self.right = (_window_reach(self.window, self.causal) if kind in ("local", "routing")
                                 else (None, None))
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)
        if position == "alibi" and kind == "linear":
            raise ValueError("position='alibi' needs a softmax layer (kind 'global' or 'local')")
        self.position = position
        self.rope = RotaryEmbedding(head_dim, rope_base) if position == "rope" else None
        self.register_buffer("alibi", _alibi.alibi_slopes(num_heads) if position == "alibi" else None,
                             persistent=False)
        self.layer_idx = 0  # this layer's entry in a KVCache (TransformerLM numbers its layers)
        if kind == "routing":
            self.router = _content_layers.RoutingHeads(num_heads // 2, head_dim,
                                                       *_routing_args(num_heads, num_kv_heads, num_clusters, window))
        elif kind == "linformer":
            self.linformer = _content_layers.LinformerProjection(*_linformer_args(self.causal, proj_len, max_len))

    def extra_repr(self):
        w = f", window=({self.left}, {self.right})" if self.kind == "local" else ""
        return (f"kind={self.kind}{w}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, position={self.position}, backend={self.backend}")

    def forward(self, x, cache=None, cu_seqlens=None, context_parallel=None):
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        kv = isinstance(cache, KVCache)
        offset = 0 if cache is None else cache.lengths[0] if kv else cache.get("pos", 0)
        if context_parallel is not None:  # x is this rank's contiguous shard of the sequence
            from . import distributed

            offset = distributed.shard_offset(N, context_parallel, cache, cu_seqlens, self.backend)
        positions = None
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a cache")
            if self.kind in ("linear", "routing", "linformer"):
                raise NotImplementedError(f"cu_seqlens (packed documents) is not supported by {self.kind} layers")
            positions = _layers.document_positions(cu_seqlens, N)
        if self.rope is not None:
            q, k = self.rope(q, offset, positions), self.rope(k, offset, positions)
        if cache is not None and self.causal is False and (kv or cache.get("pos", 0)):
            raise ValueError("incremental decoding needs a causal layer")
        if context_parallel is not None:
            out = distributed.layer_attention(self, q, k, v, context_parallel)
        elif self.kind in ("routing", "linformer"):
            if cache is not None:
                raise NotImplementedError(f"{self.kind} layers do not decode with a cache")
            out = self._content(q, k, v)
        elif self.kind == "linear":
            out = self._linear(q, k, v, cache.extra[self.layer_idx] if kv else cache)
        elif kv:
            out = self._cached(q, k, v, cache)
        else:
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat((cache["k"], k), 2), torch.cat((cache["v"], v), 2)
                keep = k.shape[2] if self.kind == "global" else min(k.shape[2], self.left)
                cache["k"], cache["v"] = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
            out = self._softmax(q, k, v, cu_seqlens)
        if cache is not None and not kv:
            cache["pos"] = offset + N
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))

    def _softmax(self, q, k, v, cu_seqlens=None):
        p = self.dropout if self.training else 0.0
        if self.backend == "attention_ext":
            kw = dict(causal=self.causal, cu_seqlens=cu_seqlens, alibi_slopes=self.alibi, dropout_p=p)
            if self.kind == "global":
                return _fn.flash_attention(q, k, v, **kw)
            return _fn.sliding_window_attention(q, k, v, (self.left, self.right), **kw)
        gqa = self.num_heads != self.num_kv_heads
        nq, nk = q.shape[2], k.shape[2]
        if (self.kind == "global" and cu_seqlens is None and self.alibi is None
                and (not self.causal or nq == nk or nq == 1)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and nq > 1, enable_gqa=gqa, dropout_p=p)
        left, right = (self.left, self.right) if self.kind == "local" else (None, None)
        mask = _layers.band_mask(nq, nk, causal=self.causal, left=left, right=right, device=q.device)
        if cu_seqlens is not None:  # no cache: nq == nk, and the band on indices is the band inside documents
            mask = mask & _layers.document_mask(cu_seqlens, nk)
        if self.alibi is not None:  # dense additive bias -slope * |p - j| (p aligned bottom-right)
            dist = (torch.arange(nq, device=q.device)[:, None] + (nk - nq) - torch.arange(nk, device=q.device)).abs()
            bias = -self.alibi.to(q.device)[:, None, None] * dist
            mask = torch.where(mask, bias, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, dropout_p=p)

    def _content(self, q, k, v):
        """Routing (local first half of the heads, routing second half) or Linformer."""
        if self.kind == "linformer":
            return self.linformer(q, k, v, self.backend)
        h, hkv = self.num_heads // 2, max(1, self.num_kv_heads // 2)
        kl, vl = k[:, :hkv], v[:, :hkv]
        kr, vr = (k, v) if self.num_kv_heads == 1 else (k[:, hkv:], v[:, hkv:])
        if self.backend == "attention_ext":
            local = _fn.sliding_window_attention(q[:, :h], kl, vl, (self.left, self.right), causal=self.causal)
        else:
            mask = _layers.band_mask(q.shape[2], k.shape[2], causal=self.causal, left=self.left, right=self.right,
                                     device=q.device)
            local = F.scaled_dot_product_attention(q[:, :h], kl, vl, attn_mask=mask, enable_gqa=h != hkv)
        return torch.cat((local, self.router(q[:, h:], kr, vr, self.causal, self.backend)), 1)

    def _cached(self, q, k, v, cache):
        window = (self.left, 0) if self.kind == "local" else None
        if cache.windows[self.layer_idx] != window:
            raise ValueError(f"layer {self.layer_idx}: the KVCache has window {cache.windows[self.layer_idx]}, "
                             f"the layer {window}")
        return attention_with_kvcache(q, **cache.update(self.layer_idx, k, v), causal=True, alibi_slopes=self.alibi)

    def _linear(self, q, k, v, cache):
        state = None if cache is None else cache.get("state")
        if self.backend == "sdpa":
            out, new = _torch_linear(q, k, v, self.causal, state=state)
        else:
            if state is None:
                out, new = _linear.linear_attention(q, k, v, feature_map="elu", causal=self.causal, return_state=True)
            else:
                out, new = _linear.linear_attention_step(q, k, v, state, feature_map="elu")
        if cache is not None:
            cache["state"] = new
        return out


def _window_reach(window, causal):
    from . import _checks

    return _checks.window(window, causal, "Attention")


def _routing_args(num_heads, num_kv_heads, num_clusters, window):
    from . import _checks

    if num_heads % 2 or num_kv_heads not in (1,) and num_kv_heads % 2:
        raise ValueError(f"kind='routing' splits the heads in half: num_heads ({num_heads}) must be even and "
                         f"num_kv_heads ({num_kv_heads}) 1 or even")
    if num_clusters is None:
        raise ValueError("kind='routing' needs num_clusters")
    return (_checks.integer(num_clusters, "num_clusters", "Attention", minimum=1),
            _checks.integer(window, "window", "Attention", minimum=1))


def _linformer_args(causal, proj_len, max_len):
    from . import _checks

    if causal:
        raise ValueError("kind='linformer' is bidirectional only: pass causal=False")
    if proj_len is None or max_len is None:
        raise ValueError("kind='linformer' needs proj_len and max_len")
    return (_checks.integer(proj_len, "proj_len", "Attention", minimum=1),
            _checks.integer(max_len, "max_len", "Attention", minimum=1))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, dim, hidden, bias=False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim, num_heads, *, kind="global", mlp_hidden=None, **attn_kwargs):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, kind=kind, **attn_kwargs)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = MLP(dim, mlp_hidden or 4 * dim)

    def forward(self, x, cache=None, cu_seqlens=None, context_parallel=None):
        x = x + self.attn(self.attn_norm(x), cache=cache, cu_seqlens=cu_seqlens, context_parallel=context_parallel)
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    """A small decoder-only LM whose layers follow ``pattern``.

    ``pattern`` is a string of ``G`` (global), ``L`` (local), ``R`` (linear), ``C``
    (routing) and ``P`` (linformer) repeated from layer 0 to ``num_layers`` (default
    ``len(pattern)``): ``"LG"`` alternates, ``"LLLLLG"`` is Gemma 3's 5:1, ``"LLG"``
    ModernBERT's 2:1, ``"G"`` all global. Other keyword arguments (``num_clusters``,
    ``proj_len``, ``max_len``) go to every layer's :class:`Attention`; a ``P`` layer needs
    ``causal=False``, and ``C``/``P`` layers do not decode with a cache.

    ``forward(idx, targets=None, caches=None, *, cu_seqlens=None, position_ids=None)``
    returns ``(logits, loss)`` (loss is None without targets; cross entropy over all
    positions, ``ignore_index=-100``: put -100 where a document's last token would predict
    the next document's first). Packed documents: ``cu_seqlens`` (int32 ``(S+1,)`` or
    ``(B, S+1)``, see :class:`Attention`) or ``position_ids`` (``(N,)`` or ``(B, N)``, 0 at
    each document start, as ``DataCollatorWithFlattening`` makes them); each document then
    gives the logits it gives alone. ``context_parallel=group``: ``idx`` is this rank's
    contiguous shard of the sequence (:func:`attention_ext.distributed.shard_sequence`
    with ``dim=1``), the layers attend across the group (ring / halo / state scan) and the
    logits (and loss: the mean over this shard) are this shard's.
    ``generate(idx, max_new_tokens)`` decodes greedily (or samples with
    ``temperature > 0``) with a cache from :meth:`new_caches`: a
    :class:`~attention_ext.KVCache` (``"attention_ext"``: nothing is concatenated, local
    layers roll), or per-layer dicts (``"sdpa"``). With a KVCache, ``forward`` feeds the
    tokens in chunks of ``caches.chunk`` and advances the cache once per chunk.
    """

    def __init__(self, vocab_size, dim=256, num_heads=4, *, pattern="LG", num_layers=None, num_kv_heads=None,
                 window=256, causal=True, mlp_hidden=None, bias=False, rope=True, backend="attention_ext",
                 tie_embeddings=True, **layer_kwargs):
        super().__init__()
        self.kinds = parse_pattern(pattern, num_layers)
        self.pattern = pattern.upper()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, kind=kind, mlp_hidden=mlp_hidden, num_kv_heads=num_kv_heads,
                             window=window, causal=causal, bias=bias, rope=rope, backend=backend, **layer_kwargs)
            for kind in self.kinds)
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        for i, block in enumerate(self.blocks):
            block.attn.layer_idx = i
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_backend(self, backend):
        """Switch every layer between ``"attention_ext"`` and ``"sdpa"`` (same weights)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for b in self.blocks:
            b.attn.backend = backend
        return self

    def forward(self, idx, targets=None, caches=None, *, cu_seqlens=None, position_ids=None, context_parallel=None):
        if position_ids is not None:
            if cu_seqlens is not None:
                raise ValueError("pass cu_seqlens or position_ids, not both")
            cu_seqlens = _layers.cu_seqlens(position_ids.view(-1, idx.shape[1]) == 0)
            if position_ids.dim() == 1:  # one packing for every row
                cu_seqlens = cu_seqlens[0]
        x = self.embed(idx)
        if isinstance(caches, KVCache):
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a cache")
            x = self._cached_blocks(x, caches)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, None if caches is None else caches[i], cu_seqlens, context_parallel)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss

    def _cached_blocks(self, x, cache):
        parts = []
        for chunk in x.split(cache.chunk, dim=1):  # a rolling layer's ring holds its window and one chunk
            for block in self.blocks:
                chunk = block(chunk, cache)
            cache.advance(chunk.shape[1])
            parts.append(chunk)
        return torch.cat(parts, 1)

    def new_caches(self, batch_size=1, max_len=None, **kwargs):
        """The cache of :meth:`forward`: for ``"attention_ext"`` layers a
        :class:`~attention_ext.KVCache` of ``batch_size`` rows of up to ``max_len`` tokens
        (``kwargs``: its ``page_size``, ``rolling``, ``chunk``, ...), local layers' windows
        and no K/V for linear layers; for ``"sdpa"`` one dict per layer (arguments unused)."""
        attns = [b.attn for b in self.blocks]
        if any(a.backend == "sdpa" for a in attns):
            return [dict() for _ in self.blocks]
        windows = [False if a.kind == "linear" else (a.left, 0) if a.kind == "local" else None for a in attns]
        w = self.embed.weight
        return KVCache(batch_size, attns[0].num_kv_heads, attns[0].head_dim, max_len, windows=windows,
                       dtype=w.dtype, device=w.device, **kwargs)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *, temperature=0.0, generator=None, caches=None):
        """``caches``: a fresh cache of :meth:`new_caches` (default: one for this call)."""
        if caches is None:
            caches = self.new_caches(idx.shape[0], idx.shape[1] + max_new_tokens)
        logits, _ = self(idx, caches=caches)
        out = [idx]
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator)
            else:
                nxt = last.argmax(-1, keepdim=True)
            out.append(nxt)
            logits, _ = self(nxt, caches=caches)
        return torch.cat(out, 1)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())
