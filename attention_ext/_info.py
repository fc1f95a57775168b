"""The environment report bug reports need: ``attention_ext.info()`` / ``python -m attention_ext.info``."""

import importlib.metadata
import os
import platform
import sys

import torch

from . import _C, _isa

# /proc/cpuinfo flags behind the ISA builds and the bf16 / AMX tile products
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _cpu():
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if flags and model:
                    break
    except OSError:
        pass
    return model, flags


def _yes(x):
    return "yes" if x else "no"


def _torch_flag(name):
    fn = getattr(torch.cpu, name, None)
    try:
        return _yes(fn()) if fn else "unknown (this torch has no torch.cpu." + name + ")"
    except Exception as e:  # noqa: BLE001 - a report, not a check
        return f"unknown ({type(e).__name__})"


def _isa_lines():
    chosen = _isa.cpu_isa()
    forced = os.environ.get("ATTENTION_EXT_CPU_ISA")
    builds = []
    for name in _isa._ORDER:
        if name == "default":
            builds.append("default (portable, in _C)")
            continue
        compiled = _isa._module(name) is not None
        builds.append(f"{name} ({'compiled' if compiled else 'not compiled'}, "
                      f"{'this CPU runs it' if _isa._cpu_supports(name) else 'this CPU cannot run it'})")
    why = (f"forced by ATTENTION_EXT_CPU_ISA={forced}" if forced else
           "the first of the available builds (fastest first) unless set_cpu_isa() changed it")
    return [("CPU ISA path", f"{chosen}: {why}"),
            ("available ISAs", ", ".join(_isa.available_cpu_isas())),
            ("ISA builds", "; ".join(builds)),
            ("bf16 dot products", f"active (the {chosen} path)" if "bf16" in chosen
             else f"not active (the {chosen} path has no bf16 dot-product kernels)"),
            ("AMX tiles", "active" if "amx" in chosen else "not used (no attention_ext path uses AMX)")]


def _cuda_lines():
    lines = [("CUDA built", f"{_yes(_C.cuda_built)} (attention_ext._C)"),
             ("CUDA available", _yes(torch.cuda.is_available())
              + (f", {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
                 if torch.cuda.is_available() else ""))]
    archs = getattr(_C, "cuda_archs", None)
    if archs:
        lines.append(("CUDA archs compiled", ", ".join(archs)))
    elif _C.cuda_built:
        torch_archs = torch.cuda.get_arch_list() if torch.version.cuda else []
        lines.append(("CUDA archs compiled", "unknown: attention_ext._C does not record them (the build's "
                      "TORCH_CUDA_ARCH_LIST); torch's own: " + (", ".join(torch_archs) or "unknown")))
    else:
        lines.append(("CUDA archs compiled", "none (CPU-only build)"))
    return lines


def _transformers_lines():
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return [("transformers", "not installed (attention_ext.hf needs it)")]
    try:
        from transformers import AttentionInterface

        registered = "attention_ext" in AttentionInterface._global_mapping
    except Exception as e:  # noqa: BLE001 - a report, not a check
        return [("transformers", version), ("attn_implementation", f"unknown ({type(e).__name__}: {e})")]
    return [("transformers", version),
            ("attn_implementation", '"attention_ext" registered' if registered else
             '"attention_ext" not registered in this process (`import attention_ext.hf` registers it)')]


def report():
    """The report's (label, value) lines."""
    from . import __version__

    model, flags = _cpu()
    seen = [f for f in _FLAGS if f in flags]
    return [("attention_ext", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
            ("Python", f"{platform.python_version()} ({sys.platform})"),
            ("torch", f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
                      f"{torch.get_num_threads()} threads"),
            ("CPU", f"{model}, {os.cpu_count()} cores"),
            ("CPU flags seen", " ".join(seen) or "none of " + " ".join(_FLAGS) + " (or /proc/cpuinfo unreadable)"),
            ("torch CPU capability", torch.backends.cpu.get_cpu_capability()),
            ("torch avx512_bf16", _torch_flag("_is_avx512_bf16_supported")),
            ("torch AMX tiles", _torch_flag("_is_amx_tile_supported")),
            *_isa_lines(), *_cuda_lines(), *_transformers_lines()]


def info(file=None):
    """Prints the version, torch and CUDA build, the CPU ISA path chosen and why, whether
    bf16 / AMX tile products are active, the CUDA archs compiled, and the transformers
    integration: what a bug report needs (``python -m attention_ext.info`` prints the same)."""
    lines = report()
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines), file=file or sys.stdout, flush=True)
