"""The one place that knows about devices and hosts: the mesh, the mapped steps, placing data.

The per-device steps of :mod:`.steps` are written with the axis name ``steps.AXIS``. Here they
are mapped with ``jax.shard_map`` over a one-axis ``Mesh`` of the devices in use on every
process (the first ``num_devices`` of each, processes in order) and compiled with ``jax.jit``.
The state lives as global ``jax.Array``s: everything replicated except the carried state,
whose rows are split over the devices; a batch's rows likewise. Process p supplies its own
rows, which are rows [p·B/P, (p+1)·B/P) of the global batch (device d of the mesh holds a
contiguous block of them), so global row r is the same stream whatever the number of
processes and devices: a checkpoint (which Orbax writes from the global arrays, each process
its own shards) resumes on any topology with the same global batch.

Why ``shard_map`` over a global mesh rather than ``pmap``: since JAX 0.8 ``pmap`` is itself
built on ``jit`` and ``shard_map`` and is in maintenance mode; a global mesh gives arrays that
span every host, which Orbax checkpoints directly (no gathering by hand) and which restore onto
another mesh. Measured on one CPU device, the trainer's loop runs at the bare step's speed
(``python -m experiments.benchmark --mode=loop``). Experiments never see any of this.
"""
from __future__ import annotations

import functools
import platform
import subprocess

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import jax.numpy as jnp
import numpy as np

from hmlstm_jax.training import steps

P = PartitionSpec


def cpu_info() -> dict:
  """This machine's CPU: ``{'model': lscpu's model name, 'flags': its vector flags that change
  XLA:CPU's kernels (AVX2, AVX-512, bf16, AMX, FMA)}``; figures name it beside them."""
  cpu = {"model": platform.processor() or "unknown", "flags": []}
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    cpu["model"] = fields.get("Model name", cpu["model"]).strip()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    cpu["flags"] = [f for f in fields.get("Flags", "").split() if f in wanted]
  except (OSError, subprocess.CalledProcessError):
    pass
  return cpu


def device_name(devices: list) -> str:
  """What a run's figures were measured on: ``'1 x NVIDIA H200'``, ``'1 x cpu (AMD EPYC;
  avx2 fma)'``."""
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    cpu = cpu_info()
    kind = f"cpu ({cpu['model']}; {' '.join(cpu['flags']) or 'no vector flags read'})"
  return f"{len(devices)} x {kind}"


def mesh_devices(num_devices: int | None) -> list:
  """The first ``num_devices`` devices of every process (all when ``None``), processes in
  order: the devices of the mesh."""
  local = len(jax.local_devices())
  if num_devices is not None and not 1 <= num_devices <= local:
    raise ValueError(f"num_devices={num_devices}, but this host has {local} devices")
  per_process: dict[int, list] = {}
  for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    per_process.setdefault(d.process_index, []).append(d)
  n = num_devices or local
  return [d for p in sorted(per_process) for d in per_process[p][:n]]


# How a TrainState lies on the mesh: everything replicated but the carry, whose rows are split.
STATE_SPECS = steps.TrainState(step=P(), params=P(), opt_state=P(), carry=P(steps.AXIS),
                               plateau=P(), key=P())


class MappedSteps:
  """The experiment's steps mapped over the mesh of ``devices``. Arguments are global arrays
  (from :meth:`put_state`, :meth:`place`, :meth:`replicate`) or host batches; results stay
  on the devices until read."""

  def __init__(self, experiment, optimizer, devices):
    self.devices = list(devices)
    self.mesh = Mesh(np.asarray(self.devices), (steps.AXIS,))
    self._replicated = NamedSharding(self.mesh, P())
    self._rows = NamedSharding(self.mesh, P(steps.AXIS))
    self._processes = len({d.process_index for d in self.devices})
    state, rows = STATE_SPECS, P(steps.AXIS)

    def mapped(fn, in_specs, out_specs, **jit_kwargs):
      # check_vma=False: the steps are written per device, as for pmap (a replicated input's
      # gradient is this device's; the step averages it over AXIS itself), and the HM-LSTM's
      # custom backward returns plain per-device cotangents.
      return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                                   check_vma=False), **jit_kwargs)

    self._train = mapped(
        functools.partial(steps.train_step, experiment=experiment, optimizer=optimizer),
        (state, rows, P(), P()), (state, P()), donate_argnums=(0,))
    self._probe = mapped(functools.partial(steps.probe_step, experiment=experiment),
                         (state, rows, P(), P()), P())
    self._eval = mapped(functools.partial(steps.eval_step, experiment=experiment),
                        (P(), rows, rows, P()), (rows, P()))
    self._finite = jax.jit(_all_finite, out_shardings=self._replicated)

  # ----------------------------------------------------------------------- placing

  def place(self, batch):
    """This process's rows of a batch → global arrays, rows split over the devices (the
    copies are asynchronous)."""
    local = len(self.devices) // self._processes

    def put(x):
      x = np.asarray(x)
      if x.shape[0] % local:
        raise ValueError(f"{x.shape[0]} rows cannot be split evenly over this host's {local} "
                         "devices")
      return jax.make_array_from_process_local_data(
          self._rows, x, (x.shape[0] * self._processes,) + x.shape[1:])
    return jax.tree_util.tree_map(put, batch)

  def replicate(self, tree):
    """A host pytree, equal on every process → global arrays replicated on every device."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(self._replicated, np.asarray(x)), tree)

  def put_state(self, host_state: steps.TrainState) -> steps.TrainState:
    """A host :class:`~.steps.TrainState` (this process's rows of the carry) onto the mesh."""
    return self.replicate(host_state.replace(carry=())).replace(carry=self.place(host_state.carry))

  def abstract_state(self, host_state: steps.TrainState) -> steps.TrainState:
    """Shapes, dtypes and shardings of :meth:`put_state` of ``host_state``, without placing
    anything: what a checkpoint is restored onto."""
    def like(x, sharding, rows=1):
      x = np.asarray(x)
      return jax.ShapeDtypeStruct((x.shape[0] * rows,) + x.shape[1:] if rows > 1 else x.shape,
                                  x.dtype, sharding=sharding)
    replicated = jax.tree_util.tree_map(lambda x: like(x, self._replicated),
                                        host_state.replace(carry=()))
    return replicated.replace(carry=jax.tree_util.tree_map(
        lambda x: like(x, self._rows, self._processes), host_state.carry))

  @staticmethod
  def local_copy(tree):
    """Replicated global arrays → this process's copy, as arrays on one of its devices."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0), tree)

  @staticmethod
  def fetch(tree):
    """Replicated global arrays → host arrays (this process's copy; no communication)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)

  def all_finite(self, tree) -> bool:
    """Whether every floating-point element of a global pytree is finite (the same answer on
    every process)."""
    return bool(self.fetch(self._finite(tree)))

  # ----------------------------------------------------------------------- steps

  def train(self, state, batch, schedule, reset: bool):
    """One training step on this process's rows of a batch, with this step's schedule (host
    arrays, the same on every process); returns the new state and the metrics averaged over
    every device (on the devices)."""
    return self.train_placed(state, self.place(batch), schedule, reset)

  def train_placed(self, state, placed, schedule, reset: bool):
    """:meth:`train` on a batch already on the mesh (:meth:`place`)."""
    return self._train(state, placed, schedule, np.bool_(reset))

  def probe(self, state, batch, schedule, reset: bool):
    """The loss the next train step would compute (:func:`.steps.probe_step`), on the devices."""
    return self._probe(state, self.place(batch), schedule, np.bool_(reset))

  def eval(self, params, carry, batch, schedule):
    """One evaluation batch; returns the carry and the sums over every device (on device)."""
    return self._eval(params, carry, self.place(batch), schedule)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
