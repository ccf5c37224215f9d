#!/usr/bin/env bash
# The GPU checks in one go, for a short GPU slot. The default steps' time limits add up
# to at most 6 minutes, with GPU_CHECK_TUNE=1 at most 8:
#   1. compile  tools.warm_kernels: every fused-kernel variant the later steps launch, compiled
#               in parallel processes into Triton's per-user cache (GPU_CHECK_TUNE=1: also
#               the kernel sweep's), so that the later steps time steady state
#   2. pytest   pytest -m cuda: the fused-kernel checks, compiled, at full size
#   3. bench    bench.py: torch vs triton in every precision, the CUDA-graph and fused-Adam
#               options; one row per path is written to bench.json and bench_table.md as
#               soon as that path finishes
#   4. cnf      one default `cnf.py` run on an empty Triton cache of its own (its wall time
#               is the cold-cache figure): which backend ran, its ms/iter; a run that
#               fell back to the torch backend is a failed step, with the reason
#   GPU_CHECK_TUNE=1 adds:
#   5. sweep    tools.kernel_sweep: the fused kernels' samples and warps per program
#               (float32 and float16 parts; see the step for the others)
#   6. profile  bench.py --profile triton: where an iteration's time goes
#
#   bash tools/gpu_check.sh [OUT_DIR]      (from the kit's root; default: results/gpu_check_<time>)
#
# OUT_DIR then holds at most 7 small files: summary.txt (one line per step: status, exit
# code, wall and limit seconds; then the cnf run's backend and speed), versions.txt,
# bench_table.md, bench.json, cnf_log_tail.txt, sweep_table.md, profile.txt; and one
# archive, everything.tar.gz, with each step's full log and the cnf run folder (without
# its checkpoint). The exit code is 0 when every step passed, 1 when one failed or timed
# out, 2 when this machine has no CUDA GPU (nothing is run, nothing written).
#
# PYTHON=... picks the interpreter (default: the first of python3, python that imports
# torch). For tests, GPU_CHECK_STUBS=DIR runs DIR/probe instead of the GPU probe and
# DIR/<step> instead of each step's command (same arguments), and GPU_CHECK_TIME_SCALE
# multiplies every limit.
set -uo pipefail
out_arg=${1:-}
[ -z "$out_arg" ] || [ "${out_arg:0:1}" = / ] || out_arg=$PWD/$out_arg  # relative to where it was called
cd "$(dirname "$0")/.."  # the kit's root: every step runs from there
stubs=${GPU_CHECK_STUBS:-}
scale=${GPU_CHECK_TIME_SCALE:-1}
tune=${GPU_CHECK_TUNE:-0}

# Step limits in seconds, leaving ~20 s of the slot for the probe, versions.txt, the
# report and the archive. Default: 65 + 105 + 100 + 70 = 340 <= 360; with tuning the
# compile step also builds the sweep's variants: 105 + 105 + 100 + 70 + 60 + 25 = 465 <= 480.
limit_compile=65
[ "$tune" = 1 ] && limit_compile=105
limit_pytest=105
limit_bench=100
limit_cnf=70
limit_sweep=60
limit_profile=25

candidates=(python3 python)
[ -n "${PYTHON:-}" ] && candidates=("$PYTHON")  # PYTHON: that one only
py=
for candidate in "${candidates[@]}"; do
  if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" > /dev/null 2>&1; then
    py=$(command -v "$candidate")
    break
  fi
done
if [ -z "$py" ]; then
  echo "gpu_check.sh: no Python here imports torch (tried ${PYTHON:-python3, python}; set PYTHON=...)" >&2
  exit 2
fi
if [ -n "$stubs" ]; then
  probe=("$stubs/probe")
else
  probe=("$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)")
fi
if ! "${probe[@]}" > /dev/null 2>&1; then
  echo "gpu_check.sh: no CUDA GPU on this machine (torch.cuda.is_available() is False in $py); nothing was run" >&2
  exit 2
fi

out=${out_arg:-results/gpu_check_$(date +%Y%m%d-%H%M%S)}
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "gpu_check.sh: $out already holds results; give a new folder" >&2
  exit 2
fi
work=$out/work  # step logs and the cnf run; archived at the end
mkdir -p "$work"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "python $py"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu /'
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} > "$out/versions.txt"
cat "$out/versions.txt"

status=0
step() {  # step NAME LIMIT CMD...: runs CMD (or the stub), logs to work/NAME.log, one summary line
  local name=$1 limit=$2 t0 rc verdict applied
  shift 2
  [ -n "$stubs" ] && set -- "$stubs/$name" "${@:2}"
  applied=$(awk -v l="$limit" -v s="$scale" 'BEGIN { printf "%.3f", l * s }')
  t0=$(date +%s%N)
  timeout --signal=TERM --kill-after=5 "$applied" "$@" > "$work/$name.log" 2>&1
  rc=$?
  case $rc in
    0) verdict=ok ;;
    124 | 137) verdict=TIMEOUT ;;
    *) verdict=FAILED ;;
  esac
  [ "$rc" -eq 0 ] || status=1
  printf '%-8s %-7s rc=%-3s wall=%6.1fs limit=%ss  %s\n' "$name" "$verdict" "$rc" \
    "$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { print (b - a) / 1e9 }')" "$limit" "$*" | tee -a "$out/summary.txt"
  return "$rc"
}

step compile "$limit_compile" "$py" -m tools.warm_kernels --device cuda --jobs 8 $([ "$tune" = 1 ] && echo --tune)
step pytest "$limit_pytest" "$py" -m pytest -q -m cuda -p no:cacheprovider
step bench "$limit_bench" "$py" bench.py --device cuda --iters 10 --json "$out/bench.json" --table "$out/bench_table.md" \
  --paths torchmpnode triton torchmpnode-bf16 triton-bf16 torchmpnode-fp16 triton-fp16 \
  triton+graph triton-bf16+graph triton+fused_adam
TRITON_CACHE_DIR=$work/cold_triton_cache step cnf "$limit_cnf" "$py" cnf.py --results_dir "$work/runs"
# which backend the default run used, and how fast: a fallback to torch is a failed step
"$py" -m tools.run_report "$work/runs" --expect-backend triton --log-tail "$out/cnf_log_tail.txt" \
  >> "$out/summary.txt" 2>&1 || status=1
if [ "$tune" = 1 ]; then
  # the parts whose variants the compile step built (float32, float16 with the DynamicScaler);
  # the bfloat16 parts and `options` (padded rows, partial-buffer budgets) compile ~50 more
  # variants and do not fit: run them by hand, `python -m tools.kernel_sweep --device cuda options`
  step sweep "$limit_sweep" "$py" -m tools.kernel_sweep --device cuda \
    forward-float32 backward-float32 forward-float16 backward-float16
  grep '^|' "$work/sweep.log" > "$out/sweep_table.md" 2>/dev/null
  step profile "$limit_profile" "$py" bench.py --device cuda --profile triton --iters 5
  cp "$work/profile.log" "$out/profile.txt" 2>/dev/null
fi

find "$work" -name 'ckpt.pth*' -delete
rm -rf "$work/cold_triton_cache"
tar -czf "$out/everything.tar.gz" -C "$work" . && rm -rf "$work"
echo "gpu_check: $([ "$status" = 0 ] && echo 'every step passed' || echo 'a step failed or timed out; see above')" \
  | tee -a "$out/summary.txt"
exit $status
