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
               "profiling", "nn", "nnx"):
    ours = _imports(os.path.join(PACKAGE, f"{name}.py"))
    assert not {m for m in ours if m.startswith(("hmlstm_jax.charlm", "hmlstm_jax.handwriting"))}, name
