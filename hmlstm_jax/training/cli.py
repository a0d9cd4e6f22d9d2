"""What every experiment binary shares: flags from the config, flagfiles by name, the default
workdir, and what the process prints and returns.

Exit status: 0 when the run finished (results written); 1 with one line on stderr for a bad
flag, an unusable workdir, data that cannot be read, a checkpoint that cannot be written or
a run that diverged (no traceback: these are the user's or the machine's, not bugs); 75
(``EX_TEMPFAIL``: try again) when SIGTERM or SIGINT stopped the run: a checkpoint is saved
and the same command continues it.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax

from hmlstm_jax import settings
from hmlstm_jax.training import distributed
from hmlstm_jax.training.errors import Preempted
from hmlstm_jax.training.errors import RunError
from hmlstm_jax.training.trainer import train_and_evaluate

EXIT_PREEMPTED = 75


def _exit(code: int, message: str | None = None) -> None:
  """Prints ``message`` on stderr and ends the process now. The run has closed its files and
  checkpoints (``finally`` blocks); skipping the interpreter's shutdown keeps library threads
  (Orbax's, after a failed write) from printing tracebacks or hanging at exit."""
  if message:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def resolve_flagfiles(argv: list[str], flags_dir: str) -> tuple[list[str], str | None]:
  """``--flagfile=NAME`` → ``flags_dir/NAME`` when NAME is not an existing path; also
  returns the last flagfile's stem (the default workdir's name)."""
  out, stem = [], None
  for arg in argv:
    if arg.startswith("--flagfile="):
      path = arg.split("=", 1)[1]
      if not os.path.exists(path) and os.path.exists(os.path.join(flags_dir, path)):
        arg = "--flagfile=" + os.path.join(flags_dir, path)
      stem = os.path.splitext(os.path.basename(path))[0]
    out.append(arg)
  return out, stem


def run_binary(name: str, config_cls: type, make_experiment: Callable, flags_dir: str,
               default_workdir: Callable) -> None:
  """Runs an experiment binary: defines the flags of ``config_cls`` (and ``--workdir``),
  parses ``sys.argv``, builds the config (bad values end here, before any work) and trains
  ``make_experiment(config)``. ``default_workdir(config, flagfile_stem)`` names the workdir
  when ``--workdir`` is not given."""
  settings.define_flags(config_cls)
  distributed.define_flags()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, "
                      "config.json, results.json and figures; a run in an existing workdir "
                      "resumes. Default: workdirs/<name of the last flagfile>.")
  flags.DEFINE_bool("interim_report", False, "Train nothing: write interim.json (validation "
                    "and test of the best checkpoint so far, and the report's figures) for a "
                    "run stopped before its end; results.json stays for the end.")
  argv, stem = resolve_flagfiles(sys.argv, flags_dir)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # progress goes to stdout; -v 0 for library INFO
    f = flags.FLAGS
    try:
      config = settings.from_flags(config_cls)
      launch = distributed.settings_from(f.distributed, f.coordinator_address, f.num_processes,
                                         f.process_id, bind_address=f.coordinator_bind_address)
      distributed.initialize(launch, f.heartbeat_timeout, f.init_timeout, name)
    except ValueError as err:
      _exit(1, f"{name}: bad flags: {err}")
    if f.workdir is not None and not f.workdir.strip():
      _exit(1, f"{name}: bad flags: --workdir is empty; name a directory, or leave the flag "
            "out for the default workdirs/<flagfile name>")
    workdir = f.workdir or default_workdir(config, stem)
    try:
      result = train_and_evaluate(make_experiment(config), workdir,
                                  interim=f.interim_report)
    except (RunError, ValueError, OSError, jax.errors.JaxRuntimeError) as err:
      lost = distributed.lost_peer(err)  # a collective broke: another process died
      if lost:
        _exit(1, f"{name}: {lost}")
      if isinstance(err, jax.errors.JaxRuntimeError):
        raise
      _exit(1, f"{name}: {err}")  # settings, data, disk: one line, no traceback
    except Preempted as err:
      _exit(EXIT_PREEMPTED, f"{name}: stopped ({err}); training is complete and checkpointed in "
            f"{workdir}: run again to write the report")
    if result["status"] == "preempted":
      _exit(EXIT_PREEMPTED)

  app.run(main, argv=argv)
