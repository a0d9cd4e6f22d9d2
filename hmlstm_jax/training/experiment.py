"""What an experiment supplies to the trainer; the trainer owns everything else.

An experiment is its data (with its evaluation splits), its model's parameters, the
per-device loss of one batch (with the recurrent state it carries, or none), a per-step
schedule the loss reads (any pytree, e.g. an annealed temperature; the trainer computes it on the
host and records it, never reading it), its optimiser (by default the paper's, from the
:class:`~.config.TrainConfig`), the evaluation sums it wants over a split, and its final
report. The trainer (:func:`hmlstm_jax.training.train_and_evaluate`) owns resume, the step
loop, applying the optimiser and feeding its plateau, validation cadence, the best
checkpoint, preemption, the non-finite stop, progress lines, TensorBoard and
``results.json``. It never sees a device: batches are host arrays with rows leading, and the
trainer decides which rows go to which device (and host).

A minimal experiment (a linear regression; ``tests/test_trainer.py`` trains one)::

    @dataclasses.dataclass(frozen=True)
    class Config:
      noise: float = setting(0.1, "Label noise.")
      train: TrainConfig = nested(TrainConfig)

    class Regression(Experiment):
      def load_data(self, hosts):
        ...  # Data(train=Batches, evals={'validation': ..., 'test': ...}, ...)
      def init_params(self, key):
        return {"w": jnp.zeros((4,))}
      def loss(self, params, carry, batch, schedule, key):
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.mean(err ** 2), (carry, {})
      def eval_sums(self, params, carry, batch, schedule):
        err = batch["x"] @ params["w"] - batch["y"]
        return carry, {"sq": jnp.sum(err ** 2), "n": jnp.float32(err.size)}
      def summarize(self, sums):
        return {"loss": sums["sq"] / sums["n"]}
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, Sequence

from hmlstm_jax.training import steps


#: What ``results.json`` (and ``train_and_evaluate``'s result) holds besides the splits.
RESULT_KEYS = frozenset({"best_step", "steps", "data", "history", "parameters", "status", "step",
                         "train_losses", "report"})


class Hosts(NamedTuple):
  """Which share of the rows this process serves: rows [index·B/count, (index+1)·B/count)."""
  index: int
  count: int


class Batches(Protocol):
  """One split as batches: ``len()`` batches per epoch; ``[k]`` is batch k, a pytree of host
  arrays whose leading axis is this host's rows. With a carried state, row r of batch k+1
  continues row r of batch k (truncated BPTT); the carry is reset at k = 0."""

  def __len__(self) -> int: ...

  def __getitem__(self, k: int) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Data:
  """What :meth:`Experiment.load_data` returns.

  Attributes:
    train: the training batches (one epoch).
    evals: the evaluation splits by name, e.g. ``'validation'`` and ``'test'`` (rows: the
      eval batch size): the final report evaluates each, in this order, and ``results.json``
      holds each result under its name.
    validation: the split of ``evals`` that validates during training (the plateau, the best
      checkpoint).
    description: the head of the first progress line, e.g. ``"hmlstm on ptb (50 symbols): 781
      segments of 64 x 100 per epoch"``.
    items_per_batch: items of one global training batch (characters, points), for throughput.
    item_name: what an item is, e.g. ``'tokens'``.
    metadata: what a checkpoint must carry to be used on its own (JSON), e.g. the statistics
      that normalised the inputs; stored in every checkpoint's record and in ``results.json``
      under ``'data'``.
  """
  train: Batches
  evals: dict[str, Batches]
  description: str
  items_per_batch: int
  item_name: str = "items"
  metadata: dict = dataclasses.field(default_factory=dict)
  validation: str = "validation"

  def __post_init__(self):
    taken = sorted(set(self.evals) & RESULT_KEYS)
    if taken:
      raise ValueError(f"evaluation splits may not be named {taken}: results.json uses those "
                       "keys for the run itself; rename the split")
    if self.validation not in self.evals:
      raise ValueError(f"the validation split {self.validation!r} is not among the evaluation "
                       f"splits {list(self.evals)}")


class Experiment:
  """Base class of an experiment. Subclasses set ``config`` and override the methods.

  ``config`` is a frozen dataclass of :func:`hmlstm_jax.settings.setting` fields with a
  ``train`` field holding the :class:`~hmlstm_jax.training.TrainConfig`. The trainer records
  it in ``config.json`` and refuses to resume a workdir whose saved configuration differs in
  a setting that is not ``changeable``.

  The trainer calls :meth:`load_data` once, first (before :meth:`init_params` and every
  other hook), so a hook may read what it set on ``self`` (e.g. the vocabulary size).
  Methods that run inside the mapped steps (``init_carry``, ``loss``, ``loss_weight``,
  ``eval_sums``) are traced once per shape: they must be pure functions of their arguments
  and of what ``__init__`` and :meth:`load_data` set on ``self`` (static settings).
  """
  #: The key of :meth:`summarize`'s result that validation minimises (plateau, best).
  objective: str = "loss"

  def __init__(self, config: Any):
    if not hasattr(config, "train"):
      raise TypeError(f"{type(config).__name__} has no 'train' field (a TrainConfig)")
    self.config = config

  def load_data(self, hosts: Hosts) -> Data:
    """Loads (or generates) the splits and serves this host's rows of each batch."""
    raise NotImplementedError

  def init_params(self, key) -> Any:
    """The initial parameter pytree."""
    raise NotImplementedError

  def init_carry(self, rows: int) -> Any:
    """The carried state of ``rows`` rows at the start of an epoch or split; ``()`` for none."""
    del rows
    return ()

  def schedule(self, step: int, epoch: float) -> Any:
    """What the loss of training step ``step`` (``epoch`` = step / batches per epoch) reads
    besides the batch: any pytree of arrays or numbers, computed on the host and passed traced
    (a value that changes never recompiles); ``()`` by default. Evaluations use the schedule
    of the step they follow. The trainer records it with each checkpoint and never reads it."""
    del step, epoch
    return ()

  def schedule_scalars(self, schedule) -> dict[str, float]:
    """Named figures of a schedule for progress lines and TensorBoard (e.g. ``{'tau': 0.5}``);
    none by default."""
    del schedule
    return {}

  def optimizer(self) -> steps.Optimizer:
    """The optimiser (:class:`~.steps.Optimizer`); by default the paper's, built from the
    ``train`` settings (:meth:`~.config.TrainConfig.optimizer`)."""
    return self.config.train.optimizer()

  def loss(self, params, carry, batch, schedule, key) -> tuple[Any, tuple[Any, dict]]:
    """Per-device loss of one batch: ``(mean loss, (carry after the batch, metrics))``.

    ``metrics`` are extra scalars (averaged over devices, logged every ``log_every`` steps).
    ``schedule`` is this step's :meth:`schedule`; ``key`` a PRNG key unique to the step and
    the device.
    """
    raise NotImplementedError

  def loss_weight(self, batch) -> Any:
    """How many items the mean :meth:`loss` of this device's rows averages over (e.g. the
    real, unmasked points), or ``None`` (the default) when every device's batch holds the
    same number. With a weight the trainer combines the devices' losses and gradients as
    Σ_d w_d · loss_d / Σ_d w_d, the mean over every item of the global batch, so that a run
    follows the same gradients on 1, 2 or 4 devices (and resumes on another topology).
    Traced inside the step, like :meth:`loss`."""
    del batch
    return None

  def eval_sums(self, params, carry, batch, schedule) -> tuple[Any, dict]:
    """Per-device sums of one evaluation batch: ``(carry, {name: array})``. The trainer sums
    them over devices, hosts and batches (in float64 on the host) and calls :meth:`summarize`."""
    raise NotImplementedError

  def summarize(self, sums: dict) -> dict:
    """A split's result from its sums (NumPy); must hold the key ``objective``."""
    raise NotImplementedError

  def divergence_bound(self) -> float | None:
    """A validation :attr:`objective` above which the run has diverged though every number is
    finite (e.g. a character LM worse than twice the uniform distribution's loss); ``None``:
    no such bound (the default). Called after :meth:`load_data`."""
    return None

  def summary_lines(self, name: str, result: dict) -> list[str]:
    """Lines describing a split's result, e.g. ``['validation: loss 0.1234']``."""
    return [f"{name}: {self.objective} {result[self.objective]:.4f}"]

  def train_scalars(self, metrics: dict[str, float]) -> dict[str, float]:
    """Extra figures for progress lines (e.g. ``{'BPC': ...}``) from the last logged step's
    metrics: ``'loss'`` and those :meth:`loss` returned."""
    del metrics
    return {}

  def report(self, params, schedule, workdir: str) -> tuple[dict, Sequence[str]]:
    """The final report with the best parameters (host arrays) and the schedule of their
    step: figures written to ``workdir``, samples, its own metrics. Returns what goes into
    ``results.json`` and the lines to print."""
    del params, schedule, workdir
    return {}, []
