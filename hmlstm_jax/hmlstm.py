"""The L-layer HM-LSTM: configuration, parameters, state, one step, and the scan over time.

SPEC.md §1: layers ℓ = 1..L, h^0_t = x_t and z^0_t = 1. At each step the layers run bottom
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
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from hmlstm_jax import boundary as boundary_lib
from hmlstm_jax import cell

# Codes of the operation table (SPEC.md §1), as returned by `operations`.
COPY, UPDATE, FLUSH = 0, 1, 2
OPERATION_NAMES = ("COPY", "UPDATE", "FLUSH")


@dataclasses.dataclass(frozen=True)
class HMLSTMConfig:
  """Static description of an HM-LSTM stack (hashable: pass it as a static jit argument).

  Attributes:
    input_size: width of x_t = h^0_t (128 for the character LM's embedding).
    layer_sizes: d_1, ..., d_L.
    boundary: f_bound of Eq. 8: ``'step'`` (default, the paper's best), ``'sample'`` or
      ``'soft'``.
    layer_norm: layer normalisation of each pre-activation term and of c inside the tanh.
  """
  input_size: int
  layer_sizes: tuple[int, ...]
  boundary: str = "step"
  layer_norm: bool = False

  def __post_init__(self):
    object.__setattr__(self, "layer_sizes", tuple(self.layer_sizes))
    if not isinstance(self.input_size, int) or self.input_size < 1:
      raise ValueError(f"input_size must be a positive int, got {self.input_size!r}")
    if not self.layer_sizes or any(not isinstance(d, int) or d < 1 for d in self.layer_sizes):
      raise ValueError(f"layer_sizes must be a non-empty sequence of positive ints, got {self.layer_sizes!r}")
    if self.boundary not in boundary_lib.BOUNDARY_VARIANTS:
      raise ValueError(f"boundary must be one of {boundary_lib.BOUNDARY_VARIANTS}, got {self.boundary!r}")

  @property
  def num_layers(self) -> int:
    return len(self.layer_sizes)


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


def init_params(key: jax.Array, config: HMLSTMConfig) -> tuple[dict[str, Any], ...]:
  """Parameters of Eq. 5-7 as a tuple with one dict per layer, in the paper's notation.

  Layer ℓ (index ℓ-1) holds, with R_ℓ = 4·d_ℓ + 1 rows ordered f, i, o, g, ž (4·d_L on the
  last layer):

  * ``W``     (d_(ℓ-1), R_ℓ)  bottom-up W_(ℓ-1)ℓ (d_0 = ``config.input_size``);
  * ``U``     (d_ℓ, R_ℓ)      recurrent U_ℓℓ;
  * ``U_top`` (d_(ℓ+1), R_ℓ)  top-down U_(ℓ+1)ℓ, absent on the last layer;
  * ``b``     (R_ℓ,)          bias;
  * with layer norm, ``ln_W``, ``ln_U``, ``ln_U_top`` (each ``{'scale', 'bias'}`` of 4·d_ℓ)
    and ``ln_c`` (d_ℓ): gains 1, biases 0.

  [decision] Matrices are N(0, 1/fan_in); the bias is 0 except the forget gate's, 1.
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
    p["b"] = jnp.zeros((rows,), jnp.float32).at[:d].set(1.0)
    if config.layer_norm:
      gate_ln = lambda n: {"scale": jnp.ones((n,), jnp.float32), "bias": jnp.zeros((n,), jnp.float32)}
      p["ln_W"], p["ln_U"] = gate_ln(4 * d), gate_ln(4 * d)
      if layer < L - 1:
        p["ln_U_top"] = gate_ln(4 * d)
      p["ln_c"] = gate_ln(d)
    params.append(p)
  return tuple(params)


def initial_state(config: HMLSTMConfig, batch_size: int, dtype=jnp.float32) -> State:
  """h = c = 0 and z = 0 for every layer (SPEC.md §1 decision)."""
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


def _step_from_bottom_up(params, state: State, bottom_up_1: jax.Array, slope, noise,
                         config: HMLSTMConfig) -> State:
  """One step of all layers given layer 1's bottom-up term W_01 x_t (already normalised)."""
  L = config.num_layers
  new_state = []
  h_below = None
  z_below = jnp.ones_like(state[0].z)  # z^0_t = 1
  for layer in range(L):
    p, own = params[layer], state[layer]
    h_above = state[layer + 1].h if layer < L - 1 else None
    s = cell.pre_activation(
        p, own.h, own.z, h_above, z_below,
        h_below=h_below, bottom_up=bottom_up_1 if layer == 0 else None)
    c, h, z = cell.layer_update(
        s, own.c, own.h, own.z, z_below, slope, variant=config.boundary,
        ln_c=p.get("ln_c"), noise=None if noise is None or layer == L - 1 else noise[layer])
    new_state.append(LayerState(h=h, c=c, z=z))
    h_below, z_below = h, z
  return tuple(new_state)


def _samples(key, config: HMLSTMConfig, deterministic: bool) -> bool:
  """Whether boundaries are sampled (``'sample'`` in training); checks that a key is given."""
  if config.boundary != "sample" or deterministic or config.num_layers == 1:
    return False
  if key is None:
    raise ValueError("the 'sample' boundary needs a PRNG key in training; pass key=... "
                     "or deterministic=True for evaluation (step function)")
  return True


def step(params, state: State, x_t: jax.Array, slope, key: jax.Array | None = None, *,
         config: HMLSTMConfig, deterministic: bool = False) -> State:
  """One time step of every layer, Eq. 2-9 applied bottom to top.

  Args:
    params: from :func:`init_params`.
    state: (h, c, z) per layer at t-1, from :func:`initial_state` or a previous step.
    x_t: the input h^0_t, (B, input_size).
    slope: hard-sigmoid slope a (traced: changing it does not recompile).
    key: PRNG key; used only by the ``'sample'`` variant in training.
    config: the :class:`HMLSTMConfig` (static).
    deterministic: evaluation mode; the ``'sample'`` variant then uses the step function.

  Returns:
    The state at t. Its ``h`` and ``z`` are the step's outputs.
  """
  _check_state(config, state)
  sampling = _samples(key, config, deterministic)
  noise = boundary_noise(key, config, x_t.shape[0], x_t.dtype) if sampling else None
  return _step_from_bottom_up(params, state, cell.bottom_up_term(params[0], x_t), slope, noise, config)


def unroll(params, state: State, xs: jax.Array, slope, key: jax.Array | None = None, *,
           config: HMLSTMConfig, deterministic: bool = False) -> tuple[State, UnrollOutputs]:
  """Runs :func:`step` over a time-major sequence with ``lax.scan``.

  The first layer's bottom-up projection W_01 x_t (Eq. 7) is computed for all T steps as one
  matmul before the scan; inside the scan each layer does one fused matmul per step.

  Args:
    params: from :func:`init_params`.
    state: initial state (from :func:`initial_state`, or the final state of the previous
      segment with the gradient stopped, for truncated BPTT).
    xs: inputs, time-major (T, B, input_size).
    slope: hard-sigmoid slope a (traced).
    key: PRNG key, split into one key per step (``'sample'`` variant in training only).
    config: the :class:`HMLSTMConfig` (static).
    deterministic: evaluation mode (``'sample'`` uses the step function).

  Returns:
    ``(final_state, UnrollOutputs(h, z))``: the state after the last step, to carry into the
    next segment, and every layer's h^ℓ_t (T, B, d_ℓ) and z^ℓ_t (T, B, 1). The operation of
    every layer at every step follows from them: see :func:`operations`.
  """
  _check_state(config, state)
  if xs.ndim != 3 or xs.shape[-1] != config.input_size:
    raise ValueError(f"xs must be time-major (T, B, {config.input_size}), got shape {xs.shape}")
  T, B = xs.shape[:2]
  bottom_up_1 = cell.bottom_up_term(params[0], xs)  # (T, B, R_1): one matmul for all steps
  sampling = _samples(key, config, deterministic)
  keys = jax.random.split(key, T) if sampling else None

  def body(carry, inputs):
    bu, k = inputs
    noise = boundary_noise(k, config, B, xs.dtype) if sampling else None
    new = _step_from_bottom_up(params, carry, bu, slope, noise, config)
    return new, (tuple(s.h for s in new), tuple(s.z for s in new))

  final, (hs, zs) = jax.lax.scan(body, state, (bottom_up_1, keys))
  return final, UnrollOutputs(h=hs, z=zs)


def operations(initial: State, outputs: UnrollOutputs) -> tuple[jax.Array, ...]:
  """The operation of every layer at every step, read off the boundaries (SPEC.md §1 table).

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


def operation_counts(ops: Sequence[jax.Array]) -> jax.Array:
  """Counts of (COPY, UPDATE, FLUSH) per layer, (L, 3) int32 (SPEC.md §3 'update counts')."""
  return jnp.stack([jnp.bincount(op.reshape(-1), length=3) for op in ops])
