#!/usr/bin/env bash
# What launch/tpu.sh runs on each worker of a slice (through `gcloud ... ssh --worker=all`).
#
#   bash launch/worker.sh setup              Python 3.11 virtualenv with hmlstm_jax[tpu] (this checkout)
#   bash launch/worker.sh run NAME MODULE FLAGS...   starts `python -m MODULE FLAGS...` detached,
#                                            logging to $LOG_DIR/NAME.log, which ends with "exit status N"
#   bash launch/worker.sh logs NAME          follows that log
#   bash launch/worker.sh stop NAME          SIGTERM to the run: it checkpoints and exits 75
#
# Settings (environment): PYTHON (default ~/hmlstm_venv/bin/python), LOG_DIR (default ~/hmlstm_logs).
set -euo pipefail

PYTHON=${PYTHON:-$HOME/hmlstm_venv/bin/python}
LOG_DIR=${LOG_DIR:-$HOME/hmlstm_logs}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  echo "usage: worker.sh setup | run NAME MODULE FLAGS... | logs NAME | stop NAME" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
stage=$1
shift

case "$stage" in
  setup)
    if ! command -v python3.11 >/dev/null; then  # TPU VM images ship an older Python
      sudo apt-get update -q
      sudo apt-get install -y -q software-properties-common
      sudo add-apt-repository -y ppa:deadsnakes/ppa
      sudo apt-get install -y -q python3.11 python3.11-venv
    fi
    venv=$(dirname "$(dirname "$PYTHON")")
    [[ -x "$PYTHON" ]] || python3.11 -m venv "$venv"
    "$PYTHON" -m pip install -q --upgrade pip
    "$PYTHON" -m pip install -q -e "${here}[tpu]"
    "$PYTHON" -c 'import hmlstm_jax, jax; print("installed hmlstm_jax with jax", jax.__version__)'
    ;;
  run)
    [[ $# -ge 2 ]] || usage
    name=$1
    module=$2
    shift 2
    mkdir -p "$LOG_DIR"
    log="$LOG_DIR/$name.log"
    cd "$here"
    # Detached from the ssh session: the run outlives it; the log ends with its exit status.
    # shellcheck disable=SC2016  # expanded by the inner bash
    nohup setsid bash -c '
      "$1" -u -m "$2" "${@:4}" &
      echo $! > "$3"
      status=0
      wait $! || status=$?
      echo "exit status $status"' run "$PYTHON" "$module" "$LOG_DIR/$name.pid" "$@" \
      >"$log" 2>&1 </dev/null &
    echo "worker $(hostname): started python -m $module; log $log"
    ;;
  logs)
    [[ $# -eq 1 ]] || usage
    exec tail -n +1 -F "$LOG_DIR/$1.log"
    ;;
  stop)
    [[ $# -eq 1 ]] || usage
    pidfile="$LOG_DIR/$1.pid"
    if [[ -f "$pidfile" ]] && kill -TERM "$(cat "$pidfile")" 2>/dev/null; then
      echo "worker $(hostname): asked run $1 to stop (it checkpoints, then exits 75)"
    else
      echo "worker $(hostname): run $1 is not running"
    fi
    ;;
  *)
    usage
    ;;
esac
