"""The layout WORKSPACE.md promises (issue 22): one home per task, neither importing the other,
and a trainer that imports no model."""
import ast
import glob
import os

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "hmlstm_jax")


def _imports(path: str) -> set[str]:
  """Every module ``path`` imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{alias.name}" for alias in node.names)
  return out


def _files(folder: str) -> list[str]:
  return sorted(glob.glob(os.path.join(PACKAGE, folder, "**", "*.py"), recursive=True))


def test_no_task_imports_the_other():
  for task, other in (("charlm", "handwriting"), ("handwriting", "charlm")):
    assert _files(task)
    for path in _files(task):
      wrong = {m for m in _imports(path) if m.startswith(f"hmlstm_jax.{other}")}
      assert not wrong, (path, wrong)


def test_the_trainer_imports_no_model():
  allowed = ("hmlstm_jax.training", "hmlstm_jax.settings", "hmlstm_jax.files")
  for path in _files("training"):
    ours = {m for m in _imports(path) if m.startswith("hmlstm_jax.")}
    assert all(m.startswith(allowed) for m in ours), (path, ours)


def test_the_shared_modules_import_no_task():
  for name in ("backbone", "analysis", "hmlstm", "cell", "lstm", "heads", "tfds_util",
               "rnn", "nn", "nnx"):
    ours = _imports(os.path.join(PACKAGE, f"{name}.py"))
    assert not {m for m in ours if m.startswith(("hmlstm_jax.charlm", "hmlstm_jax.handwriting"))}, name


def test_experiments_holds_binaries_and_tools_not_a_tasks_definition():
  """Issue 33: each task has one home in the library (its ``experiment.py``: Config,
  Experiment, loss); experiments/ parses flags and calls it."""
  experiments = os.path.join(os.path.dirname(__file__), "..", "experiments")
  for path in sorted(glob.glob(os.path.join(experiments, "*.py"))):
    tree = ast.parse(open(path).read())
    classes = {node.name: [ast.unparse(b) for b in node.bases]
               for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    assert "Config" not in classes, path
    assert not [n for n, bases in classes.items() if any("Experiment" in b for b in bases)], path
  for task in ("charlm", "handwriting"):
    binary = open(os.path.join(experiments, f"{task}.py")).read()
    assert f"from hmlstm_jax.{task} import experiment" in binary
    assert len(binary.splitlines()) <= 25, f"experiments/{task}.py is not thin"
