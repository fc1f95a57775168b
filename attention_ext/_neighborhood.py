"""Neighborhood attention on a 1-3-D token grid (NATTEN's semantics): the per-dimension
arguments' checks and the token order the kernels read (csrc/common/mask.h, ``na_nd > 0``).

The order: along each dim, every dilation group (coordinates with the same ``x % dilation``)
becomes a contiguous run, each run is cut into boxes of ``tile`` tokens, and tokens are
ordered box by box (lexicographically over dims), row-major inside a box. One kernel tile is
then one box of one dilation group: NATTEN's dilated window is an undilated interval there,
and tile pairs that share no neighbor are skipped whole. q, k, v are gathered into this
order and the output (and lse) gathered back.
"""

import torch

from . import _checks

# tile edges per number of spatial dims: 64 tokens, a box as close to a cube as fits
TILES = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}


def per_dim(value, name, nd, fn, *, boolean=False):
    """An int (a bool for ``boolean``) or a tuple of one per spatial dim -> a tuple of nd."""
    many = isinstance(value, (tuple, list))
    if many and len(value) != nd:
        raise ValueError(f"{fn}: {name} must be {'a bool' if boolean else 'an int'} or a tuple of {nd} (one per "
                         f"spatial dim), got {tuple(value)!r} of length {len(value)}")
    values = tuple(value) if many else (value,) * nd
    for d, x in enumerate(values):
        label = f"{name}[{d}]" if many else name
        if boolean:
            _checks.boolean(x, label, fn)
        else:
            _checks.integer(x, label, fn, minimum=1)
    return tuple(bool(x) if boolean else int(x) for x in values)


def check_against_extents(spatial, kernel_size, dilation, stride, fn):
    """NATTEN's limits (natten/utils/checks.py: check_args_against_input), per dim."""
    for d, (n, k, dil, s) in enumerate(zip(spatial, kernel_size, dilation, stride)):
        if k > n:
            raise ValueError(f"{fn}: kernel_size[{d}] = {k} exceeds the extent {n} of spatial dim {d}")
        if k * dil > n:
            raise ValueError(f"{fn}: kernel_size[{d}] * dilation[{d}] = {k} * {dil} = {k * dil} exceeds the extent "
                             f"{n} of spatial dim {d}")
        if s > k:
            raise ValueError(f"{fn}: stride[{d}] = {s} exceeds kernel_size[{d}] = {k}")


def tile_shape(spatial, dilation):
    """Box edges: TILES, no longer than a dilation group."""
    return tuple(min(t, -(-n // dil)) for t, n, dil in zip(TILES[len(spatial)], spatial, dilation))


def _layout_order(spatial, dilation, tile, device):
    """order[k]: the row-major index of the token at position k of the tile-major order."""
    coords = torch.meshgrid(*[torch.arange(n, device=device) for n in spatial], indexing="ij")
    boxes, locals_ = [], []
    for x, n, dil, t in zip(coords, spatial, dilation, tile):
        x = x.reshape(-1)
        g, i = x % dil, x // dil
        start = g * (n // dil) + torch.clamp(g, max=n % dil)  # first x' of the dilation group
        boxes.append(start + i // t * t)
        locals_.append(i % t)
    key = torch.zeros_like(boxes[0])
    for b, n in zip(boxes, spatial):
        key = key * n + b
    for l, t in zip(locals_, tile):
        key = key * t + l
    return torch.argsort(key)


_ORDERS = {}


def orders(spatial, dilation, tile, device):
    """(order, inverse) index tensors on device, cached (built afresh while compiling)."""
    cache_key = (spatial, dilation, tile, str(device))
    if not torch.compiler.is_compiling() and cache_key in _ORDERS:
        return _ORDERS[cache_key]
    order = _layout_order(spatial, dilation, tile, device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    if not torch.compiler.is_compiling():
        if len(_ORDERS) > 64:
            _ORDERS.clear()
        _ORDERS[cache_key] = order, inverse
    return order, inverse


def gather(t, index):
    """t[:, :, index] for t (B, H, N, ...): as rows of a (B * H, N, ...) view, which
    index_select runs ~10x faster than along dim 2 of the 4-D tensor."""
    B, H, N = t.shape[:3]
    return t.reshape(B * H, N, *t.shape[3:]).index_select(1, index).view(t.shape)


def is_identity(spatial, dilation):
    """The order is the row-major one: a 1-D grid without dilation."""
    return len(spatial) == 1 and dilation[0] == 1


def grid_qkv(q, k, v, fn):
    """q (B, Hq, *spatial, D), k/v (B, Hkv, *spatial, D / Dv) with 1-3 spatial dims -> spatial."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(t, name)
        if not 4 <= t.dim() <= 6:
            raise ValueError(f"{fn}: {name} must be 4-D to 6-D (batch, heads, *spatial, head_dim) with 1 to 3 "
                             f"spatial dims, got shape {tuple(t.shape)}")
        if t.dim() != q.dim():
            raise ValueError(f"{fn}: {name} must be {q.dim()}-D like q, got shape {tuple(t.shape)}")
    spatial = tuple(q.shape[2:-1])
    if len(spatial) == 1:  # v against k: the flat checks (_checks.qkv)
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"{fn}: q and k must have the same sequence length, got Nq={q.shape[2]}, "
                             f"Nk={k.shape[2]}")
        return spatial
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape[2:-1]) != spatial:
            raise ValueError(f"{fn}: {name} spatial shape {tuple(t.shape[2:-1])} must equal q's {spatial}")
    return spatial
