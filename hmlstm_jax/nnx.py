"""``flax.nnx`` modules over the functional HM-LSTM: the same parameters, the same numbers.

``HMLSTM`` holds the pytree of :func:`hmlstm_jax.init_params` as ``layers``: an ``nnx.List``
of one ``nnx.Dict`` of :class:`flax.nnx.Param` per layer, named as the paper's matrices
(``W``, ``U``, ``U_top``, ``b``, layer norm); :attr:`HMLSTM.weights` gives the functional
pytree back. Calling it is :func:`hmlstm_jax.unroll` in ``nnx.RNN``'s convention
(:mod:`hmlstm_jax.rnn`: batch-major, ``initial_carry``, ``return_carry``, ``reverse``,
``keep_order``, ``rngs``, ``eval()``); its :meth:`HMLSTM.step` is :func:`hmlstm_jax.step`.
``OutputModule`` is Eq. 11-12 (:func:`hmlstm_jax.output_module`).

Example, a variable-length batch, batch-major as ``nnx.RNN`` takes it::

    from flax import nnx
    import hmlstm_jax as hm

    rnn = hm.nnx.HMLSTM(hm.HMLSTMConfig(input_size=8, layer_sizes=(16, 16)), rngs=nnx.Rngs(0))
    out = rnn(xs, seq_lengths=lengths)                  # xs (4, T, 8): out.h, out.z per layer
    top = rnn(xs, seq_lengths=lengths, output="top")    # (4, T, 16), as nnx.RNN gives
    carry, out = rnn(xs, slope, initial_carry=carry, return_carry=True)  # carried on

Why no cell for ``nnx.RNN`` / ``nnx.Bidirectional``: a step of the HM-LSTM reads a slope that
anneals during training (a traced input, so that changing it does not recompile) and, for the
``'sample'`` boundary, a PRNG key per step; ``nnx.RNN`` gives its cell only (carry, x). The
module's ``__call__`` takes what ``nnx.RNN``'s does, with the custom backward that
``nnx.RNN``'s scan would lose; a bidirectional layer is two of them, the second with
``reverse=True, keep_order=True``.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from hmlstm_jax import heads
from hmlstm_jax import hmlstm
from hmlstm_jax import rnn
from hmlstm_jax.rnn import reverse_within_lengths

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
    param_dtype: the parameters' dtype. The recurrence computes in the inputs' dtype
      (float32 params with bfloat16 inputs: bfloat16 compute, float32 gradients), so a
      bfloat16 model end to end is ``param_dtype=jnp.bfloat16`` with bfloat16 inputs.
    time_major, return_carry, reverse, keep_order: the defaults of the call's arguments of
      the same names, as ``nnx.RNN``'s (batch-major; outputs only).
    output: what the call returns: ``'layers'`` (every layer's h and z), ``'top'`` or
      ``'all'`` (:mod:`hmlstm_jax.rnn`).
    deterministic: evaluation mode for the ``'sample'`` boundary (the step function);
      ``eval()`` sets it, ``train()`` clears it.
  """

  def __init__(self, config: hmlstm.HMLSTMConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               time_major: bool = False, return_carry: bool = False, reverse: bool = False,
               keep_order: bool = False, output: str = "layers", deterministic: bool = False):
    self.config = config
    self.layers = nnx.List([_params(layer) for layer in
                            hmlstm.init_params(rngs.params(), config, param_dtype)])
    self.time_major, self.return_carry = time_major, return_carry
    self.reverse, self.keep_order = reverse, keep_order
    self.output = rnn.check_output(output)
    self.deterministic = deterministic

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

  def __call__(self, inputs: jax.Array, slope=1.0, *, initial_carry: hmlstm.State | None = None,
               seq_lengths: jax.Array | None = None, reset: jax.Array | None = None,
               return_carry: bool | None = None, time_major: bool | None = None,
               reverse: bool | None = None, keep_order: bool | None = None,
               output: str | None = None, deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
               key: jax.Array | None = None):
    """:func:`hmlstm.unroll` over ``inputs`` (B, T, input), or (T, B, input) with
    ``time_major=True``; ``reset`` (B, T) or (T, B) likewise; the outputs in the same layout.

    ``slope``: the hard sigmoid's a (Eq. 9; 1 at the start of the paper's annealing).
    ``initial_carry``: a state from :meth:`initialize_carry` or a previous call (zeros in the
    inputs' dtype when None). ``rngs`` (its ``boundary`` stream) or ``key``: the PRNG key of
    the ``'sample'`` boundary in training. Each setting left None takes the module's.
    Returns the outputs (``output``), or ``(final_carry, outputs)`` with ``return_carry``."""
    chosen = rnn.settings(self, time_major=time_major, return_carry=return_carry,
                          reverse=reverse, keep_order=keep_order, output=output,
                          deterministic=deterministic)
    return rnn.call(self.weights, self.config, inputs, slope, initial_carry=initial_carry,
                    key=_key(rngs, key), seq_lengths=seq_lengths, reset=reset, **chosen)

  def step(self, carry: hmlstm.State, x_t: jax.Array, slope=1.0, *,
           deterministic: bool | None = None,
           rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
           key: jax.Array | None = None, skip_copy: bool = False,
           valid: jax.Array | None = None, reset: jax.Array | None = None) -> hmlstm.State:
    """One step of every layer (:func:`hmlstm.step`), for generation: x_t (B, input), the
    carry first as a Flax cell takes it. ``deterministic`` None: the module's (``eval()``)."""
    return hmlstm.step(self.weights, carry, x_t, slope, _key(rngs, key), config=self.config,
                       deterministic=self.deterministic if deterministic is None else deterministic,
                       skip_copy=skip_copy, valid=valid, reset=reset)


def _key(rngs, key):
  """The boundary's PRNG key from ``rngs`` (an ``nnx.Rngs``, whose ``boundary`` stream, or
  its default, is used; an ``nnx.RngStream``; a key) or ``key``, or None."""
  if rngs is not None and key is not None:
    raise ValueError("pass rngs or key, not both")
  if isinstance(rngs, nnx.Rngs):
    return rngs.boundary()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  return key if rngs is None else rngs


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
