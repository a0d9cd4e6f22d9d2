"""Orbax checkpoints of a run: the last few, and the best by validation NLL.

A checkpoint holds the whole :class:`steps.TrainState` (parameters, Adam state, the carried
recurrent state of every row, the plateau state, the RNG key, the step) and a JSON record of
the rest (data position, slope, best validation NLL, evaluation history). Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a checkpoint on disk is
never half-written.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """``<workdir>/checkpoints`` (last ``keep``) and ``<workdir>/best`` (the best one)."""

  def __init__(self, workdir: str, keep: int):
    options = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True,
                                                     enable_async_checkpointing=False)
    self.latest = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                        options=options(keep), item_names=("state", "meta"))
    self.best = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "best"),
                                      options=options(1), item_names=("state", "meta"))

  @staticmethod
  def _save(manager, step: int, state: Any, meta: dict) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()

  def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
    """Saves ``state`` (host arrays) and ``meta`` (JSON-able) at ``step``; also as best."""
    if self.latest.latest_step() != step:
      self._save(self.latest, step, state, meta)
    if best:
      self._save(self.best, step, state, meta)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, abstract_state: Any, best: bool = False) -> tuple[Any, dict]:
    """The latest (or best) checkpoint, shaped like ``abstract_state``."""
    manager = self.best if best else self.latest
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def close(self) -> None:
    self.latest.close()
    self.best.close()
