"""Block layouts for :func:`attention_ext.block_sparse_attention`.

Every builder returns a bool tensor ``(num_heads, nqb, nkb)`` with
``nqb = nkb = ceil(seq_len / block_size)``: entry ``[h, qb, kb]`` lets query block
``qb`` attend to key block ``kb`` in head ``h``. Patterns that are autoregressive set
only blocks with ``kb <= qb``; pass ``causal=True`` to block_sparse_attention as well so
that the diagonal blocks are masked per element.
"""

import torch

from . import _checks


def _blocks(seq_len, block_size, fn):
    seq_len = _checks.integer(seq_len, "seq_len", fn, minimum=1)
    block_size = _checks.integer(block_size, "block_size", fn, minimum=1)
    return -(-seq_len // block_size)


def _grid(n):
    qb = torch.arange(n).view(-1, 1)
    kb = torch.arange(n).view(1, -1)
    return qb, kb


def bigbird(seq_len, block_size=64, *, num_window_blocks=3, num_global_blocks=2, num_random_blocks=3,
            num_heads=1, seed=0):
    """BigBird (ITC): a band of ``num_window_blocks`` blocks centred on the diagonal, the
    first ``num_global_blocks`` blocks global (attend to and attended by all), and
    ``num_random_blocks`` further random key blocks per query block, drawn per head
    from a generator seeded with ``seed`` (same seed, same layout)."""
    fn = "bigbird"
    n = _blocks(seq_len, block_size, fn)
    w = _checks.integer(num_window_blocks, "num_window_blocks", fn, minimum=1)
    if w % 2 == 0:
        raise ValueError(f"{fn}: num_window_blocks must be odd (a band centred on the diagonal), got {w}")
    g = _checks.integer(num_global_blocks, "num_global_blocks", fn, minimum=0)
    r = _checks.integer(num_random_blocks, "num_random_blocks", fn, minimum=0)
    h = _checks.integer(num_heads, "num_heads", fn, minimum=1)
    seed = _checks.integer(seed, "seed", fn)
    qb, kb = _grid(n)
    base = (qb - kb).abs() <= w // 2
    base |= (qb < g) | (kb < g)
    gen = torch.Generator().manual_seed(seed)
    layout = base.unsqueeze(0).repeat(h, 1, 1)
    for head in range(h):
        for row in range(g, n):
            free = (~layout[head, row]).nonzero().flatten()
            if r and free.numel():
                pick = free[torch.randperm(free.numel(), generator=gen)[:r]]
                layout[head, row, pick] = True
    return layout


def _split_or_union(a, b, num_heads, fn):
    h = _checks.integer(num_heads, "num_heads", fn, minimum=1)
    if h == 1:
        return (a | b).unsqueeze(0)
    return torch.stack([a if i % 2 == 0 else b for i in range(h)])


def strided(seq_len, block_size=64, *, stride=4, causal=True, num_heads=1):
    """Sparse Transformer "strided" factorisation at block granularity: a local part
    (the ``stride`` most recent blocks) and a strided part (blocks ``stride`` apart).
    With ``num_heads == 1`` the union; otherwise even heads local, odd heads strided
    (the factorised heads of Child et al., 2019)."""
    fn = "strided"
    n = _blocks(seq_len, block_size, fn)
    stride = _checks.integer(stride, "stride", fn, minimum=1)
    causal = _checks.boolean(causal, "causal", fn)
    qb, kb = _grid(n)
    d = qb - kb
    local = (d >= 0) & (d < stride) if causal else d.abs() < stride
    strided_part = d % stride == 0
    if causal:
        strided_part &= d >= 0
    return _split_or_union(local, strided_part, num_heads, fn)


def fixed(seq_len, block_size=64, *, stride=4, num_summary_blocks=1, causal=True, num_heads=1):
    """Sparse Transformer "fixed" factorisation at block granularity: blocks attend within
    their chunk of ``stride`` blocks, and to the last ``num_summary_blocks`` blocks of
    every chunk (the summary positions). Heads combine as in :func:`strided`."""
    fn = "fixed"
    n = _blocks(seq_len, block_size, fn)
    stride = _checks.integer(stride, "stride", fn, minimum=1)
    c = _checks.integer(num_summary_blocks, "num_summary_blocks", fn, minimum=1)
    if c > stride:
        raise ValueError(f"{fn}: num_summary_blocks ({c}) must not exceed stride ({stride})")
    causal = _checks.boolean(causal, "causal", fn)
    qb, kb = _grid(n)
    chunk = qb // stride == kb // stride
    summary = (kb % stride) >= stride - c
    if causal:
        chunk &= kb <= qb
        summary = summary & (kb <= qb)
    else:
        summary = summary.expand(n, n)
    return _split_or_union(chunk, summary, num_heads, fn)


def longformer(seq_len, block_size=64, *, window_blocks=1, global_blocks=1, causal=False, num_heads=1):
    """Longformer at block granularity: a band of ``window_blocks`` blocks on each side of
    the diagonal plus ``global_blocks`` leading blocks that attend to and are attended by
    all. For token-exact windows and global tokens use
    :func:`attention_ext.sliding_window_attention` with ``global_tokens``."""
    fn = "longformer"
    n = _blocks(seq_len, block_size, fn)
    w = _checks.integer(window_blocks, "window_blocks", fn, minimum=0)
    g = _checks.integer(global_blocks, "global_blocks", fn, minimum=0)
    causal = _checks.boolean(causal, "causal", fn)
    h = _checks.integer(num_heads, "num_heads", fn, minimum=1)
    qb, kb = _grid(n)
    d = qb - kb
    layout = ((d >= 0) & (d <= w)) if causal else d.abs() <= w
    layout = layout | (qb < g) | (kb < g)
    if causal:
        layout &= kb <= qb
    return layout.unsqueeze(0).repeat(h, 1, 1)
