"""The trainer every experiment shares (resume, steps over the devices, plateau, checkpoints,
progress, TensorBoard); it knows no model. An experiment plugs in as an :class:`Experiment`."""
from hmlstm_jax.training.config import TrainConfig
from hmlstm_jax.training.errors import NonFiniteError
from hmlstm_jax.training.errors import Preempted
from hmlstm_jax.training.errors import RunError
from hmlstm_jax.training.experiment import Batches
from hmlstm_jax.training.experiment import Data
from hmlstm_jax.training.experiment import Experiment
from hmlstm_jax.training.experiment import Hosts
from hmlstm_jax.training.trainer import train_and_evaluate

__all__ = ["Batches", "Data", "Experiment", "Hosts", "NonFiniteError", "Preempted", "RunError",
           "TrainConfig", "train_and_evaluate"]
