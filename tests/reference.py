"""Independent float64 references: explicit boolean masks and dense softmax attention.

Nothing here calls attention_ext; the masks are written from the documented semantics
(see attention_ext/functional.py), not from csrc/common/mask.h.
"""

import math

import torch


def positions(nq, nk):
    """Key position of each query row (bottom-right alignment) and key positions."""
    i = torch.arange(nq).view(-1, 1) + (nk - nq)
    j = torch.arange(nk).view(1, -1)
    return i, j


def causal_mask(nq, nk):
    i, j = positions(nq, nk)
    return j <= i


def window_mask(nq, nk, left, right, *, dilation=1, causal=False):
    i, j = positions(nq, nk)
    delta = i - j
    m = (delta <= left * dilation) & (-delta <= right * dilation) & (delta % dilation == 0)
    if causal:
        m &= j <= i
    return m


def global_mask_2d(nq, nk, is_global_key, *, causal=False):
    """Positions flagged in is_global_key (bool (nk,)) attend everywhere and are attended
    by everyone; causality still applies on top."""
    i, j = positions(nq, nk)
    gk = is_global_key.view(1, -1).expand(nq, nk)
    qpos = i.view(-1)
    gq = torch.zeros(nq, dtype=torch.bool)
    valid = (qpos >= 0) & (qpos < nk)
    gq[valid] = is_global_key[qpos[valid]]
    m = gk | gq.view(-1, 1)
    if causal:
        m &= j <= i
    return m


def neighborhood_mask(n, kernel_size, *, dilation=1, causal=False):
    """NATTEN 1-D: within the dilation group of i, kernel_size members centred on i,
    shifted inwards at the group's edges; causal: the kernel_size members ending at i."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        g = i % dilation
        members = list(range(g, n, dilation))
        idx = members.index(i)
        if causal:
            lo = max(idx - (kernel_size - 1), 0)
            chosen = members[lo: idx + 1]
        else:
            half = kernel_size // 2
            lo = idx - half
            lo = max(0, min(lo, len(members) - kernel_size))
            chosen = members[lo: lo + kernel_size]
        m[i, chosen] = True
    return m


def natten_window_1d(n, kernel_size, dilation, stride, causal):
    """(n, n) bool: NATTEN's rule along one dim (csrc/include/natten/cuda/reference/mask.hpp,
    written out per query): inside the query's dilation group (index i, length L), the
    window of its stride group's leader, kernel_size members, shifted inwards at the edges
    (an even kernel reaches one less ahead); causal: from the window start of the group's
    last member up to the query itself."""
    m = torch.zeros(n, n, dtype=torch.bool)
    left, right = kernel_size // 2, kernel_size // 2 + kernel_size % 2 - 1
    for x in range(n):
        members = list(range(x % dilation, n, dilation))
        L, i = len(members), members.index(x)
        if causal:
            leader = min((i // stride) * stride + stride - 1, L - 1)
            lo, hi = max(leader - left - right, 0), min(i + 1, L)
        else:
            leader = min((i // stride) * stride + stride // 2, L - 1)
            lo = max(leader - left, 0)
            if leader + right >= L:
                lo += L - right - leader - 1
            hi = lo + kernel_size
        m[x, members[lo:hi]] = True
    return m


def natten_mask(spatial, kernel_size, dilation=None, stride=None, causal=None):
    """(N, N) bool over the row-major tokens of a 1-3-D grid: a key is seen when it is in
    the query's window along every dim (per-dim arguments are tuples)."""
    nd = len(spatial)
    dilation, stride, causal = (x or (d,) * nd for x, d in ((dilation, 1), (stride, 1), (causal, False)))
    m = torch.ones((1,) * (2 * nd), dtype=torch.bool)
    for d, n in enumerate(spatial):
        w = natten_window_1d(n, kernel_size[d], dilation[d], stride[d], causal[d])
        shape = [1] * (2 * nd)
        shape[d], shape[nd + d] = n, n  # (query coords..., key coords...)
        m = m & w.view(shape)
    N = math.prod(spatial)
    return m.reshape(N, N)


def block_mask(layout, block_size, nq, nk):
    """Expand a (H, nqb, nkb) block layout to (H, nq, nk)."""
    m = layout.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return m[:, :nq, :nk]


def packed_mask(cu_q, cu_k, doc_mask):
    """(B, 1, Nq, Nk) mask of packed documents: doc_mask(nq, nk) ((nq, nk) or (H, nq, nk),
    document-local) on each document's block, False between documents. cu_q / cu_k are
    (B, S + 1) lists or tensors of cumulative boundaries."""
    cu_q, cu_k = (torch.as_tensor(c).view(-1, torch.as_tensor(c).shape[-1]).tolist() for c in (cu_q, cu_k))
    blocks = []
    for rq, rk in zip(cu_q, cu_k):
        parts = [(a, b, c, d) for a, b, c, d in zip(rq[:-1], rq[1:], rk[:-1], rk[1:])]
        blocks.append(parts)
    heads = 1
    probe = [doc_mask(b - a, d - c) for a, b, c, d in blocks[0] if b > a and d > c]
    if probe and probe[0].dim() == 3:
        heads = probe[0].shape[0]
    m = torch.zeros(len(blocks), heads, cu_q[0][-1], cu_k[0][-1], dtype=torch.bool)
    for row, parts in enumerate(blocks):
        for a, b, c, d in parts:
            if b > a and d > c:
                m[row, :, a:b, c:d] = doc_mask(b - a, d - c)
    return m


def _scores(q, k, v, scale, softcap, bias=None):
    """Scaled (and capped) scores with K/V repeated over each GQA group, plus the additive
    bias (after the cap, as FlashAttention 2 orders ALiBi); returns (s, v)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(device=s.device, dtype=s.dtype)
    return s, v


def alibi_bias(slopes, nq, nk, cu_q=None, cu_k=None):
    """ALiBi from its definition (FlashAttention's attention_ref): -slope * |p - j| with p
    the query's bottom-right aligned position; packed documents (cu_q / cu_k: (S + 1,)
    lists) align each document on its own. slopes (H,) or (B, H) -> (B or 1, H, nq, nk)."""
    slopes = torch.as_tensor(slopes, dtype=torch.float64).cpu()
    slopes = slopes.view(-1 if slopes.dim() == 2 else 1, slopes.shape[-1], 1, 1)
    dist = torch.zeros(nq, nk, dtype=torch.float64)
    if cu_q is None:
        i, j = positions(nq, nk)
        dist = (i - j).abs().double()
    else:
        for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
            i, j = positions(b - a, d - c)
            dist[a:b, c:d] = (i - j).abs().double()
    return -slopes * dist


def attention(q, k, v, mask=None, *, scale=None, softcap=None, bias=None, sinks=None, dropout=None):
    """Dense float64 softmax attention on the CPU, differentiable (gradients flow back
    to the inputs, whatever their dtype/device). mask broadcasts to (B, H, Nq, Nk);
    rows with no allowed key give zeros; softcap caps the scaled scores as
    softcap * tanh(s / softcap); bias (broadcasting to the scores) is added after the
    cap; sinks (H,) are gpt-oss's sink logits: one more softmax column per row, of no
    value (the lse includes it; a row without keys then has lse = sink); dropout is a
    (B, H, Nq, Nk) multiplier of the probabilities (dropout_multiplier). Returns
    (out, lse) in float64."""
    q, k, v = (t.to(device="cpu", dtype=torch.float64) for t in (q, k, v))
    s, v = _scores(q, k, v, scale, softcap, bias)
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool)
    mask = mask.cpu().expand_as(s)
    if sinks is not None:
        sink = sinks.to(device="cpu", dtype=torch.float64).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s.masked_fill(~mask, float("-inf")), sink], -1)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - lse)[..., :-1]
        return (p if dropout is None else p * dropout.to(p)) @ v, lse.squeeze(-1)
    # rows with no allowed key: out 0, lse -inf, and finite (zero) gradients
    empty = ~mask.any(-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(empty, 0.0)
    lse = lse.masked_fill(empty, float("-inf")).squeeze(-1)
    if dropout is not None:
        p = p * dropout.to(p)
    return p @ v, lse


def attention_lowp(q, k, v, mask=None, *, scale=None, softcap=None, bias=None, sinks=None, dropout=None):
    """The same math done by plain PyTorch in the inputs' dtype (the FlashAttention test
    rule compares our error against this one's)."""
    s, v = _scores(q, k, v, scale, softcap, bias)
    if mask is not None:
        mask = mask.to(s.device).expand_as(s)
        empty = ~mask.any(-1, keepdim=True)
        s = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    if sinks is not None:
        sink = sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, sink], -1).float(), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s.float(), dim=-1)
    if mask is not None:
        p = p.masked_fill(empty, 0.0)
    if dropout is not None:
        p = p * dropout.to(p)
    return p.to(q.dtype) @ v


# ---- attention dropout: Philox4x32-10 (Salmon et al., SC'11), written from the paper ----

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counters (c0, c1, c2, c3) (broadcasting uint64 numpy arrays of
    32-bit values) under the key (k0, k1): four uint64 arrays of 32-bit words."""
    import numpy as np

    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) & mask for x in (c0, c1, c2, c3)]
    c = list(np.broadcast_arrays(*c))
    k0, k1 = np.uint64(k0 & 0xFFFFFFFF), np.uint64(k1 & 0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(PHILOX_M[0]) * c[0]  # < 2^64: no wrap
        p1 = np.uint64(PHILOX_M[1]) * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & mask, p1 & mask, ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & mask,
             p0 & mask]
        k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & mask, (k1 + np.uint64(PHILOX_W[1])) & mask
    return c


def dropout_keep(seed, p, B, H, Nq, Nk):
    """The keep decisions (B, H, Nq, Nk) of attention dropout under the int64 (2,)
    (seed, offset) tensor, as csrc/common/dropout.h defines them: key j = 64 m + 16 w + l
    of row i gets counter (16 m + l, i // 2, b * H + h, offset) under the key (seed_lo,
    seed_hi), and is kept when the 16-bit half i % 2 (low half first) of its word w is
    below round((1 - p) * 2^16)."""
    import numpy as np

    s, off = (int(x) & 0xFFFFFFFFFFFFFFFF for x in seed.tolist())
    b = np.arange(B).reshape(B, 1, 1, 1)
    h = np.arange(H).reshape(1, H, 1, 1)
    i = np.arange(Nq).reshape(1, 1, Nq, 1)
    j = np.arange(Nk).reshape(1, 1, 1, Nk)
    words = philox4x32_10(16 * (j // 64) + j % 16, i // 2, b * H + h, off & 0xFFFFFFFF, s & 0xFFFFFFFF, s >> 32)
    w = np.choose(np.broadcast_to((j // 16) % 4, words[0].shape), words)
    half = (w >> (np.uint64(16) * np.broadcast_to(i % 2, w.shape).astype(np.uint64))) & np.uint64(0xFFFF)
    thr = max(1, min(int((1.0 - p) * 2.0**16 + 0.5), 2**16))
    return torch.from_numpy(half < np.uint64(thr))


def dropout_multiplier(seed, p, B, H, Nq, Nk):
    """1 / (1 - p) where kept, 0 where dropped, float64 (B, H, Nq, Nk)."""
    return dropout_keep(seed, p, B, H, Nq, Nk).double() / (1.0 - p)


EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def check_close(out, ref, *, lowp=None, dtype=None, what="out", fp32_rel=2e-5):
    """Asserts out (any dtype) is close to the float64 reference; returns the error.

    Tolerances scale with the reference's magnitude m = max(1, max|ref|):
    float64 1e-10 * m; float32 fp32_rel * m (a few ulp after D-long dot products and an
    online softmax; gradients, which sum over a sequence, pass a larger fp32_rel);
    bf16/fp16 the FlashAttention rule: at most 2x the error of the same math done by
    PyTorch at that dtype (lowp), plus one unit of the dtype's rounding at m, for
    values that both round to the same neighbour."""
    dtype = dtype or out.dtype
    ref = ref.detach()
    err = (out.detach().double().cpu() - ref).abs().max().item() if out.numel() else 0.0
    m = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    if dtype == torch.float64:
        tol = 1e-10 * m
    elif dtype == torch.float32:
        tol = fp32_rel * m
    else:
        assert lowp is not None, "low-precision checks need the PyTorch same-dtype result"
        base = (lowp.detach().double().cpu() - ref).abs().max().item() if ref.numel() else 0.0
        tol = 2 * base + EPS[dtype] * m
    assert err <= tol, f"{what}: max abs error {err:.3e} > tolerance {tol:.3e} ({dtype})"
    return err


# ---- linear attention -------------------------------------------------------------------

def phi(x, fmap):
    """The feature maps of attention_ext.linear_attention, from their definitions."""
    if fmap == "elu":
        return torch.nn.functional.elu(x) + 1
    if fmap == "relu":
        return torch.relu(x)
    return x


def linear_attention(q, k, v, *, fmap="elu", causal=False, eps=1e-6, normalize=True, scale=1.0, state=None,
                     dtype=torch.float64):
    """Quadratic float64 linear attention, phi(Q) phi(K)^T (causally masked) times V over
    its row sums plus eps. Returns (out, (S, z)); differentiable in its (float64) inputs.
    dtype=q.dtype: the same math done by PyTorch at the inputs' dtype (the `lowp` of
    check_close for bf16/fp16)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    fq = scale * phi(q, fmap)
    fk = phi(k, fmap)
    a = fq @ fk.repeat_interleave(group, 1).transpose(-1, -2)
    if causal:
        n = q.shape[2]
        a = a.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=a.device).tril(), 0.0)
    num = a @ v.repeat_interleave(group, 1)
    den = a.sum(-1)
    S = fk.transpose(-1, -2) @ v
    z = fk.sum(-2)
    if state is not None:
        S0, z0 = (t.to(dtype) for t in state)
        num = num + fq @ S0.repeat_interleave(group, 1)
        den = den + (fq * z0.repeat_interleave(group, 1).unsqueeze(-2)).sum(-1)
        S, z = S + S0, z + z0
    out = num / (den + eps).unsqueeze(-1) if normalize else num
    return out, (S, z)


def linear_tol(dtype):
    """Relative tolerance of linear attention against the float64 reference computed on
    the same (rounded) inputs: the state is accumulated in fp32 (float64 for float64), so
    what remains is fp32 summation error and, for bf16/fp16 outputs, their rounding (4 and
    2 units of the output's precision, 2^-8 and 2^-11, after products and a division)."""
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]


def check_close_linear(out, ref, dtype, what="out"):
    """Max abs error <= linear_tol(dtype) * max(1, max|ref|)."""
    ref = ref.detach().double().cpu()
    err = (out.detach().double().cpu() - ref).abs().max().item() if out.numel() else 0.0
    tol = linear_tol(dtype) * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e} ({dtype})"
    return err



# ---- routing attention and Linformer ------------------------------------------------------

def routing_top_k(x, centroids, window, group=1):
    """The balanced assignment written from its definition: cosine similarity of the tokens
    of x ``(B, Hx, N, D)`` (head ``h // group`` for centroid head ``h``) with ``centroids``
    ``(H, C, D)``; each cluster's ``window`` highest-scoring tokens, as sorted index lists
    ``[b][h][c]``."""
    x = torch.nn.functional.normalize(x.detach().cpu().double(), dim=-1)
    c = torch.nn.functional.normalize(centroids.detach().cpu().double(), dim=-1)
    B, H, C = x.shape[0], c.shape[0], c.shape[1]
    return [[[sorted(torch.argsort(x[b, h // group] @ c[h, cl], descending=True)[:window].tolist())
              for cl in range(C)] for h in range(H)] for b in range(B)]


def routing_attention(q, k, v, q_idx, k_idx, *, causal=False, attend=attention):
    """Routed attention with dense masks: for each cluster ``c``, query ``i`` in
    ``q_idx[:, :, c]`` sees key ``j`` in ``k_idx[:, :, c]`` (and ``j <= i + Nk - Nq`` when
    causal); a query's output is the mean over its clusters (zeros in none). ``attend`` is
    :func:`attention` (float64) or :func:`attention_lowp`."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    total, count = 0, 0
    for c in range(q_idx.shape[2]):
        in_q = torch.zeros(B, H, Nq, dtype=torch.bool).scatter(-1, q_idx[:, :, c].cpu(), True)
        in_k = torch.zeros(B, H, Nk, dtype=torch.bool).scatter(-1, k_idx[:, :, c].cpu(), True)
        mask = in_q.unsqueeze(-1) & in_k.unsqueeze(-2)
        if causal:
            mask &= causal_mask(Nq, Nk)
        out = attend(q, k, v, mask.to(q.device))
        out = out[0] if isinstance(out, tuple) else out
        total = total + out * in_q.unsqueeze(-1).to(out.device, out.dtype)
        count = count + in_q.unsqueeze(-1).to(out.device, out.dtype)
    return total / count.clamp(min=1)


def linformer_attention(q, k, v, E, F):
    """Linformer: keys and values projected along the sequence by the first N columns of
    E, F ``(proj_len, max_len)``, then dense softmax attention (float64)."""
    n = k.shape[2]
    E, F = (t.to(device="cpu", dtype=torch.float64)[:, :n] for t in (E, F))
    k, v = (t.to(device="cpu", dtype=torch.float64) for t in (k, v))
    return attention(q, E @ k, F @ v)[0]
