"""``flax.nnx`` modules over the functional HM-LSTM: the same parameters, the same numbers.

``HMLSTM`` holds the pytree of :func:`hmlstm_jax.init_params` as ``layers``: an ``nnx.List``
of one ``nnx.Dict`` of :class:`flax.nnx.Param` per layer, named as the paper's matrices
(``W``, ``U``, ``U_top``, ``b``, layer norm); :attr:`HMLSTM.weights` gives the functional
pytree back. Calling it is :func:`hmlstm_jax.unroll`, its :meth:`HMLSTM.step` is
:func:`hmlstm_jax.step`. ``OutputModule`` is Eq. 11-12 (:func:`hmlstm_jax.output_module`).

Example, a variable-length batch, batch-major as ``nnx.RNN`` takes it::

    from flax import nnx
    import hmlstm_jax as hm

    rnn = hm.nnx.HMLSTM(hm.HMLSTMConfig(input_size=8, layer_sizes=(16, 16)), rngs=nnx.Rngs(0))
    carry = rnn.initialize_carry(batch_size=4)
    final, outputs = rnn(carry, xs, 1.0, seq_lengths=lengths, time_major=False)  # xs (4, T, 8)

Why no cell for ``nnx.RNN`` / ``nnx.Bidirectional``: a step of the HM-LSTM reads a slope that
anneals during training (a traced input, so that changing it does not recompile) and, for the
``'sample'`` boundary, a PRNG key per step; ``nnx.RNN`` gives its cell only (carry, x). The
module's ``__call__`` offers what ``nnx.RNN`` does (``seq_lengths``, ``time_major``, the final
carry), with the custom backward that ``nnx.RNN``'s scan would lose; a bidirectional layer is
two of them, the second on each row reversed within its length (:func:`reverse_within_lengths`).
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from hmlstm_jax import heads
from hmlstm_jax import hmlstm

__all__ = ["HMLSTM", "OutputModule", "reverse_within_lengths"]


def _params(tree: dict) -> nnx.Dict:
  """A dict of arrays (one layer's, or a head's) as an ``nnx.Dict`` of ``nnx.Param``."""
  return nnx.Dict({name: nnx.Param(value) for name, value in tree.items()})


def _values(params: nnx.Dict) -> dict:
  return {name: param.get_value() for name, param in params.items()}


class HMLSTM(nnx.Module):
  """The HM-LSTM of Eq. 1-9 (:mod:`hmlstm_jax.hmlstm`) as an NNX module.

  Args:
    config: the :class:`hmlstm_jax.HMLSTMConfig` (its ``matmul_dtype`` sets the matmuls').
    rngs: ``nnx.Rngs``; the ``params`` stream initialises the weights.
    param_dtype: the parameters' dtype (``jnp.bfloat16``: a bfloat16 model end to end; the
      carry from :meth:`initialize_carry` follows it).
  """

  def __init__(self, config: hmlstm.HMLSTMConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.config = config
    self.layers = nnx.List([_params(layer) for layer in
                            hmlstm.init_params(rngs.params(), config, param_dtype)])

  @property
  def weights(self) -> tuple[dict, ...]:
    """The parameters as :func:`hmlstm.init_params` makes them (the functional API's)."""
    return tuple(_values(layer) for layer in self.layers)

  @property
  def dtype(self):
    return self.layers[0]["b"].get_value().dtype

  def initialize_carry(self, batch_size: int) -> hmlstm.State:
    """h = c = z = 0 for every layer, in the parameters' dtype (:func:`hmlstm.initial_state`)."""
    return hmlstm.initial_state(self.config, batch_size, self.dtype)

  def __call__(self, carry: hmlstm.State, xs: jax.Array, slope, *,
               key: jax.Array | None = None, deterministic: bool = False,
               seq_lengths: jax.Array | None = None, reset: jax.Array | None = None,
               time_major: bool = True) -> tuple[hmlstm.State, hmlstm.UnrollOutputs]:
    """:func:`hmlstm.unroll` over ``xs``: (T, B, input) or, with ``time_major=False``, (B, T,
    input); ``reset`` (T, B) or (B, T) likewise; the outputs come back in the same layout.
    Returns ``(final_state, UnrollOutputs(h, z))``."""
    if not time_major:
      xs = jnp.swapaxes(xs, 0, 1)
      reset = None if reset is None else jnp.swapaxes(jnp.asarray(reset), 0, 1)
    final, out = hmlstm.unroll(self.weights, carry, xs, slope, key,
                               config=self.config, deterministic=deterministic,
                               seq_lengths=seq_lengths, reset=reset)
    if not time_major:
      out = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), out)
    return final, out

  def step(self, carry: hmlstm.State, x_t: jax.Array, slope, *, key: jax.Array | None = None,
           deterministic: bool = True, skip_copy: bool = False, valid: jax.Array | None = None,
           reset: jax.Array | None = None) -> hmlstm.State:
    """One step of every layer (:func:`hmlstm.step`), for generation: x_t (B, input)."""
    return hmlstm.step(self.weights, carry, x_t, slope, key, config=self.config,
                       deterministic=deterministic, skip_copy=skip_copy, valid=valid,
                       reset=reset)


class OutputModule(nnx.Module):
  """Eq. 11-12, h^e = ReLU(Σ_ℓ g^ℓ W^e_ℓ h^ℓ) with gates g^ℓ = sigmoid(w^ℓ·[h^1; …; h^L])
  (:func:`heads.output_module`), as an NNX module."""

  def __init__(self, layer_sizes: Sequence[int], output_size: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.params = _params(heads.init_output_module(rngs.params(), layer_sizes, output_size,
                                                   param_dtype))

  @property
  def weights(self) -> dict:
    """``w_gate`` and ``W_e`` as :func:`heads.init_output_module` makes them."""
    return _values(self.params)

  def __call__(self, hs: Sequence[jax.Array]) -> jax.Array:
    """h^e from every layer's h (each (..., d_ℓ), the same leading shape)."""
    return heads.output_module(self.weights, hs)


def reverse_within_lengths(xs: jax.Array, seq_lengths: jax.Array) -> jax.Array:
  """Each row of a batch-major (B, T, ...) array reversed within its first ``seq_lengths[b]``
  steps, the padding left in place: the input (and, applied again, the outputs) of the
  backward half of a bidirectional layer."""
  T = xs.shape[1]
  t = jnp.arange(T)[None, :]
  n = jnp.asarray(seq_lengths)[:, None]
  index = jnp.where(t < n, n - 1 - t, t)
  return jnp.take_along_axis(xs, index.reshape(index.shape + (1,) * (xs.ndim - 2)), axis=1)
