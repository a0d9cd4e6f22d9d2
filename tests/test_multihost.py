"""Runs over several processes: real processes on loopback (launch/local.sh), bounded in time."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CACHE_VARIABLES
from tensorboard.backend.event_processing import event_accumulator

from hmlstm_jax.training import cli
from hmlstm_jax.training import distributed

pytestmark = pytest.mark.slow  # starts the binaries: `make test-fast` leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.sh")

# 124 steps of 8 rows (2 per device on 2 processes x 2 devices); validation only at the end.
TINY = ["--dataset=synthetic", "--synthetic_chars=20000", "--layer_sizes=16,16,16",
        "--output_size=16", "--embed_size=8", "--batch_size=8", "--seq_len=20",
        "--eval_batch_size=4", "--learning_rate=0.01", "--num_epochs=1", "--eval_every=1000",
        "--log_every=1", "--checkpoint_every=1000", "--figure_chars=0", "--num_samples=0"]
STEPS = 124


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))
         or k in CACHE_VARIABLES}
  env.update({"PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **extra})
  return env


def _local(processes, devices, workdir, *extra):
  """(command, env) running the binary as ``processes`` processes of ``devices`` devices."""
  return ([LOCAL, str(processes), *TINY, f"--workdir={workdir}", *extra],
          _env(LOCAL_DEVICES=str(devices), LOGDIR=os.path.join(str(workdir) + "-logs")))


def _single(devices, workdir, *extra):
  return ([sys.executable, "-m", "experiments.charlm", *TINY, f"--workdir={workdir}", *extra],
          _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))


def _run(cmd_env, timeout=300):
  cmd, env = cmd_env
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def _losses(workdir) -> np.ndarray:
  """The training loss of every step, from the TensorBoard events (the last write of a step
  wins: a resumed run rewrites none, it continues)."""
  events = event_accumulator.EventAccumulator(os.path.join(str(workdir), "tb"),
                                              size_guidance={"scalars": 0})
  events.Reload()
  by_step = {e.step: e.value for e in events.Scalars("train/loss")}
  assert sorted(by_step) == list(range(1, STEPS + 1))
  return np.asarray([by_step[s] for s in range(1, STEPS + 1)])


def _results(workdir) -> dict:
  with open(os.path.join(str(workdir), "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run on 2 processes x 2 devices."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  output = _run(_local(2, 2, workdir)).stdout
  assert "4 device(s) on 2 processes" in output
  return {"losses": _losses(workdir), "test": _results(workdir)["test"]}


@pytest.mark.parametrize("devices", [4, 1])
def test_two_processes_equal_one_process_with_the_same_global_batch(reference, tmp_path, devices):
  _run(_single(devices, tmp_path / "one"))
  np.testing.assert_allclose(_losses(tmp_path / "one"), reference["losses"], rtol=2e-5)
  test = _results(tmp_path / "one")["test"]
  assert test["bpc"] == pytest.approx(reference["test"]["bpc"], rel=2e-5)
  assert test["op_counts"] == reference["test"]["op_counts"]  # every row of every host counted
  assert test["chars"] == reference["test"]["chars"]


def _start_until(cmd_env, line_prefix, timeout=240):
  """Starts a command; returns it once a stdout line starts with ``line_prefix``."""
  cmd, env = cmd_env
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline, lines = time.time() + timeout, []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(line_prefix):
      return proc, lines
    if time.time() > deadline:
      break
  proc.kill()
  raise AssertionError(f"no line starting with {line_prefix!r}:\n" + "".join(lines))


def test_sigterm_stops_every_process_and_the_run_resumes_to_the_same_end(reference, tmp_path):
  workdir = tmp_path / "run"
  proc, _ = _start_until(_local(2, 2, workdir), "step 20/")
  proc.send_signal(signal.SIGTERM)  # as a scheduler would: local.sh passes it on to each process
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == cli.EXIT_PREEMPTED, output
  assert "stopped at step" in output
  _run(_local(2, 2, workdir))
  np.testing.assert_allclose(_losses(workdir), reference["losses"], rtol=1e-6)
  assert _results(workdir)["test"]["bpc"] == pytest.approx(reference["test"]["bpc"], rel=1e-6)


def test_a_checkpoint_of_two_processes_resumes_on_one_process_with_every_row(reference, tmp_path):
  """Another topology with the same global batch continues from the same state (every row's
  carry): equal to the uninterrupted run up to float reduction order."""
  workdir = tmp_path / "run"
  proc, _ = _start_until(_local(2, 2, workdir), "step 20/")
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == cli.EXIT_PREEMPTED, output
  resumed = _run(_single(1, workdir)).stdout
  assert "resumed from" in resumed and "1 device(s);" in resumed
  np.testing.assert_allclose(_losses(workdir), reference["losses"], rtol=2e-5)
  assert _results(workdir)["test"]["bpc"] == pytest.approx(reference["test"]["bpc"], rel=2e-5)


def _free_port() -> str:
  return subprocess.run([sys.executable, "-c", "import socket; s = socket.socket(); "
                         "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"],
                        capture_output=True, text=True).stdout.strip()


def _two_processes(tmp_path, stderr, *extra) -> list:
  """The binary as processes 0 and 1 of a run (5 s heartbeat bound), started directly."""
  port, procs = _free_port(), []
  for i in range(2):
    env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    cmd = [sys.executable, "-u", "-m", "experiments.charlm", *TINY, *extra,
           "--heartbeat_timeout=5", f"--workdir={tmp_path / 'run'}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=stderr, text=True))
  return procs


@pytest.mark.parametrize("victim", [1, 0])
def test_a_dead_process_stops_the_other_within_the_heartbeat_bound(tmp_path, victim):
  """Kill -9 one of two processes mid-training: the other exits non-zero with a message
  within --heartbeat_timeout (5 s here) plus slack, never hangs."""
  procs = _two_processes(tmp_path, subprocess.STDOUT, "--num_epochs=1000")
  try:
    for line in procs[0].stdout:  # training has begun on both (the steps are collective)
      if line.startswith("step 5/"):
        break
    procs[victim].kill()
    killed = time.time()
    survivor = procs[1 - victim]
    output, _ = survivor.communicate(timeout=60)
    elapsed = time.time() - killed
  finally:
    for p in procs:
      p.kill()
  assert survivor.returncode != 0, output[-2000:]
  assert elapsed < 5 + 30, elapsed
  # Our line when a collective fails first; JAX's when its heartbeat check fires first.
  assert any(m in output for m in ("another process of the run stopped or died",
                                   "another task died", "leader task was preempted/died")), output[-2000:]


@pytest.mark.parametrize("victim", [0, 1])
def test_a_process_dead_while_the_other_compiles_leaves_it_one_line(tmp_path, victim):
  """Issue 32, item 5: killed while the other compiles (no collective to fail), the dead one
  left the other to JAX's C++ abort: about 50 lines on stderr (coordination-service errors, a
  check-failure stack trace, Python's thread dump). Now one line, and a non-zero exit."""
  procs = _two_processes(tmp_path, subprocess.PIPE)
  try:
    for line in procs[0].stdout:  # the data are loaded; the steps compile next
      if line.startswith("training hmlstm"):
        break
    procs[victim].kill()
    survivor = procs[1 - victim]
    _, errors = survivor.communicate(timeout=60)
  finally:
    for p in procs:
      p.kill()
  assert survivor.returncode != 0
  lines = errors.strip().splitlines()
  assert len(lines) == 1, errors[-3000:]
  assert lines[0].startswith(f"charlm: process {1 - victim}: ")
  assert "another process of the run stopped or died" in lines[0]


@pytest.mark.parametrize("started", [0, 1])
def test_a_process_that_never_registers_ends_the_other_with_one_line(tmp_path, started):
  """Issue 20, item 2: a peer that dies before it registers (here: never started) left the
  other waiting 305 s, then aborting with a C++ check failure. Now: one line after
  --init_timeout (5 s here), exit 1, for the coordinator (process 0) and for process 1."""
  port = _free_port()
  env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID=str(started))
  t0 = time.time()
  result = subprocess.run([sys.executable, "-m", "experiments.charlm", *TINY, "--init_timeout=5",
                           f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  elapsed = time.time() - t0
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      f"charlm: the run's processes did not all start within --init_timeout=5 s (process "
      f"{started} of 2, coordinator 127.0.0.1:{port}): a process died or was never launched; "
      "start every process again"], result.stderr[-2000:]
  assert elapsed < 5 + 25, elapsed
  assert not (tmp_path / "run").exists()


def test_local_sh_fails_when_a_process_fails(tmp_path):
  cmd, env = _local(2, 1, tmp_path / "bad", "--learning_rate=-1")
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "learning_rate must be positive" in result.stdout + result.stderr
  usage = subprocess.run([LOCAL, "two"], capture_output=True, text=True, timeout=30)
  assert usage.returncode == 2 and "usage: launch/local.sh N" in usage.stderr


def test_distributed_settings_from_flags_environment_and_slurm():
  assert distributed.settings_from("auto", None, None, None, environ={}) is None
  assert distributed.settings_from("off", "h:1", 2, 0, environ={}) is None
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert distributed.settings_from("auto", None, None, None, environ=env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
      "coordinator_bind_address": "10.0.0.1:1234"}  # listens where it was told, only
  assert distributed.settings_from("auto", None, None, None, environ=env, bind_address=
                                   "0.0.0.0:1234")["coordinator_bind_address"] == "0.0.0.0:1234"
  assert distributed.settings_from("auto", "h:9", 2, 1, environ=env)["coordinator_address"] == "h:9"
  slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}  # JAX reads the rest from SLURM
  assert distributed.settings_from("auto", None, None, None, environ=slurm) == {
      "coordinator_address": None, "num_processes": None, "process_id": None,
      "coordinator_bind_address": None}
  assert distributed.settings_from("on", None, None, None, environ={}) is not None  # Cloud TPU
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    distributed.settings_from("auto", "h:1", None, None, environ={})
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
    distributed.settings_from("auto", "h:1", 2, 2, environ={})
  with pytest.raises(ValueError, match="is not an integer"):
    distributed.settings_from("auto", "h:1", None, 0, environ={"JAX_NUM_PROCESSES": "two"})
  with pytest.raises(ValueError, match="coordinator_bind_address must be host:port"):
    distributed.settings_from("auto", "h:1", 2, 0, environ={}, bind_address="0.0.0.0")
  with pytest.raises(ValueError, match="needs a coordinator address"):
    distributed.settings_from("on", None, None, None, environ={}, bind_address="0.0.0.0:1")


def _listening(port: int) -> list[str]:
  """The local addresses of the TCP sockets listening on ``port`` (from /proc/net)."""
  found = []
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
      for line in list(f)[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
          found.append(address)
  return found


def test_the_coordinator_listens_on_the_loopback_address_it_is_given(tmp_path):
  """Issue 32: process 0 of a 2-process run on 127.0.0.1 (waiting for process 1) listens on
  127.0.0.1 only; JAX's own default was every interface."""
  import socket
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.charlm", *TINY, f"--workdir={tmp_path / 'run'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
       "--init_timeout=60"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 60
    while not _listening(port):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-2000:]
      time.sleep(0.2)
    loopback = ("0100007F", "0000000000000000FFFF00000100007F")  # 127.0.0.1, v4 or v4-mapped
    assert _listening(port) and set(_listening(port)) <= set(loopback), _listening(port)
  finally:
    proc.kill()
    proc.wait()
