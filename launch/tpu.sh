#!/usr/bin/env bash
# Cloud TPU: one command per stage, in the order you type them.
#
#   export PROJECT=my-project ZONE=us-central2-b BUCKET=my-bucket TPU_NAME=hm ACCELERATOR=v4-8
#   launch/tpu.sh create                        # the slice (SPOT=1: spot capacity; QUEUED=1: queued resource)
#   launch/tpu.sh setup                         # every worker: this commit, Python 3.11, hmlstm_jax[tpu]
#   launch/tpu.sh prepare text8                 # once: the dataset into gs://BUCKET/tensorflow_datasets
#   launch/tpu.sh run --flagfile=text8.flags    # every worker, detached; workdir gs://BUCKET/runs/RUN_NAME
#   launch/tpu.sh logs                          # follow worker 0's log
#   launch/tpu.sh stop                          # SIGTERM to the run: it checkpoints and exits 75
#   launch/tpu.sh delete                        # the slice (the bucket stays)
#   launch/tpu.sh up --flagfile=text8.flags     # create + setup + run: relaunches a preempted spot
#                                               # slice; the run resumes from its checkpoint in GCS
# Options: --dry-run (or DRY_RUN=1) prints every command without running it.
#
# The settings are the variables below (set them in the environment). What the run costs is
# the slice type (ACCELERATOR: chips and hosts) times the hours it is held, spot capacity being
# cheaper; delete the slice when the run is done. Prepare data before creating the slice
# (`prepare` runs on worker 0, so it needs the slice: or run its command on any machine).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ----------------------------------------------------------------------------- settings
PROJECT=${PROJECT:-}                       # Google Cloud project (required)
ZONE=${ZONE:-}                             # zone with TPU capacity, e.g. us-central2-b (required)
TPU_NAME=${TPU_NAME:-hmlstm}               # the slice's name
ACCELERATOR=${ACCELERATOR:-v4-8}           # slice type: v4-8 = 4 chips on 1 host; v4-32 = 16 chips on 4 hosts
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}    # TPU VM software version
SPOT=${SPOT:-0}                            # 1: spot capacity (cheaper; may be preempted)
QUEUED=${QUEUED:-0}                        # 1: create through a queued resource (waits for capacity)
BUCKET=${BUCKET:-}                         # GCS bucket for data, checkpoints, events (required by prepare/run)
RUN_NAME=${RUN_NAME:-$TPU_NAME}            # names the workdir and the log
MODULE=${MODULE:-experiments.charlm}       # the experiment binary
REPO=${REPO:-$(git -C "$here" remote get-url origin 2>/dev/null || true)}  # cloned by each worker
COMMIT=${COMMIT:-$(git -C "$here" rev-parse HEAD 2>/dev/null || true)}     # checked out there (push it first)
REMOTE_DIR=${REMOTE_DIR:-hmlstm_jax}       # the checkout on each worker (relative to its home)
DATA_DIR=${DATA_DIR:-gs://$BUCKET/tensorflow_datasets}
WORKDIR=${WORKDIR:-gs://$BUCKET/runs/$RUN_NAME}
GCLOUD=${GCLOUD:-gcloud}
DRY_RUN=${DRY_RUN:-0}

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu.sh [--dry-run] STAGE [ARGS...]
stages: create | setup | prepare DATASET [MANUAL_DIR] | run FLAGS... | logs | stop | delete | up FLAGS...
EOF
  exit 2
}

fail() {
  echo "tpu.sh: $*" >&2
  exit 2
}

require() {  # require VAR...: each must be set
  local name
  for name in "$@"; do
    [[ -n "${!name}" ]] || fail "set $name (e.g. export $name=...): see the settings at the top of launch/tpu.sh"
  done
}

quoted() {  # each argument as one shell word: bare when safe, else in single quotes
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

gc() {  # prints, then runs (unless a dry run), one gcloud command
  echo "+ $GCLOUD $(quoted "$@")" >&2
  [[ "$DRY_RUN" == 1 ]] || "$GCLOUD" "$@"
}

ssh_all() {  # ssh_all WORKER COMMAND: runs COMMAND on the worker(s) of the slice
  gc compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker="$1" \
    --command="$2"
}

stage_create() {
  require PROJECT ZONE
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --project="$PROJECT" \
      --zone="$ZONE" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${spot[@]}"
    echo "tpu.sh: waiting until the queued resource is ACTIVE (Ctrl-C stops waiting, not the request)" >&2
    local state=""
    while [[ "$DRY_RUN" != 1 && "$state" != ACTIVE ]]; do
      state=$("$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" --project="$PROJECT" \
        --zone="$ZONE" --format='value(state.state)')
      [[ "$state" == ACTIVE ]] || sleep 30
    done
  else
    gc compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
  fi
}

stage_setup() {
  require PROJECT ZONE REPO COMMIT
  ssh_all all "set -e; [ -d $(quoted "$REMOTE_DIR") ] || git clone -q $(quoted "$REPO") $(quoted "$REMOTE_DIR"); \
cd $(quoted "$REMOTE_DIR") && git fetch -q origin && git checkout -q $(quoted "$COMMIT") && bash launch/worker.sh setup"
}

stage_prepare() {
  require PROJECT ZONE BUCKET
  [[ $# -ge 1 && $# -le 2 ]] || fail "usage: launch/tpu.sh prepare DATASET [MANUAL_DIR] (e.g. prepare text8)"
  local manual=${2:-}
  local code="import sys; from hmlstm_jax import data; c = data.load(sys.argv[1], data_dir=sys.argv[2], \
manual_dir=sys.argv[3] or None); print(c.name, {k: len(v) for k, v in c.splits.items()})"
  ssh_all 0 "cd $(quoted "$REMOTE_DIR") && \${PYTHON:-\$HOME/hmlstm_venv/bin/python} -c $(quoted "$code") \
$(quoted "$1" "$DATA_DIR" "$manual")"
}

stage_run() {
  require PROJECT ZONE BUCKET
  [[ $# -ge 1 ]] || fail "usage: launch/tpu.sh run FLAGS... (e.g. run --flagfile=text8.flags)"
  ssh_all all "bash $(quoted "$REMOTE_DIR/launch/worker.sh") run $(quoted "$RUN_NAME" "$MODULE" \
    --distributed=on "--data_dir=$DATA_DIR" "--workdir=$WORKDIR" "$@")"
  echo "tpu.sh: follow it with: launch/tpu.sh logs; workdir $WORKDIR" >&2
}

stage_logs() {
  require PROJECT ZONE
  ssh_all 0 "bash $(quoted "$REMOTE_DIR/launch/worker.sh") logs $(quoted "$RUN_NAME")"
}

stage_stop() {
  require PROJECT ZONE
  ssh_all all "bash $(quoted "$REMOTE_DIR/launch/worker.sh") stop $(quoted "$RUN_NAME")"
}

stage_delete() {
  require PROJECT ZONE
  if [[ "$QUEUED" == 1 ]]; then
    gc compute tpus queued-resources delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --force --quiet
  else
    gc compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
  fi
}

[[ $# -ge 1 ]] || usage
if [[ "$1" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
  [[ $# -ge 1 ]] || usage
fi
stage=$1
shift
case "$stage" in
  create) stage_create ;;
  setup) stage_setup ;;
  prepare) stage_prepare "$@" ;;
  run) stage_run "$@" ;;
  logs) stage_logs ;;
  stop) stage_stop ;;
  delete) stage_delete ;;
  up)
    require PROJECT ZONE BUCKET
    stage_create
    stage_setup
    stage_run "$@"
    ;;
  *) usage ;;
esac
