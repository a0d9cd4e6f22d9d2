"""Training the character LM (§4.1): config, per-device steps, device mapping, checkpoints."""
from hmlstm_jax.training.config import TrainConfig
from hmlstm_jax.training.loop import evaluate
from hmlstm_jax.training.loop import train_and_evaluate

__all__ = ["TrainConfig", "evaluate", "train_and_evaluate"]
