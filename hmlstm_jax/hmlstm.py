"""The L-layer HM-LSTM: configuration, parameters, state, one step, and the scan over time.

decisions.md §1: layers ℓ = 1..L, h^0_t = x_t and z^0_t = 1. At each step the layers run bottom
to top: layer ℓ reads its own state at t-1, the layer below at t and the layer above at
t-1 (:mod:`hmlstm_jax.cell` holds the per-layer equations). The last layer has no
boundary detector and no top-down input; its z is 0 forever.

The equivalent Python loop of :func:`unroll`::

    for t in range(T):
      state = step(params, state, xs[t], slope, keys[t], config=config)
      hs.append([layer.h for layer in state]); zs.append([layer.z for layer in state])
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hmlstm_jax import boundary as boundary_lib
from hmlstm_jax import cell
from hmlstm_jax import schedule as schedule_lib
from hmlstm_jax.settings import setting

# Codes of the operation table (decisions.md §1), as returned by `operations`.
COPY, UPDATE, FLUSH = 0, 1, 2
OPERATION_NAMES = ("COPY", "UPDATE", "FLUSH")
MATMUL_DTYPES = (None, "float32", "bfloat16")
LN_PLACEMENTS = ("terms", "sum")


@dataclasses.dataclass(frozen=True)
class HMLSTMSettings:
  """The HM-LSTM's settings apart from its input width, each declared once: the experiments'
  model configs extend this class, so that each is also an absl flag with this help
  (:mod:`hmlstm_jax.settings`). Attributes as in :class:`HMLSTMConfig`."""
  layer_sizes: tuple[int, ...] = setting((512, 512, 512), "Units per layer, e.g. 512,512,512.")
  boundary: str = setting("step", "Boundary function f_bound (Eq. 8): step, sample (Bernoulli) "
                          "or soft (hard sigmoid).", choices=boundary_lib.BOUNDARY_VARIANTS)
  layer_norm: bool = setting(False, "Layer normalisation (the paper's best results use it).")
  matmul_dtype: str | None = setting(
      None, "Matmul operand dtype (bfloat16: float32 accumulation and element-wise math).",
      choices={"float32": None, "bfloat16": "bfloat16"})
  ln_gain: float = setting(1.0, "Layer-norm gains at initialisation (Ba et al.: 1).")
  boundary_bias: float = setting(0.0, "Initial bias of the boundary detectors' rows (0: about "
                                 "half the steps end a segment at first; negative: fewer).")
  ln_boundary: bool = setting(False, "With layer_norm, normalise the boundary rows too (their "
                              "own gain and bias; by default they are left raw).")
  schedule: str = setting("layers", "Order of the recurrence's layer-steps: layers (each step's "
                          "layers bottom to top) or two_phase (shorter dependent chain; same "
                          "numbers).", choices=schedule_lib.SCHEDULES)
  ln_placement: str = setting("terms", "With layer_norm, what is normalised: terms (each of "
                              "Eq. 5-7's terms on its own, then gated) or sum (their gated sum, "
                              "once).", choices=LN_PLACEMENTS)
  ln_cell: bool = setting(True, "With layer_norm, normalise c inside the tanh of Eq. 3.")
  st_gradient: str = setting("hard_sigmoid", "Straight-through derivative of the boundary: "
                             "hard_sigmoid (the paper's: a/2 inside |a x| < 1, else 0), linear "
                             "(a/2 everywhere) or sigmoid (of sigmoid(2 a x)).",
                             choices=boundary_lib.ST_GRADIENTS)
  scan_unroll: int = setting(1, "Time steps per iteration of the recurrence's lax.scan "
                             "(forward and backward): fewer loop iterations, a larger program; "
                             "the same numbers. A speed setting (on GPUs an iteration is "
                             "costly).", changeable=True)
  st_local: bool = setting(False, "Not the paper's: the straight-through gradient trains each "
                           "detector's own weights and stops there (not into the states it read; "
                           "the forward pass is unchanged).")

  def __post_init__(self):
    object.__setattr__(self, "layer_sizes", tuple(_as_int(d) for d in self.layer_sizes))
    if self.matmul_dtype is not None and not isinstance(self.matmul_dtype, str):
      try:  # jnp.bfloat16 or np.dtype('bfloat16') as well as the string
        object.__setattr__(self, "matmul_dtype", jnp.dtype(self.matmul_dtype).name)
      except TypeError:
        pass  # named in the check below
    if not self.ln_gain > 0:
      raise ValueError(f"ln_gain must be positive, got {self.ln_gain!r}")
    if self.st_local and self.ln_boundary:
      raise ValueError("st_local cuts the boundary row's gradient into the states, which "
                       "ln_boundary mixes with the gate rows' statistics: use one of the two")
    if self.ln_boundary and not self.layer_norm:
      raise ValueError("ln_boundary normalises the boundary rows under layer norm: "
                       "set layer_norm too, or leave ln_boundary off")
    if not self.layer_sizes or any(not isinstance(d, int) or d < 1 for d in self.layer_sizes):
      raise ValueError(f"layer_sizes must be a non-empty sequence of positive ints, got {self.layer_sizes!r}")
    if self.boundary not in boundary_lib.BOUNDARY_VARIANTS:
      raise ValueError(f"boundary must be one of {boundary_lib.BOUNDARY_VARIANTS}, got {self.boundary!r}")
    if self.ln_placement not in LN_PLACEMENTS:
      raise ValueError(f"ln_placement must be one of {LN_PLACEMENTS}, got {self.ln_placement!r}")
    if self.st_gradient not in boundary_lib.ST_GRADIENTS:
      raise ValueError(f"st_gradient must be one of {boundary_lib.ST_GRADIENTS}, "
                       f"got {self.st_gradient!r}")
    if isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, int) or (
        self.scan_unroll < 1):
      raise ValueError(f"scan_unroll must be a positive int, got {self.scan_unroll!r}")
    if self.schedule not in schedule_lib.SCHEDULES:
      raise ValueError(f"schedule must be one of {schedule_lib.SCHEDULES}, got {self.schedule!r}")
    if self.matmul_dtype not in MATMUL_DTYPES:
      raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {self.matmul_dtype!r}")

  def with_input(self, input_size: int) -> "HMLSTMConfig":
    """The :class:`HMLSTMConfig` of these settings reading inputs of ``input_size``."""
    return HMLSTMConfig(input_size=input_size, **{
        f.name: getattr(self, f.name) for f in dataclasses.fields(HMLSTMSettings)})


@dataclasses.dataclass(frozen=True)
class HMLSTMConfig(HMLSTMSettings):
  """Static description of an HM-LSTM stack (hashable: pass it as a static jit argument).

  Attributes:
    input_size: width of x_t = h^0_t (128 for the character LM's embedding).
    layer_sizes: d_1, ..., d_L.
    boundary: f_bound of Eq. 8: ``'step'`` (default, the paper's best), ``'sample'`` or
      ``'soft'``.
    layer_norm: layer normalisation of the pre-activation (where: ``ln_placement``) and, with
      ``ln_cell``, of c inside the tanh.
    ln_placement: where layer norm applies to the pre-activation (decisions.md §3):
      ``'terms'`` (each of Eq. 5-7's three terms normalised on its own, then gated) or
      ``'sum'`` (their gated sum normalised once, before the bias; one fused matmul).
    ln_cell: with layer norm, normalise c inside the tanh of Eq. 3 (Ba et al.'s LN-LSTM; the
      stored c is not normalised).
    st_gradient: the straight-through derivative of the boundary (decisions.md §2):
      ``'hard_sigmoid'`` (the paper's: a/2 inside |a·x| < 1, 0 outside), ``'linear'`` (a/2
      everywhere) or ``'sigmoid'`` (the derivative of sigmoid(2a·x)).
    st_local: [not the paper's] the straight-through gradient trains each detector's own row
      (its weights and bias) and stops there, instead of flowing on into the states and
      boundaries the detector read, and a copied z passes its gradient to the z it copies
      without the COPY mask's share (decisions.md §2): the forward pass is the same bit for bit.
    ln_gain: the layer-norm gains γ at initialisation. [decision] 1, as Ba et al.; 0.5 tames
      the growth of the layer-normalised HM-LSTM's gradient back in time and scores 0.14
      BPC better in the small-scale study, but its upper layers then compute on nearly every
      step (decisions.md §3, §6).
    ln_boundary: with layer norm, also normalise each term's boundary row ž (with the
      statistics of its gate rows, its own gain and bias; :func:`cell.normalized_term`).
      [decision] off: the paper's layer norm is over the LSTM's gates and says nothing of
      ž; the study's row for it is in decisions.md §6.
    boundary_bias: the initial bias of the boundary rows ž (0: with the step function a
      boundary fires when the rest of the pre-activation is positive, about half the time at
      initialisation; negative: boundaries start rare).
    matmul_dtype: ``None`` (matmuls in the inputs' dtype) or ``'bfloat16'``: the matmul
      operands in bf16 with float32 accumulation, everything else in float32 (for GPU, TPU
      and CPUs with bf16 units).
    schedule: the order of the layer-steps in :func:`unroll` and its backward
      (:mod:`hmlstm_jax.schedule`): ``'layers'`` (each step's layers bottom to top) or
      ``'two_phase'`` (the layers of a step run in two independent phases; dependent chain
      2T + L − 2 instead of L·T). The same forward numbers bit for bit; gradients the same up
      to float32 rounding (XLA may sum the two loop bodies' cotangents in another order).
    scan_unroll: time steps per iteration of the forward and backward ``lax.scan``
      (``lax.scan``'s ``unroll``); speed only: the same numbers up to float rounding.
  """
  input_size: int = dataclasses.field(kw_only=True)

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "input_size", _as_int(self.input_size))
    if not isinstance(self.input_size, int) or self.input_size < 1:
      raise ValueError(f"input_size must be a positive int, got {self.input_size!r}")

  @property
  def num_layers(self) -> int:
    return len(self.layer_sizes)

  @property
  def separate_terms(self) -> bool:
    """Whether Eq. 5-7's terms are normalised one by one (so their matmuls stay apart)."""
    return self.layer_norm and self.ln_placement == "terms"


def _as_int(value):
  """A NumPy integer (``np.int64(8)``, a width read from an array) as a Python int; any other
  value as it is, for the checks to name."""
  return int(value) if isinstance(value, np.integer) else value


class LayerState(NamedTuple):
  """State (h^ℓ, c^ℓ, z^ℓ) of one layer."""
  h: jax.Array  # (B, d_ℓ)
  c: jax.Array  # (B, d_ℓ)
  z: jax.Array  # (B, 1), broadcasts against h; always 0 on the last layer


State = tuple[LayerState, ...]


class UnrollOutputs(NamedTuple):
  """Per-step outputs of :func:`unroll`, time-major."""
  h: tuple[jax.Array, ...]  # per layer (T, B, d_ℓ): h^ℓ_t
  z: tuple[jax.Array, ...]  # per layer (T, B, 1): z^ℓ_t


def num_rows(config: HMLSTMConfig, layer: int) -> int:
  """R_ℓ: 4·d_ℓ + 1 rows (f, i, o, g, ž), 4·d_L on the last layer (no detector)."""
  d = config.layer_sizes[layer]
  return 4 * d + (0 if layer == config.num_layers - 1 else 1)


def _dense_init(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
  return jax.random.normal(key, (fan_in, fan_out), jnp.float32) / jnp.sqrt(jnp.float32(fan_in))


def init_params(key: jax.Array, config: HMLSTMConfig,
                dtype=jnp.float32) -> tuple[dict[str, Any], ...]:
  """Parameters of Eq. 5-7 as a tuple with one dict per layer, in the paper's notation.

  Layer ℓ (index ℓ-1) holds, with R_ℓ = 4·d_ℓ + 1 rows ordered f, i, o, g, ž (4·d_L on the
  last layer):

  * ``W``     (d_(ℓ-1), R_ℓ)  bottom-up W_(ℓ-1)ℓ (d_0 = ``config.input_size``);
  * ``U``     (d_ℓ, R_ℓ)      recurrent U_ℓℓ;
  * ``U_top`` (d_(ℓ+1), R_ℓ)  top-down U_(ℓ+1)ℓ, absent on the last layer;
  * ``b``     (R_ℓ,)          bias;
  * with layer norm, ``ln_W``, ``ln_U``, ``ln_U_top`` (each ``{'scale', 'bias'}`` of 4·d_ℓ,
    or R_ℓ with ``config.ln_boundary``), or with ``ln_placement='sum'`` one ``ln_s`` of that
    size, and ``ln_c`` (d_ℓ, with ``config.ln_cell``): gains ``config.ln_gain``, biases 0.

  [decision] Matrices are N(0, 1/fan_in); the bias is 0 except the forget gate's, 1, and the
  boundary row's, ``config.boundary_bias`` (0 by default). Drawn in float32 and cast to
  ``dtype`` (float64 with x64 on, bfloat16 for a bf16 model; make the state with
  :func:`initial_state` in the same dtype).
  """
  params = []
  L = config.num_layers
  for layer, d in enumerate(config.layer_sizes):
    key, k_w, k_u, k_top = jax.random.split(key, 4)
    rows = num_rows(config, layer)
    d_below = config.input_size if layer == 0 else config.layer_sizes[layer - 1]
    p = {"W": _dense_init(k_w, d_below, rows), "U": _dense_init(k_u, d, rows)}
    if layer < L - 1:
      p["U_top"] = _dense_init(k_top, config.layer_sizes[layer + 1], rows)
    p["b"] = jnp.zeros((rows,), jnp.float32).at[:d].set(1.0).at[4 * d:].set(config.boundary_bias)
    if config.layer_norm:
      gate_ln = lambda n: cell.layer_norm_params(n, config.ln_gain)
      normalised = rows if config.ln_boundary else 4 * d
      if config.ln_placement == "sum":
        p["ln_s"] = gate_ln(normalised)
      else:
        p["ln_W"], p["ln_U"] = gate_ln(normalised), gate_ln(normalised)
        if layer < L - 1:
          p["ln_U_top"] = gate_ln(normalised)
      if config.ln_cell:
        p["ln_c"] = gate_ln(d)
    params.append(p)
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), tuple(params))


def initial_state(config: HMLSTMConfig, batch_size: int, dtype=jnp.float32) -> State:
  """h = c = 0 and z = 0 for every layer (decisions.md §1 decision)."""
  return tuple(
      LayerState(h=jnp.zeros((batch_size, d), dtype), c=jnp.zeros((batch_size, d), dtype),
                 z=jnp.zeros((batch_size, 1), dtype))
      for d in config.layer_sizes)


def boundary_noise(key: jax.Array, config: HMLSTMConfig, batch_size: int,
                   dtype=jnp.float32) -> jax.Array:
  """The uniform noise u of one step for the ``'sample'`` variant: z^ℓ_t = 1[ž^ℓ_t > u^ℓ].

  Shape (L-1, B, 1): one value per layer with a boundary detector and batch element.
  :func:`step` draws exactly this from its ``key``; :func:`unroll` uses
  ``jax.random.split(key, T)``, one key per step.
  """
  return jax.random.uniform(key, (config.num_layers - 1, batch_size, 1), dtype)


def _check_state(config: HMLSTMConfig, state: State) -> None:
  if len(state) != config.num_layers:
    raise ValueError(f"state has {len(state)} layers, config has {config.num_layers}; "
                     "make it with initial_state(config, batch_size)")


@functools.lru_cache(maxsize=64)
def _expected_params(config: HMLSTMConfig) -> tuple[dict[str, tuple[int, ...]], ...]:
  """Per layer, each parameter's path (``"['ln_W']['scale']"``) and shape for ``config``."""
  abstract = jax.eval_shape(lambda key: init_params(key, config), jax.random.key(0))
  return tuple({jax.tree_util.keystr(path): leaf.shape
                for path, leaf in jax.tree_util.tree_leaves_with_path(layer)}
               for layer in abstract)


def check_params(config: HMLSTMConfig, params) -> None:
  """The parameters against the config (Eq. 5-7's matrices, bias and layer-norm gains of
  :func:`init_params`): the same layers, names and shapes. Raises ValueError naming the first
  leaf that differs and the settings that decide it (params of another width, input size,
  depth or layer-norm setting failed deep inside the matmuls before)."""
  expected = _expected_params(config)
  decided = (f"layer_sizes {config.layer_sizes}, input_size {config.input_size}, layer_norm "
             f"{config.layer_norm}, ln_placement {config.ln_placement!r}")
  if not isinstance(params, (tuple, list)) or len(params) != len(expected):
    got = f"{len(params)} layers" if isinstance(params, (tuple, list)) else type(params).__name__
    raise ValueError(f"params must be a tuple of {len(expected)} per-layer dicts (init_params for "
                     f"this config: {decided}), got {got}")
  for layer, (p, want) in enumerate(zip(params, expected)):
    got = {jax.tree_util.keystr(path): jnp.shape(leaf)
           for path, leaf in jax.tree_util.tree_leaves_with_path(p)}
    for name in sorted(set(want) | set(got)):
      if got.get(name) != want.get(name):
        what = ("is missing" if name not in got else "is not a parameter of this config"
                if name not in want else f"has shape {got[name]}, this config needs {want[name]}")
        raise ValueError(f"params[{layer}]{name} {what} ({decided}): pass the params made "
                         "by init_params for this config")


#: The layouts :func:`check_inputs` knows: the shape of the inputs, in the user's words.
LAYOUTS = {"step": "(B, {})", "time_major": "(T, B, {})", "batch_major": "(B, T, {})"}


def check_inputs(config: HMLSTMConfig, state: State, x: jax.Array, slope, layout: str,
                 params=None) -> None:
  """The checks at the public boundary of :func:`step` (``layout='step'``, x: (B, input)) and
  :func:`unroll` (``'time_major'``: (T, B, input), or ``'batch_major'``: (B, T, input), as the
  user passed them): the params against the config (:func:`check_params`, when given),
  layers, widths, batch and dtype of the state against the inputs, and a concrete slope
  a > 0 (:func:`boundary.check_slope`). Raises ValueError naming both shapes, as passed, and
  the likely mistake."""
  if params is not None:
    check_params(config, params)
  _check_state(config, state)
  want = LAYOUTS[layout].format(config.input_size)
  if x.ndim != (2 if layout == "step" else 3) or x.shape[-1] != config.input_size:
    raise ValueError(f"inputs must be {want}, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"inputs must be floating point (the h^0 of Eq. 7), got {x.dtype}: "
                     "embed token ids first (e.g. one-hot or an embedding table), or cast")
  batch, other = (x.shape[1], x.shape[0]) if layout == "time_major" else (x.shape[0], x.shape[1])
  for layer, (s, d) in enumerate(zip(state, config.layer_sizes)):
    shapes = (jnp.shape(s.h), jnp.shape(s.c), jnp.shape(s.z))
    if shapes != ((batch, d), (batch, d), (batch, 1)):
      hint = ""
      if layout != "step" and shapes[0][:1] == (other,):
        hint = {"time_major": "; the inputs look batch-major (B, T, input): pass "
                              "time_major=False, or jnp.swapaxes(xs, 0, 1)",
                "batch_major": "; the inputs look time-major (T, B, input): pass "
                               "time_major=True, or jnp.swapaxes(xs, 0, 1)"}[layout]
      raise ValueError(f"state of layer {layer + 1} has shapes h {shapes[0]}, c {shapes[1]}, "
                       f"z {shapes[2]}, but inputs {x.shape} {want} give batch {batch} and the "
                       f"config width {d}: make it with initial_state(config, {batch}){hint}")
    if jnp.result_type(s.h) != x.dtype:
      raise ValueError(f"state is {jnp.result_type(s.h)} but the inputs are {x.dtype}: make the "
                       f"state with initial_state(config, batch_size, {x.dtype}) or cast the "
                       "inputs")
  boundary_lib.check_slope(slope)


def compute_params(params, dtype):
  """The dtype policy (as Flax's ``dtype`` / ``param_dtype``): the recurrence computes in the
  inputs' dtype, so parameters stored in another (float32 params, bfloat16 inputs and state)
  are cast to it at the boundary, in :func:`unroll` and :func:`step` alike; their gradients
  come back in the stored dtype."""
  return jax.tree_util.tree_map(
      lambda p: p if jnp.result_type(p) == dtype else jnp.asarray(p).astype(dtype), params)


_MATRICES = ("W", "U", "U_top")


def _small_params(params) -> tuple[dict, ...]:
  """Per layer, the parameters that are not matrices: ``b`` and the layer-norm gains/biases."""
  return tuple({k: v for k, v in p.items() if k not in _MATRICES} for p in params)


def _kernels(params, apart: bool = False) -> tuple[tuple[jax.Array, ...], ...]:
  """Per layer, :func:`cell.layer_kernels` (``apart``: each term its own, as :func:`step`
  uses them); layer 1's bottom-up term is hoisted out of the step."""
  return tuple(cell.layer_kernels(p, hoisted=layer == 0, apart=apart)
               for layer, p in enumerate(params))


def _local_detector_column(config: HMLSTMConfig, layer: int) -> int | None:
  """The ž column of ``layer``'s matmul outputs when ``st_local`` cuts its gradient into the
  matmul inputs (decisions.md §2), else ``None`` (off, or the last layer: no detector)."""
  if not config.st_local or layer == config.num_layers - 1:
    return None
  return 4 * config.layer_sizes[layer]


def _layer_core(small, projections, bottom_up, c_prev, h_prev, z_prev, z_below, slope, noise,
                config: HMLSTMConfig):
  """Eq. 2-9 of one layer from its matmul outputs: the element-wise part of the step."""
  s = cell.combine_terms(small, projections, z_prev, z_below, bottom_up, config.st_local)
  return cell.layer_update(s, c_prev, h_prev, z_prev, z_below, slope, variant=config.boundary,
                           ln_c=small.get("ln_c"), noise=noise, st_gradient=config.st_gradient,
                           st_local=config.st_local)


def _layer_context(above: State, below: State, layer: int):
  """(h_above, h_below, z_below) of ``layer`` (Eq. 6-7): h^(ℓ+1)_{t-1} from ``above``,
  h^(ℓ-1)_t and z^(ℓ-1)_t from ``below``. One step (the same state, in which the layer below
  has already taken this step and the layer above has not) or stacked over time."""
  h_above = above[layer + 1].h if layer < len(above) - 1 else None
  if layer == 0:
    return h_above, None, jnp.ones_like(below[0].z)  # z^0_t = 1; h^0_t enters as bottom_up
  return h_above, below[layer - 1].h, below[layer - 1].z


def _forward_body(small, kernels, slope, config: HMLSTMConfig, keep_residuals: bool,
                  skip_copy: bool = False, one_step: bool = False):
  """The body of the forward loop for :func:`schedule.skewed_scan`: the given layers take
  one step each, in order, every one reading the state as the layers before it left it.

  Per layer, the inputs are (layer 1's W x_t or ``None``, its boundary noise or ``None``,
  ``valid`` and ``reset`` (B, 1) or ``None``: :func:`_per_layer_inputs`) and the outputs
  (h, z) and, with ``keep_residuals``, what the custom backward of :func:`_recurrence` keeps
  besides: c and the matmul outputs. (The state before each step and the matmul inputs
  follow from h, z and c after the loop: fewer buffers written in it.) A row with ``reset``
  starts the step from the zero state; a row not ``valid`` keeps its state (its outputs are
  the kept state).

  With ``one_step`` (:func:`step`) ``kernels`` are :func:`cell.layer_kernels` ``apart`` and
  each term of Eq. 5-7 is its own matmul, gated after it. With ``skip_copy`` (:func:`step` only)
  a layer above the first whose rows all COPY does no work (:func:`layer_needed` decides,
  ``lax.cond`` runs the layer or hands its state back), and neither does a term whose gate is
  0 in every row.
  """
  def layer_step(state, layer, bottom_up, noise, reset):
    # A reset zeroes the layer's own state; the h above it need not be: its term is gated by
    # z^ℓ_{t-1} (Eq. 6), which the reset zeroes.
    own = _zero_where(reset, state[layer])
    h_above, h_below, z_below = _layer_context(state, state, layer)
    apart = one_step or config.separate_terms
    ins = cell.matmul_inputs(apart, own.h, own.z, h_above, z_below, h_below)
    # The gate of each of the terms apart (matmul_inputs' order), for skip_copy and the sum.
    gates = ((None,) + ((own.z,) if h_above is not None else ())
             + ((z_below,) if h_below is not None else ())) if apart else (None,)
    column = _local_detector_column(config, layer)
    projs = tuple(_projection(config, x, k, column, gate if skip_copy else None)
                  for x, k, gate in zip(ins, kernels[layer], gates))
    if apart and not config.separate_terms:
      projs = (cell.gated_sum(small[layer]["b"].shape[-1], projs, gates, config.st_local),)
    c, h, z = _layer_core(small[layer], projs, bottom_up, own.c, own.h, own.z, z_below, slope,
                          noise, config)
    return LayerState(h=h, c=c, z=z), projs

  def body(state, xs_t, layers, active):
    state, ys = list(state), [None] * len(state)
    for layer in layers:
      bottom_up, noise, valid, reset = xs_t[layer]
      own = state[layer]
      if skip_copy and layer > 0:
        needed = layer_needed(_zero_where(reset, own.z), state[layer - 1].z, valid)
        new = jax.lax.cond(needed,
                           lambda s: layer_step(s, layer, bottom_up, noise, reset)[0],
                           lambda s: _zero_where(reset, s[layer]), tuple(state))
        projs = None
      else:
        new, projs = layer_step(state, layer, bottom_up, noise, reset)
      if valid is not None:
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(valid > 0, n, o), new, own)
      state[layer] = schedule_lib.keep(active[layer], new, own)
      ys[layer] = (new.h, new.z) + ((new.c, projs) if keep_residuals else ())
    return tuple(state), tuple(ys)
  return body


def _projection(config: HMLSTMConfig, x: jax.Array, kernel: jax.Array, column: int | None,
                gate: jax.Array | None) -> jax.Array:
  """x @ kernel, one matmul of Eq. 5-7; with ``column`` (``st_local``) that ž column's
  gradient reaches the kernel only (:func:`cell.detach_detector_inputs`).

  With a ``gate`` (``skip_copy``, one step, the terms apart) a term whose gate is 0 in every
  row (the top-down term while no row has z^ℓ_{t-1}, the bottom-up one while none has
  z^(ℓ-1)_t) is zeros instead of a matmul (``lax.cond``): the gate multiplies it by 0 either
  way, so s is the same.
  """
  def compute():
    p = cell.matmul(x, kernel, config.matmul_dtype)
    return p if column is None else cell.detach_detector_inputs(p, x, kernel, column,
                                                                  config.matmul_dtype)
  if gate is None:
    return compute()
  out = jax.eval_shape(compute)
  return jax.lax.cond(jnp.any(gate != 0), compute, lambda: jnp.zeros(out.shape, out.dtype))


def _zero_where(reset, tree):
  """``tree`` with the rows where ``reset`` (B, 1) is set replaced by zeros (the initial
  state); ``tree`` itself when ``reset`` or ``tree`` is ``None``."""
  if reset is None or tree is None:
    return tree
  return jax.tree_util.tree_map(lambda a: jnp.where(reset > 0, jnp.zeros_like(a), a), tree)


def layer_needed(z_prev: jax.Array, z_below: jax.Array, valid: jax.Array | None = None
                 ) -> jax.Array:
  """Whether any row of a layer leaves COPY at this step (decisions.md §1 table): a scalar
  bool, false exactly when z^ℓ_{t-1} = 0 and z^(ℓ-1)_t = 0 in every row (every ``valid`` row:
  the others keep their state anyway). On such a step Eq. 2-4 give c^ℓ_t = c^ℓ_{t-1},
  h^ℓ_t = h^ℓ_{t-1} and z^ℓ_t = z^ℓ_{t-1} = 0 whatever the layer would compute, so skipping
  its matmul and its element-wise work changes nothing (the ``'soft'`` variant's z is rarely
  exactly 0: it seldom skips)."""
  leaves = (z_prev != 0) | (z_below != 0)
  if valid is not None:
    leaves = leaves & (valid > 0)
  return jnp.any(leaves)


def _per_layer_inputs(config: HMLSTMConfig, bottom_up_1, noise, valid=None, reset=None) -> tuple:
  """The forward loop's inputs per layer: (W x_t for layer 1, the layer's noise or ``None``,
  ``valid``, ``reset``); ``noise`` is (..., L-1, B, 1), ``valid`` and ``reset`` (..., B, 1)
  or ``None``, with or without a leading time axis."""
  L = config.num_layers
  return tuple((bottom_up_1 if layer == 0 else None,
                None if noise is None or layer == L - 1 else noise[..., layer, :, :],
                valid, reset)
               for layer in range(L))


def _cast(tree, dtype: str | None):
  return tree if dtype is None else jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)


def _scan(config: HMLSTMConfig, small, kernels, state: State, bottom_up_1, slope, noise,
          keep_residuals: bool, valid=None, reset=None):
  """The forward recurrence in ``config.schedule``'s order (the plain, autodiff-able one).

  Returns the final state and, per layer, the outputs of :func:`_forward_body` stacked over
  time.
  """
  kernels = _cast(kernels, config.matmul_dtype)  # once, outside the loop
  lags, order = schedule_lib.plan(config.schedule, config.num_layers)
  body = _forward_body(small, kernels, slope, config, keep_residuals)
  return schedule_lib.skewed_scan(body, state,
                                  _per_layer_inputs(config, bottom_up_1, noise, valid, reset),
                                  bottom_up_1.shape[0], lags, order, unroll=config.scan_unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(config: HMLSTMConfig, small, kernels, state: State, bottom_up_1, slope, noise,
                valid, reset):
  """The scan over time with a backward pass that defers every weight gradient.

  Forward: as :func:`_scan`. Backward: the reverse loop (in the schedule's mirrored order)
  computes only what the recurrence needs step by step (the cotangents of the state and of
  each matmul output, and the matmul-input cotangent dX = dY Kᵀ); every kernel gradient is
  then one large matmul over all T·B rows, dK = Xᵀ dY, instead of T small accumulations
  inside the loop. ``valid`` and ``reset`` (T, B, 1) or ``None`` (:func:`unroll`): a row's
  cotangent passes a step it does not take unchanged, and stops at a reset.
  """
  final, ys = _scan(config, small, kernels, state, bottom_up_1, slope, noise, False, valid,
                    reset)
  return final, tuple(y[0] for y in ys), tuple(y[1] for y in ys)


def _recurrence_fwd(config, small, kernels, state, bottom_up_1, slope, noise, valid, reset):
  final, ys = _scan(config, small, kernels, state, bottom_up_1, slope, noise, True, valid, reset)
  hs, zs, cs, projs = (tuple(y[i] for y in ys) for i in range(4))
  residuals = (small, kernels, state, hs, zs, cs, projs, bottom_up_1, slope, noise, valid, reset)
  return (final, hs, zs), residuals


def _states_before(state: State, hs, zs, cs) -> State:
  """Every layer's state before each step, (T, B, ·): the initial state, then the outputs
  of steps 0 … T-2."""
  shift = lambda first, xs: jnp.concatenate([first[None], xs[:-1]], axis=0)
  return tuple(LayerState(h=shift(s.h, h), c=shift(s.c, c), z=shift(s.z, z))
               for s, h, z, c in zip(state, hs, zs, cs))


class _StepRecord(NamedTuple):
  """What the reverse loop reads of one layer at one step (time-major (T, …) in the scan)."""
  own: LayerState           # the layer's state before the step
  h_above: Any              # h^(ℓ+1)_(t-1) (top-down input), or None on the last layer
  h_below: Any              # h^(ℓ-1)_t (bottom-up input), or None on layer 1
  z_below: Any              # z^(ℓ-1)_t (ones on layer 1: z^0 = 1)
  projs: Any                # the step's projections (Eq. 5-7's matmuls), as the forward
  bottom_up: Any            # layer 1's hoisted W x_t, or None
  noise: Any                # the 'sample' variant's uniform noise, or None
  valid: Any                # (B, 1) whether the row takes the step, or None
  reset: Any                # (B, 1) whether the row starts afresh, or None
  d_h: jax.Array            # the cotangent of the step's output h
  d_z: jax.Array            # the cotangent of the step's output z


def _backward_body(small, kernels_c, slope, config: HMLSTMConfig):
  """The body of the reverse loop: the given layers' backward at their own step, in order.

  The carry is, per layer, the cotangent of its state at the step it takes next, gathered
  from its own later step and from the layer below's later step (the top-down input), and
  what the layer above sent at the same step (the bottom-up input and its boundary). The
  sums are formed in the same order whatever the schedule, so both give the same bits.
  """
  L, dtype = config.num_layers, config.matmul_dtype

  def body(carry, xs_t, layers, active):
    acc, below = list(carry[0]), list(carry[1])
    ys = [None] * L
    for layer in layers:
      x = xs_t[layer]
      own, valid = x.own, x.valid
      d_h, d_z, d_c = acc[layer].h + x.d_h, acc[layer].z + x.d_z, acc[layer].c
      if layer < L - 1:
        d_h, d_z = d_h + below[layer][0], d_z + below[layer][1] + below[layer][2]
      if valid is not None:  # a step the row does not take passes its cotangent through
        through = LayerState(*(jnp.where(valid > 0, 0.0, d) for d in (d_h, d_c, d_z)))
        d_h, d_c, d_z = (jnp.where(valid > 0, d, 0.0) for d in (d_h, d_c, d_z))
      core = lambda sm, pr, b, c, h, z, zb: _layer_core(sm, pr, b, c, h, z, zb, slope, x.noise,
                                                         config)
      _, core_vjp = jax.vjp(core, small[layer], x.projs, x.bottom_up, own.c, own.h, own.z,
                            x.z_below)
      # Through the cell (Eq. 2-9 after the matmuls) ...
      (d_small, d_projs, d_bu, dc_prev, dh_prev_cell, dz_prev_cell,
       dz_below_cell) = core_vjp((d_c, d_h, d_z))
      column = _local_detector_column(config, layer)
      if column is not None:  # the ž column trains its kernel column only, not the inputs
        d_projs_in = tuple(dp.at[:, column].set(0.0) for dp in d_projs)
      else:
        d_projs_in = d_projs
      d_ins = tuple(cell.matmul(dp, k.T, dtype) for dp, k in zip(d_projs_in, kernels_c[layer]))
      _, inputs_vjp = jax.vjp(functools.partial(cell.matmul_inputs, config.separate_terms),
                              own.h, own.z, x.h_above, x.z_below, x.h_below)
      # ... and through the matmuls' inputs (the gates z multiply them, Eq. 5-7).
      dh_prev_mm, dz_prev_mm, dh_above, dz_below_mm, dh_below = inputs_vjp(d_ins)
      keep = functools.partial(schedule_lib.keep, active[layer])
      d_own = _zero_where(x.reset, LayerState(h=dh_prev_cell + dh_prev_mm, c=dc_prev,
                                              z=dz_prev_cell + dz_prev_mm))
      if valid is not None:
        d_own = jax.tree_util.tree_map(jnp.add, d_own, through)
      acc[layer] = keep(d_own, acc[layer])
      if layer < L - 1:
        acc[layer + 1] = acc[layer + 1]._replace(h=keep(acc[layer + 1].h + dh_above,
                                                        acc[layer + 1].h))
      if layer > 0:
        below[layer - 1] = keep((dh_below, dz_below_cell, dz_below_mm), below[layer - 1])
      ys[layer] = (d_projs, d_small, d_bu)
    return (tuple(acc), tuple(below)), tuple(ys)
  return body


def _recurrence_bwd(config, residuals, cotangents):
  small, kernels, state, hs, zs, cs, projs, bottom_up_1, slope, noise, valid, reset = residuals
  d_final, d_hs, d_zs = cotangents
  L, T = config.num_layers, bottom_up_1.shape[0]
  dtype = config.matmul_dtype
  prev = _zero_where(reset, _states_before(state, hs, zs, cs))  # what each step started from
  outs = tuple(LayerState(h=h, c=c, z=z) for h, c, z in zip(hs, cs, zs))
  context = [_layer_context(prev, outs, l) for l in range(L)]  # (h_above, h_below, z_below)
  ins = tuple(cell.matmul_inputs(config.separate_terms, prev[l].h, prev[l].z, h_above, z_below,
                                 h_below)
              for l, (h_above, h_below, z_below) in enumerate(context))
  inputs = _per_layer_inputs(config, bottom_up_1, noise, valid, reset)
  xs = tuple(_StepRecord(prev[l], *context[l], projs[l], *inputs[l], d_hs[l], d_zs[l])
             for l in range(L))
  below = tuple((jnp.zeros_like(d_final[l].h), jnp.zeros_like(d_final[l].z),
                 jnp.zeros_like(d_final[l].z)) for l in range(L - 1))
  lags, order = schedule_lib.plan(config.schedule, L, backward=True)
  (d_state0, _), ys = schedule_lib.skewed_scan(
      _backward_body(small, _cast(kernels, dtype), slope, config), (tuple(d_final), below), xs,
      T, lags, order, reverse=True, unroll=config.scan_unroll)
  d_projs, d_small, d_bu = (tuple(y[i] for y in ys) for i in range(3))
  # dK = Xᵀ dY over all T·B rows at once.
  d_kernels = tuple(
      tuple(cell.matmul(x.reshape(-1, x.shape[-1]).T, dy.reshape(-1, dy.shape[-1]), dtype)
            for x, dy in zip(ins_l, d_projs_l))
      for ins_l, d_projs_l in zip(ins, d_projs))
  d_small = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), d_small)
  zeros = lambda x: None if x is None else jnp.zeros_like(x)
  return (d_small, d_kernels, d_state0, d_bu[0], jnp.zeros_like(slope), zeros(noise),
          zeros(valid), zeros(reset))


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _samples(key, config: HMLSTMConfig, deterministic: bool) -> bool:
  """Whether boundaries are sampled (``'sample'`` in training); checks that a key is given."""
  if config.boundary != "sample" or deterministic or config.num_layers == 1:
    return False
  if key is None:
    raise ValueError("the 'sample' boundary needs a PRNG key in training; pass key=... "
                     "(rngs=... to the modules), or deterministic=True for evaluation (the "
                     "step function; the modules' eval())")
  return True


def step(params, state: State, x_t: jax.Array, slope, key: jax.Array | None = None, *,
         config: HMLSTMConfig, deterministic: bool = False, skip_copy: bool = False,
         valid: jax.Array | None = None, reset: jax.Array | None = None) -> State:
  """One time step of every layer, Eq. 2-9 applied bottom to top.

  Args:
    params: from :func:`init_params`.
    state: (h, c, z) per layer at t-1, from :func:`initial_state` or a previous step.
    x_t: the input h^0_t, (B, input_size).
    slope: hard-sigmoid slope a (traced: changing it does not recompile).
    key: PRNG key; used only by the ``'sample'`` variant in training.
    config: the :class:`HMLSTMConfig` (static).
    deterministic: evaluation mode; the ``'sample'`` variant then uses the step function.
    skip_copy: run a layer above the first only when some row leaves COPY (``lax.cond`` on
      :func:`layer_needed`; otherwise its state is handed back untouched), and a term of
      Eq. 6-7 only when some row's gate opens it (the top-down term when z^ℓ_{t-1} = 1, the
      bottom-up one when z^(ℓ-1)_t = 1; else zeros, which the gate would have made of it).
      The paper's saving of COPY (Fig. 4) made real where one step runs at a time
      (sampling, streaming inference at small batch): the same state, bit for bit when both
      are jitted (run eagerly, the plain step goes op by op while the branch is compiled
      whole, and rounding may differ in the last bit), the work that all rows skip not done.
      For inference: the values are the same, but the straight-through gradient that would
      reach a boundary through the skipped work (Eq. 2-4's blend, the gates of Eq. 6-7) is
      not computed. Under ``vmap`` ``lax.cond`` becomes a select of both branches, and in a
      large batch some row nearly always needs each layer: there it saves nothing; on a GPU
      it is slower (docs/performance.md).
    valid: (B,) bool, or ``None`` (every row): rows where it is false keep their state (a
      padded step of a shorter sequence).
    reset: (B,) bool, or ``None``: rows where it is true start this step from the initial
      state (zeros), as at the start of a new document in a stream that carries state.

  Returns:
    The state at t. Its ``h`` and ``z`` are the step's outputs. Each term of Eq. 5-7 is a
    matmul of its own here (:func:`cell.layer_kernels` ``apart``: faster one row at a time), fused in
    :func:`unroll` without per-term layer norm: the same numbers up to rounding. The layers
    run bottom to top whatever ``config.schedule`` (which orders a whole sequence's layer-steps in
    :func:`unroll`, with the same numbers), so a loop of ``step`` equals ``unroll``.
  """
  check_inputs(config, state, x_t, slope, "step", params=params)
  params = compute_params(params, x_t.dtype)
  sampling = _samples(key, config, deterministic)
  noise = boundary_noise(key, config, x_t.shape[0], x_t.dtype) if sampling else None
  body = _forward_body(_small_params(params), _kernels(params, apart=True), slope, config, False,
                       skip_copy, one_step=True)
  valid, reset = (_row_flags(name, flag, (x_t.shape[0],), x_t.dtype)
                  for name, flag in (("valid", valid), ("reset", reset)))
  xs_t = _per_layer_inputs(config, cell.bottom_up_term(params[0], x_t, config.matmul_dtype), noise,
                           valid, reset)
  # One time step is bottom to top whatever config.schedule says: a schedule reorders the
  # layer-steps of a whole sequence (two-phase skews layers across time steps), which a single
  # step cannot do; unroll gives the same numbers under either schedule.
  new_state, _ = body(state, xs_t, schedule_lib.plan("layers", config.num_layers)[1],
                      (None,) * config.num_layers)
  return new_state


def unroll(params, state: State, xs: jax.Array, slope, key: jax.Array | None = None, *,
           config: HMLSTMConfig, deterministic: bool = False, fast_backward: bool = True,
           seq_lengths: jax.Array | None = None, reset: jax.Array | None = None,
           time_major: bool = True) -> tuple[State, UnrollOutputs]:
  """Runs :func:`step` over a sequence with ``lax.scan``: time-major (T, B, ·) by default, as
  the scan runs; ``time_major=False`` takes and gives batch-major (B, T, ·) arrays (the
  modules' default, as ``nnx.RNN``'s), and its errors quote the shapes so.

  The first layer's bottom-up projection W_01 x_t (Eq. 7) is computed for all T steps as one
  matmul before the scan; inside the scan each layer does one fused matmul per step, the
  layers in the order of ``config.schedule`` (:mod:`hmlstm_jax.schedule`; the same numbers
  either way). With ``fast_backward`` (the default) the gradient is the custom backward of
  :func:`_recurrence`: the same numbers as autodiff of the plain scan, with every weight
  gradient taken after the reverse scan as one matmul over all T·B rows.

  Args:
    params: from :func:`init_params`.
    state: initial state (from :func:`initial_state`, or the final state of the previous
      segment with the gradient stopped, for truncated BPTT).
    xs: inputs, (T, B, input_size), or (B, T, input_size) with ``time_major=False``.
    slope: hard-sigmoid slope a (traced).
    key: PRNG key, split into one key per step (``'sample'`` variant in training only).
    config: the :class:`HMLSTMConfig` (static).
    deterministic: evaluation mode (``'sample'`` uses the step function).
    fast_backward: use the custom backward (default); ``False`` differentiates the plain
      ``lax.scan`` with JAX's autodiff (the reference the tests compare against).
    seq_lengths: (B,) ints, or ``None`` (every row T steps): row b takes its first
      ``seq_lengths[b]`` steps only; its final state is its state after its last real step
      (as if run alone), its outputs past the end are 0 (pass the mask ``t < seq_lengths[b]``
      to :func:`operation_counts`), and no gradient flows from or into the padding.
    reset: (T, B) bools ((B, T) with ``time_major=False``), or ``None``: where true, the row
      starts that step from the initial state (zeros), e.g. at the first character of a new
      document in a stream whose state is carried from segment to segment; the gradient does
      not cross it.
    time_major: the layout of ``xs``, ``reset`` and the outputs.

  Returns:
    ``(final_state, UnrollOutputs(h, z))``: the state after the last step, to carry into the
    next segment, and every layer's h^ℓ_t (T, B, d_ℓ) and z^ℓ_t (T, B, 1) (batch-major:
    (B, T, ·)). The operation of every layer at every step follows from them (time-major):
    see :func:`operations`.
  """
  prepared = _prepare(params, state, xs, slope, key, config, deterministic, seq_lengths, reset,
                      time_major)
  bottom_up_1, slope, noise, valid, reset, small, kernels, state = prepared
  if fast_backward:
    final, hs, zs = _recurrence(config, small, kernels, state, bottom_up_1, slope, noise, valid,
                                reset)
  else:
    final, ys = _scan(config, small, kernels, state, bottom_up_1, slope, noise, False, valid,
                      reset)
    hs, zs = tuple(y[0] for y in ys), tuple(y[1] for y in ys)
  return final, _laid_out(_masked(valid, UnrollOutputs(h=hs, z=zs)), time_major)


def _laid_out(tree, time_major: bool):
  """Per-step arrays of the scan (T, B, ·) in the caller's layout."""
  return tree if time_major else jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), tree)


def _prepare(params, state: State, xs: jax.Array, slope, key, config: HMLSTMConfig,
             deterministic: bool, seq_lengths, reset, time_major: bool) -> tuple:
  """What :func:`unroll` and :func:`internals` start from, checked in the caller's layout:
  layer 1's W x for all steps, the slope, the noise, the per-row flags and the parameters
  split for the scan, time-major."""
  check_inputs(config, state, xs, slope, "time_major" if time_major else "batch_major",
               params=params)
  params = compute_params(params, xs.dtype)
  T, B = xs.shape[:2] if time_major else xs.shape[1::-1]
  valid = None
  if seq_lengths is not None:
    lengths = jnp.asarray(seq_lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(f"seq_lengths must be ({B},) integers (one length per row of xs), got "
                       f"{lengths.dtype} {lengths.shape}")
    try:  # concrete lengths are checked; traced ones cannot be (they clamp to [0, T])
      low, high = (int(lengths.min()), int(lengths.max())) if B else (0, 0)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
      low, high = 0, 0
    if low < 0 or high > T:
      raise ValueError(f"seq_lengths must be in [0, {T}] (the sequence length T of xs), got "
                       f"values from {low} to {high}")
    valid = (jnp.arange(T)[:, None] < lengths[None, :]).astype(xs.dtype)[..., None]
  reset = (_row_flags("reset", reset, (T, B), xs.dtype, "T, B") if time_major else
           _row_flags("reset", reset, (B, T), xs.dtype, "B, T"))
  if not time_major:
    xs, reset = _laid_out((xs, reset), False)
  bottom_up_1 = cell.bottom_up_term(params[0], xs, config.matmul_dtype)  # (T, B, R_1): one matmul
  noise = None
  if _samples(key, config, deterministic):
    noise = jax.vmap(lambda k: boundary_noise(k, config, B, xs.dtype))(jax.random.split(key, T))
  params, state = _varying_like((params, state), xs)
  return (bottom_up_1, jnp.asarray(slope, xs.dtype), noise, valid, reset, _small_params(params),
          _kernels(params), state)


def _varying_like(tree, x: jax.Array):
  """``tree`` cast to vary over the manual mesh axes that ``x`` varies over, inside
  ``shard_map`` with its default ``check_vma=True``: the scan's carry must enter as it leaves
  (varying with the inputs), and so must the custom backward's primals, so that the gradient of
  replicated params comes back summed over the devices (the transpose of the cast), as
  autodiff gives it for JAX's own ops. Elsewhere (no manual axes) ``tree`` itself."""
  axes = _varying_axes(x)
  if not axes:
    return tree

  def cast(leaf):
    missing = tuple(sorted(axes - _varying_axes(leaf)))
    return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf
  return jax.tree_util.tree_map(cast, tree)


def _varying_axes(x) -> frozenset:
  """The manual mesh axes ``x`` varies over (its type's ``manual_axis_type.varying``; ``vma``
  in older JAX)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _past_end_zero(valid, arrays: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """Per-step arrays (T, B, ·) that are 0 past each row's end, not its kept state."""
  return tuple(arrays) if valid is None else tuple(a * valid for a in arrays)


def _masked(valid, outputs: UnrollOutputs) -> UnrollOutputs:
  """:func:`_past_end_zero` of both outputs."""
  return UnrollOutputs(h=_past_end_zero(valid, outputs.h), z=_past_end_zero(valid, outputs.z))


class Internals(NamedTuple):
  """Per step, what :class:`UnrollOutputs` leaves out (:func:`internals`)."""
  c: tuple[jax.Array, ...]        # per layer c^ℓ_t (T, B, d_ℓ), the stored (unnormalised) cell
  z_tilde: tuple[jax.Array, ...]  # per layer with a detector ž^ℓ_t (T, B, 1), before f_bound


def internals(params, state: State, xs: jax.Array, slope, key: jax.Array | None = None, *,
              config: HMLSTMConfig, deterministic: bool = False,
              seq_lengths: jax.Array | None = None, reset: jax.Array | None = None,
              time_major: bool = True) -> tuple[State, UnrollOutputs, Internals]:
  """:func:`unroll` (the same arguments and numbers) that also returns every step's c^ℓ_t and
  the boundary probability ž^ℓ_t = hard_sigm_a(s^ℓ_t[ž]) (Eq. 9) before f_bound (Eq. 8), e.g.
  to analyse or regularise the detectors. Differentiated by autodiff of the plain scan (not
  the custom backward): slower, for analysis. Past a row's end c and ž are 0, like h and z.
  """
  prepared = _prepare(params, state, xs, slope, key, config, deterministic, seq_lengths, reset,
                      time_major)
  bottom_up_1, slope, noise, valid, reset, small, kernels, state = prepared
  final, ys = _scan(config, small, kernels, state, bottom_up_1, slope, noise, True, valid, reset)
  hs, zs, cs, projs = (tuple(y[i] for y in ys) for i in range(4))
  prev = _zero_where(reset, _states_before(state, hs, zs, cs))
  outs = tuple(LayerState(h=h, c=c, z=z) for h, c, z in zip(hs, cs, zs))
  z_tilde = []
  for layer in range(config.num_layers - 1):
    _, _, z_below = _layer_context(prev, outs, layer)
    s = cell.combine_terms(small[layer], projs[layer], prev[layer].z, z_below,
                           bottom_up_1 if layer == 0 else None, config.st_local)
    d = config.layer_sizes[layer]
    z_tilde.append(boundary_lib.hard_sigmoid(s[..., 4 * d:4 * d + 1], slope))
  return (final, _laid_out(_masked(valid, UnrollOutputs(h=hs, z=zs)), time_major),
          _laid_out(Internals(c=_past_end_zero(valid, cs), z_tilde=_past_end_zero(valid, z_tilde)),
                    time_major))


def _row_flags(name: str, flags, shape: tuple, dtype, axes: str = "B"):
  """Bools of ``shape`` ((B,) for a step, (T, B) or (B, T) for a sequence, the dimensions
  named by ``axes``) as 0/1 of ``dtype`` with a trailing axis of 1, or ``None``."""
  if flags is None:
    return None
  flags = jnp.asarray(flags)
  if flags.shape != shape:
    per = "one flag per row" + (", per step" if len(shape) == 2 else "")
    raise ValueError(f"{name} must have shape ({axes}) = {shape} ({per}), got {flags.shape}")
  return flags.astype(dtype)[..., None]


def boundary_rates(zs: Sequence[jax.Array], mask: jax.Array | None = None) -> jax.Array:
  """r^ℓ = the share of (real) steps on which z^ℓ = 1, per layer with a detector: (L-1,).

  ``zs`` are :attr:`UnrollOutputs.z`, (T, B, 1) per layer; ``mask`` (T, B) leaves padding out.
  Differentiable: with binary boundaries the gradient is the straight-through one (§3.3).
  """
  zs = jnp.stack([z[..., 0] for z in zs[:-1]])  # (L-1, T, B)
  if mask is None:
    return jnp.mean(zs, axis=(1, 2))
  real = (jnp.asarray(mask) > 0).astype(zs.dtype)
  return jnp.sum(zs * real, axis=(1, 2)) / jnp.maximum(jnp.sum(real), 1.0)


def boundary_rate_penalty(zs: Sequence[jax.Array], rate_min: Sequence[float],
                          rate_max: Sequence[float], mask: jax.Array | None = None) -> jax.Array:
  """Σ_ℓ max(0, m_ℓ − r^ℓ)² + max(0, r^ℓ − M_ℓ)²: zero while each layer's boundary rate r^ℓ
  (:func:`boundary_rates`) lies in [m_ℓ, M_ℓ], growing quadratically outside.

  **Not the paper's** (decisions.md §6): an optional term of the training loss that keeps
  each detector from firing on every step or on none. Where the boundaries fall inside that
  budget is still learned; only their rate is bounded. ``rate_min`` and ``rate_max`` have
  one entry per layer with a detector (L-1).
  """
  rates = boundary_rates(zs, mask)
  low = jnp.maximum(jnp.asarray(rate_min, rates.dtype) - rates, 0.0)
  high = jnp.maximum(rates - jnp.asarray(rate_max, rates.dtype), 0.0)
  return jnp.sum(jnp.square(low) + jnp.square(high))


def operations(initial: State, outputs: UnrollOutputs) -> tuple[jax.Array, ...]:
  """The operation of every layer at every step, read off the boundaries (decisions.md §1 table).

  op^ℓ_t = FLUSH if z^ℓ_{t-1} = 1, else UPDATE if z^(ℓ-1)_t = 1, else COPY, with
  z^0_t = 1 and z^ℓ_{-1} from ``initial``. For the ``'soft'`` variant z is rounded at 0.5.

  Returns:
    Per layer an int32 array (T, B) of codes ``COPY`` (0), ``UPDATE`` (1), ``FLUSH`` (2).
  """
  ops = []
  for layer, z in enumerate(outputs.z):
    z_prev = jnp.concatenate([initial[layer].z[None], z[:-1]], axis=0)[..., 0] > 0.5
    z_below = (outputs.z[layer - 1][..., 0] > 0.5) if layer > 0 else jnp.ones_like(z_prev)
    ops.append(jnp.where(z_prev, FLUSH, jnp.where(z_below, UPDATE, COPY)).astype(jnp.int32))
  return tuple(ops)


def operation_counts(ops: Sequence[jax.Array], mask: jax.Array | None = None) -> jax.Array:
  """Counts of (COPY, UPDATE, FLUSH) per layer, (L, 3) int32 (decisions.md §3 'update counts');
  with ``mask`` (T, B), only the steps where it is nonzero (padding left out)."""
  if mask is None:
    return jnp.stack([jnp.bincount(op.reshape(-1), length=3) for op in ops])
  keep = (jnp.asarray(mask) > 0).reshape(-1).astype(jnp.int32)
  return jnp.stack([jnp.bincount(op.reshape(-1), weights=keep, length=3) for op in ops]
                   ).astype(jnp.int32)
