r"""One command for whatever device JAX finds: training and sampling speed, one JSON + a table.

    python -m experiments.device_report                # workdirs/device_report/report.{json,md}
    python -m experiments.device_report --quick        # the small shape only (seconds; the test)
    make device-report

Measures, in this order, each part timed as :mod:`experiments.benchmark` and
:mod:`experiments.generation` do (models in alternation, medians):

1. the training step at the PTB shape in float32, then in bfloat16 (matmul operands): the
   HM-LSTM (both schedules), the Flax LSTM stack and, on an NVIDIA GPU, JAX's cuDNN LSTM
   (``jax.experimental.rnn``, the vendor's fused kernel, float32 only; elsewhere its row
   says why it is missing);
2. sampling at batch 1 and 8 at the PTB shape (:mod:`experiments.generation`: the HM-LSTM
   with and without skipping all-COPY layers at about 100 / 50 / 10% compute, and LSTMs of
   its width and of its parameter count);
3. the training step at the Text8 shape, float32 then bfloat16.

Both files are rewritten after every part, so a report cut short keeps what it measured. A
part that would end after ``--budget_s`` seconds (a Text8 part's time estimated from the PTB
shape's: compile times, and step times scaled by the FLOPs) is left out and named in the
report (on a 2-core CPU the Text8 shape's steps take tens of seconds each).
"""
from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax

from experiments import benchmark
from experiments import generation
from hmlstm_jax import files
from hmlstm_jax.training import parallel

TRAIN = ("hmlstm", "hmlstm_two_phase", "hmlstm_unroll2", "hmlstm_unroll4", "lstm", "cudnn_lstm")
DTYPES = ("float32", "bfloat16")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined only when it runs)."""
  flags.DEFINE_string("out_dir", os.path.join("workdirs", "device_report"),
                      "Where report.json and report.md are written.")
  flags.DEFINE_bool("quick", False, "The small 'quick' shape for every part (seconds).")
  flags.DEFINE_integer("warmup", 1, "Untimed training steps after compilation.", lower_bound=0)
  flags.DEFINE_integer("iters", 3, "Timed training steps per model (in alternation).",
                       lower_bound=1)
  flags.DEFINE_integer("gen_chars", 500, "Characters per timed sampling run.", lower_bound=1)
  flags.DEFINE_integer("budget_s", 450, "No part starts that would end after this many "
                       "seconds (a training part's time is estimated from the PTB shape's).",
                       lower_bound=1)


def machine() -> dict:
  """What the figures were measured on: JAX's devices, the CPU's model and its vector flags."""
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "cpu": parallel.cpu_info()}


def parts(quick: bool) -> list[tuple[str, str, str | None]]:
  """The report's parts in order: (kind, shape name, dtype)."""
  ptb, text8 = ("quick", "quick") if quick else ("ptb", "text8")
  return ([("train", ptb, d) for d in DTYPES] + [("generate", ptb, None)]
          + ([] if quick else [("train", text8, d) for d in DTYPES]))


def markdown(report: dict) -> str:
  """The report as markdown: the machine, then one table per kind of measurement."""
  m = report["machine"]
  lines = [f"# Device report: {m['platform']} {m['device_kind']} ×{m['device_count']}", "",
           f"JAX {m['jax']}; CPU {m['cpu']['model']} ({' '.join(m['cpu']['flags']) or 'no flags read'}); "
           f"{report['date']}; {report['seconds']:.0f} s.", "",
           "## Training step (forward, backward, clipping, Adam)", "",
           "| shape | dtype | model | median s | tokens/s | GFLOP/s | of 4096³ matmul | / LSTM |",
           "|---|---|---|---|---|---|---|---|"]
  for r in report["train"]:
    for model in r["models"]:
      x = r[model]
      lines.append(f"| {r['shape']['name']} | {r['dtype']} | {benchmark.TRAIN_MODELS[model][0]} | "
                   f"{x['median_s']:.4f} | {x['tokens_per_s']:,.0f} | {x['achieved_gflops']:.1f} | "
                   f"{x['fraction_of_machine']:.0%} | {x['median_s'] / r['lstm']['median_s']:.2f} |")
    for model, reason in r["skipped"].items():
      lines.append(f"| {r['shape']['name']} | {r['dtype']} | {benchmark.TRAIN_MODELS[model][0]} | "
                   f"— | — | — | — | not timed: {reason} |")
  lines += ["", "## Sampling, one character at a time", "",
            "| shape | batch | model | characters/s | compute per layer: rows (steps) |",
            "|---|---|---|---|---|"]
  for r in report["generate"]:
    for batch, b in r["batches"].items():
      for name, x in b["models"].items():
        shares = " / ".join(f"{a:.0%} ({s:.0%})" for a, s in zip(x["row_share"], x["step_share"]))
        lines.append(f"| {r['shape']['name']} | {batch} | {name} | {x['chars_per_s']:,.0f} | {shares} |")
      lines.append(f"| | {batch} | skip_speedup {b['skip_speedup']:.2f}× (over lstm "
                   f"{b['skip_over_lstm']:.2f}×); same samples: {b['same_samples']} | | |")
  if report["left_out"]:
    lines += ["", "Left out (over the time budget): " + ", ".join(report["left_out"])]
  return "\n".join(lines) + "\n"


def estimate_s(done: list[dict], shape, dtype: str, warmup: int, iters: int) -> float:
  """Seconds a training part at ``shape`` would take, from a part already measured in the
  same dtype: its compile times, and its step times scaled by the ratio of step FLOPs
  (0 when none was)."""
  for r in done:
    if r["dtype"] == dtype:
      scale = benchmark.train_step_flops(benchmark.hmlstm_flops_per_token(shape), shape) / (
          r["hmlstm"]["step_gflop"] * 1e9)
      return sum(r[m]["compile_s"] + (warmup + iters) * r[m]["median_s"] * scale
                 for m in r["models"])
  return 0.0


def write(report: dict, start: float) -> None:
  """report.json and report.md in ``--out_dir``, each replaced whole (atomically)."""
  report["seconds"] = time.perf_counter() - start
  files.write_atomically(os.path.join(FLAGS.out_dir, "report.json"), json.dumps(report, indent=1))
  files.write_atomically(os.path.join(FLAGS.out_dir, "report.md"), markdown(report))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  start = time.perf_counter()
  report = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "train": [], "generate": [], "left_out": [], "seconds": 0.0}
  print(f"device report on {report['machine']['platform']}:{report['machine']['device_kind']}",
        flush=True)
  for kind, shape_name, dtype in parts(FLAGS.quick):
    label = f"{kind} {shape_name}" + (f" {dtype}" if dtype else "")
    expected = estimate_s(report["train"], benchmark.SHAPES[shape_name], dtype, FLAGS.warmup,
                          FLAGS.iters) if kind == "train" else 0.0
    measured = report["train"] or report["generate"]  # the first part always runs
    if measured and time.perf_counter() - start + expected > FLAGS.budget_s:
      report["left_out"].append(label)
      print(f"  {label}: left out (it would end past --budget_s={FLAGS.budget_s}: about "
            f"{expected:.0f} s more)", flush=True)
      continue
    t0 = time.perf_counter()
    shape = benchmark.SHAPES[shape_name]
    if kind == "train":
      report["train"].append(benchmark.run(
          shape, FLAGS.warmup, FLAGS.iters, dtype=None if dtype == "float32" else dtype,
          models=TRAIN))
    else:
      report["generate"].append(generation.time_generation(
          shape, num_chars=FLAGS.gen_chars if not FLAGS.quick else min(FLAGS.gen_chars, 50)))
    print(f"  {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    write(report, start)
  write(report, start)
  print(markdown(report))
  print(f"wrote {os.path.join(FLAGS.out_dir, 'report.json')} and report.md", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
