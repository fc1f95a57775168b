"""NATTEN-style neighborhood attention modules (``attention_ext.nn.NeighborhoodAttention1D/2D/3D``):
``(B, *spatial, C)`` in and out, a ``qkv`` projection and a ``proj`` projection under NATTEN's
names, so NAT / DiNAT-style models (and their state dicts) can swap them in."""

from torch import nn

from . import _neighborhood
from . import functional as _fn


class _NeighborhoodAttention(nn.Module):
    na_dim = 0

    def __init__(self, dim, num_heads, kernel_size, dilation=1, stride=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0):
        super().__init__()
        name = type(self).__name__
        if isinstance(dim, bool) or not isinstance(dim, int) or isinstance(num_heads, bool) or \
                not isinstance(num_heads, int):
            raise TypeError(f"{name}: dim and num_heads must be ints, got {dim!r}, {num_heads!r}")
        if num_heads < 1 or dim < 1 or dim % num_heads != 0:
            raise ValueError(f"{name}: num_heads ({num_heads}) must divide dim ({dim})")
        nd = self.na_dim
        self.kernel_size = _neighborhood.per_dim(kernel_size, "kernel_size", nd, name)
        self.dilation = _neighborhood.per_dim(dilation, "dilation", nd, name)
        self.stride = _neighborhood.per_dim(stride, "stride", nd, name)
        self.is_causal = _neighborhood.per_dim(is_causal, "is_causal", nd, name, boolean=True)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        name, nd = type(self).__name__, self.na_dim
        if x.dim() != nd + 2 or x.shape[-1] != self.dim:
            raise ValueError(f"{name}: x must be (batch, {nd} spatial dims, dim={self.dim}), got shape "
                             f"{tuple(x.shape)}")
        B, *spatial, C = x.shape
        # (B, *spatial, 3, H, hd) -> 3 x (B, H, *spatial, hd)
        qkv = self.qkv(x).reshape(B, *spatial, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(nd + 1, 0, nd + 2, *range(1, nd + 1), nd + 3).unbind(0)
        out = _fn.neighborhood_attention(q, k, v, self.kernel_size, dilation=self.dilation, stride=self.stride,
                                         causal=self.is_causal, scale=self.scale)
        out = out.movedim(1, nd + 1).reshape(B, *spatial, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, is_causal={self.is_causal}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """Neighborhood attention over ``(B, L, dim)`` (NATTEN's ``NeighborhoodAttention1D``):
    ``kernel_size``, ``dilation``, ``stride``, ``is_causal`` as in
    :func:`attention_ext.neighborhood_attention` (an int / bool or a 1-tuple)."""

    na_dim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """Neighborhood attention over ``(B, H, W, dim)`` (NATTEN's ``NeighborhoodAttention2D``);
    per-dim arguments are an int / bool or a 2-tuple."""

    na_dim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """Neighborhood attention over ``(B, D, H, W, dim)`` (NATTEN's ``NeighborhoodAttention3D``);
    per-dim arguments are an int / bool or a 3-tuple."""

    na_dim = 3
