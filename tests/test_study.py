"""The small-scale study's runner (experiments/study.py) on tiny models: real runs of the binary."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import SHARED_DATA

pytestmark = pytest.mark.slow  # starts the binaries: `make test-fast` leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "experiments.study", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, XLA_FLAGS=""))


def test_quick_study_runs_the_binary_per_row_and_prints_one_table(tmp_path):
  work = str(tmp_path / "study")
  args = ("--quick", "--rows=lnlstm,paper,rate_band", "--seeds=0", f"--workdir={work}",
          f"--manual_dir={os.path.join(SHARED_DATA, 'ptb_char')}", f"--data_dir={tmp_path / 'tfds'}")
  result = _study(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [l for l in result.stdout.splitlines() if l.startswith("| ")][1:]
  assert [r.split(" | ")[0] for r in rows] == ["| lnlstm", "| paper", "| rate_band"]
  saved = json.load(open(os.path.join(work, "study.json")))
  for name in ("lnlstm", "paper"):
    run = saved["runs"][name][0]
    assert saved["rows"][name]["test_bpc"][0] == run["test"]["bpc"]  # one seed: its own number
    assert run["parameters"] > 0 and run["steps"] > 0
    assert run["wall_s"] > 0 and run["history"][-1]["step"] == run["steps"]  # the curves' data
    assert os.path.getsize(os.path.join(work, "curves", f"{name}.png")) > 1000
  assert os.path.getsize(os.path.join(work, "tradeoff.png")) > 1000
  assert set(saved["runs"]["paper"][0]["history"][-1]) >= {"bpc", "compute3", "f1_z1_word",
                                                           "dead_detectors"}
  penalised = open(os.path.join(work, "rate_band_seed0.log")).read()  # the penalty ran
  assert "--rate_weight" not in penalised and "BPC" in penalised
  assert json.load(open(os.path.join(work, "rate_band_seed0", "config.json")))["rate_weight"] == 10
  paper = saved["rows"]["paper"]
  assert len(paper["compute"]) == 3 and paper["compute"][0] == 1.0  # layer 1 computes every step
  assert "compute" not in saved["rows"]["lnlstm"]
  assert open(os.path.join(work, "study.md")).read().strip() in result.stdout
  start = time.time()  # a rerun reads the finished runs instead of training again
  again = _study(*args)
  assert again.returncode == 0 and time.time() - start < 60
  assert [l for l in again.stdout.splitlines() if l.startswith("|")] == \
         [l for l in result.stdout.splitlines() if l.startswith("|")]
  # Issue 32: a truncated results.json, an empty one and garbage wall times are named, set
  # aside and made again from the runs' checkpoints (the same numbers), not crashed on.
  paper = os.path.join(work, "paper_seed0", "results.json")
  with open(paper) as f:
    text = f.read()
  with open(paper, "w") as f:
    f.write(text[:len(text) // 2])
  with open(os.path.join(work, "lnlstm_seed0", "results.json"), "w") as f:
    f.write("{}")
  with open(os.path.join(work, "rate_band_seed0.seconds"), "a") as f:
    f.write("garbage\n")
  repaired = _study(*args)
  assert repaired.returncode == 0 and "Traceback" not in repaired.stderr, repaired.stderr[-3000:]
  for name in ("paper", "lnlstm"):
    assert f"row {name}, seed 0: " in repaired.stdout and "set aside" in repaired.stdout
    assert os.path.exists(os.path.join(work, f"{name}_seed0", "results.json.broken"))
  assert [l for l in repaired.stdout.splitlines() if l.startswith("|")] == \
         [l for l in result.stdout.splitlines() if l.startswith("|")]


def test_a_study_killed_with_9_does_not_leave_its_run_going(tmp_path):
  """Issue 32: kill -9 of the study: its child run gets SIGTERM (it dies with its parent),
  checkpoints and ends; the next study resumes it."""
  work = tmp_path / "study"
  args = ("--quick", "--rows=paper", "--seeds=0", f"--workdir={work}",
          f"--manual_dir={os.path.join(SHARED_DATA, 'ptb_char')}", f"--data_dir={tmp_path / 'tfds'}")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.study", *args], cwd=ROOT,
                          env=dict(os.environ, XLA_FLAGS=""), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  log = work / "paper_seed0.log"
  deadline = time.time() + 300
  while not (log.exists() and "training " in log.read_text()):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.1)
  child = int((work / "paper_seed0" / ".lock").read_text().split()[1])
  proc.kill()
  proc.wait()
  deadline = time.time() + 120
  while os.path.exists(f"/proc/{child}") and "zombie" not in _state(child):
    assert time.time() < deadline, "the study's run outlived it"
    time.sleep(0.2)
  assert "stopped" in log.read_text()  # at a step, or in the report (exit 75 both)
  again = _study(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in log.read_text()


def _state(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/status") as f:
      return next((line for line in f if line.startswith("State:")), "")
  except OSError:
    return ""


def test_bad_rows_and_missing_files_are_one_clear_error(tmp_path):
  bad = _study("--rows=paper,nonsense", f"--workdir={tmp_path}", timeout=120)
  assert bad.returncode != 0 and "unknown rows ['nonsense']" in bad.stderr
  assert "Traceback" not in bad.stderr
  missing = _study(f"--manual_dir={tmp_path}", f"--workdir={tmp_path}", timeout=120)
  assert missing.returncode != 0 and "ptb.char.test.txt, ptb.char.valid.txt not in" in missing.stderr
  assert "Traceback" not in missing.stderr


def test_diverged_seeds_are_reported_not_averaged():
  from experiments import study
  done = {"parameters": 10, "steps": 5, "valid": {"bpc": 2.0}, "test": {"bpc": 2.5}}
  stop = {"diverged": "charlm: non-finite training loss (nan) or gradient norm (inf) in step 41 "
                      "(steps 1-50 read back now); no checkpoint was written."}
  half = study.summary([done, stop])
  assert half["test_bpc"] == (2.5, 0.0) and half["seeds"] == 1 and half["diverged"] == [41]
  both = study.summary([stop, stop])
  assert both == {"seeds": 2, "diverged": [41, 41]}
  text = study.table([("a", "one diverged", half), ("b", "both diverged", both)])
  assert "2.500 ± 0.000 (1 more seed(s) diverged at step 41)" in text
  assert "| b | both diverged | — | — | — | diverged at step 41, 41 |" in text


def test_a_detector_dead_at_any_validation_is_reported_in_its_row():
  from experiments import study
  prf = [[0.5, 0.5, 0.5]] * 3
  test = {"bpc": 2.5, "op_counts": [[0, 9, 1], [5, 4, 1], [10, 0, 0]],
          "boundaries": {"word": prf, "word+1": prf}}
  run = lambda dead: {"parameters": 10, "steps": 5, "validation": {"bpc": 2.0}, "test": test,
                      "history": [{"step": 5, "dead_detectors": d} for d in dead]}
  row = study.summary([run([0.0, 1.0, 0.0]), run([0.0])])
  assert row["dead_detectors"] == 1 and row["valid_bpc"] == (2.0, 0.0)
  assert "100% / 50% / 0% (1 detector(s) dead at a validation) |" in study.table([("a", "x", row)])
  alive = study.summary([run([0.0])])
  assert alive["dead_detectors"] == 0 and "dead at" not in study.table([("a", "x", alive)])
  older = dict(run([]), history=[{"step": 5}])   # a run from before the counter
  assert "dead_detectors" not in study.summary([older])
