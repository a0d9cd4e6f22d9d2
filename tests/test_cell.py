"""One layer, one step (cell.py): the operation table, the gating, and the gradient paths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hmlstm_jax as H
from hmlstm_jax import cell

D = 4
# Batch rows set by hand: (z_prev, z_below) = FLUSH, FLUSH, UPDATE, COPY.
Z_PREV = jnp.array([[1.0], [1.0], [0.0], [0.0]])
Z_BELOW = jnp.array([[1.0], [0.0], [1.0], [0.0]])


def _sig(x):
  return 1 / (1 + np.exp(-x))


def _inputs(rows, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  s = jax.random.normal(k1, (4, rows))
  c_prev = 3.0 * jax.random.normal(k2, (4, D))
  h_prev = jax.random.normal(k3, (4, D))
  return s, c_prev, h_prev


@pytest.mark.parametrize("ln", [False, True])
def test_operation_table_row_by_row(ln):
  s, c_prev, h_prev = _inputs(4 * D + 1)
  ln_c = {"scale": jnp.full((D,), 1.3), "bias": jnp.full((D,), 0.2)} if ln else None
  c, h, z = cell.layer_update(s, c_prev, h_prev, Z_PREV, Z_BELOW, 1.0, variant="step", ln_c=ln_c)
  s_, c_, h_ = (np.asarray(a, np.float64) for a in (s, c_prev, h_prev))
  f, i, o, g = _sig(s_[:, :D]), _sig(s_[:, D:2 * D]), _sig(s_[:, 2 * D:3 * D]), np.tanh(s_[:, 3 * D:4 * D])

  def squash(cc):
    if not ln:
      return np.tanh(cc)
    mu, var = cc.mean(), cc.var()
    return np.tanh((cc - mu) / np.sqrt(var + 1e-5) * 1.3 + 0.2)

  for row in (0, 1):  # FLUSH: c = i⊙g, h = o⊙tanh(c), whatever z_below
    np.testing.assert_allclose(c[row], i[row] * g[row], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h[row], o[row] * squash(i[row] * g[row]), rtol=1e-5, atol=1e-6)
  c_upd = f[2] * c_[2] + i[2] * g[2]  # UPDATE
  np.testing.assert_allclose(c[2], c_upd, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h[2], o[2] * squash(c_upd), rtol=1e-5, atol=1e-6)
  # COPY: bit-identical c and h; the boundary is copied (0).
  np.testing.assert_array_equal(c[3], c_prev[3])
  np.testing.assert_array_equal(h[3], h_prev[3])
  assert float(z[3, 0]) == 0.0
  np.testing.assert_array_equal(z[:3, 0], (s_[:3, 4 * D] > 0).astype(np.float32))


def test_copy_is_bit_identical_for_every_variant_and_slope():
  s, c_prev, h_prev = _inputs(4 * D + 1, seed=3)
  for variant in ("step", "sample", "soft"):
    for slope in (1.0, 3.0):
      c, h, z = cell.layer_update(s, c_prev, h_prev, Z_PREV, Z_BELOW, slope, variant=variant,
                                  noise=jnp.full((4, 1), 0.5) if variant == "sample" else None)
      np.testing.assert_array_equal(c[3], c_prev[3])
      np.testing.assert_array_equal(h[3], h_prev[3])
      assert float(z[3, 0]) == 0.0


def test_last_layer_has_no_detector_and_z_stays_zero():
  s, c_prev, h_prev = _inputs(4 * D)
  zeros = jnp.zeros((4, 1))
  c, h, z = cell.layer_update(s, c_prev, h_prev, zeros, Z_BELOW, 1.0, variant="step")
  np.testing.assert_array_equal(z, 0.0)
  np.testing.assert_array_equal(c[1], c_prev[1])  # z_below = 0: COPY
  np.testing.assert_array_equal(c[3], c_prev[3])
  assert not np.allclose(c[0], c_prev[0])  # z_below = 1: UPDATE


def _layer_params(ln, seed=1, d_below=3, d_above=5, last=False):
  config = H.HMLSTMConfig(input_size=d_below, layer_sizes=(D, d_above), layer_norm=ln)
  p = H.init_params(jax.random.key(seed), config)[0]
  p = dict(p, b=jax.random.normal(jax.random.key(seed + 1), p["b"].shape))
  if ln:
    for name in ("ln_W", "ln_U", "ln_U_top"):
      p[name] = {"scale": p[name]["scale"] * 1.5, "bias": p[name]["bias"] + 0.7}
  return p


@pytest.mark.parametrize("ln", [False, True])
def test_gating_top_down_by_own_previous_and_bottom_up_by_current_below(ln):
  p = _layer_params(ln)
  k1, k2, k3 = jax.random.split(jax.random.key(9), 3)
  h_prev, h_below, h_above = (jax.random.normal(k1, (1, D)), jax.random.normal(k2, (1, 3)),
                              jax.random.normal(k3, (1, 5)))
  one, zero = jnp.ones((1, 1)), jnp.zeros((1, 1))

  def term(x, w, ln_name):
    out = x @ w
    if ln:
      gates = out[:, :4 * D]
      gates = (gates - gates.mean()) / jnp.sqrt(gates.var() + 1e-5) * p[ln_name]["scale"] + p[ln_name]["bias"]
      out = jnp.concatenate([gates, out[:, 4 * D:]], axis=1)
    return out

  rec, top, bot = term(h_prev, p["U"], "ln_U"), term(h_above, p["U_top"], "ln_U_top"), term(h_below, p["W"], "ln_W")
  s = lambda z_prev, z_below: cell.pre_activation(p, h_prev, z_prev, h_above, z_below, h_below=h_below)
  np.testing.assert_allclose(s(zero, zero), rec + p["b"], atol=1e-5)           # recurrent only
  np.testing.assert_allclose(s(one, zero), rec + top + p["b"], atol=1e-5)      # own previous z → top-down
  np.testing.assert_allclose(s(zero, one), rec + bot + p["b"], atol=1e-5)      # below's current z → bottom-up
  np.testing.assert_allclose(s(one, one), rec + top + bot + p["b"], atol=1e-5)
  # The hoisted bottom-up term gives the same pre-activation.
  bu = cell.bottom_up_term(p, h_below)
  np.testing.assert_allclose(
      cell.pre_activation(p, h_prev, one, h_above, one, bottom_up=bu), s(one, one), atol=1e-5)


def test_recurrent_term_is_never_gated():
  p = _layer_params(False)
  h_a, h_b = jnp.ones((1, D)), -jnp.ones((1, D))
  zero = jnp.zeros((1, 1))
  args = dict(z_prev=zero, h_above=jnp.ones((1, 5)), z_below=zero, h_below=jnp.ones((1, 3)))
  s_a = cell.pre_activation(p, h_a, **args)
  s_b = cell.pre_activation(p, h_b, **args)
  np.testing.assert_allclose(s_a - s_b, (h_a - h_b) @ p["U"], atol=1e-5)


def test_pre_activation_argument_errors():
  p = _layer_params(False)
  x = jnp.ones((1, D))
  with pytest.raises(ValueError, match="exactly one of h_below and bottom_up"):
    cell.pre_activation(p, x, jnp.ones((1, 1)), jnp.ones((1, 5)), jnp.ones((1, 1)))
  with pytest.raises(ValueError, match="h_above must be given"):
    cell.pre_activation(p, x, jnp.ones((1, 1)), None, jnp.ones((1, 1)), h_below=jnp.ones((1, 3)))


def test_gradient_reaches_the_detector_through_the_choice_of_operation():
  """z^1_1 changes only whether layer 1 FLUSHes or UPDATEs at t = 2.

  U_top of layer 1 is zero (no top-down path) and the loss reads only c^1_2 (no path through
  layer 2), so the detector's bias gets gradient only through the operation blend:
  dc_2/dz_1 = i⊙g − (f⊙c_1 + i⊙g) = −f⊙c_1, times dz/dx = a/2 inside the linear region.
  A ``where`` on the boundary would give 0 here.
  """
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(D, 2))
  params = H.init_params(jax.random.key(0), config)
  params = (dict(params[0], U_top=jnp.zeros_like(params[0]["U_top"])), params[1])
  xs = jax.random.normal(jax.random.key(1), (2, 1, 3))
  slope = 2.0
  state0 = H.initial_state(config, 1)
  # Put the t = 1 boundary pre-activation inside the linear region |a x| < 1, just above 0.
  x1 = cell.bottom_up_term(params[0], xs[0]) + params[0]["b"]
  bias = params[0]["b"].at[4 * D].add(0.2 - x1[0, 4 * D])
  params = (dict(params[0], b=bias), params[1])

  def loss(b):
    p = (dict(params[0], b=b), params[1])
    _, out = H.unroll(p, state0, xs, slope, config=config)
    final = H.step(p, H.step(p, state0, xs[0], slope, config=config), xs[1], slope, config=config)
    return jnp.sum(final[0].c), out

  (value, out), grad = jax.value_and_grad(loss, has_aux=True)(bias)
  assert float(out.z[0][0, 0, 0]) == 1.0  # z^1_1 = 1: layer 1 FLUSHes at t = 2
  s1 = H.step(params, state0, xs[0], slope, config=config)
  s2 = cell.pre_activation(params[0], s1[0].h, s1[0].z, s1[1].h, jnp.ones((1, 1)), h_below=xs[1])
  f2 = jax.nn.sigmoid(s2[:, :D])
  expected = -(slope / 2) * float(jnp.sum(f2 * s1[0].c))
  assert abs(expected) > 1e-3
  np.testing.assert_allclose(grad[4 * D], expected, rtol=1e-4)


@pytest.mark.parametrize("st_local", [False, True])
def test_a_copy_rows_pre_activation_gets_no_gradient_but_its_boundaries_need_its_values(st_local):
  """Issue 30 (row compaction in training): what a COPY row needs, forward and backward.

  With (z_prev, z_below) = (0, 0) the masks give the row no gradient into s (so none into the
  matmul's inputs or kernel: dX and dW need the non-COPY rows only), but the straight-through
  gradient into z_below (the choice of operation, decisions.md §2) is
  dL/dc ⊙ (f⊙c_prev + i⊙g − c_prev) + dL/dh ⊙ (o⊙tanh(c) − h_prev) + dL/dz (f_bound(ž) − 0),
  which reads f, i, g, o and ž of the row: its s, the matmul the forward would skip."""
  s, c_prev, h_prev = _inputs(4 * D + 1)
  row = 3  # COPY
  z_prev, z_below = Z_PREV[row:], Z_BELOW[row:]

  def loss(s, z_below):
    c, h, z = cell.layer_update(s, c_prev[row:], h_prev[row:], z_prev, z_below, 1.5,
                                variant="step", st_local=st_local)
    return jnp.sum(c * jnp.arange(1.0, D + 1)) + jnp.sum(h ** 2) + 3.0 * jnp.sum(z)

  d_s, d_z_below = jax.grad(loss, argnums=(0, 1))(s[row:], z_below)
  assert float(jnp.abs(d_s).max()) == 0.0  # the COPY row adds nothing to dX or dW
  assert abs(float(d_z_below[0, 0])) > 1e-3
  other = s[row:] + 0.5  # another matmul result for the same row: another boundary gradient
  assert abs(float(jax.grad(loss, argnums=1)(other, z_below)[0, 0] - d_z_below[0, 0])) > 1e-3
  c, h, z = cell.layer_update(s[row:], c_prev[row:], h_prev[row:], z_prev, z_below, 1.5,
                              variant="step")
  np.testing.assert_array_equal(c, c_prev[row:])  # while the forward values ignore s
  np.testing.assert_array_equal(h, h_prev[row:])
