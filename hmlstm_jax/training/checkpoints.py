"""Orbax checkpoints of a run: the last few, and the best by the validation objective.

``<workdir>/checkpoints/<step>`` holds the whole :class:`~.steps.TrainState` (parameters, Adam
state, the carried state of every row, the plateau state, the RNG key, the step) and a JSON
record of the rest (data position, the experiment's schedule of that step, the best step so
far and its objective, the evaluation history). Orbax writes each checkpoint into a temporary
directory and renames it when complete, so a checkpoint and everything that describes it
appear together or not at all.

The best checkpoint is not a second copy: each checkpoint's record names the best step, and
that step is kept (besides the latest ``keep``) until a newer checkpoint names another. A
kill at any moment leaves the latest checkpoint and the best it names on disk.

Resuming takes the newest checkpoint that can be read. Newer ones that cannot (truncated or
garbled files) are moved to ``<workdir>/checkpoints_unreadable/`` with a warning that names
them; if none can be read the run stops with one line.

The state is saved and restored as global arrays: with several processes each writes and
reads its own shards (Orbax coordinates them; process 0 writes the JSON record), and a
checkpoint restores onto whatever mesh the template's shardings describe. The processes agree
on which checkpoint is readable; process 0 moves the unreadable ones.
"""
from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable, Iterator

import orbax.checkpoint as ocp

from hmlstm_jax import files
from hmlstm_jax.training import distributed
from hmlstm_jax.training.errors import RunError
from hmlstm_jax.training.errors import first_line

_TMP_MARK = ".orbax-checkpoint-tmp"


@contextlib.contextmanager
def _quiet_threads() -> Iterator[list]:
  """Collects what Orbax's worker threads log or raise while a checkpoint is written.

  A failed write (a full disk) makes each of its threads log an error with a traceback; the
  failure itself comes back to the caller, which reports it in one line. Records of a save
  that succeeds are logged as usual afterwards.
  """
  records: list = []
  root = logging.getLogger()

  class Collect(logging.Filter):
    def filter(self, record):
      if record.levelno >= logging.WARNING and record.threadName != "MainThread":
        records.append(record)
        return False
      return True

  collect = Collect()
  handlers = [h for logger in (root, logging.getLogger("absl")) for h in logger.handlers]
  for h in handlers:
    h.addFilter(collect)
  previous_hook, previous_stderr = threading.excepthook, sys.stderr
  threading.excepthook = lambda args: records.append(args)
  sys.stderr = io.StringIO()  # tensorstore's callbacks print to it from their threads
  try:
    try:
      yield records
    except Exception:
      time.sleep(1.0)  # let the failed write's callbacks finish printing into the buffer
      raise
  finally:
    threading.excepthook, sys.stderr = previous_hook, previous_stderr
    for h in handlers:
      h.removeFilter(collect)


class _HushUnretrieved(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports about the checkpoints in
  ``paths``: reads of a checkpoint that was already reported unreadable and moved aside.

  Orbax reads a checkpoint's arrays in asyncio tasks; when one read fails, the others' failures
  are never retrieved, and asyncio reports each (a traceback with kilobytes of TensorStore spec)
  whenever the task is garbage collected, which may be long after the restore returned.
  """

  def __init__(self):
    super().__init__()
    self.paths: set[str] = set()

  def filter(self, record):
    message = record.getMessage()
    if not message.startswith("Task exception was never retrieved"):
      return True
    text = message + (repr(record.exc_info[1]) if record.exc_info else "")
    return not any(path in text for path in self.paths)


_HUSH = _HushUnretrieved()


def _hush_unretrieved(path: str) -> None:
  """From now on, asyncio's reports of never-retrieved failures that name ``path`` are dropped
  (:class:`_HushUnretrieved`); the failures still pending are collected now."""
  _HUSH.paths.add(path)
  asyncio_logger = logging.getLogger("asyncio")
  if _HUSH not in asyncio_logger.filters:
    asyncio_logger.addFilter(_HUSH)
  gc.collect()


def _replay(records: list) -> None:
  """Logs, as usual, what Orbax's threads logged during a save or restore that succeeded."""
  for record in records:
    if isinstance(record, logging.LogRecord):
      logging.getLogger(record.name).handle(record)


def _reason(err: BaseException, limit: int = 300) -> str:
  """Why a checkpoint cannot be read, in one short line: TensorStore's spec (kilobytes of
  JSON) and anything past ``limit`` characters left out."""
  text = first_line(err).split(" [tensorstore_spec")[0]
  return text if len(text) <= limit else text[:limit] + " ..."


class Checkpointer:
  """``<workdir>/checkpoints``: the latest ``keep`` checkpoints and the best one."""

  def __init__(self, workdir: str, keep: int):
    root = str(workdir) if files.is_remote(workdir) else os.path.abspath(workdir)
    self.directory = os.path.join(root, "checkpoints")
    self.unreadable_dir = os.path.join(root, "checkpoints_unreadable")
    self.keep = keep
    # Orbax's own clean-up of temporary directories runs in a thread that nothing waits for:
    # a run that stopped at once (a bad setting) and removed its empty workdir made it log a
    # traceback. The temporaries of a killed run are removed here, before this returns.
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=False))
    self._remove_temporaries()
    distributed.barrier("removed temporary checkpoints")

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (global arrays) and ``meta`` (JSON-able, with ``best_step``) at ``step``,
    then deletes the checkpoints that are neither among the latest ``keep`` nor the best."""
    try:
      with _quiet_threads() as records:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
    except Exception as err:  # a full disk, a lost bucket: Orbax raises many types
      self._remove_temporaries()
      raise RunError(f"could not write checkpoint {step} in {self.directory} ({first_line(err)}); "
                     "the previous checkpoints are intact: free space or fix the directory, and "
                     "run again") from None
    _replay(records)
    steps = self.steps()
    keep = set(steps[-self.keep:]) | {meta.get("best_step")}
    for s in steps:
      if s not in keep:
        self.manager.delete(s)

  def _remove_temporaries(self) -> None:
    """Removes the temporary directories of checkpoints whose writing did not finish (a kill,
    a full disk); process 0 does, the others wait at the caller's barrier."""
    if (not distributed.is_primary() or files.is_remote(self.directory)
        or not os.path.isdir(self.directory)):
      return
    for name in os.listdir(self.directory):
      if _TMP_MARK in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    self.manager.reload()

  def restore(self, step: int, template: Any) -> tuple[Any, dict]:
    """Checkpoint ``step`` onto ``template`` (shapes, dtypes and shardings)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_latest(self, template: Any, warn: Callable[[str], None]) -> tuple[Any, dict] | None:
    """The newest readable checkpoint, or None when there is none at all.

    Unreadable newer checkpoints are moved aside with a warning. Raises RunError when
    checkpoints exist but none can be read (then nothing is moved).
    """
    steps = self.steps()
    failures = []
    for step in reversed(steps):
      try:
        with _quiet_threads() as records:  # a failed read's threads print tracebacks late
          state, meta = self.restore(step, template)
        error = None
        _replay(records)
      except Exception as err:  # truncated or garbled files: Orbax raises many types
        error = err
        _hush_unretrieved(os.path.join(self.directory, str(step), ""))
      if distributed.any_process(error is not None):  # unreadable for one is unreadable for all
        failures.append((step, error or RuntimeError("unreadable on another process")))
        continue
      for bad, err in failures:
        moved = self._move_aside(bad)
        warn(f"warning: checkpoint {bad} in {self.directory} cannot be read ({_reason(err)}); "
             f"moved to {moved}, resuming from step {step}")
      return state, meta
    if failures:
      step, err = failures[0]
      raise RunError(f"no checkpoint in {self.directory} can be read (step {step}: "
                     f"{_reason(err)}); move the directory aside to start afresh")
    return None

  def _move_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.unreadable_dir, f"{step}-{int(time.time())}")
    if distributed.is_primary() and files.is_remote(source):
      from etils import epath
      epath.Path(source).rename(target)
    elif distributed.is_primary():
      os.makedirs(self.unreadable_dir, exist_ok=True)
      os.replace(source, target)
    distributed.barrier(f"moved checkpoint {step}")
    self.manager.reload()
    return target

  def close(self) -> None:
    self.manager.close()
