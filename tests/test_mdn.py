"""The mixture density head (Graves 2013, Eq. 17-23) against SciPy, finite differences and
its own samples."""
import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest
from scipy import special
from scipy import stats

from hmlstm_jax.handwriting import mdn


def _reference_log_likelihood(y_hat: np.ndarray, target: np.ndarray) -> float:
  """Eq. 18-23 written from Graves (2013) with SciPy's bivariate normal and Bernoulli."""
  k = (y_hat.shape[-1] - 1) // 6
  end, pi, mx, my, sx, sy, r = np.split(y_hat, [1, 1 + k, 1 + 2 * k, 1 + 3 * k, 1 + 4 * k, 1 + 5 * k])
  weights = special.softmax(pi)
  sigma_x, sigma_y = (mdn.SIGMA_MIN + np.exp(np.minimum(s, mdn.LOG_SIGMA_MAX)) for s in (sx, sy))
  rho = mdn.RHO_MAX * np.tanh(r)
  terms = []
  for j in range(k):
    cov = [[sigma_x[j] ** 2, rho[j] * sigma_x[j] * sigma_y[j]],
           [rho[j] * sigma_x[j] * sigma_y[j], sigma_y[j] ** 2]]
    terms.append(np.log(weights[j]) + stats.multivariate_normal([mx[j], my[j]], cov).logpdf(target[:2]))
  e = 1.0 / (1.0 + np.exp(-end[0]))
  return special.logsumexp(terms) + stats.bernoulli(e).logpmf(int(target[2]))


@pytest.mark.parametrize("k", [1, 3, 20])
def test_log_likelihood_equals_scipy(k):
  rng = np.random.default_rng(k)
  with jax.enable_x64(True):
    for _ in range(10):
      y_hat = rng.normal(size=(1 + 6 * k,)) * 1.5
      target = np.array([*rng.normal(size=2) * 2, rng.integers(0, 2)], np.float64)
      ours = float(mdn.log_likelihood(mdn.mixture_from_outputs(jnp.asarray(y_hat)), jnp.asarray(target)))
      np.testing.assert_allclose(ours, _reference_log_likelihood(y_hat, target), rtol=1e-9)


def test_log_likelihood_is_finite_at_extreme_outputs():
  k = 4
  for value in (-1e4, -50.0, 50.0, 1e4):
    y_hat = jnp.full((1 + 6 * k,), value, jnp.float32)
    mix = mdn.mixture_from_outputs(y_hat)
    assert jnp.all(mix.sigma >= mdn.SIGMA_MIN) and jnp.all(jnp.abs(mix.rho) < 1)
    np.testing.assert_allclose(jnp.exp(jax.nn.logsumexp(mix.log_weights)), 1.0, rtol=1e-6)
    for target in ([0.0, 0.0, 1.0], [3.0, -3.0, 0.0]):
      ll = mdn.log_likelihood(mix, jnp.asarray(target))
      grad = jax.grad(lambda y: mdn.log_likelihood(mdn.mixture_from_outputs(y), jnp.asarray(target)))(y_hat)
      assert jnp.isfinite(ll) and jnp.all(jnp.isfinite(grad)), (value, target)


def test_gradient_equals_finite_differences():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    y_hat = jnp.asarray(rng.normal(size=(2, 1 + 6 * 3)))
    target = jnp.asarray([[0.3, -1.2, 1.0], [-0.5, 0.4, 0.0]])
    fn = lambda y: jnp.sum(mdn.log_likelihood(mdn.mixture_from_outputs(y), target))
    jtu.check_grads(fn, (y_hat,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_head_shapes_and_the_output_layer():
  params = mdn.init_mdn(jax.random.key(0), 7, num_components=5)
  assert params["W"].shape == (7, 31) and params["b"].shape == (31,)
  h = jax.random.normal(jax.random.key(1), (2, 4, 7))
  mix = mdn.mixture(params, h)
  assert mix.mean.shape == (2, 4, 5, 2) and mix.rho.shape == (2, 4, 5) and mix.end_logit.shape == (2, 4)
  direct = mdn.mixture_from_outputs(h @ params["W"] + params["b"])
  np.testing.assert_allclose(mix.sigma, direct.sigma)
  with pytest.raises(ValueError, match="1 \\+ 6K"):
    mdn.mixture_from_outputs(jnp.zeros((8,)))


def test_samples_follow_the_distribution():
  """One component with known parameters: the samples' mean, covariance and pen frequency."""
  mean, sigma, rho, e = np.array([0.5, -1.0]), np.array([0.8, 1.5]), 0.6, 0.3
  y_hat = np.concatenate([[np.log(e / (1 - e))], [0.0], mean,
                          np.log(sigma - mdn.SIGMA_MIN), [np.arctanh(rho / mdn.RHO_MAX)]])
  mix = mdn.mixture_from_outputs(jnp.broadcast_to(jnp.asarray(y_hat, jnp.float32), (40_000, 7)))
  draws = np.asarray(mdn.sample(mix, jax.random.key(0)))
  np.testing.assert_allclose(draws[:, :2].mean(0), mean, atol=0.03)
  cov = np.cov(draws[:, :2].T)
  np.testing.assert_allclose(np.sqrt(np.diag(cov)), sigma, rtol=0.02)
  np.testing.assert_allclose(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]), rho, atol=0.02)
  np.testing.assert_allclose(draws[:, 2].mean(), e, atol=0.01)
  assert set(np.unique(draws[:, 2])) <= {0.0, 1.0}


def test_samples_pick_components_by_weight():
  k = 2
  y_hat = np.zeros(1 + 6 * k)
  y_hat[1:3] = np.log([0.25, 0.75])          # weights
  y_hat[3:5] = [-10.0, 10.0]                 # mu_x of each component, far apart
  y_hat[7:11] = np.log(0.1)                  # small sigmas
  mix = mdn.mixture_from_outputs(jnp.broadcast_to(jnp.asarray(y_hat, jnp.float32), (20_000, 13)))
  x = np.asarray(mdn.sample(mix, jax.random.key(1)))[:, 0]
  np.testing.assert_allclose((x > 0).mean(), 0.75, atol=0.015)
