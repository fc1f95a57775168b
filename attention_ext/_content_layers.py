"""The parts of ``nn.Attention`` for its ``"routing"`` and ``"linformer"`` kinds: the
routing heads with their k-means centroids, and Linformer's sequence projections. Each has
the attention_ext path and a plain-PyTorch one (``backend="sdpa"``) for comparisons."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import routing as _routing
from .functional import flash_attention


def _routing_sdpa(q, k, v, centroids, window, causal):
    """The same routed attention as :func:`attention_ext.routing_attention` on PyTorch's
    SDPA, cluster by cluster (batched ``(window, window)`` masks, never N x N)."""
    B, H, Nq, D = q.shape
    Nk, C = k.shape[2], centroids.shape[1]
    q_idx, k_idx = _routing.routing_assignment(q, k, centroids, window)
    qg = _routing._take(q, q_idx.view(B, H, -1), H).view(B, H, C, window, D)
    kg, vg = (_routing._take(t, k_idx.view(B, H, -1), H).view(B, H, C, window, -1) for t in (k, v))
    mask = None
    if causal:
        mask = k_idx.unsqueeze(-2) <= (q_idx + (Nk - Nq)).unsqueeze(-1)
        empty = ~mask.any(-1, keepdim=True)
        mask = mask | empty  # no NaN rows; their outputs are zeroed below
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)
    if causal:
        out = out.masked_fill(empty, 0.0)
    return _routing._scatter_mean(out.reshape(B, H, C * window, -1), q_idx.view(B, H, -1), Nq)


class RoutingHeads(nn.Module):
    """Routing attention for ``num_heads`` heads, with the centroids ``(num_heads,
    num_clusters, head_dim)`` as a buffer (saved with the model, not a parameter).

    In training mode every forward moves the centroids by an exponential moving average
    towards the k-means update of the batch (lucidrains/routing-transformer's ``Kmeans``):
    every query and key (unit-normalised) goes to its nearest centroid; a cluster's new mean
    is the normalised sum of its tokens (a cluster with none keeps its centroid); then
    ``centroids = decay * centroids + (1 - decay) * new``. In eval mode they never move.
    Routing (and the update) read q and k as the layer attends with them, after RoPE."""

    def __init__(self, num_heads, head_dim, num_clusters, window, decay=0.999):
        super().__init__()
        self.window, self.decay = window, decay
        self.register_buffer("centroids", F.normalize(torch.randn(num_heads, num_clusters, head_dim), dim=-1))

    def extra_repr(self):
        H, C, _ = self.centroids.shape
        return f"heads={H}, num_clusters={C}, window={self.window}, decay={self.decay}"

    def forward(self, q, k, v, causal, backend):
        window = min(self.window, q.shape[2], k.shape[2])
        if backend == "sdpa":
            out = _routing_sdpa(q, k, v, self.centroids, window, causal)
        else:
            out = _routing.routing_attention(q, k, v, self.centroids, window=window, causal=causal)
        if self.training:
            self.update(q, k)
        return out

    @torch.no_grad()
    def update(self, q, k):
        """One EMA k-means step from the tokens of q ``(B, H, Nq, D)`` and k ``(B, Hkv, Nk, D)``."""
        H, C, D = self.centroids.shape
        sums = torch.zeros(H, C, D, dtype=torch.float32, device=q.device)
        counts = torch.zeros(H, C, dtype=torch.float32, device=q.device)
        for x in (q, k):
            B, Hx, N, _ = x.shape
            nearest = _routing.cluster_scores(x, self.centroids).argmax(-2)  # (B, H, N)
            onehot = F.one_hot(nearest, C).float().view(B, Hx, H // Hx, N, C)
            xn = F.normalize(x.float(), dim=-1)
            sums += torch.einsum("bxgnc,bxnd->xgcd", onehot, xn).reshape(H, C, D)
            counts += onehot.sum((0, 3)).reshape(H, C)
        new = torch.where(counts.unsqueeze(-1) > 0, F.normalize(sums, dim=-1), self.centroids.float())
        self.centroids.mul_(self.decay).add_(new.to(self.centroids.dtype), alpha=1 - self.decay)


class LinformerProjection(nn.Module):
    """Linformer (Wang et al. 2020): learned ``E``, ``F`` of shape ``(proj_len, max_len)``
    (shared by the heads) map the keys and values along the sequence to ``proj_len`` rows,
    ``K' = E K``, ``V' = F V``; exact attention then runs on ``(N, proj_len)``. A sequence of
    ``N < max_len`` tokens uses the first ``N`` columns. Bidirectional only. In
    ``nn.Attention`` RoPE (when on) rotates q and k before the projection."""

    def __init__(self, proj_len, max_len):
        super().__init__()
        bound = 1.0 / math.sqrt(proj_len)  # lucidrains/linformer's uniform init
        self.E = nn.Parameter(torch.empty(proj_len, max_len).uniform_(-bound, bound))
        self.F = nn.Parameter(torch.empty(proj_len, max_len).uniform_(-bound, bound))

    def extra_repr(self):
        return f"proj_len={self.E.shape[0]}, max_len={self.E.shape[1]}"

    def project(self, k, v):
        """``(B, Hkv, N, D)`` keys/values -> ``(B, Hkv, proj_len, D)``."""
        n = k.shape[2]
        if n > self.E.shape[1]:
            raise ValueError(f"linformer: the sequence ({n} tokens) is longer than max_len={self.E.shape[1]}")
        E, F_ = self.E[:, :n].to(k.dtype), self.F[:, :n].to(v.dtype)
        return torch.einsum("kn,bhnd->bhkd", E, k), torch.einsum("kn,bhnd->bhkd", F_, v)

    def forward(self, q, k, v, backend):
        k, v = self.project(k, v)
        if backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
        return flash_attention(q, k, v)
