"""A thin ``flax.linen`` wrapper over the functional HM-LSTM, for code that composes modules.

The module owns one parameter, ``'hmlstm'``, which is exactly the pytree of
:func:`hmlstm_jax.init_params`; calling the module is :func:`hmlstm_jax.unroll` on it, and
its ``step`` method is :func:`hmlstm_jax.step`, so the numbers are the functional API's bit
for bit. (For Flax NNX: :mod:`hmlstm_jax.nnx`, which also says why there is no cell for
``nn.RNN``.)

Example::

    cell = HMLSTM(HMLSTMConfig(input_size=8, layer_sizes=(16, 16)))
    carry = cell.initialize_carry(batch_size=4)
    variables = cell.init(jax.random.key(0), carry, xs, 1.0)     # xs: (T, 4, 8)
    final, outputs = cell.apply(variables, carry, xs, 1.0, seq_lengths=lengths)
    carry = cell.apply(variables, carry, xs[0], 1.0, method="step")  # one step
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hmlstm_jax import heads
from hmlstm_jax import hmlstm

__all__ = ["HMLSTM", "OutputModule"]


class HMLSTM(nn.Module):
  """The HM-LSTM of Eq. 1-9 unrolled over a sequence (see :func:`hmlstm.unroll`).

  Attributes:
    config: the :class:`hmlstm.HMLSTMConfig`.
    param_dtype: the parameters' dtype (bfloat16: a bfloat16 model end to end with
      ``initialize_carry(..., dtype=jnp.bfloat16)``).
  """
  config: hmlstm.HMLSTMConfig
  param_dtype: Any = jnp.float32

  def setup(self):
    self.weights = self.param("hmlstm", hmlstm.init_params, self.config, self.param_dtype)

  def initialize_carry(self, batch_size: int, dtype=None) -> hmlstm.State:
    """h = c = z = 0 for every layer (:func:`hmlstm.initial_state`), in ``dtype`` (default
    ``param_dtype``)."""
    return hmlstm.initial_state(self.config, batch_size, dtype or self.param_dtype)

  def __call__(self, carry: hmlstm.State, xs: jax.Array, slope,
               key: jax.Array | None = None, deterministic: bool = False, *,
               seq_lengths: jax.Array | None = None, reset: jax.Array | None = None,
               time_major: bool = True):
    """Returns ``(final_state, UnrollOutputs)`` exactly as :func:`hmlstm.unroll`; with
    ``time_major=False`` ``xs`` (and ``reset``, and the outputs) are batch-major."""
    if not time_major:
      xs = jnp.swapaxes(xs, 0, 1)
      reset = None if reset is None else jnp.swapaxes(jnp.asarray(reset), 0, 1)
    final, out = hmlstm.unroll(self.weights, carry, xs, slope, key, config=self.config,
                               deterministic=deterministic, seq_lengths=seq_lengths,
                               reset=reset)
    if not time_major:
      out = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), out)
    return final, out

  def step(self, carry: hmlstm.State, x_t: jax.Array, slope, key: jax.Array | None = None,
           deterministic: bool = True, *, skip_copy: bool = False,
           valid: jax.Array | None = None, reset: jax.Array | None = None) -> hmlstm.State:
    """One step of every layer (:func:`hmlstm.step`), for generation: x_t (B, input)."""
    return hmlstm.step(self.weights, carry, x_t, slope, key, config=self.config,
                       deterministic=deterministic, skip_copy=skip_copy, valid=valid,
                       reset=reset)


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
