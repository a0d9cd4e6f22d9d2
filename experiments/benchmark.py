r"""Training-step throughput: the HM-LSTM character LM against a Flax LSTM stack.

    python -m experiments.benchmark              # PTB and Text8 shapes (minutes on a CPU)
    python -m experiments.benchmark --quick      # a small shape, seconds (what the tests run)
    python -m experiments.benchmark --shapes=ptb --json_out=bench.json

Both models are timed in one process with the same jitted step: forward, backward, global-norm
clipping and an Adam update, on the same embedding (V → 128) and softmax. Reported per model:
median and minimum step time after warm-up, tokens/s, compile time, the analytic matmul FLOPs
of one step and the GFLOP/s they imply, peak memory of the compiled program, and the number of
matmuls (``dot``) issued per step inside each ``while`` loop (forward scan and backward
scan) of the compiled program. Beside them, the machine's own matmul rate at the shapes of the
recurrence, and the HM-LSTM / LSTM time ratio. The row ``hm-autod`` is the same HM-LSTM
differentiated by plain autodiff of the scan, to show what the custom backward buys.
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import hmlstm_jax as hm
from hmlstm_jax import files
from hmlstm_jax.training import steps


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


def _nll(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_hmlstm_step(shape: Shape, layer_norm: bool = False, matmul_dtype: str | None = None,
                     fast_backward: bool = True):
  """(init_args, jitted step) for the HM-LSTM LM; the step returns (params, opt_state, state, loss).

  ``fast_backward=False`` differentiates the plain scan with autodiff (weight gradients
  accumulated inside the reverse scan), to measure what the custom backward buys.
  """
  config = hm.CharLMConfig(vocab_size=shape.vocab, layer_sizes=shape.layer_sizes,
                           output_size=shape.output_size, embed_size=shape.embed,
                           layer_norm=layer_norm, matmul_dtype=matmul_dtype)
  opt = steps.make_optimizer(learning_rate=1e-3, clip_norm=1.0)
  params = hm.init_charlm(jax.random.key(0), config)

  def train_step(params, opt_state, state, inputs, targets, slope):
    (loss, outs), grads = jax.value_and_grad(hm.charlm_loss, has_aux=True)(
        params, state, inputs, targets, slope, config=config, fast_backward=fast_backward)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jax.lax.stop_gradient(outs.final_state), loss

  args = (params, opt.init(params), hm.initial_state(config.hmlstm, shape.batch))
  return args, jax.jit(train_step, donate_argnums=(0, 1, 2))


def make_lstm_step(shape: Shape, dtype: str | None = None):
  """(init_args, jitted step) for the Flax LSTM stack, same signature as the HM-LSTM's."""
  model = LSTMStack(shape.vocab, shape.embed, shape.layer_sizes, dtype)
  opt = steps.make_optimizer(learning_rate=1e-3, clip_norm=1.0)
  params = model.init(jax.random.key(0), jnp.zeros((shape.batch, shape.steps), jnp.int32))

  def train_step(params, opt_state, state, inputs, targets, slope):
    del slope
    loss, grads = jax.value_and_grad(lambda p: _nll(model.apply(p, inputs), targets))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, loss

  return (params, opt.init(params), ()), jax.jit(train_step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- measurement


def loop_matmul_counts(hlo_text: str) -> list[int]:
  """Matmuls per iteration of each ``while`` loop in a compiled HLO module, in program order.

  Counts ``dot`` and matmul custom-calls in each loop body, following the computations it
  calls (fusions, nested calls). For a training step the forward scan comes first and the
  backward scan second.
  """
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)  # computations start unindented
    if header:
      current = header.group(1)
      computations[current] = []
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      computations[current].append(line)

  def count(name: str, seen: frozenset = frozenset()) -> int:
    if name in seen or name not in computations:
      return 0
    total = 0
    for line in computations[name]:
      if re.search(r"\s(dot|convolution)\(", line) or re.search(r'custom_call_target="[^"]*(matmul|gemm|dot)', line, re.I):
        total += 1
      for callee in re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line):
        if "while(" in line:
          continue  # nested loops are reported on their own
        total += count(callee, seen | {name})
    return total

  bodies = []
  for name, lines in computations.items():
    for line in lines:
      if " while(" in line:
        body = re.search(r"body=%?([\w.\-]+)", line)
        if body:
          bodies.append(body.group(1))
  return [count(b) for b in bodies]


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


def time_step(make: Callable, shape: Shape, warmup: int, iters: int) -> dict:
  """Compiles and times one model's train step; returns its figures."""
  (params, opt_state, state), step = make(shape)
  key = jax.random.key(1)
  tokens = jax.random.randint(key, (shape.batch, shape.steps + 1), 0, shape.vocab)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  slope = jnp.float32(1.0)
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, state, inputs, targets, slope).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  loops = loop_matmul_counts(compiled.as_text())
  times = []
  for i in range(warmup + iters):
    t0 = time.perf_counter()
    params, opt_state, state, loss = compiled(params, opt_state, state, inputs, targets, slope)
    loss.block_until_ready()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  if not jnp.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} in the benchmark step")
  median = statistics.median(times)
  return {
      "median_s": median,
      "min_s": min(times),
      "tokens_per_s": shape.batch * shape.steps / median,
      "compile_s": compile_s,
      "peak_memory_mb": _peak_bytes(memory) / 2**20,
      "temp_memory_mb": memory.temp_size_in_bytes / 2**20,
      "loop_matmuls_per_step": loops,
  }


def run(shape: Shape, warmup: int = 2, iters: int = 5, layer_norm: bool = False,
        dtype: str | None = None) -> dict:
  """Times both models at ``shape`` in this process; returns one JSON-able record.

  ``dtype='bfloat16'``: the HM-LSTM's matmul operands in bf16 (float32 accumulation and
  element-wise math) and the LSTM cells with ``dtype=bfloat16``.
  """
  hm_flops = train_step_flops(hmlstm_flops_per_token(shape), shape)
  lstm_flops = train_step_flops(lstm_flops_per_token(shape), shape)
  hm_res = time_step(lambda s: make_hmlstm_step(s, layer_norm, dtype), shape, warmup, iters)
  autodiff_res = time_step(lambda s: make_hmlstm_step(s, layer_norm, dtype, fast_backward=False),
                           shape, warmup, iters)
  lstm_res = time_step(lambda s: make_lstm_step(s, dtype), shape, warmup, iters)
  hm_res.update(step_gflop=hm_flops / 1e9, achieved_gflops=hm_flops / hm_res["median_s"] / 1e9)
  autodiff_res.update(step_gflop=hm_flops / 1e9,
                      achieved_gflops=hm_flops / autodiff_res["median_s"] / 1e9)
  lstm_res.update(step_gflop=lstm_flops / 1e9, achieved_gflops=lstm_flops / lstm_res["median_s"] / 1e9)
  d, L = shape.layer_sizes, len(shape.layer_sizes)
  middle = 1 if L > 2 else 0
  fused_k = d[middle - 1 if middle else 0] + d[middle] + (d[middle + 1] if middle < L - 1 else 0)
  return {
      "shape": dataclasses.asdict(shape),
      "layer_norm": layer_norm,
      "dtype": dtype or "float32",
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.local_device_count()}",
      "hmlstm": hm_res,
      "hmlstm_autodiff": autodiff_res,
      "lstm": lstm_res,
      "flop_ratio": hm_flops / lstm_flops,
      "time_ratio": hm_res["median_s"] / lstm_res["median_s"],
      "machine_matmul_gflops": {
          f"{shape.batch}x{fused_k}@{fused_k}x{4 * d[middle] + 1} (fused step)":
              matmul_rate(shape.batch, fused_k, 4 * d[middle] + 1),
          f"{shape.batch * shape.steps}x{d[0]}@{d[0]}x{4 * d[0] + 1} (all steps)":
              matmul_rate(shape.batch * shape.steps, d[0], 4 * d[0] + 1, repeats=4),
      },
  }


def format_table(records: Sequence[dict]) -> str:
  """A plain-text table of :func:`run` records."""
  head = (f"{'shape':<7}{'model':<9}{'median s':>10}{'min s':>9}{'tok/s':>10}{'compile s':>11}"
          f"{'GFLOP':>9}{'GFLOP/s':>9}{'peak MB':>9}  loop matmuls/step")
  lines = [head, "-" * len(head)]
  for r in records:
    for model, label in (("hmlstm", "hmlstm"), ("hmlstm_autodiff", "hm-autod"), ("lstm", "lstm")):
      m = r[model]
      lines.append(
          f"{r['shape']['name']:<7}{label:<9}{m['median_s']:>10.4f}{m['min_s']:>9.4f}"
          f"{m['tokens_per_s']:>10.0f}{m['compile_s']:>11.1f}{m['step_gflop']:>9.2f}"
          f"{m['achieved_gflops']:>9.1f}{m['peak_memory_mb']:>9.1f}  {m['loop_matmuls_per_step']}")
    rates = ", ".join(f"{k}: {v:.1f}" for k, v in r["machine_matmul_gflops"].items())
    lines.append(f"{'':<7}{r['dtype']}, layer norm {r['layer_norm']}. HM-LSTM / LSTM: time {r['time_ratio']:.2f}x, FLOPs {r['flop_ratio']:.2f}x; "
                 f"machine matmul GFLOP/s {rates}")
  lines.append(f"device: {records[0]['device']}")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags; defined only when it runs, so that importing this module (the tests,
  other binaries) adds nothing to the global flag registry."""
  flags.DEFINE_bool("quick", False, "Run only the small 'quick' shape (seconds; for CI and smoke tests).")
  flags.DEFINE_list("shapes", ["ptb", "text8"], f"Shapes to time, from {sorted(SHAPES)}.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_integer("iters", 5, "Timed steps per model; the median and minimum are reported.")
  flags.DEFINE_bool("layer_norm", False, "Time the HM-LSTM with layer normalisation.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Matmul operand dtype of both models (bfloat16: float32 accumulation).")
  flags.DEFINE_string("json_out", None, "Also write the records as JSON to this path (atomically).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  names = ["quick"] if FLAGS.quick else FLAGS.shapes
  unknown = [n for n in names if n not in SHAPES]
  if unknown:
    raise app.UsageError(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
  records = []
  for name in names:
    print(f"timing {name} ...", flush=True)
    dtype = None if FLAGS.dtype == "float32" else FLAGS.dtype
    records.append(run(SHAPES[name], FLAGS.warmup, FLAGS.iters, FLAGS.layer_norm, dtype))
  print(format_table(records))
  text = json.dumps(records, indent=1)
  print(text)
  if FLAGS.json_out:
    files.write_atomically(FLAGS.json_out, text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
