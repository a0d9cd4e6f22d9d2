"""The README's example runs as written."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(marker: str) -> str:
  """The README's one python example that contains ``marker``."""
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  found = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if marker in b]
  assert len(found) == 1, f"{len(found)} README python examples contain {marker!r}"
  return found[0]


def test_readme_example_runs_as_written(tmp_path):
  script = tmp_path / "example.py"
  script.write_text(_example("hm.operation_counts("))
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  counts = [[int(v) for v in row.split()] for row in re.findall(r"\[+([\d\s]+)\]", result.stdout)]
  assert len(counts) == 3 and all(sum(row) == 100 * 64 for row in counts)  # (COPY, UPDATE, FLUSH) per layer
  assert counts[0][0] == 0 and counts[2][2] == 0  # layer 1 never COPYs, the last never FLUSHes


def test_readme_trainer_example_trains_a_model_of_its_own(tmp_path):
  example = _example("training.train_and_evaluate(Regression(config)")
  script = tmp_path / "trainer_example.py"
  script.write_text(example.replace("/tmp/regression", str(tmp_path / "run")))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  assert float(re.search(r"\{'loss': ([\d.e-]+)\}", result.stdout).group(1)) < 0.01


def test_readme_layer_norm_gradient_reach_example_shows_what_it_says(tmp_path):
  """With layer norm the gradient grows going back in time, without it not; gains 0.5 slow it."""
  example = _example("def reach(")
  script = tmp_path / "reach.py"
  script.write_text(example)
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {k: [float(v) for v in row.split()]
          for k, row in re.findall(r"^(layer_norm=[^:]+): (.*)$", result.stdout, re.M)}
  plain, normalised, half, summed = (
      rows[k] for k in ("layer_norm=False", "layer_norm=True", "layer_norm=True ln_gain=0.5",
                        "layer_norm=True ln_placement=sum ln_gain=0.5 st_local=True"))
  assert len(plain) == len(normalised) == len(half) == len(summed) == 10
  assert max(summed[1:]) < 10 * summed[0]     # the sum, gains 0.5, local: no growth either
  assert max(plain[1:]) < 10 * plain[0]       # without layer norm: no growth back in time
  assert normalised[-1] > 1e6 * normalised[0]  # with it: many orders of magnitude
  assert half[-1] < 1e-3 * normalised[-1]      # gains 0.5 slow it by orders of magnitude


@pytest.mark.parametrize("marker", ["class Classifier(nnx.Module)", "class Classifier(nn.Module)"])
def test_readme_variable_length_classifiers_learn_what_needs_the_lengths(tmp_path, marker):
  """Issue 19: a variable-length classifier in NNX and in linen, as written in the README."""
  script = tmp_path / "classifier.py"
  script.write_text(_example(marker))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  assert float(re.search(r"accuracy ([\d.]+)", result.stdout).group(1)) >= 0.95
