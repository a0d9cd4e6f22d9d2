"""experiments.reproduce: the paper's PTB rows on the real corpus, at a tiny width."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import SHARED_DATA

pytestmark = pytest.mark.slow  # starts the binaries: `make test-fast` leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANUAL = os.path.join(SHARED_DATA, "ptb_char")


ENV = {**os.environ, "XLA_FLAGS": ""}  # the runs see this machine's one CPU device


def _command(tmp_path, *flags):
  return [sys.executable, "-m", "experiments.reproduce", "--width=quick",
          f"--workdir={tmp_path / 'w'}", f"--data_dir={tmp_path / 'tfds'}",
          f"--manual_dir={MANUAL}", "--poll_s=0.2", "--rows=ptb,ptb_lnlstm", *flags]


def _reproduce(tmp_path, *flags):
  start = time.time()
  result = subprocess.run(_command(tmp_path, *flags), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
  return result, time.time() - start


def _table(tmp_path):
  with open(tmp_path / "w" / "table.json") as f:
    rows = json.load(f)["rows"]
  with open(tmp_path / "w" / "table.md") as f:
    return rows, f.read()


def _log(tmp_path, name):
  with open(tmp_path / "w" / f"{name}.log") as f:
    return f.read()


def test_a_budget_or_a_stop_request_ends_the_runs_and_a_rerun_resumes_them_to_the_table(
    tmp_path):
  """Two rows at once. A 30 s budget (stop asked at 15 s): the command ends within it and
  leaves a readable table. SIGTERM once the HM-LSTM has validated: the runs checkpoint and
  stop (exit 75); --interim_reports gives their best checkpoints' test BPC so far. Again: both
  resume and fill every column, the HM-LSTM's compute and F1 too; once more: nothing to run."""
  first, seconds = _reproduce(tmp_path, "--budget_s=30", "--stop_s=15",
                              "--row_flag=--scan_unroll=2")
  assert first.returncode == 0, first.stderr[-2000:]
  with open(tmp_path / "w" / "ptb" / "config.json") as f:
    assert json.load(f)["scan_unroll"] == 2  # --row_flag reached the row (a speed setting:
    # the later calls resume it without the flag)
  ended = float(first.stdout.split("reproduce: ended ")[1].split()[0])
  assert ended < 30  # by its own clock, which starts before its imports
  assert seconds < 30 + 60  # and from outside: interpreter start and exit too, on a loaded machine
  rows, text = _table(tmp_path)
  assert list(rows) == ["ptb", "ptb_lnlstm"] and "| ptb (" in text and "| ptb_lnlstm (" in text
  assert all("budget" in row["status"] or row["status"] == "stopped; resumes"
             for row in rows.values()), rows

  progress = tmp_path / "w" / "ptb" / "progress.json"
  before = os.path.getmtime(progress) if os.path.exists(progress) else 0
  proc = subprocess.Popen(_command(tmp_path), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300  # until the HM-LSTM of this call has validated (written anew)
  while not (os.path.exists(progress) and os.path.getmtime(progress) > before):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]
  rows, text = _table(tmp_path)
  # The LSTM's 251 tiny steps may all be done while the HM-LSTM compiles (a loaded machine):
  # then the stop finds it in its final report (stopped at step 251) or finished, and a stop
  # that came as it exited is not its failure. The HM-LSTM has just validated: mid-training.
  stopped = [n for n, row in rows.items() if not row["finished"]]
  assert "ptb" in stopped and (rows["ptb_lnlstm"]["finished"] or "ptb_lnlstm" in stopped)
  assert rows["ptb"]["steps"] < 251 and "stopped at step" in _log(tmp_path, "ptb")
  for name in stopped:
    row = rows[name]
    assert row["status"] == "stopped; resumes" and row["steps"] <= 251, row
    assert "stopped" in _log(tmp_path, name)
    assert row["valid_bpc"] > 0 and "test_bpc" not in row  # the best validation so far

  interim, _ = _reproduce(tmp_path, "--interim_reports")  # their best so far, on test
  assert interim.returncode == 0, interim.stderr[-2000:]
  rows, text = _table(tmp_path)
  for name in stopped:
    row = rows[name]
    assert row["interim"] and 2.0 < row["test_bpc"] < 6.0 and not row["finished"], row
    assert row["status"] == "stopped; resumes (interim report)"
    assert f"{row['test_bpc']:.3f} (so far)" in text
    assert not os.path.exists(tmp_path / "w" / name / "results.json")

  second, _ = _reproduce(tmp_path)
  assert second.returncode == 0, second.stderr[-2000:]
  rows, text = _table(tmp_path)
  hm, lstm = rows["ptb"], rows["ptb_lnlstm"]
  for name, row in rows.items():
    assert "resumed from" in _log(tmp_path, name)
    assert row["finished"] and row["status"] in ("epoch cap (num_epochs)", "stopping rule")
    assert row["steps"] == 251 or row["status"] == "stopping rule"  # the rule may end it first
    assert 2.0 < row["test_bpc"] < 6.0 and row["units"] == [8, 8, 8]
    assert row["device"].startswith("1 x cpu (") and row["train_s"] > 0
  assert len(hm["compute"]) == 3 and hm["compute"][0] == 1.0 and len(hm["f1"]["word+1"]) == 2
  assert "compute" not in lstm
  assert "| 1.24 | " in text and f"{hm['test_bpc']:.3f}" in text
  assert os.path.exists(tmp_path / "w" / "ptb" / "boundaries.png")  # the figure of Fig. 3
  third, seconds = _reproduce(tmp_path)
  assert third.returncode == 0 and "2 finished already" in third.stdout and seconds < 30


def test_choose_settings_times_each_speed_setting_once_per_workdir(tmp_path):
  """--choose_settings (for the GPU run): the HM-LSTM step timed in the plain scan, two-phase
  and scan_unroll 2 and 4; the fastest's flags recorded in settings.json; a later call reads
  them (no second timing). A 1 s budget: no row starts."""
  first, _ = _reproduce(tmp_path, "--choose_settings", "--rows=ptb", "--budget_s=1")
  assert first.returncode == 0, first.stderr[-2000:]
  with open(tmp_path / "w" / "settings.json") as f:
    record = json.load(f)
  assert sorted(record["median_ms"]) == sorted(
      ["hmlstm", "hmlstm_two_phase", "hmlstm_unroll2", "hmlstm_unroll4"])
  assert record["chosen"] == min(record["median_ms"], key=record["median_ms"].get)
  assert record["flags"] == {"hmlstm": [], "hmlstm_two_phase": ["--schedule=two_phase"],
                             "hmlstm_unroll2": ["--scan_unroll=2"],
                             "hmlstm_unroll4": ["--scan_unroll=4"]}[record["chosen"]]
  assert "settings: hmlstm " in first.stdout and "hm-u4" in first.stdout
  again, _ = _reproduce(tmp_path, "--choose_settings", "--rows=ptb", "--budget_s=1")
  assert again.returncode == 0 and "(chosen earlier: " in again.stdout
  assert "timing" not in again.stdout


def test_bad_rows_and_manual_dir_are_one_line(tmp_path):
  for flag, words in (("--rows=ptb,nope", "--rows: unknown ['nope']"),
                      (f"--manual_dir={tmp_path / 'none'}", "is not a directory"),
                      ("--row_flag=scan_unroll=2", "--row_flag takes a flag of the rows'")):
    result = subprocess.run([sys.executable, "-m", "experiments.reproduce", flag,
                             f"--workdir={tmp_path / 'w'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert words in result.stderr
