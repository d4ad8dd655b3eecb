#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one prepared run (under 5 minutes on an H100):
# torch FP32 / FP16 / FP16 + channels_last (+ CUDA graph, + BN folding), torch.compile
# (reduce-overhead) at batch 256, ONNX Runtime CUDA where onnxruntime has that provider.
#
#   bash benchmarks/gpu_bench.sh                 # writes work/bench-gpu/ (or $OUT when set)
#   bash benchmarks/gpu_bench.sh --checkpoint logs/.../model_best.pth --routes fp16-cl-graph,compile
#
# Everything the run prints (torch.compile's logs too) goes to $OUT/gpu_bench.log; the short
# table ($OUT/gpu_table.md) is printed last. Extra arguments go to benchmarks/gpu_bench.py.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-work/bench-gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv 2>&1 || echo "nvidia-smi not available"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  "$PY" benchmarks/common.py  # machine, CPU model and flags, load average, versions
} >"$LOG" 2>&1
timeout 285 "$PY" benchmarks/gpu_bench.py --out "$OUT" "$@" >>"$LOG" 2>&1
status=$?
[ "$status" = 124 ] && echo "gpu_bench.py stopped at its 285 s limit; the table holds what finished" >>"$LOG"
if [ -s "$OUT/gpu_table.md" ]; then
  grep "^\[gpu_bench" "$LOG" | tail -n 4
  cat "$OUT/gpu_table.md"
else
  echo "no table was written (exit $status); the end of $LOG:"
  tail -n 30 "$LOG"
fi
exit "$status"
