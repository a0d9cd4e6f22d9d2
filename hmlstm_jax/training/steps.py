"""Per-device train, probe and eval steps of any experiment (written with an axis name;
:mod:`.parallel` maps them over devices), and the optimiser they apply.

The train step: the experiment's loss of one batch from the carried recurrent state (and the
step's schedule, whatever the experiment makes of it), gradients averaged over the device
axis, the experiment's :class:`Optimizer` (by default the paper's, §4.1: global-norm clipping
and Adam, the update scaled by the plateau's scale, lr / 50 when the validation objective
stops improving), and the final state carried to the next batch with its gradient stopped.
"""
from __future__ import annotations

from typing import Any, NamedTuple

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
  plateau: Any                 # the optimiser's plateau state (its .scale multiplies the
                               # update), or None without one
  key: jax.Array               # (2,) uint32 raw key data; step keys are fold_in(key, step)


class Optimizer(NamedTuple):
  """What an experiment optimises with (:meth:`Experiment.optimizer`).

  Attributes:
    transform: an Optax gradient transformation of the device-averaged gradients.
    plateau: ``None``, or a transformation fed the validation objective after each
      evaluation (``update({}, state, value=objective)``) whose state's ``scale`` multiplies
      every update, as Optax's ``reduce_on_plateau``.
    learning_rate: the base learning rate, shown in progress lines (times the plateau's
      scale); ``None``: not shown.
  """
  transform: optax.GradientTransformation
  plateau: optax.GradientTransformationExtraArgs | None = None
  learning_rate: float | None = None


def paper_optimizer(learning_rate: float, clip_norm: float, decay_factor: float,
                    patience: int) -> Optimizer:
  """The paper's (§4.1): global-norm clipping then Adam, and Optax's reduce-on-plateau fed
  the validation objective after each evaluation. "Stopped decreasing" means not below the
  best value by a relative 1e-4 for ``patience`` evaluations; then the scale is multiplied by
  ``decay_factor``. Optax checks its own arguments here (ValueError)."""
  transform = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))
  try:
    plateau = optax_contrib.reduce_on_plateau(factor=decay_factor, patience=patience, rtol=1e-4,
                                              atol=0.0, cooldown=0, accumulation_size=1)
  except ValueError as err:
    raise ValueError(f"lr_decay_factor / plateau_patience: {err}") from None
  return Optimizer(transform, plateau, learning_rate)


def init_state(key: jax.Array, experiment, optimizer: Optimizer, rows: int) -> TrainState:
  """A fresh state: parameters from ``key``, the initial carry for ``rows`` rows."""
  k_params, k_train = jax.random.split(key)
  params = experiment.init_params(k_params)
  plateau = None if optimizer.plateau is None else optimizer.plateau.init(params)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.transform.init(params),
      carry=experiment.init_carry(rows), plateau=plateau, key=jax.random.key_data(k_train))


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


def train_step(state: TrainState, batch, schedule, reset: jax.Array, *, experiment,
               optimizer: Optimizer) -> tuple[TrainState, dict]:
  """One batch on this device's rows; gradients and metrics are averaged over ``AXIS``
  (weighted by :meth:`Experiment.loss_weight` where the experiment gives one).

  Args:
    state: this device's :class:`TrainState`.
    batch: this device's rows of the batch (a pytree, rows leading).
    schedule: this step's :meth:`Experiment.schedule` (arrays, traced: a schedule that moves
      never recompiles).
    reset: () bool, True at the first batch of an epoch: start from the initial carry.
    experiment: supplies ``loss(params, carry, batch, schedule, key) -> (loss, (carry,
      metrics))``.
    optimizer: the experiment's :class:`Optimizer`.

  Returns:
    The new state and ``{'loss', 'grad_norm', **metrics}``, device-averaged scalars of the
    loss before the update.
  """
  key, carry = _loss_inputs(state, batch, reset, experiment)
  (loss, (new_carry, metrics)), grads = jax.value_and_grad(experiment.loss, has_aux=True)(
      state.params, carry, batch, schedule, key)
  weight = experiment.loss_weight(batch)
  grads = _device_mean(grads, weight)
  updates, opt_state = optimizer.transform.update(grads, state.opt_state, state.params)
  if optimizer.plateau is not None:
    updates = jax.tree_util.tree_map(lambda u: u * state.plateau.scale, updates)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
      carry=jax.lax.stop_gradient(new_carry))
  out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
  return new_state, _device_mean(out, weight)


def probe_step(state: TrainState, batch, schedule, reset: jax.Array, *,
               experiment) -> jax.Array:
  """The loss that the next train step would compute from ``state`` (forward only, no update).

  The trainer checkpoints a state only when this is finite: a checkpoint must be one that a
  resumed run can train from.
  """
  key, carry = _loss_inputs(state, batch, reset, experiment)
  loss, _ = experiment.loss(state.params, carry, batch, schedule, key)
  return _device_mean(loss, experiment.loss_weight(batch))


def eval_step(params, carry, batch, schedule, *, experiment):
  """The experiment's evaluation sums of one batch, summed over ``AXIS``; the carry moves on."""
  carry, sums = experiment.eval_sums(params, carry, batch, schedule)
  return carry, jax.lax.psum(sums, AXIS)
