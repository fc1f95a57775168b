#!/usr/bin/env bash
# One-off device session script (not part of the repo): compare tilings B (current
# default), V1 (bwd WK=2), V2 (bwd WK=2 + fwd BN=32); CUDA suite + benchmarks on the best.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
T0=$(date +%s)
el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
el start
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for v in B V1 V2; do
  rm -rf /tmp/$v && mkdir -p /tmp/$v && cp -r attention_ext tests benchmarks pyproject.toml .git /tmp/$v/
  so=.gpuvariant/_C.cpython-312-x86_64-linux-gnu.so; [ $v != B ] && so=.gpuvariant/$v/_C.cpython-312-x86_64-linux-gnu.so
  cp $so /tmp/$v/attention_ext/
done
OK="B"
for v in V1 V2; do
  (cd /tmp/$v && timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_attention.py > $OUT/t_$v.log 2>&1) && OK="$OK $v"
  el "$v tests: $(tail -1 $OUT/t_$v.log)"
done
for v in $OK; do
  (cd /tmp/$v && PYTHONPATH=/tmp/$v timeout 50 python3 benchmarks/gpu_attention_check.py --skip-flex --skip-ops --budget 14 2>&1 | grep -E "^\| [0-9]" | sed "s/^/$v /") >> $OUT/ab.log
done
cat $OUT/ab.log
WIN=$(python3 - $OUT/ab.log <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    c = [x.strip() for x in line.split("|")]
    if len(c) > 10 and c[6].replace(".", "").isdigit():
        r.setdefault(c[0], []).append(float(c[6]) + float(c[10]))
avg = {k: sum(v) / len(v) for k, v in r.items()}
print(avg, file=sys.stderr)
print(max(avg, key=avg.get) if avg else "B")
PY
)
el "winner $WIN"
cd /tmp/$WIN
PREBUILT=1 OUT=$OUT/main TEST_TIMEOUT=120 BENCH_TIMEOUT=150 BUDGET=30 bash benchmarks/run_gpu.sh > $OUT/main_console.log 2>&1
echo "variant $WIN" >> $OUT/main/device.txt
tail -1 $OUT/main/tests.log
el "ncu"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
cat > /tmp/prof.py <<'PY'
import torch, attention_ext as ae
q, k, v = (torch.randn(1, 16, 8192, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
ae.flash_attention(q, k, v, causal=True).sum().backward()
torch.cuda.synchronize()
PY
[ -n "$NCU" ] && PYTHONPATH=/tmp/$WIN timeout 45 $NCU -k regex:tc_ -c 2 --section SpeedOfLight --section Occupancy --section LaunchStats python3 /tmp/prof.py > $OUT/ncu.txt 2>&1
el end
