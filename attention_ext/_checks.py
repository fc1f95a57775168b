"""Argument checks shared by the public functions. Every message names the argument
and the value it got. Limits come from the C++ side (csrc/common/limits.h, exported as
``attention_ext._C.limits``), so Python and the kernels cannot disagree."""

import math
import numbers

import torch

from . import _C
from ._ops import _acc_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LIMITS = dict(_C.limits)
MAX_HEAD_DIM = {"cpu": LIMITS["cpu_max_head_dim"], "cuda": LIMITS["cuda_max_head_dim"]}
SOFTCAP_RANGE = (LIMITS["softcap_min"], LIMITS["softcap_max"])
LINEAR_MAX_DIM = LIMITS["linear_max_dim"]
INT64_MAX = 2**63 - 1  # every integer argument reaches the ops as an int64


def _finite(x):
    """math.isfinite without math: torch.compile(dynamic=True) may hand a float argument
    over as a symbolic float, which math.isfinite cannot trace."""
    return x == x and x != math.inf and x != -math.inf


def tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _qkv_common(q, k, v, fn, dim_name):
    """Rank, dtype, device, batch, head and length agreement of a q/k/v triple;
    returns (B, Hq, Hkv, Nq, Nk, D, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq, {dim_name}), got shape {tuple(t.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: q.dtype must be one of float32, float64, bfloat16, float16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name}.dtype ({t.dtype}) must equal q.dtype ({q.dtype})")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name}.device ({t.device}) must equal q.device ({q.device})")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{fn}: {name}.shape[0] (batch) = {t.shape[0]} must equal q.shape[0] = {q.shape[0]}")
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if v.shape[1] != Hkv:
        raise ValueError(f"{fn}: v heads (v.shape[1]={v.shape[1]}) must equal k heads (k.shape[1]={Hkv})")
    if v.shape[2] != Nk:
        raise ValueError(f"{fn}: v.shape[2] (seq) = {v.shape[2]} must equal k.shape[2] = {Nk}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"{fn}: q heads (Hq={Hq}) must be a positive multiple of k/v heads (Hkv={Hkv})")
    if k.shape[3] != D:
        raise ValueError(f"{fn}: k.shape[-1] ({dim_name}) = {k.shape[3]} must equal q.shape[-1] = {D}")
    return B, Hq, Hkv, Nq, Nk, D, Dv


def qkv(q, k, v, fn):
    """Checks a (batch, heads, seq, head_dim) q/k/v triple for the softmax attention ops;
    returns (B, Hq, Hkv, Nq, Nk)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = _qkv_common(q, k, v, fn, "head_dim")
    limit = MAX_HEAD_DIM.get(q.device.type, MAX_HEAD_DIM["cpu"])
    for name, d in (("q.shape[-1] (head_dim)", D), ("v.shape[-1] (head_dim)", Dv)):
        if not 1 <= d <= limit:
            raise ValueError(f"{fn}: {name} = {d} is not supported on {q.device.type} (1..{limit})")
    return B, Hq, Hkv, Nq, Nk


def scale(value, head_dim, fn):
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: scale must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not _finite(value) or value <= 0:
        raise ValueError(f"{fn}: scale must be a positive finite number, got {value}")
    return value


def dropout(p, generator, device, fn):
    """dropout_p in [0, 1) and an optional torch.Generator -> the spec's (dropout_p,
    dropout_seed): a Philox (seed, offset) drawn from the generator (the default one of
    q's device when None), so that the same generator state gives the same mask."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{fn}: dropout_p must be a real number, got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:  # NaN fails too
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{fn}: generator is on {generator.device} but q is on {device}")
    if p == 0.0:
        return {"dropout_p": 0.0, "dropout_seed": None}
    seed = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)
    return {"dropout_p": p, "dropout_seed": seed}


def softcap(value, fn):
    """None, 0 or a cap in SOFTCAP_RANGE -> the op's float (0.0 = off)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: softcap must be a real number or None, got {type(value).__name__}")
    value = float(value)
    lo, hi = SOFTCAP_RANGE
    if value != 0 and not lo <= value <= hi:  # NaN fails too
        raise ValueError(f"{fn}: softcap must be None or 0 (off) or in [{lo:g}, {hi:g}], got {value}")
    return value


def boolean(value, name, fn):
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {value!r}")
    return value


def integer(value, name, fn, *, minimum=None, maximum=INT64_MAX):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{fn}: {name} must be <= {maximum}, got {value}")
    return value


def window(value, causal, fn):
    """int w -> (w, w), or (w, 0) when causal; (left, right) ints >= 0."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{fn}: window must be an int or a (left, right) pair, got {value!r}")
        left, right = value
    else:
        left = right = value
    for name, x in (("window left", left), ("window right", right)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{fn}: window must hold ints, got {name} = {x!r}")
        if not 0 <= x <= INT64_MAX:
            raise ValueError(f"{fn}: window must be in [0, 2**63 - 1], got {name} = {x}")
    left, right = int(left), int(right)
    if causal:
        right = 0
    return left, right


def key_bools(value, name, batch, nk, device, fn):
    """A bool (B, Nk) or (Nk,) tensor of per-key flags -> contiguous (B, Nk)."""
    tensor(value, name)
    if value.dtype != torch.bool:
        raise TypeError(f"{fn}: {name} must be a bool tensor, got dtype {value.dtype}")
    if not (value.dim() == 1 and value.shape[0] == nk or value.dim() == 2 and tuple(value.shape) == (batch, nk)):
        raise ValueError(f"{fn}: {name} must have shape (batch={batch}, Nk={nk}) or (Nk,), got {tuple(value.shape)}")
    if value.dim() == 1:
        value = value.unsqueeze(0).expand(batch, -1)
    if value.device != device:
        raise ValueError(f"{fn}: {name}.device ({value.device}) must equal q.device ({device})")
    return value.contiguous()


def global_tokens(value, batch, nk, device, fn):
    """None, an int count of leading tokens, or a bool (B, Nk) mask -> (count, mask)."""
    if value is None:
        return 0, None
    if isinstance(value, torch.Tensor):
        return 0, key_bools(value, "global_tokens", batch, nk, device, fn)
    count = integer(value, "global_tokens", fn, minimum=0)
    return min(count, nk), None


def key_mask(value, batch, nk, device, fn):
    """None or a bool (B, Nk) / (Nk,) mask of the keys that may be attended."""
    return None if value is None else key_bools(value, "key_mask", batch, nk, device, fn)


def cu_seqlens(value, name, batch, n, device, fn, *, per_row=True):
    """FlashAttention's cumulative document boundaries along the sequence: int32
    ``(S + 1,)`` (shared by every batch row) or, with ``per_row``, ``(B, S + 1)``, with
    ``0 = c[0] <= c[1] <= ... <= c[S] = n`` in every row. Returns it as ``(B, S + 1)``
    (``per_row``) or as given. The values are the op's to check (host_boundaries in
    csrc/common/tensor_checks): it reads them once anyway, and reading them here would
    break torch.compile graphs and torch.func transforms."""
    tensor(value, name)
    if value.dtype != torch.int32:
        raise TypeError(f"{fn}: {name} must be an int32 tensor, got dtype {value.dtype}")
    if value.dim() == 0 or value.shape[-1] < 1 or not (
            value.dim() == 1 or per_row and value.dim() == 2 and value.shape[0] == batch):
        want = f"have shape (S + 1,) or (batch={batch}, S + 1)" if per_row else "be 1-D (S + 1,)"
        raise ValueError(f"{fn}: {name} must {want}, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{fn}: {name}.device ({value.device}) must equal q.device ({device})")
    return value.expand(batch, -1) if per_row and value.dim() == 1 else value


def alibi_slopes(value, batch, heads, q, fn):
    """None or float32/float64 ALiBi slopes ``(Hq,)`` / ``(B, Hq)`` -> ``(B, Hq)`` in the lse
    dtype. They are constants (no gradient, as in FlashAttention): one that requires grad
    is refused rather than silently left without one. The op checks that they are finite."""
    if value is None:
        return None
    tensor(value, "alibi_slopes")
    if value.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: alibi_slopes must be float32 (or float64), got dtype {value.dtype}")
    if tuple(value.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"{fn}: alibi_slopes must have shape (Hq={heads},) or (batch={batch}, Hq={heads}), got "
                         f"{tuple(value.shape)}")
    if value.device != q.device:
        raise ValueError(f"{fn}: alibi_slopes.device ({value.device}) must equal q.device ({q.device})")
    if value.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: alibi_slopes get no gradient (constants, as in FlashAttention); pass "
                         "alibi_slopes.detach()")
    return value.to(_acc_dtype(q.dtype)).expand(batch, heads)


def sinks(value, heads, q, fn):
    """None or floating ``(Hq,)`` attention-sink logits -> the lse dtype (differentiable:
    the gradient flows back to the caller's dtype). The op checks that they are finite."""
    if value is None:
        return None
    tensor(value, "sinks")
    if not value.is_floating_point():
        raise TypeError(f"{fn}: sinks must be a floating-point tensor, got dtype {value.dtype}")
    if tuple(value.shape) != (heads,):
        raise ValueError(f"{fn}: sinks must have shape (Hq={heads},), got {tuple(value.shape)}")
    if value.device != q.device:
        raise ValueError(f"{fn}: sinks.device ({value.device}) must equal q.device ({q.device})")
    return value.to(_acc_dtype(q.dtype))


def documents(cu, cu_q, cu_k, batch, nq, nk, device, fn):
    """``cu_seqlens`` (queries and keys packed alike) or the pair ``cu_seqlens_q`` /
    ``cu_seqlens_k`` -> the spec's ``{"cu_seqlens_q": ..., "cu_seqlens_k": ...}``."""
    if cu is not None:
        if cu_q is not None or cu_k is not None:
            raise ValueError(f"{fn}: pass either cu_seqlens or the pair cu_seqlens_q / cu_seqlens_k, not both")
        if nq != nk:
            raise ValueError(f"{fn}: cu_seqlens needs Nq == Nk (got {nq} and {nk}); pass cu_seqlens_q and "
                             "cu_seqlens_k for queries and keys packed differently")
        c = cu_seqlens(cu, "cu_seqlens", batch, nq, device, fn)
        return {"cu_seqlens_q": c, "cu_seqlens_k": c}
    if (cu_q is None) != (cu_k is None):
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k go together (pass both, or neither)")
    if cu_q is None:
        return {}
    cq = cu_seqlens(cu_q, "cu_seqlens_q", batch, nq, device, fn)
    ck = cu_seqlens(cu_k, "cu_seqlens_k", batch, nk, device, fn)
    if cq.shape != ck.shape:
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must hold the same number of documents, got "
                         f"{cq.shape[-1] - 1} and {ck.shape[-1] - 1}")
    return {"cu_seqlens_q": cq, "cu_seqlens_k": ck}


# ---- linear attention --------------------------------------------------------------


def linear_qkv(q, k, v, fn):
    """Checks q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) for the linear
    attention ops (any D, Dv in 1..LINEAR_MAX_DIM on every device); returns
    (B, Hq, Hkv, Nq, Nk, D, Dv)."""
    shape = _qkv_common(q, k, v, fn, "feature dim")
    for name, dim in (("q.shape[-1]", shape[5]), ("v.shape[-1]", shape[6])):
        if not 1 <= dim <= LINEAR_MAX_DIM:
            raise ValueError(f"{fn}: {name} = {dim} must be in 1..{LINEAR_MAX_DIM}")
    return shape


def choice(value, name, options, fn):
    """value must be one of the keys of `options`; returns options[value]."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{fn}: {name} must be one of {sorted(options)}, got {value!r}")
    return options[value]


def real(value, name, fn, *, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not _finite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value
