"""The README's example runs as written."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs_as_written(tmp_path):
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert blocks, "the README has no python example"
  script = tmp_path / "example.py"
  script.write_text(blocks[0])
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  counts = [[int(v) for v in row.split()] for row in re.findall(r"\[+([\d\s]+)\]", result.stdout)]
  assert len(counts) == 3 and all(sum(row) == 100 * 64 for row in counts)  # (COPY, UPDATE, FLUSH) per layer
  assert counts[0][0] == 0 and counts[2][2] == 0  # layer 1 never COPYs, the last never FLUSHes


def test_readme_trainer_example_trains_a_model_of_its_own(tmp_path):
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  example = re.findall(r"```python\n(.*?)```", readme, re.S)[1]
  assert "training.train_and_evaluate(Regression(config)" in example
  script = tmp_path / "trainer_example.py"
  script.write_text(example.replace("/tmp/regression", str(tmp_path / "run")))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  assert float(re.search(r"\{'loss': ([\d.e-]+)\}", result.stdout).group(1)) < 0.01
