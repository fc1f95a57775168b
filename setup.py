"""Build attention_ext against the installed torch (pip install --no-build-isolation -e .).

Modules built:
  attention_ext._C            op schemas, CPU/CUDA op bodies, the portable CPU kernels
  attention_ext._cpu_avx2     CPU kernels compiled for AVX2+FMA       (x86-64 only)
  attention_ext._cpu_avx512   CPU kernels compiled for AVX-512 F/BW/VL/DQ (x86-64 only)
  attention_ext._cpu_avx512bf16  the same plus AVX512-BF16: bf16 inputs run their tile
                              products on vdpbf16ps (the only module with bf16 instructions)
The Python layer loads the ISA module the CPU supports (attention_ext/_isa.py).
CUDA kernels are built when torch has CUDA and nvcc is found; otherwise CPU only.
Environment: ATTENTION_EXT_NO_CUDA=1 forces a CPU-only build; TORCH_CUDA_ARCH_LIST
defaults to "8.0;9.0"; CUDA_HOME is found from the real nvcc when unset.
"""

import glob
import os
import platform
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _real_cuda_home():
    """The nvcc on PATH may be a wrapper script, which misleads torch's guess (it
    would take the wrapper's parent folder and the link fails on -lcudart)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(os.path.realpath(nvcc)).parent.parent))
        try:  # a shell wrapper that execs the real nvcc
            for word in Path(nvcc).read_text(errors="ignore").split():
                if word.endswith("/bin/nvcc") and Path(word).exists():
                    candidates.insert(0, str(Path(word).parent.parent))
        except OSError:
            pass
    for c in candidates:
        if (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = c
            return


_real_cuda_home()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# -fopenmp: at::parallel_for is a header template over OpenMP; without the flag it
# silently runs on one thread. libgomp.so.1 is the one torch already loaded.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-Wno-unknown-pragmas"]
LINK_FLAGS = ["-fopenmp"]
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}
# at::vec's AVX-512 Vectorized (CPU_CAPABILITY_AVX512) in a namespace of its own
ISA_FLAGS["avx512bf16"] = ISA_FLAGS["avx512"][:-1] + ["-mavx512bf16", "-DCPU_CAPABILITY=AVX512BF16"]
# Kernel sources compiled once per ISA (csrc/cpu/kernels/).
KERNEL_SOURCES = ["attention_fwd.cpp", "attention_bwd.cpp", "linear_fwd.cpp", "linear_bwd.cpp", "decode_fwd.cpp",
                  "table.cpp"]


def _rel(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def _want_cuda():
    if os.environ.get("ATTENTION_EXT_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _cuda_include_dirs():
    """torch's CUDA headers include cusparse.h / cublas_v2.h; a bare toolkit may lack
    them, torch's own nvidia wheels ship them."""
    dirs = []
    try:
        import nvidia  # noqa: F401

        for base in nvidia.__path__:
            dirs += [d for d in glob.glob(os.path.join(base, "cu*", "include")) if os.path.isdir(d)]
            dirs += [d for d in glob.glob(os.path.join(base, "cusparse", "include")) if os.path.isdir(d)]
            dirs += [d for d in glob.glob(os.path.join(base, "cublas", "include")) if os.path.isdir(d)]
    except ImportError:
        pass
    return dirs


def _isa_wrappers(isa):
    """One tiny source per kernel file and ISA, so every ISA module compiles the same
    kernels with its own flags into objects of distinct names."""
    out_dir = ROOT / "build" / "isa_src" / isa
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in KERNEL_SOURCES + ["isa_module.cpp"]:
        src = ROOT / "csrc" / "cpu" / "kernels" / name
        dst = out_dir / f"{isa}_{name}"
        text = f'#include "{src}"\n'
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
        paths.append(str(dst))
    return paths


def extensions():
    with_cuda = _want_cuda()
    # schemas, the Python module, checks shared by both backends, CPU op bodies, and the
    # portable build of the CPU kernels
    c_sources = (["csrc/ops.cpp", "csrc/module.cpp"]
                 + sorted(_rel(glob.glob(str(ROOT / "csrc" / "common" / "*.cpp"))))
                 + sorted(_rel(glob.glob(str(ROOT / "csrc" / "cpu" / "*.cpp"))))
                 + [f"csrc/cpu/kernels/{n}" for n in KERNEL_SOURCES])
    cxx = CXX_FLAGS + ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    exts = []
    if with_cuda:
        cu_sources = sorted(_rel(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))
                                 + glob.glob(str(ROOT / "csrc" / "cuda" / "generated" / "*.cu"))))
        cxx.append("-DAE_WITH_CUDA")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-DAE_WITH_CUDA",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
        exts.append(CUDAExtension("attention_ext._C", c_sources + cu_sources,
                                  include_dirs=_cuda_include_dirs(), extra_link_args=LINK_FLAGS,
                                  extra_compile_args={"cxx": cxx, "nvcc": nvcc}))
    else:
        exts.append(CppExtension("attention_ext._C", c_sources, extra_compile_args={"cxx": cxx},
                                 extra_link_args=LINK_FLAGS))
    if platform.machine().lower() in ("x86_64", "amd64"):
        for isa, flags in ISA_FLAGS.items():
            name = f"_cpu_{isa}"
            exts.append(CppExtension(f"attention_ext.{name}", _rel(_isa_wrappers(isa)),
                                     extra_compile_args={"cxx": CXX_FLAGS + flags + [f"-DAE_MODULE_NAME={name}"]},
                                     extra_link_args=LINK_FLAGS))
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
