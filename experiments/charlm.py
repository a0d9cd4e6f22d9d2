r"""Character-level language modelling with the HM-LSTM (§4.1 of the paper).

    python -m experiments.charlm --flagfile=demo.flags            # workdir: workdirs/demo
    python -m experiments.charlm --flagfile=text8.flags --workdir=/data/runs/text8

A ``--flagfile`` given by bare name is looked up in ``experiments/flags/`` when it is not a
path that exists; flags after the flagfile override it. The run resumes from the last
checkpoint in ``--workdir``. This binary only turns flags into a
:class:`hmlstm_jax.training.TrainConfig` and calls
:func:`hmlstm_jax.training.train_and_evaluate`, which the tests call too.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

from hmlstm_jax import data
from hmlstm_jax import training

FLAGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags")

_D = training.TrainConfig()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, config.json, "
                    "results.json and the boundary figure; a run in an existing workdir resumes. "
                    "Default: workdirs/<name of the last flagfile> (or workdirs/<dataset>).")
flags.DEFINE_enum("dataset", _D.dataset, list(data.DATASETS),
                  "Corpus: 'synthetic' (generated, no download), 'ptb', 'text8' or 'enwik8'.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default ~/tensorflow_datasets).")
flags.DEFINE_string("manual_dir", None, "Directory holding a pre-downloaded archive "
                    "(text8.zip, enwik8.zip, simple-examples.tgz); default <data_dir>/downloads/manual.")
flags.DEFINE_integer("synthetic_chars", _D.synthetic_chars,
                     "Training characters of the synthetic corpus (validation and test: a tenth each).")
flags.DEFINE_integer("synthetic_seed", _D.synthetic_seed, "Seed of the synthetic corpus's grammar and text.")
flags.DEFINE_enum("model", _D.model, ["hmlstm", "lstm"],
                  "'hmlstm', or 'lstm' for the (layer-norm) LSTM baseline with the same output module.")
flags.DEFINE_list("layer_sizes", [str(d) for d in _D.layer_sizes], "Units per layer, e.g. 512,512,512.")
flags.DEFINE_integer("output_size", _D.output_size, "Width of the output embedding h^e (Eq. 12).")
flags.DEFINE_integer("embed_size", _D.embed_size, "Width of the input embedding (128 in the paper).")
flags.DEFINE_enum("boundary", _D.boundary, ["step", "sample", "soft"],
                  "Boundary function f_bound (Eq. 8): step, sample (Bernoulli) or soft (hard sigmoid).")
flags.DEFINE_bool("layer_norm", _D.layer_norm, "Layer normalisation (the paper's best results use it).")
flags.DEFINE_enum("matmul_dtype", "float32", ["float32", "bfloat16"],
                  "Matmul operand dtype (bfloat16: float32 accumulation and element-wise math).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Streams per batch (global, over all devices and hosts).")
flags.DEFINE_integer("seq_len", _D.seq_len, "Truncated-BPTT segment length in characters.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Initial Adam learning rate.")
flags.DEFINE_float("clip_norm", _D.clip_norm, "Global gradient-norm clipping threshold.")
flags.DEFINE_float("lr_decay_factor", _D.lr_decay_factor,
                   "Learning-rate factor applied when the validation NLL stops improving (1/50).")
flags.DEFINE_integer("plateau_patience", _D.plateau_patience,
                     "Evaluations without improvement before the learning rate is cut.")
flags.DEFINE_float("max_slope", _D.max_slope, "Slope annealing: a = min(max_slope, 1 + slope_rate * epoch).")
flags.DEFINE_float("slope_rate", _D.slope_rate, "Slope increase per epoch; 0 disables annealing (a = 1).")
flags.DEFINE_float("num_epochs", _D.num_epochs, "Training epochs (may be fractional).")
flags.DEFINE_integer("seed", _D.seed, "Seed of the parameters and of the boundary sampling.")
flags.DEFINE_integer("num_devices", None, "Local devices to use (default: all).")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Streams per evaluation batch.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Validate every this many steps.")
flags.DEFINE_integer("eval_max_segments", None,
                     "Cap on validation segments during training (the final evaluation is complete).")
flags.DEFINE_integer("log_every", _D.log_every, "Log and write TensorBoard scalars every this many steps.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Checkpoint every this many steps.")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Latest checkpoints kept (the best is kept apart).")
flags.DEFINE_integer("figure_chars", _D.figure_chars, "Validation characters shown in the boundary figure.")
flags.DEFINE_integer("num_samples", _D.num_samples, "Sampled continuations printed at the end.")
flags.DEFINE_integer("sample_chars", _D.sample_chars, "Length of each sampled continuation.")
FLAGS = flags.FLAGS
_FLAGFILE_STEM = []  # the last --flagfile's name, for the default workdir


def config_from_flags() -> training.TrainConfig:
  """The :class:`TrainConfig` the parsed flags describe."""
  names = [f.name for f in training.TrainConfig.__dataclass_fields__.values()]
  values = {name: FLAGS[name].value for name in names}
  values["layer_sizes"] = tuple(int(d) for d in FLAGS.layer_sizes)
  values["matmul_dtype"] = None if FLAGS.matmul_dtype == "float32" else FLAGS.matmul_dtype
  return training.TrainConfig(**values)


def resolve_flagfiles(argv: list[str]) -> list[str]:
  """``--flagfile=NAME`` → ``experiments/flags/NAME`` when NAME is not an existing path."""
  out = []
  for arg in argv:
    if arg.startswith("--flagfile="):
      path = arg.split("=", 1)[1]
      if not os.path.exists(path) and os.path.exists(os.path.join(FLAGS_DIR, path)):
        arg = "--flagfile=" + os.path.join(FLAGS_DIR, path)
      _FLAGFILE_STEM[:] = [os.path.splitext(os.path.basename(path))[0]]
    out.append(arg)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # progress goes to stdout; -v 0 for library INFO logs
  try:
    config = config_from_flags()
  except ValueError as err:
    sys.exit(f"charlm: bad flags: {err}")
  workdir = FLAGS.workdir or os.path.join("workdirs", (_FLAGFILE_STEM or [config.dataset])[0])
  logging.info("workdir %s; config:\n%s", workdir, config.to_json())
  try:
    result = training.train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError) as err:  # settings or data that cannot work: before training
    sys.exit(f"charlm: {err}")
  del result  # train_and_evaluate printed the report


if __name__ == "__main__":
  app.run(main, argv=resolve_flagfiles(sys.argv))
