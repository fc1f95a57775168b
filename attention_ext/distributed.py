"""Context parallelism: attention over a sequence sharded across the ranks of a
``torch.distributed`` process group (gloo on CPU, NCCL on CUDA).

Every rank holds a shard ``(B, H, N / P, D)`` of q, k and v along the sequence; in the
``"contiguous"`` layout rank ``r`` holds positions ``[r n, (r + 1) n)``, in ``"zigzag"``
(ring_attention only: balances causal work) chunks ``r`` and ``2P - 1 - r`` of ``2P``.
:func:`shard_sequence` / :func:`gather_sequence` convert.

- :func:`ring_attention`: exact attention; K/V shards travel the ring (P - 1 sends of a
  K/V shard per rank, overlapped with the block computed meanwhile), partial results are
  merged with their logsumexp; in the backward dK/dV travel the ring with them and every
  block's gradient comes from ``attention_bwd`` with the merged (global) out and lse.
- :func:`sliding_window_attention`: only the halo of ``left * dilation`` keys before the
  shard and ``right * dilation`` after it moves (from several neighbours when the window
  is wider than a shard); global tokens travel from the ranks holding them.
- :func:`linear_attention` (causal): an exclusive prefix scan of the ``(S, z)`` states.
- :func:`ulysses_attention`: ``all_to_all`` from sequence- to head-sharding, any local
  attention function of ours, and back.

Every function is differentiable, and its backward communicates like its forward. The
group is an argument (default: the world); there is no global state besides the
optional byte counter of :func:`count_sent_bytes`. Before any collective, the ranks agree
on the shapes and arguments with one small ``all_gather``; a mismatch raises the same
ValueError on every rank (nothing hangs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import zlib

import torch
import torch.distributed as dist

from . import _checks, _ops
from . import functional as _fn
from . import linear as _linear
from ._spec import MASK_KINDS, AttentionSpec

LAYOUTS = ("contiguous", "zigzag")
# the open count_sent_bytes blocks of this process (a list, not a context variable: the CUDA
# backward runs on autograd's device threads)
_COUNTERS = []
_META = 32  # int64 slots of the shape/argument record the ranks compare


@contextlib.contextmanager
def count_sent_bytes():
    """Counts the bytes this rank sends inside the block: ``{"p2p": ..., "collective": ...}``
    (collectives count the bytes this rank must deliver to the others: ``(P - 1) x`` its
    input for all_gather, the other ranks' parts for all_to_all)."""
    counts = {"p2p": 0, "collective": 0}
    _COUNTERS.append(counts)
    try:
        yield counts
    finally:
        _COUNTERS.remove(counts)


def _count(kind, nbytes):
    for counts in _COUNTERS:
        counts[kind] += int(nbytes)


def _nbytes(t):
    return t.numel() * t.element_size()


class _Comm:
    """The group, this rank, and the few communication patterns used here."""

    def __init__(self, group, fn):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{fn}: torch.distributed is not initialised (call init_process_group first)")
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.fn = fn

    def peer(self, r):
        return dist.get_global_rank(self.group, r)

    def exchange(self, sends, recvs):
        """Posts sends ``[(tensor, rank, tag)]`` and receives ``[(tensor, rank, tag)]`` in one
        batch; returns the requests (wait on them)."""
        ops = [dist.P2POp(dist.isend, t, self.peer(r), self.group, tag) for t, r, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.peer(r), self.group, tag) for t, r, tag in recvs]
        for t, _, _ in sends:
            _count("p2p", _nbytes(t))
        return dist.batch_isend_irecv(ops) if ops else []

    def all_gather(self, x, counted=True):
        """``(P, *x.shape)``, every rank's x."""
        flat = x.contiguous().reshape(-1)
        out = flat.new_empty(self.size * flat.numel())
        if counted:
            _count("collective", _nbytes(flat) * (self.size - 1))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=self.group)
        return out.view((self.size,) + tuple(x.shape))

    def all_reduce(self, x):
        """The sum of every rank's x (a ring all_reduce sends 2 (P - 1) / P of it)."""
        x = x.contiguous()
        _count("collective", _nbytes(x) * 2 * (self.size - 1) // self.size)
        dist.all_reduce(x, group=self.group)
        return x

    def all_to_all(self, x):
        """x ``(P, ...)``: part ``j`` goes to rank ``j``; returns the parts received, by source."""
        x = x.contiguous()
        out = torch.empty_like(x)
        _count("collective", _nbytes(x) // self.size * (self.size - 1))
        dist.all_to_all_single(out, x, group=self.group)
        return out

    def agree(self, record, device, error=None):
        """Every rank compares its ``record`` (ints: shapes and arguments) with the others'
        in one all_gather; a local ``error`` (an exception of the local checks) or a
        mismatch raises on every rank, before any collective a rank would skip."""
        rec = [1 if error is not None else 0] + [int(x) for x in record]
        if len(rec) > _META:
            raise AssertionError("shape record too long")
        t = torch.tensor(rec + [0] * (_META - len(rec)), dtype=torch.int64, device=device)
        rows = self.all_gather(t, counted=False).cpu().tolist()  # metadata, not attention traffic
        if error is not None:
            raise error
        bad = [r for r, row in enumerate(rows) if row[0]]
        if bad:
            raise ValueError(f"{self.fn}: invalid arguments on rank(s) {bad} (see the error there)")
        differ = [r for r, row in enumerate(rows) if row != rows[0]]
        if differ:
            raise ValueError(f"{self.fn}: the shards or arguments of rank(s) {differ} differ from rank 0's (every "
                             f"rank must pass the same shapes, dtypes and options); records (shapes first): {rows}")


def _checked(comm, record_fn, device):
    """Runs the local checks ``record_fn() -> (record, value)`` on every rank, then agrees
    (the record's tensor on ``device``, where the group's backend can reduce it)."""
    try:
        record, value = record_fn()
    except (TypeError, ValueError) as e:
        comm.agree([], device, error=e)
        raise
    comm.agree(record, device)
    return value


def _bits(x):
    """A float (or None) as an int64 of its float64 bits, for the shape record."""
    return struct.unpack("<q", struct.pack("<d", float(x or 0.0)))[0]


def _layout(layout, fn):
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _shape_record(*ts):
    return [d for t in ts for d in (t.dim(), *t.shape)] + [zlib.crc32(str(t.dtype).encode()) for t in ts]


# ---- sharding helpers -------------------------------------------------------------

def _zigzag_chunks(rank, size):
    return rank, 2 * size - 1 - rank


def shard_sequence(x, group=None, layout="contiguous", dim=2):
    """This rank's shard of the full-sequence tensor ``x`` (every rank passes all of it):
    ``"contiguous"``: the r-th of P equal pieces along ``dim``; ``"zigzag"``: chunks ``r``
    and ``2P - 1 - r`` of 2P. The length must divide evenly."""
    fn = "shard_sequence"
    comm = _Comm(group, fn)
    layout = _layout(layout, fn)
    parts = comm.size * (2 if layout == "zigzag" else 1)
    if x.shape[dim] % parts:
        raise ValueError(f"{fn}: the sequence length {x.shape[dim]} (dim {dim}) must be divisible by {parts} "
                         f"({layout} layout over {comm.size} ranks)")
    return _my_shard(x, comm, layout, dim)


def _my_shard(x, comm, layout, dim):
    parts = comm.size * (2 if layout == "zigzag" else 1)
    chunks = x.chunk(parts, dim)
    if layout == "contiguous":
        return chunks[comm.rank]
    a, b = _zigzag_chunks(comm.rank, comm.size)
    return torch.cat((chunks[a], chunks[b]), dim)


def _unshard_order(parts, size, layout, dim):
    """The full sequence from the shards of ranks 0..P-1 (each a tensor)."""
    if layout == "contiguous":
        return torch.cat(parts, dim)
    chunks = [None] * (2 * size)
    for r, p in enumerate(parts):
        a, b = _zigzag_chunks(r, size)
        chunks[a], chunks[b] = p.chunk(2, dim)
    return torch.cat(chunks, dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, layout, dim):
        ctx.comm, ctx.layout, ctx.dim = comm, layout, dim
        parts = comm.all_gather(x).unbind(0)
        return _unshard_order(parts, comm.size, layout, dim)

    @staticmethod
    def backward(ctx, grad):
        # every rank's loss may depend on the whole gathered sequence: sum, then take our shard
        return _my_shard(ctx.comm.all_reduce(grad), ctx.comm, ctx.layout, ctx.dim), None, None, None


def gather_sequence(x, group=None, layout="contiguous", dim=2):
    """The full sequence from every rank's shard (the inverse of :func:`shard_sequence`).
    Differentiable: the backward sums the ranks' gradients and returns this rank's shard."""
    fn = "gather_sequence"
    comm = _Comm(group, fn)
    layout = _layout(layout, fn)
    dim = dim % x.dim()
    _checked(comm, lambda: ([dim] + _shape_record(x), None), x.device)
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"{fn}: a zigzag shard holds two chunks; its length {x.shape[dim]} must be even")
    return _GatherSequence.apply(x, comm, layout, dim)


# ---- exact attention: merging partial results -------------------------------------

def _merge(out, lse, block_out, block_lse):
    """Exact merge of two softmax partials over disjoint key sets (``out`` in the
    accumulation dtype); rows with no key in either stay 0 with lse -inf."""
    new = torch.logaddexp(lse, block_lse)
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    a, b = torch.exp(lse - ref).unsqueeze(-1), torch.exp(block_lse - ref).unsqueeze(-1)
    return out * a + block_out.to(out.dtype) * b, new


def _ring_block(layout, causal, rank, src, n):
    """(query slice, key slice, causal) of rank's queries against src's K/V shard, or None
    when no query sees any of those keys."""
    full = slice(0, n)
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if layout == "contiguous":
        return (full, full, False) if src < rank else None
    h = n // 2  # zigzag: chunks rank, 2P-1-rank; src < rank sees only src's first chunk
    return (full, slice(0, h), False) if src < rank else (slice(h, n), full, False)


def _kv_pack(k, v):
    return torch.cat((k.reshape(-1), v.reshape(-1)))


def _kv_unpack(buf, k, v):
    return buf[: k.numel()].view_as(k), buf[k.numel():].view_as(v)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm, spec, layout):
        P, r, n = comm.size, comm.rank, q.shape[2]
        acc = _ops._acc_dtype(q.dtype)
        out = q.new_zeros(q.shape[:3] + (v.shape[-1],), dtype=acc)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)
        kv = _kv_pack(k, v)
        for s in range(P):
            reqs, nxt = [], None
            if s < P - 1:  # the next shard travels while this block computes
                nxt = torch.empty_like(kv)
                reqs = comm.exchange([(kv, (r + 1) % P, 1)], [(nxt, (r - 1) % P, 1)])
            blk = _ring_block(layout, spec.causal, r, (r - s) % P, n)
            if blk is not None:
                qs, ks, causal = blk
                kb, vb = _kv_unpack(kv, k, v)
                bo, bl = torch.ops.attention_ext.attention_fwd(
                    q[:, :, qs], kb[:, :, ks], vb[:, :, ks], **dataclasses.replace(spec, causal=causal).op_kwargs())
                out[:, :, qs], lse[:, :, qs] = _merge(out[:, :, qs], lse[:, :, qs], bo, bl)
            for req in reqs:
                req.wait()
            if nxt is not None:
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.spec, ctx.layout = comm, spec, layout
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        comm, spec, layout = ctx.comm, ctx.spec, ctx.layout
        P, r, n = comm.size, comm.rank, q.shape[2]
        acc = _ops._acc_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q, dtype=acc)
        kv = _kv_pack(k, v)
        dkv = torch.zeros_like(kv, dtype=acc)  # the gradient of the shard held now, travelling with it
        dkv_reqs = []
        for s in range(P):
            reqs, nxt = [], None
            if s < P - 1:
                nxt = torch.empty_like(kv)
                reqs = comm.exchange([(kv, (r + 1) % P, 1)], [(nxt, (r - 1) % P, 1)])
            for req in dkv_reqs:
                req.wait()
            blk = _ring_block(layout, spec.causal, r, (r - s) % P, n)
            if blk is not None:
                qs, ks, causal = blk
                kb, vb = _kv_unpack(kv, k, v)
                bdq, bdk, bdv, _ = torch.ops.attention_ext.attention_bwd(
                    grad_out[:, :, qs], None, q[:, :, qs], kb[:, :, ks], vb[:, :, ks], out[:, :, qs],
                    lse[:, :, qs], **dataclasses.replace(spec, causal=causal).op_kwargs())
                dq[:, :, qs] += bdq
                dk, dv = _kv_unpack(dkv, k, v)
                dk[:, :, ks] += bdk
                dv[:, :, ks] += bdv
            if P > 1:  # after its P-th hop the gradient of a shard is back with its owner
                new = torch.empty_like(dkv)
                dkv_reqs = comm.exchange([(dkv, (r + 1) % P, 2)], [(new, (r - 1) % P, 2)])
                dkv = new
            for req in reqs:
                req.wait()
            if nxt is not None:
                kv = nxt
        for req in dkv_reqs:
            req.wait()
        dk, dv = _kv_unpack(dkv, k, v)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, softcap=None, layout="contiguous"):
    """Exact attention (:func:`attention_ext.flash_attention`) of this rank's query shard
    over the whole sequence, with K/V shards passed round the ring.

    Args:
        q, k, v: this rank's shards ``(B, Hq, n, D)``, ``(B, Hkv, n, D)``, ``(B, Hkv, n, Dv)``
            (the same shapes on every rank; queries and keys share the sharding).
        group: the process group (default: the world).
        causal: causal over the global positions.
        scale, softcap: as in :func:`attention_ext.flash_attention`.
        layout: ``"contiguous"`` or ``"zigzag"`` (see the module docstring; n even).

    Returns:
        this rank's shard of the output ``(B, Hq, n, Dv)``.

    Each rank sends P - 1 K/V shards forward and (backward) P - 1 K/V shards plus P
    dK/dV shards. With causal, the contiguous layout leaves rank r idle for P - 1 - r of
    the P steps; zigzag gives every rank the same work.
    """
    fn = "ring_attention"
    comm = _Comm(group, fn)

    def local():
        (_, _, _, Nq, Nk), fields = _fn._common(q, k, v, fn, causal, scale, softcap, None, False)
        lay = _layout(layout, fn)
        if Nq != Nk:
            raise ValueError(f"{fn}: q and k shards must have the same length, got {Nq} and {Nk}")
        if lay == "zigzag" and Nq % 2:
            raise ValueError(f"{fn}: a zigzag shard holds two chunks; its length {Nq} must be even")
        spec = AttentionSpec(mask_kind=MASK_KINDS["dense"], **fields)
        return _shape_record(q, k, v) + [LAYOUTS.index(lay), int(spec.causal), _bits(spec.scale),
                                         _bits(spec.softcap)], spec

    spec = _checked(comm, local, q.device)
    out, _ = _Ring.apply(q.contiguous(), k.contiguous(), v.contiguous(), comm, spec, layout)
    return out


# ---- sliding windows: halo exchange -----------------------------------------------

def _halo_pieces(comm, n, left, right):
    """The halo transfers of this rank: ``(peer, my_slice, halo_slice, send)`` where
    ``send`` says this rank sends ``my_slice`` of its shard to ``peer``, else it receives
    the peer's piece into ``halo_slice`` of the extended buffer ``[left | shard | right]``."""
    P, r, pieces = comm.size, comm.rank, []
    for d in range(1, P):
        m = min(n, left - (d - 1) * n)  # left halo: the suffix of rank r - d's shard
        if m > 0:
            if r + d < P:
                pieces.append((r + d, slice(n - m, n), None, True))
            if r - d >= 0:
                end = left - (d - 1) * n
                pieces.append((r - d, None, slice(end - m, end), False))
        m = min(n, right - (d - 1) * n)  # right halo: the prefix of rank r + d's shard
        if m > 0:
            if r - d >= 0:
                pieces.append((r - d, slice(0, m), None, True))
            if r + d < P:
                start = left + n + (d - 1) * n
                pieces.append((r + d, None, slice(start, start + m), False))
    return pieces


class _Halo(torch.autograd.Function):
    """``[left keys | shard | right keys]`` of k and v (zeros beyond the sequence) and,
    with ``g`` global tokens, the first g rows of the whole sequence of k, v and q (every
    rank). The backward returns the halo's gradients to their owners (P2P) and sums the
    global rows' gradients (all_reduce); one Function, so every rank communicates in the
    same order."""

    @staticmethod
    def forward(ctx, k, v, q, comm, left, right, g):
        n = k.shape[2]
        pieces = _halo_pieces(comm, n, left, right)
        ctx.comm, ctx.left, ctx.right, ctx.pieces, ctx.g = comm, left, right, pieces, g
        ctx.shapes = (k.shape, v.shape, q.shape)
        ext = [x.new_zeros(x.shape[:2] + (left + n + right,) + x.shape[3:]) for x in (k, v)]
        for e, x in zip(ext, (k, v)):
            e[:, :, left:left + n] = x
        sends = [(_kv_pack(k[:, :, a], v[:, :, a]), p, 3) for p, a, _, s in pieces if s]
        recvs = [(p, h) for p, _, h, s in pieces if not s]
        bufs = [k.new_empty(_halo_numel(k, v, h)) for _, h in recvs]
        for req in comm.exchange(sends, [(b, p, 3) for b, (p, _) in zip(bufs, recvs)]):
            req.wait()
        for b, (_, h) in zip(bufs, recvs):
            ext[0][:, :, h], ext[1][:, :, h] = _kv_unpack(b, ext[0][:, :, h], ext[1][:, :, h])
        if not g:
            return ext[0], ext[1]
        parts = comm.all_gather(torch.cat([_global_part(x, comm, g).reshape(-1) for x in (k, v, q)]))
        return (ext[0], ext[1]) + tuple(_global_unpack(parts, comm, g, ctx.shapes))

    @staticmethod
    def backward(ctx, gk, gv, *gglobal):
        comm, left, pieces, g = ctx.comm, ctx.left, ctx.pieces, ctx.g
        n = gk.shape[2] - left - ctx.right
        dk, dv = gk[:, :, left:left + n].clone(), gv[:, :, left:left + n].clone()
        # reversed: what came in as a halo goes back, what went out comes back to be added
        sends = [(_kv_pack(gk[:, :, h], gv[:, :, h]), p, 4) for p, _, h, s in pieces if not s]
        backs = [(p, a) for p, a, _, s in pieces if s]
        bufs = [gk.new_empty(_halo_numel(gk, gv, a)) for _, a in backs]
        for req in comm.exchange(sends, [(b, p, 4) for b, (p, _) in zip(bufs, backs)]):
            req.wait()
        for b, (_, a) in zip(bufs, backs):
            bk, bv = _kv_unpack(b, dk[:, :, a], dv[:, :, a])
            dk[:, :, a] += bk
            dv[:, :, a] += bv
        dq = None
        if g:
            grads = [torch.zeros(s[:2] + (g,) + s[3:], dtype=gk.dtype, device=gk.device) if t is None else t
                     for t, s in zip(gglobal, ctx.shapes)]
            flat = comm.all_reduce(torch.cat([t.reshape(-1) for t in grads]))
            # this rank's rows of the global positions (r n .. g) come back to it
            m, r, out, off = max(0, min(n, g - comm.rank * n)), comm.rank, [], 0
            for s in ctx.shapes:
                size = s[0] * s[1] * g * s[3]
                full = flat[off:off + size].view(s[0], s[1], g, s[3])
                out.append(full[:, :, r * n:r * n + m])
                off += size
            dk[:, :, :m] += out[0]
            dv[:, :, :m] += out[1]
            dq = torch.nn.functional.pad(out[2], (0, 0, 0, n - m))
        return dk, dv, dq, None, None, None, None


def _halo_numel(k, v, sl):
    return k.shape[:2].numel() * (sl.stop - sl.start) * (k.shape[3] + v.shape[3])


def _global_part(x, comm, g):
    """The rows of this rank's shard at positions < g, padded to min(g, n) rows."""
    n, r = x.shape[2], comm.rank
    m = max(0, min(n, g - r * n))
    return torch.nn.functional.pad(x[:, :, :m], (0, 0, 0, min(g, n) - m))


def _global_unpack(parts, comm, g, shapes):
    """The first g rows of the sequence of each tensor from the gathered padded parts."""
    rows, off, out = min(g, shapes[0][2]), 0, []
    for s in shapes:
        size = s[0] * s[1] * rows * s[3]
        x = parts[:, off:off + size].view(comm.size, s[0], s[1], rows, s[3])
        out.append(torch.cat(list(x.unbind(0)), 2)[:, :, :g])
        off += size
    return out


def sliding_window_attention(q, k, v, window, *, group=None, causal=False, dilation=1, global_tokens=0, scale=None,
                             softcap=None):
    """:func:`attention_ext.sliding_window_attention` of a contiguous sequence shard.

    Only the halo moves: ``left * dilation`` keys before the shard (from as many ranks as
    that spans) and, unless causal, ``right * dilation`` after it. ``global_tokens=g``
    (an int, as in the single-process function: the first g positions of the sequence
    are global) adds their K/V (g rows, from the ranks holding them) to every rank, and
    the global queries' rows (attending the whole sequence) as partials of every rank
    merged with their lse; both cost O(P g) per rank.

    Args:
        q, k, v: this rank's shards ``(B, H, n, D)`` (queries and keys sharded alike).
        window, causal, dilation, scale, softcap: as the single-process function. A reach
            ``left * dilation`` or ``right * dilation`` of N or more (wider than the whole
            sequence) raises: use :func:`ring_attention`.
        global_tokens: an int ``g >= 0`` (bool masks are not supported across ranks).
    """
    fn = "sliding_window_attention"
    comm = _Comm(group, fn)

    def local():
        (_, _, _, Nq, Nk), fields = _fn._common(q, k, v, fn, causal, scale, softcap, None, False)
        if Nq != Nk:
            raise ValueError(f"{fn}: q and k shards must have the same length, got {Nq} and {Nk}")
        left, right = _checks.window(window, fields["causal"], fn)
        dil = _checks.integer(dilation, "dilation", fn, minimum=1)
        if isinstance(global_tokens, torch.Tensor):
            raise TypeError(f"{fn}: global_tokens must be an int count across ranks (a bool mask is not supported)")
        g = _checks.integer(global_tokens, "global_tokens", fn, minimum=0)
        N = Nq * comm.size
        if max(left, right) * dil >= N:
            raise ValueError(f"{fn}: the window reach (left, right) * dilation = ({left * dil}, {right * dil}) is "
                             f"wider than the whole sequence N = {N}; use ring_attention")
        record = [left, right, dil, min(g, N), int(fields["causal"]), _bits(fields["scale"]),
                  _bits(fields["softcap"])]
        return _shape_record(q, k, v) + record, (left, right, dil, min(g, N), fields)

    left, right, dil, g, fields = _checked(comm, local, q.device)
    P, r, n = comm.size, comm.rank, q.shape[2]
    hl, hr = left * dil, right * dil
    halo = _Halo.apply(k.contiguous(), v.contiguous(), q.contiguous(), comm, hl, hr, g)
    k_ext, v_ext = halo[:2]
    Nk = hl + n + hr
    pos = torch.arange(Nk, device=q.device) + (r * n - hl)
    key_mask = ((pos >= 0) & (pos < n * P)).expand(q.shape[0], Nk)
    gmask = None
    if g:
        kg, vg, qg = halo[2:]
        # global keys left of the halo come first (those inside it are flagged in place)
        front = max(0, min(g, r * n - hl))
        k_ext, v_ext = torch.cat((kg[:, :, :front], k_ext), 2), torch.cat((vg[:, :, :front], v_ext), 2)
        pos = torch.cat((torch.arange(front, device=q.device), pos))
        key_mask = torch.cat((key_mask.new_ones(q.shape[0], front), key_mask), 1)
        gmask = (pos < g).expand(q.shape[0], -1)
    # queries align bottom-right, so a right halo shifts the window: (left + right, 0)
    win = (left, 0) if fields["causal"] else (left + right, 0)
    kw = dict(causal=fields["causal"], dilation=dil, scale=fields["scale"], softcap=fields["softcap"] or None,
              key_mask=key_mask, global_tokens=gmask)
    out = _fn.sliding_window_attention(q, k_ext, v_ext, win, **kw)
    if g:  # the global queries' rows see the whole sequence (every rank computes a partial)
        out = _global_query_rows(comm, qg, k, v, g, out, fields)
    return out


class _AllGather(torch.autograd.Function):
    """``(P, *x.shape)``; the backward sums the gradients of every rank's copy."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return comm.all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad)[ctx.comm.rank], None


def _global_query_rows(comm, qg, k, v, g, out, fields):
    """``out`` with this rank's rows of the g global queries (which attend every key)
    replaced: every rank computes their partial over its own keys, the partials are
    gathered and merged. Every rank's result depends on the gather (a 0-row slice where it
    holds no global query), so every rank joins its backward."""
    n, r = k.shape[2], comm.rank
    kw = dict(scale=fields["scale"], softcap=fields["softcap"] or None, return_lse=True)
    width = g - r * n
    if not fields["causal"]:
        po, pl = _fn.flash_attention(qg, k, v, **kw)
    elif width <= 0:  # no global query sees a key of this rank
        po, pl = _fn.flash_attention(qg, k[:, :, :0], v[:, :, :0], **kw)
    else:
        # query p sees key r n + j iff j <= p - r n: bottom-right aligned on g - r n keys
        kk, vv, mask = k[:, :, :width], v[:, :, :width], None
        if width > n:
            pad = (0, 0, 0, width - n)
            kk, vv = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
            mask = (torch.arange(width, device=k.device) < n).expand(k.shape[0], width)
        po, pl = _fn.flash_attention(qg, kk, vv, causal=True, key_mask=mask, **kw)
    acc = pl.dtype
    parts = _AllGather.apply(torch.cat((po.to(acc), pl.unsqueeze(-1)), -1), comm)
    mo, ml = torch.zeros_like(po, dtype=acc), torch.full_like(pl, float("-inf"))
    for s in range(comm.size):
        mo, ml = _merge(mo, ml, parts[s][..., :-1], parts[s][..., -1])
    m = max(0, min(n, width))
    return torch.cat((mo[:, :, r * n:r * n + m].to(out.dtype), out[:, :, m:]), 2)


# ---- linear attention: a prefix scan of the states --------------------------------

class _ExclusiveScan(torch.autograd.Function):
    """Sum of the states of the ranks before this one (an all_gather of the states);
    backward: the sum of the gradients of the ranks after it."""

    @staticmethod
    def forward(ctx, S, z, comm):
        ctx.comm = comm
        flat = torch.cat((S.reshape(-1), z.reshape(-1)))
        prev = comm.all_gather(flat)[:comm.rank].sum(0)
        return prev[:S.numel()].view_as(S), prev[S.numel():].view_as(z)

    @staticmethod
    def backward(ctx, gS, gz):
        comm = ctx.comm
        flat = torch.cat((gS.reshape(-1), gz.reshape(-1)))
        later = comm.all_gather(flat)[comm.rank + 1:].sum(0)
        return later[:gS.numel()].view_as(gS), later[gS.numel():].view_as(gz), None


def linear_attention(q, k, v, *, group=None, causal=True, feature_map="elu", eps=1e-6, normalize=True,
                     chunk_size=64, scale=None):
    """Causal :func:`attention_ext.linear_attention` of a contiguous sequence shard: each
    rank's queries continue from the ``(S, z)`` state of the keys of the ranks before it
    (an exclusive prefix scan, one all_gather of P states of ``Hkv (D Dv + D)`` floats per
    batch row in each pass). Non-causal, ``initial_state``, ``return_state`` and
    ``cu_seqlens`` are not supported across ranks (they raise)."""
    fn = "linear_attention"
    comm = _Comm(group, fn)

    def local():
        if causal is not True:
            raise ValueError(f"{fn}: across ranks only causal=True is supported, got causal={causal!r}")
        _checks.linear_qkv(q, k, v, fn)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"{fn}: q and k shards must have the same length, got {q.shape[2]} and {k.shape[2]}")
        fmap, e, norm, sc = _linear._params(fn, feature_map, eps, normalize, scale)
        _checks.integer(chunk_size, "chunk_size", fn, minimum=1)
        return _shape_record(q, k, v) + [fmap, _bits(e), int(norm), _bits(sc), chunk_size], None

    _checked(comm, local, q.device)
    kw = dict(feature_map=feature_map, eps=eps, normalize=normalize, scale=scale)
    # the state of this shard's keys alone: a non-causal call with no queries
    _, (S, z) = _linear.linear_attention(q[:, :, :0], k, v, return_state=True, chunk_size=chunk_size, **kw)
    S0, z0 = _ExclusiveScan.apply(S, z, comm)
    return _linear.linear_attention(q, k, v, causal=True, chunk_size=chunk_size, initial_state=(S0, z0), **kw)


# ---- Ulysses: all_to_all between sequence and head sharding ------------------------

class _SeqToHeads(torch.autograd.Function):
    """Sequence shards ``(B, H, n, D)`` -> head shards ``(B, H / P, P n, D)`` (the
    sequence in rank order) of every tensor, in one all_to_all; ``inverse`` goes back.
    Each is the other's backward."""

    @staticmethod
    def forward(ctx, comm, inverse, *xs):
        ctx.comm, ctx.inverse = comm, inverse
        return _reshard(comm, xs, inverse)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None) + _reshard(ctx.comm, grads, not ctx.inverse)


def _reshard(comm, xs, to_seq):
    P = comm.size
    parts = []
    for x in xs:
        B, H, N, D = x.shape
        if to_seq:  # (B, h, N, D) -> part j: positions of rank j
            parts.append(x.reshape(B, H, P, N // P, D).permute(2, 0, 1, 3, 4).reshape(P, -1))
        else:  # (B, H, n, D) -> part j: heads of rank j
            parts.append(x.reshape(B, P, H // P, N, D).transpose(0, 1).reshape(P, -1))
    got = comm.all_to_all(torch.cat(parts, 1))  # (P source ranks, ...)
    out, off = [], 0
    for x in xs:
        B, H, N, D = x.shape
        size = x.numel() // P
        blk = got[:, off:off + size]
        off += size
        if to_seq:  # from rank j: its heads of my positions
            out.append(blk.reshape(P, B, H, N // P, D).transpose(0, 1).reshape(B, P * H, N // P, D))
        else:  # from rank j: my heads at its positions
            out.append(blk.reshape(P, B, H // P, N, D).permute(1, 2, 0, 3, 4).reshape(B, H // P, P * N, D))
    return tuple(out)


def ulysses_attention(q, k, v, *, group=None, attn=None, layout="contiguous", **kwargs):
    """DeepSpeed-Ulysses: reshard q, k, v from sequence shards ``(B, H, n, D)`` to head
    shards ``(B, H / P, N, D)`` with all_to_all, run ``attn(q, k, v, **kwargs)`` (any local
    attention function of ours, default :func:`attention_ext.flash_attention`) on the whole
    sequence, and reshard the output back. Arguments in ``kwargs`` that span the sequence
    (``cu_seqlens``, ``key_mask``, ``global_tokens`` masks) are given for the whole
    sequence. Query and K/V heads must be divisible by P. Per rank it sends
    ``(P - 1) / P`` of its q, k, v and output shards."""
    fn = "ulysses_attention"
    comm = _Comm(group, fn)
    attn = _fn.flash_attention if attn is None else attn

    def local():
        _checks.qkv(q, k, v, fn)
        lay = _layout(layout, fn)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[1] % comm.size:
                raise ValueError(f"{fn}: {name} has {t.shape[1]} heads, not divisible by the group size "
                                 f"{comm.size}")
        if lay == "zigzag" and q.shape[2] % 2:
            raise ValueError(f"{fn}: a zigzag shard holds two chunks; its length {q.shape[2]} must be even")
        return _shape_record(q, k, v) + [LAYOUTS.index(lay)], lay

    lay = _checked(comm, local, q.device)
    qh, kh, vh = _SeqToHeads.apply(comm, False, q, k, v)
    if lay == "zigzag":
        perm = _zigzag_perm(comm.size, q.shape[2], q.device)
        qh, kh, vh = (t.index_select(2, perm) for t in (qh, kh, vh))
    out = attn(qh, kh, vh, **kwargs)
    if isinstance(out, tuple):
        raise ValueError(f"{fn}: attn must return only the output (do not pass return_lse)")
    if lay == "zigzag":
        out = out.index_select(2, torch.argsort(perm))
    return _SeqToHeads.apply(comm, True, out)[0]


# ---- attention_ext.nn layers with a sharded sequence -----------------------------

def shard_offset(n, group, cache, cu_seqlens, backend):
    """The first position of this rank's contiguous shard of ``n`` tokens (RoPE's offset)
    for an ``attention_ext.nn`` layer run with ``context_parallel=group``."""
    if cache is not None or cu_seqlens is not None:
        raise ValueError("context_parallel cannot be combined with a cache or cu_seqlens")
    if backend != "attention_ext":
        raise ValueError(f"context_parallel needs the 'attention_ext' backend, got {backend!r}")
    return _Comm(group, "Attention").rank * n


def layer_attention(layer, q, k, v, group):
    """An ``attention_ext.nn.Attention`` layer's attention over the group: global layers
    ring, local ones exchange halos, linear ones scan states."""
    if layer.kind == "global":
        return ring_attention(q, k, v, group=group, causal=layer.causal)
    if layer.kind == "local":
        return sliding_window_attention(q, k, v, (layer.left, layer.right), group=group, causal=layer.causal)
    if layer.kind == "linear":
        return linear_attention(q, k, v, group=group, causal=layer.causal)
    raise NotImplementedError(f"{layer.kind} layers do not run with context_parallel")


def _zigzag_perm(size, n, device):
    """Indices into the rank-ordered zigzag shards that give the natural order."""
    order = torch.arange(size * n, device=device).view(size, 2, n // 2)
    chunks = [None] * (2 * size)
    for r in range(size):
        a, b = _zigzag_chunks(r, size)
        chunks[a], chunks[b] = order[r, 0], order[r, 1]
    return torch.cat(chunks)


__all__ = ["ring_attention", "sliding_window_attention", "linear_attention", "ulysses_attention", "shard_sequence",
           "gather_sequence", "count_sent_bytes", "layer_attention", "LAYOUTS"]
