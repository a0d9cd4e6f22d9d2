"""The character-level language model of §4.1: embedding → HM-LSTM → output module → softmax.

The recurrence and the output module are the backbone's (:mod:`hmlstm_jax.backbone`); this
module adds the embedding, the softmax and the loss.

The model is a pair of pure functions over a parameter pytree, like the rest of the library:
:func:`init_charlm` and :func:`charlm_apply` (with :func:`charlm_loss` for training).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hmlstm_jax import backbone
from hmlstm_jax import heads
from hmlstm_jax import hmlstm
from hmlstm_jax import lstm
from hmlstm_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class CharLMConfig(backbone.RecurrentConfig):
  """Static description of the character LM (hashable): the backbone's settings
  (:class:`~hmlstm_jax.backbone.RecurrentConfig`) and the two of its own below.

  Attributes:
    vocab_size: number of symbols (``None`` until the corpus is loaded; required by
      :func:`init_charlm`).
    embed_size: input embedding width (128 in the paper).
  """
  vocab_size: int | None = setting(
      None, "Number of symbols; set from the corpus's vocabulary.", flag=False)
  embed_size: int = setting(128, "Width of the input embedding (128 in the paper).")

  def __post_init__(self):
    super().__post_init__()
    for name in ("vocab_size", "embed_size"):
      value = getattr(self, name)
      if name == "vocab_size" and value is None:
        continue  # set from the data before the model is built
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")

  @property
  def rnn(self) -> hmlstm.HMLSTMConfig | lstm.LSTMConfig:
    """The recurrence (HM-LSTM, or the LSTM stack) reading the embedding."""
    return self.recurrence(self.embed_size)


class CharLMOutputs(NamedTuple):
  """What :func:`charlm_apply` returns besides the logits."""
  final_state: hmlstm.State      # carry into the next segment (stop its gradient)
  rnn: hmlstm.UnrollOutputs      # per layer h (T, B, d) and z (T, B, 1), time-major; z = () for the LSTM


def init_charlm(key: jax.Array, config: CharLMConfig) -> dict:
  """Parameters: ``embed`` (V, 128), ``hmlstm`` (:func:`hmlstm.init_params`; ``lstm`` for the
  baseline, :func:`lstm.init_params`), ``output`` (:func:`heads.init_output_module`; absent
  with ``output_head='top'``), ``softmax`` (:func:`heads.init_softmax`).

  The embedding is linear with no non-linearity (decisions.md §3): row v is x_t for symbol v.
  """
  if config.vocab_size is None:
    raise ValueError("CharLMConfig.vocab_size is None: set it from the corpus "
                     "(dataclasses.replace(config, vocab_size=corpus.vocab.size))")
  k_embed, k_rnn, k_out, k_soft = jax.random.split(key, 4)
  return {
      "embed": jax.random.normal(k_embed, (config.vocab_size, config.embed_size), jnp.float32),
      **backbone.init_recurrence_and_output(k_rnn, k_out, config, config.embed_size),
      "softmax": heads.init_softmax(k_soft, config.head_size, config.vocab_size),
  }


def charlm_step(params: dict, state: hmlstm.State, token: jax.Array, slope,
                key: jax.Array | None = None, *, config: CharLMConfig,
                deterministic: bool = True,
                skip_copy: bool = False) -> tuple[jax.Array, hmlstm.State]:
  """The next symbol's logits after one more token, for sampling and streaming: embedding →
  one step of Eq. 1-9 → Eq. 11-12 → softmax. The same numbers as :func:`charlm_apply` on
  the token sequence, one token at a time.

  Args:
    token: int symbols (B,), the current token of each row.
    skip_copy: skip the HM-LSTM layers whose rows all COPY (:func:`hmlstm.step`): the same
      logits, less work where the upper layers rarely update.
    Others as in :func:`charlm_apply`; ``deterministic`` defaults to True (generation).

  Returns:
    ``(logits, state)``: logits (B, V) of the symbol after ``token``, and the new state.
  """
  if token.ndim != 1:
    raise ValueError(f"token must be one symbol per row, shape (batch,), got {token.shape}")
  state, h_e = backbone.recurrence_step(params, state, params["embed"][token], slope, key,
                                        config=config, deterministic=deterministic,
                                        skip_copy=skip_copy)
  return heads.softmax_logits(params["softmax"], h_e), state


def charlm_apply(params: dict, state: hmlstm.State, tokens: jax.Array, slope,
                 key: jax.Array | None = None, *, config: CharLMConfig,
                 deterministic: bool = False,
                 fast_backward: bool = True) -> tuple[jax.Array, CharLMOutputs]:
  """Logits of the next symbol at every position: embedding → Eq. 1-9 → Eq. 11-12 → softmax.

  Args:
    params: from :func:`init_charlm`.
    state: HM-LSTM state before the first token (:func:`hmlstm.initial_state`).
    tokens: int symbols, batch-major (B, T).
    slope: hard-sigmoid slope a (traced).
    key: PRNG key for the ``'sample'`` boundary in training.
    config: the :class:`CharLMConfig` (static).
    deterministic: evaluation mode.
    fast_backward: the HM-LSTM's custom backward (:func:`hmlstm.unroll`); ``False``: autodiff.

  Returns:
    ``(logits, CharLMOutputs)`` with logits (B, T, V) for the symbol after each token.
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (batch, time), got shape {tokens.shape}")
  xs = params["embed"][tokens.T]  # (T, B, E), time-major for the scan
  final, outs, h_e = backbone.recurrence_and_output(params, state, xs, slope, key,
                                                    config=config, deterministic=deterministic,
                                                    fast_backward=fast_backward)
  logits = heads.softmax_logits(params["softmax"], h_e)  # (T, B, V)
  return jnp.swapaxes(logits, 0, 1), CharLMOutputs(final_state=final, rnn=outs)


def charlm_loss(params: dict, state: hmlstm.State, inputs: jax.Array, targets: jax.Array,
                slope, key: jax.Array | None = None, *, config: CharLMConfig,
                deterministic: bool = False,
                fast_backward: bool = True) -> tuple[jax.Array, CharLMOutputs]:
  """Mean next-symbol negative log-likelihood in nats (BPC = NLL / ln 2), §4.1.

  Args:
    inputs, targets: int (B, T); ``targets[:, t]`` is the symbol after ``inputs[:, t]``.
    Others as in :func:`charlm_apply`.

  Returns:
    ``(nll, CharLMOutputs)``; differentiate with ``jax.value_and_grad(..., has_aux=True)``.
  """
  logits, outs = charlm_apply(params, state, inputs, slope, key, config=config,
                              deterministic=deterministic, fast_backward=fast_backward)
  return jnp.mean(token_nll(logits, targets)), outs


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """−log softmax(logits)[target] per position, in nats: (B, T, V), (B, T) → (B, T)."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
