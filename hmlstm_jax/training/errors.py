"""The trainer's errors: what went wrong in a run that is the user's or the machine's doing.

The experiment binaries print a :class:`RunError` as one line and exit non-zero, with no
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class RunError(Exception):
  """A run cannot go on for a reason the message explains (with what to do)."""


class NonFiniteError(RunError, FloatingPointError):
  """A non-finite loss, gradient norm, parameter or validation objective."""


class Preempted(BaseException):
  """SIGTERM (or SIGINT) arrived where the run could not stop at a checkpoint boundary (the
  final report); the last checkpoint is intact and running again redoes the report. Like
  KeyboardInterrupt, it is not an Exception, so that no ``except Exception`` swallows it."""


def first_line(err: BaseException) -> str:
  """An error as one short line (type and first line of its message), for one-line reports."""
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
