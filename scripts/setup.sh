#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the test/benchmark dependencies, and
# builds attention_ext in place against that torch. Safe to run again: it only rebuilds
# what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
TRANSFORMERS_SPEC=${TRANSFORMERS_SPEC:-transformers>=4.57,<6}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip 23.x mishandles --no-build-isolation -e (see ../shared/BUILD-NOTES.md)
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC" numpy pytest hypothesis expecttest ninja "setuptools>=69" wheel \
  "$TRANSFORMERS_SPEC" tqdm matplotlib
# CUDA kernels are compiled (and linked) whenever torch has CUDA and nvcc is found, so a
# CPU-only machine still catches CUDA build breakage; they only run on a GPU.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import attention_ext as a; print('attention_ext', a.__version__, 'CPU path', a.cpu_isa(), 'CUDA built', a._C.cuda_built)"
