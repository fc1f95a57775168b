"""What ``attention_ext.nn`` and ``attention_ext.hf`` both need about layers: expanding a
layer-pattern string, packed documents as ``cu_seqlens``, and the dense bool masks of a
causal/window layer and of packed documents (for the paths that run on PyTorch math
instead of the kernels)."""

from __future__ import annotations

import torch


def expand_pattern(pattern, num_layers, kinds, message):
    """The kinds of ``num_layers`` layers (default ``len(pattern)``): ``pattern`` repeats
    from layer 0, one character per layer (case-insensitive), ``kinds`` maps a character to
    its kind. A pattern that is not a non-empty string of those characters raises
    ``ValueError(message(pattern, bad))``, ``bad`` the sorted unknown characters (empty when
    the pattern is not a string or is empty). ``num_layers < 1`` gives ``[]``."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(message(pattern, []))
    p = pattern.upper()
    bad = sorted(set(p) - set(kinds))
    if bad:
        raise ValueError(message(pattern, bad))
    n = len(p) if num_layers is None else int(num_layers)
    return [kinds[p[i % len(p)]] for i in range(n)]


def band_mask(nq, nk, *, causal, left=None, right=None, device=None):
    """Bool ``(nq, nk)``: query ``i`` (at key position ``i + nk - nq``, bottom-right aligned)
    may see key ``j`` when ``pos - left <= j <= pos + right`` (``None``: no bound) and, when
    causal, ``j <= pos``."""
    pos = torch.arange(nq, device=device).view(-1, 1) + (nk - nq)
    j = torch.arange(nk, device=device).view(1, -1)
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= pos
    # bounds as (nq, 1) columns: the comparisons broadcast straight to bool, with no int64 nq x nk temporary
    if left is not None:
        allowed &= j >= pos - left
    if right is not None:
        allowed &= j <= pos + right
    return allowed


def cu_seqlens(starts):
    """int32 ``(B, S+1)`` document boundaries (the kernels' ``cu_seqlens``) from bool
    ``(B, N)`` document starts; token 0 always starts one. ``S`` is the most documents in a
    row; a row with fewer repeats ``N`` at its end."""
    starts = starts.clone()
    starts[:, 0] = True
    doc = starts.cumsum(1) - 1  # the document of each token
    lengths = torch.zeros(starts.shape[0], int(doc[:, -1].max()) + 1, dtype=torch.int32, device=starts.device)
    lengths.scatter_add_(1, doc, torch.ones_like(doc, dtype=torch.int32))
    return torch.nn.functional.pad(lengths.cumsum(1, dtype=torch.int32), (1, 0))


def _documents(cu_seqlens, n):
    """``(cu (B, S+1), doc (B, n))``: the document of each of ``n`` tokens (``B`` is 1 for
    ``(S+1,)`` boundaries)."""
    cu = cu_seqlens.view(-1, cu_seqlens.shape[-1])
    tokens = torch.arange(n, device=cu.device, dtype=cu.dtype).expand(cu.shape[0], n).contiguous()
    return cu, torch.searchsorted(cu[:, 1:].contiguous(), tokens, right=True)


def document_positions(cu_seqlens, n):
    """Long ``(B, n)``: each token's position inside its document of ``cu_seqlens``
    (``(S+1,)`` gives ``B = 1``), 0 at every document start."""
    cu, doc = _documents(cu_seqlens, n)
    return torch.arange(n, device=cu.device) - cu.gather(1, doc).long()


def document_mask(cu_seqlens, n):
    """Bool ``(B, 1, n, n)``: query and key in the same document of ``cu_seqlens``
    (``(S+1,)`` gives ``B = 1``)."""
    _, doc = _documents(cu_seqlens, n)
    return (doc.unsqueeze(-1) == doc.unsqueeze(-2)).unsqueeze(1)
