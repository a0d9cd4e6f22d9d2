"""Per-device train and eval steps (written with an axis name; :mod:`.parallel` maps them).

The train step is the paper's (§4.1): the NLL of one truncated-BPTT segment starting from the
carried state, gradients averaged over the device axis, global-norm clipping and Adam (one
Optax chain), the update scaled by the plateau schedule's scale (lr / 50 when the validation
NLL stops improving), and the final state carried to the next segment with its gradient
stopped.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from optax import contrib as optax_contrib

from hmlstm_jax import hmlstm
from hmlstm_jax import models

AXIS = "devices"


class TrainState(flax.struct.PyTreeNode):
  """What a step changes. Inside a mapped step every leaf is per device."""
  step: jax.Array              # () int32: segments trained on so far
  params: Any
  opt_state: Any
  rnn_state: hmlstm.State      # carried recurrent state of this device's rows
  plateau: Any                 # optax reduce_on_plateau state (its .scale multiplies the lr)
  key: jax.Array               # (2,) uint32 raw key data; step keys are fold_in(key, step)


def make_optimizer(learning_rate: float, clip_norm: float) -> optax.GradientTransformation:
  """Global-norm clipping then Adam (§4.1)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))


def make_plateau(decay_factor: float, patience: int) -> optax.GradientTransformationExtraArgs:
  """Optax's reduce-on-plateau, fed the validation NLL after each evaluation.

  "Stopped decreasing" means not below the best value by a relative 1e-4 for ``patience``
  evaluations; then the scale is multiplied by ``decay_factor``.
  """
  return optax_contrib.reduce_on_plateau(factor=decay_factor, patience=patience, rtol=1e-4,
                                         atol=0.0, cooldown=0, accumulation_size=1)


def init_state(key: jax.Array, model: models.CharLMConfig, optimizer, plateau,
               rows: int) -> TrainState:
  """A fresh state: parameters from ``key``, zero recurrent state for ``rows`` rows."""
  k_params, k_train = jax.random.split(key)
  params = models.init_charlm(k_params, model)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
      rnn_state=hmlstm.initial_state(model.hmlstm, rows),
      plateau=plateau.init(params), key=jax.random.key_data(k_train))


def train_step(state: TrainState, inputs: jax.Array, targets: jax.Array, slope: jax.Array, *,
               model: models.CharLMConfig, optimizer, reset: jax.Array) -> tuple[TrainState, dict]:
  """One segment on this device's rows; gradients and metrics are averaged over ``AXIS``.

  Args:
    state: this device's :class:`TrainState`.
    inputs, targets: (rows, T) int ids.
    slope: hard-sigmoid slope a for this step (traced: annealing never recompiles).
    model: the model config (static).
    optimizer: from :func:`make_optimizer` (static).
    reset: () bool, True at the first segment of an epoch: start from the zero state.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step),
                           jax.lax.axis_index(AXIS))
  carried = jax.tree_util.tree_map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), state.rnn_state)
  (loss, outs), grads = jax.value_and_grad(models.charlm_loss, has_aux=True)(
      state.params, carried, inputs, targets, slope, key, config=model)
  grads = jax.lax.pmean(grads, AXIS)
  loss = jax.lax.pmean(loss, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  updates = jax.tree_util.tree_map(lambda u: u * state.plateau.scale, updates)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
      rnn_state=jax.lax.stop_gradient(outs.final_state))
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(params, rnn_state: hmlstm.State, inputs: jax.Array, targets: jax.Array,
              slope: jax.Array, *, model: models.CharLMConfig):
  """NLL sums and boundaries of one segment with the state carried (deterministic boundaries).

  Returns the new state and a dict: ``nll_sum`` and ``count`` summed over the device axis,
  ``op_counts`` (L, 3) of (COPY, UPDATE, FLUSH) summed too, and this device's ``z`` per layer
  (rows, T) for scoring boundaries (empty for the LSTM).
  """
  logits, outs = models.charlm_apply(params, rnn_state, inputs, slope, config=model,
                                     deterministic=True)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
  metrics = {"nll_sum": jax.lax.psum(jnp.sum(nll), AXIS),
             "count": jax.lax.psum(jnp.asarray(nll.size, jnp.float32), AXIS)}
  if outs.rnn.z:
    ops = hmlstm.operations(rnn_state, outs.rnn)
    metrics["op_counts"] = jax.lax.psum(hmlstm.operation_counts(ops), AXIS)
    metrics["z"] = jnp.stack([jnp.swapaxes(z[..., 0], 0, 1) for z in outs.rnn.z])  # (L, rows, T)
  return outs.final_state, metrics
