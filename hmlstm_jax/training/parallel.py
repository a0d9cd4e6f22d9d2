"""The one place that knows about devices: mapping the per-device steps, placing data.

The steps of :mod:`.steps` are written for one device with the axis name ``steps.AXIS``;
here they are ``pmap``-ed over the local devices in use, and rows are split into contiguous
blocks, one per device. Experiments never see devices: running over the devices of many
hosts (or with ``shard_map``) is a change to this module only.
"""
from __future__ import annotations

import functools

import flax.jax_utils
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
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


def first(tree):
  """The first device's copy, still on the device (no transfer, no wait)."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def shard_rows(tree, num_devices: int):
  """Splits each (rows, ...) leaf into (devices, rows / devices, ...): device d gets a
  contiguous block of rows. The mapped steps move the blocks onto their devices."""
  return jax.tree_util.tree_map(lambda x: batching.split_over_devices(np.asarray(x), num_devices), tree)


def gather_rows(tree):
  """Inverse of :func:`shard_rows`: (devices, rows/device, ...) → (rows, ...) on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), tree)


def to_devices(host_state: steps.TrainState, devices) -> steps.TrainState:
  """A host :class:`~.steps.TrainState` onto the devices: all replicated, the carry's rows split."""
  replicated = replicate(host_state.replace(carry=()), devices)
  return replicated.replace(carry=shard_rows(host_state.carry, len(devices)))


def to_host(state: steps.TrainState) -> steps.TrainState:
  """Inverse of :func:`to_devices` (the replicas are equal: the first is taken)."""
  host = unreplicate(state.replace(carry=()))
  return host.replace(carry=gather_rows(state.carry))


class MappedSteps:
  """The experiment's steps mapped over ``devices``; every argument is host data or a
  mapped state, every result stays on the devices until read."""

  def __init__(self, experiment, optimizer, devices):
    self.devices = devices
    n = len(devices)
    self._train = jax.pmap(
        functools.partial(steps.train_step, experiment=experiment, optimizer=optimizer),
        axis_name=steps.AXIS, in_axes=(0, 0, None, None), devices=devices, donate_argnums=(0,))
    self._probe = jax.pmap(functools.partial(steps.probe_step, experiment=experiment),
                           axis_name=steps.AXIS, in_axes=(0, 0, None, None), devices=devices)
    self._eval = jax.pmap(functools.partial(steps.eval_step, experiment=experiment),
                          axis_name=steps.AXIS, in_axes=(0, 0, 0, None), devices=devices)
    self._shard = lambda tree: shard_rows(tree, n)
    self._rows = NamedSharding(Mesh(np.asarray(devices), (steps.AXIS,)), PartitionSpec(steps.AXIS))

  def place(self, batch):
    """A host batch onto the devices, its rows split as the mapped steps take them (the copy
    is asynchronous)."""
    return jax.device_put(self._shard(batch), self._rows)

  def train(self, state, batch, slope: float, reset: bool):
    """One training step on a host batch; returns the new state and the first device's
    metrics (on device)."""
    return self.train_placed(state, self.place(batch), slope, reset)

  def train_placed(self, state, placed, slope: float, reset: bool):
    """:meth:`train` on a batch already on the devices (:meth:`place`)."""
    state, metrics = self._train(state, placed, np.float32(slope), reset)
    return state, first(metrics)

  def probe(self, state, batch, slope: float, reset: bool):
    return first(self._probe(state, self._shard(batch), np.float32(slope), reset))

  def eval_carry(self, carry):
    return self._shard(carry)

  def replicate(self, tree):
    return replicate(tree, self.devices)

  def eval(self, params, carry, batch, slope: float):
    """One evaluation batch; returns the carry and the sums over devices (on device)."""
    carry, sums = self._eval(params, carry, self._shard(batch), np.float32(slope))
    return carry, first(sums)
