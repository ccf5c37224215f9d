#!/usr/bin/env bash
# The GPU checks in one go, for a short GPU slot (step time limits add up to < 6 minutes):
#   1. pytest -m cuda      the fused-kernel checks, compiled, at full size (batch 1024, width 128, 128 points)
#   2. bench.py            torch vs triton backends in every precision (BENCHMARKS.md's GPU table)
#   3. python cnf.py       one default run (2000 iterations, validation, plots, GIF), with its wall time
#
#   bash gpu_check.sh [OUT_DIR]      (default: results/gpu_check_<time>)
#
# GPU_CHECK_TUNE=1 adds two steps (up to 3 more minutes): bench.py --kernel-sweep (the fused
# kernels' samples and warps per program) and bench.py --profile triton (where an iteration's
# time goes).
#
# Each step has its own time limit and log; a failed or timed-out step does not stop the
# next. OUT_DIR/summary.txt gets one line per step (exit code, wall seconds); the exit
# code is non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")"
out=${1:-results/gpu_check_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
py=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu /'
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} > "$out/versions.txt"
cat "$out/versions.txt"

status=0
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s%N)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '%-8s rc=%-3s wall=%6.1fs  %s\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { print (b - a) / 1e9 }')" "$*" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

step pytest 150 "$py" -m pytest -q -m cuda -p no:cacheprovider
step bench 110 "$py" bench.py --device cuda --iters 10 --json "$out/bench.json" --paths \
  torchmpnode triton torchmpnode-tf32 triton-tf32 torchmpnode-bf16 triton-bf16 torchmpnode-fp16 triton-fp16
step cnf 75 "$py" cnf.py --results_dir "$out/runs"
if [ "${GPU_CHECK_TUNE:-0}" = 1 ]; then
  step sweep 100 "$py" bench.py --device cuda --kernel-sweep
  step profile 40 "$py" bench.py --device cuda --profile triton --iters 5
fi
tail -n 12 "$out/bench.log" > "$out/bench_table.md"
grep -h "completed\|diverged\|interrupted\|val NLL" "$out"/runs/*/*.txt 2>/dev/null | tail -n 3 >> "$out/summary.txt"
exit $status
