"""Which kernels an exact-attention call runs on, and why (as xformers' dispatch and
NATTEN's backend checks report theirs). The CUDA choice is made in C++
(csrc/cuda/attention_path.h); this only asks it."""

import torch

from . import _C, _checks, _isa


def explain(q, k, v, *, backward=False):
    """Describes the kernels that ``flash_attention`` and the other exact-attention
    functions would run for these inputs (no attention is computed).

    Returns a dict: ``device``; ``path`` (``"cpu-<isa>"``, ``"tensor_core"`` or ``"simt"``);
    ``reason`` (why that path: e.g. the dtype or head dim that keeps a CUDA call off the
    tensor cores); ``max_head_dim`` (the largest head dim this device takes); for the
    tensor-core path also ``head_dim_bucket``. ``backward=True`` asks about the backward
    pass (its shared-memory needs differ; under ``torch.use_deterministic_algorithms``
    it also runs a separate dQ kernel).
    """
    fn = "explain"
    _checks.qkv(q, k, v, fn)
    _checks.boolean(backward, "backward", fn)
    device = q.device.type
    info = {"device": device, "max_head_dim": _checks.MAX_HEAD_DIM.get(device, _checks.MAX_HEAD_DIM["cpu"])}
    if device == "cuda":
        deterministic = torch.are_deterministic_algorithms_enabled()
        tc, bucket, reason = _C._cuda_attention_path(q, q.shape[-1], v.shape[-1], backward, deterministic)
        info.update(path="tensor_core" if tc else "simt", reason=reason)
        if tc:
            info["head_dim_bucket"] = bucket
        return info
    isa = _isa.cpu_isa()
    info.update(path=f"cpu-{isa}", reason=f"the CPU kernels built for {isa} (attention_ext.cpu_isa(); "
                                          f"available: {', '.join(_isa.available_cpu_isas())})")
    return info
