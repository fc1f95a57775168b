"""What ``attention_ext.nn`` and ``attention_ext.hf`` both need about layers: expanding a
layer-pattern string, and the dense bool mask of a causal/window layer (for the paths
that run on PyTorch math instead of the kernels)."""

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
    if left is not None:
        allowed &= pos - j <= left
    if right is not None:
        allowed &= j - pos <= right
    return allowed
