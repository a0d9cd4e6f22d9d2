"""CI lints: ruff over every Python file of the repository, with the rules stated here."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: pyflakes (undefined names, unused imports and variables, …) and pycodestyle's error classes.
SELECT = "E4,E7,E9,F"
#: E741: ``l`` is the paper's ℓ (the layer index) throughout; E731: small named lambdas are
#: used as local definitions.
IGNORE = "E741,E731"
#: experiments/reproduce.py starts its budget's clock before its imports, on purpose.
PER_FILE = "experiments/reproduce.py:E402"


def test_ruff_finds_nothing():
  result = subprocess.run(
      [sys.executable, "-m", "ruff", "check", "--isolated", "--output-format=concise",
       f"--select={SELECT}", f"--ignore={IGNORE}", f"--per-file-ignores={PER_FILE}",
       "hmlstm_jax", "experiments", "tests", "docs", "setup.py"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
