"""One description of an exact-attention call: what each query may see, and how a score
becomes a probability (``../shared/DESIGN.md``: one spec, one mask family, one kernel).

The public functions (functional.py) check their arguments and build an
:class:`AttentionSpec`; its fields are the trailing arguments of the two ops
``attention_ext::attention_fwd`` / ``attention_bwd``, with the same names and in the
same order (``AE_ATTENTION_SPEC_SCHEMA`` in ``csrc/common/attention_args.h``):
``op_kwargs()`` passes them by name, ``op_args()`` positionally (for the autograd
machinery, whose kernels take positional arguments only). The autograd of
``_ops.py`` keeps the spec between the passes, and the tests build raw op calls from it.

A new modifier (packed sequences, cache lengths, ALiBi slopes, sinks) is one
more field here and in that schema, its predicate or score term in ``csrc/common``, and
one place per backend.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch

from . import _C

MASK_KINDS = dict(_C.mask_kinds)  # name -> code, from csrc/common/mask.h


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The spec of one exact-attention call, as the ops take it.

    scale: score scale (``1 / sqrt(head_dim)`` unless given).
    softcap: Gemma 2 logit softcapping, 0 = off.
    mask_kind: a code of ``MASK_KINDS`` (dense, window, neighborhood, block_layout).
    causal: keys after the query's (bottom-right aligned) position are never seen.
    window_left, window_right, dilation: the window kind's reach in dilated steps.
    kernel_size, dilation: the neighborhood kind.
    num_global, global_mask: Longformer global positions (a leading count, a bool (B, Nk)).
    block_layout, block_size: the block-layout kind (bool (1 or Hq, nqb, nkb)).
    key_mask: bool (B, Nk), False for keys no query may attend (padding).
    cu_seqlens_q, cu_seqlens_k: packed documents, int32 (B, S + 1) cumulative boundaries
        of the queries and keys (FlashAttention's cu_seqlens, one row per batch row);
        every position above counts from its document's start, and no query sees a key
        of another document.
    alibi_slopes: ALiBi slopes (B, Hq) in the lse dtype: each scaled score (after the
        softcap) gains ``-slope * |p - j|`` (csrc/common/score_mods.h). No gradient.
    sinks: (Hq,) attention-sink logits in the lse dtype (gpt-oss): a virtual key with no
        value in every row's softmax; the backward's fourth output is their gradient.
    dropout_p, dropout_seed: attention dropout (SDPA's dropout_p) and the int64 (2,)
        Philox (seed, offset) its keep decisions come from (csrc/common/dropout.h); the
        backward regenerates the same mask from it.
    spatial_shape, na_kernel_size, na_dilation, na_stride, na_causal, tile_shape: the
        neighborhood kind on a 1-3-D token grid (NATTEN's rule per dim; na_causal 0/1),
        tokens in the tile-major order of tile_shape boxes (csrc/common/mask.h, built by
        _neighborhood.py); all empty for the 1-D kind of kernel_size / dilation / causal.
    """

    scale: float
    softcap: float = 0.0
    mask_kind: int = MASK_KINDS["dense"]
    causal: bool = False
    window_left: int = 0
    window_right: int = 0
    dilation: int = 1
    kernel_size: int = 1
    num_global: int = 0
    global_mask: Optional[torch.Tensor] = None
    block_layout: Optional[torch.Tensor] = None
    block_size: int = 1
    key_mask: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    dropout_seed: Optional[torch.Tensor] = None
    spatial_shape: tuple = ()
    na_kernel_size: tuple = ()
    na_dilation: tuple = ()
    na_stride: tuple = ()
    na_causal: tuple = ()
    tile_shape: tuple = ()

    # fields that hold tensors (saved for backward through save_for_backward), and those of
    # them whose dim 0 is the batch (torch.vmap folds its dim into that batch)
    TENSORS = ("global_mask", "block_layout", "key_mask", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "sinks",
               "dropout_seed")
    BATCH_TENSORS = ("global_mask", "key_mask", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes")

    def op_kwargs(self):
        """The ops' keyword-only arguments."""
        return {n: getattr(self, n) for n in FIELDS}

    @classmethod
    def from_op_inputs(cls, op, inputs):
        """The spec of a call of ``op`` from its full input tuple (as autograd's
        setup_context receives it), read by the schema's argument names."""
        names = [a.name for a in op._schema.arguments]
        return cls(**{n: x for n, x in zip(names, inputs) if n in FIELD_SET})

    def tensors(self):
        return tuple(getattr(self, name) for name in self.TENSORS)

    def _with(self, values):
        # a copy with only these fields set: dataclasses.replace would rebuild every field
        new = copy.copy(self)
        for name, x in values:
            object.__setattr__(new, name, x)
        return new

    def without_tensors(self):
        return self._with((name, None) for name in self.TENSORS)

    def with_tensors(self, tensors):
        return self._with(zip(self.TENSORS, tensors))

    def op_args(self):
        """The ops' trailing arguments as a tuple, in schema order."""
        return tuple(getattr(self, n) for n in FIELDS)

    def forward(self, q, k, v):
        """``attention_fwd`` under this spec, with autograd: ``(out, lse)``."""
        from ._ops import ATTENTION_FWD

        return ATTENTION_FWD(q, k, v, *self.op_args())

    def backward(self, grad_out, grad_lse, q, k, v, out, lse, *, autograd=False):
        """``attention_bwd`` under this spec: ``(dq, dk, dv, dsinks)`` (dsinks empty
        without sinks). ``autograd``: through its
        autograd.Function (as the forward's backward calls it: differentiating the
        result then raises, also under torch.func)."""
        if autograd:
            from ._ops import ATTENTION_BWD

            return ATTENTION_BWD(grad_out, grad_lse, q, k, v, out, lse, *self.op_args())
        return torch.ops.attention_ext.attention_bwd(grad_out, grad_lse, q, k, v, out, lse, **self.op_kwargs())


# the field names in schema order, read once (every call of a short sequence pays for
# dataclasses.fields otherwise)
FIELDS = tuple(f.name for f in dataclasses.fields(AttentionSpec))
FIELD_SET = frozenset(FIELDS)
