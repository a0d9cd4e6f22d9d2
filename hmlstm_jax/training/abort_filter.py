"""One line, not a C++ abort, when JAX's runtime ends a process of a multi-process run.

When a process of the run dies, JAX's coordination service ends the others from a C++ thread:
an ``F...] Terminating process because the JAX distributed service detected fatal errors``
line, a check-failure stack trace and Python's thread dump (about 50 lines), then SIGABRT.
JAX offers no hook for it in Python (jaxlib 0.10.2: a ``missed_heartbeat_callback`` passed
from Python aborts the same way), so this process's stderr goes through a filter process,
started by :func:`install`, that passes every line through except that abort: the
coordination-service lines around it are held back (at most ``HOLD_S`` seconds, then passed
on when nothing fatal follows), and once the fatal line comes, what follows is dropped. When
the process has ended, the filter writes the process's own one-line message if it wrote one
after the abort began (a collective that failed first, :func:`.distributed.lost_peer`), else
the line of :func:`summary`. The exit status stays the runtime's (non-zero: 134 or 139).

The filter is this file run as a script (standard library only, ``python -I``), so it starts
in milliseconds without importing JAX; it ignores SIGINT and SIGTERM (a Ctrl-C or a
scheduler's stop reaches the process group: the filter outlives the process to pass on its
last lines) and ends when every writer of the pipe has closed it.
"""
from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys

#: How long coordination-service lines are held back waiting for a fatal line (seconds).
HOLD_S = 2.0

FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
#: glog's line head: severity, date, time, thread, source file and line.
_GLOG = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+):\d+\] ")
#: Sources of the coordination service's lines that come just before its fatal line.
_HELD_SOURCES = (b"coordination_service.cc", b"coordination_service_agent.cc",
                 b"preemption_sync_manager.cc", b"client.h")


def summary(name: str, process: str, coordinator: str) -> str:
  """The line written in place of the runtime's abort."""
  return (f"{name}: process {process}: another process of the run stopped or died (JAX's "
          f"coordination service, coordinator {coordinator}, ended this one); see that "
          "process's log, then start every process again")


def install(name: str, process: str, coordinator: str) -> None:
  """From now on this process's stderr (file descriptor 2) goes through the filter; call it
  before ``jax.distributed.initialize``. Does nothing when stderr is not an open descriptor or
  the filter cannot start (no process or descriptor left): the run goes on unfiltered."""
  try:
    os.fstat(2)
    sys.stderr.flush()
    read, write = os.pipe()
  except OSError:
    return
  try:
    subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), name, process,
                      coordinator], stdin=read, stdout=2, stderr=subprocess.DEVNULL,
                     close_fds=True)
    os.dup2(write, 2)
  except OSError:
    pass
  finally:
    os.close(read)
    os.close(write)


class _Filter:
  """The filter's state: lines held back, whether the fatal line came, the process's own last
  line written after it."""

  def __init__(self, name: str, out):
    self.own = (name + ": ").encode()
    self.out = out
    self.held: list[bytes] = []
    self.fatal = False
    self.own_after: bytes | None = None

  def line(self, line: bytes) -> None:
    if self.fatal:
      if line.startswith(self.own):
        self.own_after = line
      return
    head = _GLOG.match(line)
    if FATAL in line:
      self.fatal, self.held = True, []
    elif head and head.group(1) in _HELD_SOURCES:
      self.held.append(line)
    elif self.held and not head and not line.startswith(self.own):
      self.held.append(line)  # a continuation of a held line (gRPC's details)
    else:
      self.flush()
      self._write(line)

  def flush(self) -> None:
    for line in self.held:
      self._write(line)
    self.held = []

  def end(self, last: str) -> None:
    if not self.fatal:
      self.flush()
    elif self.own_after is not None:
      self._write(self.own_after)
    else:
      self._write(last.encode() + b"\n")

  def _write(self, data: bytes) -> None:
    self.out.write(data)
    self.out.flush()


def _main(name: str, process: str, coordinator: str) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGPIPE, signal.SIG_DFL)
  state = _Filter(name, sys.stdout.buffer)
  pending = b""
  while True:
    ready, _, _ = select.select([0], [], [], HOLD_S if state.held else None)
    if not ready:  # nothing fatal came after the held lines: they were not an abort's
      state.flush()
      continue
    data = os.read(0, 65536)
    if not data:
      break
    *lines, pending = (pending + data).split(b"\n")
    for line in lines:
      state.line(line + b"\n")
  if pending:
    state.line(pending)
  state.end(summary(name, process, coordinator))


if __name__ == "__main__":
  _main(*sys.argv[1:4])
