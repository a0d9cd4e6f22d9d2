"""Writing outputs so that nothing half-written is ever left behind."""
from __future__ import annotations

import errno
import os
import tempfile


def is_remote(path: str) -> bool:
  """A cloud path (``gs://bucket/...``): written through ``etils.epath``, not the local OS."""
  return "://" in str(path)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_ADVICE = {errno.ENOSPC: "; free space on its disk (or choose another directory) and run again",
           errno.EFBIG: "; the file is over the size limit of this process or file system",
           errno.EACCES: "; make its directory writable (or choose another) and run again",
           errno.EROFS: "; the file system is read-only: choose another directory"}


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes ``data`` to ``path`` whole or not at all.

  Locally: a temporary file in the same directory, renamed over ``path``; its permissions
  follow the umask like any new file (``tempfile`` would leave 0600); on failure (a full
  disk) the temporary file is removed and the OSError names ``path`` and what to do. A cloud
  object (``gs://``) is written in one upload, which becomes visible only when complete.
  """
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    from etils import epath
    epath.Path(path).write_bytes(raw)
    return
  tmp = None
  try:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(raw)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException as err:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(err, OSError):
      raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}"
                    f"{_ADVICE.get(err.errno, '')}") from None
    raise
