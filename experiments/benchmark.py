r"""Training-step throughput: the HM-LSTM character LM against a Flax LSTM stack.

    python -m experiments.benchmark              # PTB and Text8 shapes (minutes on a CPU)
    python -m experiments.benchmark --quick      # a small shape, seconds (what the tests run)
    python -m experiments.benchmark --shapes=ptb --json_out=bench.json
    python -m experiments.benchmark --mode=profile --shapes=ptb   # where the step's time goes
    python -m experiments.benchmark --mode=loop --shapes=ptb   # the trainer's loop vs the bare step

Both models are timed in one process with the same jitted step: forward, backward, global-norm
clipping and an Adam update, on the same embedding (V → 128) and softmax. Reported per model:
median and minimum step time after warm-up, tokens/s, compile time, the analytic matmul FLOPs
of one step, the GFLOP/s they imply and their fraction of the machine's rate (a 4096³ float32
matmul, timed in the same run), peak memory of the compiled program, the number of matmuls
(``dot``) issued per iteration of each ``while`` loop (forward scan and backward scan) of the
compiled program and, in brackets, the longest chain of dependent ones among them. Beside
them, the machine's matmul rate at the shapes of the recurrence, the HM-LSTM / LSTM time
ratio, and the dependent layer-steps of each schedule. The row ``hm-autod`` is the same
HM-LSTM differentiated by plain autodiff of the scan, to show what the custom backward buys;
``hm-2ph`` runs the two-phase schedule (:mod:`hmlstm_jax.schedule`); ``--models`` adds
``hm-u2`` / ``hm-u4`` (``--scan_unroll`` 2 and 4: fewer loop iterations, for GPUs).

``--mode=profile`` shows where each model's step time goes: XLA's per-instruction events from
JAX's profiler, summed by category (matmul, element-wise, copy / transpose, dynamic slice,
loop control) for the forward loops, the backward loops and the rest, and each of these
regions' wall time (:mod:`experiments.hlo`).

``--mode=loop`` measures what the trainer costs: the character LM at the shape, trained by the
trainer's own loop (:meth:`hmlstm_jax.training.Run.train`: batches from the corpus,
the slope schedule, metrics read back at every progress line, TensorBoard scalars) against the
same mapped step called back to back on one batch already on the devices, in alternating
rounds in one process. Validation and checkpoints are outside the timed rounds (their cost is
set by their cadence flags).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from experiments import generation
from experiments import profiling
import hmlstm_jax as hm
from hmlstm_jax import files
from hmlstm_jax import schedule
from hmlstm_jax import training
from hmlstm_jax.charlm import experiment as charlm


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark shape: the paper's PTB and Text8 settings, or a quick one."""
  name: str
  batch: int
  steps: int             # characters per segment (truncated-BPTT length)
  layer_sizes: tuple[int, ...]
  output_size: int       # HM-LSTM output embedding
  vocab: int
  embed: int = 128


SHAPES = {
    "ptb": Shape("ptb", batch=64, steps=100, layer_sizes=(512, 512, 512), output_size=512, vocab=50),
    "text8": Shape("text8", batch=128, steps=100, layer_sizes=(1024, 1024, 1024), output_size=2048, vocab=27),
    "quick": Shape("quick", batch=8, steps=20, layer_sizes=(32, 32, 32), output_size=32, vocab=20, embed=16),
}


#: Side of the square float32 matmul whose rate stands for the machine's (4096³: 137 GFLOP).
LARGE_MATMUL = 4096

# ----------------------------------------------------------------------------- FLOP counts


def hmlstm_flops_per_token(shape: Shape) -> int:
  """Forward matmul FLOPs per character of the HM-LSTM LM (Eq. 5-7, 11-12, softmax).

  Every layer computes its full pre-activation at every step (COPY is a masked select, not a
  skipped computation), so the count does not depend on the boundaries.
  """
  sizes, L = shape.layer_sizes, len(shape.layer_sizes)
  flops = 0
  for l, d in enumerate(sizes):
    rows = 4 * d + (1 if l < L - 1 else 0)
    d_below = shape.embed if l == 0 else sizes[l - 1]
    d_above = sizes[l + 1] if l < L - 1 else 0
    flops += 2 * (d_below + d + d_above) * rows
  total = sum(sizes)
  flops += 2 * total * L + 2 * total * shape.output_size   # Eq. 11 gates, Eq. 12 output embedding
  flops += 2 * shape.output_size * shape.vocab             # softmax
  return flops


def lstm_flops_per_token(shape: Shape) -> int:
  """Forward matmul FLOPs per character of the LSTM stack (input and recurrent kernels, softmax)."""
  flops, d_in = 0, shape.embed
  for d in shape.layer_sizes:
    flops += 2 * (d_in + d) * 4 * d
    d_in = d
  return flops + 2 * d_in * shape.vocab


def train_step_flops(flops_per_token: int, shape: Shape) -> int:
  """Forward + backward (twice the forward: input and weight gradients) for one batch."""
  return 3 * flops_per_token * shape.batch * shape.steps


# ----------------------------------------------------------------------------- the two models


class LSTMStack(nn.Module):
  """The baseline a user would otherwise pick: Embed → nn.RNN(OptimizedLSTMCell) × L → Dense."""
  vocab: int
  embed: int
  layer_sizes: tuple[int, ...]
  dtype: str | None = None

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.embed)(tokens)
    for d in self.layer_sizes:
      x = nn.RNN(nn.OptimizedLSTMCell(d, dtype=self.dtype))(x)
    return nn.Dense(self.vocab)(x).astype(jnp.float32)


def _clipped_adam():
  """The paper's clipping and Adam (the trainer's default optimiser) at lr 1e-3."""
  return training.TrainConfig(learning_rate=1e-3).optimizer().transform


def _nll(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_hmlstm_step(shape: Shape, layer_norm: bool = False, matmul_dtype: str | None = None,
                     fast_backward: bool = True, schedule: str = "layers",
                     scan_unroll: int = 1):
  """(init_args, jitted step) for the HM-LSTM LM; the step returns (params, opt_state, state, loss).

  ``fast_backward=False`` differentiates the plain scan with autodiff (weight gradients
  accumulated inside the reverse scan), to measure what the custom backward buys;
  ``scan_unroll``: time steps per iteration of the forward and backward scans.
  """
  config = generation.lm_config(shape, layer_norm=layer_norm, dtype=matmul_dtype,
                                schedule=schedule, scan_unroll=scan_unroll)
  opt = _clipped_adam()
  params = hm.init_charlm(jax.random.key(0), config)

  def train_step(params, opt_state, state, inputs, targets, slope):
    (loss, outs), grads = jax.value_and_grad(hm.charlm_loss, has_aux=True)(
        params, state, inputs, targets, slope, config=config, fast_backward=fast_backward)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jax.lax.stop_gradient(outs.final_state), loss

  args = (params, opt.init(params), hm.initial_state(config.rnn, shape.batch))
  return args, jax.jit(train_step, donate_argnums=(0, 1, 2))


def make_lstm_step(shape: Shape, dtype: str | None = None):
  """(init_args, jitted step) for the Flax LSTM stack, same signature as the HM-LSTM's."""
  model = LSTMStack(shape.vocab, shape.embed, shape.layer_sizes, dtype)
  opt = _clipped_adam()
  params = model.init(jax.random.key(0), jnp.zeros((shape.batch, shape.steps), jnp.int32))

  def train_step(params, opt_state, state, inputs, targets, slope):
    del slope
    loss, grads = jax.value_and_grad(lambda p: _nll(model.apply(p, inputs), targets))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, loss

  return (params, opt.init(params), ()), jax.jit(train_step, donate_argnums=(0, 1))


def cudnn_unavailable(dtype: str | None = None) -> str | None:
  """Why JAX's cuDNN LSTM cannot be timed here, or ``None`` when it can."""
  if jax.devices()[0].platform != "gpu":
    return f"cuDNN's LSTM needs an NVIDIA GPU (this device: {jax.devices()[0].platform})"
  if dtype is not None:
    return "jax.experimental.rnn.lstm has no bfloat16 (float32 only)"
  return None


def make_cudnn_step(shape: Shape, dtype: str | None = None):
  """(init_args, jitted step) for JAX's cuDNN LSTM (``jax.experimental.rnn.lstm``, the
  vendor's fused kernel: the anchor on GPU) with the Flax stack's embedding and softmax."""
  reason = cudnn_unavailable(dtype)
  if reason:
    raise RuntimeError(reason)
  from jax.experimental import rnn  # pylint: disable=import-outside-toplevel
  d, L = shape.layer_sizes[0], len(shape.layer_sizes)
  if any(size != d for size in shape.layer_sizes):
    raise ValueError(f"cuDNN's LSTM has one width for every layer, got {shape.layer_sizes}")
  k_e, k_w, k_d = jax.random.split(jax.random.key(0), 3)
  params = {"embed": jax.random.normal(k_e, (shape.vocab, shape.embed)),
            "lstm": rnn.init_lstm_weight(k_w, shape.embed, d, L, False),
            "W": jax.random.normal(k_d, (d, shape.vocab)) / d ** 0.5,
            "b": jnp.zeros((shape.vocab,))}
  opt = _clipped_adam()

  def loss_fn(p, inputs, targets):
    zeros = jnp.zeros((L, inputs.shape[0], d))
    lengths = jnp.full((inputs.shape[0],), inputs.shape[1], jnp.int32)
    y, _, _ = rnn.lstm(p["embed"][inputs], zeros, zeros, p["lstm"], lengths,
                       input_size=shape.embed, hidden_size=d, num_layers=L, dropout=0.0,
                       bidirectional=False)
    return _nll(y @ p["W"] + p["b"], targets)

  def train_step(params, opt_state, state, inputs, targets, slope):
    del slope
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, loss

  return (params, opt.init(params), ()), jax.jit(train_step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- measurement


def matmul_rate(m: int, k: int, n: int, repeats: int = 20) -> float:
  """GFLOP/s of this machine for an (m, k) @ (k, n) float32 matmul, chained inside one jit."""
  a = jax.random.normal(jax.random.key(0), (m, k))
  w = jax.random.normal(jax.random.key(1), (k, n)) / k
  proj = jax.random.normal(jax.random.key(2), (n, k)) / n

  @jax.jit
  def chain(a):
    def body(_, x):
      return jnp.tanh((x @ w) @ proj)  # keeps the shapes and a data dependence between steps
    return jax.lax.fori_loop(0, repeats, body, a)

  chain(a).block_until_ready()
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    chain(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * (2 * m * k * n) * repeats / min(times) / 1e9


def _peak_bytes(memory) -> int:
  """Peak memory of a compiled program: XLA's figure, or arguments + outputs + temporaries."""
  peak = getattr(memory, "peak_memory_in_bytes", 0)
  return peak or (memory.argument_size_in_bytes + memory.output_size_in_bytes
                  + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


class _Compiled:
  """One model's train step compiled at a shape, on one batch, carrying its own state."""

  def __init__(self, make: Callable, shape: Shape):
    (params, opt_state, state), step = make(shape)
    tokens = jax.random.randint(jax.random.key(1), (shape.batch, shape.steps + 1), 0, shape.vocab)
    self.batch = (tokens[:, :-1], tokens[:, 1:], jnp.float32(1.0))
    self.carry = (params, opt_state, state)
    t0 = time.perf_counter()
    self.compiled = step.lower(*self.carry, *self.batch).compile()
    self.compile_s = time.perf_counter() - t0

  def step(self) -> jax.Array:
    """Runs one step to completion, keeps its new state; returns the loss."""
    *carry, loss = self.compiled(*self.carry, *self.batch)
    loss.block_until_ready()
    self.carry = tuple(carry)
    return loss


def time_steps(makes: dict[str, Callable], shape: Shape, warmup: int, iters: int) -> dict:
  """Compiles every model's train step, then times them in alternation: each round runs
  every model once, so that the machine's drift (these machines are shared) falls on all
  of them alike. Returns each model's figures."""
  models = {}
  for name, make in makes.items():
    run = _Compiled(make, shape)
    memory = run.compiled.memory_analysis()
    text = run.compiled.as_text()
    models[name] = {"run": run, "times": [], "figures": {
        "compile_s": run.compile_s,
        "peak_memory_mb": _peak_bytes(memory) / 2**20,
        "temp_memory_mb": memory.temp_size_in_bytes / 2**20,
        "loop_matmuls_per_step": profiling.loop_matmul_counts(text),
        "loop_matmul_chain": profiling.loop_matmul_depths(text)}}
  for i in range(warmup + iters):
    for model in models.values():
      t0 = time.perf_counter()
      loss = model["run"].step()
      if i >= warmup:
        model["times"].append(time.perf_counter() - t0)
      if not jnp.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} in the benchmark step")
  results = {}
  for name, model in models.items():
    median = statistics.median(model["times"])
    results[name] = {"median_s": median, "min_s": min(model["times"]),
                     "tokens_per_s": shape.batch * shape.steps / median, **model["figures"]}
  return results


def time_models(shape: Shape, models: Sequence[str], warmup: int, iters: int,
                layer_norm: bool = False, dtype: str | None = None) -> dict:
  """:func:`time_steps` of the ``models`` of :data:`TRAIN_MODELS` at ``shape``."""
  return time_steps({m: lambda s, m=m: TRAIN_MODELS[m][2](s, layer_norm, dtype) for m in models},
                    shape, warmup, iters)


#: The training steps :func:`run` can time: name -> (label in the table, whether it is an
#: HM-LSTM, maker(shape, layer_norm, dtype)).
TRAIN_MODELS = {
    "hmlstm": ("hmlstm", True, lambda s, ln, dt: make_hmlstm_step(s, ln, dt)),
    "hmlstm_autodiff": ("hm-autod", True,
                        lambda s, ln, dt: make_hmlstm_step(s, ln, dt, fast_backward=False)),
    "hmlstm_two_phase": ("hm-2ph", True,
                         lambda s, ln, dt: make_hmlstm_step(s, ln, dt, schedule="two_phase")),
    **{f"hmlstm_unroll{k}": (f"hm-u{k}", True,
                             lambda s, ln, dt, k=k: make_hmlstm_step(s, ln, dt, scan_unroll=k))
       for k in (2, 4)},
    "lstm": ("lstm", False, lambda s, ln, dt: make_lstm_step(s, dt)),
    "cudnn_lstm": ("cudnn", False, lambda s, ln, dt: make_cudnn_step(s, dt)),
}
DEFAULT_TRAIN_MODELS = ("hmlstm", "hmlstm_autodiff", "hmlstm_two_phase", "lstm")


def run(shape: Shape, warmup: int = 2, iters: int = 5, layer_norm: bool = False,
        dtype: str | None = None, models: Sequence[str] = DEFAULT_TRAIN_MODELS) -> dict:
  """Times the ``models`` of :data:`TRAIN_MODELS` at ``shape`` in this process, in
  alternation; returns one JSON-able record (``hmlstm`` and ``lstm`` are always among them:
  the ratios are theirs).

  ``dtype='bfloat16'``: the HM-LSTM's matmul operands in bf16 (float32 accumulation and
  element-wise math) and the LSTM cells with ``dtype=bfloat16``. ``cudnn_lstm`` where it
  cannot run (no NVIDIA GPU; bf16) is left out and its reason recorded under ``skipped``.
  """
  models = tuple(dict.fromkeys(("hmlstm", *models, "lstm")))
  skipped = {}
  if "cudnn_lstm" in models and cudnn_unavailable(dtype):
    skipped["cudnn_lstm"] = cudnn_unavailable(dtype)
    models = tuple(m for m in models if m != "cudnn_lstm")
  hm_flops = train_step_flops(hmlstm_flops_per_token(shape), shape)
  lstm_flops = train_step_flops(lstm_flops_per_token(shape), shape)
  timed = time_models(shape, models, warmup, iters, layer_norm, dtype)
  for name, res in timed.items():
    flops = hm_flops if TRAIN_MODELS[name][1] else lstm_flops
    res.update(step_gflop=flops / 1e9, achieved_gflops=flops / res["median_s"] / 1e9)
  d, L = shape.layer_sizes, len(shape.layer_sizes)
  middle = 1 if L > 2 else 0
  fused_k = d[middle - 1 if middle else 0] + d[middle] + (d[middle + 1] if middle < L - 1 else 0)
  large = LARGE_MATMUL if shape.name != "quick" else 256
  rates = {
      f"{large}^3 (the machine)": matmul_rate(large, large, large, repeats=1),
      f"{shape.batch}x{fused_k}@{fused_k}x{4 * d[middle] + 1} (fused step)":
          matmul_rate(shape.batch, fused_k, 4 * d[middle] + 1),
      f"{shape.batch * shape.steps}x{d[0]}@{d[0]}x{4 * d[0] + 1} (all steps)":
          matmul_rate(shape.batch * shape.steps, d[0], 4 * d[0] + 1, repeats=4),
  }
  machine = next(iter(rates.values()))
  for res in timed.values():
    res["fraction_of_machine"] = res["achieved_gflops"] / machine
  lstm_s = timed["lstm"]["median_s"]
  return {
      "shape": dataclasses.asdict(shape),
      "layer_norm": layer_norm,
      "dtype": dtype or "float32",
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.local_device_count()}",
      **timed,
      "models": list(timed),
      "skipped": skipped,
      "flop_ratio": hm_flops / lstm_flops,
      "time_ratio": timed["hmlstm"]["median_s"] / lstm_s,
      **({"two_phase_time_ratio": timed["hmlstm_two_phase"]["median_s"] / lstm_s}
         if "hmlstm_two_phase" in timed else {}),
      "critical_path": {s: schedule.critical_path(s, L, shape.steps) for s in schedule.SCHEDULES},
      "machine_matmul_gflops": rates,
  }


def profile_models(shape: Shape, runs: int = 3, layer_norm: bool = False,
                   dtype: str | None = None) -> dict:
  """Where each model's step time goes at ``shape`` (:func:`profiling.profile`), in this process."""
  record = {"shape": dataclasses.asdict(shape), "layer_norm": layer_norm,
            "dtype": dtype or "float32",
            "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"}
  for name, make in (("hmlstm", lambda s: make_hmlstm_step(s, layer_norm, dtype)),
                     ("lstm", lambda s: make_lstm_step(s, dtype))):
    run = _Compiled(make, shape)
    run.step()  # warm-up, outside the trace
    record[name] = profiling.profile(run.step, run.compiled.as_text(), runs)
  return record


def format_profiles(record: dict) -> str:
  """Both models' breakdowns (:func:`profiling.format_profile`), one above the other."""
  return "\n\n".join(profiling.format_profile(f"{record['shape']['name']} {model}", record[model])
                      for model in ("hmlstm", "lstm"))


def format_table(records: Sequence[dict]) -> str:
  """A plain-text table of :func:`run` records."""
  head = (f"{'shape':<7}{'model':<9}{'median s':>10}{'min s':>9}{'tok/s':>10}{'compile s':>11}"
          f"{'GFLOP':>9}{'GFLOP/s':>9}{'machine':>8}{'peak MB':>9}  loop matmuls/step (chain)")
  lines = [head, "-" * len(head)]
  for r in records:
    for model in r.get("models", DEFAULT_TRAIN_MODELS):
      m = r[model]
      lines.append(
          f"{r['shape']['name']:<7}{TRAIN_MODELS[model][0]:<9}{m['median_s']:>10.4f}{m['min_s']:>9.4f}"
          f"{m['tokens_per_s']:>10.0f}{m['compile_s']:>11.1f}{m['step_gflop']:>9.2f}"
          f"{m['achieved_gflops']:>9.1f}{m['fraction_of_machine']:>8.0%}{m['peak_memory_mb']:>9.1f}"
          f"  {m['loop_matmuls_per_step']} ({m['loop_matmul_chain']})")
    for model, reason in r.get("skipped", {}).items():
      lines.append(f"{r['shape']['name']:<7}{TRAIN_MODELS[model][0]:<9}  not timed: {reason}")
    rates = ", ".join(f"{k}: {v:.1f}" for k, v in r["machine_matmul_gflops"].items())
    paths = ", ".join(f"{k} {v}" for k, v in r["critical_path"].items())
    two_phase = (f" (two-phase {r['two_phase_time_ratio']:.2f}x)" if "two_phase_time_ratio" in r
                 else "")
    lines.append(f"{'':<7}{r['dtype']}, layer norm {r['layer_norm']}. HM-LSTM / LSTM: time "
                 f"{r['time_ratio']:.2f}x{two_phase}, FLOPs {r['flop_ratio']:.2f}x; "
                 f"dependent layer-steps: {paths}; machine matmul GFLOP/s {rates}")
  lines.append(f"device: {records[0]['device']}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- the trainer's loop


class _ProgressClock:
  """Stands in for the trainer's TensorBoard writer: notes when each progress line's scalars
  arrive, i.e. when the metrics of every step up to then have been read back."""

  def __init__(self):
    self.times: dict[int, float] = {}

  def scalars(self, step: int, values: dict) -> None:
    del values
    self.times[step] = time.perf_counter()

  def close(self) -> None:
    pass


def loop_config(shape: Shape, num_steps: int, log_every: int, layer_norm: bool = False,
                dtype: str | None = None) -> charlm.Config:
  """A synthetic-corpus character LM at ``shape`` with room for ``num_steps`` training steps,
  progress every ``log_every`` steps, and no validation or checkpoint of its own accord."""
  chars = (num_steps + 2) * shape.batch * shape.steps
  return charlm.Config(
      dataset="synthetic", synthetic_chars=chars, seq_len=shape.steps, figure_chars=0,
      num_samples=0,
      model=hm.CharLMConfig(layer_sizes=shape.layer_sizes, output_size=shape.output_size,
                            embed_size=shape.embed, layer_norm=layer_norm, matmul_dtype=dtype),
      train=training.TrainConfig(batch_size=shape.batch, eval_batch_size=shape.batch, log_every=log_every,
                        eval_every=10**9, checkpoint_every=10**9))


def time_trainer_loop(shape: Shape, rounds: int = 3, round_steps: int = 10, log_every: int = 5,
                      layer_norm: bool = False, dtype: str | None = None) -> dict:
  """Tokens/s of the trainer's loop and of the bare mapped step at ``shape``, in one process.

  One warm-up round of each (compilation, the probe and the checkpoint write the loop does
  when it stops), then ``rounds`` alternating rounds of ``round_steps`` steps: the bare step
  (one batch placed on the devices once, the step dispatched back to back, timed to the
  last result) and the trainer's loop (:meth:`~hmlstm_jax.training.Run.train` for
  ``round_steps`` steps, timed from the call to the arrival of its last progress line's
  scalars, so the checkpoint it writes on stopping is not counted).
  """
  if round_steps % log_every:
    raise ValueError(f"round_steps ({round_steps}) must be a multiple of log_every ({log_every})")
  config = loop_config(shape, (rounds + 1) * round_steps + 1, log_every, layer_norm, dtype)
  with tempfile.TemporaryDirectory() as tmp, \
      training.open_run(charlm.CharLM(config), os.path.join(tmp, "run")) as run:
    clock = _ProgressClock()
    bare_state = run.mapped.put_state(run.template)
    placed = run.mapped.place(run.data.train[1])
    schedule = run.schedule(0)

    def bare() -> float:
      nonlocal bare_state
      t0 = time.perf_counter()
      for _ in range(round_steps):
        bare_state, out = run.mapped.train_placed(bare_state, placed, schedule, False)
      jax.block_until_ready((bare_state, out))
      return time.perf_counter() - t0

    def loop() -> float:
      with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own progress lines
        t0 = time.perf_counter()
        status = run.train(clock, max_steps=round_steps)
      if status != "preempted" or run.signals.requested:
        raise RuntimeError("the trainer's loop stopped before the round's last step")
      return clock.times[run.step] - t0

    tokens = round_steps * shape.batch * shape.steps
    bare(), loop()   # warm-up
    bare_s, loop_s = [], []
    for r in range(rounds):
      bare_s.append(bare())
      loop_s.append(loop())
      print(f"  round {r + 1}/{rounds}: bare step {tokens / bare_s[-1]:.0f} tok/s, trainer loop "
            f"{tokens / loop_s[-1]:.0f} tok/s", flush=True)
  ratios = [b / l for b, l in zip(bare_s, loop_s)]
  return {
      "shape": dataclasses.asdict(shape),
      "layer_norm": layer_norm,
      "dtype": dtype or "float32",
      "device": f"{run.devices[0].platform}:{run.devices[0].device_kind} x{len(run.devices)}",
      "vocab": run.experiment.model.vocab_size,
      "rounds": rounds, "round_steps": round_steps, "log_every": log_every,
      "bare_tokens_per_s": [tokens / t for t in bare_s],
      "loop_tokens_per_s": [tokens / t for t in loop_s],
      "loop_over_bare": statistics.median(ratios),
  }


def format_loop(record: dict) -> str:
  """One line per :func:`time_trainer_loop` record."""
  bare, loop = (statistics.median(record[k]) for k in ("bare_tokens_per_s", "loop_tokens_per_s"))
  return (f"{record['shape']['name']}: bare step {bare:.0f} tok/s, trainer loop {loop:.0f} tok/s, "
          f"loop/bare {record['loop_over_bare']:.3f} (median of {record['rounds']} alternating "
          f"rounds of {record['round_steps']} steps, a progress line every "
          f"{record['log_every']}; {record['dtype']}, layer norm {record['layer_norm']}, "
          f"vocabulary {record['vocab']}; {record['device']})")


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags; defined only when it runs, so that importing this module (the tests,
  other binaries) adds nothing to the global flag registry."""
  flags.DEFINE_enum("mode", "models", ["models", "profile", "loop", "generate"],
                    "models: the HM-LSTM and LSTM steps; profile: where each step's time goes "
                    "(JAX's profiler, by category); loop: the trainer's loop against the bare "
                    "step; generate: sampling speed, one character at a time "
                    "(experiments.generation).")
  flags.DEFINE_bool("quick", False, "Run only the small 'quick' shape (seconds; for CI and smoke tests).")
  flags.DEFINE_list("shapes", ["ptb", "text8"], f"Shapes to time, from {sorted(SHAPES)}.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", lower_bound=0)
  flags.DEFINE_integer("iters", 5, "Timed steps per model (the models in alternation); the "
                       "median and minimum are reported.", lower_bound=1)
  flags.DEFINE_integer("profile_runs", 3, "--mode=profile: traced steps per model (averaged).",
                       lower_bound=1)
  flags.DEFINE_integer("rounds", 3, "--mode=loop: alternating rounds of each.",
                       lower_bound=1)
  flags.DEFINE_integer("round_steps", 10, "--mode=loop: steps per round.", lower_bound=1)
  flags.DEFINE_integer("log_every", 5, "--mode=loop: the trainer's progress-line cadence.",
                       lower_bound=1)
  flags.DEFINE_list("batches", ["1", "8"], "--mode=generate: batch sizes.")
  flags.DEFINE_integer("gen_chars", 500, "--mode=generate: characters per timed run.",
                       lower_bound=1)
  flags.DEFINE_list("compute", [str(c) for c in generation.DEFAULT_COMPUTE],
                    "--mode=generate: the share of (row, step) pairs on which each layer "
                    "computes, reached by setting the detector biases (the first is 1).")
  flags.DEFINE_bool("layer_norm", False, "Time the HM-LSTM with layer normalisation.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Matmul operand dtype of both models (bfloat16: float32 accumulation).")
  flags.DEFINE_string("json_out", None, "Also write the records as JSON to this path (atomically).")
  flags.DEFINE_list("models", list(DEFAULT_TRAIN_MODELS),
                    f"--mode=models: the training steps to time, from {sorted(TRAIN_MODELS)} "
                    "(hmlstm and lstm always: the ratios are theirs; hmlstm_unroll2 / 4: "
                    "lax.scan's unroll, a GPU setting).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO (Orbax's) with -v 0
  names = ["quick"] if FLAGS.quick else FLAGS.shapes
  unknown = [n for n in names if n not in SHAPES]
  if unknown:
    raise app.UsageError(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
  unknown = [m for m in FLAGS.models if m not in TRAIN_MODELS]
  if unknown:
    raise app.UsageError(f"unknown models {unknown}; choose from {sorted(TRAIN_MODELS)}")
  records = []
  dtype = None if FLAGS.dtype == "float32" else FLAGS.dtype
  for name in names:
    print(f"timing {name} ...", flush=True)
    if FLAGS.mode == "loop":
      records.append(time_trainer_loop(SHAPES[name], FLAGS.rounds, FLAGS.round_steps,
                                       FLAGS.log_every, FLAGS.layer_norm, dtype))
    elif FLAGS.mode == "generate":
      records.append(generation.time_generation(
          SHAPES[name], [int(b) for b in FLAGS.batches], FLAGS.gen_chars, FLAGS.rounds,
          [float(c) for c in FLAGS.compute], FLAGS.layer_norm, dtype))
    elif FLAGS.mode == "profile":
      records.append(profile_models(SHAPES[name], FLAGS.profile_runs, FLAGS.layer_norm, dtype))
    else:
      records.append(run(SHAPES[name], FLAGS.warmup, FLAGS.iters, FLAGS.layer_norm, dtype,
                         FLAGS.models))
  formats = {"loop": lambda rs: "\n".join(map(format_loop, rs)),
             "generate": lambda rs: "\n\n".join(map(generation.format_generation, rs)),
             "profile": lambda rs: "\n\n".join(map(format_profiles, rs)), "models": format_table}
  print(formats[FLAGS.mode](records))
  text = json.dumps(records, indent=1)
  print(text)
  if FLAGS.json_out:
    files.write_atomically(FLAGS.json_out, text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
