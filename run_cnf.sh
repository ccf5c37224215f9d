#!/usr/bin/env bash
# Sweep the comparison grid: datasets x solvers x precisions x loss-scaling variants x seeds.
#
#   bash run_cnf.sh [options] [-- extra cnf.py args]
#
# Options:
#   --study NAME       a named grid and recipe (study_preset below); the options after it narrow it:
#                      paper: the published study's grid and recipe (3 datasets, 2000 iterations, batch
#                      1024, Adam 1e-2 decayed at 1000, 128-point rk4), with 3 seeds instead of one;
#                      cpu: the same grid on 32 points, batch 256, cosine 1e-2, both penalties 1e-3, one thread
#   --datasets a,b     --solvers a,b     --precisions a,b     --seeds 0,1,2     narrow (or widen) the grid
#   --local [-j N]     run the cells here, N at a time (default when sbatch is missing). Each running
#                      cell gets one GPU, round robin, through CUDA_VISIBLE_DEVICES (GPUs from an existing
#                      CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`; none: the CPU). Default N: all GPU
#                      slots (GPUs x K), or 1 on the CPU
#   --per-gpu K        (local) at most K cells on each GPU at a time (default 1)
#   --dry-run          print the cells and exit
#   --wait             (SLURM) block until the array finishes; exit with its highest task exit code
#   --resume DIR       resubmit the cells of sweep DIR not finished (status.json neither "completed"
#                      nor "grid_exploited"); with --dry-run, only list them
#   --status DIR       one line per cell of sweep DIR: state, iteration, val NLL, ms/iter, ETA, job
#   --results-dir DIR  parent of the sweep folder (default ./results)
#   --partition P  --account A  --gpus N  --time T  --mem M  --cpus N
#                      SLURM overrides (also: SBATCH_PARTITION, SBATCH_ACCOUNT, ... from the environment)
#   --env-setup CMD    a line each job runs first, e.g. "source ~/venvs/cnf/bin/activate"
#                      (default: $CNF_ENV_SETUP)
set -euo pipefail
here=${BASH_SOURCE[0]}
case $here in */*) here=${here%/*} ;; *) here=. ;; esac  # bash alone: no dirname needed
KIT_DIR=$(cd "$here" && pwd)

# ---------------------------------------------------------------- the grid (data)
DATASETS=(8gaussians checkerboard rings circles moons swissroll 2spirals pinwheel)
SOLVERS=(torchdiffeq torchmpnode)
PRECISIONS=(float32 tfloat32 bfloat16 float16)  # names from choices.py; without CUDA, tfloat32 is skipped
# Every cell runs once per seed: the paired comparisons in summarize.py need at
# least three (see README, "How to read a comparison").
SEEDS=(0 1 2)
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
# Per-dataset arguments (the harder, sharper densities get more iterations). Measured on the
# 128-point grid (docs/experiments/2026-11-30-per-dataset-schedules.md): against the step schedule over the same iterations the
# cosine schedule's test NLL is 0.048 (checkerboard), 0.0095 (2spirals) and 0.0094 (pinwheel)
# nats lower; a cosine run over 2000 iterations is 0.109, 0.0089 and 0.0090 nats worse.
declare -A DATA_ARGS=(
  [checkerboard]="--niters 4000 --lr_schedule cosine" [2spirals]="--niters 4000 --lr_schedule cosine"
  [pinwheel]="--niters 3000 --lr_schedule cosine"
)
COMMON_ARGS="--method rk4 --num_timesteps 128"

# Named studies: a grid and its recipe, set in one place. paper: the published study's datasets,
# its recipe written out in full (so that a change of cnf.py's defaults cannot change it), its
# columns (float32, tfloat32 on CUDA, bfloat16, float16 with its solver's scaler and unscaled),
# and three seeds instead of its one (the paired intervals need three).
study_preset() {
  case "$1" in
    paper)
      DATASETS=(2spirals 8gaussians checkerboard); SOLVERS=(torchdiffeq torchmpnode)
      PRECISIONS=(float32 tfloat32 bfloat16 float16); SEEDS=(0 1 2)
      FP16_SCALERS_torchdiffeq=(grad none); FP16_SCALERS_torchmpnode=(dynamic none)
      DATA_ARGS=()
      COMMON_ARGS="--method rk4 --num_timesteps 128 --niters 2000 --num_samples 1024 --lr 1e-2 --lr_schedule step --lr_step 1000 --lr_gamma 0.1" ;;
    cpu)  # the same grid at the recipe measured in docs/experiments/2026-12-06-cpu-study-recipe.md
      study_preset paper
      DATA_ARGS=([8gaussians]="--niters 1500" [2spirals]="--niters 3000" [checkerboard]="--niters 10000")
      COMMON_ARGS="--method rk4 --num_timesteps 32 --num_samples 256 --lr 1e-2 --lr_schedule cosine --kinetic 0.001 --jacobian 0.001 --threads 1" ;;
    *) die "unknown study '$1' (choose from: paper, cpu)" ;;
  esac
}
# ---------------------------------------------------------------------------------

die() { echo "run_cnf.sh: error: $*" >&2; exit 2; }

mode=auto jobs="" per_gpu="" dry=0 wait=0 resume="" results="./results" env_setup="${CNF_ENV_SETUP:-}"
sb=()
while [ $# -gt 0 ]; do
  case "$1" in
    --study) study_preset "${2:?}"; shift 2 ;;
    --datasets) IFS=, read -ra DATASETS <<< "${2:?}"; shift 2 ;;
    --solvers) IFS=, read -ra SOLVERS <<< "${2:?}"; shift 2 ;;
    --precisions) IFS=, read -ra PRECISIONS <<< "${2:?}"; shift 2 ;;
    --seeds) IFS=, read -ra SEEDS <<< "${2:?}"; shift 2 ;;
    --local) mode=local; shift ;;
    -j) jobs=${2:?}; shift 2 ;;
    --per-gpu) per_gpu=${2:?}; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --wait) wait=1; shift ;;
    --resume) resume=${2:?}; shift 2 ;;
    --status) exec "${CNF_PYTHON:-python}" "$KIT_DIR/summarize.py" "${2:?}" --status ;;  # reads the sweep's files only
    --results-dir) results=${2:?}; shift 2 ;;
    --partition) sb+=(--partition="${2:?}"); shift 2 ;;
    --account) sb+=(--account="${2:?}"); shift 2 ;;
    --gpus) if [ "${2:?}" = 0 ]; then sb+=(--gres=none); else sb+=(--gres="gpu:$2"); fi; shift 2 ;;
    --time) sb+=(--time="${2:?}"); shift 2 ;;
    --mem) sb+=(--mem="${2:?}"); shift 2 ;;
    --cpus) sb+=(--cpus-per-task="${2:?}"); shift 2 ;;
    --env-setup) env_setup=${2?}; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
EXTRA=("$@")
[ -z "$jobs" ] || [[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "-j needs a positive integer, got $jobs"
[ -z "$per_gpu" ] || [[ "$per_gpu" =~ ^[1-9][0-9]*$ ]] || die "--per-gpu needs a positive integer, got $per_gpu"
if [ "$mode" = auto ]; then
  if command -v sbatch >/dev/null 2>&1; then mode=slurm; else mode=local; fi
fi
[ "$mode" = local ] || [ -z "$per_gpu" ] || die "--per-gpu is for --local sweeps (SLURM gives each task its own GPU)"
for e in "${@}"; do case "$e" in --seed|--seed=*) die "give seeds with --seeds, not as a cnf.py argument";; esac; done

# The Python every cell runs (job_cnf.sbatch reads it): $CNF_PYTHON, made absolute because
# SLURM jobs start in the kit folder; unset, each job takes python from its PATH.
if [ -n "${CNF_PYTHON:-}" ]; then
  case "$CNF_PYTHON" in
    */*) py="$(cd "${CNF_PYTHON%/*}/" 2>/dev/null && pwd || true)/${CNF_PYTHON##*/}" ;;
    *) py=$(command -v "$CNF_PYTHON" || true) ;;
  esac
  [ -x "$py" ] && [ ! -d "$py" ] || die "CNF_PYTHON=$CNF_PYTHON is not an executable"
  export CNF_PYTHON=$py
fi

# The kit's names (choices.py needs only the Python standard library, so any python3 reads it)
names_py=${CNF_PYTHON:-$(command -v python3 || command -v python || echo python3)}
choices() { "$names_py" "$KIT_DIR/choices.py" "$1" || die "cannot read the kit's $1 from choices.py with $names_py"; }
names=$(choices precisions) || exit 2  # (die in $(...) has said why, in one line)
mapfile -t KNOWN_PRECISIONS <<< "$names"
names=$(choices solvers) || exit 2
mapfile -t KNOWN_SOLVERS <<< "$names"
[ ${#KNOWN_PRECISIONS[@]} -gt 0 ] && [ ${#KNOWN_SOLVERS[@]} -gt 0 ] || die "cannot read the kit's names from choices.py"
valid() { local x=$1; shift; for v in "$@"; do [ "$v" = "$x" ] && return 0; done; return 1; }
for d in "${DATASETS[@]}"; do valid "$d" 8gaussians checkerboard rings circles moons swissroll 2spirals pinwheel || die "unknown dataset $d"; done
for s in "${SOLVERS[@]}"; do valid "$s" "${KNOWN_SOLVERS[@]}" || die "unknown solver $s (choose from ${KNOWN_SOLVERS[*]})"; done
for p in "${PRECISIONS[@]}"; do valid "$p" "${KNOWN_PRECISIONS[@]}" || die "unknown precision $p (choose from ${KNOWN_PRECISIONS[*]})"; done
[ ${#SEEDS[@]} -gt 0 ] || die "--seeds needs at least one seed"
declare -A seen=()
for r in "${SEEDS[@]}"; do
  [[ "$r" =~ ^[0-9]+$ ]] || die "a seed is a non-negative integer, got '$r'"
  [ -z "${seen[$r]:-}" ] || die "--seeds has $r twice"
  seen[$r]=1
done

# The GPUs local cells are spread over: the entries of an existing CUDA_VISIBLE_DEVICES
# (up to the first that is not a device, as CUDA reads it: "" or -1 hide every GPU),
# else the GPUs `nvidia-smi -L` lists, else none (the cells run on the CPU).
GPUS=()
detect_gpus() {
  local e
  GPUS=()
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    IFS=, read -ra cvd <<< "$CUDA_VISIBLE_DEVICES"
    for e in "${cvd[@]+"${cvd[@]}"}"; do
      [[ "$e" =~ ^([0-9]+|GPU-.+|MIG-.+)$ ]] || break
      GPUS+=("$e")
    done
  elif command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t GPUS < <(nvidia-smi -L 2>/dev/null | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p')
  fi
}
# Device slots for local cells: K per GPU, handed out round robin (g0 g1 ... g0 g1 ...), "cpu" without GPUs.
SLOTS=()
local_slots() {
  local k
  detect_gpus
  per_gpu=${per_gpu:-1}
  if [ ${#GPUS[@]} -gt 0 ]; then
    for ((k = 0; k < per_gpu; k++)); do SLOTS+=("${GPUS[@]}"); done
    jobs=${jobs:-${#SLOTS[@]}}
    if [ "$jobs" -gt ${#SLOTS[@]} ]; then
      echo "note: -j $jobs capped at ${#SLOTS[@]} (${#GPUS[@]} GPU(s) x --per-gpu $per_gpu)"; jobs=${#SLOTS[@]}
    fi
    SLOTS=("${SLOTS[@]:0:$jobs}")
    echo "local devices: GPU(s) ${GPUS[*]}, at most $per_gpu cell(s) per GPU, $jobs at a time"
  else
    jobs=${jobs:-1}
    for ((k = 0; k < jobs; k++)); do SLOTS+=(cpu); done
    echo "local devices: CPU (no GPU found), $jobs at a time"
  fi
}

# Without CUDA (local cells and no GPU found, or a SLURM sweep with --gpus 0) a precision that
# computes on a CPU exactly as another one (tfloat32 as float32; choices.py) would repeat its
# twin's cells: those are skipped.
cpu_only=0
if [ "$mode" = local ]; then detect_gpus; [ ${#GPUS[@]} -gt 0 ] || cpu_only=1; fi
for o in "${sb[@]+"${sb[@]}"}"; do [ "$o" = --gres=none ] && cpu_only=1; done
if [ -z "$resume" ] && [ "$cpu_only" = 1 ]; then
  mapfile -t CPU_PRECISIONS < <(choices cpu-precisions)
  declare -A TWIN=()
  while read -r p twin; do TWIN[$p]=$twin; done < <(choices cpu-twins)
  kept=() skipped=() why=()
  for p in "${PRECISIONS[@]}"; do
    if valid "$p" "${CPU_PRECISIONS[@]}"; then kept+=("$p"); else skipped+=("$p"); why+=("$p as ${TWIN[$p]:-?}"); fi
  done
  if [ ${#skipped[@]} -gt 0 ]; then
    twins=$(printf '%s, ' "${why[@]}")
    echo "note: no GPU here: skipping the ${skipped[*]} cells (on a CPU they compute exactly like another precision: ${twins%, })"
    [ ${#kept[@]} -gt 0 ] || die "nothing left to run: ${skipped[*]} on a CPU would repeat float32"
    PRECISIONS=("${kept[@]}")
  fi
fi

# Local cells run $CNF_PYTHON, else python from the PATH after the env setup line (job_cnf.sbatch).
# One without torch would fail every cell with a traceback, so it is refused once, before any cell
# starts or anything is written. (A SLURM job's PATH is the compute node's: it is not checked here.)
check_cell_python() {
  [ "$mode" = local ] || return 0
  local py
  py=$( { eval "$env_setup"; } </dev/null >/dev/null 2>&1; echo "${CNF_PYTHON:-$(command -v python || command -v python3 || echo python)}")
  "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' >/dev/null 2>&1 \
    || die "the cells' Python ($py) cannot import torch: activate the kit's virtual environment, or give CNF_PYTHON or --env-setup"
}

if [ -n "$resume" ]; then
  # ------------------------------------------------------------ resume a sweep
  [ -f "$resume/cells.tsv" ] || die "--resume $resume: not a sweep folder (no cells.tsv)"
  SWEEP=$(cd "$resume" && pwd)
  # the sweep's own env setup line, unless a new one is given
  [ -n "$env_setup" ] || env_setup=$(cat "$SWEEP/env_setup.sh" 2>/dev/null || true)
  ids=()
  while IFS=$'\t' read -r idx name _; do
    st="$SWEEP/runs/$name/status.json"
    # finished: completed, or stopped by --on_grid_exploit stop (resumed, it would stop again)
    if ! { [ -f "$st" ] && grep -Eq '"status": "(completed|grid_exploited)"' "$st"; }; then ids+=("$idx"); fi
  done < "$SWEEP/cells.tsv"
  echo "sweep $SWEEP: ${#ids[@]} of $(wc -l < "$SWEEP/cells.tsv") cells not finished${ids:+: ${ids[*]}}"
  [ ${#ids[@]} -gt 0 ] || exit 0
  [ "$dry" = 1 ] && exit 0
  check_cell_python
else
  # ------------------------------------------------------------ a new sweep: write its cells
  cells=()
  for d in "${DATASETS[@]}"; do
    for s in "${SOLVERS[@]}"; do
      for p in "${PRECISIONS[@]}"; do
        if [ "$p" = float16 ]; then eval "variants=(\"\${FP16_SCALERS_$s[@]}\")"; else variants=(none); fi
        for v in "${variants[@]}"; do
          for r in "${SEEDS[@]}"; do
            flags=""; [ "$p" = float16 ] && flags=${SCALER_FLAGS[$s:$v]}
            args="--data $d --odeint $s --precision $p $flags ${DATA_ARGS[$d]:-} $COMMON_ARGS --seed $r"
            for e in "${EXTRA[@]+"${EXTRA[@]}"}"; do args+=" $(printf '%q' "$e")"; done
            cells+=("${d}_${p}_${s}_${v}_s${r}"$'\t'"$(echo $args)")
          done
        done
      done
    done
  done
  if [ "$dry" = 1 ]; then
    for i in "${!cells[@]}"; do printf '%3d  %s\n' "$i" "${cells[$i]}"; done
    [ "$mode" = local ] && local_slots
    echo "${#cells[@]} cells ($mode)"
    exit 0
  fi
  check_cell_python
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
  echo "summarize with: ${CNF_PYTHON:-python} $KIT_DIR/summarize.py $SWEEP"
  exit $rc
fi

# ---------------------------------------------------------------- local mode
local_slots
echo "running ${#ids[@]} cells locally"
export KIT_DIR
# The free device slots wait in a pipe: a cell takes one before it starts and puts
# it back when it ends, so no GPU ever runs more than --per-gpu cells at once.
fifo=$(mktemp -u "${TMPDIR:-/tmp}/run_cnf.XXXXXX")
mkfifo "$fifo" && exec 3<>"$fifo" && rm -f "$fifo"
printf '%s\n' "${SLOTS[@]}" >&3

run_cell() {  # cell id, device slot ("cpu" or a GPU). The log is appended to: a resumed cell keeps both attempts.
  local id=$1 dev=$2 log="$SWEEP/slurm/local_$1.out" rc=0 where="CPU"
  [ "$dev" = cpu ] || where="GPU $dev"
  echo "cell $id: start on $where"
  if [ "$dev" = cpu ]; then
    SLURM_ARRAY_TASK_ID=$id bash "$KIT_DIR/job_cnf.sbatch" "$SWEEP" >> "$log" 2>&1 || rc=$?
  else
    CUDA_VISIBLE_DEVICES=$dev SLURM_ARRAY_TASK_ID=$id bash "$KIT_DIR/job_cnf.sbatch" "$SWEEP" >> "$log" 2>&1 || rc=$?
  fi
  if [ $rc -eq 0 ]; then echo "cell $id: ok on $where"; else echo "cell $id: exit $rc on $where (log: $log)"; fi
  echo "$dev" >&3
  return $rc
}

pids=()
for id in "${ids[@]}"; do
  read -r dev <&3
  run_cell "$id" "$dev" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exec 3>&-
echo "summarize with: ${CNF_PYTHON:-python} $KIT_DIR/summarize.py $SWEEP"
exit $rc
