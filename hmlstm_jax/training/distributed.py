"""Runs of several processes (hosts): starting JAX's distributed runtime, and what the
processes must agree on.

A run is multi-process when ``--coordinator_address`` (or ``JAX_COORDINATOR_ADDRESS``) is set,
under a SLURM job step of several tasks, or with ``--distributed=on`` (Cloud TPU slices: JAX
finds the coordinator, the process count and this process's id from the TPU metadata).
Every process runs the same binary with the same flags; process 0 hosts the coordinator,
prints progress and writes TensorBoard, ``config.json``, ``results.json`` and figures; every
process writes its own shards of each checkpoint (Orbax).

A process that dies stops the others: JAX's coordination service notices the missing
heartbeats within ``--heartbeat_timeout`` seconds (60 by default) and ends every other process
with a non-zero status (SIGABRT, 134); when process 0 (the coordinator) dies, the others stop
within seconds. Each says so in one line (:mod:`.abort_filter`, in place of the runtime's C++
abort and thread dump), or in the line of the collective that failed first
(:func:`lost_peer`). A process that dies before it registers (or is never started) leaves the
others waiting at the start: they end with one line after ``--init_timeout`` seconds (60).

Process 0's coordinator listens on the address it is given and nowhere else (``launch/local.sh``
gives 127.0.0.1: loopback stays loopback; JAX alone would listen on every interface). Where the
given address is not one of the coordinator host's own (behind NAT), name the interface with
``--coordinator_bind_address`` (``0.0.0.0:PORT`` for all). With the address found by JAX itself
(SLURM, Cloud TPU), JAX's default stands.
"""
from __future__ import annotations

import os
import sys
import threading

from absl import flags
import jax
import numpy as np

from hmlstm_jax.training import abort_filter
from hmlstm_jax.training.errors import first_line

MODES = ("auto", "on", "off")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The flags of a multi-process run (they describe the launch, not the run: they are not
  saved with it, and a run may resume on another number of processes)."""
  flags.DEFINE_enum(
      "distributed", "auto", MODES,
      "auto: multi-process when a coordinator address is given or under a SLURM step of several "
      "tasks; on: always (Cloud TPU slices: JAX finds every setting itself); off: one process.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0's coordinator (default $JAX_COORDINATOR_ADDRESS).",
      flag_values=flag_values)
  flags.DEFINE_string(
      "coordinator_bind_address", None,
      "host:port process 0's coordinator listens on (default: the coordinator address itself, "
      "so a loopback address is reachable from this machine only).", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Processes in the run (default $JAX_NUM_PROCESSES).",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1 "
                       "(default $JAX_PROCESS_ID).", flag_values=flag_values)
  flags.DEFINE_integer(
      "init_timeout", 60,
      "Seconds to wait for every process to start and register with the coordinator; past "
      "them each waiting process ends with one line (exit 1).", flag_values=flag_values)
  flags.DEFINE_integer(
      "heartbeat_timeout", 60,
      "Seconds without a heartbeat after which a process counts as dead and the others stop.",
      flag_values=flag_values)


def _env_int(environ, name: str) -> int | None:
  value = environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an integer") from None


def settings_from(mode: str, coordinator_address: str | None, num_processes: int | None,
                  process_id: int | None, environ=os.environ,
                  bind_address: str | None = None) -> dict | None:
  """The keyword arguments of ``jax.distributed.initialize`` for these flags and this
  environment, or None for a single-process run. Raises ValueError for an incomplete set."""
  if mode not in MODES:
    raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
  address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else _env_int(environ, "JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else _env_int(environ, "JAX_PROCESS_ID")
  slurm = int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ
  if mode == "off" or (mode == "auto" and not (address or slurm)):
    return None
  if address and (count is None or index is None) and not slurm:
    raise ValueError(
        f"a coordinator address ({address}) needs --num_processes and --process_id (or "
        "$JAX_NUM_PROCESSES and $JAX_PROCESS_ID)")
  if count is not None and count < 1:
    raise ValueError(f"num_processes must be at least 1, got {count}")
  if count is not None and index is not None and not 0 <= index < count:
    raise ValueError(f"process_id must be in [0, {count}), got {index}")
  if bind_address is not None and not address:
    raise ValueError("--coordinator_bind_address needs a coordinator address")
  for name, value in (("coordinator address", address), ("coordinator_bind_address", bind_address)):
    if value and not _has_port(value):
      raise ValueError(f"the {name} must be host:port, got {value!r}")
  return {"coordinator_address": address, "num_processes": count, "process_id": index,
          "coordinator_bind_address": bind_address or address}


def _has_port(address: str) -> bool:
  host, _, port = address.rpartition(":")
  return bool(host) and port.isdigit()


def initialize(settings: dict | None, heartbeat_timeout: int = 60, init_timeout: int = 60,
               name: str = "hmlstm_jax") -> None:
  """Starts JAX's distributed runtime (before anything else uses JAX); a no-op for None.

  If the processes have not all registered with the coordinator within ``init_timeout``
  seconds (a process died before it registered, or was never started), this process ends
  with one line on stderr and exit status 1. (JAX's own bound aborts the process with a C++
  check failure after 300 s; a watchdog thread fires first, while JAX waits with the GIL
  released.)
  """
  if settings is None:
    return
  for flag, value in (("heartbeat_timeout", heartbeat_timeout), ("init_timeout", init_timeout)):
    if value < 1:
      raise ValueError(f"{flag} must be at least 1 second, got {value}")
  process, _, coordinator = _who(settings)
  abort_filter.install(name, process, coordinator)
  watchdog = threading.Timer(init_timeout, _give_up, (name, settings, init_timeout))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**{k: v for k, v in settings.items() if v is not None},
                               heartbeat_timeout_seconds=heartbeat_timeout,
                               initialization_timeout=init_timeout + 30)
  finally:
    watchdog.cancel()


def _who(settings: dict) -> tuple[str, str, str]:
  """This process's id, the process count and the coordinator's address, as the one-line
  messages name them ('?' and 'found by JAX' where JAX finds them itself)."""
  label = lambda key, unknown: unknown if settings.get(key) is None else str(settings[key])
  return (label("process_id", "?"), label("num_processes", "?"),
          label("coordinator_address", "found by JAX"))


def _give_up(name: str, settings: dict, init_timeout: int) -> None:
  """The watchdog of :func:`initialize`: one line, exit 1 (no Python cleanup: JAX is waiting)."""
  process, count, coordinator = _who(settings)
  sys.stderr.write(
      f"{name}: the run's processes did not all start within --init_timeout={init_timeout} s "
      f"(process {process} of {count}, coordinator {coordinator}): a process died or was "
      "never launched; start every process again\n")
  sys.stderr.flush()
  os._exit(1)


def is_primary() -> bool:
  """Process 0: the one that prints and writes the run's own files."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is true on any (one collective; cheap but blocking)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(bool(flag)))).any())


# What JAX's collectives say when a peer's connection is gone (Gloo on CPU, gRPC otherwise).
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Gloo", "UNAVAILABLE",
              "DEADLINE_EXCEEDED", "Socket closed")


def lost_peer(err: BaseException) -> str | None:
  """For an error of a multi-process run that comes from a broken collective, a line saying
  so (the cause is another process's death; its log says why); otherwise None."""
  if jax.process_count() == 1 or not any(mark in str(err) for mark in _LOST_PEER):
    return None
  return (f"process {jax.process_index()}: an operation across the processes failed, most likely "
          f"because another process of the run stopped or died; see its log ({first_line(err)})")


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier ``name``."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
