r"""The paper's Penn Treebank rows (Table 1), measured by one command.

    python -m experiments.reproduce --choose_settings --manual_dir=../shared/data/ptb_char   # a GPU
    python -m experiments.reproduce --width=cpu --manual_dir=../shared/data/ptb_char    # 2 CPU cores
    python -m experiments.reproduce --width=cpu --budget_s=600 --manual_dir=...         # stops in 10 min

Each row is the character-LM binary (``experiments.charlm``) with the row's flagfile
(``ptb.flags``, ``ptb_lnlstm.flags``, ``ptb_step.flags``, ``ptb_sample.flags``,
``ptb_soft.flags``, in that order), trained under the paper's stopping rule (the flagfiles'
``--max_lr_cuts=1``, decisions.md §4) in its own workdir ``<workdir>/<row>``: a rerun skips
finished rows and resumes the others from their checkpoints. ``--concurrency`` runs share the
device (on a CPU each gets one core's thread). After ``--budget_s`` seconds no run starts;
``--stop_s`` seconds before it the running ones are sent SIGTERM (they checkpoint at the next
step and exit 75), and one still running at the budget is killed (its last checkpoint stays).

The table (``<workdir>/table.md``, every figure in ``table.json``) is rewritten whenever a
run validates or ends, so a stop at any point leaves numbers: test and validation BPC (the
best validation's checkpoint; while a run trains, its best validation so far), best step and
epoch, steps, epochs and wall time, how the run ended, the device, each layer's compute share
(UPDATE or FLUSH) and the F1 of z¹ and z² against word ends (at the separator and one step
later). ``--width=cpu`` is the paper's recipe at reduced width (3 × 128 HM-LSTM against the
LayerNorm LSTM of equal parameters, 3 × 149), never the paper's rows. ``--interim_reports``
(no training) evaluates the best checkpoint so far of every row stopped before its end on
validation and test (``interim.json``, the boundary figure, samples): the table then gives
that test BPC, marked "so far". ``--row_flag`` adds a flag to every row's command, e.g. the
speed settings the device report chose on a GPU (``--row_flag=--scan_unroll=4``; a setting
that may not change on resume, such as ``--matmul_dtype``, is refused by a row already begun).
"""
from __future__ import annotations

import time

START = time.time()  # the budget counts from here, before the imports of JAX (seconds)

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
import signal
import subprocess
import sys
from typing import Sequence

from absl import app
from absl import flags

from experiments import children
from hmlstm_jax import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Row:
  name: str        # also the flagfile's stem and the workdir's name
  what: str
  paper_bpc: float  # Table 1's test BPC
  lstm: bool = False


TABLES = {"ptb": (
    Row("ptb", "LayerNorm HM-LSTM, step function + slope annealing", 1.24),
    Row("ptb_lnlstm", "LayerNorm LSTM (baseline)", 1.29, lstm=True),
    Row("ptb_step", "LayerNorm HM-LSTM, step function", 1.25),
    Row("ptb_sample", "LayerNorm HM-LSTM, sampled boundaries", 1.27),
    Row("ptb_soft", "LayerNorm HM-LSTM, soft boundaries", 1.27),
)}

#: Flags on top of each row's flagfile, per width: (HM-LSTM rows, LSTM row). ``cpu``: 3 × 128
#: against the LSTM of equal parameters (589,748 and 593,503 with PTB's 50 symbols), validated
#: twice an epoch (783 steps) so that the stopping rule can act within hours; ``quick``: a
#: smoke test of this command (tiny models, a few hundred steps).
WIDTHS = {
    "paper": ((), ()),
    "cpu": (("--layer_sizes=128,128,128", "--output_size=128", "--eval_every=392"),
            ("--layer_sizes=149,149,149", "--output_size=128", "--eval_every=392")),
    "quick": (("--layer_sizes=8,8,8", "--output_size=8", "--embed_size=8", "--batch_size=8",
               "--eval_batch_size=64", "--eval_every=20", "--eval_max_segments=4",
               "--checkpoint_every=20", "--log_every=10", "--num_epochs=0.04",
               "--num_samples=1", "--sample_chars=20"),) * 2,
}

#: ``--choose_settings``: the HM-LSTM rows' speed settings it times (each computes the same
#: numbers, up to float rounding: float32 only, since bfloat16 would change them) and their
#: flags; and the timed shape per width: (units per layer, output, embedding, batch, steps).
CANDIDATES = {"hmlstm": (), "hmlstm_two_phase": ("--schedule=two_phase",),
              "hmlstm_unroll2": ("--scan_unroll=2",), "hmlstm_unroll4": ("--scan_unroll=4",)}
TIMED_SHAPES = {"paper": (512, 512, 128, 64, 100), "cpu": (128, 128, 128, 64, 100),
                "quick": (8, 8, 8, 8, 20)}
SETTINGS = "settings.json"

FLAGS = flags.FLAGS
flags.DEFINE_enum("table", "ptb", list(TABLES), "Which table of the paper to fill.")
flags.DEFINE_list("rows", None, "Rows to run, in this order (default: all of the table's).")
flags.DEFINE_enum("width", "paper", list(WIDTHS),
                  "paper: the flagfiles as written (3 x 512; an accelerator); cpu: the "
                  "paper's recipe at 3 x 128 (2 CPU cores, hours); quick: a smoke test.")
flags.DEFINE_string("workdir", None, "Where the runs and the table go "
                    "(default workdirs/reproduce/<table>_<width>).")
flags.DEFINE_string("manual_dir", None, "Directory holding simple-examples.tgz "
                    "(e.g. ../shared/data/ptb_char).")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default ~/tensorflow_datasets).")
flags.DEFINE_multi_string("row_flag", [], "A flag added to every row's command, e.g. "
                          "--row_flag=--scan_unroll=4 (repeat for several).")
flags.DEFINE_bool("choose_settings", False, "Before the first run in this workdir, time the "
                  "HM-LSTM step at the rows' shape in each speed setting (the plain scan, "
                  "--schedule=two_phase, --scan_unroll=2 and 4; the same numbers) and give the "
                  "HM-LSTM rows the fastest's flags; recorded in <workdir>/settings.json, which "
                  "later calls reuse. For a GPU (about a minute there).")
flags.DEFINE_integer("concurrency", 2, "Runs at once on the one device.", lower_bound=1)
flags.DEFINE_float("budget_s", None, "Seconds after which no run starts and the running ones "
                   "have stopped (checkpointed); default: no limit.", lower_bound=1)
flags.DEFINE_float("stop_s", 90, "Seconds before the budget at which running ones are asked "
                   "to stop (one step, a validation in progress and a checkpoint must fit).",
                   lower_bound=0)
flags.DEFINE_float("poll_s", 5, "Seconds between looks at the runs.", lower_bound=0.1)
flags.DEFINE_bool("interim_reports", False, "Train nothing: for every row stopped before its "
                  "end, evaluate its best checkpoint so far on validation and test (its "
                  "interim.json, figure and samples), and fill the table with those numbers, "
                  "marked 'so far'. A later call without it trains on.")


# --------------------------------------------------------------------------- the table


def _bpc(nll: float) -> float:
  return nll / 0.6931471805599453


def figures(workdir: str) -> dict:
  """One run's figures from its files: ``results.json`` when it finished, else the best
  validation so far from ``progress.json`` (rewritten by the trainer at every validation)."""
  config = children.read_json(os.path.join(workdir, "config.json")) or {}
  out = {"units": config.get("layer_sizes")}
  results = children.read_json(os.path.join(workdir, "results.json"),
                               needs=("test", "validation", "best_step", "steps"))
  if results is not None:
    spe = results.get("steps_per_epoch") or 1
    out.update(finished=True, test_bpc=results["test"]["bpc"],
               valid_bpc=results["validation"]["bpc"], best_step=results["best_step"],
               best_epoch=results["best_step"] / spe, steps=results["steps"],
               epochs=results["steps"] / spe, train_s=results.get("train_s"),
               device=results.get("device"), ended=results.get("ended"),
               parameters=results.get("parameters"))
    out.update(_boundaries(results["test"], "test"))
    return out
  progress = children.read_json(os.path.join(workdir, "progress.json"),
                                needs=("step", "epoch", "steps_per_epoch", "history"))
  if progress is None:
    return out
  interim = children.read_json(os.path.join(workdir, "interim.json"),
                               needs=("test", "validation", "best_step"))
  if interim is not None and interim["best_step"] == progress.get("best_step"):
    out.update(test_bpc=interim["test"]["bpc"], interim=True,
               parameters=interim.get("parameters"))  # the best so far, evaluated
  out.update(finished=False, steps=progress["step"], epochs=progress["epoch"],
             train_s=progress.get("train_s"), device=progress.get("device"),
             ended=progress.get("ended"))
  if progress.get("best_step") is not None:  # validated at least once
    best = next((h for h in progress["history"] if h["step"] == progress["best_step"]), {})
    out.update(valid_bpc=_bpc(progress["best"]), best_step=progress["best_step"],
               best_epoch=progress["best_step"] / progress["steps_per_epoch"])
    out.update(_boundaries(best, "validation"))
  return out


def _boundaries(result: dict, split: str) -> dict:
  """Compute share per layer and F1 of z¹, z² against word ends (at, +1), from a final
  result (op counts and P/R/F1 per label) or a history entry (its flat scalars)."""
  if "op_counts" in result:
    compute = [(u + f) / max(c + u + f, 1) for c, u, f in result["op_counts"]]
    f1 = {label: [prf[2] for prf in result["boundaries"][label][:-1]]
          for label in ("word", "word+1")}
  elif "compute1" in result:
    layers = sorted(int(k[len("compute"):]) for k in result if k.startswith("compute"))
    compute = [result[f"compute{l}"] for l in layers]
    f1 = {label: [result[f"f1_z{l}_{label}"] for l in layers[:-1]]
          for label in ("word", "word+1")}
  else:
    return {}
  return {"compute": compute, "f1": f1, "boundaries_from": split}


def _status(row_figures: dict, state: str | None) -> str:
  if row_figures.get("finished"):
    return {"stopping rule": "stopping rule", "num_epochs": "epoch cap (num_epochs)"}.get(
        row_figures.get("ended"), str(row_figures.get("ended")))
  if state:
    return state
  return "stopped; resumes" if "steps" in row_figures else "not started"


def table(rows: list[tuple[Row, dict, str]], width: str) -> str:
  """The table in markdown (see the module docstring)."""
  lines = [
      f"Width: {width}. Test BPC is the best validation's checkpoint's; while a run trains, "
      "its valid BPC is the best so far and the boundary columns are from that validation.",
      "",
      "| row | paper test BPC | our test BPC | valid BPC | units | best step (epoch) | trained "
      "| ended | device | compute per layer | F1 z¹ vs word ends (at, +1) | F1 z² (at, +1) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row, f, status in rows:
    units = " × ".join(map(str, f["units"])) if f.get("units") else "—"
    if "steps" not in f:
      lines.append(f"| {row.name} ({row.what}) | {row.paper_bpc:.2f} | — | — | {units} | — | — "
                   f"| {status} | — | — | — | — |")
      continue
    test = (f"{f['test_bpc']:.3f}" + (" (so far)" if f.get("interim") else "")
            if "test_bpc" in f else "— (training)")
    valid = f"{f['valid_bpc']:.3f}" if "valid_bpc" in f else "—"
    best = f"{f['best_step']} ({f['best_epoch']:.2f})" if "best_step" in f else "—"
    trained = f"{f['steps']} steps, {f['epochs']:.2f} epochs, {(f['train_s'] or 0) / 60:.0f} min"
    compute = " / ".join(f"{c:.0%}" for c in f["compute"]) if "compute" in f else "100% each"
    f1 = ([f"{f['f1']['word'][l]:.2f}, {f['f1']['word+1'][l]:.2f}" for l in range(2)]
          if "f1" in f else ["—", "—"])
    lines.append(
        f"| {row.name} ({row.what}) | {row.paper_bpc:.2f} | {test} | {valid} | "
        f"{units} | {best} | {trained} | {status} | "
        f"{f['device']} | {compute} | {f1[0]} | {f1[1]} |")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the runs


def command(row: Row, workdir: str, chosen: Sequence[str] = ()) -> list[str]:
  """The charlm binary's command line for ``row`` at this width: ``--row_flag``, ``chosen``
  (the speed settings of ``--choose_settings``) for an HM-LSTM row, ``--interim_report`` with
  ``--interim_reports``."""
  extra = WIDTHS[FLAGS.width][1 if row.lstm else 0]
  argv = [sys.executable, "-m", "experiments.charlm", f"--flagfile={row.name}.flags",
          f"--workdir={workdir}", *extra]
  argv += [*FLAGS.row_flag, *(() if row.lstm else chosen)]
  if FLAGS.interim_reports:
    argv.append("--interim_report")
  for name in ("manual_dir", "data_dir"):
    if getattr(FLAGS, name):
      argv.append(f"--{name}={os.path.abspath(getattr(FLAGS, name))}")
  return argv


def choose_settings(workdir: str) -> list[str]:
  """``--choose_settings``: the flags of the fastest of :data:`CANDIDATES`, timed once per
  workdir by the benchmark's training step (layer norm on, as the rows) and recorded in
  ``<workdir>/settings.json``; later calls read them from there, so every call of a workdir
  trains its rows alike."""
  path = os.path.join(workdir, SETTINGS)
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    print(f"settings: {' '.join(record['flags']) or 'the defaults'} (chosen earlier: {path})",
          flush=True)
    return record["flags"]
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import benchmark
  from hmlstm_jax.training import parallel
  units, output, embed, batch, steps = TIMED_SHAPES[FLAGS.width]
  shape = benchmark.Shape(f"ptb_{FLAGS.width}", batch=batch, steps=steps,
                          layer_sizes=(units,) * 3, output_size=output, vocab=50, embed=embed)
  print(f"settings: timing the HM-LSTM step at {batch} x {steps}, 3 x {units} in "
        f"{len(CANDIDATES)} settings ...", flush=True)
  timed = benchmark.time_models(shape, tuple(CANDIDATES), warmup=2, iters=5, layer_norm=True)
  ms = {m: round(timed[m]["median_s"] * 1e3, 3) for m in CANDIDATES}
  best = min(ms, key=ms.get)
  record = {"median_ms": ms, "chosen": best, "flags": list(CANDIDATES[best]),
            "device": parallel.device_name(jax.devices()[:1])}
  files.write_atomically(path, json.dumps(record, indent=1))
  print("settings: " + ", ".join(f"{benchmark.TRAIN_MODELS[m][0]} {t:.1f} ms" for m, t in
                                 ms.items()) + f" per step on {record['device']}; the HM-LSTM "
        f"rows get {' '.join(record['flags']) or 'the defaults'} ({path})", flush=True)
  return record["flags"]


def _environment() -> dict:
  """The children's environment: on a CPU shared by several runs, one thread each (XLA's
  default pool of one thread per core, times the runs, spends the cores on contention)."""
  env = dict(os.environ)
  if FLAGS.concurrency > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several runs on one GPU
  return env


def _last_line(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ""
  return lines[-1] if lines else ""


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = TABLES[FLAGS.table]
  if FLAGS.rows is not None:
    names = [r.name for r in rows]
    unknown = [n for n in FLAGS.rows if n not in names]
    if unknown or not FLAGS.rows:
      raise app.UsageError(f"--rows: unknown {unknown or 'none given'}; choose from "
                           f"{', '.join(names)}")
    rows = tuple(r for n in FLAGS.rows for r in rows if r.name == n)
  bad = [f for f in FLAGS.row_flag if not f.startswith("--")]
  if bad:
    raise app.UsageError(f"--row_flag takes a flag of the rows' binary, e.g. "
                         f"--row_flag=--scan_unroll=4; got {bad}")
  if FLAGS.manual_dir is not None and not os.path.isdir(FLAGS.manual_dir):
    raise app.UsageError(f"--manual_dir={FLAGS.manual_dir} is not a directory; it should hold "
                         "simple-examples.tgz (e.g. ../shared/data/ptb_char)")
  workdir = FLAGS.workdir or os.path.join("workdirs", "reproduce", f"{FLAGS.table}_{FLAGS.width}")
  os.makedirs(workdir, exist_ok=True)
  chosen = choose_settings(workdir) if FLAGS.choose_settings else []
  start, budget = START, FLAGS.budget_s
  state: dict[str, str] = {}           # this call's word on each row, for the table
  running: dict[str, subprocess.Popen] = {}
  pending = [r for r in rows if not figures(os.path.join(workdir, r.name)).get("finished")]
  if FLAGS.interim_reports:  # the rows with a validation to report on
    pending = [r for r in pending if "best_step" in figures(os.path.join(workdir, r.name))]
  stopping, shown = False, None
  interrupted = []
  handlers = {sig: signal.signal(sig, lambda signum, _: interrupted.append(signum))
              for sig in (signal.SIGTERM, signal.SIGINT)}
  print(f"reproduce {FLAGS.table} at width {FLAGS.width}: {len(rows)} rows, "
        f"{len(rows) - len(pending)} finished already; table in {workdir}/table.md", flush=True)
  try:
    while True:
      elapsed = time.time() - start
      late = budget is not None and elapsed >= budget - FLAGS.stop_s
      if (late or interrupted) and not stopping:
        stopping = True
        why = "the budget" if late else "a stop request"
        for name, proc in running.items():
          proc.send_signal(signal.SIGTERM)
          state[name] = f"stopping ({why})"
        for row in pending:
          state[row.name] = f"not started ({why})" if "steps" not in figures(
              os.path.join(workdir, row.name)) else f"stopped; resumes (not restarted: {why})"
        pending = []
      while pending and len(running) < FLAGS.concurrency and not stopping:
        row = pending.pop(0)
        path = os.path.join(workdir, row.name)
        log = open(path + ".log", "a")
        running[row.name] = subprocess.Popen(
            command(row, path, chosen), cwd=ROOT, env=_environment(), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=children.die_with_parent)
        log.close()
        state[row.name] = "training"
        print(f"[{elapsed:.0f} s] {row.name}: started (log {path}.log)", flush=True)
      for name, proc in list(running.items()):
        code = proc.poll()
        if code is None:
          if budget is not None and time.time() - start >= budget - 3:
            proc.kill()  # its last checkpoint stays; the next call resumes from it
            proc.wait()
            code = -signal.SIGKILL
          else:
            continue
        del running[name]
        log = os.path.join(workdir, name + ".log")
        done = "stopped; resumes (interim report)" if FLAGS.interim_reports else None
        if code != 0 and not FLAGS.interim_reports and figures(
            os.path.join(workdir, name)).get("finished"):
          code = 0  # its report was written: a stop that came as it exited ended nothing
        state[name] = {0: done, 75: "stopped; resumes", -signal.SIGKILL:
                       "killed at the budget; resumes from its last checkpoint"}.get(
                           code, f"failed (exit {code}): {_last_line(log)}")
        print(f"[{time.time() - start:.0f} s] {name}: {state[name] or 'finished'}", flush=True)
      table_rows = []
      for row in rows:
        f = figures(os.path.join(workdir, row.name))
        table_rows.append((row, f, _status(f, state.get(row.name))))
      text = table(table_rows, FLAGS.width)
      if text != shown:
        files.write_atomically(os.path.join(workdir, "table.md"), text)
        files.write_atomically(os.path.join(workdir, "table.json"), json.dumps(
            {"table": FLAGS.table, "width": FLAGS.width, "rows": {
                r.name: {"what": r.what, "paper_bpc": r.paper_bpc, "status": s, **f}
                for r, f, s in table_rows}}, indent=1))
        shown = text
      if not running and not pending:
        break
      time.sleep(FLAGS.poll_s)
  finally:
    for proc in running.values():  # an error here: the runs checkpoint and stop
      proc.send_signal(signal.SIGTERM)
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
  print(shown, end="")
  print(f"reproduce: ended {time.time() - start:.1f} s after it started", flush=True)
  failed = [n for n, s in state.items() if s and s.startswith("failed")]
  if failed:
    sys.exit(f"reproduce: {', '.join(failed)} failed; see their logs in {workdir}")
  if interrupted:
    sys.exit(75)


if __name__ == "__main__":
  app.run(main)
