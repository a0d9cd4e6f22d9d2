"""What both experiment binaries share: where the data lives, and the HM-LSTM's schedule
(the hard sigmoid's slope, §3.3)."""
from __future__ import annotations

import dataclasses

import numpy as np

from hmlstm_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class DataDirs:
  """Where TFDS keeps prepared datasets, and where manual downloads wait."""
  data_dir: str | None = setting(None, "TFDS data directory (default ~/tensorflow_datasets).",
                                 changeable=True)
  manual_dir: str | None = setting(
      None, "Directory holding pre-downloaded archives (the dataset's flagfile names them); "
      "default <data_dir>/downloads/manual.", changeable=True)


class SlopeAnnealing:
  """Mixed into an :class:`~hmlstm_jax.training.Experiment` whose ``self.model`` is a
  :class:`~hmlstm_jax.backbone.RecurrentConfig`: each step's schedule is the slope
  a = min(max_slope, 1 + slope_rate · epoch), shown as ``slope`` in progress lines."""

  def schedule(self, step: int, epoch: float) -> np.float32:
    del step
    return np.float32(self.model.slope(epoch))

  def schedule_scalars(self, slope) -> dict[str, float]:
    return {"slope": float(slope)}
