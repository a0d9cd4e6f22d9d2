"""The README and docs/: every Python example runs as written, every relative link resolves."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The pages a reader reads: the README, the repository's map and every page under docs/.
PAGES = sorted(["README.md", "WORKSPACE.md"] + [
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                recursive=True)])
#: One marker per Python example; each is run by the test named beside it.
EXAMPLES = {
    "hm.operation_counts(": "test_readme_example_runs_as_written",
    "training.train_and_evaluate(Regression(config)": "test_trainer_example_trains_a_model_of_its_own",
    "def reach(": "test_layer_norm_gradient_reach_example_shows_what_it_says",
    "class Classifier(nnx.Module)": "test_variable_length_classifiers_learn_what_needs_the_lengths",
    "class Classifier(nn.Module)": "test_variable_length_classifiers_learn_what_needs_the_lengths",
}


def _read(page: str) -> str:
  with open(os.path.join(ROOT, page), encoding="utf-8") as f:
    return f.read()


def _blocks() -> list[tuple[str, str]]:
  """(page, code) of every Python example of every page."""
  return [(page, block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", _read(page), re.S)]


def _example(marker: str) -> str:
  """The one Python example of the README and docs/ that contains ``marker``."""
  found = [block for _, block in _blocks() if marker in block]
  assert len(found) == 1, f"{len(found)} python examples contain {marker!r}"
  return found[0]


def test_every_python_example_is_run_by_a_test():
  """A new example needs a marker here and a test that runs it: none goes unrun."""
  blocks = _blocks()
  assert len(blocks) == len(EXAMPLES)
  for page, block in blocks:
    markers = [m for m in EXAMPLES if m in block]
    assert len(markers) == 1, f"an example in {page} is run by no test (or by two): {block[:200]}"


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*_]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: str) -> set[str]:
  text = re.sub(r"```.*?```", "", _read(page), flags=re.S)
  return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
  """Links to files and folders of the repository exist; an anchor names a heading there."""
  text = re.sub(r"```.*?```", "", _read(page), flags=re.S)
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  broken = []
  for link in links:
    if re.match(r"[a-z]+:", link):  # http(s): not checked offline
      continue
    path, _, anchor = link.partition("#")
    target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(os.path.join(ROOT, target)):
      broken.append(f"{link} (no {target})")
    elif anchor and target.endswith(".md") and anchor not in _anchors(target):
      broken.append(f"{link} (no heading #{anchor} in {target})")
  assert not broken, f"{page}: " + "; ".join(broken)


def _build_site(root, out):
  return subprocess.run([sys.executable, os.path.join(ROOT, "docs", "build_site.py"),
                         f"--root={root}", f"--out={out}"], capture_output=True, text=True,
                        timeout=300)


def test_the_site_builds_with_mkdocs_strict_and_fails_on_a_broken_link(tmp_path):
  """`make docs`: the README (home), docs/ and the map as one site; a broken anchor fails."""
  result = _build_site(ROOT, tmp_path / "site")
  assert result.returncode == 0, result.stderr[-3000:]
  home = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
  assert "The two commands" in home and 'href="usage.html"' in home
  assert (tmp_path / "site" / "decisions.html").exists()
  assert (tmp_path / "site" / "reproduce" / "ptb_cpu" / "boundaries.png").exists()
  copy = tmp_path / "repo"
  shutil.copytree(os.path.join(ROOT, "docs"), copy / "docs")
  for page in ("README.md", "WORKSPACE.md"):
    shutil.copy(os.path.join(ROOT, page), copy / page)
  usage = copy / "docs" / "usage.md"
  usage.write_text(usage.read_text(encoding="utf-8") + "\nSee [nowhere](performance.md#no-such-heading).\n",
                   encoding="utf-8")
  broken = _build_site(copy, tmp_path / "broken")
  assert broken.returncode == 1
  assert "does not contain an anchor '#no-such-heading'" in broken.stderr
  assert broken.stderr.strip().splitlines()[-1].startswith("build_site: MkDocs failed")


def test_the_slug_is_githubs():
  assert _slug("At 3 × 512 on a GPU (NVIDIA H200)") == "at-3--512-on-a-gpu-nvidia-h200"  # MkDocs: one -
  assert _slug("The paper's experiments") == "the-papers-experiments"
  assert _slug("Handwriting (§4.2)") == "handwriting-42"


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


def test_trainer_example_trains_a_model_of_its_own(tmp_path):
  example = _example("training.train_and_evaluate(Regression(config)")
  script = tmp_path / "trainer_example.py"
  script.write_text(example.replace("/tmp/regression", str(tmp_path / "run")))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  assert float(re.search(r"\{'loss': ([\d.e-]+)\}", result.stdout).group(1)) < 0.01


def test_layer_norm_gradient_reach_example_shows_what_it_says(tmp_path):
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
def test_variable_length_classifiers_learn_what_needs_the_lengths(tmp_path, marker):
  """Issue 19: a variable-length classifier in NNX (README) and in linen (docs/usage.md)."""
  script = tmp_path / "classifier.py"
  script.write_text(_example(marker))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  assert float(re.search(r"accuracy ([\d.]+)", result.stdout).group(1)) >= 0.95


def test_the_readme_stays_an_entry():
  """Issue 33: the README is the entry (what it is, the commands, the paper's table, the
  shortest examples); measurements and explanations live in docs/, linked."""
  lines = _read("README.md").splitlines()
  assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail to docs/"
  for page in ("docs/usage.md", "docs/reproduce.md", "docs/study.md", "docs/performance.md",
               "docs/scale.md", "docs/decisions.md"):
    assert f"]({page}" in _read("README.md"), f"the README does not link {page}"
