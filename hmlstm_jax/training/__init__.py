"""The trainer every experiment shares (resume, steps over the devices, the optimiser and its
plateau, checkpoints, progress, TensorBoard); it knows no model. An experiment plugs in as an
:class:`Experiment` (with its own schedule, optimiser and evaluation splits);
:func:`train_and_evaluate` runs it, :func:`open_run` gives its parts."""
from hmlstm_jax.training.config import TrainConfig
from hmlstm_jax.training.errors import NonFiniteError
from hmlstm_jax.training.errors import Preempted
from hmlstm_jax.training.errors import RunError
from hmlstm_jax.training.experiment import Batches
from hmlstm_jax.training.experiment import Data
from hmlstm_jax.training.experiment import Experiment
from hmlstm_jax.training.experiment import Hosts
from hmlstm_jax.training.steps import Optimizer
from hmlstm_jax.training.steps import paper_optimizer
from hmlstm_jax.training.trainer import Run
from hmlstm_jax.training.trainer import open_run
from hmlstm_jax.training.trainer import train_and_evaluate

__all__ = ["Batches", "Data", "Experiment", "Hosts", "NonFiniteError", "Optimizer", "Preempted",
           "Run", "RunError", "TrainConfig", "open_run", "paper_optimizer", "train_and_evaluate"]
