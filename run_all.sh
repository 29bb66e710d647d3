#!/bin/bash
# trmx research roadmap: every experiment of the plan, phase by phase.
#
#   ./run_all.sh phase2                    # E2.x at paper scale into runs/ (all: every phase)
#   ./run_all.sh e2_2_t_n_grid             # one experiment (configs/NAME.flags), all its points
#   ./run_all.sh tasks                     # Maze-Hard, ARC-AGI-1, ARC-AGI-2 (the data built first)
#   ./run_all.sh --dry_run all             # print the commands only
#   ./run_all.sh --mini phase2             # the CPU mini-study (configs/mini.flags), runs/mini
#   ./run_all.sh --smoke all               # every experiment, 5 steps at a tiny size (CI)
#   ./run_all.sh sudoku_cpu                # any other flagfile runs as it is
#
# An experiment is configs/NAME.flags holding only its overrides of the baseline E1.1
# (configs/sudoku_mlp.flags); one run of it is
#   python train.py --flagfile=configs/sudoku_mlp.flags --flagfile=configs/NAME.flags
#       [sweep point] --workdir=RUNS/NAME[/POINT]
# Lines in the flagfile that run_all.sh reads (train.py sees them as comments):
#   # sweep: --a=1,2 --b=x,y    the runs are the cartesian product, one directory each (a-1_b-x)
#   # mini: ...                 the same for the mini-study; no such line: not in the mini-study
#   # then: --eval_only ...     a second command after each finished run, with these flags added
#   # skip: --a=2 --b=y         leave out the points with all of these (the same run as E1.1)
#   # init_from: NAME           start from (or, with --eval_only, evaluate) RUNS/NAME's weights
# --mini puts configs/mini.flags in place of the baseline, --smoke configs/smoke.flags (then
# forces built-in data and 5 steps, and runs only the first point of each sweep).
# A run directory with done.json (written by train.py at the end) is skipped; an interrupted
# one resumes from its newest checkpoint: rerunning the same command finishes the roadmap.
# A run that ends restartable (train.py's exit 75: a lost process, or a last checkpoint that
# could not be written), killed by a signal, or stopped before its end without done.json
# (SIGTERM: a preempted VM; checked where RUNS is a local folder) is started again, up to
# --max_restarts times (default 3), with one line per restart; a run that fails otherwise (a
# user error: exit 1) is not.
#
# On every worker of a Cloud TPU VM slice (one process per host, jax.distributed):
#   ./run_all.sh --tpu=trmx-v4-32 --zone=us-central2-b --runs=gs://BUCKET/runs \
#       --data=gs://BUCKET/data phase1
#   This copies the checked-in code to ~/trmx on every worker, installs requirements.txt with
#   jax[tpu], copies --data to ~/trmx/data, then starts each run on all workers at once with
#   --distributed (train.py itself skips a finished run there). Logs (flags.txt,
#   metrics.jsonl, TensorBoard events) go to RUNS/NAME.
# The interpreter is $PYTHON (e.g. PYTHON=venv/bin/python for a virtual environment that is
# not activated), else `python`, else `python3`.
#
# Before spending TPU time: compile every point for a slice here, on CPU (bench.py --aot):
#   ./run_all.sh --aot=v4-32 all           # runs/aot-v4-32/NAME[/POINT]/aot.json, then TABLE.md
#                                          # (--runs=DIR: elsewhere)
#   One Markdown table of every point: per-chip memory and whether it fits, roofline step
#   time, estimated hours, gradient all-reduce bytes. A point with aot.json is skipped.
# Flags after `--` go to every train.py, e.g. `./run_all.sh sudoku_cpu -- --max_steps=100`.
# Long runs: start it inside `screen` or `tmux`; progress is in RUNS/NAME/metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")"

phase1=(sudoku_mlp e4_5_test_time e1_3_batch)
phase2=(e2_1_ema_off e2_2_t_n_grid e2_3_attention e2_4_n_sup)
phase3=(e3_1_model_size e3_2_data_size e3_3_augmentation e3_4_lr_vs_batch)
phase4=(e4_1_curriculum e4_2_halting e4_3_precision e4_4_checkpoint_avg)
tasks=(maze_hard arc1 arc2)  # the paper's other benchmarks, each its own flagfile
roadmap=" ${phase1[*]} ${phase2[*]} ${phase3[*]} ${phase4[*]} "

die() { echo "run_all.sh: $*" >&2; exit 2; }

python=${PYTHON:-python}
[[ -n "${PYTHON:-}" ]] || command -v python >/dev/null || python=python3
command -v "$python" >/dev/null || die "no interpreter $python (set PYTHON to one with the requirements)"

dry_run=0 mode=paper aot="" tpu="" zone="" project="" runs="" data="" targets=() extra=()
max_restarts=3
while (($#)); do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --mini) mode=mini ;;
    --smoke) mode=smoke ;;
    --aot=*) aot="${1#*=}" ;;
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --runs=*) runs="${1#*=}" ;;
    --data=*) data="${1#*=}" ;;
    --max_restarts=*) max_restarts="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option $1 (see the header of $0)" ;;
    *) targets+=("$1") ;;
  esac
  shift
done
((${#targets[@]})) || die "name a phase (phase1..phase4, all, tasks) or an experiment (configs/*.flags)"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max_restarts=$max_restarts: a count, >= 0"
[[ -z "$aot" || ( $mode == paper && -z "$tpu" ) ]] || die "--aot compiles the paper runs here"
[[ -z "$aot" || -n "$runs" ]] || runs="runs/aot-$aot"
[[ -n "$runs" ]] || runs=$([[ $mode == paper ]] && echo runs || echo "runs/$mode")
experiments=()
for t in "${targets[@]}"; do
  case "$t" in
    phase[1-4]) n="phase${t#phase}[@]"; experiments+=("${!n}") ;;
    all) experiments+=("${phase1[@]}" "${phase2[@]}" "${phase3[@]}" "${phase4[@]}") ;;
    tasks) experiments+=("${tasks[@]}") ;;
    *) [[ -f "configs/$t.flags" ]] || die "no configs/$t.flags (nor phase1..phase4, all, tasks)"
       experiments+=("$t") ;;
  esac
done
if [[ -n "$tpu" ]]; then
  [[ $mode == paper ]] || die "--$mode runs here, not with --tpu"
  [[ -n "$zone" ]] || die "--tpu needs --zone"
  [[ "$runs" == gs://* ]] || die "--tpu needs --runs=gs://BUCKET/..."
fi

run() {  # print (quoted, copy-pasteable), then run unless --dry_run
  printf '+'; printf ' %q' "$@"; printf '\n'
  ((dry_run)) || "$@"
}

directive() {  # the text after "# KEY:" in flagfile $1, or nothing; status 1 if no such line
  local line
  line=$(grep -m1 "^# $2:" "$1") || return 1
  line=${line#*:}
  echo "${line# }"
}

points() {  # one line per point of the cartesian product of "--a=1,2 --b=x,y"
  if (($# == 0)); then echo; return; fi
  local first=$1 tail v
  shift
  local -a values
  IFS=, read -ra values <<< "${first#*=}"
  while IFS= read -r tail; do
    for v in "${values[@]}"; do echo "${first%%=*}=$v${tail:+ $tail}"; done
  done < <(points "$@")
}

matches() {  # whether every flag of "$1" is among the rest
  local f
  for f in $1; do [[ " ${*:2} " == *" $f "* ]] || return 1; done
}

point_dir() {  # "--a=1 --b=x" -> "a-1_b-x"
  local name="" f
  for f in "$@"; do f=${f#--}; name+="${name:+_}${f%%=*}-${f#*=}"; done
  echo "$name"
}

if [[ -n "$tpu" ]]; then
  gcloud_tpu=(gcloud compute tpus tpu-vm)
  where=(--zone="$zone" ${project:+--project="$project"} --worker=all)
  archive=$(mktemp -d)/trmx.tgz
  run tar czf "$archive" $(git ls-files)
  run "${gcloud_tpu[@]}" scp "$archive" "$tpu:trmx.tgz" "${where[@]}"
  setup="mkdir -p ~/trmx && tar xzf ~/trmx.tgz -C ~/trmx && cd ~/trmx"
  setup+=" && pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
  [[ -z "$data" ]] || setup+=" && gcloud storage rsync -r '$data' data"
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="$setup"
fi

launch() {  # one train.py command, here or on every TPU worker
  if [[ -z "$tpu" ]]; then
    run "$python" train.py "$@"
  else
    local cmd="cd ~/trmx && python3 train.py" x
    for x in "$@" --distributed; do cmd+=" $(printf '%q' "$x")"; done
    run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="$cmd"
  fi
}

interrupted=0  # Ctrl-C during a run: train.py saves and exits 0; no restart, run_all.sh stops

train() {  # launch, and launch again while the run ends restartable (see the header)
  local dir=$1 restarts=0 status why
  shift
  while :; do
    status=0
    trap 'interrupted=1' INT
    launch "$@" || status=$?
    trap - INT
    ((!dry_run)) || return 0
    ((!interrupted)) || { echo "run_all.sh: interrupted; rerun the same command to resume" >&2; exit 130; }
    case $status in
      0) [[ -n "$tpu" || "$dir" == *://* || -f "$dir/done.json" ]] && return 0
         why="stopped before its end (no done.json: preempted?)" ;;
      75) why="ended restartable (exit 75: a lost process or an unsaved last checkpoint)" ;;
      255) [[ -n "$tpu" ]] || return $status; why="lost the ssh connection to the workers (exit 255)" ;;
      *) ((status > 128)) || return $status; why="was killed by signal $((status - 128))" ;;
    esac
    ((restarts < max_restarts)) || die "$dir $why; gave up after $max_restarts restarts"
    restarts=$((restarts + 1))
    echo "run_all.sh: $dir $why; restart $restarts/$max_restarts" >&2
  done
}

aot_total=0 aot_done=0
if [[ -n "$aot" ]] && ((!dry_run)); then  # the points left to compile, for the ETA
  aot_total=$("$0" --dry_run --aot="$aot" --runs="$runs" "${targets[@]}" -- "${extra[@]}" |
    grep -c '^+ ' || true)
fi

compile_point() {  # --aot: compile one point for the slice; its report in $1/aot.json
  local dir=$1
  shift
  if [[ -f "$dir/aot.json" ]]; then echo "skip $dir: compiled (aot.json)"; return; fi
  local cmd=("$python" bench.py "$@" --aot="$aot" --json)
  printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
  if ((dry_run)); then return; fi
  mkdir -p "$dir"
  if "${cmd[@]}" > "$dir/aot.out" 2> >(tee "$dir/aot.err" >&2); then
    grep -v '^{' "$dir/aot.out" || true
    tail -n 1 "$dir/aot.out" > "$dir/aot.json"
  else
    echo "$dir: bench.py failed: $(tail -n 1 "$dir/aot.err")"
    "$python" -c 'import json, sys; print(json.dumps({"error": sys.argv[1]}))' \
      "$(tail -n 1 "$dir/aot.err")" > "$dir/aot.json"
  fi
  aot_done=$((aot_done + 1))
  echo "run_all.sh --aot: $aot_done/$aot_total points in $((SECONDS / 60)) min, ETA" \
    "$((SECONDS * (aot_total - aot_done) / aot_done / 60)) min" >&2
}

for e in "${experiments[@]}"; do
  file="configs/$e.flags"
  if [[ "$roadmap" == *" $e "* ]]; then  # overrides of a base: E1.1's, or mini's, or smoke's
    base=configs/sudoku_mlp.flags
    [[ $mode == paper ]] || base="configs/$mode.flags"
    files=(--flagfile="$base")
    [[ $e == sudoku_mlp ]] || files+=(--flagfile="$file")
    if from=$(directive "$file" init_from); then files+=(--init_from="$runs/$from"); fi
  elif [[ $mode == mini ]]; then
    echo "skip $e: not a roadmap experiment (the mini-study shrinks those)"; continue
  else
    files=(--flagfile="$file")
  fi
  spec=$(directive "$file" sweep) || spec=""
  if [[ $mode == mini ]]; then
    spec=$(directive "$file" mini) || { echo "skip $e: no '# mini:' line in $file"; continue; }
  fi
  then_flags=$(directive "$file" then) || then_flags=""
  skip_flags=$(directive "$file" skip) || skip_flags=""
  late=()  # smoke: built-in data, a few steps, whatever the experiment says
  [[ $mode != smoke ]] || late=(--data_paths= --max_steps=5 --ckpt_every=1 --eval_max_examples=8)
  while IFS= read -r point; do
    read -ra p <<< "$point"
    if [[ -n "$skip_flags" ]] && matches "$skip_flags" "${p[@]}"; then
      echo "skip $e ${p[*]}: the same run as E1.1 (# skip: in $file)"; continue
    fi
    dir="$runs/$e"
    ((${#p[@]} == 0)) || dir+="/$(point_dir "${p[@]}")"
    if [[ -n "$aot" ]]; then  # its eval-only `# then:` command compiles nothing new
      compile_point "$dir" "${files[@]}" "${p[@]}" "${extra[@]}"
      continue
    fi
    if [[ -z "$tpu" && -f "$dir/done.json" ]]; then
      echo "skip $dir: done (done.json)"; continue
    fi
    args=("${files[@]}" "${p[@]}" --workdir="$dir" "${late[@]}" "${extra[@]}")
    train "$dir" "${args[@]}"
    if [[ -n "$then_flags" ]]; then
      read -ra t <<< "$then_flags"
      train "$dir" "${args[@]}" "${t[@]}"
    fi
    [[ $mode != smoke ]] || break  # the first point of each sweep
  done < <(read -ra s <<< "$spec"; points "${s[@]}")
done
if [[ -n "$aot" ]] && ((!dry_run)); then
  "$python" bench.py --aot_table="$runs" --aot_command="./run_all.sh --aot=$aot ${targets[*]}" \
    > "$runs/TABLE.md"
  cat "$runs/TABLE.md"
fi
