"""Argument checks shared by the public functions. Every message names the argument
and the value it got."""

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CPU_MAX_HEAD_DIM = 512
CUDA_MAX_HEAD_DIM = 256


def tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def qkv(q, k, v, fn):
    """Checks a (batch, heads, seq, head_dim) q/k/v triple; returns (B, Hq, Hkv, Nq, Nk)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
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
    Hkv, Nk = k.shape[1], k.shape[2]
    if v.shape[1] != Hkv:
        raise ValueError(f"{fn}: v heads ({v.shape[1]}) must equal k heads ({Hkv})")
    if v.shape[2] != Nk:
        raise ValueError(f"{fn}: v.shape[2] (seq) = {v.shape[2]} must equal k.shape[2] = {Nk}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"{fn}: q heads (Hq={Hq}) must be a positive multiple of k/v heads (Hkv={Hkv})")
    if k.shape[3] != D:
        raise ValueError(f"{fn}: k.shape[-1] (head_dim) = {k.shape[3]} must equal q.shape[-1] = {D}")
    limit = CUDA_MAX_HEAD_DIM if q.device.type == "cuda" else CPU_MAX_HEAD_DIM
    for name, d in (("q.shape[-1] (head_dim)", D), ("v.shape[-1] (head_dim)", v.shape[3])):
        if not 1 <= d <= limit:
            raise ValueError(f"{fn}: {name} = {d} is not supported on {q.device.type} (1..{limit})")
        if q.device.type == "cuda" and d % 8 != 0:
            raise ValueError(f"{fn}: {name} = {d} must be a multiple of 8 on CUDA")
    return B, Hq, Hkv, Nq, Nk


def scale(value, head_dim, fn):
    if value is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: scale must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: scale must be a positive finite number, got {value}")
    return value


def boolean(value, name, fn):
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {value!r}")
    return value


def integer(value, name, fn, *, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


# ---- linear attention --------------------------------------------------------------

LINEAR_MAX_DIM = 4096  # csrc/common/linear_args.h kLinearMaxDim


def linear_qkv(q, k, v, fn):
    """Checks q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) for the linear
    attention ops (any D, Dv in 1..LINEAR_MAX_DIM on every device); returns
    (B, Hq, Hkv, Nq, Nk, D, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (batch, heads, seq, dim), got shape {tuple(t.shape)}")
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
        raise ValueError(f"{fn}: v.shape[1] (heads) = {v.shape[1]} must equal k.shape[1] = {Hkv}")
    if v.shape[2] != Nk:
        raise ValueError(f"{fn}: v.shape[2] (seq) = {v.shape[2]} must equal k.shape[2] = {Nk}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"{fn}: q heads (q.shape[1]={Hq}) must be a positive multiple of k/v heads "
                         f"(k.shape[1]={Hkv})")
    if k.shape[3] != D:
        raise ValueError(f"{fn}: k.shape[-1] (feature dim) = {k.shape[3]} must equal q.shape[-1] = {D}")
    for name, dim in (("q.shape[-1]", D), ("v.shape[-1]", Dv)):
        if not 1 <= dim <= LINEAR_MAX_DIM:
            raise ValueError(f"{fn}: {name} = {dim} must be in 1..{LINEAR_MAX_DIM}")
    return B, Hq, Hkv, Nq, Nk, D, Dv


def choice(value, name, options, fn):
    """value must be one of the keys of `options`; returns options[value]."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{fn}: {name} must be one of {sorted(options)}, got {value!r}")
    return options[value]


def real(value, name, fn, *, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value
