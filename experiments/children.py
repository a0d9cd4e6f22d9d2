"""What the commands that run the character-LM binary as child processes share
(``experiments.study``, ``experiments.reproduce``): reading a run's JSON files, which may be
missing, half-written by a killed writer or edited by hand, and children that do not outlive
their parent."""
from __future__ import annotations

import ctypes
import json
import os
import signal


def read_json(path: str, needs: tuple[str, ...] = ()) -> dict | None:
  """The object in ``path``, or None when it is missing, not JSON, not an object, or lacks one
  of the keys ``needs`` (the caller reruns or waits; it never crashes on a run's file)."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(value, dict) or any(key not in value for key in needs):
    return None
  return value


def set_aside(path: str) -> str:
  """Renames an unusable run file to ``<path>.broken`` (kept for a look); returns the new name."""
  broken = path + ".broken"
  os.replace(path, broken)
  return broken


def die_with_parent() -> None:
  """``preexec_fn`` of a child: SIGTERM when the parent dies (Linux ``PR_SET_PDEATHSIG``), so
  that a command killed with -9 does not leave its runs training on and holding their
  workdirs: each checkpoints and stops, and the next call resumes it."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
  except (OSError, AttributeError):
    pass  # not Linux: the child may outlive a killed parent
