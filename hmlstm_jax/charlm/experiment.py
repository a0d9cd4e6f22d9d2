"""The character-level language model of §4.1 as an experiment of the shared trainer: its
run's settings (:class:`Config`: the corpus, the model, the trainer, the report) and
:class:`CharLM`. The binary ``experiments/charlm.py`` parses flags into a :class:`Config` and
runs it; this module is the task's one home.

The experiment, as the trainer sees it (:class:`CharLM`): a corpus cut into contiguous
streams (truncated BPTT, the state carried from segment to segment), the character LM's
parameters, its mean NLL per character plus the optional boundary-rate penalty as the loss,
NLL sums, operation counts and boundary hits as evaluation sums (BPC = NLL / ln 2, the
validation objective being the NLL), and a report with the boundary figure (Fig. 3-4) and
sampled continuations.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from hmlstm_jax import analysis
from hmlstm_jax import backbone
from hmlstm_jax import hmlstm
from hmlstm_jax.backbone import SlopeAnnealing
from hmlstm_jax.charlm import data
from hmlstm_jax.charlm import model as models
from hmlstm_jax.charlm import report as charlm_report
from hmlstm_jax.settings import nested
from hmlstm_jax.settings import setting
from hmlstm_jax.tfds_util import DataDirs
from hmlstm_jax.training import Data
from hmlstm_jax.training import Experiment
from hmlstm_jax.training import TrainConfig

@dataclasses.dataclass(frozen=True)
class Config:
  """A character-LM run: the corpus, the model (nested), the trainer (nested), the report."""
  dataset: str = setting("synthetic", "Corpus: 'synthetic' (generated, no download), 'ptb', "
                         "'text8' or 'enwik8'.", choices=data.DATASETS)
  dirs: DataDirs = nested(DataDirs)
  synthetic_chars: int = setting(200_000, "Training characters of the synthetic corpus "
                                 "(validation and test: a tenth each).")
  synthetic_seed: int = setting(0, "Seed of the synthetic corpus's grammar and text.")
  seq_len: int = setting(100, "Truncated-BPTT segment length in characters.")
  figure_chars: int = setting(180, "Validation characters shown in the boundary figure.",
                              changeable=True)
  num_samples: int = setting(3, "Sampled continuations printed at the end.", changeable=True)
  sample_chars: int = setting(200, "Length of each sampled continuation.", changeable=True)
  model: models.CharLMConfig = nested(models.CharLMConfig)
  train: TrainConfig = nested(TrainConfig)

  def __post_init__(self):
    if self.dataset not in data.DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; choose from {data.DATASETS}")
    for name in ("synthetic_chars", "seq_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    for name in ("figure_chars", "num_samples", "sample_chars"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


class CharLM(SlopeAnnealing, Experiment):
  """The character LM of §4.1 as an experiment of the shared trainer."""
  objective = "nll"

  def __init__(self, config: Config):
    super().__init__(config)
    self.model = config.model  # its vocab_size is set by load_data

  def load_data(self, hosts) -> Data:
    c, t = self.config, self.config.train
    corpus = data.load(c.dataset, data_dir=c.dirs.data_dir, manual_dir=c.dirs.manual_dir,
                       synthetic_seed=c.synthetic_seed, synthetic_chars=c.synthetic_chars)
    self.corpus = corpus
    self.label_names = list(analysis.with_next_step(corpus.labels["validation"]))  # print order
    self.model = dataclasses.replace(c.model, vocab_size=corpus.vocab.size)
    try:
      train = data.StreamBatcher(corpus.splits["train"], t.batch_size, c.seq_len,
                                 process_index=hosts.index, process_count=hosts.count)
      evals = {split: data.StreamBatcher(corpus.splits[split], t.eval_batch_size, c.seq_len,
                                         labels=analysis.with_next_step(corpus.labels[split]),
                                         process_index=hosts.index, process_count=hosts.count,
                                         drop_remainder=False)
               for split in ("validation", "test")}
    except ValueError as err:
      raise ValueError(f"{c.dataset}: {err}") from None
    return Data(
        train=train, evals=evals, items_per_batch=t.batch_size * c.seq_len, item_name="tokens",
        description=(f"{self.model.model} on {c.dataset} ({corpus.vocab.size} symbols): "
                     f"{len(train)} segments of {t.batch_size} x {c.seq_len} per epoch"))

  def divergence_bound(self) -> float:
    """Twice the NLL of the uniform distribution over the vocabulary (2 ln V nats): a model
    that far behind guessing has diverged (issue 20: lr 1e6 ended at 1.68e12 BPC, exit 0)."""
    return 2.0 * math.log(self.model.vocab_size)

  def init_params(self, key):
    return models.init_charlm(key, self.model)

  def init_carry(self, rows: int):
    return hmlstm.initial_state(self.model.rnn, rows)

  def loss(self, params, carry, batch, slope, key):
    nll, outs = models.charlm_loss(params, carry, batch.inputs, batch.targets, slope, key,
                                   config=self.model)
    penalty = backbone.boundary_penalty(outs.rnn, self.model)
    return nll + penalty, (outs.final_state, {"nll": nll, "rate_penalty": penalty,
                                              **analysis.boundary_rate_scalars(outs.rnn)})

  def eval_sums(self, params, carry, batch, slope):
    """NLL sum and count; for the HM-LSTM the (COPY, UPDATE, FLUSH) counts per layer and each
    layer's boundary hits against the batch's labels (deterministic boundaries)."""
    logits, outs = models.charlm_apply(params, carry, batch.inputs, slope, config=self.model,
                                       deterministic=True)
    nll = models.token_nll(logits, batch.targets)
    sums = {"nll": jnp.sum(nll), "count": jnp.asarray(nll.size, jnp.float32)}
    if outs.rnn.z:
      sums.update(analysis.boundary_sums(carry, outs.rnn, batch.labels))
    return outs.final_state, sums

  def summarize(self, sums):
    nll = float(sums["nll"] / sums["count"])
    result = {"nll": nll, "bpc": nll / math.log(2), "chars": int(sums["count"])}
    if "op_counts" in sums:  # per layer (COPY, UPDATE, FLUSH); per label P / R / F1
      result.update(analysis.boundary_results(sums, self.label_names))
      result.update(analysis.boundary_scalars(result))
    return result

  def summary_lines(self, name, result):
    lines = [f"{name}: BPC {result['bpc']:.4f} over {result['chars']} characters"]
    if "op_counts" in result:
      lines += analysis.operation_lines(result["op_counts"], result["dead_layers"])
      lines += analysis.boundary_lines(result["boundaries"])
    return lines

  def train_scalars(self, metrics):
    return {"BPC": metrics["nll"] / math.log(2)}

  def report(self, params, slope, workdir):
    """The boundary figure (HM-LSTM) and sampled continuations of a validation prompt."""
    c, corpus, out, lines = self.config, self.corpus, {}, []
    if self.model.model == "hmlstm" and c.figure_chars:
      text_ids = corpus.splits["validation"][:c.figure_chars]
      z, h_norm = charlm_report.passage(params, self.model, text_ids, slope)
      figure = os.path.join(workdir, "boundaries.png")
      charlm_report.boundary_figure(figure, corpus.vocab.decode(text_ids), z, h_norm,
                               title=f"{c.dataset}: boundaries z and ‖h‖ on validation text")
      out["figure"] = figure
      lines.append(f"figure: {figure}")
    if c.num_samples and c.sample_chars:
      prompt = corpus.splits["validation"][:50]
      samples = charlm_report.sample(params, self.model, prompt, c.sample_chars,
                                jax.random.key(c.train.seed + 1), c.num_samples, slope)
      out["samples"] = [corpus.vocab.decode(s) for s in samples]
      lines.append(f"samples after {corpus.vocab.decode(prompt)!r}:")
      lines += [f"  {s!r}" for s in out["samples"]]
    return out, lines


def default_workdir(config: Config, flagfile: str | None) -> str:
  """``workdirs/<flagfile name>`` (or ``workdirs/<dataset>``)."""
  return os.path.join("workdirs", flagfile or config.dataset)

