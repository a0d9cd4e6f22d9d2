"""The character-level language model of §4.1: embedding → HM-LSTM → output module → softmax.

The model is a pair of pure functions over a parameter pytree, like the rest of the library:
:func:`init_charlm` and :func:`charlm_apply` (with :func:`charlm_loss` for training).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hmlstm_jax import boundary as boundary_lib
from hmlstm_jax import heads
from hmlstm_jax import hmlstm
from hmlstm_jax import lstm
from hmlstm_jax import schedule as schedule_lib
from hmlstm_jax.settings import setting


MODELS = ("hmlstm", "lstm")
OUTPUT_HEADS = ("module", "top")


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
  """The part the paper's two models share: the recurrence and the output module (hashable).

  Attributes:
    model: ``'hmlstm'`` (the paper's model) or ``'lstm'``: the LSTM stack baseline
      (:mod:`hmlstm_jax.lstm`; layer-normalised with ``layer_norm``) with the same output
      module, as the paper's LSTM baselines (Table 1 †, Table 3); it has no boundaries.
    layer_sizes: widths d_1 … d_L (PTB: 512 × 3; Text8/enwik8: 1024 × 3; handwriting 400 × 3).
    output_size: width of the output embedding h^e (PTB 512; Text8/enwik8 2048; handwriting 400).
    output_head: what the prediction head reads: ``'module'``, the paper's output module
      h^e (Eq. 11-12) over every layer; or ``'top'``, the top layer's h^L_t alone (no output
      module; ``output_size`` unused), the usual stacked-RNN head, as an ablation.
    boundary: ``'step'``, ``'sample'`` or ``'soft'``.
    layer_norm: layer normalisation in the HM-LSTM.
    ln_gain, boundary_bias: the layer-norm gains and the boundary rows' bias at
      initialisation (:class:`hmlstm.HMLSTMConfig`).
    ln_boundary: layer norm of the boundary rows too (:class:`hmlstm.HMLSTMConfig`).
    ln_placement, ln_cell, st_gradient, st_local: where layer norm applies, whether it
      normalises c, the straight-through derivative and whether it stops at the detector
      (:class:`hmlstm.HMLSTMConfig`).
    rate_weight, rate_min, rate_max: the optional boundary-rate penalty (not the paper's;
      :func:`boundary_penalty`): its weight (0: off) and each detector's band.
    schedule, matmul_dtype: the HM-LSTM's order of layer-steps and matmul operand dtype
      (:class:`hmlstm.HMLSTMConfig`).
  """
  model: str = setting("hmlstm", "'hmlstm', or 'lstm' for the (layer-norm) LSTM baseline with "
                       "the same output module.", choices=MODELS)
  layer_sizes: tuple[int, ...] = setting((512, 512, 512), "Units per layer, e.g. 512,512,512.")
  output_size: int = setting(512, "Width of the output embedding h^e (Eq. 12).")
  output_head: str = setting("module", "What the prediction head reads: module (the output "
                             "module of Eq. 11-12 over all layers) or top (the top layer's h "
                             "alone; output_size unused).", choices=OUTPUT_HEADS)
  boundary: str = setting("step", "Boundary function f_bound (Eq. 8): step, sample (Bernoulli) "
                          "or soft (hard sigmoid).", choices=("step", "sample", "soft"))
  layer_norm: bool = setting(False, "Layer normalisation (the paper's best results use it).")
  ln_gain: float = setting(1.0, "Layer-norm gains at initialisation (Ba et al.: 1).")
  boundary_bias: float = setting(0.0, "Initial bias of the boundary detectors' rows (0: about "
                                 "half the steps end a segment at first; negative: fewer).")
  ln_boundary: bool = setting(False, "With layer_norm, normalise the boundary rows too (their "
                              "own gain and bias; by default they are left raw).")
  ln_placement: str = setting("terms", "With layer_norm, what is normalised: terms (each of "
                              "Eq. 5-7's terms on its own, then gated) or sum (their gated sum, "
                              "once).", choices=hmlstm.LN_PLACEMENTS)
  ln_cell: bool = setting(True, "With layer_norm, normalise c inside the tanh of Eq. 3.")
  st_gradient: str = setting("hard_sigmoid", "Straight-through derivative of the boundary: "
                             "hard_sigmoid (the paper's: a/2 inside |a x| < 1, else 0), linear "
                             "(a/2 everywhere) or sigmoid (of sigmoid(2 a x)).",
                             choices=boundary_lib.ST_GRADIENTS)
  st_local: bool = setting(False, "Not the paper's: the straight-through gradient trains each "
                           "detector's own weights and stops there (not into the states it read; "
                           "the forward pass is unchanged).")
  rate_weight: float = setting(0.0, "Weight of the boundary-rate penalty (not the paper's; 0: "
                               "off): each detector's rate kept in [rate_min, rate_max].")
  rate_min: tuple[float, ...] = setting((), "Per detector (layers 1..L-1), the lowest boundary "
                                        "rate the penalty allows, e.g. 0.1,0.02.")
  rate_max: tuple[float, ...] = setting((), "Per detector (layers 1..L-1), the highest boundary "
                                        "rate the penalty allows, e.g. 0.3,0.1.")
  schedule: str = setting("layers", "Order of the recurrence's layer-steps: layers (each step's "
                          "layers bottom to top) or two_phase (shorter dependent chain; same "
                          "numbers).", choices=schedule_lib.SCHEDULES)
  matmul_dtype: str | None = setting(
      None, "Matmul operand dtype (bfloat16: float32 accumulation and element-wise math).",
      choices={"float32": None, "bfloat16": "bfloat16"})

  def __post_init__(self):
    object.__setattr__(self, "layer_sizes", tuple(self.layer_sizes))
    if self.model not in MODELS:
      raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
    if not isinstance(self.output_size, int) or self.output_size < 1:
      raise ValueError(f"output_size must be a positive int, got {self.output_size!r}")
    if self.output_head not in OUTPUT_HEADS:
      raise ValueError(f"output_head must be one of {OUTPUT_HEADS}, got {self.output_head!r}")
    for name in ("rate_min", "rate_max"):
      object.__setattr__(self, name, tuple(float(r) for r in getattr(self, name)))
    if self.rate_weight < 0:
      raise ValueError(f"rate_weight must not be negative, got {self.rate_weight!r}")
    if self.rate_weight > 0:
      detectors = len(self.layer_sizes) - 1
      if self.model != "hmlstm" or detectors < 1:
        raise ValueError("rate_weight penalises boundary rates: it needs model=hmlstm with "
                         "at least 2 layers")
      if len(self.rate_min) != detectors or len(self.rate_max) != detectors:
        raise ValueError(f"rate_min and rate_max need one value per detector ({detectors}: "
                         f"layers 1..{detectors}), got {list(self.rate_min)} and "
                         f"{list(self.rate_max)}")
      if not all(0 <= lo <= hi <= 1 for lo, hi in zip(self.rate_min, self.rate_max)):
        raise ValueError(f"each band needs 0 <= rate_min <= rate_max <= 1, got "
                         f"{list(self.rate_min)} and {list(self.rate_max)}")

  @property
  def head_size(self) -> int:
    """Width of what the prediction head reads: ``output_size``, or d_L with ``'top'``."""
    return self.output_size if self.output_head == "module" else self.layer_sizes[-1]

  def recurrence(self, input_size: int) -> hmlstm.HMLSTMConfig:
    """The HM-LSTM (or LSTM stack) reading inputs of ``input_size``."""
    return hmlstm.HMLSTMConfig(input_size=input_size, layer_sizes=self.layer_sizes,
                               boundary=self.boundary, layer_norm=self.layer_norm,
                               matmul_dtype=self.matmul_dtype, ln_gain=self.ln_gain,
                               boundary_bias=self.boundary_bias, ln_boundary=self.ln_boundary,
                               schedule=self.schedule, ln_placement=self.ln_placement,
                               ln_cell=self.ln_cell, st_gradient=self.st_gradient,
                               st_local=self.st_local)


@dataclasses.dataclass(frozen=True)
class CharLMConfig(RecurrentConfig):
  """Static description of the character LM (hashable): :class:`RecurrentConfig` and

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
    self.hmlstm  # validates the rest

  @property
  def hmlstm(self) -> hmlstm.HMLSTMConfig:
    """The HM-LSTM part of the model."""
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
      **init_recurrence_and_output(k_rnn, k_out, config, config.hmlstm),
      "softmax": heads.init_softmax(k_soft, config.head_size, config.vocab_size),
  }


def init_recurrence_and_output(k_rnn: jax.Array, k_out: jax.Array, config: RecurrentConfig,
                               rnn_config: hmlstm.HMLSTMConfig) -> dict:
  """``hmlstm`` (:func:`hmlstm.init_params`; ``lstm`` for the baseline, :func:`lstm.init_params`)
  from ``k_rnn`` and, with ``output_head='module'``, ``output``
  (:func:`heads.init_output_module`) from ``k_out``."""
  rnn_init = lstm.init_params if config.model == "lstm" else hmlstm.init_params
  params = {config.model: rnn_init(k_rnn, rnn_config)}
  if config.output_head == "module":
    params["output"] = heads.init_output_module(k_out, config.layer_sizes, config.output_size)
  return params


def recurrence_and_output(params: dict, state: hmlstm.State, xs: jax.Array, slope,
                          key: jax.Array | None, *, config: RecurrentConfig,
                          rnn_config: hmlstm.HMLSTMConfig, deterministic: bool = False,
                          fast_backward: bool = True):
  """Eq. 1-9 (or the LSTM stack) over time-major ``xs`` (T, B, input), then Eq. 11-12.

  Returns ``(final_state, UnrollOutputs, h_e)`` with h^e (T, B, ``config.head_size``): the
  output module's, or h^L with ``output_head='top'``; the LSTM's outputs have ``z = ()``.
  """
  if config.model == "lstm":
    final, hs = lstm.unroll(params["lstm"], state, xs, config=rnn_config)
    outs = hmlstm.UnrollOutputs(h=hs, z=())
  else:
    final, outs = hmlstm.unroll(params["hmlstm"], state, xs, slope, key, config=rnn_config,
                                deterministic=deterministic, fast_backward=fast_backward)
  return final, outs, _head_input(params, config, outs.h)


def _head_input(params: dict, config: RecurrentConfig, hs) -> jax.Array:
  """h^e: the output module of Eq. 11-12 over every layer's h, or h^L with
  ``output_head='top'``; ``hs`` per layer (..., d_ℓ), one step or stacked over time."""
  if config.output_head == "top":
    return hs[-1]
  return heads.output_module(params["output"], hs)


def recurrence_step(params: dict, state: hmlstm.State, x_t: jax.Array, slope,
                    key: jax.Array | None = None, *, config: RecurrentConfig,
                    rnn_config: hmlstm.HMLSTMConfig, deterministic: bool = True,
                    skip_copy: bool = False) -> tuple[hmlstm.State, jax.Array]:
  """One step of :func:`recurrence_and_output`: Eq. 1-9 (or the LSTM stack) on x_t (B, input),
  then Eq. 11-12. Returns ``(state, h_e)`` with h^e (B, ``config.head_size``).

  ``skip_copy``: the HM-LSTM's layers whose rows all COPY do no work (:func:`hmlstm.step`);
  the same numbers. The output module always runs: its gates read every layer, and layer 1
  updates at every step.
  """
  if config.model == "lstm":
    state, hs = lstm.unroll(params["lstm"], state, x_t[None], config=rnn_config)
    hs = tuple(h[0] for h in hs)
  else:
    state = hmlstm.step(params["hmlstm"], state, x_t, slope, key, config=rnn_config,
                        deterministic=deterministic, skip_copy=skip_copy)
    hs = tuple(layer.h for layer in state)
  return state, _head_input(params, config, hs)


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
  state, h_e = recurrence_step(params, state, params["embed"][token], slope, key, config=config,
                               rnn_config=config.hmlstm, deterministic=deterministic,
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
  final, outs, h_e = recurrence_and_output(params, state, xs, slope, key, config=config,
                                           rnn_config=config.hmlstm, deterministic=deterministic,
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


def boundary_penalty(rnn: hmlstm.UnrollOutputs, config: RecurrentConfig,
                     mask: jax.Array | None = None) -> jax.Array:
  """``rate_weight`` × :func:`hmlstm.boundary_rate_penalty` of an unroll's boundaries (0 when
  the weight is 0 or the model has no boundaries); ``mask`` (B, T), batch-major, as the
  experiments' batches. Added to the training loss, never to the reported NLL."""
  if config.rate_weight == 0 or not rnn.z:
    return jnp.float32(0.0)
  mask = None if mask is None else jnp.asarray(mask).T
  return config.rate_weight * hmlstm.boundary_rate_penalty(rnn.z, config.rate_min,
                                                           config.rate_max, mask)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """−log softmax(logits)[target] per position, in nats: (B, T, V), (B, T) → (B, T)."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
