"""The order in which the recurrence runs its (layer, step) pairs: plain or two-phase.

Layer ℓ at step t needs layer ℓ−1 at t, layer ℓ+1 at t−1 and itself at t−1 (Eq. 5-7), so
every pair with the same 2t + ℓ is independent of the others (layers counted from 0 here).

* ``'layers'`` (plain): one loop iteration per step, the layers bottom to top. The chain of
  dependent layer-steps, each a matmul, is L·T long.
* ``'two_phase'``: iteration j runs the even layers first, then the odd ones, layer ℓ at step
  t = j − ⌊ℓ/2⌋. The even layers of an iteration depend only on the previous iteration, the
  odd ones only on the even ones before them, so each phase's matmuls are independent and
  the chain falls to 2T + L − 2 layer-steps (201 instead of 300 for 3 layers and 100 steps).
  The loop runs T + ⌊(L−1)/2⌋ iterations; in the first and last ⌊(L−1)/2⌋ some layers have
  no step to take and keep their state.

Both orders perform the same operations on the same operands, so the forward pass gives the
same numbers bit for bit; only what can run at once differs. Gradients agree to float32
rounding (bit for bit in the tests' shapes on the CPUs tried; elsewhere XLA may order a sum
in the backward loop differently: relative differences of 1e-6 were seen). The backward pass (:mod:`hmlstm_jax.hmlstm`)
mirrors the order: time reversed and the layers top to bottom.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

SCHEDULES = ("layers", "two_phase")


def plan(schedule: str, num_layers: int, backward: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(lags, order) of a schedule: layer ℓ's step in iteration j is j − lags[ℓ] (counted from
  the end for ``backward``), and ``order`` is the order of the layers within an iteration.

  Backward, the roles of the layers are mirrored: layer L−1 leads.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  depth = (lambda l: num_layers - 1 - l) if backward else (lambda l: l)  # distance from the lead
  layers = sorted(range(num_layers), key=depth)
  if schedule == "layers":
    return (0,) * num_layers, tuple(layers)
  lags = tuple(depth(l) // 2 for l in range(num_layers))
  order = [l for l in layers if depth(l) % 2 == 0] + [l for l in layers if depth(l) % 2 == 1]
  return lags, tuple(order)


def critical_path(schedule: str, num_layers: int, num_steps: int) -> int:
  """Layer-steps on the longest chain of dependent ones: L·T plain, 2T + L − 2 two-phase."""
  if schedule == "layers" or num_layers == 1:
    return num_layers * num_steps
  return 2 * num_steps + num_layers - 2


Body = Callable[[Any, tuple, tuple[int, ...], tuple], tuple[Any, tuple]]


def keep(active, new, old):
  """``new`` where the layer takes a step in this iteration, else ``old`` (bit for bit);
  ``active`` is ``None`` when it always does."""
  if active is None:
    return new
  return jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new, old)


def skewed_scan(body: Body, carry, xs: Sequence[Any], num_steps: int, lags: Sequence[int],
                order: Sequence[int], reverse: bool = False, unroll: int = 1):
  """A ``lax.scan`` in which layer ℓ trails by ``lags[ℓ]`` steps.

  With lags, the loop runs T + max(lags) iterations; in the first and last few some layers
  have no step to take: their inputs there are zeros and ``body`` must leave their part of
  the carry as it was (:func:`keep`), so that every layer-step is computed by the same
  compiled loop body as the others (the same bits as the plain order, where XLA would fuse
  iterations unrolled outside the loop differently).

  Args:
    body: ``body(carry, xs_t, order, active) -> (carry, ys)``: runs the layers once each in
      ``order``; ``xs_t[ℓ]`` is layer ℓ's slice of ``xs`` at its own step; ``active[ℓ]`` is a
      traced bool (``None``: always) saying whether layer ℓ has a step in this iteration;
      ``ys[ℓ]`` its outputs (discarded where it had none).
    carry: the loop's initial carry.
    xs: per layer a pytree with a leading axis of ``num_steps`` (or ``None``).
    num_steps: T.
    lags, order: from :func:`plan`.
    reverse: run the steps from the last to the first (the backward pass).
    unroll: loop iterations per ``lax.scan`` iteration (its ``unroll``).

  Returns:
    ``(carry, ys)`` with ``ys[ℓ]`` layer ℓ's outputs stacked over the T steps in step order.
  """
  L, T, lead = len(lags), num_steps, max(lags)
  if lead == 0:
    return jax.lax.scan(lambda c, x: body(c, x, tuple(order), (None,) * L), carry, xs,
                        reverse=reverse, unroll=unroll)
  # Layer ℓ's step at loop index i (i = iteration forward; from the end, reverse) is i − before.
  before = [lead - lag if reverse else lag for lag in lags]
  padded = tuple(
      jax.tree_util.tree_map(
          lambda a, b=b: jnp.pad(a, [(b, lead - b)] + [(0, 0)] * (a.ndim - 1)), xs[l])
      for l, b in enumerate(before))

  def step(c, x):
    i, x_layers = x
    active = tuple((i >= b) & (i < b + T) for b in before)
    return body(c, x_layers, tuple(order), active)

  carry, ys = jax.lax.scan(step, carry, (jnp.arange(T + lead), padded), reverse=reverse,
                           unroll=unroll)
  return carry, tuple(jax.tree_util.tree_map(lambda y, b=b: y[b:b + T], ys[l])
                      for l, b in enumerate(before))
