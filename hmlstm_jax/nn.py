"""A thin ``flax.linen`` wrapper over the functional HM-LSTM, for code that composes modules.

The module owns one parameter, ``'hmlstm'``, which is exactly the pytree of
:func:`hmlstm_jax.init_params`; calling the module is :func:`hmlstm_jax.unroll` on it, so
the numbers are the functional API's bit for bit.

Example::

    cell = HMLSTM(HMLSTMConfig(input_size=8, layer_sizes=(16, 16)))
    carry = cell.initialize_carry(batch_size=4)
    variables = cell.init(jax.random.key(0), carry, xs, 1.0)     # xs: (T, 4, 8)
    final, outputs = cell.apply(variables, carry, xs, 1.0)
"""
from __future__ import annotations

import flax.linen as nn
import jax

from hmlstm_jax import hmlstm


class HMLSTM(nn.Module):
  """The HM-LSTM of Eq. 1-9 unrolled over a time-major sequence (see :func:`hmlstm.unroll`)."""
  config: hmlstm.HMLSTMConfig

  def initialize_carry(self, batch_size: int) -> hmlstm.State:
    """h = c = z = 0 for every layer (:func:`hmlstm.initial_state`)."""
    return hmlstm.initial_state(self.config, batch_size)

  @nn.compact
  def __call__(self, carry: hmlstm.State, xs: jax.Array, slope,
               key: jax.Array | None = None, deterministic: bool = False):
    """Returns ``(final_state, UnrollOutputs)`` exactly as :func:`hmlstm.unroll`."""
    params = self.param("hmlstm", hmlstm.init_params, self.config)
    return hmlstm.unroll(params, carry, xs, slope, key, config=self.config,
                         deterministic=deterministic)
