"""The mixture density head of the handwriting model (§4.2; Graves 2013, Eq. 17-23).

From the output embedding h^e_t the head gives the distribution of the next pen offset and
pen state: K bivariate Gaussians over the offset (x, y) with weights π_k, means μ_k, standard
deviations σ_k and correlations ρ_k, and a Bernoulli end-of-stroke probability e for p.

Symbols → code (one linear layer ŷ = W h^e + b, split as Graves's Eq. 17):
ê → ``end_logit``; π̂ → softmax into ``log_weights``; μ̂ → ``mean``; σ̂ → ``sigma``;
ρ̂ → ``rho``.

[decisions, numerically safe forms]
* e = sigmoid(ê): the probability that p = 1 (pen up); Graves writes 1 / (1 + exp(ê)), the
  same family with ê negated.
* σ = σ_min + exp(min(σ̂, 20)) with σ_min = 1e-3 (in the normalised units, whose spread is
  1): a density never becomes a spike the data cannot resolve, nor overflows.
* ρ = ρ_max · tanh(ρ̂) with ρ_max = 1 − 1e-4, and 1 − ρ² computed as (1 − ρ)(1 + ρ): the
  density stays finite for every ρ̂.
* The mixture is summed as log-sum-exp of log π_k + log N_k.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

SIGMA_MIN = 1e-3
LOG_SIGMA_MAX = 20.0
RHO_MAX = 1.0 - 1e-4
NUM_COMPONENTS = 20  # [decision] K = 20, as Graves (2013)


class Mixture(NamedTuple):
  """The predicted distribution at each position (leading shape ``...``)."""
  end_logit: jax.Array    # (...): logit of e, the pen-up probability
  log_weights: jax.Array  # (..., K): log π_k (log-softmax)
  mean: jax.Array         # (..., K, 2): μ_k for (x, y)
  sigma: jax.Array        # (..., K, 2): σ_k for (x, y), ≥ SIGMA_MIN
  rho: jax.Array          # (..., K): ρ_k in (−RHO_MAX, RHO_MAX)


def output_size(num_components: int) -> int:
  """Width of ŷ: 1 (ê) + K (π̂) + 2K (μ̂) + 2K (σ̂) + K (ρ̂)."""
  return 1 + 6 * num_components


def init_mdn(key: jax.Array, input_size: int, num_components: int = NUM_COMPONENTS) -> dict:
  """``W`` (input_size, 1 + 6K) N(0, 1/fan_in) and ``b`` zeros (Graves's Eq. 17 output layer)."""
  return {
      "W": jax.random.normal(key, (input_size, output_size(num_components)), jnp.float32)
           / jnp.sqrt(jnp.float32(input_size)),
      "b": jnp.zeros((output_size(num_components),), jnp.float32),
  }


def mixture(params: dict, h_e: jax.Array) -> Mixture:
  """Eq. 17-22: the head's outputs from h^e (..., input_size) as a :class:`Mixture`."""
  return mixture_from_outputs(h_e @ params["W"] + params["b"])


def mixture_from_outputs(y_hat: jax.Array) -> Mixture:
  """Eq. 18-22 on the raw outputs ŷ (..., 1 + 6K), split as [ê, π̂, μ̂_x, μ̂_y, σ̂_x, σ̂_y, ρ̂]."""
  k = (y_hat.shape[-1] - 1) // 6
  if y_hat.shape[-1] != output_size(k):
    raise ValueError(f"the head's last axis must be 1 + 6K, got {y_hat.shape[-1]}")
  end, pi, mu_x, mu_y, s_x, s_y, r = jnp.split(
      y_hat, [1, 1 + k, 1 + 2 * k, 1 + 3 * k, 1 + 4 * k, 1 + 5 * k], axis=-1)
  return Mixture(
      end_logit=end[..., 0],
      log_weights=jax.nn.log_softmax(pi, axis=-1),
      mean=jnp.stack([mu_x, mu_y], axis=-1),
      sigma=SIGMA_MIN + jnp.exp(jnp.minimum(jnp.stack([s_x, s_y], axis=-1), LOG_SIGMA_MAX)),
      rho=RHO_MAX * jnp.tanh(r))


def log_likelihood(mix: Mixture, target: jax.Array) -> jax.Array:
  """log Pr(x_{t+1} | y_t) (Eq. 23): log Σ_k π_k N(x, y | μ_k, σ_k, ρ_k) + log Bernoulli(p | e).

  Args:
    mix: the predicted distribution, leading shape ``...``.
    target: (..., 3): the next offset (x, y) and pen state p ∈ {0, 1}.

  Returns:
    (...) log-likelihoods in nats.
  """
  xy, pen = target[..., None, :2], target[..., 2]
  z = (xy - mix.mean) / mix.sigma                                    # (..., K, 2)
  one_minus_rho2 = (1.0 - mix.rho) * (1.0 + mix.rho)
  quad = (z[..., 0] ** 2 + z[..., 1] ** 2 - 2.0 * mix.rho * z[..., 0] * z[..., 1]) / one_minus_rho2
  log_norm = (-math.log(2.0 * math.pi) - jnp.sum(jnp.log(mix.sigma), axis=-1)
              - 0.5 * jnp.log(one_minus_rho2))
  log_gauss = jax.nn.logsumexp(mix.log_weights + log_norm - 0.5 * quad, axis=-1)
  log_bernoulli = -(pen * jax.nn.softplus(-mix.end_logit)
                    + (1.0 - pen) * jax.nn.softplus(mix.end_logit))
  return log_gauss + log_bernoulli


def sample(mix: Mixture, key: jax.Array) -> jax.Array:
  """One draw of (x, y, p) per position: a component by its weight, a correlated Gaussian
  offset from it, the pen state from e. Returns (..., 3)."""
  k_comp, k_normal, k_pen = jax.random.split(key, 3)
  chosen = jax.nn.one_hot(jax.random.categorical(k_comp, mix.log_weights, axis=-1),
                          mix.log_weights.shape[-1], dtype=mix.mean.dtype)    # (..., K)
  mean = jnp.einsum("...k,...kd->...d", chosen, mix.mean)
  sigma = jnp.einsum("...k,...kd->...d", chosen, mix.sigma)
  rho = jnp.sum(chosen * mix.rho, axis=-1)
  n = jax.random.normal(k_normal, mean.shape, mean.dtype)
  x = mean[..., 0] + sigma[..., 0] * n[..., 0]
  y = mean[..., 1] + sigma[..., 1] * (rho * n[..., 0] + jnp.sqrt((1 - rho) * (1 + rho)) * n[..., 1])
  pen = jax.random.bernoulli(k_pen, jax.nn.sigmoid(mix.end_logit)).astype(mean.dtype)
  return jnp.stack([x, y, pen], axis=-1)
