"""Writing outputs so that nothing half-written is ever left behind."""
from __future__ import annotations

import os
import tempfile


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file in the same directory and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  with tempfile.NamedTemporaryFile(mode, dir=directory, delete=False, suffix=".tmp") as f:
    f.write(data)
  os.replace(f.name, path)
