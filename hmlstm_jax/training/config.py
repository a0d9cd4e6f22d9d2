"""The trainer's settings: batches, the default optimiser's, cadence and bookkeeping."""
from __future__ import annotations

import dataclasses
import math

from hmlstm_jax.settings import setting
from hmlstm_jax.training import steps


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What the trainer needs of a run; an experiment's config nests it as its ``train`` field.

  The default optimiser is the paper's (decisions.md §4, :meth:`optimizer`): Adam,
  global-norm clipping at ``clip_norm``, the learning rate multiplied by ``lr_decay_factor``
  (1/50) when the validation objective stops improving; with ``max_lr_cuts`` the run ends
  when it stops improving once more (the trainer's stopping rule). Settings marked changeable may
  differ when a run resumes; the others must match the checkpoint's.
  """
  batch_size: int = setting(64, "Rows (streams or sequences) per training batch, global over "
                            "all devices and hosts.")
  eval_batch_size: int = setting(16, "Rows per evaluation batch.")
  learning_rate: float = setting(0.002, "Initial Adam learning rate.")
  clip_norm: float = setting(1.0, "Global gradient-norm clipping threshold.")
  lr_decay_factor: float = setting(0.02, "Learning-rate factor applied when the validation "
                                   "objective stops improving (1/50), in (0, 1).")
  plateau_patience: int = setting(1, "Evaluations without improvement before the learning "
                                  "rate is cut.")
  num_epochs: float = setting(1.0, "Training epochs (may be fractional; may be raised to "
                              "continue a finished run). With max_lr_cuts, the most.",
                              changeable=True)
  max_lr_cuts: int | None = setting(
      None, "The stopping rule (decisions.md §4): the run ends at the validation where the "
      "objective stops improving after the learning rate has been cut this many times (the "
      "paper's: 1, cut once, then end); unset: train num_epochs.", changeable=True)
  seed: int = setting(0, "Seed of the parameters and of every step's randomness.")
  num_devices: int | None = setting(None, "Local devices to use (default: all).",
                                    changeable=True)
  eval_every: int = setting(1000, "Validate every this many steps (and at the end).")
  eval_max_segments: int | None = setting(
      None, "Cap on validation batches during training (the final evaluation is complete).")
  log_every: int = setting(50, "Progress line and TensorBoard scalars every this many steps.",
                           changeable=True)
  checkpoint_every: int = setting(500, "Checkpoint every this many steps.", changeable=True)
  keep_checkpoints: int = setting(3, "Latest checkpoints kept (the best is kept besides).",
                                  changeable=True)

  def __post_init__(self):
    for name in ("batch_size", "eval_batch_size", "eval_every", "log_every", "checkpoint_every",
                 "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if self.max_lr_cuts is not None and self.max_lr_cuts < 0:
      raise ValueError(f"max_lr_cuts must not be negative (or unset), got {self.max_lr_cuts}")
    for name in ("num_devices", "eval_max_segments"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1 (or unset), got {getattr(self, name)}")
    if not (self.num_epochs > 0 and math.isfinite(self.num_epochs)):
      raise ValueError(f"num_epochs must be positive, got {self.num_epochs}")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
    if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
      raise ValueError(f"clip_norm must be positive, got {self.clip_norm}")
    # Optax checks its own arguments when the transformations are built: build them now,
    # before any data is loaded, so that a bad value fails first.
    self.optimizer()

  def optimizer(self) -> steps.Optimizer:
    """The paper's optimiser from these settings (:func:`.steps.paper_optimizer`)."""
    return steps.paper_optimizer(self.learning_rate, self.clip_norm, self.lr_decay_factor,
                                 self.plateau_patience)

  def check_devices(self, num_devices: int) -> None:
    """Fails before any work when the batches cannot be split over the devices."""
    for name in ("batch_size", "eval_batch_size"):
      if getattr(self, name) % num_devices:
        raise ValueError(
            f"{name}={getattr(self, name)} is not divisible by the {num_devices} devices in use; "
            f"choose a multiple of {num_devices} or set --num_devices")
