#!/usr/bin/env bash
# One go on a GPU machine: build attention_ext against the machine's torch, run the CUDA
# tests, run the GPU benchmarks, and write benchmarks/RESULTS.md's "gpu" section with the
# device, torch version and commit. Logs land in $OUT (default /tmp/attention_ext_gpu).
#
#   bash benchmarks/run_gpu.sh            # full
#   QUICK=1 bash benchmarks/run_gpu.sh    # one size per benchmark section
#   PREBUILT=1 ...                        # skip the build (modules already in attention_ext/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/attention_ext_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | head -1)
[ -n "$dirty" ] && commit="$commit (with uncommitted changes)"

if [ -z "${PREBUILT:-}" ]; then
  echo "== build"
  # A g++ wrapper that links libstdc++ internals statically into _C made every
  # TORCH_CHECK message with an int64 crash on one GPU image; the system compiler is safe.
  [ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
$PY -c "import attention_ext as a; assert a._C.cuda_built, 'built without CUDA'; print('cuda_built', a._C.cuda_built)" || exit 1

echo "== CUDA tests"
timeout ${TEST_TIMEOUT:-900} $PY -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tee "$OUT/tests.log" | tail -15
tests_line=$(grep -E "passed|failed" "$OUT/tests.log" | tail -1)

echo "== GPU benchmarks"
flags=""
[ -n "${QUICK:-}" ] && flags="--quick"
timeout ${BENCH_TIMEOUT:-900} $PY -m benchmarks gpu_check --device cuda --budget ${BUDGET:-60} $flags 2>&1 | tee "$OUT/bench.log"

$PY - "$OUT" "$commit" "$tests_line" <<'EOF'
import sys
from pathlib import Path
from benchmarks import _util as U  # PYTHONPATH holds the repo root
out, commit, tests = sys.argv[1:4]
device = Path(out, "device.txt").read_text().strip().replace("\n", ", ")
bench = Path(out, "bench.log").read_text()
tables = bench[bench.find("###"):] if "###" in bench else bench
body = (f"## GPU: CUDA tests and benchmarks\n\n`bash benchmarks/run_gpu.sh`\n\n{device}, commit `{commit}`.\n\n"
        f"CUDA tests (`pytest -k cuda tests`): {tests}\n\n{tables}")
U.write_section("gpu", body)
print(body)
EOF
