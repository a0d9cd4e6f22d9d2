"""The handwriting model (§4.2): padding never changes a number; both models train."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmlstm_jax import handwriting as hw
from hmlstm_jax import hmlstm


def _config(**kw):
  return hw.HandwritingConfig(**dict(dict(layer_sizes=(8, 8, 8), output_size=8, num_components=3), **kw))


@pytest.mark.parametrize("model", ["hmlstm", "lstm"])
def test_padding_leaves_log_likelihoods_and_counts_unchanged(model):
  config = _config(model=model, layer_norm=True)
  params = hw.init_handwriting(jax.random.key(0), config)
  rng = np.random.default_rng(0)
  seqs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (7, 12)]
  for s in seqs:
    s[:, 2] = rng.integers(0, 2, len(s))
  # Alone, no padding.
  alone = [float(hw.sequence_log_likelihoods(params, s[None, :-1], s[None, 1:], np.ones((1, len(s) - 1)),
                                               1.0, config=config, deterministic=True)[0][0]) for s in seqs]
  # Together, padded to 20 steps with garbage (not zeros) under a zero mask.
  T = 20
  inputs = rng.normal(size=(2, T, 3)).astype(np.float32) * 50
  targets = rng.normal(size=(2, T, 3)).astype(np.float32) * 50
  mask = np.zeros((2, T), np.float32)
  for r, s in enumerate(seqs):
    n = len(s) - 1
    inputs[r, :n], targets[r, :n], mask[r, :n] = s[:-1], s[1:], 1.0
  sums, outs = hw.sequence_log_likelihoods(params, inputs, targets, mask, 1.0, config=config,
                                           deterministic=True)
  np.testing.assert_allclose(sums, alone, rtol=1e-5)
  if model == "hmlstm":
    ops = hmlstm.operations(hmlstm.initial_state(config.rnn, 2), outs.rnn)
    padded_counts = hmlstm.operation_counts(ops, mask.T)
    solo = []
    for s in seqs:
      _, o = hw.sequence_log_likelihoods(params, s[None, :-1], s[None, 1:], np.ones((1, len(s) - 1)),
                                         1.0, config=config, deterministic=True)
      solo.append(hmlstm.operation_counts(hmlstm.operations(hmlstm.initial_state(config.rnn, 1), o.rnn)))
    np.testing.assert_array_equal(padded_counts, solo[0] + solo[1])
  loss, _ = hw.handwriting_loss(params, inputs, targets, mask, 1.0, config=config)
  np.testing.assert_allclose(loss, -sum(alone) / mask.sum(), rtol=1e-5)


def test_gradients_reach_every_parameter():
  config = _config(boundary="sample")
  params = hw.init_handwriting(jax.random.key(1), config)
  x = jax.random.normal(jax.random.key(2), (2, 6, 3))
  grads = jax.grad(lambda p: hw.handwriting_loss(p, x, x, jnp.ones((2, 6)), 2.0, jax.random.key(3),
                                                 config=config)[0])(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert jnp.all(jnp.isfinite(g)), path
  assert float(jnp.abs(grads["mdn"]["W"]).sum()) > 0 and float(jnp.abs(grads["output"]["W_e"]).sum()) > 0
  assert set(params) == {"hmlstm", "output", "mdn"}


def test_config_and_input_errors():
  with pytest.raises(ValueError, match="num_components"):
    _config(num_components=0)
  config = _config()
  params = hw.init_handwriting(jax.random.key(0), config)
  with pytest.raises(ValueError, match=r"\(batch, time, 3\)"):
    hw.handwriting_apply(params, hmlstm.initial_state(config.rnn, 2), jnp.zeros((2, 5, 2)), 1.0,
                         config=config)
