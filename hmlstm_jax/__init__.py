"""hmlstm_jax: the Hierarchical Multiscale LSTM (Chung, Ahn & Bengio, ICLR 2017) in JAX.

Pure functions over pytrees; see README.md for an example and WORKSPACE.md for the map of
which module implements which equation.
"""
from hmlstm_jax.boundary import BOUNDARY_VARIANTS
from hmlstm_jax.boundary import f_bound
from hmlstm_jax.boundary import hard_sigmoid
from hmlstm_jax.boundary import straight_through_boundary
from hmlstm_jax.cell import layer_update
from hmlstm_jax.cell import pre_activation
from hmlstm_jax.backbone import RecurrentConfig
from hmlstm_jax.backbone import slope_schedule
from hmlstm_jax.charlm import CharLMConfig
from hmlstm_jax.charlm import CharLMOutputs
from hmlstm_jax.charlm import charlm_apply
from hmlstm_jax.charlm import charlm_loss
from hmlstm_jax.charlm import charlm_step
from hmlstm_jax.charlm import init_charlm
from hmlstm_jax.handwriting import HandwritingConfig
from hmlstm_jax.handwriting import handwriting_apply
from hmlstm_jax.handwriting import handwriting_loss
from hmlstm_jax.handwriting import init_handwriting
from hmlstm_jax.handwriting import sequence_log_likelihoods
from hmlstm_jax.heads import init_output_module
from hmlstm_jax.heads import init_softmax
from hmlstm_jax.heads import output_module
from hmlstm_jax.heads import softmax_logits
from hmlstm_jax.hmlstm import COPY
from hmlstm_jax.hmlstm import FLUSH
from hmlstm_jax.hmlstm import UPDATE
from hmlstm_jax.hmlstm import HMLSTMConfig
from hmlstm_jax.hmlstm import HMLSTMSettings
from hmlstm_jax.hmlstm import LayerState
from hmlstm_jax.hmlstm import State
from hmlstm_jax.hmlstm import UnrollOutputs
from hmlstm_jax.hmlstm import boundary_noise
from hmlstm_jax.hmlstm import boundary_rate_penalty
from hmlstm_jax.hmlstm import boundary_rates
from hmlstm_jax.hmlstm import check_params
from hmlstm_jax.hmlstm import init_params
from hmlstm_jax.hmlstm import initial_state
from hmlstm_jax.hmlstm import Internals
from hmlstm_jax.hmlstm import internals
from hmlstm_jax.hmlstm import operation_counts
from hmlstm_jax.hmlstm import operations
from hmlstm_jax.hmlstm import step
from hmlstm_jax.hmlstm import unroll
from hmlstm_jax.nn import HMLSTM
from hmlstm_jax.nn import OutputModule
from hmlstm_jax import nnx
from hmlstm_jax.rnn import reverse_within_lengths

__version__ = "0.1.0"

__all__ = [
    "BOUNDARY_VARIANTS", "COPY", "FLUSH", "UPDATE", "CharLMConfig", "CharLMOutputs", "HMLSTM",
    "HMLSTMConfig", "HMLSTMSettings", "HandwritingConfig", "Internals", "LayerState", "OutputModule", "RecurrentConfig", "State",
    "UnrollOutputs", "boundary_noise", "boundary_rate_penalty", "boundary_rates", "check_params",
    "f_bound", "handwriting_apply", "handwriting_loss",
    "init_handwriting", "sequence_log_likelihoods",
    "charlm_apply", "charlm_loss", "charlm_step", "hard_sigmoid", "init_charlm", "init_output_module",
    "init_params", "init_softmax", "initial_state", "internals", "layer_update", "operation_counts",
    "operations", "output_module", "pre_activation", "slope_schedule", "softmax_logits", "step",
    "reverse_within_lengths", "straight_through_boundary", "unroll", "nnx",
]
