"""What both tasks' models share (§4): the recurrence (the HM-LSTM, or the LSTM stack of the
baselines) and the output module of Eq. 11-12 over it, with their settings.

A task's model (:mod:`hmlstm_jax.charlm`, :mod:`hmlstm_jax.handwriting`) puts its own input in
front (an embedding, pen offsets) and its own head behind (a softmax, a mixture density
head), and extends :class:`RecurrentConfig` with its own settings.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hmlstm_jax import heads
from hmlstm_jax import hmlstm
from hmlstm_jax import lstm
from hmlstm_jax.settings import setting


MODELS = ("hmlstm", "lstm")
OUTPUT_HEADS = ("module", "top")


def slope_schedule(epoch: jax.Array | float, max_slope: float = 5.0,
                   rate: float = 0.04) -> jax.Array:
  """Slope annealing of §3.3: a = min(a_max, 1 + rate · epoch).

  The paper's PTB setting is the default (a_max = 5, rate 0.04 per epoch); handwriting
  uses a_max = 3, rate 0.004; Text8 and enwik8 use a = 1 (``rate=0``).

  Args:
    epoch: the epoch counter, may be fractional and traced.
    max_slope: a_max.
    rate: increase of the slope per epoch.

  Returns:
    The slope a as a float32 scalar: a JAX array for an array ``epoch``, a NumPy scalar for a
    Python number (the same float32 arithmetic on the host, with no device work: the trainer
    computes each step's slope this way).
  """
  xp = jnp if isinstance(epoch, jax.Array) else np
  return xp.minimum(xp.float32(max_slope), xp.float32(1.0) + xp.float32(rate) * xp.float32(epoch))


@dataclasses.dataclass(frozen=True)
class RecurrentConfig(hmlstm.HMLSTMSettings):
  """The part the paper's two models share: the recurrence and the output module (hashable).

  The HM-LSTM's settings are :class:`hmlstm.HMLSTMSettings`' (declared there once); the
  LSTM baseline reads ``layer_sizes``, ``layer_norm``, ``ln_gain`` and ``matmul_dtype`` of
  them (:class:`lstm.LSTMConfig`).

  Attributes:
    model: ``'hmlstm'`` (the paper's model) or ``'lstm'``: the LSTM stack baseline
      (:mod:`hmlstm_jax.lstm`; layer-normalised with ``layer_norm``) with the same output
      module, as the paper's LSTM baselines (Table 1 †, Table 3); it has no boundaries.
    output_size: width of the output embedding h^e (PTB 512; Text8/enwik8 2048; handwriting 400).
    output_head: what the prediction head reads: ``'module'``, the paper's output module
      h^e (Eq. 11-12) over every layer; or ``'top'``, the top layer's h^L_t alone (no output
      module; ``output_size`` unused), the usual stacked-RNN head, as an ablation.
    rate_weight, rate_min, rate_max: the optional boundary-rate penalty (not the paper's;
      :func:`boundary_penalty`): its weight (0: off) and each detector's band.
    max_slope, slope_rate: slope annealing a = min(max_slope, 1 + slope_rate · epoch) (§3.3;
      :meth:`slope`), the schedule the experiments give the trainer.
  """
  model: str = setting("hmlstm", "'hmlstm', or 'lstm' for the (layer-norm) LSTM baseline with "
                       "the same output module.", choices=MODELS)
  output_size: int = setting(512, "Width of the output embedding h^e (Eq. 12).")
  output_head: str = setting("module", "What the prediction head reads: module (the output "
                             "module of Eq. 11-12 over all layers) or top (the top layer's h "
                             "alone; output_size unused).", choices=OUTPUT_HEADS)
  rate_weight: float = setting(0.0, "Weight of the boundary-rate penalty (not the paper's; 0: "
                               "off): each detector's rate kept in [rate_min, rate_max].")
  rate_min: tuple[float, ...] = setting((), "Per detector (layers 1..L-1), the lowest boundary "
                                        "rate the penalty allows, e.g. 0.1,0.02.")
  rate_max: tuple[float, ...] = setting((), "Per detector (layers 1..L-1), the highest boundary "
                                        "rate the penalty allows, e.g. 0.3,0.1.")
  max_slope: float = setting(5.0, "Slope annealing: a = min(max_slope, 1 + slope_rate * epoch).")
  slope_rate: float = setting(0.04, "Slope increase per epoch; 0 disables annealing (a = 1).")

  def __post_init__(self):
    super().__post_init__()
    if self.model not in MODELS:
      raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
    if not isinstance(self.output_size, int) or self.output_size < 1:
      raise ValueError(f"output_size must be a positive int, got {self.output_size!r}")
    if self.output_head not in OUTPUT_HEADS:
      raise ValueError(f"output_head must be one of {OUTPUT_HEADS}, got {self.output_head!r}")
    if not (self.max_slope >= 1 and self.slope_rate >= 0):
      raise ValueError(f"need max_slope >= 1 and slope_rate >= 0, got {self.max_slope}, "
                       f"{self.slope_rate}")
    for name in ("rate_min", "rate_max"):
      object.__setattr__(self, name, tuple(float(r) for r in getattr(self, name)))
    if self.rate_weight < 0:
      raise ValueError(f"rate_weight must not be negative, got {self.rate_weight!r}")
    if self.rate_weight > 0:
      detectors = len(self.layer_sizes) - 1
      if self.model != "hmlstm" or detectors < 1:
        raise ValueError("rate_weight penalises boundary rates: it needs model=hmlstm with "
                         "at least 2 layers")
      if len(self.rate_min) != detectors or len(self.rate_max) != detectors:
        raise ValueError(f"rate_min and rate_max need one value per detector ({detectors}: "
                         f"layers 1..{detectors}), got {list(self.rate_min)} and "
                         f"{list(self.rate_max)}")
      if not all(0 <= lo <= hi <= 1 for lo, hi in zip(self.rate_min, self.rate_max)):
        raise ValueError(f"each band needs 0 <= rate_min <= rate_max <= 1, got "
                         f"{list(self.rate_min)} and {list(self.rate_max)}")

  @property
  def head_size(self) -> int:
    """Width of what the prediction head reads: ``output_size``, or d_L with ``'top'``."""
    return self.output_size if self.output_head == "module" else self.layer_sizes[-1]

  def recurrence(self, input_size: int) -> hmlstm.HMLSTMConfig | lstm.LSTMConfig:
    """The HM-LSTM (or the LSTM stack, with ``model='lstm'``) reading inputs of
    ``input_size``; either one's state is :func:`hmlstm.initial_state` of it."""
    if self.model == "lstm":
      return lstm.LSTMConfig(input_size=input_size, layer_sizes=self.layer_sizes,
                             layer_norm=self.layer_norm, ln_gain=self.ln_gain,
                             matmul_dtype=self.matmul_dtype)
    return self.with_input(input_size)

  def slope(self, epoch: float) -> float:
    """The hard sigmoid's slope a = min(max_slope, 1 + slope_rate · epoch) (§3.3), on the host."""
    return float(slope_schedule(epoch, self.max_slope, self.slope_rate))


class SlopeAnnealing:
  """Slope annealing (§3.3) in a run: mixed into an :class:`~hmlstm_jax.training.Experiment`
  whose ``self.model`` is a :class:`RecurrentConfig`, each step's schedule is the slope
  :meth:`RecurrentConfig.slope` of its epoch (the formula: :func:`slope_schedule`),
  shown as ``slope`` in progress lines. The trainer only passes it to the loss."""

  def schedule(self, step: int, epoch: float) -> np.float32:
    del step
    return np.float32(self.model.slope(epoch))

  def schedule_scalars(self, slope) -> dict[str, float]:
    return {"slope": float(slope)}


def init_recurrence_and_output(k_rnn: jax.Array, k_out: jax.Array, config: RecurrentConfig,
                               input_size: int) -> dict:
  """``hmlstm`` (:func:`hmlstm.init_params`; ``lstm`` for the baseline, :func:`lstm.init_params`)
  from ``k_rnn`` and, with ``output_head='module'``, ``output``
  (:func:`heads.init_output_module`) from ``k_out``."""
  rnn_init = lstm.init_params if config.model == "lstm" else hmlstm.init_params
  params = {config.model: rnn_init(k_rnn, config.recurrence(input_size))}
  if config.output_head == "module":
    params["output"] = heads.init_output_module(k_out, config.layer_sizes, config.output_size)
  return params


def recurrence_and_output(params: dict, state: hmlstm.State, xs: jax.Array, slope,
                          key: jax.Array | None, *, config: RecurrentConfig,
                          deterministic: bool = False, fast_backward: bool = True):
  """Eq. 1-9 (or the LSTM stack) over time-major ``xs`` (T, B, input), then Eq. 11-12.

  Returns ``(final_state, UnrollOutputs, h_e)`` with h^e (T, B, ``config.head_size``): the
  output module's, or h^L with ``output_head='top'``; the LSTM's outputs have ``z = ()``.
  """
  rnn_config = config.recurrence(xs.shape[-1])
  if config.model == "lstm":
    final, hs = lstm.unroll(params["lstm"], state, xs, config=rnn_config)
    outs = hmlstm.UnrollOutputs(h=hs, z=())
  else:
    final, outs = hmlstm.unroll(params["hmlstm"], state, xs, slope, key, config=rnn_config,
                                deterministic=deterministic, fast_backward=fast_backward)
  return final, outs, _head_input(params, config, outs.h)


def _head_input(params: dict, config: RecurrentConfig, hs) -> jax.Array:
  """h^e: the output module of Eq. 11-12 over every layer's h, or h^L with
  ``output_head='top'``; ``hs`` per layer (..., d_ℓ), one step or stacked over time."""
  if config.output_head == "top":
    return hs[-1]
  return heads.output_module(params["output"], hs)


def recurrence_step(params: dict, state: hmlstm.State, x_t: jax.Array, slope,
                    key: jax.Array | None = None, *, config: RecurrentConfig,
                    deterministic: bool = True,
                    skip_copy: bool = False) -> tuple[hmlstm.State, jax.Array]:
  """One step of :func:`recurrence_and_output`: Eq. 1-9 (or the LSTM stack) on x_t (B, input),
  then Eq. 11-12. Returns ``(state, h_e)`` with h^e (B, ``config.head_size``).

  ``skip_copy``: the HM-LSTM's layers whose rows all COPY do no work (:func:`hmlstm.step`);
  the same numbers. The output module always runs: its gates read every layer, and layer 1
  updates at every step.
  """
  rnn_config = config.recurrence(x_t.shape[-1])
  if config.model == "lstm":
    state, hs = lstm.unroll(params["lstm"], state, x_t[None], config=rnn_config)
    hs = tuple(h[0] for h in hs)
  else:
    state = hmlstm.step(params["hmlstm"], state, x_t, slope, key, config=rnn_config,
                        deterministic=deterministic, skip_copy=skip_copy)
    hs = tuple(layer.h for layer in state)
  return state, _head_input(params, config, hs)


def boundary_penalty(rnn: hmlstm.UnrollOutputs, config: RecurrentConfig,
                     mask: jax.Array | None = None) -> jax.Array:
  """``rate_weight`` × :func:`hmlstm.boundary_rate_penalty` of an unroll's boundaries (0 when
  the weight is 0 or the model has no boundaries); ``mask`` (B, T), batch-major, as the
  experiments' batches. Added to the training loss, never to the reported NLL."""
  if config.rate_weight == 0 or not rnn.z:
    return jnp.float32(0.0)
  mask = None if mask is None else jnp.asarray(mask).T
  return config.rate_weight * hmlstm.boundary_rate_penalty(rnn.z, config.rate_min,
                                                           config.rate_max, mask)
