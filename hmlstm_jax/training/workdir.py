"""A run's directory: held by one run at a time, and bound to one configuration.

:func:`open_workdir` runs before any data is loaded or anything is written:

* the path must be a directory that can be written (or be creatable);
* a lock (``fcntl.flock`` on the workdir itself and on ``<workdir>/.lock``, which names the
  holder) refuses a second run on the same workdir, also after ``.lock`` was deleted. The
  kernel releases it when the holding process dies, however it dies, so a killed run never
  leaves it stuck. Cloud workdirs (``gs://``) are not locked: one job per workdir there;
* the requested configuration is compared with the saved ``config.json``; settings that
  differ (other than the changeable ones, such as ``num_epochs``) are named and nothing is
  touched.

If the run fails before it has written anything, a workdir that it created is removed again.

With several processes, process 0 creates, locks and writes the workdir; the others wait
for it, then check the configuration themselves (they read what every process reads: the
workdir must be on storage that every host sees, such as ``gs://`` or a shared file system).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from typing import Any, Iterator

from hmlstm_jax import files
from hmlstm_jax import settings
from hmlstm_jax.training import distributed
from hmlstm_jax.training.errors import RunError

CONFIG = "config.json"
LOCK = ".lock"


class Workdir:
  """An opened workdir (see :func:`open_workdir`)."""

  def __init__(self, path: str, config: Any):
    self.path = str(path)
    self.config = config
    self._lock = None
    self._dir_lock = None
    self._created = False
    self.primary = distributed.is_primary()

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def write(self, name: str, data: str | bytes) -> str:
    """Writes ``<workdir>/name`` atomically (process 0 only); returns its path."""
    path = self.file(name)
    if self.primary:
      files.write_atomically(path, data)
    return path

  def read_config(self) -> dict | None:
    """The saved configuration (flat JSON), or None."""
    from etils import epath
    path = epath.Path(self.file(CONFIG))
    if not path.exists():
      return None
    try:
      return json.loads(path.read_text())
    except ValueError as err:
      raise RunError(f"{path} is not valid JSON ({err}); restore it or use another --workdir") from None

  def write_config(self) -> None:
    self.write(CONFIG, json.dumps(settings.flat(self.config), indent=1, sort_keys=True))

  def _open_local(self) -> None:
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise RunError(f"--workdir {self.path} is a file, not a directory; choose another --workdir")
    existed = os.path.exists(self.path)
    try:
      os.makedirs(self.path, exist_ok=True)
      self._created = not existed
      self._lock = open(self.file(LOCK), "a+")
    except OSError as err:
      raise RunError(f"cannot use --workdir {self.path}: {err.strerror or err}; "
                     "choose a writable directory") from None
    if not os.access(self.path, os.W_OK | os.X_OK):
      raise RunError(f"cannot use --workdir {self.path}: not writable; choose a writable directory")
    try:
      # The directory too: deleting the .lock file does not free a live run's workdir.
      self._dir_lock = os.open(self.path, os.O_RDONLY)
      fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      self._lock.seek(0)
      holder = self._lock.read().strip() or "another process; its .lock file was deleted"
      self._release()
      raise RunError(f"--workdir {self.path} is in use by a running job ({holder}); wait for it "
                     "to finish, stop it, or choose another --workdir") from None
    self._lock.seek(0)
    self._lock.truncate()
    self._lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    self._lock.flush()

  def check_config(self) -> None:
    """Raises RunError naming the settings that differ from the saved configuration."""
    saved = self.read_config()
    if saved is None:
      return
    diffs = settings.differences(type(self.config), saved, settings.flat(self.config))
    if diffs:
      raise RunError(
          f"--workdir {self.path} holds a run with other settings ({'; '.join(diffs)}); resume "
          "it with its own settings (" + self.file(CONFIG) + ") or choose another --workdir")

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.close()
      self._lock = None
    if self._dir_lock is not None:
      os.close(self._dir_lock)
      self._dir_lock = None

  def close(self, failed: bool = False) -> None:
    """Releases the locks; after a failure, removes the workdir if this run created it and
    wrote nothing in it."""
    self._release()
    if failed and self._created and self.primary and not _holds_files(self.path):
      shutil.rmtree(self.path, ignore_errors=True)


def _holds_files(path: str) -> bool:
  """Whether ``path`` holds a file besides its lock (empty directories, such as the
  checkpoint manager's, are not output)."""
  return any(files_ for root, _, files_ in os.walk(path)
             if set(files_) - ({LOCK} if root == path else set()))


@contextlib.contextmanager
def open_workdir(path: str, config: Any) -> Iterator[Workdir]:
  """Holds ``path`` for one run of ``config`` (see the module docstring)."""
  workdir = Workdir(path, config)
  failed = True
  try:
    if workdir.primary and not files.is_remote(workdir.path):
      workdir._open_local()
    distributed.barrier("workdir open")
    if not workdir.primary and not files.is_remote(workdir.path) and not os.path.isdir(workdir.path):
      raise RunError(f"--workdir {workdir.path} does not exist on this host although process 0 "
                     "created it: a multi-process run needs a workdir every host sees (gs://, "
                     "a shared file system)")
    workdir.check_config()
    yield workdir
    failed = False
  finally:
    workdir.close(failed)
