"""Metrics a person can follow: TensorBoard event files (through tensorboardX) and progress lines.

tensorboardX writes TensorBoard's event format without TensorFlow, to a local directory or a
``gs://`` one (with ``google-cloud-storage`` installed). Only process 0 writes; the others
only print their log.
"""
from __future__ import annotations

import os

from absl import logging
import jax


def say(message: str) -> None:
  """A progress line on stdout (process 0 only), also logged."""
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)


class Writer:
  """Scalars to ``<workdir>/tb`` (TensorBoard) on process 0; nothing elsewhere."""

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir=os.path.join(str(workdir), "tb"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """Writes ``values`` (tag → number) at ``step`` and flushes."""
    if self._writer is None:
      return
    for tag, value in values.items():
      self._writer.add_scalar(tag, float(value), int(step))
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
