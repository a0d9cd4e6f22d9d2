"""Per-device train, probe and eval steps of any experiment (written with an axis name;
:mod:`.parallel` maps them over devices).

The train step is the paper's (§4.1) for whatever loss the experiment supplies: the loss of
one batch from the carried recurrent state, gradients averaged over the device axis,
global-norm clipping and Adam (one Optax chain), the update scaled by the plateau schedule's
scale (lr / 50 when the validation objective stops improving), and the final state carried
to the next batch with its gradient stopped.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

AXIS = "devices"


class TrainState(flax.struct.PyTreeNode):
  """What a step changes. Inside a mapped step every leaf is per device."""
  step: jax.Array              # () int32: batches trained on so far
  params: Any
  opt_state: Any
  carry: Any                   # the experiment's carried state of this device's rows, or ()
  plateau: Any                 # optax reduce_on_plateau state (its .scale multiplies the lr)
  key: jax.Array               # (2,) uint32 raw key data; step keys are fold_in(key, step)


def make_optimizer(learning_rate: float, clip_norm: float) -> optax.GradientTransformation:
  """Global-norm clipping then Adam (§4.1)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))


def make_plateau(decay_factor: float, patience: int) -> optax.GradientTransformationExtraArgs:
  """Optax's reduce-on-plateau, fed the validation objective after each evaluation.

  "Stopped decreasing" means not below the best value by a relative 1e-4 for ``patience``
  evaluations; then the scale is multiplied by ``decay_factor``.
  """
  return optax_contrib.reduce_on_plateau(factor=decay_factor, patience=patience, rtol=1e-4,
                                         atol=0.0, cooldown=0, accumulation_size=1)


def init_state(key: jax.Array, experiment, optimizer, plateau, rows: int) -> TrainState:
  """A fresh state: parameters from ``key``, the initial carry for ``rows`` rows."""
  k_params, k_train = jax.random.split(key)
  params = experiment.init_params(k_params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
      carry=experiment.init_carry(rows), plateau=plateau.init(params),
      key=jax.random.key_data(k_train))


def _rows(batch) -> int:
  return jax.tree_util.tree_leaves(batch)[0].shape[0]


def _loss_inputs(state: TrainState, batch, reset: jax.Array, experiment):
  """This step's key (folded with the step and the device) and the carry (reset at epoch start)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step),
                           jax.lax.axis_index(AXIS))
  initial = experiment.init_carry(_rows(batch))
  carry = jax.tree_util.tree_map(lambda x, x0: jnp.where(reset, x0, x), state.carry, initial)
  return key, carry


def _device_mean(tree, weight):
  """The mean of ``tree`` over ``AXIS``: plain, or weighted by each device's ``weight`` (the
  items its mean loss is over), Σ_d w_d·x_d / Σ_d w_d (:meth:`Experiment.loss_weight`)."""
  if weight is None:
    return jax.lax.pmean(tree, AXIS)
  weight = jnp.asarray(weight, jnp.float32)
  share = weight / jnp.maximum(jax.lax.psum(weight, AXIS), 1e-30)
  return jax.lax.psum(jax.tree_util.tree_map(lambda x: x * share.astype(x.dtype), tree), AXIS)


def train_step(state: TrainState, batch, slope: jax.Array, reset: jax.Array, *, experiment,
               optimizer) -> tuple[TrainState, dict]:
  """One batch on this device's rows; gradients and metrics are averaged over ``AXIS``
  (weighted by :meth:`Experiment.loss_weight` where the experiment gives one).

  Args:
    state: this device's :class:`TrainState`.
    batch: this device's rows of the batch (a pytree, rows leading).
    slope: hard-sigmoid slope a for this step (traced: annealing never recompiles).
    reset: () bool, True at the first batch of an epoch: start from the initial carry.
    experiment: supplies ``loss(params, carry, batch, slope, key) -> (loss, (carry, metrics))``.
    optimizer: from :func:`make_optimizer`.

  Returns:
    The new state and ``{'loss', 'grad_norm', **metrics}``, device-averaged scalars of the
    loss before the update.
  """
  key, carry = _loss_inputs(state, batch, reset, experiment)
  (loss, (new_carry, metrics)), grads = jax.value_and_grad(experiment.loss, has_aux=True)(
      state.params, carry, batch, slope, key)
  weight = experiment.loss_weight(batch)
  grads = _device_mean(grads, weight)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  updates = jax.tree_util.tree_map(lambda u: u * state.plateau.scale, updates)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
      carry=jax.lax.stop_gradient(new_carry))
  out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
  return new_state, _device_mean(out, weight)


def probe_step(state: TrainState, batch, slope: jax.Array, reset: jax.Array, *,
               experiment) -> jax.Array:
  """The loss that the next train step would compute from ``state`` (forward only, no update).

  The trainer checkpoints a state only when this is finite: a checkpoint must be one that a
  resumed run can train from.
  """
  key, carry = _loss_inputs(state, batch, reset, experiment)
  loss, _ = experiment.loss(state.params, carry, batch, slope, key)
  return _device_mean(loss, experiment.loss_weight(batch))


def eval_step(params, carry, batch, slope: jax.Array, *, experiment):
  """The experiment's evaluation sums of one batch, summed over ``AXIS``; the carry moves on."""
  carry, sums = experiment.eval_sums(params, carry, batch, slope)
  return carry, jax.lax.psum(sums, AXIS)
