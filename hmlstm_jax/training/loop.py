"""``train_and_evaluate``: the character-LM experiment of §4.1 from a :class:`TrainConfig`.

flagfile → TrainConfig → corpus → truncated-BPTT streams → model init (or the workdir's last
checkpoint) → pmapped train steps → periodic validation (plateau schedule, best checkpoint) →
test evaluation with the best parameters, boundary analysis, figure and samples.

Restarting with the same workdir continues exactly where the run stopped: the step, the data
position (one segment per step), the carried recurrent state of every row, the Adam and
plateau states and the RNG key all come from the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

from absl import logging
import jax
import numpy as np

from hmlstm_jax import analysis
from hmlstm_jax import boundary
from hmlstm_jax import data
from hmlstm_jax.files import write_atomically
from hmlstm_jax import hmlstm
from hmlstm_jax.training import checkpoints
from hmlstm_jax.training import metrics as metrics_lib
from hmlstm_jax.training import parallel
from hmlstm_jax.training import steps
from hmlstm_jax.training.config import TrainConfig


def say(message: str) -> None:
  """A progress line on stdout (process 0 only), also logged."""
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def slope_at(config: TrainConfig, epoch: float) -> float:
  """a = min(max_slope, 1 + slope_rate · epoch) (§3.3); 1 when ``slope_rate`` is 0."""
  return float(boundary.slope_schedule(epoch, config.max_slope, config.slope_rate))


def _to_devices(host_state: steps.TrainState, devices) -> steps.TrainState:
  replicated = parallel.replicate(host_state.replace(rnn_state=()), devices)
  return replicated.replace(rnn_state=parallel.shard_rows(host_state.rnn_state, len(devices)))


def _to_host(state: steps.TrainState) -> steps.TrainState:
  host = parallel.unreplicate(state.replace(rnn_state=()))
  return host.replace(rnn_state=parallel.gather_rows(state.rnn_state))


def evaluate(eval_fn, params, batcher: data.StreamBatcher, model, slope: float, num_devices: int,
             max_segments: int | None = None) -> dict:
  """BPC over the batcher's split (state carried through it), operation counts, boundary F1."""
  rows = batcher.inputs.shape[0]
  state = parallel.shard_rows(hmlstm.initial_state(model.hmlstm, rows), num_devices)
  nll = count = 0.0
  op_counts = None
  bound = {}
  for k in range(min(batcher.num_segments, max_segments or batcher.num_segments)):
    seg = batcher.segment(k)
    state, out = eval_fn(params, state, parallel.shard_rows(seg.inputs, num_devices),
                         parallel.shard_rows(seg.targets, num_devices), slope)
    nll += float(out["nll_sum"][0])
    count += float(out["count"][0])
    if "z" in out:
      op_counts = np.asarray(out["op_counts"][0]) + (0 if op_counts is None else op_counts)
      z = np.concatenate(list(np.asarray(out["z"])), axis=1)  # (L, rows, T)
      for name, c in analysis.boundary_counts(z, seg.labels).items():
        bound[name] = c + bound.get(name, 0)
  result = {"nll": nll / count, "bpc": nll / count / math.log(2), "chars": int(count)}
  if op_counts is not None:
    result["op_counts"] = op_counts.tolist()  # per layer (COPY, UPDATE, FLUSH)
    result["boundaries"] = {name: analysis.precision_recall_f1(c).tolist() for name, c in bound.items()}
  return result


def _summary_lines(name: str, result: dict) -> list[str]:
  lines = [f"{name}: BPC {result['bpc']:.4f} over {result['chars']} characters"]
  if "op_counts" in result:
    counts = np.asarray(result["op_counts"])
    for l, (copy, update, flush) in enumerate(counts):
      lines.append(f"  layer {l + 1}: UPDATE {update:.0f}  COPY {copy:.0f}  FLUSH {flush:.0f}  "
                   f"(computes on {(update + flush) / counts[0].sum():.1%} of steps)")
    for label, prf in result["boundaries"].items():
      for l, (p, r, f) in enumerate(prf[:-1]):
        where = f"{label[:-2]} ends +1 step" if label.endswith("+1") else f"{label} ends"
        lines.append(f"  z{l + 1} vs {where}: precision {p:.3f}  recall {r:.3f}  F1 {f:.3f}")
  return lines


def train_and_evaluate(config: TrainConfig, workdir: str, max_steps: int | None = None) -> dict:
  """Trains and evaluates per ``config`` in ``workdir``; resumes from its last checkpoint.

  Args:
    config: the run.
    workdir: checkpoints, TensorBoard events, ``config.json``, ``results.json``, the figure.
    max_steps: stop (with a checkpoint) after this many steps in this call, as a preemption
      would; ``None`` trains to the end.

  Returns:
    A dict with ``status`` ('done' or 'preempted'), ``step``, ``train_losses`` (this call's
    per-step losses), and when done ``valid`` / ``test`` results and output paths.

  Raises:
    ValueError: a setting that cannot work (before any training).
    FloatingPointError: a non-finite loss; the last good checkpoint is left as it was.
  """
  if jax.process_count() > 1:
    raise NotImplementedError(
        "multi-host training is not implemented yet: the steps are pmapped over this host's "
        "devices only, and checkpoints hold this host's rows; run one process per job")
  devices = parallel.local_devices(config.num_devices)
  config.check_devices(len(devices))
  corpus = data.load(config.dataset, data_dir=config.data_dir, manual_dir=config.manual_dir,
                     synthetic_seed=config.synthetic_seed, synthetic_chars=config.synthetic_chars)
  model = config.with_vocab(corpus.vocab.size)
  try:
    train = data.StreamBatcher(corpus.splits["train"], config.batch_size, config.seq_len,
                               process_index=jax.process_index(), process_count=jax.process_count())
    evals = {split: data.StreamBatcher(corpus.splits[split], config.eval_batch_size, config.seq_len,
                                       labels=analysis.with_next_step(corpus.labels[split]),
                                       drop_remainder=False)
             for split in ("validation", "test")}
  except ValueError as err:
    raise ValueError(f"{config.dataset}: {err}") from err
  steps_per_epoch = train.num_segments
  total_steps = max(1, math.ceil(config.num_epochs * steps_per_epoch))
  os.makedirs(workdir, exist_ok=True)
  write_atomically(os.path.join(workdir, "config.json"), config.to_json())

  optimizer = steps.make_optimizer(config.learning_rate, config.clip_norm)
  plateau = steps.make_plateau(config.lr_decay_factor, config.plateau_patience)
  ckpt = checkpoints.Checkpointer(workdir, config.keep_checkpoints)
  template = steps.init_state(jax.random.key(config.seed), model, optimizer, plateau,
                              rows=train.inputs.shape[0])
  host_state = template
  meta = {"best_valid_nll": None, "history": [], "steps_per_epoch": steps_per_epoch}
  if ckpt.latest_step() is not None:
    host_state, meta = ckpt.restore(template)
    if meta["steps_per_epoch"] != steps_per_epoch:
      raise ValueError(f"the checkpoint in {workdir} was made with {meta['steps_per_epoch']} segments "
                       f"per epoch, this data and batch give {steps_per_epoch}: use a new workdir")
    say(f"resumed from {workdir} at step {int(host_state.step)}")
  state = _to_devices(host_state, devices)
  train_fn = parallel.map_train_step(model, optimizer, devices)
  eval_fn = parallel.map_eval_step(model, devices)
  writer = metrics_lib.SummaryWriter(os.path.join(workdir, "tb")) if jax.process_index() == 0 else None
  tokens_per_step = config.batch_size * config.seq_len
  step = int(host_state.step)
  start_step, losses = step, []

  def save(best: bool = False):
    host = _to_host(state)
    epoch = step / steps_per_epoch
    ckpt.save(step, host, dict(meta, step=step, epoch=epoch, position=step % steps_per_epoch,
                               slope=slope_at(config, epoch)), best=best)

  say(f"training {config.model} on {config.dataset} ({corpus.vocab.size} symbols): "
      f"{steps_per_epoch} segments of {config.batch_size} x {config.seq_len} per epoch, "
      f"{total_steps} steps, {len(devices)} device(s); workdir {workdir}")
  t_log, step_log = time.time(), step
  status = "done"
  with _Preemption() as preemption:
    while step < total_steps:
      position = step % steps_per_epoch
      slope = slope_at(config, step / steps_per_epoch)
      segment = train.segment(position)
      state, out = train_fn(state, parallel.shard_rows(segment.inputs, len(devices)),
                            parallel.shard_rows(segment.targets, len(devices)), np.float32(slope),
                            position == 0)
      loss = float(out["loss"][0])
      if not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite training loss ({loss}) at step {step}; the last good checkpoint in "
            f"{workdir}/checkpoints is untouched. Lower --learning_rate or check the data.")
      step += 1
      losses.append(loss)
      if step % config.log_every == 0 or step == total_steps:
        now = time.time()
        rate = (step - step_log) / max(now - t_log, 1e-9)
        scale = float(np.asarray(state.plateau.scale)[0])
        say(f"step {step}/{total_steps}  epoch {step / steps_per_epoch:.2f}  loss {loss:.4f}  "
            f"BPC {loss / math.log(2):.4f}  {rate * tokens_per_step:.0f} tokens/s  slope {slope:.2f}  "
            f"lr {config.learning_rate * scale:.2g}  "
            f"remaining {metrics_lib.format_duration((total_steps - step) / rate)}")
        if writer:
          writer.scalars(step, {"train/loss": loss, "train/bpc": loss / math.log(2),
                                "train/tokens_per_s": rate * tokens_per_step, "slope": slope,
                                "learning_rate": config.learning_rate * scale,
                                "train/grad_norm": float(out["grad_norm"][0])})
        t_log, step_log = now, step
      improved = False
      if step % config.eval_every == 0 or step == total_steps:
        params = state.params
        valid = evaluate(eval_fn, params, evals["validation"], model, slope, len(devices),
                         config.eval_max_segments)
        host_plateau = parallel.unreplicate(state.plateau)
        _, host_plateau = plateau.update({}, host_plateau, value=valid["nll"])
        state = state.replace(plateau=parallel.replicate(host_plateau, devices))
        improved = meta["best_valid_nll"] is None or valid["nll"] < meta["best_valid_nll"]
        if improved:
          meta["best_valid_nll"] = valid["nll"]
        meta["history"].append({"step": step, "valid_bpc": valid["bpc"]})
        say("\n".join(_summary_lines(f"step {step} validation", valid)))
        if writer:
          writer.scalars(step, {"valid/bpc": valid["bpc"], "valid/nll": valid["nll"]})
      if improved or step % config.checkpoint_every == 0 or step == total_steps:
        save(best=improved)
      if preemption.requested or (max_steps is not None and step - start_step >= max_steps):
        if step < total_steps:
          save()
          status = "preempted"
          say(f"stopped at step {step} with a checkpoint in {workdir}; run again to continue")
          break
  if writer:
    writer.close()
  result = {"status": status, "step": step, "train_losses": losses}
  if status == "done":
    result.update(_final_report(config, model, corpus, ckpt, template, eval_fn, evals, devices, workdir))
  ckpt.close()
  return result


def _final_report(config, model, corpus, ckpt, template, eval_fn, evals, devices, workdir) -> dict:
  """Test (and validation) with the best parameters; figure, samples, results.json."""
  host_state, best_meta = ckpt.restore(template, best=True)
  params = parallel.replicate(host_state.params, devices)
  slope = float(best_meta["slope"])
  results = {split: evaluate(eval_fn, params, evals[split], model, slope, len(devices))
             for split in ("validation", "test")}
  lines = [f"best checkpoint: step {best_meta['step']} (slope {slope:.2f})"]
  for split in ("validation", "test"):
    lines += _summary_lines(split, results[split])
  out = {"valid": results["validation"], "test": results["test"], "best_step": best_meta["step"]}
  if config.model == "hmlstm":
    text_ids = corpus.splits["validation"][:config.figure_chars]
    z, h_norm = analysis.passage(host_state.params, model, text_ids, slope)
    figure = os.path.join(workdir, "boundaries.png")
    analysis.boundary_figure(figure, corpus.vocab.decode(text_ids), z, h_norm,
                             title=f"{config.dataset}: boundaries z and ‖h‖ on validation text")
    out["figure"] = figure
    lines.append(f"figure: {figure}")
  prompt = corpus.splits["validation"][:50]
  samples = analysis.sample(host_state.params, model, prompt, config.sample_chars,
                            jax.random.key(config.seed + 1), config.num_samples, slope)
  out["samples"] = [corpus.vocab.decode(s) for s in samples]
  lines.append(f"samples after {corpus.vocab.decode(prompt)!r}:")
  lines += [f"  {s!r}" for s in out["samples"]]
  say("\n".join(lines))
  write_atomically(os.path.join(workdir, "results.json"), json.dumps(out, indent=1))
  out["report"] = "\n".join(lines)
  return out
