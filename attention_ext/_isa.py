"""Choose the CPU kernel build (ISA) the ops run.

Each ISA build is its own extension module (``_cpu_avx512bf16``, ``_cpu_avx512``,
``_cpu_avx2``); the portable build lives in ``_C``. ``avx512bf16`` is the AVX-512 build
whose bf16 inputs run their tile products on AVX512-BF16 dot products; it is the only
module with bf16 instructions and is imported only where the CPU reports them. At import
the best one this CPU supports is selected;
``ATTENTION_EXT_CPU_ISA=avx512bf16|avx512|avx2|default`` overrides it, and tests force each path
with :func:`set_cpu_isa`.
"""

import importlib
import os
import sys

import torch

from . import _C

_ORDER = ("avx512bf16", "avx512", "avx2", "default")


def _cpu_supports(isa: str) -> bool:
    if isa == "default":
        return True
    # torch's own detection (cpuinfo), which also honours ATEN_CPU_CAPABILITY
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if isa == "avx512bf16":
        return cap.startswith("AVX512") and torch.cpu._is_avx512_bf16_supported()
    if isa == "avx512":
        return cap.startswith("AVX512")
    if isa == "avx2":
        return cap.startswith("AVX512") or cap == "AVX2"
    return False


def _module(isa: str):
    try:
        return importlib.import_module(f"attention_ext._cpu_{isa}")
    except ImportError:
        return None


def available_cpu_isas() -> list:
    """ISA builds that are compiled in and that this CPU can run, fastest first."""
    return [i for i in _ORDER if i == "default" or (_cpu_supports(i) and _module(i) is not None)]


def cpu_isa() -> str:
    """The ISA build the CPU ops currently run (``"avx512bf16"``, ``"avx512"``, ``"avx2"`` or
    ``"default"``): with ``"avx512bf16"`` bf16 inputs multiply their tiles in bf16 with fp32
    accumulation; elsewhere they are converted to fp32."""
    return _C._cpu_isa().lower()


def set_cpu_isa(isa: str) -> None:
    """Run the CPU ops on the given ISA build (one of :func:`available_cpu_isas`)."""
    if not isinstance(isa, str) or isa.lower() not in _ORDER:
        raise ValueError(f"isa must be one of {_ORDER}, got {isa!r}")
    isa = isa.lower()
    if isa not in available_cpu_isas():
        raise RuntimeError(f"isa={isa!r} is not available here (available: {available_cpu_isas()})")
    if isa == "default":
        _C._reset_cpu_kernels()
        return
    if not _C._set_cpu_kernels(_module(isa).kernel_table):
        raise RuntimeError(f"attention_ext._cpu_{isa} was built for another version of attention_ext._C; rebuild")


def release_workspace() -> None:
    """Free the scratch every loaded CPU kernel build keeps between calls (a memory
    measurement then sees what a call allocates)."""
    _C._release_cpu_workspace(None)
    for isa in _ORDER[:-1]:
        mod = sys.modules.get(f"attention_ext._cpu_{isa}")
        if mod is not None:
            _C._release_cpu_workspace(mod.kernel_table)


def _select_at_import() -> None:
    forced = os.environ.get("ATTENTION_EXT_CPU_ISA")
    if forced:
        set_cpu_isa(forced)
        return
    set_cpu_isa(available_cpu_isas()[0])
