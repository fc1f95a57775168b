"""attention_ext: fast, memory-bounded attention for long sequences, as torch custom ops.

    import attention_ext
    out = attention_ext.flash_attention(q, k, v, causal=True)

Every op has CPU and CUDA kernels, forward and backward, fake kernels for
torch.compile, and is reachable as ``torch.ops.attention_ext.*``.
"""

from . import _isa
from ._isa import available_cpu_isas, cpu_isa, set_cpu_isa
from .functional import flash_attention
from .linear import FavorFeatures, linear_attention, linear_attention_step

_isa._select_at_import()

__all__ = ["flash_attention", "available_cpu_isas", "cpu_isa", "set_cpu_isa"]
__all__ += ["linear_attention", "linear_attention_step", "FavorFeatures"]
__version__ = "0.1.0"
