"""A thin ``flax.linen`` wrapper over the functional HM-LSTM, for code that composes modules.

The module owns one parameter, ``'hmlstm'``, which is exactly the pytree of
:func:`hmlstm_jax.init_params`; calling the module is :func:`hmlstm_jax.unroll` on it in
``nn.RNN``'s convention (:mod:`hmlstm_jax.rnn`: batch-major, ``initial_carry``,
``return_carry``, ``reverse``, ``keep_order``), and its ``step`` method is
:func:`hmlstm_jax.step`, so the numbers are the functional API's bit for bit. The
``'sample'`` boundary draws from the ``'boundary'`` RNG stream (``rngs={'boundary': key}``).
(For Flax NNX: :mod:`hmlstm_jax.nnx`, which also says why there is no cell for ``nn.RNN``.)

Example::

    rnn = HMLSTM(HMLSTMConfig(input_size=8, layer_sizes=(16, 16)))
    variables = rnn.init(jax.random.key(0), xs)                  # xs: (4, T, 8)
    out = rnn.apply(variables, xs, 1.0, seq_lengths=lengths)     # out.h, out.z per layer
    carry = rnn.initialize_carry(batch_size=4)
    carry = rnn.apply(variables, carry, xs[:, 0], 1.0, method="step")  # one step
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hmlstm_jax import heads
from hmlstm_jax import hmlstm
from hmlstm_jax import rnn

__all__ = ["HMLSTM", "OutputModule"]


class HMLSTM(nn.Module):
  """The HM-LSTM of Eq. 1-9 unrolled over a sequence (see :func:`hmlstm.unroll`).

  Attributes:
    config: the :class:`hmlstm.HMLSTMConfig`.
    param_dtype: the parameters' dtype. The recurrence computes in the inputs' dtype.
    time_major, return_carry, reverse, keep_order: the defaults of the call's arguments of
      the same names, as ``nn.RNN``'s (batch-major; outputs only).
    output: what the call returns: ``'layers'`` (every layer's h and z), ``'top'`` or
      ``'all'`` (:mod:`hmlstm_jax.rnn`).
    deterministic: evaluation mode for the ``'sample'`` boundary (the step function).
  """
  config: hmlstm.HMLSTMConfig
  param_dtype: Any = jnp.float32
  time_major: bool = False
  return_carry: bool = False
  reverse: bool = False
  keep_order: bool = False
  output: str = "layers"
  deterministic: bool = False

  def setup(self):
    rnn.check_output(self.output)
    self.weights = self.param("hmlstm", hmlstm.init_params, self.config, self.param_dtype)

  def initialize_carry(self, batch_size: int, dtype=None) -> hmlstm.State:
    """h = c = z = 0 for every layer (:func:`hmlstm.initial_state`), in ``dtype`` (default
    ``param_dtype``)."""
    return hmlstm.initial_state(self.config, batch_size, dtype or self.param_dtype)

  def __call__(self, inputs: jax.Array, slope=1.0, *, initial_carry: hmlstm.State | None = None,
               seq_lengths: jax.Array | None = None, reset: jax.Array | None = None,
               return_carry: bool | None = None, time_major: bool | None = None,
               reverse: bool | None = None, keep_order: bool | None = None,
               output: str | None = None, deterministic: bool | None = None,
               key: jax.Array | None = None):
    """:func:`hmlstm.unroll` over ``inputs`` (B, T, input), or (T, B, input) with
    ``time_major=True``; ``reset`` likewise; ``slope`` the hard sigmoid's a (Eq. 9). Each
    setting left None takes the module's. The ``'sample'`` boundary's key: ``key``, else one
    of the ``'boundary'`` RNG stream. Returns the outputs (``output``), or
    ``(final_carry, outputs)`` with ``return_carry``."""
    chosen = rnn.settings(self, time_major=time_major, return_carry=return_carry,
                          reverse=reverse, keep_order=keep_order, output=output,
                          deterministic=deterministic)
    return rnn.call(self.weights, self.config, inputs, slope, initial_carry=initial_carry,
                    key=self._key(chosen["deterministic"], key), seq_lengths=seq_lengths,
                    reset=reset, **chosen)

  def step(self, carry: hmlstm.State, x_t: jax.Array, slope=1.0, *,
           deterministic: bool | None = None, key: jax.Array | None = None,
           skip_copy: bool = False, valid: jax.Array | None = None,
           reset: jax.Array | None = None) -> hmlstm.State:
    """One step of every layer (:func:`hmlstm.step`), for generation: x_t (B, input)."""
    deterministic = self.deterministic if deterministic is None else deterministic
    return hmlstm.step(self.weights, carry, x_t, slope, self._key(deterministic, key),
                       config=self.config, deterministic=deterministic, skip_copy=skip_copy,
                       valid=valid, reset=reset)

  def _key(self, deterministic: bool, key):
    """``key``, else a key of the ``'boundary'`` stream where boundaries are sampled, else
    None."""
    sampled = self.config.boundary == "sample" and not deterministic
    if key is not None or not sampled or self.config.num_layers == 1:
      return key
    return self.make_rng("boundary")


class OutputModule(nn.Module):
  """Eq. 11-12, h^e = ReLU(Σ_ℓ g^ℓ W^e_ℓ h^ℓ) with g^ℓ = sigmoid(w^ℓ·[h^1; …; h^L])
  (:func:`heads.output_module`); one parameter, ``'output'``, as
  :func:`heads.init_output_module` makes it."""
  layer_sizes: tuple[int, ...]
  output_size: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hs):
    """h^e from every layer's h (each (..., d_ℓ), the same leading shape)."""
    weights = self.param("output", heads.init_output_module, self.layer_sizes,
                         self.output_size, self.param_dtype)
    return heads.output_module(weights, hs)
