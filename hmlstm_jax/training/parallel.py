"""The one place that knows about devices: mapping the per-device steps, placing data.

The steps of :mod:`.steps` are written for one device with the axis name ``steps.AXIS``;
here they are ``pmap``-ed over the local devices in use. Moving to ``shard_map`` is a change
to this module only.
"""
from __future__ import annotations

import functools

import flax.jax_utils
import jax
import numpy as np

from hmlstm_jax.data import batching
from hmlstm_jax.training import steps


def local_devices(num_devices: int | None) -> list:
  """The first ``num_devices`` local devices (all when ``None``)."""
  devices = jax.local_devices()
  if num_devices is None:
    return devices
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices={num_devices}, but this host has {len(devices)} devices")
  return devices[:num_devices]


def replicate(tree, devices):
  """Copies a pytree onto every device (leading axis = device)."""
  return flax.jax_utils.replicate(tree, devices=devices)


def unreplicate(tree):
  """The first device's copy, on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)


def shard_rows(tree, num_devices: int):
  """Splits each (rows, ...) leaf into (devices, rows / devices, ...): device d gets a
  contiguous block of rows. The mapped steps move the blocks onto their devices."""
  return jax.tree_util.tree_map(lambda x: batching.split_over_devices(np.asarray(x), num_devices), tree)


def gather_rows(tree):
  """Inverse of :func:`shard_rows`: (devices, rows/device, ...) → (rows, ...) on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)


def map_train_step(model, optimizer, devices):
  """``pmap`` of :func:`steps.train_step`: state and batch per device, slope and reset broadcast."""
  fn = functools.partial(steps.train_step, model=model, optimizer=optimizer)
  return jax.pmap(lambda state, inputs, targets, slope, reset: fn(state, inputs, targets, slope, reset=reset),
                  axis_name=steps.AXIS, in_axes=(0, 0, 0, None, None), devices=devices,
                  donate_argnums=(0,))


def map_eval_step(model, devices):
  """``pmap`` of :func:`steps.eval_step`: parameters replicated, state and batch per device."""
  return jax.pmap(functools.partial(steps.eval_step, model=model), axis_name=steps.AXIS,
                  in_axes=(0, 0, 0, 0, None), devices=devices)
