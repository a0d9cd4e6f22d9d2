"""The configuration of a character-LM run (§4.1): model, data, optimisation, bookkeeping."""
from __future__ import annotations

import dataclasses
import json
import math

from hmlstm_jax import data
from hmlstm_jax import models


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run depends on. ``experiments/charlm.py`` builds it from flags.

  The paper's procedure (SPEC.md §4): Adam, global-norm clipping at ``clip_norm``, segments
  of ``seq_len`` characters with the state carried between batches, the learning rate divided
  by ``1 / lr_decay_factor`` (50) when the validation NLL stops improving, slope annealing
  a = min(max_slope, 1 + slope_rate · epoch).
  """
  # data
  dataset: str = "synthetic"
  data_dir: str | None = None
  manual_dir: str | None = None
  synthetic_chars: int = 200_000
  synthetic_seed: int = 0
  # model
  model: str = "hmlstm"
  layer_sizes: tuple[int, ...] = (512, 512, 512)
  output_size: int = 512
  embed_size: int = 128
  boundary: str = "step"
  layer_norm: bool = False
  matmul_dtype: str | None = None
  # optimisation
  batch_size: int = 64
  seq_len: int = 100
  learning_rate: float = 0.002
  clip_norm: float = 1.0
  lr_decay_factor: float = 0.02
  plateau_patience: int = 1
  max_slope: float = 5.0
  slope_rate: float = 0.04
  num_epochs: float = 1.0
  seed: int = 0
  num_devices: int | None = None
  # evaluation and bookkeeping
  eval_batch_size: int = 16
  eval_every: int = 1000
  eval_max_segments: int | None = None
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  figure_chars: int = 180
  num_samples: int = 3
  sample_chars: int = 200

  def __post_init__(self):
    object.__setattr__(self, "layer_sizes", tuple(self.layer_sizes))
    if self.dataset not in data.DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; choose from {data.DATASETS}")
    for name in ("batch_size", "seq_len", "eval_batch_size", "eval_every", "log_every",
                 "checkpoint_every", "keep_checkpoints", "synthetic_chars"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if not (self.num_epochs > 0 and math.isfinite(self.num_epochs)):
      raise ValueError(f"num_epochs must be positive, got {self.num_epochs}")
    if not 0 < self.lr_decay_factor <= 1:
      raise ValueError(f"lr_decay_factor must be in (0, 1], got {self.lr_decay_factor}")
    self.model_config  # validates the model fields

  @property
  def model_config(self) -> models.CharLMConfig:
    """The model; the vocabulary size is a placeholder until the data is loaded."""
    return self.with_vocab(1)

  def with_vocab(self, vocab_size: int) -> models.CharLMConfig:
    return models.CharLMConfig(
        vocab_size=vocab_size, layer_sizes=self.layer_sizes, output_size=self.output_size,
        embed_size=self.embed_size, boundary=self.boundary, layer_norm=self.layer_norm,
        matmul_dtype=self.matmul_dtype, model=self.model)

  def check_devices(self, num_devices: int) -> None:
    """Fails before any work when the batches cannot be split over the devices."""
    for name in ("batch_size", "eval_batch_size"):
      if getattr(self, name) % num_devices:
        raise ValueError(
            f"{name}={getattr(self, name)} is not divisible by the {num_devices} devices in use; "
            f"choose a multiple of {num_devices} or set --num_devices")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)
