"""Hard sigmoid, straight-through binarisation and slope schedule (boundary.py, §3.3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hmlstm_jax as H

XS = jnp.array([-3.0, -1.0, -0.4, -0.1, -1e-30, 0.0, 1e-30, 1e-9, 0.1, 0.4, 1.0, 3.0])


@pytest.mark.parametrize("slope", [0.5, 1.0, 2.5, 5.0])
def test_hard_sigmoid_values(slope):
  expected = np.maximum(0, np.minimum(1, (slope * np.asarray(XS, np.float64) + 1) / 2))
  np.testing.assert_allclose(H.hard_sigmoid(XS, slope), expected, atol=1e-7)


@pytest.mark.parametrize("slope", [0.5, 1.0, 2.5, 5.0])
def test_step_is_one_exactly_when_x_positive_whatever_the_slope(slope):
  z = H.f_bound(XS, slope, "step")
  np.testing.assert_array_equal(z, (np.asarray(XS) > 0).astype(np.float32))
  assert set(np.unique(np.asarray(z))) <= {0.0, 1.0}


@pytest.mark.parametrize("variant", ["step", "sample"])
@pytest.mark.parametrize("slope", [1.0, 2.0, 4.0])
def test_straight_through_gradient_is_a_over_2_inside_and_0_outside(variant, slope):
  x = jnp.array([-2.0, -0.6, -0.2, -0.05, 0.05, 0.2, 0.6, 2.0])
  noise = jnp.full(x.shape, 0.3) if variant == "sample" else None
  grad = jax.grad(lambda x: jnp.sum(H.f_bound(x, slope, variant, noise)))(x)
  expected = np.where(np.abs(slope * np.asarray(x)) < 1, slope / 2, 0.0)
  np.testing.assert_allclose(grad, expected, atol=1e-7)
  assert np.any(expected > 0) and np.any(expected == 0)  # both regions are exercised


def test_straight_through_gradient_scales_the_incoming_cotangent():
  x = jnp.array([0.1, -0.1, 3.0])
  _, vjp = jax.vjp(lambda x: H.straight_through_boundary(x, 2.0, 0.5), x)
  np.testing.assert_allclose(vjp(jnp.array([3.0, -2.0, 5.0]))[0], [3.0, -2.0, 0.0])


def test_soft_variant_is_the_hard_sigmoid_with_its_own_gradient():
  x = jnp.array([-2.0, -0.2, 0.3, 2.0])
  np.testing.assert_allclose(H.f_bound(x, 2.0, "soft"), H.hard_sigmoid(x, 2.0))
  np.testing.assert_allclose(jax.grad(lambda x: H.f_bound(x, 2.0, "soft").sum())(x), [0, 1, 1, 0])


def test_sample_is_bernoulli_of_z_tilde():
  x = jnp.array([-2.0, -0.5, 0.0, 0.3, 0.8, 2.0])
  slope = 1.5
  noise = jax.random.uniform(jax.random.key(0), (20000, x.size))
  freq = np.asarray(H.f_bound(jnp.broadcast_to(x, noise.shape), slope, "sample", noise)).mean(0)
  np.testing.assert_allclose(freq, H.hard_sigmoid(x, slope), atol=0.015)
  assert freq[0] == 0.0 and freq[-1] == 1.0


def test_sample_without_noise_is_the_step_function():
  np.testing.assert_array_equal(H.f_bound(XS, 2.0, "sample"), H.f_bound(XS, 2.0, "step"))


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="unknown boundary variant"):
    H.f_bound(XS, 1.0, "hard")


def test_changing_the_slope_does_not_retrace():
  traces = []

  @jax.jit
  def f(x, slope):
    traces.append(1)
    return jax.grad(lambda x: H.f_bound(x, slope, "step").sum())(x)

  g1 = f(XS, 1.0)
  g5 = f(XS, 5.0)
  assert len(traces) == 1
  assert not np.allclose(g1, g5)  # and the new slope is really used


def test_slope_schedule():
  assert float(H.slope_schedule(0.0)) == 1.0
  np.testing.assert_allclose(H.slope_schedule(10.0), 1.4)
  np.testing.assert_allclose(H.slope_schedule(2.5, max_slope=3.0, rate=0.004), 1.01)
  assert float(H.slope_schedule(1000.0)) == 5.0
  assert float(H.slope_schedule(1e6, rate=0.0)) == 1.0


@pytest.mark.parametrize("variant", ["step", "sample"])
@pytest.mark.parametrize("slope", [1.0, 3.0])
def test_other_straight_through_derivatives(variant, slope):
  """'linear': a/2 everywhere; 'sigmoid': d/dx sigmoid(2a x), written here from its formula;
  both equal the paper's a/2 at x = 0 and never vanish; the forward z is the same."""
  x = jnp.array([-3.0, -0.6, -0.2, 0.0, 0.05, 0.2, 0.6, 3.0])
  noise = jnp.full(x.shape, 0.3) if variant == "sample" else None
  grad = lambda g: jax.grad(lambda x: jnp.sum(H.f_bound(x, slope, variant, noise, g)))(x)
  np.testing.assert_allclose(grad("linear"), np.full(x.shape, slope / 2), atol=1e-7)
  s = 1.0 / (1.0 + np.exp(-2.0 * slope * np.asarray(x, np.float64)))
  np.testing.assert_allclose(grad("sigmoid"), 2.0 * slope * s * (1.0 - s), rtol=1e-5, atol=1e-6)
  for g in ("linear", "sigmoid"):
    assert float(grad(g)[3]) == pytest.approx(slope / 2)
    assert np.all(np.asarray(grad(g))[1:-1] > 0)  # beyond the cut-off |a x| >= 1 too
    np.testing.assert_array_equal(H.f_bound(x, slope, variant, noise, g),
                                  H.f_bound(x, slope, variant, noise))
  with pytest.raises(ValueError, match="straight-through gradient"):
    grad("identity")


def test_the_experiments_slope_is_computed_on_the_host_with_the_devices_arithmetic():
  """The schedule the HM-LSTM experiments give the trainer (RecurrentConfig.slope) equals the
  device's slope_schedule bit for bit."""
  from hmlstm_jax import backbone
  config = H.RecurrentConfig(max_slope=5.0, slope_rate=0.04)
  for epoch in (0.0, 0.37, 3.999, 12.5, 99.99, 1000.0):
    host = backbone.slope_schedule(epoch, 5.0, 0.04)
    assert isinstance(host, np.floating)  # no device array, no transfer
    assert host == np.asarray(jax.jit(backbone.slope_schedule, static_argnums=(1, 2))(
        jnp.float32(epoch), 5.0, 0.04))
    assert config.slope(epoch) == float(host)
  with pytest.raises(ValueError, match="max_slope >= 1"):
    H.RecurrentConfig(max_slope=0.5)
