"""The character-LM experiment end to end (training/, experiments/charlm.py) on tiny corpora."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmlstm_jax import training
from hmlstm_jax.training import checkpoints
from hmlstm_jax.training import metrics
from hmlstm_jax.training import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(dataset="synthetic", synthetic_chars=6000, layer_sizes=(12, 12, 12), output_size=12,
            embed_size=8, batch_size=4, seq_len=16, eval_batch_size=4, learning_rate=0.01,
            num_epochs=1.0, eval_every=30, log_every=10, checkpoint_every=20, figure_chars=60,
            num_samples=2, sample_chars=20, slope_rate=1.0, num_devices=1)


def tiny(**overrides) -> training.TrainConfig:
  return training.TrainConfig(**dict(TINY, **overrides))


def _template(config):
  """A state shaped like the tiny runs' checkpoints (28 symbols, 4 rows)."""
  return steps.init_state(jax.random.key(0), config.with_vocab(28), steps.make_optimizer(1.0, 1.0),
                          steps.make_plateau(0.02, 1), rows=4)


def test_end_to_end_run_writes_everything(tmp_path):
  workdir = str(tmp_path / "run")
  result = training.train_and_evaluate(tiny(), workdir)
  assert result["status"] == "done" and result["step"] == 93  # ceil(1 epoch of 93 segments)
  for split in ("valid", "test"):
    r = result[split]
    assert math.isfinite(r["bpc"]) and 0 < r["bpc"] < math.log2(28)
    counts = np.asarray(r["op_counts"])
    assert counts.shape == (3, 3) and counts[0, 0] == 0 and counts[-1, 2] == 0  # no COPY / FLUSH
    assert counts.sum(axis=1).tolist() == [r["chars"]] * 3
    assert set(r["boundaries"]) == {"word", "phrase", "word+1", "phrase+1"}
  assert len(result["train_losses"]) == 93 and all(map(math.isfinite, result["train_losses"]))
  with open(os.path.join(workdir, "boundaries.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["test"]["bpc"] == pytest.approx(result["test"]["bpc"])
  assert json.load(open(os.path.join(workdir, "config.json")))["layer_sizes"] == [12, 12, 12]
  assert len(result["samples"]) == 2 and all(len(s) == 20 for s in result["samples"])
  events = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  scalars = metrics.read_scalars(events[0])
  tags = {tag for _, tag, _ in scalars}
  assert {"train/loss", "train/bpc", "valid/bpc", "slope", "learning_rate"} <= tags
  train_loss = [(s, v) for s, t, v in scalars if t == "train/loss"]
  assert train_loss[0][0] == 10 and train_loss[0][1] == pytest.approx(result["train_losses"][9], rel=1e-6)
  assert os.path.isdir(os.path.join(workdir, "best")) and os.listdir(os.path.join(workdir, "checkpoints"))
  assert not glob.glob(os.path.join(workdir, "**", "*.tmp"), recursive=True)


def test_one_and_two_devices_give_the_same_losses(tmp_path):
  one = training.train_and_evaluate(tiny(num_devices=1), str(tmp_path / "one"), max_steps=8)
  two = training.train_and_evaluate(tiny(num_devices=2), str(tmp_path / "two"), max_steps=8)
  assert one["status"] == two["status"] == "preempted"
  np.testing.assert_allclose(one["train_losses"], two["train_losses"], rtol=1e-5)
  assert len(set(np.round(one["train_losses"], 4))) > 4  # it is really training


@pytest.mark.parametrize("boundary", ["step", "sample"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, boundary):
  config = tiny(boundary=boundary, num_devices=2, eval_every=5, checkpoint_every=100)
  straight = training.train_and_evaluate(config, str(tmp_path / "straight"), max_steps=12)
  first = training.train_and_evaluate(config, str(tmp_path / "resumed"), max_steps=7)
  second = training.train_and_evaluate(config, str(tmp_path / "resumed"), max_steps=5)
  assert first["step"] == 7 and second["step"] == 12
  np.testing.assert_allclose(first["train_losses"] + second["train_losses"], straight["train_losses"],
                             rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """From step 5 on, the step's parameters and loss turn NaN (as a diverging run's would)."""
  workdir = str(tmp_path / "nan")
  config = tiny(checkpoint_every=1, eval_every=1000)
  real_step = steps.train_step

  def diverging_step(state, *args, **kwargs):
    new_state, out = real_step(state, *args, **kwargs)
    bad = state.step >= 5
    poison = lambda x: jnp.where(bad, jnp.nan, x)
    return new_state.replace(params=jax.tree_util.tree_map(poison, new_state.params)), dict(out, loss=poison(out["loss"]))

  monkeypatch.setattr(steps, "train_step", diverging_step)
  with pytest.raises(FloatingPointError, match="non-finite training loss") as err:
    training.train_and_evaluate(config, workdir)
  failed_at = int(str(err.value).split("at step ")[1].split(";")[0])
  assert failed_at == 5
  ckpt = checkpoints.Checkpointer(workdir, 3)
  assert ckpt.latest_step() == failed_at  # the last good step; the bad one was never saved
  template = _template(config)
  state, meta = ckpt.restore(template)
  assert int(state.step) == failed_at and meta["step"] == failed_at
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_bad_settings_fail_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 devices"):
    training.train_and_evaluate(tiny(batch_size=6, num_devices=4), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="shorter than the segment length 5000"):
    training.train_and_evaluate(tiny(seq_len=5000), str(tmp_path / "b"))
  with pytest.raises(ValueError, match="unknown dataset"):
    tiny(dataset="wikitext")
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# ----------------------------------------------------------------------------- the binary


def test_every_flagfile_parses_into_a_valid_config():
  from experiments import charlm
  flagfiles = sorted(glob.glob(os.path.join(charlm.FLAGS_DIR, "*.flags")))
  names = {os.path.basename(p) for p in flagfiles}
  assert {"demo.flags", "ptb.flags", "ptb_step.flags", "ptb_sample.flags", "ptb_soft.flags",
          "ptb_lnlstm.flags", "text8.flags", "text8_nolayernorm.flags", "enwik8.flags",
          "enwik8_nolayernorm.flags"} <= names
  flags = charlm.FLAGS
  for path in flagfiles:
    header = open(path).readline()
    assert header.startswith("# ") and ("BPC" in header or "Demo" in header), path
    flags.unparse_flags()
    flags(["charlm"] + charlm.resolve_flagfiles([f"--flagfile={os.path.basename(path)}"]))
    config = charlm.config_from_flags()
    assert config.dataset in path or "demo" in path
  flags.unparse_flags()
  flags(["charlm"] + charlm.resolve_flagfiles(["--flagfile=ptb.flags", "--batch_size=32"]))
  config = charlm.config_from_flags()
  assert config.batch_size == 32 and config.layer_norm and config.slope_rate == 0.04
  assert config.layer_sizes == (512, 512, 512)
  flags.unparse_flags()


def _binary(workdir, *extra):
  args = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TINY.items()]
  return [sys.executable, "-m", "experiments.charlm", f"--workdir={workdir}", *args, *extra]


def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "term")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.Popen(_binary(workdir, "--num_epochs=50", "--log_every=1"), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("step 3/"):
        proc.send_signal(signal.SIGTERM)
        break
      assert time.time() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  output = "".join(lines) + rest
  assert proc.returncode == 0, output
  assert "stopped at step" in output
  ckpt = checkpoints.Checkpointer(workdir, 3)
  step = ckpt.latest_step()
  assert step is not None and step >= 3
  config = tiny()
  template = _template(config)
  state, meta = ckpt.restore(template)
  assert int(state.step) == step and meta["position"] == step % meta["steps_per_epoch"]


def test_binary_rejects_bad_flags_with_a_message(tmp_path):
  run = lambda *a: subprocess.run(_binary(str(tmp_path / "x"), *a), cwd=ROOT, capture_output=True,
                                  text=True, timeout=120,
                                  env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  bad = run("--dataset=wikitext")
  assert bad.returncode != 0 and "wikitext" in bad.stderr
  indivisible = run("--batch_size=3", "--num_devices=2")
  assert indivisible.returncode == 1 and "not divisible by the 2 devices" in indivisible.stderr
