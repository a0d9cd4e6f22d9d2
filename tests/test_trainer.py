"""The trainer on an experiment it has never heard of: a linear regression defined only here.

Proof that ``hmlstm_jax.training`` knows no character LM, and unit tests of the trainer's
parts (settings, workdir, checkpoints) that do not need a model.
"""
import asyncio
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hmlstm_jax import settings
from hmlstm_jax import training
from hmlstm_jax.settings import nested
from hmlstm_jax.settings import setting
from hmlstm_jax.training import workdir as workdir_lib

TRUE_W = np.array([1.5, -2.0, 0.5, 3.0], np.float32)


@dataclasses.dataclass(frozen=True)
class RegressionConfig:
  rows: int = setting(512, "Examples per split.")
  noise: float = setting(0.05, "Label noise.")
  train: training.TrainConfig = nested(training.TrainConfig)


class Split:
  """Batches of (x, y) with y = x·w + noise, rows leading."""

  def __init__(self, seed, n, batch, noise, hosts):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ TRUE_W + noise * rng.normal(size=n)).astype(np.float32)
    per_host = batch // hosts.count
    self.x = x.reshape(-1, batch, 4)[:, hosts.index * per_host:(hosts.index + 1) * per_host]
    self.y = y.reshape(-1, batch)[:, hosts.index * per_host:(hosts.index + 1) * per_host]

  def __len__(self):
    return len(self.x)

  def __getitem__(self, k):
    return {"x": self.x[k], "y": self.y[k]}


class Regression(training.Experiment):
  """Least squares; no carried state, no schedule, its own metric in the loss's aux."""

  def load_data(self, hosts):
    c, t = self.config, self.config.train
    return training.Data(
        train=Split(0, c.rows, t.batch_size, c.noise, hosts),
        evals={"validation": Split(1, c.rows // 4, t.eval_batch_size, c.noise, hosts),
               "test": Split(2, c.rows // 4, t.eval_batch_size, c.noise, hosts)},
        description="regression", items_per_batch=t.batch_size, item_name="examples")

  def init_params(self, key):
    return {"w": jax.random.normal(key, (4,)) * 0.1}

  def loss(self, params, carry, batch, schedule, key):
    err = batch["x"] @ params["w"] - batch["y"]
    return jnp.mean(err ** 2), (carry, {"mean_abs_err": jnp.mean(jnp.abs(err))})

  def eval_sums(self, params, carry, batch, schedule):
    err = batch["x"] @ params["w"] - batch["y"]
    return carry, {"sq": jnp.sum(err ** 2), "n": jnp.float32(err.size)}

  def summarize(self, sums):
    return {"loss": float(sums["sq"] / sums["n"])}

  def report(self, params, schedule, workdir):
    return {"w": np.asarray(params["w"]).tolist()}, [f"w = {np.round(params['w'], 2)}"]


def regression(**changes):
  config = settings.replace(RegressionConfig(), batch_size=8, eval_batch_size=8,
                            learning_rate=0.05, num_epochs=4, eval_every=16, log_every=8,
                            checkpoint_every=16, num_devices=2)
  return Regression(settings.replace(config, **changes))


def test_a_model_the_trainer_never_saw_trains_and_reports(tmp_path, capsys):
  result = training.train_and_evaluate(regression(), str(tmp_path / "run"))
  assert result["status"] == "done" and result["step"] == 4 * 64
  assert result["test"]["loss"] < 0.01  # noise² = 0.0025
  np.testing.assert_allclose(result["w"], TRUE_W, atol=0.05)
  out = capsys.readouterr().out
  assert "training regression, 256 steps, 2 device(s)" in out
  assert "examples/s" in out and "w = [" in out and "test: loss " in out
  losses = result["train_losses"]
  assert len(losses) == 256 and losses[-1] < losses[0] / 50


class Scheduled(Regression):
  """The regression with a schedule of its own (a pytree: the loss's weight, 0 for the first
  32 steps, and the step), its own optimiser (plain SGD, no plateau) and its own names of the
  evaluation splits."""

  def load_data(self, hosts):
    data = super().load_data(hosts)
    return dataclasses.replace(data, evals={"dev": data.evals["validation"],
                                            "heldout": data.evals["test"]}, validation="dev")

  def schedule(self, step, epoch):
    return {"weight": np.float32(step >= 32), "step": np.int32(step)}

  def schedule_scalars(self, schedule):
    return {"weight": float(schedule["weight"])}

  def optimizer(self):
    return training.Optimizer(optax.sgd(0.1))

  def loss(self, params, carry, batch, schedule, key):
    loss, aux = super().loss(params, carry, batch, schedule, key)
    return schedule["weight"] * loss, aux


def test_a_toy_experiment_trains_with_its_own_schedule_optimiser_and_splits(tmp_path, capsys):
  result = training.train_and_evaluate(Scheduled(regression().config), str(tmp_path / "run"))
  losses = result["train_losses"]
  assert losses[:32] == [0.0] * 32 and 0 < losses[32] and losses[-1] < 0.01
  assert {"dev", "heldout"} <= set(result) and "validation" not in result
  assert result["heldout"]["loss"] < 0.01
  out = capsys.readouterr().out
  assert "weight 0.00" in out and "weight 1.00" in out and " lr " not in out
  assert "step 16 dev: loss" in out and "heldout: loss" in out
  split = Split(1, 8, 8, 0.1, training.Hosts(0, 1))
  with pytest.raises(ValueError, match=r"may not be named \['history'\]"):
    training.Data(train=split, evals={"history": split}, description="", items_per_batch=1,
                  validation="history")
  with pytest.raises(ValueError, match="validation split 'dev' is not among"):
    training.Data(train=split, evals={"test": split}, description="", items_per_batch=1,
                  validation="dev")


def test_open_run_gives_the_parts_and_the_experiments_optimiser_is_applied(tmp_path):
  """Through the public entry: 33 steps of the toy experiment leave w = w0 − 0.1·∇ of step 32's
  batch (SGD at 0.1, the first 32 steps weighted 0), and the checkpoint records the schedule
  of the step it resumes at."""
  from hmlstm_jax.training import metrics
  with training.open_run(Scheduled(regression().config), str(tmp_path / "run")) as run:
    w0 = run.mapped.fetch(run.state.params)["w"]
    assert run.train(metrics.Writer(str(tmp_path / "tb")), max_steps=33) == "preempted"
    w = run.mapped.fetch(run.state.params)["w"]
    meta = run.ckpt.restore(33, run.abstract)[1]
  batch = run.data.train[32]
  grad = 2 * batch["x"].T @ (batch["x"] @ w0 - batch["y"]) / len(batch["y"])
  np.testing.assert_allclose(w, w0 - 0.1 * grad, rtol=1e-5)
  assert meta["schedule"] == {"weight": 1.0, "step": 33} and meta["step"] == 33  # the next step's


def test_the_regression_resumes_exactly(tmp_path):
  straight = training.train_and_evaluate(regression(), str(tmp_path / "a"), max_steps=40)
  first = training.train_and_evaluate(regression(), str(tmp_path / "b"), max_steps=23)
  second = training.train_and_evaluate(regression(), str(tmp_path / "b"), max_steps=17)
  assert second["step"] == 40
  np.testing.assert_array_equal(first["train_losses"] + second["train_losses"], straight["train_losses"])


# ----------------------------------------------------------------------------- settings


def test_flags_come_from_the_configs_and_build_them_back():
  fv = flags.FlagValues()
  settings.define_flags(RegressionConfig, fv)
  assert {"rows", "noise", "learning_rate", "batch_size", "num_epochs"} <= set(fv)
  assert fv["learning_rate"].help == dataclasses.fields(training.TrainConfig)[2].metadata["help"]
  fv(["prog", "--rows=64", "--learning_rate=0.5", "--num_devices=2"])
  config = settings.from_flags(RegressionConfig, fv)
  assert config.rows == 64 and config.train.learning_rate == 0.5 and config.train.num_devices == 2
  assert config.train.batch_size == training.TrainConfig().batch_size


def test_an_invalid_value_fails_when_the_config_is_built():
  with pytest.raises(ValueError, match=r"Factor must be in the range \(0, 1\)"):
    training.TrainConfig(lr_decay_factor=1.0)
  with pytest.raises(ValueError, match="clip_norm must be positive"):
    settings.replace(RegressionConfig(), clip_norm=0.0)
  with pytest.raises(ValueError, match="unknown settings"):
    settings.replace(RegressionConfig(), leraning_rate=0.1)


def test_a_setting_declared_twice_is_refused():
  @dataclasses.dataclass(frozen=True)
  class Twice:
    seed: int = setting(0, "again")
    train: training.TrainConfig = nested(training.TrainConfig)

  with pytest.raises(ValueError, match="'seed' is declared twice"):
    settings.define_flags(Twice, flags.FlagValues())


def test_differences_ignore_changeable_settings():
  saved = settings.flat(RegressionConfig())
  wanted = settings.flat(settings.replace(RegressionConfig(), num_epochs=9.0, noise=0.5, log_every=3))
  assert settings.differences(RegressionConfig, saved, wanted) == ["noise: 0.05 → 0.5"]


def test_differences_accept_a_setting_added_later_at_its_default():
  """A workdir saved before a setting existed resumes when that setting is at its default
  (the run's behaviour), and not when it is asked with another value."""
  saved = settings.flat(RegressionConfig())
  del saved["noise"]
  assert settings.differences(RegressionConfig, saved, settings.flat(RegressionConfig())) == []
  wanted = settings.flat(settings.replace(RegressionConfig(), noise=0.5))
  assert settings.differences(RegressionConfig, saved, wanted) == ["noise: (not set) → 0.5"]


def test_the_trainer_knows_no_slope():
  """The slope is the HM-LSTM experiments' schedule (issue 22): no file of the trainer names it."""
  here = os.path.join(os.path.dirname(__file__), "..", "hmlstm_jax", "training")
  for name in sorted(os.listdir(here)):
    if name.endswith(".py"):
      with open(os.path.join(here, name)) as f:
        assert "slope" not in f.read().lower(), name


# ----------------------------------------------------------------------------- the workdir


def test_a_second_run_on_a_held_workdir_is_refused(tmp_path):
  path = str(tmp_path / "w")
  with workdir_lib.open_workdir(path, regression().config):
    with pytest.raises(training.RunError, match="is in use by a running job"):
      training.train_and_evaluate(regression(), path)
  # released: the same workdir works again
  assert training.train_and_evaluate(regression(), path, max_steps=2)["step"] == 2


def test_deleting_the_lock_file_does_not_free_a_held_workdir(tmp_path):
  """Issue 20, item 7: with .lock deleted a second run started and removed the first one's
  temporary checkpoint. The workdir itself is locked too."""
  path = str(tmp_path / "w")
  with workdir_lib.open_workdir(path, regression().config):
    os.remove(os.path.join(path, workdir_lib.LOCK))
    with pytest.raises(training.RunError, match="is in use by a running job \\(another process; "
                                                "its .lock file was deleted\\)"):
      training.train_and_evaluate(regression(), path)
  assert training.train_and_evaluate(regression(), path, max_steps=2)["step"] == 2


def test_a_killed_holder_does_not_leave_the_lock_stuck(tmp_path):
  path = str(tmp_path / "w")
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      from hmlstm_jax.training import workdir
      from test_trainer import regression
      with workdir.open_workdir({path!r}, regression().config):
        print("held", flush=True)
        time.sleep(120)
      """)], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(training.RunError, match=r"in use by a running job \(pid"):
      with workdir_lib.open_workdir(path, regression().config):
        pass
    holder.kill()
    holder.wait(timeout=30)
    with workdir_lib.open_workdir(path, regression().config):
      pass
  finally:
    holder.kill()


def test_resuming_with_other_settings_names_them_and_touches_nothing(tmp_path):
  path = str(tmp_path / "w")
  training.train_and_evaluate(regression(), path, max_steps=16)
  before = {name: open(os.path.join(path, name), "rb").read() for name in ("config.json",)}
  steps_before = sorted(os.listdir(os.path.join(path, "checkpoints")))
  with pytest.raises(training.RunError, match=r"other settings \(noise: 0\.05 → 0\.2; "
                                              r"learning_rate: 0\.05 → 0\.1\)"):
    training.train_and_evaluate(regression(noise=0.2, learning_rate=0.1), path)
  assert open(os.path.join(path, "config.json"), "rb").read() == before["config.json"]
  assert sorted(os.listdir(os.path.join(path, "checkpoints"))) == steps_before
  # changeable settings may differ: more epochs, another cadence
  resumed = training.train_and_evaluate(regression(num_epochs=0.5, log_every=4), path)
  assert resumed["status"] == "done" and resumed["step"] == 32


def test_a_workdir_that_is_a_file_or_unwritable_is_one_clear_error(tmp_path):
  afile = tmp_path / "file"
  afile.write_text("x")
  with pytest.raises(training.RunError, match="is a file, not a directory"):
    training.train_and_evaluate(regression(), str(afile))
  with pytest.raises(training.RunError, match="cannot use --workdir .*choose a writable"):
    training.train_and_evaluate(regression(), str(afile / "sub"))
  with pytest.raises(training.RunError, match="cannot use --workdir /proc/"):
    training.train_and_evaluate(regression(), "/proc/hmlstm_jax_test")


def test_a_failure_before_any_output_leaves_no_workdir(tmp_path):
  class NoData(Regression):
    def load_data(self, hosts):
      raise ValueError("no such corpus")

  with pytest.raises(ValueError, match="no such corpus"):
    training.train_and_evaluate(NoData(regression().config), str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")


# ----------------------------------------------------------------------------- faults

from hmlstm_jax.training import checkpoints  # noqa: E402
from hmlstm_jax.training import steps  # noqa: E402


def test_a_killed_writes_temporary_checkpoint_is_gone_when_the_checkpointer_returns(tmp_path):
  """CI met Orbax's clean-up thread (which nothing waited for) logging a traceback when a run
  stopped by a bad setting removed its workdir under it: the clean-up now finishes first."""
  leftover = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1764880000" / "state"
  leftover.mkdir(parents=True)
  for i in range(2000):  # enough files that removing them takes a while
    (leftover / f"part{i}").write_bytes(b"half-written")
  before = set(threading.enumerate())
  ckpt = checkpoints.Checkpointer(str(tmp_path), 3)
  try:
    assert [t.name for t in threading.enumerate() if t not in before] == []
    assert os.listdir(tmp_path / "checkpoints") == [] and ckpt.steps() == []
  finally:
    ckpt.close()


class _Killed(BaseException):
  """Stands for SIGKILL at a chosen point: nothing after it runs, nothing catches it."""


class Worsening(Regression):
  """Validation gets worse as training goes on: the best step is the first validation's."""

  def summarize(self, sums):
    return {"loss": -float(sums["sq"] / sums["n"])}


def test_a_kill_right_after_any_checkpoint_write_resumes_to_the_same_results(tmp_path, monkeypatch):
  """Fault 1: a kill between writing a checkpoint and anything after it (the old loop wrote
  'latest' and 'best' separately) must leave a checkpoint and its best together."""
  worsening = lambda **kw: Worsening(regression(checkpoint_every=8, **kw).config)
  straight = training.train_and_evaluate(worsening(), str(tmp_path / "straight"))
  assert straight["best_step"] == 16  # the first validation; 3 newer checkpoints exist
  real_save = checkpoints.Checkpointer.save
  for kill_at in (8, 16, 48):  # before any validation (no best yet), at a new best, later
    path = str(tmp_path / f"killed{kill_at}")

    def save_then_die(self, step, state, meta):
      real_save(self, step, state, meta)
      if step == kill_at:
        raise _Killed()

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_die)
    with pytest.raises(_Killed):
      training.train_and_evaluate(worsening(), path)
    monkeypatch.setattr(checkpoints.Checkpointer, "save", real_save)
    resumed = training.train_and_evaluate(worsening(), path)
    assert resumed["best_step"] == straight["best_step"]
    assert resumed["test"] == straight["test"]


def test_the_stopping_rule_ends_a_run_at_the_plateau_after_its_cuts_and_resumes_to_it(tmp_path):
  """max_lr_cuts (decisions.md §4): validation worsens after step 16 (the best), so the plateau
  (patience 1) cuts the learning rate at 32; with one cut allowed the run ends at the next
  plateau, 48, not at 256. Its figures are on disk after every validation (progress.json);
  a rerun goes straight to the same report; a raised max_lr_cuts continues to the next one."""
  path = str(tmp_path / "run")
  worsening = lambda **kw: Worsening(regression(**kw).config)
  ended = training.train_and_evaluate(worsening(max_lr_cuts=1), path)
  assert ended["status"] == "done" and ended["steps"] == 48 and ended["best_step"] == 16
  assert ended["ended"] == "stopping rule" and ended["lr_cuts"] == 2
  assert [h["lr_cuts"] for h in ended["history"]] == [0, 1, 2]
  assert ended["train_s"] > 0 and ended["device"].startswith("2 x cpu (")
  with open(os.path.join(path, "progress.json")) as f:
    progress = json.load(f)
  assert (progress["step"], progress["best_step"], progress["lr_cuts"]) == (48, 16, 2)
  assert progress["ended"] == "stopping rule" and len(progress["history"]) == 3
  again = training.train_and_evaluate(worsening(max_lr_cuts=1), path)
  assert again["steps"] == 48 and again["train_losses"] == [] and again["test"] == ended["test"]
  more = training.train_and_evaluate(worsening(max_lr_cuts=2), path)
  assert more["steps"] == 64 and more["lr_cuts"] == 3 and len(more["train_losses"]) == 16
  assert training.train_and_evaluate(worsening(max_lr_cuts=0),
                                     str(tmp_path / "zero"))["steps"] == 32
  unruled = training.train_and_evaluate(worsening(num_epochs=1), str(tmp_path / "none"))
  assert unruled["steps"] == 64 and unruled["ended"] == "num_epochs" and unruled["lr_cuts"] == 3
  with pytest.raises(ValueError, match="max_lr_cuts needs an optimiser that cuts"):
    training.train_and_evaluate(Scheduled(regression(max_lr_cuts=1).config), str(tmp_path / "s"))
  with pytest.raises(ValueError, match="max_lr_cuts must not be negative"):
    regression(max_lr_cuts=-1)


def _abandon_a_failed_read(message):
  """An asyncio task fails with ``message`` and nobody retrieves it (as Orbax leaves the other
  reads of a checkpoint when one fails); collecting it makes asyncio report it."""
  loop = asyncio.new_event_loop()

  async def read():
    raise ValueError(message)

  task = loop.create_task(read())
  loop.run_until_complete(asyncio.wait([task]))  # waits without retrieving the exception
  loop.close()
  del task
  gc.collect()


def test_unretrieved_read_failures_of_a_checkpoint_moved_aside_are_not_reported(
    tmp_path, caplog, monkeypatch):
  """Issue 20, item 3, as CI met it: a "Task exception was never retrieved" traceback of the
  moved checkpoint's reads reached stderr when the task was collected after the restore."""
  monkeypatch.setattr(checkpoints._HUSH, "paths", set())
  moved, other = (os.path.join(tmp_path, "checkpoints", s, "") for s in ("47", "470"))
  caplog.set_level(logging.ERROR, logger="asyncio")
  _abandon_a_failed_read(f"NOT_FOUND: metadata in {moved}state/ does not exist")
  assert any("never retrieved" in r.getMessage() for r in caplog.records)  # asyncio reports it
  checkpoints._hush_unretrieved(moved)
  caplog.clear()
  _abandon_a_failed_read(f"NOT_FOUND: metadata in {moved}state/ does not exist")
  # asyncio's records only: a thread of an earlier test on this worker may log under another
  # name meanwhile, as one did on CI
  reported = lambda: [r for r in caplog.records if r.name == "asyncio"]
  assert reported() == []
  _abandon_a_failed_read(f"NOT_FOUND: metadata in {other}state/ does not exist")
  assert len(reported()) == 1  # another checkpoint's failure is still reported


def _poison_from(step_index, poison):
  real = steps.train_step

  def step(state, *args, **kwargs):
    new_state, out = real(state, *args, **kwargs)
    bad = state.step >= step_index
    return poison(new_state, out, bad)

  return step


def test_an_update_that_diverges_never_reaches_a_checkpoint(tmp_path, monkeypatch):
  """Fault 2: the update of the step from state 5 sends the parameters to 1e30 (finite); the
  loss of the next step is inf. The old loop checkpointed state 6 as good (its check read the
  loss computed before the update), and every resume failed there."""
  path = str(tmp_path / "w")
  blow_up = lambda s, out, bad: (s.replace(params=jax.tree_util.tree_map(
      lambda p: jnp.where(bad, 1e30, p), s.params)), out)
  monkeypatch.setattr(steps, "train_step", _poison_from(5, blow_up))
  with pytest.raises(training.NonFiniteError, match="parameters after step 6 give a non-finite "
                                                    "loss .* last good checkpoint, step 5"):
    training.train_and_evaluate(regression(checkpoint_every=1), path)
  monkeypatch.undo()
  ckpt = checkpoints.Checkpointer(path, 3)
  assert ckpt.steps()[-1] == 5
  resumed = training.train_and_evaluate(regression(checkpoint_every=1), path, max_steps=3)
  assert resumed["step"] == 8 and all(np.isfinite(resumed["train_losses"]))


def test_a_non_finite_loss_names_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  path = str(tmp_path / "w")
  nan_loss = lambda s, out, bad: (s, dict(out, loss=jnp.where(bad, jnp.nan, out["loss"])))
  monkeypatch.setattr(steps, "train_step", _poison_from(10, nan_loss))
  with pytest.raises(training.NonFiniteError,
                     match=r"loss \(nan\) or gradient norm .* in step 11 \(steps 9-12 read back "
                           r"now\); the last good checkpoint, step 8"):
    training.train_and_evaluate(regression(checkpoint_every=8, log_every=4, eval_every=1000), path)
  assert checkpoints.Checkpointer(path, 3).steps() == [8]


def test_a_checkpoint_record_edited_by_hand_is_one_error_naming_the_field(tmp_path):
  """Issue 32: a best_step of "../../x" in a checkpoint's JSON record was used in a path."""
  path = str(tmp_path / "w")
  training.train_and_evaluate(regression(checkpoint_every=8), path, max_steps=32)
  record = os.path.join(path, "checkpoints", "32", "meta", "metadata")
  original = json.load(open(record))
  for field, value, words in (("best_step", "../../x", "best_step '../../x' is not one of"),
                              ("best_step", 999, "best_step 999 is not one of"),
                              ("lr_cuts", -1, "lr_cuts -1 is not a count"),
                              ("history", {}, "train_s or history has the wrong type")):
    with open(record, "w") as f:
      json.dump(dict(original, **{field: value}), f)
    with pytest.raises(training.RunError, match=f"the record of checkpoint 32 in .*: {words}"):
      training.train_and_evaluate(regression(checkpoint_every=8), path, max_steps=8)
  with open(record, "w") as f:
    json.dump(original, f)
  assert training.train_and_evaluate(regression(checkpoint_every=8), path, max_steps=8)["step"] == 40


def _garble(step_dir):
  for root, _, names in os.walk(step_dir):
    for name in names:
      with open(os.path.join(root, name), "r+b") as f:
        size = f.seek(0, 2)
        f.truncate(size // 2)
        f.seek(0)
        f.write(b"\x00garbage")


def test_an_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
  """Fault 3: a truncated latest checkpoint gave a 148-line Orbax traceback."""
  path = str(tmp_path / "w")
  config = dict(checkpoint_every=8, eval_every=1000)
  straight = training.train_and_evaluate(regression(**config), str(tmp_path / "s"), max_steps=32)
  training.train_and_evaluate(regression(**config), path, max_steps=32)
  _garble(os.path.join(path, "checkpoints", "32"))
  capsys.readouterr()
  resumed = training.train_and_evaluate(regression(**config), path, max_steps=8)
  out = capsys.readouterr().out
  assert f"warning: checkpoint 32 in {path}/checkpoints cannot be read" in out
  assert "resuming from step 24" in out and "resumed from" in out
  assert resumed["step"] == 32
  np.testing.assert_array_equal(resumed["train_losses"], straight["train_losses"][24:])
  assert os.listdir(os.path.join(path, "checkpoints_unreadable"))[0].startswith("32-")
  # nothing readable at all: one line, and nothing is moved
  for step in checkpoints.Checkpointer(path, 3).steps():
    _garble(os.path.join(path, "checkpoints", str(step)))
  with pytest.raises(training.RunError, match="no checkpoint in .* can be read"):
    training.train_and_evaluate(regression(**config), path)
  assert checkpoints.Checkpointer(path, 3).steps() == [16, 24, 32]
