"""One HM-LSTM layer at one time step (Eq. 2-9 of the paper, decisions.md §1).

Symbols → arguments:

* h^ℓ_{t-1}, c^ℓ_{t-1}, z^ℓ_{t-1}  → ``h_prev``, ``c_prev``, ``z_prev`` (own state, previous step);
* h^(ℓ-1)_t, z^(ℓ-1)_t            → ``h_below``, ``z_below`` (layer below, this step; x_t and 1 for ℓ = 1);
* h^(ℓ+1)_{t-1}                   → ``h_above`` (layer above, previous step; absent for ℓ = L);
* W_(ℓ-1)ℓ, U_ℓℓ, U_(ℓ+1)ℓ, b     → ``W``, ``U``, ``U_top``, ``b`` of the layer's parameters.

The pre-activation has R = 4·d + 1 rows in the order f, i, o, g, ž (4·d on the last layer,
which has no boundary detector). The choice of operation is an arithmetic blend over the
masks FLUSH = z_prev, UPDATE = (1 − z_prev)·z_below, COPY = (1 − z_prev)·(1 − z_below),
never a ``where``, so the straight-through gradient reaches the boundary detector through
the choice of operation too (decisions.md §2). With binary masks the blend is the selected
branch bit for bit; on COPY, c and h are returned bit-identical.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from hmlstm_jax import boundary as boundary_lib

LayerParams = Mapping[str, Any]

LN_EPSILON = 1e-5


def layer_norm(x: jax.Array, ln: Mapping[str, jax.Array]) -> jax.Array:
  """LN(x) = gain ⊙ (x − mean(x)) / sqrt(var(x) + ε) + bias over the last axis (Ba et al.)."""
  return standardize(x, x) * ln["scale"] + ln["bias"]


def standardize(x: jax.Array, stats_of: jax.Array) -> jax.Array:
  """(x − mean) / sqrt(var + ε) with the mean and variance of ``stats_of`` over its last axis:
  layer norm's standardisation (Ba et al.) of the terms of Eq. 5-7, whose ž row, with
  ``ln_boundary``, takes the gate rows' statistics (decisions.md §3)."""
  mean = jnp.mean(stats_of, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(stats_of - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LN_EPSILON)


def layer_norm_params(size: int, gain: float = 1.0) -> dict:
  """LN parameters of one normalised quantity: ``scale`` (γ) = ``gain``, ``bias`` (β) = 0."""
  return {"scale": jnp.full((size,), gain, jnp.float32), "bias": jnp.zeros((size,), jnp.float32)}


def normalized_term(projection: jax.Array, ln: Mapping[str, jax.Array] | None,
                    hidden_size: int) -> jax.Array:
  """One term of s^ℓ_t (Eq. 5, 6 or 7) with layer norm over its 4·d gate rows.

  The statistics are always those of the 4·d gate rows. The ž row (row 4·d, absent on the
  last layer) is left unnormalised when ``ln`` has 4·d entries (the default, decisions.md §3);
  when it has 4·d + 1 (``HMLSTMConfig.ln_boundary``) the ž row is standardised with the gate
  rows' statistics and has its own gain and bias, so the gate rows are the same either way.

  Args:
    projection: the term before normalisation, e.g. h_prev @ U, shape (..., R).
    ln: ``{'scale', 'bias'}`` of shape (4·d,) or (R,), or ``None`` for no layer norm.
    hidden_size: d, the width of the layer.
  """
  if ln is None:
    return projection
  gate_rows = 4 * hidden_size
  if ln["scale"].shape[-1] == gate_rows:
    gates = layer_norm(projection[..., :gate_rows], ln)
    return jnp.concatenate([gates, projection[..., gate_rows:]], axis=-1)
  return standardize(projection, projection[..., :gate_rows]) * ln["scale"] + ln["bias"]


def matmul(x: jax.Array, kernel: jax.Array, dtype: str | None = None) -> jax.Array:
  """x @ kernel, with the operands cast to ``dtype`` (e.g. ``'bfloat16'``) when given.

  The product is accumulated and returned in x's dtype (float32 accumulation of bf16
  operands): only the matmul operands lose precision, the element-wise math does not.
  """
  if dtype is None:
    return x @ kernel
  return jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=x.dtype)


def bottom_up_term(params: LayerParams, h_below: jax.Array, dtype: str | None = None) -> jax.Array:
  """W_(ℓ-1)ℓ h^(ℓ-1)_t of Eq. 7, layer-normalised when enabled, before the z^(ℓ-1)_t gate.

  Works on any leading shape, so the first layer's term for all time steps is one matmul.
  ``dtype``: matmul operand dtype (see :func:`matmul`).
  """
  hidden_size = params["U"].shape[0]
  return normalized_term(matmul(h_below, params["W"], dtype), params.get("ln_W"), hidden_size)


#: The kernels' columns are padded with zeros to a multiple of this. Measured on a 2-core AVX2
#: CPU (XLA:CPU, f32, 64 rows × 1536): 2049 columns (4·512 + 1, the ž row) run at 80 GFLOP/s,
#: 2064 at 115, 2048 at 116; a multiple of 8 alone (2056) at 80. GPUs favour such widths too.
KERNEL_COLUMN_MULTIPLE = 16


def layer_kernels(params: LayerParams, hoisted: bool, apart: bool = False
                  ) -> tuple[jax.Array, ...]:
  """The weight matrices of Eq. 5-7 as the matmuls of one step use them.

  Without layer norm: one fused kernel [W ; U ; U_top] (W left out when the bottom-up term is
  ``hoisted``, i.e. computed outside the step; U_top absent on the last layer). With layer
  norm per term (``ln_U`` in ``params``) the terms are normalised one by one, so the kernels
  stay apart: (U, U_top, W); layer norm of the sum (``ln_s``) fuses them as without. Each
  kernel's R columns are padded with zeros to a multiple of :data:`KERNEL_COLUMN_MULTIPLE`
  (:func:`combine_terms` drops the padding). Computing these once before a scan keeps the
  concatenation and the padding out of the loop.

  ``apart``: the kernels stay apart whatever the layer norm, as one time step
  (:func:`hmlstm_jax.hmlstm.step`) uses them. One row at a time a matmul is a
  matrix-vector product bound by reading the kernel: a term whose gate z is 0 in every row
  then need not be read at all (``skip_copy``), and two short products beat one long one.
  Measured on an AVX-512 Xeon (XLA:CPU, f32, one row, median of 9 alternating rounds):
  512 × 2064 69 µs, the fused 1024 × 2064 186 µs.
  """
  names = ["U"] + (["U_top"] if "U_top" in params else [])
  if apart or "ln_U" in params:
    kernels = [params[n] for n in names + ([] if hoisted else ["W"])]
  else:
    names = ([] if hoisted else ["W"]) + names
    kernels = [jnp.concatenate([params[n] for n in names], axis=0)]
  rows = params["b"].shape[-1]
  pad = -rows % KERNEL_COLUMN_MULTIPLE
  return tuple(jnp.pad(k, ((0, 0), (0, pad))) if pad else k for k in kernels)


def gated_sum(rows: int, projections: tuple[jax.Array, ...], gates: tuple,
              st_local: bool = False) -> jax.Array:
  """U h^ℓ_{t-1} + z^ℓ_{t-1}·U_top h^(ℓ+1)_{t-1} + z^(ℓ-1)_t·W h^(ℓ-1)_t (Eq. 5-7 without the
  bias) from the terms' projections apart (:func:`layer_kernels` with ``apart``) and their
  gates (``None`` for the recurrent term), cut to the layer's ``rows`` R; the gates as in
  :func:`combine_terms`."""
  gate_rows = 4 * (rows // 4)
  s = 0
  for gate, term in zip(gates, projections):
    term = term[..., :rows]
    s = s + (term if gate is None else _gated(gate, term, gate_rows, st_local))
  return s


def matmul_inputs(separate_terms: bool, h_prev: jax.Array, z_prev: jax.Array,
                  h_above: jax.Array | None, z_below: jax.Array,
                  h_below: jax.Array | None) -> tuple[jax.Array, ...]:
  """The left operands of :func:`layer_kernels`, in the same order.

  Without layer norm per term the gates are applied to the inputs, [z_below·h_below ; h_prev ;
  z_prev·h_above], so that one matmul gives the gated sum; with it (``separate_terms``) they
  are applied after normalisation (:func:`combine_terms`) and the inputs are the plain h's.
  ``h_above`` is ``None`` on the last layer, ``h_below`` when the bottom-up term is hoisted.
  """
  has_top = h_above is not None
  if separate_terms:
    return tuple([h_prev] + ([h_above] if has_top else []) + ([] if h_below is None else [h_below]))
  parts = ([] if h_below is None else [z_below * h_below]) + [h_prev] + ([z_prev * h_above] if has_top else [])
  return (jnp.concatenate(parts, axis=-1),)


def detach_detector_inputs(projection: jax.Array, x: jax.Array, kernel: jax.Array, column: int,
                           dtype: str | None = None) -> jax.Array:
  """``projection`` = x @ kernel with its ž column's gradient sent to the kernel only, not to x.

  The value is the same bit for bit (the ž column becomes p_ž + (l − l) with l = sg(x) @ k_ž,
  whose gradient reaches k_ž alone). Used by ``HMLSTMConfig.st_local`` (decisions.md §2): the
  straight-through gradient then trains each detector's own row without re-entering the states
  it read, which cuts the recurrent path z_t → operation → h_{t+1} → ž_{t+2} → z_{t+2}.
  """
  local = matmul(jax.lax.stop_gradient(x), kernel[:, column:column + 1], dtype)
  detector = (jax.lax.stop_gradient(projection[..., column:column + 1])
              + (local - jax.lax.stop_gradient(local)))
  return projection.at[..., column:column + 1].set(detector)


def _gated(z: jax.Array, term: jax.Array, gate_rows: int, st_local: bool) -> jax.Array:
  """z · term; with ``st_local`` the ž row (after ``gate_rows``) sends no gradient to z."""
  if not st_local or term.shape[-1] == gate_rows:
    return z * term
  return jnp.concatenate([z * term[..., :gate_rows],
                          jax.lax.stop_gradient(z) * term[..., gate_rows:]], axis=-1)


def combine_terms(params: LayerParams, projections: tuple[jax.Array, ...], z_prev: jax.Array,
                  z_below: jax.Array, bottom_up: jax.Array | None = None,
                  st_local: bool = False) -> jax.Array:
  """s^ℓ_t from the matmul outputs of :func:`layer_kernels` (Eq. 5-7, layer norm, bias).

  ``bottom_up`` is the hoisted z-free term W h^(ℓ-1)_t of :func:`bottom_up_term`, gated here
  by z_below; without it the bottom-up term is among ``projections``. Only ``b`` and the
  layer-norm parameters of ``params`` are read (the matrices may be absent). Projections
  wider than the layer's R rows (the kernels' zero padding) are cut to R.

  Layer norm, where ``params`` has it (decisions.md §3): per term (``ln_U``, ``ln_U_top``,
  ``ln_W``: each term normalised, then gated), or of the sum (``ln_s``: the gated sum of the
  three terms normalised once, LN(U h + z_prev·U_top h_above + z_below·W h_below) + b).
  With ``st_local`` the boundaries that gate the ž row get no gradient from it (the matmul
  inputs' share is cut by :func:`detach_detector_inputs`).
  """
  rows = params["b"].shape[-1]
  hidden_size = rows // 4  # R = 4·d + 1, or 4·d on the last layer
  projections = tuple(p[..., :rows] for p in projections)
  gate_rows = 4 * hidden_size
  if "ln_U" in params:
    s = normalized_term(projections[0], params["ln_U"], hidden_size)
    if "ln_U_top" in params:
      top = normalized_term(projections[1], params["ln_U_top"], hidden_size)
      s = s + _gated(z_prev, top, gate_rows, st_local)
    if bottom_up is None:
      bottom_up = normalized_term(projections[-1], params["ln_W"], hidden_size)
    return s + _gated(z_below, bottom_up, gate_rows, st_local) + params["b"]
  if "ln_s" in params:
    s = (projections[0] if bottom_up is None else
         projections[0] + _gated(z_below, bottom_up, gate_rows, st_local))
    return normalized_term(s, params["ln_s"], hidden_size) + params["b"]
  s = projections[0] + params["b"]  # this order of the sums keeps earlier runs' bits
  return s if bottom_up is None else s + _gated(z_below, bottom_up, gate_rows, st_local)


def pre_activation(params: LayerParams, h_prev: jax.Array, z_prev: jax.Array,
                   h_above: jax.Array | None, z_below: jax.Array,
                   h_below: jax.Array | None = None,
                   bottom_up: jax.Array | None = None,
                   kernels: tuple[jax.Array, ...] | None = None) -> jax.Array:
  """s^ℓ_t = U h^ℓ_{t-1} + z^ℓ_{t-1}·U_top h^(ℓ+1)_{t-1} + z^(ℓ-1)_t·W h^(ℓ-1)_t + b (Eq. 5-7).

  The top-down term is switched by the layer's **own previous** boundary ``z_prev``, the
  bottom-up term by the **current** boundary of the layer below ``z_below``; the recurrent
  term is never gated. Without layer norm the three terms are one matmul of
  [z_below·h_below ; h_prev ; z_prev·h_above] against [W ; U ; U_top]. With layer norm each
  term is normalised on its own and gated after normalisation: z·LN(W h), never LN(z·W h);
  with layer norm of the sum, the gated sum of the three is normalised once.

  Args:
    params: the layer's parameters (``W``, ``U``, ``U_top`` unless last, ``b``, layer-norm
      parameters when enabled).
    h_prev: h^ℓ_{t-1}, (B, d).
    z_prev: z^ℓ_{t-1}, (B, 1).
    h_above: h^(ℓ+1)_{t-1}, (B, d_above), or ``None`` on the last layer.
    z_below: z^(ℓ-1)_t, (B, 1) (ones for the first layer).
    h_below: h^(ℓ-1)_t, (B, d_below); give this or ``bottom_up``.
    bottom_up: W h^(ℓ-1)_t already computed by :func:`bottom_up_term` (e.g. for all time
      steps at once), (B, R).
    kernels: :func:`layer_kernels` of ``params``, if already computed.

  Returns:
    s^ℓ_t, (B, R).
  """
  if (h_below is None) == (bottom_up is None):
    raise ValueError("give exactly one of h_below and bottom_up")
  if (h_above is not None) != ("U_top" in params):
    raise ValueError("h_above must be given exactly when the layer has U_top (every layer but the last)")
  if kernels is None:
    kernels = layer_kernels(params, hoisted=bottom_up is not None)
  inputs = matmul_inputs("ln_U" in params, h_prev, z_prev, h_above, z_below, h_below)
  projections = tuple(x @ k for x, k in zip(inputs, kernels))
  return combine_terms(params, projections, z_prev, z_below, bottom_up)


def layer_update(s: jax.Array, c_prev: jax.Array, h_prev: jax.Array, z_prev: jax.Array,
                 z_below: jax.Array, slope: jax.Array | float, *, variant: str,
                 ln_c: Mapping[str, jax.Array] | None = None,
                 noise: jax.Array | None = None,
                 st_gradient: str = "hard_sigmoid",
                 st_local: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The UPDATE / COPY / FLUSH operation and the boundary, Eq. 2-4 and 8-9.

  f, i, o = sigmoid(s), g = tanh(s), ž = hard_sigm_a(s_ž) and, with masks
  FLUSH = z_prev, UPDATE = (1 − z_prev)·z_below, COPY = (1 − z_prev)·(1 − z_below):

      c = FLUSH·(i⊙g) + UPDATE·(f⊙c_prev + i⊙g) + COPY·c_prev               (Eq. 2)
      h = (FLUSH + UPDATE)·(o⊙tanh(c)) + COPY·h_prev                        (Eq. 3)
      z = (1 − COPY)·f_bound(ž) + COPY·z_prev                              (Eq. 4, 8-9)

  On COPY the boundary is copied (z = z_prev = 0; decisions.md §1 decision). A pre-activation
  with 4·d rows (the last layer) has no detector: its z stays 0.

  Args:
    s: pre-activation s^ℓ_t, (B, 4·d + 1) or (B, 4·d) on the last layer.
    c_prev, h_prev: c^ℓ_{t-1}, h^ℓ_{t-1}, (B, d).
    z_prev: z^ℓ_{t-1}, (B, 1).
    z_below: z^(ℓ-1)_t, (B, 1).
    slope: hard-sigmoid slope a (traced).
    variant: ``'step'``, ``'sample'`` or ``'soft'``.
    ln_c: layer-norm parameters applied to c inside the tanh only (stored c is unnormalised).
    noise: uniform noise (B, 1) for the ``'sample'`` variant in training, else ``None``.
    st_gradient: the straight-through derivative (:data:`boundary.ST_GRADIENTS`).
    st_local: the boundary's own blend z = (1 − COPY)·f_bound(ž) + COPY·z_prev sends no
      gradient into the COPY mask (the copied z_prev still gets its share). Without it a run
      of COPYs whose unused f_bound(ž) is 1 doubles z's cotangent at every step
      (∂z/∂z_prev = f_bound(ž) + 1 there): see decisions.md §2.

  Returns:
    (c^ℓ_t, h^ℓ_t, z^ℓ_t).
  """
  d = c_prev.shape[-1]
  f = jax.nn.sigmoid(s[:, :d])
  i = jax.nn.sigmoid(s[:, d:2 * d])
  o = jax.nn.sigmoid(s[:, 2 * d:3 * d])
  g = jnp.tanh(s[:, 3 * d:4 * d])
  flush = z_prev
  update = (1.0 - z_prev) * z_below
  copy = (1.0 - z_prev) * (1.0 - z_below)
  ig = i * g
  c = flush * ig + update * (f * c_prev + ig) + copy * c_prev
  c_for_h = c if ln_c is None else layer_norm(c, ln_c)
  h = (flush + update) * (o * jnp.tanh(c_for_h)) + copy * h_prev
  if s.shape[-1] == 4 * d:
    z = jnp.zeros_like(z_prev)
  else:
    z_new = boundary_lib.f_bound(s[:, 4 * d:], slope, variant, noise, st_gradient)
    copy_z = jax.lax.stop_gradient(copy) if st_local else copy
    z = (1.0 - copy_z) * z_new + copy_z * z_prev
  return c, h, z
