"""Output module (Eq. 11-12) and softmax head on top of the HM-LSTM.

Symbols → arguments: h^ℓ_t → ``hs[ℓ-1]``; w^ℓ → column ℓ-1 of ``w_gate``; W^e_ℓ → the rows
of ``W_e`` that belong to layer ℓ (``W_e`` stacks W^e_1 … W^e_L along its first axis).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def init_output_module(key: jax.Array, layer_sizes: Sequence[int], output_size: int,
                       dtype=jnp.float32) -> dict:
  """Parameters of Eq. 11-12: ``w_gate`` (Σ d_ℓ, L) and ``W_e`` (Σ d_ℓ, output_size), drawn in
  float32 and cast to ``dtype``.

  [decision] N(0, 1/fan_in); the paper's equations have no biases here, and neither do we.
  """
  total = sum(layer_sizes)
  k_gate, k_e = jax.random.split(key)
  scale = 1.0 / jnp.sqrt(jnp.float32(total))
  return {
      "w_gate": (jax.random.normal(k_gate, (total, len(layer_sizes)), jnp.float32)
                 * scale).astype(dtype),
      "W_e": (jax.random.normal(k_e, (total, output_size), jnp.float32) * scale).astype(dtype),
  }


def output_module(params: dict, hs: Sequence[jax.Array]) -> jax.Array:
  """h^e_t = ReLU(Σ_ℓ g^ℓ_t · W^e_ℓ h^ℓ_t), g^ℓ_t = sigmoid(w^ℓ · [h^1_t; …; h^L_t]) (Eq. 11-12).

  Both sums are single matmuls: the gates from the concatenated h, and the gated sum as
  [g^1 h^1; …; g^L h^L] against the stacked W^e.

  Args:
    params: from :func:`init_output_module`.
    hs: per layer h^ℓ_t, each (..., d_ℓ) with the same leading shape.

  Returns:
    h^e_t, (..., output_size).
  """
  hs = tuple(hs)
  if len(hs) != params["w_gate"].shape[1]:
    raise ValueError(f"output module was built for {params['w_gate'].shape[1]} layers, got {len(hs)}")
  h_all = jnp.concatenate(hs, axis=-1)
  gates = jax.nn.sigmoid(h_all @ params["w_gate"])  # (..., L): g^ℓ_t
  gated = jnp.concatenate([gates[..., l:l + 1] * h for l, h in enumerate(hs)], axis=-1)
  return jax.nn.relu(gated @ params["W_e"])


def init_softmax(key: jax.Array, input_size: int, num_classes: int) -> dict:
  """Softmax layer parameters: ``W`` (input_size, num_classes) N(0, 1/fan_in), ``b`` zeros."""
  return {
      "W": jax.random.normal(key, (input_size, num_classes), jnp.float32) / jnp.sqrt(jnp.float32(input_size)),
      "b": jnp.zeros((num_classes,), jnp.float32),
  }


def softmax_logits(params: dict, h_e: jax.Array) -> jax.Array:
  """Logits of p(x_{t+1} | x_≤t) = softmax(W h^e_t + b) (§4.1); take ``jax.nn.log_softmax``."""
  return h_e @ params["W"] + params["b"]
