"""The character-level language model of §4.1 (:mod:`.model`), its corpora and batching
(:mod:`.data`) and its report (:mod:`.report`: the Fig. 3-4 figure, sampling)."""
from hmlstm_jax.charlm.model import CharLMConfig
from hmlstm_jax.charlm.model import CharLMOutputs
from hmlstm_jax.charlm.model import charlm_apply
from hmlstm_jax.charlm.model import charlm_loss
from hmlstm_jax.charlm.model import charlm_step
from hmlstm_jax.charlm.model import init_charlm
from hmlstm_jax.charlm.model import token_nll

__all__ = ["CharLMConfig", "CharLMOutputs", "charlm_apply", "charlm_loss", "charlm_step",
           "init_charlm", "token_nll"]
