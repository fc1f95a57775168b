"""Routing attention (Roy et al., "Efficient Content-Based Sparse Attention with Routing
Transformers", TACL 2021): queries and keys are routed to clusters by content, and exact
attention runs inside each cluster on the packed-sequence kernels (one cluster, one
document), so nothing of size N x N is ever built, forward or backward.

The assignment follows the paper's balanced variant as lucidrains/routing-transformer
implements it (``KmeansAttention``: ``distribution`` = top-k along the sequence, outputs
combined with ``scatter_mean``): each cluster takes the ``window`` queries and the
``window`` keys that score highest against its centroid.
"""

import torch
import torch.nn.functional as F

from . import _checks
from .functional import flash_attention


def cluster_scores(x, centroids):
    """Cosine similarity of every token with every centroid: ``x`` ``(B, Hx, N, D)``,
    ``centroids`` ``(H, C, D)`` with ``H % Hx == 0`` (head ``h`` of the centroids scores the
    tokens of x's head ``h // (H // Hx)``, so GQA keys are never repeated) -> ``(B, H, C, N)``
    in at least float32. Computed without gradient: the assignment is discrete."""
    B, Hx, N, D = x.shape
    H, C, _ = centroids.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.no_grad():
        xn = F.normalize(x.to(dtype), dim=-1)
        cn = F.normalize(centroids.to(dtype), dim=-1).view(Hx, H // Hx, C, D)
        return torch.einsum("bxnd,xgcd->bxgcn", xn, cn).reshape(B, H, C, N)


def _top(scores, window):
    """Each cluster's ``window`` best tokens, in position order: ``(B, H, C, window)`` int64."""
    return scores.topk(window, dim=-1).indices.sort(-1).values


def _check(q, k, v, centroids, window, causal, shared_qk, scale, fn):
    _, Hq, _, Nq, Nk = _checks.qkv(q, k, v, fn)
    _checks.tensor(centroids, "centroids")
    if not centroids.is_floating_point():
        raise TypeError(f"{fn}: centroids must be a floating-point tensor, got dtype {centroids.dtype}")
    if centroids.dim() != 3 or centroids.shape[0] != Hq or centroids.shape[1] < 1 or centroids.shape[2] != q.shape[3]:
        raise ValueError(f"{fn}: centroids must have shape (Hq={Hq}, num_clusters >= 1, head_dim={q.shape[3]}), "
                         f"got {tuple(centroids.shape)}")
    if centroids.device != q.device:
        raise ValueError(f"{fn}: centroids.device ({centroids.device}) must equal q.device ({q.device})")
    window = _checks.integer(window, "window", fn, minimum=1)
    if window > min(Nq, Nk):
        raise ValueError(f"{fn}: window must be <= the sequence length {min(Nq, Nk)}, got {window}")
    _checks.boolean(causal, "causal", fn)
    _checks.boolean(shared_qk, "shared_qk", fn)
    if shared_qk and Nq != Nk:
        raise ValueError(f"{fn}: shared_qk needs Nq == Nk, got {Nq} and {Nk}")
    return window, _checks.scale(scale, q.shape[-1], fn)


def routing_assignment(q, k, centroids, window, *, shared_qk=False):
    """The clusters' members: ``(q_idx, k_idx)``, each ``(B, Hq, C, window)`` int64 token
    indices in increasing order (``k_idx`` indexes the keys of k's head ``h // group``).
    With ``shared_qk`` the keys are the queries' members."""
    window, _ = _check(q, k, k, centroids, window, False, shared_qk, None, "routing_assignment")
    q_idx = _top(cluster_scores(q, centroids), window)
    return q_idx, (q_idx if shared_qk else _top(cluster_scores(k, centroids), window))


def _take(x, idx, num_heads, pad=False):
    """Rows ``idx`` (``(B, H, L)``) of ``x`` ``(B, Hx, N, D)``, head ``h`` reading x's head
    ``h // (H // Hx)`` -> ``(B, H, L, D)``; with ``pad``, index ``N`` is a zero row.
    Differentiable (an index_select, whose backward is an index_add), and K/V heads are
    never repeated."""
    B, Hx, N, D = x.shape
    L = idx.shape[-1]
    if pad:
        x, N = torch.cat((x, x.new_zeros(B, Hx, 1, D)), 2), N + 1
    head = torch.arange(num_heads, device=x.device) // (num_heads // Hx)
    base = (torch.arange(B, device=x.device).view(-1, 1) * Hx + head) * N  # (B, H): first row of (b, h's head)
    rows = (idx + base.unsqueeze(-1)).reshape(-1)
    return x.reshape(B * Hx * N, D).index_select(0, rows).view(B, num_heads, L, D)


def _scatter_mean(out, idx, n):
    """Outputs ``(B, H, L, Dv)`` of the tokens ``idx`` ``(B, H, L)`` -> ``(B, H, n, Dv)``: a
    token in several clusters gets the mean of its outputs, a token in none zeros."""
    B, H, L, Dv = out.shape
    rows = (idx + (torch.arange(B * H, device=out.device) * n).view(B, H, 1)).reshape(-1)
    total = out.new_zeros(B * H * n, Dv).index_add(0, rows, out.reshape(-1, Dv))
    count = out.new_zeros(B * H * n).index_add(0, rows, out.new_ones(B * H * L))
    return (total / count.clamp(min=1).unsqueeze(-1)).view(B, H, n, Dv)


def _boundaries(num_docs, length, device):
    return torch.arange(0, num_docs * length + 1, length, dtype=torch.int32, device=device)


def _merged_slots(P, R):
    """Queries at positions ``P`` and keys at ``R`` (``(..., w)`` each, increasing) merged
    into one increasing sequence of ``2w`` slots, a key before a query at the same
    position: the slots of the queries and of the keys. A query's slot ``s`` then has the
    keys ``R <= P`` exactly at the slots ``< s``, so document-local causality on slots is
    ``pos(key) <= pos(query)``."""
    w = P.shape[-1]
    ar = torch.arange(w, device=P.device)
    return ar + torch.searchsorted(R, P, right=True), ar + torch.searchsorted(P, R, right=False)


def routing_attention(q, k, v, centroids, *, window, causal=False, shared_qk=False, scale=None):
    """Routing attention: content-based sparse attention over clusters (Routing Transformer).

    **Routing.** q, k and ``centroids`` are unit-normalised and every token scores every
    centroid (cosine similarity). Balanced assignment, the paper's variant as in
    lucidrains/routing-transformer: each cluster takes its top-``window`` queries and its
    top-``window`` keys by score (ties as ``torch.topk``). So a token may sit in several
    clusters or in none. A query attends, within each of its clusters, to that cluster's
    keys. A query in several clusters gets the mean of its per-cluster outputs (lucidrains'
    ``scatter_mean``); a query in no cluster gets zeros. A causal query with no earlier
    key in one of its clusters gets a zero output from that cluster (the library's rule
    for a query with no key), which counts in its mean; lucidrains gives every cluster a
    learned null key instead. The assignment is discrete: no
    gradient flows through it or to ``centroids``; q, k and v get exact gradients of the
    routed attention.

    **Kernels.** Each cluster is one packed document (``cu_seqlens``) of
    :func:`attention_ext.flash_attention`, its tokens in position order; the outputs are
    scattered back. Bidirectional: a document of ``window`` queries and ``window`` keys,
    cost ``C * window^2``. Causal (``pos(key) <= pos(query)``; queries aligned bottom-right,
    query ``i`` at position ``i + Nk - Nq``): a cluster's queries and keys are different
    token sets, so each document merges them into ``2 * window`` position-ordered slots
    (query slots hold the queries and zero rows, key slots the keys; the other key slots
    are masked with ``key_mask``); document-local causality on slots is then exactly the
    positional rule (cost ``4 C window^2``). With ``shared_qk`` the query and key sets are
    one, and the plain document of ``window`` tokens is exact. Memory O(C * window * D).

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``
            (``Hq % Hkv == 0``; GQA keys are routed by the query head's centroids).
        centroids: ``(Hq, C, D)`` cluster centroids per query head (normalised here).
        window: tokens per cluster, ``1 <= window <= min(Nq, Nk)``; ``C * window = N`` is
            the paper's setting.
        causal: keys after the query's position are masked.
        shared_qk: the keys use the queries' assignment (Nq == Nk; pass ``k = q`` for the
            paper's shared query/key). Unlike lucidrains, a token's own key is not masked.
        scale: score scale, default ``1 / sqrt(D)``.

    Returns:
        ``(B, Hq, Nq, Dv)`` in q's dtype.
    """
    fn = "routing_attention"
    window, scale = _check(q, k, v, centroids, window, causal, shared_qk, scale, fn)
    B, Hq, Nq, _ = q.shape
    Nk, C = k.shape[2], centroids.shape[1]
    q_idx = _top(cluster_scores(q, centroids), window)
    k_idx = q_idx if shared_qk else _top(cluster_scores(k, centroids), window)
    if not causal or shared_qk:
        flat_q, flat_k = q_idx.reshape(B, Hq, -1), k_idx.reshape(B, Hq, -1)
        out = flash_attention(_take(q, flat_q, Hq), _take(k, flat_k, Hq), _take(v, flat_k, Hq), causal=causal,
                              scale=scale, cu_seqlens=_boundaries(C, window, q.device))
        return _scatter_mean(out, flat_q, Nq)
    q_slot, k_slot = _merged_slots(q_idx + (Nk - Nq), k_idx)
    q_src = torch.full((B, Hq, C, 2 * window), Nq, dtype=torch.long, device=q.device).scatter(-1, q_slot, q_idx)
    k_src = torch.full((B, Hq, C, 2 * window), Nk, dtype=torch.long, device=q.device).scatter(-1, k_slot, k_idx)
    rows = lambda t: t.reshape(B * Hq, 1, C * 2 * window, t.shape[-1])  # noqa: E731  (key_mask is per row)
    qd, kd, vd = (rows(_take(t, src.view(B, Hq, -1), Hq, pad=True)) for t, src in ((q, q_src), (k, k_src), (v, k_src)))
    out = flash_attention(qd, kd, vd, causal=True, scale=scale, key_mask=(k_src < Nk).view(B * Hq, -1),
                          cu_seqlens=_boundaries(C, 2 * window, q.device))
    out = out.view(B, Hq, C, 2 * window, -1).gather(3, q_slot.unsqueeze(-1).expand(-1, -1, -1, -1, out.shape[-1]))
    return _scatter_mean(out.reshape(B, Hq, C * window, -1), q_idx.reshape(B, Hq, -1), Nq)
