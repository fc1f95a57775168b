"""Linear attention: kernelised attention with a state of size D x Dv, cost linear in N.

    out_i = f_i . S_i / (f_i . z_i + eps)          (normalize=True)
    out_i = f_i . S_i                              (normalize=False, as retention / fla)
    f_i = scale * phi(q_i),   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)

with j over every key (non-causal) or j <= i (causal), and phi a feature map fused in
the kernels: ``"elu"`` (elu(x) + 1, positive), ``"relu"``, or ``"identity"`` (the caller
passes features, e.g. :class:`FavorFeatures` for Performer's FAVOR+).

Ops: ``attention_ext::linear_fwd`` (chunked; causal runs an intra-chunk masked product
plus a running inter-chunk state, so there is never an N x N buffer), ``linear_bwd``
(reverse-chunked; recomputes the chunk states rather than saving them, so the
backward keeps only q, k, v and out alive) and ``linear_step`` (the recurrence, one
token at a time, for decoding). The state (S, z) is ``(B, Hkv, D, Dv)`` and
``(B, Hkv, D)``, float32 for float32/bfloat16/float16 inputs and float64 for float64;
all products accumulate in that type. GQA (``Hq % Hkv == 0``) shares one state per
key/value head; K/V are never repeated. Packed documents (``cu_seqlens``, as
flash-linear-attention's varlen mode) give every document a state of its own: the kernels
treat a document like a batch row, its chunks counted from its first token.

``eps`` is added to the normaliser ``f . z``. It keeps the division finite where the
normaliser vanishes: relu features that are all zero, a causal prefix whose keys are
all zero, identity features that cancel. With positive features (elu, FAVOR+) it only
biases each output towards zero by a relative ``eps / (f . z + eps)``; ``eps=0`` is
allowed and gives the exact ratio (and inf/NaN where the normaliser is 0). Features that
can make ``f . z`` negative (identity) can also make it cross zero: linear attention
with such features is only well defined where the normaliser stays away from 0.

``scale`` multiplies phi(q) (after the feature map; default 1, so the formula above
holds as written). With ``normalize=True`` it cancels except against eps; fla's
un-normalised linear attention uses ``scale=D**-0.5`` with ``normalize=False``.
"""

import math
import numbers

import torch

from . import _C, _checks, _ops  # noqa: F401  (_ops registers fake kernels and autograd)

FEATURE_MAPS = dict(_C.feature_maps)  # name -> code, from csrc/common/linear.h
MAX_CHUNK_SIZE = _checks.LIMITS["linear_max_chunk"]


def _params(fn, feature_map, eps, normalize, scale):
    fmap = _checks.choice(feature_map, "feature_map", FEATURE_MAPS, fn)
    eps = _checks.real(eps, "eps", fn, minimum=0.0)
    normalize = _checks.boolean(normalize, "normalize", fn)
    sc = 1.0 if scale is None else _checks.scale(scale, 1, fn)
    return fmap, eps, normalize, sc


def _state(state, name, q, k, v, fn, cu_seqlens=None):
    """Checks a (S, z) pair against q/k/v (one state per document with cu_seqlens); returns
    it or (None, None)."""
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{fn}: {name} must be a pair (S, z) or None, got {type(state).__name__}")
    S, z = state
    _checks.tensor(S, f"{name}[0] (S)")
    _checks.tensor(z, f"{name}[1] (z)")
    G, Hkv, D, Dv = _ops.linear_segments(q, cu_seqlens), k.shape[1], q.shape[-1], v.shape[-1]
    rows = "batch" if cu_seqlens is None else "documents"
    sd = _ops._acc_dtype(q.dtype)
    for label, t, shape in ((f"{name}[0] (S)", S, (G, Hkv, D, Dv)), (f"{name}[1] (z)", z, (G, Hkv, D))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {label} must have shape ({rows}, kv heads, D{', Dv' if len(shape) == 4 else ''})"
                             f" = {shape}, got {tuple(t.shape)}")
        if t.dtype != sd:
            raise TypeError(f"{fn}: {label}.dtype must be {sd} for {q.dtype} inputs, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {label}.device ({t.device}) must equal q.device ({q.device})")
    return S, z


def _cu_seqlens(cu_seqlens, q, k, fn):
    """What can be checked without reading the values (which would stop torch.compile and
    sync a GPU); the op checks those: 0 first, the sequence length last, non-decreasing."""
    if cu_seqlens is None:
        return None
    _checks.tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{fn}: cu_seqlens.dtype must be torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{fn}: cu_seqlens must be 1-D (documents + 1,), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{fn}: cu_seqlens.device ({cu_seqlens.device}) must equal q.device ({q.device})")
    if q.shape[0] != 1:
        raise ValueError(f"{fn}: cu_seqlens needs batch size 1 (documents packed along the sequence), got "
                         f"q.shape[0] = {q.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{fn}: cu_seqlens needs as many queries as keys, got q.shape[2] = {q.shape[2]} and "
                         f"k.shape[2] = {k.shape[2]}")
    return cu_seqlens


def linear_attention(q, k, v, *, feature_map="elu", causal=False, eps=1e-6, normalize=True, chunk_size=64,
                     scale=None, return_state=False, initial_state=None, cu_seqlens=None):
    """Linear attention ``phi(q) S / (phi(q) z + eps)``, linear in the sequence length.

    Args:
        q: ``(B, Hq, Nq, D)``; float32, float64, bfloat16 or float16.
        k: ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0`` (GQA/MQA).
        v: ``(B, Hkv, Nk, Dv)``.
        feature_map: ``"elu"`` (elu + 1), ``"relu"`` or ``"identity"`` (q and k are
            already features, e.g. from :class:`FavorFeatures`).
        causal: query i sees keys j <= i (needs ``Nq == Nk``).
        eps: added to the normaliser (see the module docstring); >= 0.
        normalize: False gives the un-normalised ``phi(q) S``.
        chunk_size: rows per chunk (1..1024). Causal runs masked products inside a chunk
            and a running state across chunks; it changes rounding only, not the result.
            A CPU tuning knob: the CUDA kernels always use 64-row chunks.
        scale: multiplies phi(q); default 1.
        return_state: also return the final state ``(S, z)``, so that
            :func:`linear_attention_step` can continue the sequence.
        initial_state: ``(S, z)`` carried in from earlier tokens (e.g. a previous call
            with ``return_state=True``); default zeros. Differentiable.
        cu_seqlens: packed documents, as flash-linear-attention's varlen mode: an int32
            tensor ``(S + 1,)`` on q's device, ``0 = cu[0] <= ... <= cu[S] = N``, with
            ``B == 1`` and ``Nq == Nk == N``. Document s is rows ``cu[s]:cu[s+1]``; its
            state starts from its own initial state (zeros by default) and its queries
            see only its keys (causal: the earlier ones). ``initial_state`` and the
            returned state are then one per document, ``(S, Hkv, D, Dv)`` and
            ``(S, Hkv, D)``; an empty document returns its initial state. The values are
            checked by the op (ValueError), so a new set of boundaries, or (with a dynamic
            shape) a new number of documents, does not recompile under torch.compile.
            CUDA reads them on the host (one sync) and runs the documents one by one.

    Returns:
        ``out (B, Hq, Nq, Dv)`` in q's dtype, and ``(S, z)`` when ``return_state``:
        ``S (B, Hkv, D, Dv)``, ``z (B, Hkv, D)`` in float32 (float64 for float64 inputs);
        with cu_seqlens, ``(S, Hkv, D, Dv)`` and ``(S, Hkv, D)``.
    """
    fn = "linear_attention"
    _, _, _, Nq, Nk, _, _ = _checks.linear_qkv(q, k, v, fn)
    causal = _checks.boolean(causal, "causal", fn)
    if causal and Nq != Nk:
        raise ValueError(f"{fn}: causal needs as many queries as keys, got q.shape[2] = {Nq} and "
                         f"k.shape[2] = {Nk}")
    fmap, eps, normalize, sc = _params(fn, feature_map, eps, normalize, scale)
    chunk_size = _checks.integer(chunk_size, "chunk_size", fn, minimum=1)
    if chunk_size > MAX_CHUNK_SIZE:
        raise ValueError(f"{fn}: chunk_size must be <= {MAX_CHUNK_SIZE}, got {chunk_size}")
    _checks.boolean(return_state, "return_state", fn)
    cu_seqlens = _cu_seqlens(cu_seqlens, q, k, fn)
    S0, z0 = _state(initial_state, "initial_state", q, k, v, fn, cu_seqlens)
    out, S, z = _ops.LINEAR_FWD(q, k, v, S0, z0, fmap, causal, normalize, eps, sc, chunk_size, cu_seqlens)
    return (out, (S, z)) if return_state else out


def linear_attention_step(q, k, v, state, *, feature_map="elu", eps=1e-6, normalize=True, scale=None):
    """Causal linear attention for the next T tokens (decoding), from a state.

    Runs the recurrence ``S += phi(k_t) v_t^T, z += phi(k_t), out_t = f_t S / (f_t z + eps)``
    token by token. ``linear_attention(..., causal=True, return_state=True)`` on a prefix
    followed by steps gives the same outputs as one causal call on the whole sequence.

    Args:
        q: ``(B, Hq, T, D)``; k: ``(B, Hkv, T, D)``; v: ``(B, Hkv, T, Dv)``; T >= 0
            (usually 1).
        state: ``(S, z)`` with ``S (B, Hkv, D, Dv)``, ``z (B, Hkv, D)`` in float32
            (float64 for float64 inputs), or None for an empty state.
        feature_map, eps, normalize, scale: as in :func:`linear_attention`.

    Returns:
        ``(out (B, Hq, T, Dv), (S, z))``, the new state. Differentiable (also with
        respect to the incoming state).
    """
    fn = "linear_attention_step"
    B, _, Hkv, T, Tk, D, Dv = _checks.linear_qkv(q, k, v, fn)
    if T != Tk:
        raise ValueError(f"{fn}: q.shape[2] = {T} tokens must equal k.shape[2] = {Tk}")
    fmap, eps, normalize, sc = _params(fn, feature_map, eps, normalize, scale)
    S, z = _state(state, "state", q, k, v, fn)
    if S is None:
        sd = _ops._acc_dtype(q.dtype)
        S = q.new_zeros((B, Hkv, D, Dv), dtype=sd)
        z = q.new_zeros((B, Hkv, D), dtype=sd)
    out, S1, z1 = _ops.LINEAR_STEP(q, k, v, S, z, fmap, normalize, eps, sc)
    return out, (S1, z1)


class FavorFeatures(torch.nn.Module):
    """Performer FAVOR+ positive random features for softmax attention.

    ``phi(x) = exp(w_r . x' - |x'|^2 / 2 - c) / sqrt(m)`` for the ``m = num_features`` rows
    ``w_r`` of a Gaussian projection, with ``x' = x / D**0.25`` so that
    ``E[phi(q) . phi(k)] = exp(q . k / sqrt(D)) * exp(-c_q - c_k)``: then

        linear_attention(phi(q, is_query=True), phi(k, is_query=False), v, feature_map="identity")

    approximates ``softmax(q k^T / sqrt(D)) v`` (error shrinking like ``1/sqrt(m)``).

    Numerical stabilisation: ``c`` is the largest exponent of each query row (queries) or
    of all keys and features of a (batch, head) slice (keys), taken out before ``exp``
    so nothing overflows. A per-query constant cancels in the normalised output, and the
    key constant is common to every key, so both cancel up to ``eps``. The key constant
    depends on the whole key block, so when keys arrive in pieces (decoding with
    :func:`linear_attention_step`) pass ``stabilize=False`` for keys (then ``c = 0``; keep
    ``|x|`` moderate) so that every piece is scaled alike. Features are computed in float32
    (float64 for float64 inputs) and returned in x's dtype.

    Args:
        head_dim: D, the last dimension of the inputs.
        num_features: m, the number of random features (the output's last dimension).
        orthogonal: draw the rows in orthogonal blocks (FAVOR+'s lower-variance estimator),
            each row rescaled to the norm of an independent Gaussian vector.
        redraw: draw a fresh projection at every forward call in training mode.
        seed: seed of the projection's generator (default: torch's global RNG).
    """

    def __init__(self, head_dim, num_features, *, orthogonal=True, redraw=False, seed=None):
        super().__init__()
        fn = "FavorFeatures"
        self.head_dim = _checks.integer(head_dim, "head_dim", fn, minimum=1)
        self.num_features = _checks.integer(num_features, "num_features", fn, minimum=1)
        self.orthogonal = _checks.boolean(orthogonal, "orthogonal", fn)
        self.redraw = _checks.boolean(redraw, "redraw", fn)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"{fn}: seed must be an int or None, got {seed!r}")
        self._generator = None
        if seed is not None:
            self._generator = torch.Generator()
            self._generator.manual_seed(int(seed))
        self.register_buffer("projection", self._draw())

    def _draw(self):
        m, d, g = self.num_features, self.head_dim, self._generator
        if not self.orthogonal:
            return torch.randn(m, d, generator=g, dtype=torch.float64).float()
        blocks = []
        for _ in range(math.ceil(m / d)):
            gauss = torch.randn(d, d, generator=g, dtype=torch.float64)
            qmat, _ = torch.linalg.qr(gauss)
            blocks.append(qmat.T)
        w = torch.cat(blocks)[:m]
        norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
        return (w * norms).float()

    @torch.no_grad()
    def redraw_features(self):
        """Draw a new projection now."""
        self.projection.copy_(self._draw().to(self.projection.device))

    def extra_repr(self):
        return (f"head_dim={self.head_dim}, num_features={self.num_features}, orthogonal={self.orthogonal}, "
                f"redraw={self.redraw}")

    def forward(self, x, *, is_query, stabilize=True):
        fn = "FavorFeatures"
        _checks.tensor(x, "x")
        if x.dim() < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(f"{fn}: x must be (..., seq, head_dim={self.head_dim}), got shape {tuple(x.shape)}")
        _checks.boolean(is_query, "is_query", fn)
        _checks.boolean(stabilize, "stabilize", fn)
        if self.redraw and self.training:
            self.redraw_features()
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs = x.to(ct) * self.head_dim ** -0.25
        proj = xs @ self.projection.to(device=x.device, dtype=ct).T
        expo = proj - 0.5 * (xs * xs).sum(-1, keepdim=True)
        if stabilize:
            # constants of the estimator: detached, they cancel in the normalised output
            dims = (-1,) if is_query else (-2, -1)
            expo = expo - expo.amax(dim=dims, keepdim=True).detach()
        return (torch.exp(expo) * self.num_features ** -0.5).to(x.dtype)
