"""The boundary detector's non-linearity and its straight-through gradient (§3.3).

Symbols (decisions.md §1-3):

* ``x``      the boundary row of the fused pre-activation s^ℓ_t (its last row);
* ``slope``  the slope a of the hard sigmoid, annealed during training;
* ``ž``      ``hard_sigmoid(x, slope)`` = max(0, min(1, (a·x + 1) / 2))      (Eq. 9);
* ``z``      f_bound(ž): 1[ž > 0.5] (step), Bernoulli(ž) (sample) or ž (soft)  (Eq. 8).

Straight-through estimator: the forward pass uses the discrete z, the backward pass
treats z as if it were ž (dz/dž = 1), so the gradient reaching x is a/2 inside the linear
region |a·x| < 1 and 0 outside. ``slope`` is an ordinary traced argument everywhere, so
annealing it never recompiles.

The derivative the backward pass uses is a setting (``ST_GRADIENTS``; decisions.md §2):
``'hard_sigmoid'`` (the paper's, above: a detector whose pre-activation stays below −1/a gets
no gradient and cannot come back), ``'linear'`` (a/2 everywhere: the hard sigmoid's slope
without its cut-off) or ``'sigmoid'`` (the derivative of sigmoid(2a·x), the smooth curve with
the hard sigmoid's value and slope at 0: 2a·σ(2ax)(1 − σ(2ax)), a/2 at x = 0, never 0).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BOUNDARY_VARIANTS = ("step", "sample", "soft")
ST_GRADIENTS = ("hard_sigmoid", "linear", "sigmoid")


def hard_sigmoid(x: jax.Array, slope: jax.Array | float) -> jax.Array:
  """ž = hard_sigm_a(x) = max(0, min(1, (a·x + 1) / 2)), Eq. 9 of the paper.

  Args:
    x: the boundary pre-activation (the ž row of s^ℓ_t), any shape.
    slope: the slope a > 0 (scalar, may be traced).

  Returns:
    ž, same shape as ``x``, in [0, 1]. Its derivative is a/2 on |a·x| < 1 and 0 outside.
  """
  return jnp.clip((slope * x + 1.0) / 2.0, 0.0, 1.0)


def straight_through_derivative(x: jax.Array, slope: jax.Array | float,
                                gradient: str = "hard_sigmoid") -> jax.Array:
  """dz/dx as the backward pass of :func:`straight_through_boundary` takes it (§3.3).

  ``'hard_sigmoid'``: dž/dx = a/2 · 1[|a·x| < 1] (the paper); ``'linear'``: a/2 everywhere;
  ``'sigmoid'``: d/dx sigmoid(2a·x) = 2a·σ(2ax)(1 − σ(2ax)). All three equal a/2 at x = 0.
  """
  slope = jnp.asarray(slope, x.dtype)
  if gradient == "hard_sigmoid":
    return jnp.where(jnp.abs(slope * x) < 1.0, slope / 2.0, 0.0).astype(x.dtype)
  if gradient == "linear":
    return jnp.broadcast_to(slope / 2.0, x.shape).astype(x.dtype)
  if gradient == "sigmoid":
    sig = jax.nn.sigmoid(2.0 * slope * x)
    return 2.0 * slope * sig * (1.0 - sig)
  raise ValueError(f"unknown straight-through gradient {gradient!r}; expected one of {ST_GRADIENTS}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def straight_through_boundary(x: jax.Array, slope: jax.Array | float,
                              u: jax.Array | float, gradient: str = "hard_sigmoid") -> jax.Array:
  """Binary z = 1[hard_sigm_a(x) > u] with the straight-through gradient of §3.3.

  ``u = 0.5`` gives the step function of Eq. 8 (z = 1 exactly when x > 0, whatever the
  slope); ``u ~ Uniform[0, 1)`` gives z ~ Bernoulli(ž). The comparison is done on x
  directly, x > (2u − 1)/a, which is the same event without the rounding of (a·x + 1)/2
  near 0.5, so for u = 0.5 it is exactly x > 0.

  Backward: dz/dx = dž/dx = a/2 · 1[|a·x| < 1] (dz/dž = 1), or the ``gradient`` chosen
  (:func:`straight_through_derivative`); ``slope`` and ``u`` receive no gradient.

  Args:
    x: boundary pre-activation, any shape.
    slope: the hard sigmoid's slope a > 0, a traced scalar.
    u: threshold(s) broadcastable against ``x``: 0.5, or uniform noise for sampling.
    gradient: the backward's dz/dx, one of ``ST_GRADIENTS`` (static).

  Returns:
    z in {0, 1}, dtype of ``x``.
  """
  check_slope(slope)
  return (x > (2.0 * u - 1.0) / slope).astype(x.dtype)


def check_slope(slope) -> None:
  """Raises ValueError for a concrete slope a that is not positive (or NaN). A traced slope
  cannot be checked: a ≤ 0 flips or zeroes the straight-through gradient and turns every
  boundary off, and a NaN turns them all off, silently."""
  if jnp.ndim(slope) != 0:
    raise ValueError(f"the slope a must be a scalar (one a for the whole step, Eq. 9), got "
                     f"shape {jnp.shape(slope)}")
  try:
    value = float(jnp.asarray(slope))
  except jax.errors.ConcretizationTypeError:  # traced
    return
  if not value > 0:  # also NaN
    raise ValueError(f"the slope a must be positive (the hard sigmoid's, Eq. 9), got {value}")


def _straight_through_fwd(x, slope, u, gradient):
  return straight_through_boundary(x, slope, u, gradient), (x, slope, u)


def _straight_through_bwd(gradient, residuals, g):
  x, slope, u = residuals
  grad_x = g * straight_through_derivative(x, slope, gradient).astype(g.dtype)
  return grad_x, jnp.zeros_like(slope), jnp.zeros_like(u)


straight_through_boundary.defvjp(_straight_through_fwd, _straight_through_bwd)


def f_bound(x: jax.Array, slope: jax.Array | float, variant: str,
             noise: jax.Array | None = None, gradient: str = "hard_sigmoid") -> jax.Array:
  """z^ℓ_t = f_bound(hard_sigm_a(x)) of Eq. 8-9 for one boundary ``variant``.

  Args:
    x: boundary pre-activation (the ž row of s^ℓ_t).
    slope: hard-sigmoid slope a (traced).
    variant: ``'step'`` (z = 1[ž > 0.5]), ``'sample'`` (z ~ Bernoulli(ž)) or ``'soft'``
      (z = ž, ordinary gradient).
    noise: for ``'sample'``, uniform [0, 1) noise broadcastable against ``x``; ``None``
      means evaluation, where ``'sample'`` uses the step function (decisions.md §1 decision).
    gradient: the straight-through derivative of ``'step'`` and ``'sample'``
      (:func:`straight_through_derivative`); ``'soft'`` has its own, exact gradient.

  Returns:
    z, same shape and dtype as ``x``.
  """
  if variant == "soft":
    return hard_sigmoid(x, slope)
  if variant == "step" or (variant == "sample" and noise is None):
    return straight_through_boundary(x, slope, jnp.asarray(0.5, x.dtype), gradient)
  if variant == "sample":
    return straight_through_boundary(x, slope, noise, gradient)
  raise ValueError(f"unknown boundary variant {variant!r}; expected one of {BOUNDARY_VARIANTS}")
