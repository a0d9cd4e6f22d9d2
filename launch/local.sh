#!/usr/bin/env bash
# Runs an experiment as N processes on this machine, the way a multi-host job runs it: each
# process has its own simulated CPU devices, process 0 hosts a loopback coordinator.
#
#   launch/local.sh N [FLAGS...]
#   launch/local.sh 2 --flagfile=demo.flags --workdir=/tmp/demo2
#
# Use it to check a flagfile before paying for a slice, and to test the multi-host code.
# Settings (environment):
#   MODULE          the experiment binary (default experiments.charlm)
#   LOCAL_DEVICES   simulated CPU devices per process (default 1)
#   PORT            the coordinator's port (default: a free one)
#   LOGDIR          where process_K.log go (default: a new temporary directory)
#   PYTHON          the interpreter (default python)
# Process 0's output is shown as it comes. When a process fails, the others are stopped and
# the script exits with the failed process's status; SIGTERM or SIGINT is passed on to every
# process (they checkpoint and exit 75; run the same command again to continue).
set -euo pipefail

usage() {
  echo "usage: launch/local.sh N [FLAGS...]   (N: number of processes, at least 1)" >&2
  exit 2
}
[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
num=$1
shift

module=${MODULE:-experiments.charlm}
devices=${LOCAL_DEVICES:-1}
python=${PYTHON:-python}
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: LOCAL_DEVICES must be a positive integer, got '$devices'" >&2; exit 2; }
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logdir=${LOGDIR:-$(mktemp -d -t hmlstm-local.XXXXXX)}
mkdir -p "$logdir"

pids=()
for ((i = 0; i < num; i++)); do
  : >"$logdir/process_$i.log"  # here, not in the background child: the tail below needs it now
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num" JAX_PROCESS_ID="$i" \
    "$python" -u -m "$module" "$@" >"$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local.sh: $num processes x $devices CPU device(s), coordinator 127.0.0.1:$port, logs in $logdir" >&2
tail -n +1 -f --pid="${pids[0]}" "$logdir/process_0.log" &
follower=$!

trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT  # each process checkpoints, exits 75

status=0
failed=""
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  finished=""
  code=0
  wait -n -p finished "${running[@]}" || code=$?
  [[ -n "${finished:-}" ]] || continue  # a trapped signal interrupted the wait
  still=()
  for pid in "${running[@]}"; do [[ "$pid" == "$finished" ]] || still+=("$pid"); done
  running=("${still[@]+"${still[@]}"}")
  if [[ $code -ne 0 && -z "$failed" ]]; then
    for ((i = 0; i < num; i++)); do [[ "${pids[$i]}" == "$finished" ]] && failed=$i; done
    status=$code
    if [[ $code -ne 75 && ${#running[@]} -gt 0 ]]; then  # a failure: the others cannot go on
      sleep 2
      kill -KILL "${running[@]}" 2>/dev/null || true
    fi
  fi
done
wait "$follower" 2>/dev/null || true

if [[ -n "$failed" && $status -ne 75 ]]; then
  echo "local.sh: process $failed exited with status $status; its log ($logdir/process_$failed.log) ends:" >&2
  tail -n 20 "$logdir/process_$failed.log" >&2
fi
exit "$status"
