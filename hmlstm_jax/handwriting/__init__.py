"""Handwriting (§4.2): the model (:mod:`.model`) with its mixture density head (:mod:`.mdn`),
pen trajectories and IAM-OnDB (:mod:`.data`) and the report (:mod:`.report`: Fig. 5,
generated handwriting)."""
from hmlstm_jax.handwriting.model import INPUT_SIZE
from hmlstm_jax.handwriting.model import HandwritingConfig
from hmlstm_jax.handwriting.model import HandwritingOutputs
from hmlstm_jax.handwriting.model import handwriting_apply
from hmlstm_jax.handwriting.model import handwriting_loss
from hmlstm_jax.handwriting.model import init_handwriting
from hmlstm_jax.handwriting.model import sequence_log_likelihoods

__all__ = ["INPUT_SIZE", "HandwritingConfig", "HandwritingOutputs", "handwriting_apply",
           "handwriting_loss", "init_handwriting", "sequence_log_likelihoods"]
