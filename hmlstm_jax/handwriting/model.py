"""The handwriting model of §4.2: pen offsets → HM-LSTM → output module → mixture density head.

At each step the model reads (x_t, y_t, p_t) (normalised offsets and the pen-up flag) and
predicts the distribution of (x_{t+1}, y_{t+1}, p_{t+1}) (Graves 2013, Eq. 17-23;
:mod:`hmlstm_jax.handwriting.mdn`). Whole sequences, padded at the end: every quantity is masked, so the
padding never changes a number (the recurrence is causal, so padding after a sequence cannot
reach its outputs either).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hmlstm_jax import backbone
from hmlstm_jax import hmlstm
from hmlstm_jax import lstm
from hmlstm_jax.handwriting import mdn
from hmlstm_jax.settings import setting

INPUT_SIZE = 3  # (x offset, y offset, pen up)


@dataclasses.dataclass(frozen=True)
class HandwritingConfig(backbone.RecurrentConfig):
  """The backbone's settings (:class:`~hmlstm_jax.backbone.RecurrentConfig`; paper: 400 × 3
  units, output 400) and the number of mixture components K."""
  num_components: int = setting(mdn.NUM_COMPONENTS, "Mixture components K of the density head "
                                "(20, as Graves 2013).")

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.num_components, int) or self.num_components < 1:
      raise ValueError(f"num_components must be a positive int, got {self.num_components!r}")

  @property
  def rnn(self) -> hmlstm.HMLSTMConfig | lstm.LSTMConfig:
    """The recurrence (HM-LSTM, or the LSTM stack) reading (x, y, p)."""
    return self.recurrence(INPUT_SIZE)


class HandwritingOutputs(NamedTuple):
  final_state: hmlstm.State
  rnn: hmlstm.UnrollOutputs  # time-major h (T, B, d), z (T, B, 1); z = () for the LSTM


def init_handwriting(key: jax.Array, config: HandwritingConfig) -> dict:
  """``hmlstm`` (or ``lstm``), ``output`` (Eq. 11-12; absent with ``output_head='top'``) and
  ``mdn`` (:func:`mdn.init_mdn`)."""
  k_rnn, k_out, k_mdn = jax.random.split(key, 3)
  return {**backbone.init_recurrence_and_output(k_rnn, k_out, config, INPUT_SIZE),
          "mdn": mdn.init_mdn(k_mdn, config.head_size, config.num_components)}


def handwriting_apply(params: dict, state: hmlstm.State, inputs: jax.Array, slope,
                      key: jax.Array | None = None, *, config: HandwritingConfig,
                      deterministic: bool = False) -> tuple[mdn.Mixture, HandwritingOutputs]:
  """The predicted distribution after each input: inputs (B, T, 3) → a batch-major
  :class:`~hmlstm_jax.handwriting.mdn.Mixture` with leading shape (B, T)."""
  if inputs.ndim != 3 or inputs.shape[-1] != INPUT_SIZE:
    raise ValueError(f"inputs must be (batch, time, 3), got shape {inputs.shape}")
  final, outs, h_e = backbone.recurrence_and_output(
      params, state, jnp.swapaxes(inputs, 0, 1), slope, key, config=config,
      deterministic=deterministic)
  mix = mdn.mixture(params["mdn"], jnp.swapaxes(h_e, 0, 1))
  return mix, HandwritingOutputs(final_state=final, rnn=outs)


def sequence_log_likelihoods(params: dict, inputs: jax.Array, targets: jax.Array,
                             mask: jax.Array, slope, key: jax.Array | None = None, *,
                             config: HandwritingConfig, deterministic: bool = False):
  """Σ_t log Pr(x_{t+1} | y_≤t) of each sequence over its real positions (Table 3's quantity
  before averaging), from the initial state. Returns ((B,) sums, HandwritingOutputs)."""
  state = hmlstm.initial_state(config.rnn, inputs.shape[0])
  mix, outs = handwriting_apply(params, state, inputs, slope, key, config=config,
                                deterministic=deterministic)
  per_point = jnp.where(mask > 0, mdn.log_likelihood(mix, targets), 0.0)
  return jnp.sum(per_point, axis=1), outs


def handwriting_loss(params: dict, inputs: jax.Array, targets: jax.Array, mask: jax.Array,
                     slope, key: jax.Array | None = None, *, config: HandwritingConfig):
  """Training loss: the negative log-likelihood per real point (nats), masked."""
  sums, outs = sequence_log_likelihoods(params, inputs, targets, mask, slope, key, config=config)
  return -jnp.sum(sums) / jnp.maximum(jnp.sum(mask), 1.0), outs
