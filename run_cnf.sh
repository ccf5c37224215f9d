#!/usr/bin/env bash
# Sweep the comparison grid: datasets x solvers x precisions x loss-scaling variants.
#
#   bash run_cnf.sh [options] [-- extra cnf.py args]
#
# Options:
#   --datasets a,b     --solvers a,b     --precisions a,b     narrow the grid
#   --local [-j N]     run the cells here, N at a time (default when sbatch is missing)
#   --dry-run          print the cells and exit
#   --wait             (SLURM) block until the array finishes; exit with its highest task exit code
#   --resume DIR       resubmit the cells of sweep DIR whose status.json is not "completed"
#   --results-dir DIR  parent of the sweep folder (default ./results)
#   --partition P  --account A  --gpus N  --time T  --mem M  --cpus N
#                      SLURM overrides (also: SBATCH_PARTITION, SBATCH_ACCOUNT, ... from the environment)
#   --env-setup CMD    a line each job runs first, e.g. "source ~/venvs/cnf/bin/activate"
#                      (default: $CNF_ENV_SETUP)
set -euo pipefail
KIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---------------------------------------------------------------- the grid (data)
DATASETS=(8gaussians checkerboard rings circles moons swissroll 2spirals pinwheel)
SOLVERS=(torchdiffeq torchmpnode)
PRECISIONS=(float32 tfloat32 bfloat16 float16)
# Loss-scaling variants per solver in float16 (the published study's set);
# every other precision runs unscaled.
FP16_SCALERS_torchdiffeq=(none grad)
FP16_SCALERS_torchmpnode=(none grad dynamic)
# cnf.py flags for each variant
declare -A SCALER_FLAGS=(
  [torchdiffeq:none]="--no_grad_scaler" [torchdiffeq:grad]=""
  [torchmpnode:none]="--no_dynamic_scaler" [torchmpnode:grad]="--no_dynamic_scaler --grad_scaler"
  [torchmpnode:dynamic]=""
)
# Per-dataset arguments (the harder, sharper densities get more iterations).
declare -A DATA_ARGS=(
  [checkerboard]="--niters 4000" [2spirals]="--niters 4000" [pinwheel]="--niters 3000"
)
COMMON_ARGS="--method rk4 --num_timesteps 128 --seed 0"
# ---------------------------------------------------------------------------------

die() { echo "run_cnf.sh: error: $*" >&2; exit 2; }

mode=auto jobs=1 dry=0 wait=0 resume="" results="./results" env_setup="${CNF_ENV_SETUP:-}"
sb=()
while [ $# -gt 0 ]; do
  case "$1" in
    --datasets) IFS=, read -ra DATASETS <<< "${2:?}"; shift 2 ;;
    --solvers) IFS=, read -ra SOLVERS <<< "${2:?}"; shift 2 ;;
    --precisions) IFS=, read -ra PRECISIONS <<< "${2:?}"; shift 2 ;;
    --local) mode=local; shift ;;
    -j) jobs=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --wait) wait=1; shift ;;
    --resume) resume=${2:?}; shift 2 ;;
    --results-dir) results=${2:?}; shift 2 ;;
    --partition) sb+=(--partition="${2:?}"); shift 2 ;;
    --account) sb+=(--account="${2:?}"); shift 2 ;;
    --gpus) if [ "${2:?}" = 0 ]; then sb+=(--gres=none); else sb+=(--gres="gpu:$2"); fi; shift 2 ;;
    --time) sb+=(--time="${2:?}"); shift 2 ;;
    --mem) sb+=(--mem="${2:?}"); shift 2 ;;
    --cpus) sb+=(--cpus-per-task="${2:?}"); shift 2 ;;
    --env-setup) env_setup=${2?}; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
EXTRA=("$@")
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "-j needs a positive integer, got $jobs"
if [ "$mode" = auto ]; then
  if command -v sbatch >/dev/null 2>&1; then mode=slurm; else mode=local; fi
fi

valid() { local x=$1; shift; for v in "$@"; do [ "$v" = "$x" ] && return 0; done; return 1; }
for d in "${DATASETS[@]}"; do valid "$d" 8gaussians checkerboard rings circles moons swissroll 2spirals pinwheel || die "unknown dataset $d"; done
for s in "${SOLVERS[@]}"; do valid "$s" torchdiffeq torchmpnode || die "unknown solver $s"; done
for p in "${PRECISIONS[@]}"; do valid "$p" float32 tfloat32 bfloat16 float16 || die "unknown precision $p"; done

if [ -n "$resume" ]; then
  # ------------------------------------------------------------ resume a sweep
  [ -f "$resume/cells.tsv" ] || die "--resume $resume: not a sweep folder (no cells.tsv)"
  SWEEP=$(cd "$resume" && pwd)
  ids=()
  while IFS=$'\t' read -r idx name _; do
    st="$SWEEP/runs/$name/status.json"
    if ! { [ -f "$st" ] && grep -q '"status": "completed"' "$st"; }; then ids+=("$idx"); fi
  done < "$SWEEP/cells.tsv"
  echo "sweep $SWEEP: ${#ids[@]} of $(wc -l < "$SWEEP/cells.tsv") cells not completed${ids:+: ${ids[*]}}"
  [ ${#ids[@]} -gt 0 ] || exit 0
else
  # ------------------------------------------------------------ a new sweep: write its cells
  cells=()
  for d in "${DATASETS[@]}"; do
    for s in "${SOLVERS[@]}"; do
      for p in "${PRECISIONS[@]}"; do
        if [ "$p" = float16 ]; then eval "variants=(\"\${FP16_SCALERS_$s[@]}\")"; else variants=(none); fi
        for v in "${variants[@]}"; do
          flags=""; [ "$p" = float16 ] && flags=${SCALER_FLAGS[$s:$v]}
          args="--data $d --odeint $s --precision $p $flags ${DATA_ARGS[$d]:-} $COMMON_ARGS"
          for e in "${EXTRA[@]+"${EXTRA[@]}"}"; do args+=" $(printf '%q' "$e")"; done
          cells+=("${d}_${p}_${s}_${v}"$'\t'"$(echo $args)")
        done
      done
    done
  done
  if [ "$dry" = 1 ]; then
    for i in "${!cells[@]}"; do printf '%3d  %s\n' "$i" "${cells[$i]}"; done
    echo "${#cells[@]} cells ($mode)"
    exit 0
  fi
  mkdir -p "$results"
  stamp=$(date +%Y%m%d-%H%M%S)
  for k in "" -1 -2 -3 -4 -5 -6 -7 -8 -9; do
    if mkdir "$results/sweep_$stamp$k" 2>/dev/null; then SWEEP=$(cd "$results/sweep_$stamp$k" && pwd); break; fi
  done
  [ -n "${SWEEP:-}" ] || die "could not create a sweep folder under $results"
  mkdir -p "$SWEEP/runs" "$SWEEP/slurm"
  for i in "${!cells[@]}"; do printf '%d\t%s\n' "$i" "${cells[$i]}"; done > "$SWEEP/cells.tsv.tmp"
  mv "$SWEEP/cells.tsv.tmp" "$SWEEP/cells.tsv"
  ids=("${!cells[@]}")
  echo "sweep $SWEEP: ${#cells[@]} cells"
fi
printf '%s\n' "$env_setup" > "$SWEEP/env_setup.sh"

if [ "$mode" = slurm ]; then
  array=$(IFS=,; echo "${ids[*]}")
  cmd=(sbatch --parsable --array="$array" --chdir="$KIT_DIR"
       --output="$SWEEP/slurm/%A_%a.out" --error="$SWEEP/slurm/%A_%a.out" "${sb[@]+"${sb[@]}"}")
  [ "$wait" = 1 ] && cmd+=(--wait)
  echo "${cmd[*]} $KIT_DIR/job_cnf.sbatch $SWEEP"
  set +e
  jobid=$("${cmd[@]}" "$KIT_DIR/job_cnf.sbatch" "$SWEEP")
  rc=$?
  set -e
  jobid=${jobid%%;*}
  if [ -z "$jobid" ]; then echo "run_cnf.sh: sbatch failed (exit $rc)" >&2; exit 1; fi
  echo "submitted array job $jobid (${#ids[@]} tasks); logs in $SWEEP/slurm/"
  echo "summarize with: python $KIT_DIR/summarize.py $SWEEP"
  exit $rc
fi

# ---------------------------------------------------------------- local mode
echo "running ${#ids[@]} cells locally, $jobs at a time"
export KIT_DIR SWEEP
printf '%s\n' "${ids[@]}" | xargs -P "$jobs" -I{} bash -c \
  'SLURM_ARRAY_TASK_ID={} bash "$KIT_DIR/job_cnf.sbatch" "$SWEEP" > "$SWEEP/slurm/local_{}.out" 2>&1 \
   && echo "cell {}: ok" || { rc=$?; echo "cell {}: exit $rc (log: $SWEEP/slurm/local_{}.out)"; exit 1; }' \
  && rc=0 || rc=1
echo "summarize with: python $KIT_DIR/summarize.py $SWEEP"
exit $rc
