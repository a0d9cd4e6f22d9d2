"""``train_and_evaluate``: trains any :class:`~.experiment.Experiment` and reports on it.

:func:`open_run` is the one way in (``train_and_evaluate`` and the benchmark use it): it
checks the devices, holds the workdir, loads the data and restores the state, and gives a
:class:`Run` whose parts (``train``, ``validate``, ``save``, ``final_report``, ``mapped``)
can then be used one by one.

experiment config → workdir (lock, configuration check) → data → parameters (or the newest
readable checkpoint) → mapped train steps → periodic validation (plateau, best) and
checkpoints → test evaluation with the best parameters → the experiment's report and
``results.json``.

Restarting with the same workdir continues exactly where the run stopped: the step, the data
position (one batch per step), the carried state of every row, the Adam and plateau states
and the RNG key all come from the checkpoint.

What the trainer guarantees, whatever happens to the process:

* Metrics stay on the devices until a progress line (every ``log_every`` steps), a
  validation or a checkpoint reads them: no host round trip per step. The experiment's
  schedule is computed on the host.
* Nothing non-finite reaches a checkpoint: before step s is saved, the losses and gradient
  norms of every step up to s have been read back finite, every parameter and optimiser leaf
  is finite, and the loss that step s + 1 would compute from it (:func:`.steps.probe_step`) is
  finite. A non-finite value stops the run with :class:`.errors.NonFiniteError`, naming the
  step; the last good checkpoint is left as it was.
* A checkpoint names the best step so far, which is kept on disk (:mod:`.checkpoints`).
* The stopping rule (``max_lr_cuts``, decisions.md §4): a validation at which the plateau
  would cut the learning rate for the ``max_lr_cuts + 1``-th time ends the run there (the
  cut is applied, so raising ``max_lr_cuts`` continues it). The count, the wall time spent
  (``train_s``, over every process that resumed the run) and the device are in every
  checkpoint's record, in ``progress.json`` (rewritten after each validation and checkpoint,
  so that a run stopped at any point has its figures on disk) and in ``results.json``.
* SIGTERM or SIGINT during training: a checkpoint at the next step (with several processes:
  at the next progress line, where the processes agree to stop), status ``'preempted'``;
  during the final report: :class:`.errors.Preempted` at once (the report is redone when run
  again; its files are written atomically).
* With several processes (:mod:`.distributed`) every decision (log, validate, save, stop) is
  taken on every process from values they share, so they stay in step; process 0 alone
  prints, writes TensorBoard, ``results.json`` and the experiment's report.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from typing import Any, Iterator

import jax
import numpy as np

from hmlstm_jax.training import checkpoints
from hmlstm_jax.training import distributed
from hmlstm_jax.training import metrics
from hmlstm_jax.training import parallel
from hmlstm_jax.training import steps
from hmlstm_jax.training.errors import NonFiniteError
from hmlstm_jax.training.errors import first_line
from hmlstm_jax.training.errors import Preempted
from hmlstm_jax.training.errors import RunError
from hmlstm_jax.training.experiment import Experiment
from hmlstm_jax.training.experiment import Hosts
from hmlstm_jax.training.workdir import Workdir
from hmlstm_jax.training.workdir import open_workdir

say = metrics.say


class Signals:
  """SIGTERM / SIGINT → a stop request that the loop honours after the current step; while
  ``urgent`` (the final report) they raise :class:`Preempted` at once. Main thread only."""

  def __init__(self):
    self.requested = False
    self.urgent = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    if self.urgent:
      raise Preempted(f"{signal.Signals(signum).name} during the final report")

  def make_urgent(self):
    self.urgent = True
    if self.requested:
      raise Preempted("stop requested before the final report")

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _figures(named: dict[str, float]) -> str:
  """``'  tau 0.50'``: named figures as a progress line shows them."""
  return "".join(f"  {name} {value:.2f}" for name, value in named.items())


def _sum_float64(sums: list) -> Any:
  """Per-batch sums (read back together) added up in float64."""
  host = parallel.MappedSteps.fetch(sums)
  return jax.tree_util.tree_map(lambda *xs: np.sum(np.asarray(xs, np.float64), axis=0), *host)


class Run:
  """One run of an experiment in a workdir, in parts that can be used one by one (made by
  :func:`open_run`).

  Attributes: ``experiment``, ``data`` (its :class:`~.experiment.Data`), ``mapped`` (the
  :class:`~.parallel.MappedSteps`), ``template`` (the initial state on the host), ``signals``;
  after :meth:`restore`: ``state`` (on the devices), ``step``, ``meta`` (the JSON record saved
  with each checkpoint).
  """

  def __init__(self, experiment: Experiment, workdir: Workdir, devices: list, signals: Signals):
    self.experiment = experiment
    self.signals = signals
    self.config = experiment.config.train
    self.workdir = workdir
    self.devices = devices
    self.hosts = Hosts(jax.process_index(), jax.process_count())
    self.data = experiment.load_data(self.hosts)
    self.steps_per_epoch = len(self.data.train)
    self.total_steps = max(1, math.ceil(self.config.num_epochs * self.steps_per_epoch))
    self.optimizer = experiment.optimizer()
    if self.config.max_lr_cuts is not None and self.optimizer.plateau is None:
      raise ValueError("max_lr_cuts needs an optimiser that cuts the learning rate on a "
                       "plateau; this experiment's has none")
    self.mapped = parallel.MappedSteps(experiment, self.optimizer, devices)
    self.template = steps.init_state(jax.random.key(self.config.seed), experiment, self.optimizer,
                                     rows=self.config.batch_size // self.hosts.count)
    self.abstract = self.mapped.abstract_state(self.template)  # what checkpoints restore onto
    self.ckpt = checkpoints.Checkpointer(workdir.path, self.config.keep_checkpoints)
    self.losses: list[float] = []   # this call's per-step training losses, read back
    self._pending: list = []        # metrics of steps not yet read back (on the devices)
    self._saved_step = None

  def schedule(self, step: int):
    """The experiment's schedule of training step ``step``, as host arrays."""
    return jax.tree_util.tree_map(
        np.asarray, self.experiment.schedule(step, step / self.steps_per_epoch))

  # ----------------------------------------------------------------------- start

  def restore(self) -> None:
    """The newest readable checkpoint, or the initial state."""
    self.meta = {"best_step": None, "best": None, "history": [], "lr_cuts": 0, "ended": None,
                 "train_s": 0.0, "steps_per_epoch": self.steps_per_epoch,
                 "data": dict(self.data.metadata)}
    restored = self.ckpt.restore_latest(self.abstract, warn=say)
    if restored is None:
      state = self.mapped.put_state(self.template)
    else:
      state, self.meta = restored
      if self.meta["steps_per_epoch"] != self.steps_per_epoch:
        raise RunError(
            f"the checkpoints in {self.workdir.path} were made with {self.meta['steps_per_epoch']} "
            f"batches per epoch, this data and batch size give {self.steps_per_epoch}: use the "
            "run's own data, or another --workdir")
    self.step = int(self.mapped.fetch(state.step))
    if restored is not None:
      self._saved_step = self.step
      say(f"resumed from {self.workdir.path} at step {self.step}")
      for key, default in (("lr_cuts", 0), ("ended", None), ("train_s", 0.0)):
        self.meta.setdefault(key, default)  # records of checkpoints made before these keys
      self._check_record()
      if self._rule_ends():
        self.total_steps = self.step  # ended by the stopping rule: straight to the report
    self._mark = time.time()
    self.host_plateau = self.mapped.fetch(state.plateau)
    self.state = state

  # ----------------------------------------------------------------------- the loop

  def train(self, writer: metrics.Writer, max_steps: int | None = None) -> str:
    """Trains to ``total_steps`` (or ``max_steps`` more, or a stop request); returns
    ``'done'`` or ``'preempted'`` (with a checkpoint of the step reached)."""
    c = self.config
    processes = f" on {self.hosts.count} processes" if self.hosts.count > 1 else ""
    say(f"training {self.data.description}, {self.total_steps} steps, {len(self.devices)} "
        f"device(s){processes}; workdir {self.workdir.path}")
    start, t_log, step_log = self.step, time.time(), self.step
    while self.step < self.total_steps:
      position = self.step % self.steps_per_epoch
      schedule = self.schedule(self.step)
      self.state, out = self.mapped.train(self.state, self.data.train[position], schedule,
                                          position == 0)
      self._pending.append(out)
      self.step += 1
      last = self.step == self.total_steps
      logged = self.step % c.log_every == 0 or last
      if logged:
        t_log, step_log = self._log(writer, schedule, t_log, step_log)
      improved = False
      if self.step % c.eval_every == 0 or last:
        improved = self.validate(writer, schedule)
        if self._rule_ends():
          self.total_steps, last = self.step, True
          say(f"stopping rule: validation stopped improving after {c.max_lr_cuts} learning-rate "
              f"cut(s); the run ends at step {self.step}, its best is step "
              f"{self.meta['best_step']}")
      if improved or self.step % c.checkpoint_every == 0 or last:
        self.save()
      if self.hosts.count == 1:
        stop = self.signals.requested
      else:  # the processes agree (one collective) where they read metrics back anyway
        stop = logged and distributed.any_process(self.signals.requested)
      if stop or (max_steps is not None and self.step - start >= max_steps):
        if not last:
          self.save()
          say(f"stopped at step {self.step} with a checkpoint in {self.workdir.path}; "
              "run again to continue")
          return "preempted"
    return "done"

  def _check_record(self) -> None:
    """The restored record's fields the trainer relies on, checked: a record edited by hand or
    by another program (``best_step`` "../../x" once made the report read outside the
    workdir) is one RunError, not a path or a crash."""
    m, where = self.meta, f"the record of checkpoint {self.step} in {self.ckpt.directory}"
    saved = set(self.ckpt.steps())
    problems = []
    if m["best_step"] is not None and (type(m["best_step"]) is not int
                                       or m["best_step"] not in saved):
      problems.append(f"best_step {m['best_step']!r} is not one of its checkpoints")
    if m["best"] is not None and not isinstance(m["best"], (int, float)):
      problems.append(f"best {m['best']!r} is not a number")
    if type(m["lr_cuts"]) is not int or m["lr_cuts"] < 0:
      problems.append(f"lr_cuts {m['lr_cuts']!r} is not a count")
    if not isinstance(m["train_s"], (int, float)) or not isinstance(m["history"], list):
      problems.append("train_s or history has the wrong type")
    if problems:
      raise RunError(f"{where}: {'; '.join(problems)}; restore it, or move the checkpoints "
                     "aside to start afresh")

  def _rule_ends(self) -> bool:
    """True when the stopping rule has ended the run: more plateaus than ``max_lr_cuts``."""
    cuts = self.config.max_lr_cuts
    return cuts is not None and self.meta["lr_cuts"] > cuts

  def _tick(self) -> None:
    """Adds the wall time since the last tick to the record's ``train_s``."""
    now = time.time()
    self.meta["train_s"] += now - self._mark
    self._mark = now

  def progress(self) -> dict:
    """Where the run stands: what ``progress.json`` holds (see the module docstring)."""
    return {"step": self.step, "epoch": self.step / self.steps_per_epoch,
            "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "best_step": self.meta["best_step"], "best": self.meta["best"],
            "lr_cuts": self.meta["lr_cuts"], "ended": self.meta["ended"],
            "train_s": round(self.meta["train_s"], 1), "device": parallel.device_name(self.devices),
            "history": list(self.meta["history"])}

  def read_metrics(self) -> list[dict]:
    """Reads back the metrics of the steps since the last read; stops on a non-finite one."""
    if not self._pending:
      return []
    values = self.mapped.fetch(self._pending)
    first = self.step - len(values) + 1
    self._pending = []
    for i, m in enumerate(values):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        raise NonFiniteError(
            f"non-finite training loss ({float(m['loss'])}) or gradient norm "
            f"({float(m['grad_norm'])}) in step {first + i} (steps {first}-{self.step} read back "
            f"now); {self._last_good()}. Lower --learning_rate or check the data.")
    self.losses.extend(float(m["loss"]) for m in values)
    return values

  def _last_good(self) -> str:
    saved = self.ckpt.steps()
    if not saved:
      return "no checkpoint was written"
    return f"the last good checkpoint, step {saved[-1]} in {self.ckpt.directory}, is untouched"

  def _log(self, writer, schedule, t_log: float, step_log: int) -> tuple[float, int]:
    values = self.read_metrics()
    now = time.time()
    rate = (self.step - step_log) / max(now - t_log, 1e-9)
    items = rate * self.data.items_per_batch
    loss = float(values[-1]["loss"])
    extra = self.experiment.train_scalars({k: float(v) for k, v in values[-1].items()})
    shown = "".join(f"  {name} {value:.4f}" for name, value in extra.items())
    scheduled = self.experiment.schedule_scalars(schedule)
    scalars = {"train/loss": loss, f"train/{self.data.item_name}_per_s": items, **scheduled,
               "train/grad_norm": float(values[-1]["grad_norm"])}
    lr = ""
    if self.optimizer.learning_rate is not None:
      scale = 1.0 if self.host_plateau is None else float(self.host_plateau.scale)
      scalars["learning_rate"] = self.optimizer.learning_rate * scale
      lr = f"  lr {scalars['learning_rate']:.2g}"
    say(f"step {self.step}/{self.total_steps}  epoch {self.step / self.steps_per_epoch:.2f}  "
        f"loss {loss:.4f}{shown}  {items:.0f} {self.data.item_name}/s{_figures(scheduled)}{lr}"
        f"  remaining {metrics.format_duration((self.total_steps - self.step) / rate)}")
    scalars.update({f"train/{k.lower()}": v for k, v in extra.items()})
    scalars.update({f"train/{k}": float(v) for k, v in values[-1].items() if k not in ("loss", "grad_norm")})
    writer.scalars(self.step, scalars)
    return now, self.step

  # ----------------------------------------------------------------------- evaluation

  def evaluate(self, split: str, params, schedule, max_batches: int | None = None) -> dict:
    """The experiment's result over ``split`` (carry through the split; sums in float64)."""
    batches = self.data.evals[split]
    carry = self.mapped.place(
        self.experiment.init_carry(self.config.eval_batch_size // self.hosts.count))
    sums = []
    for k in range(min(len(batches), max_batches or len(batches))):
      carry, s = self.mapped.eval(params, carry, batches[k], schedule)
      sums.append(s)
    return self.experiment.summarize(_sum_float64(sums))

  def validate(self, writer, schedule) -> bool:
    """Validation at this step: the plateau and the best step; True if improved."""
    self.read_metrics()
    result = self.evaluate(self.data.validation, self.state.params, schedule,
                           self.config.eval_max_segments)
    objective = float(result[self.experiment.objective])
    if not math.isfinite(objective):
      raise NonFiniteError(f"non-finite validation {self.experiment.objective} ({objective}) at "
                           f"step {self.step}; {self._last_good()}. Lower --learning_rate.")
    bound = self.experiment.divergence_bound()
    if bound is not None and objective > bound:
      kept = (f"the best checkpoint, step {self.meta['best_step']} (validation "
              f"{self.experiment.objective} {self.meta['best']:.4g}), is kept in "
              f"{self.ckpt.directory}" if self.meta["best"] is not None else
              f"no validation passed before it: delete {self.workdir.path} and start again")
      raise NonFiniteError(
          f"diverged: validation {self.experiment.objective} {objective:.4g} at step "
          f"{self.step} is above {bound:.4g}, worse than the experiment allows for a model "
          f"that learns at all; {kept}. Lower --learning_rate.")
    if self.optimizer.plateau is not None:
      before = float(self.host_plateau.scale)
      _, self.host_plateau = self.optimizer.plateau.update({}, self.host_plateau, value=objective)
      self.state = self.state.replace(plateau=self.mapped.replicate(self.host_plateau))
      if float(self.host_plateau.scale) < before:
        self.meta["lr_cuts"] += 1
        if self._rule_ends():
          self.meta["ended"] = "stopping rule"
    improved = self.meta["best"] is None or objective < self.meta["best"]
    if improved:
      self.meta["best"], self.meta["best_step"] = objective, self.step
    scalars = {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.number))}
    self.meta["history"].append({"step": self.step, "lr_cuts": self.meta["lr_cuts"], **scalars})
    say("\n".join(self.experiment.summary_lines(f"step {self.step} {self.data.validation}",
                                                result)))
    writer.scalars(self.step, {f"valid/{k}": v for k, v in scalars.items()})
    self._tick()
    self.workdir.write("progress.json", json.dumps(self.progress(), indent=1))
    return improved

  # ----------------------------------------------------------------------- checkpoints

  def save(self) -> None:
    """Checkpoints the state after ``step`` once it is known good (see the module docstring)."""
    if self._saved_step == self.step:
      return
    self.read_metrics()
    if not self.mapped.all_finite((self.state.params, self.state.opt_state, self.state.carry)):
      # (not the plateau state: it starts at inf)
      raise NonFiniteError(f"non-finite parameters or optimiser state after step {self.step}; "
                           f"{self._last_good()}. Lower --learning_rate.")
    self._tick()
    position = self.step % self.steps_per_epoch
    schedule = self.schedule(self.step)
    probe = float(self.mapped.fetch(
        self.mapped.probe(self.state, self.data.train[position], schedule, position == 0)))
    if not math.isfinite(probe):
      raise NonFiniteError(
          f"the parameters after step {self.step} give a non-finite loss ({probe}) on the next "
          f"batch; {self._last_good()}. Lower --learning_rate.")
    self.ckpt.save(self.step, self.state, dict(
        self.meta, step=self.step, epoch=self.step / self.steps_per_epoch, position=position,
        schedule=jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), schedule)))
    self._saved_step = self.step
    self.workdir.write("progress.json", json.dumps(self.progress(), indent=1))

  # ----------------------------------------------------------------------- the end

  def final_report(self, name: str = "results.json") -> dict:
    """Validation and test with the best parameters, the experiment's report, written to
    ``name`` (``interim.json``: the report of a run stopped before its end, from its best
    checkpoint so far)."""
    best = self.meta["best_step"]
    if best is None:
      raise RunError(f"the checkpoints in {self.ckpt.directory} name no best step; "
                     + ("train until a validation first" if name != "results.json" else
                        "run again"))
    kind = "final" if name == "results.json" else "interim"
    say(f"{kind} report: the best checkpoint (step {best}) on validation and test")
    try:
      best_state, _ = self.ckpt.restore(best, self.abstract)
    except Exception as err:
      raise RunError(f"the best checkpoint (step {best}) in {self.ckpt.directory} cannot be read "
                     f"({first_line(err)})") from None
    params = best_state.params
    schedule = self.schedule(best)
    results = {split: self.evaluate(split, params, schedule) for split in self.data.evals}
    scheduled = _figures(self.experiment.schedule_scalars(schedule)).strip()
    lines = [f"best checkpoint: step {best}" + (f" ({scheduled})" if scheduled else "")]
    for split, result in results.items():
      lines += self.experiment.summary_lines(split, result)
    out = {**results, "best_step": best, "steps": self.step, "data": dict(self.data.metadata),
           "history": list(self.meta["history"]), "lr_cuts": self.meta["lr_cuts"],
           "ended": self.meta["ended"] or "num_epochs", "train_s": round(self.meta["train_s"], 1),
           "device": parallel.device_name(self.devices), "steps_per_epoch": self.steps_per_epoch,
           "parameters": sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))}
    if distributed.is_primary():  # figures and samples: one process's work and files
      extra, extra_lines = self.experiment.report(self.mapped.local_copy(params), schedule,
                                                  self.workdir.path)
      out.update(extra)
      lines += list(extra_lines)
    say("\n".join(lines))
    self.workdir.write(name, json.dumps(out, indent=1))
    out["report"] = "\n".join(lines)
    return out


@contextlib.contextmanager
def open_run(experiment: Experiment, workdir: str) -> Iterator[Run]:
  """The way into a run: checks the devices against the batch sizes, holds ``workdir`` (its
  lock and saved configuration, :func:`~.workdir.open_workdir`), handles SIGTERM / SIGINT,
  loads the data and restores the newest readable checkpoint (or the initial state), then
  yields the :class:`Run`. On exit the checkpoints are closed and the signal handlers and
  the lock released.

  Raises:
    ValueError, RunError: as :func:`train_and_evaluate`, before anything is trained.
  """
  config = experiment.config.train
  devices = parallel.mesh_devices(config.num_devices)
  config.check_devices(len(devices))
  with open_workdir(workdir, experiment.config) as wd, Signals() as signals:
    run = Run(experiment, wd, devices, signals)
    try:
      run.restore()
      yield run
    finally:
      run.ckpt.close()


def train_and_evaluate(experiment: Experiment, workdir: str, max_steps: int | None = None,
                       interim: bool = False) -> dict:
  """Trains and evaluates ``experiment`` in ``workdir``; resumes from its last checkpoint.

  Args:
    experiment: what to train (:class:`~.experiment.Experiment`); its ``config.train`` is the
      :class:`~hmlstm_jax.training.TrainConfig`.
    workdir: checkpoints, TensorBoard events, ``config.json``, ``results.json``, figures.
    max_steps: stop (with a checkpoint) after this many steps in this call, as a preemption
      would; ``None`` trains to the end.
    interim: train nothing; report on the best checkpoint so far into ``interim.json``
      (status ``'interim'``): the figures of a run stopped before its end.

  Returns:
    A dict with ``status`` ('done' or 'preempted'), ``step``, ``train_losses`` (this call's
    per-step losses), and when done ``valid`` / ``test`` results, ``best_step`` and what the
    experiment's report adds.

  Raises:
    ValueError: a setting that cannot work (before anything is written).
    RunError: the workdir is in use or holds another configuration, data or a checkpoint
      cannot be read or written, or (:class:`NonFiniteError`) the run diverged; the last good
      checkpoint is left as it was.
    Preempted: a stop request during the final report.
  """
  with open_run(experiment, workdir) as run:
    if interim:
      run.signals.make_urgent()
      return {"status": "interim", "step": run.step, "train_losses": [],
              **run.final_report("interim.json")}
    run.workdir.write_config()
    writer = metrics.Writer(run.workdir.path)
    try:
      status = run.train(writer, max_steps)
    finally:
      writer.close()
    result = {"status": status, "step": run.step, "train_losses": run.losses}
    if status == "done":
      run.signals.make_urgent()
      result.update(run.final_report())
    return result
