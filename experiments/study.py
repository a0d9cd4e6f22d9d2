r"""The small-scale study on real text: does our HM-LSTM learn as well as it can?

    python -m experiments.study                  # every row (29), two seeds (~2.5 hours on 2 CPU cores)
    python -m experiments.study --protocol=long --rows=lnlstm,paper   # 20 epochs a run (~20 min each)
    python -m experiments.study --rows=paper,ln_gain --seeds=0

Each row is the character-LM binary (``experiments.charlm``) with ``study.flags`` (HM-LSTM as
the paper: layer norm, step function, slope annealing, at 3 × 128 units) and one change, on
the ``ptb_study`` corpus: Penn Treebank characters, training on ``ptb.char.test.txt``,
validation and test on the halves of ``ptb.char.valid.txt`` (the files in
``../shared/data/ptb_char``). Every run is a real run in its own workdir
(``<workdir>/<row>_seed<k>``): a rerun of the study skips finished runs and resumes
interrupted ones. The study prints one table (also written to ``<workdir>/study.md``, with
every run's numbers in ``study.json``): parameters, steps, validation and test BPC (mean and
half the spread over the seeds), each layer's compute fraction (UPDATE or FLUSH) and the
F1 of z¹ and z² against word ends (one step later, where a boundary is read).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

from experiments import children

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The boundary-rate penalty of the study's rows (not the paper's): weight 10, z¹'s rate kept
#: in [0.1, 0.25] (word ends are 18% of the characters), z²'s in [0.02, 0.1].
RATE_BAND = ("--rate_weight=10", "--rate_min=0.1,0.02", "--rate_max=0.25,0.1")
#: The same band at weight 1, for the rows whose gradient stays local.
RATE_BAND_1 = ("--rate_weight=1",) + RATE_BAND[1:]

#: (name, what changes, flags on top of study.flags). The first row is the baseline.
ROWS = (
    ("lnlstm", "LayerNorm LSTM baseline, 3 × 150 (about the parameters of the HM-LSTM)",
     ("--model=lstm", "--layer_sizes=150,150,150")),
    ("paper", "HM-LSTM as the paper: layer norm, step, a = min(5, 1 + 0.04 epoch)", ()),
    ("no_ln", "without layer norm", ("--layer_norm=false",)),
    ("sample", "sampled boundaries (Bernoulli)", ("--boundary=sample",)),
    ("soft", "soft boundaries (the hard sigmoid itself)", ("--boundary=soft",)),
    ("fast_slope", "faster slope schedule: a = min(5, 1 + epoch)", ("--slope_rate=1",)),
    ("ln_gain", "layer-norm gains 0.5 at initialisation", ("--ln_gain=0.5",)),
    ("lnlstm_ln_gain", "LayerNorm LSTM baseline, gains 0.5 at initialisation",
     ("--model=lstm", "--layer_sizes=150,150,150", "--ln_gain=0.5")),
    ("rare_boundaries", "boundary rows' bias −1 at initialisation (boundaries start rare)",
     ("--boundary_bias=-1",)),
    ("ln_boundary", "boundary rows layer-normalised too (own gain and bias)",
     ("--ln_boundary=true",)),
    ("top_head", "softmax on the top layer alone (no output module, Eq. 11-12)",
     ("--output_head=top",)),
    ("lnlstm_top_head", "LayerNorm LSTM baseline, softmax on the top layer alone",
     ("--model=lstm", "--layer_sizes=150,150,150", "--output_head=top")),
    ("ln_sum", "layer norm of the gated sum of the three terms, once (not per term)",
     ("--ln_placement=sum",)),
    ("ln_sum_no_cell", "layer norm of the sum, c not normalised", ("--ln_placement=sum",
                                                                   "--ln_cell=false")),
    ("st_linear", "straight-through derivative a/2 everywhere (no cut-off)",
     ("--st_gradient=linear",)),
    ("st_sigmoid", "straight-through derivative of sigmoid(2a x)", ("--st_gradient=sigmoid",)),
    ("rate_band", "boundary-rate penalty (ours): z¹ in [0.1, 0.25], z² in [0.02, 0.1]",
     RATE_BAND),
    ("ln_sum_rate_band", "layer norm of the sum and the boundary-rate penalty",
     ("--ln_placement=sum",) + RATE_BAND),
    ("no_ln_st_linear", "without layer norm, straight-through derivative a/2 everywhere",
     ("--layer_norm=false", "--st_gradient=linear")),
    ("ln_sum_gain", "layer norm of the sum, gains 0.5 at initialisation",
     ("--ln_placement=sum", "--ln_gain=0.5")),
    ("ln_sum_gain_rate_band", "layer norm of the sum, gains 0.5, the boundary-rate penalty",
     ("--ln_placement=sum", "--ln_gain=0.5") + RATE_BAND),
    ("no_ln_rate_band", "without layer norm, the boundary-rate penalty",
     ("--layer_norm=false",) + RATE_BAND),
    ("st_local", "straight-through gradient local to the detector (ours)", ("--st_local=true",)),
    ("ln_sum_local", "layer norm of the sum, local straight-through gradient",
     ("--ln_placement=sum", "--st_local=true")),
    ("ln_sum_local_band", "layer norm of the sum, local gradient, rate penalty at weight 1",
     ("--ln_placement=sum", "--st_local=true") + RATE_BAND_1),
    ("ln_sum_gain_local", "layer norm of the sum, gains 0.5, local straight-through gradient",
     ("--ln_placement=sum", "--ln_gain=0.5", "--st_local=true")),
    ("ln_sum_gain_local_band", "as ln_sum_gain_local, and the rate penalty at weight 1",
     ("--ln_placement=sum", "--ln_gain=0.5", "--st_local=true") + RATE_BAND_1),
)
ROW_NAMES = tuple(name for name, _, _ in ROWS)
#: The protocols: flags on top of each row's. ``short`` is study.flags as written (3 epochs,
#: 414 steps); ``long`` trains 20 epochs (2,760 steps: the slope reaches 1.8, and the
#: learning rate drops on plateau happen).
PROTOCOLS = {"short": (), "long": ("--num_epochs=20",)}
QUICK = ("--layer_sizes=8,8,8", "--output_size=8", "--embed_size=8", "--num_epochs=0.02",
         "--eval_every=1000", "--batch_size=8", "--eval_batch_size=64")

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ",".join(ROW_NAMES), f"Rows to run, from {', '.join(ROW_NAMES)}.")
flags.DEFINE_list("seeds", "0,1", "Seeds (--seed of each run); the table gives mean and spread.")
flags.DEFINE_enum("protocol", "short", list(PROTOCOLS),
                  "short: 3 epochs per run (~2.5 min); long: 20 epochs (~15 min).")
flags.DEFINE_string("workdir", None, "Where the runs and the table go "
                    "(default workdirs/study, or workdirs/study_long for --protocol=long).")
flags.DEFINE_string("manual_dir", os.path.join(ROOT, "..", "shared", "data", "ptb_char"),
                    "Directory with ptb.char.test.txt and ptb.char.valid.txt.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default ~/tensorflow_datasets).")
flags.DEFINE_bool("quick", False, "Tiny models and runs (a smoke test of the study itself).")


#: What a run's results.json must hold for the table (a file without them is set aside).
RESULT_KEYS = ("test", "parameters", "steps")


def run_one(name: str, extra: tuple, seed: int, workdir: str) -> dict:
  """One run of the binary (resumed if its workdir has checkpoints): its results.json, or
  ``{"diverged": the binary's one-line error}`` when training stopped on a non-finite loss or
  gradient (kept in ``<workdir>.diverged``, so that a rerun of the study does not repeat it).
  A results.json that cannot be used (truncated, not the run's) is named, set aside as
  ``results.json.broken`` and made again by the binary (from the run's checkpoints)."""
  results = os.path.join(workdir, "results.json")
  diverged = workdir + ".diverged"
  if os.path.exists(diverged):
    with open(diverged, errors="replace") as f:
      return {"diverged": f.read().strip()}
  if os.path.exists(results) and children.read_json(results, RESULT_KEYS) is None:
    print(f"row {name}, seed {seed}: {results} is unreadable or incomplete; set aside as "
          f"{children.set_aside(results)}, the run's report is made again", flush=True)
  if not os.path.exists(results):
    argv = [sys.executable, "-m", "experiments.charlm", "--flagfile=study.flags",
            f"--manual_dir={FLAGS.manual_dir}", f"--workdir={workdir}", f"--seed={seed}",
            *PROTOCOLS[FLAGS.protocol], *extra, *(QUICK if FLAGS.quick else ())]
    if FLAGS.data_dir:
      argv.append(f"--data_dir={FLAGS.data_dir}")
    os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
    start = time.time()
    try:
      with open(workdir + ".log", "a") as log:
        status = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=children.die_with_parent).returncode
    finally:  # the run's wall time on this machine, over every session that resumed it
      _add_seconds(workdir, time.time() - start)
    with open(workdir + ".log") as log:
      last = (log.read().strip().splitlines() or [""])[-1]
    if status != 0 and ("non-finite" in last or ": diverged:" in last):
      with open(diverged, "w") as f:
        f.write(last + "\n")
      return {"diverged": last}
    if status != 0:
      sys.exit(f"row {name}, seed {seed}: the run failed (exit {status}); see {workdir}.log, "
               "then run the study again to resume")
  run = children.read_json(results, RESULT_KEYS)
  if run is None:
    sys.exit(f"row {name}, seed {seed}: the run ended but {results} is unreadable or "
             "incomplete; see its log, then run the study again")
  # the trainer's own record (all sessions of the run, even one whose study was killed),
  # else what this study timed (runs made before the trainer recorded it)
  return dict(run, wall_s=run.get("train_s") or wall_seconds(workdir))


def _add_seconds(workdir: str, seconds: float) -> None:
  path = workdir + ".seconds"
  with open(path, "a") as f:
    f.write(f"{seconds:.1f}\n")


def wall_seconds(workdir: str) -> float:
  """The seconds the study has spent in the run of ``workdir`` (0 when none recorded; lines
  that are not numbers, e.g. a write cut short, are skipped)."""
  try:
    with open(workdir + ".seconds", errors="replace") as f:
      words = f.read().split()
  except FileNotFoundError:
    return 0.0
  total = 0.0
  for word in words:
    try:
      total += float(word)
    except ValueError:
      continue
  return total


def summary(runs: list[dict]) -> dict:
  """One row's figures over its seeds: mean and half the spread (max − min) / 2, over the
  seeds that finished; ``diverged``: the steps at which the others stopped."""
  def stat(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float((values.max() - values.min()) / 2)
  diverged = [int(m.group(1)) if (m := re.search(r"in step (\d+)", r["diverged"])) else 0
              for r in runs if "diverged" in r]
  runs = [r for r in runs if "diverged" not in r]
  if not runs:
    return {"seeds": len(diverged), "diverged": diverged}
  out = {"parameters": runs[0]["parameters"], "steps": runs[0]["steps"], "seeds": len(runs),
         "wall_s": float(np.mean([r.get("wall_s", 0.0) for r in runs])),
         "diverged": diverged,
         # results.json names each split since issue 22; runs finished before it say "valid"
         "valid_bpc": stat([r.get("validation", r.get("valid"))["bpc"] for r in runs]),
         "test_bpc": stat([r["test"]["bpc"] for r in runs])}
  if "op_counts" in runs[0]["test"]:
    counts = np.asarray([r["test"]["op_counts"] for r in runs], np.float64)  # seeds, layers, ops
    out["compute"] = (counts[..., 1:].sum(-1) / counts.sum(-1)).mean(0).tolist()  # UPDATE+FLUSH
    for label in ("word", "word+1"):  # at the separator, and one step later
      f1 = np.asarray([[layer[2] for layer in r["test"]["boundaries"][label]] for r in runs])
      out[f"f1_{label}"] = f1.mean(0)[:-1].tolist()  # z1, z2 (the last layer has no detector)
    dead = [h["dead_detectors"] for r in runs for h in r.get("history", [])
            if "dead_detectors" in h]  # recorded by runs since issue 18's counter
    if dead:
      out["dead_detectors"] = int(max(dead))  # the most at any validation of any seed
  return out


def table(rows: list[tuple[str, str, dict]]) -> str:
  """The study's table in Markdown."""
  lines = ["| row | change | parameters | steps | wall per run | valid BPC | test BPC | "
           "compute per layer | F1 z¹ vs word ends (at, +1) | F1 z² (at, +1) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, what, s in rows:
    stopped = (f"diverged at step {', '.join(map(str, s['diverged']))}"
               if s["diverged"] else "")
    if "test_bpc" not in s:
      lines.append(f"| {name} | {what} | — | — | — | {stopped} | {stopped} | — | — | — |")
      continue
    note = f" ({len(s['diverged'])} more seed(s) {stopped})" if stopped else ""
    compute = " / ".join(f"{c:.0%}" for c in s["compute"]) if "compute" in s else "100% each"
    if s.get("dead_detectors"):
      compute += f" ({s['dead_detectors']} detector(s) dead at a validation)"
    f1 = [f"{s['f1_word'][l]:.2f}, {s['f1_word+1'][l]:.2f}" if "f1_word" in s else "—"
          for l in range(2)]
    lines.append(f"| {name} | {what} | {s['parameters']:,} | {s['steps']} | "
                 f"{s['wall_s'] / 60:.0f} min | "
                 f"{s['valid_bpc'][0]:.3f} ± {s['valid_bpc'][1]:.3f} | "
                 f"{s['test_bpc'][0]:.3f} ± {s['test_bpc'][1]:.3f}{note} | {compute} | "
                 f"{f1[0]} | {f1[1]} |")
  return "\n".join(lines)


def tradeoff_figure(path: str, rows: list[tuple[str, str, dict]]) -> None:
  """Every row as a point: test BPC against z¹'s F1 versus word ends (the better of the two
  alignments), coloured by layer 3's compute share; LSTM rows as horizontal lines."""
  from hmlstm_jax import analysis
  plt = analysis.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  points = [(n, s) for n, _, s in rows if "test_bpc" in s and "f1_word" in s]
  for name, s in ((n, s) for n, _, s in rows if "test_bpc" in s and "compute" not in s):
    ax.axhline(s["test_bpc"][0], color="gray", linestyle="--", linewidth=1)
    ax.annotate(name, (0.0, s["test_bpc"][0]), fontsize=7, color="gray", va="bottom")
  if points:
    f1 = [max(s["f1_word"][0], s["f1_word+1"][0]) for _, s in points]
    bpc = [s["test_bpc"][0] for _, s in points]
    dots = ax.scatter(f1, bpc, c=[s["compute"][-1] for _, s in points], cmap="viridis",
                      vmin=0, vmax=1, s=40, zorder=3)
    fig.colorbar(dots, ax=ax, label="layer 3 computes on this share of steps")
    for (name, _), x, y in zip(points, f1, bpc):
      ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel("F1 of z¹ against word ends (at the separator or one step later, the better)")
  ax.set_ylabel("test BPC (lower is better)")
  ax.set_xlim(0, 1)
  ax.set_title("The two halves of the claim: segmentation (right) and modelling (down)")
  analysis.save_png(fig, path)


def curves_figure(path: str, name: str, runs: list[dict]) -> None:
  """A row's validation curves over training (every seed): BPC, and each layer's compute
  share (when the hierarchy forms or collapses)."""
  from hmlstm_jax import analysis
  plt = analysis.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
  for seed, run in enumerate(runs):
    history = run.get("history", [])
    steps = [h["step"] for h in history]
    left.plot(steps, [h["bpc"] for h in history], label=f"seed {seed}")
    for layer in range(1, 4):
      key = f"compute{layer}"
      if history and key in history[0]:
        right.plot(steps, [h[key] for h in history], color=f"C{layer - 1}",
                   linestyle="-" if seed == 0 else ":", label=f"layer {layer}" if seed == 0 else None)
  left.set(xlabel="step", ylabel="validation BPC", title=name)
  right.set(xlabel="step", ylabel="share of steps computed", ylim=(0, 1.05))
  left.legend(fontsize=7)
  if right.lines:
    right.legend(fontsize=7)
  analysis.save_png(fig, path)


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.rows) - set(ROW_NAMES))
  if unknown:
    raise app.UsageError(f"unknown rows {unknown}; choose from {', '.join(ROW_NAMES)}")
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise app.UsageError(f"--seeds must be integers, got {FLAGS.seeds}") from None
  if not seeds:
    raise app.UsageError("--seeds is empty")
  from hmlstm_jax.charlm.data import corpora  # the files its builder reads; imports TFDS
  missing = [f for f in corpora.PtbCharStudy.FILES
             if not os.path.isfile(os.path.join(FLAGS.manual_dir, f))]
  if missing:
    raise app.UsageError(f"{', '.join(missing)} not in --manual_dir={FLAGS.manual_dir}")
  workdir = FLAGS.workdir or ("workdirs/study" if FLAGS.protocol == "short" else
                               f"workdirs/study_{FLAGS.protocol}")
  rows, every_run = [], {}
  chosen = [row for row in ROWS if row[0] in FLAGS.rows]
  total, done, start = len(chosen) * len(seeds), 0, time.time()
  for name, what, extra in chosen:
    runs = []
    for seed in seeds:
      run_start = time.time()
      runs.append(run_one(name, extra, seed, os.path.join(workdir, f"{name}_seed{seed}")))
      done += 1
      outcome = (runs[-1]["diverged"] if "diverged" in runs[-1]
                 else f"test BPC {runs[-1]['test']['bpc']:.4f}")
      print(f"[{done}/{total}] {name} seed {seed}: {outcome} "
            f"({time.time() - run_start:.0f} s; {time.time() - start:.0f} s in all)", flush=True)
    every_run[name] = runs
    rows.append((name, what, summary(runs)))
  text = table(rows)
  print(text)
  os.makedirs(workdir, exist_ok=True)
  from hmlstm_jax import files  # pylint: disable=import-outside-toplevel
  files.write_atomically(os.path.join(workdir, "study.md"), text + "\n")
  files.write_atomically(os.path.join(workdir, "study.json"),
                         json.dumps({"rows": {n: s for n, _, s in rows}, "runs": every_run},
                                    indent=1))
  tradeoff_figure(os.path.join(workdir, "tradeoff.png"), rows)
  os.makedirs(os.path.join(workdir, "curves"), exist_ok=True)
  for name, runs in every_run.items():
    finished = [r for r in runs if "diverged" not in r]
    if finished:
      curves_figure(os.path.join(workdir, "curves", f"{name}.png"), name, finished)
  print(f"figures: {workdir}/tradeoff.png, {workdir}/curves/<row>.png")


if __name__ == "__main__":
  app.run(main)
