#!/bin/bash
# trmx experiment launcher: each experiment is configs/NAME.flags, run as
#   python train.py --flagfile=configs/NAME.flags --workdir=RUNS/NAME [extra flags]
#
# Here, on this machine's devices (runs/ by default):
#   ./run_all.sh sudoku_cpu
#   ./run_all.sh --dry_run sudoku_mlp sudoku_att          # print the commands only
# On every worker of a Cloud TPU VM slice (one process per host, jax.distributed):
#   ./run_all.sh --tpu=trmx-v4-32 --zone=us-central2-b --runs=gs://BUCKET/runs \
#       --data=gs://BUCKET/data sudoku_mlp
#   This copies the checked-in code to ~/trmx on every worker, installs requirements.txt with
#   jax[tpu], copies --data to ~/trmx/data, then starts the run on all workers at once with
#   --distributed. Logs (flags.txt, metrics.jsonl, TensorBoard events) go to RUNS/NAME.
# Flags after `--` go to train.py, e.g. `./run_all.sh sudoku_cpu -- --max_steps=100`.
# Long runs: start it inside `screen` or `tmux`; progress is in RUNS/NAME/metrics.jsonl.
set -euo pipefail
cd "$(dirname "$0")"

dry_run=0 tpu="" zone="" project="" runs="runs" data="" experiments=() extra=()
while (($#)); do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --runs=*) runs="${1#*=}" ;;
    --data=*) data="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "run_all.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    *) experiments+=("$1") ;;
  esac
  shift
done
((${#experiments[@]})) || { echo "run_all.sh: name at least one experiment (configs/*.flags)" >&2; exit 2; }
for e in "${experiments[@]}"; do
  [[ -f "configs/$e.flags" ]] || { echo "run_all.sh: no configs/$e.flags" >&2; exit 2; }
done

run() {  # print (quoted, copy-pasteable), then run unless --dry_run
  printf '+'; printf ' %q' "$@"; printf '\n'
  ((dry_run)) || "$@"
}

if [[ -z "$tpu" ]]; then
  for e in "${experiments[@]}"; do
    run python train.py --flagfile="configs/$e.flags" --workdir="$runs/$e" "${extra[@]}"
  done
  exit 0
fi

[[ -n "$zone" ]] || { echo "run_all.sh: --tpu needs --zone" >&2; exit 2; }
[[ "$runs" == gs://* ]] || { echo "run_all.sh: --tpu needs --runs=gs://BUCKET/..." >&2; exit 2; }
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone" ${project:+--project="$project"} --worker=all)
archive=$(mktemp -d)/trmx.tgz
run tar czf "$archive" $(git ls-files)
run "${gcloud_tpu[@]}" scp "$archive" "$tpu:trmx.tgz" "${where[@]}"
setup="mkdir -p ~/trmx && tar xzf ~/trmx.tgz -C ~/trmx && cd ~/trmx"
setup+=" && pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
[[ -z "$data" ]] || setup+=" && gcloud storage rsync -r '$data' data"
run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="$setup"
for e in "${experiments[@]}"; do
  cmd="cd ~/trmx && python3 train.py --flagfile=configs/$e.flags --workdir=$runs/$e --distributed"
  for x in "${extra[@]}"; do cmd+=" $(printf '%q' "$x")"; done
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command="$cmd"
done
