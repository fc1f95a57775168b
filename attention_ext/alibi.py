"""ALiBi slopes (Press et al., "Train Short, Test Long"), for the ``alibi_slopes`` argument
of the exact-attention functions."""

import math

import torch


def _geometric(n):
    # n a power of two: start = ratio = 2^(-8 / n)
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]


def _slopes(n):
    if math.log2(n).is_integer():
        return _geometric(n)
    # the paper's rule otherwise: the slopes of the closest smaller power of two, then every
    # other slope of the next power of two
    p = 2 ** math.floor(math.log2(n))
    return _geometric(p) + _slopes(2 * p)[0::2][: n - p]


def alibi_slopes(num_heads, *, device=None):
    """The paper's per-head ALiBi slopes, float32 ``(num_heads,)``: the geometric sequence
    ``2^(-8/n), 2^(-16/n), ...`` for a power of two ``n``, and for other head counts the
    slopes of the closest smaller power of two followed by every other slope of the next
    one (as the reference implementation's ``get_slopes`` and transformers' BLOOM / MPT
    build them). Pass them as ``alibi_slopes=`` (they get no gradient)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")
    return torch.tensor(_slopes(num_heads), dtype=torch.float32, device=device)
