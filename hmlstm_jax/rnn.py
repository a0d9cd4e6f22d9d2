"""Flax's RNN calling convention over :func:`hmlstm_jax.unroll`, shared by the NNX and linen
modules (:mod:`hmlstm_jax.nnx`, :mod:`hmlstm_jax.nn`).

The modules take what ``flax.nnx.RNN`` / ``flax.linen.RNN`` take, with their names and
defaults: batch-major ``inputs`` (``time_major=False``), ``initial_carry`` (zeros when not
given), ``seq_lengths``, ``return_carry``, ``reverse`` and ``keep_order``; and what an
HM-LSTM needs besides: the slope a of the hard sigmoid (Eq. 9; traced, annealed in
training), ``reset``, and for the ``'sample'`` boundary a PRNG key. What comes back is chosen
by ``output``:

- ``'layers'``: :class:`hmlstm_jax.UnrollOutputs`, every layer's h^ℓ and z^ℓ (the boundaries
  are the point of the model);
- ``'top'``: the top layer's h^L, one (B, T, d_L) array, as an ``nnx.RNN`` gives;
- ``'all'``: every layer's h concatenated, (B, T, Σ d_ℓ): what the output module of Eq. 11
  reads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hmlstm_jax import hmlstm

#: What the modules' ``output`` setting may be.
OUTPUTS = ("layers", "top", "all")


#: The settings a module holds as defaults of its call's arguments of the same names.
SETTINGS = ("time_major", "return_carry", "reverse", "keep_order", "output", "deterministic")


def settings(module, **given) -> dict:
  """Each of :data:`SETTINGS` as given to the call, or the module's where given None."""
  return {name: getattr(module, name) if given.get(name) is None else given[name]
          for name in SETTINGS}


def check_output(output: str) -> str:
  """``output`` itself, or a ValueError naming the choices."""
  if output not in OUTPUTS:
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
  return output


def reverse_within_lengths(xs: jax.Array, seq_lengths: jax.Array | None = None, *,
                           time_major: bool = False) -> jax.Array:
  """Each row of a batch-major (B, T, ...) array (time-major (T, B, ...) with
  ``time_major=True``) reversed within its first ``seq_lengths[b]`` steps, the padding left
  in place (all T steps when ``seq_lengths`` is None): the input (and, applied again, the
  outputs) of the backward half of a bidirectional layer: on the real steps as Flax's
  ``flip_sequences`` (which also reverses the padding among itself)."""
  xs = jnp.asarray(xs)
  if time_major:
    return jnp.swapaxes(reverse_within_lengths(jnp.swapaxes(xs, 0, 1), seq_lengths), 0, 1)
  B, T = xs.shape[:2]
  n = jnp.full((B,), T) if seq_lengths is None else jnp.asarray(seq_lengths)
  t = jnp.arange(T)[None, :]
  index = jnp.where(t < n[:, None], n[:, None] - 1 - t, t)
  return jnp.take_along_axis(xs, index.reshape(index.shape + (1,) * (xs.ndim - 2)), axis=1)


def call(weights, config: hmlstm.HMLSTMConfig, inputs: jax.Array, slope, *, initial_carry,
         key, deterministic: bool, seq_lengths, reset, time_major: bool, return_carry: bool,
         reverse: bool, keep_order: bool, output: str):
  """The modules' ``__call__``: :func:`hmlstm.unroll` (Eq. 1-9 over the sequence) in Flax's
  convention. ``initial_carry`` None: zeros in the inputs' dtype (the compute dtype).
  ``reverse``: each row runs backwards within its length; ``keep_order`` then flips the
  outputs back to the inputs' order. Returns the outputs chosen by ``output`` (module
  docstring), or ``(final_carry, outputs)`` with ``return_carry``."""
  check_output(output)
  inputs = jnp.asarray(inputs)
  if initial_carry is None:
    layout = "time_major" if time_major else "batch_major"
    if inputs.ndim != 3:  # the shape check of unroll, before a carry can be made
      raise ValueError(f"inputs must be {hmlstm.LAYOUTS[layout].format(config.input_size)}, "
                       f"got shape {inputs.shape}")
    dtype = inputs.dtype if jnp.issubdtype(inputs.dtype, jnp.floating) else jnp.float32
    initial_carry = hmlstm.initial_state(config, inputs.shape[1 if time_major else 0], dtype)
  if reverse:
    if reset is not None:
      raise ValueError("reset with reverse=True is ambiguous (a reset marks a document's "
                       "first step, which reversed is its last): reverse the stream and its "
                       "resets yourself, or leave reset out")
    inputs = reverse_within_lengths(inputs, seq_lengths, time_major=time_major)
  final, out = hmlstm.unroll(weights, initial_carry, inputs, slope, key, config=config,
                             deterministic=deterministic, seq_lengths=seq_lengths, reset=reset,
                             time_major=time_major)
  if reverse and keep_order:
    out = jax.tree_util.tree_map(
        lambda a: reverse_within_lengths(a, seq_lengths, time_major=time_major), out)
  outputs = (out if output == "layers" else out.h[-1] if output == "top" else
             jnp.concatenate(out.h, axis=-1))
  return (final, outputs) if return_carry else outputs
