"""attention_ext: fast, memory-bounded attention for long sequences, as torch custom ops.

    import attention_ext
    out = attention_ext.flash_attention(q, k, v, causal=True)
    out = attention_ext.sliding_window_attention(q, k, v, window=512, causal=True)

Every op has CPU and CUDA kernels, forward and backward, fake kernels for
torch.compile, and is reachable as ``torch.ops.attention_ext.*``.

``attention_ext.nn`` has modules (Attention, TransformerLM with local/global layer
patterns); ``import attention_ext.hf`` registers ``attn_implementation="attention_ext"``
with Hugging Face transformers. ``attention_ext.distributed`` runs them over a sequence
sharded across torch.distributed ranks (ring, halo exchange, state scan, Ulysses).
"""

from . import _isa, distributed, nn, patterns
from ._explain import explain
from ._info import info
from .alibi import alibi_slopes
from .decode import attention_with_kvcache
from ._isa import available_cpu_isas, cpu_isa, set_cpu_isa
from .functional import block_sparse_attention, flash_attention, neighborhood_attention, sliding_window_attention
from .linear import FavorFeatures, linear_attention, linear_attention_step
from .routing import routing_attention
from .kvcache import KVCache

_isa._select_at_import()

__all__ = [
    "flash_attention",
    "alibi_slopes",
    "sliding_window_attention",
    "neighborhood_attention",
    "block_sparse_attention",
    "attention_with_kvcache",
    "linear_attention",
    "linear_attention_step",
    "routing_attention",
    "KVCache",
    "FavorFeatures",
    "patterns",
    "nn",
    "distributed",
    "available_cpu_isas",
    "cpu_isa",
    "set_cpu_isa",
    "explain",
    "info",
]
__version__ = "0.1.0"
