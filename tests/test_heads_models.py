"""Output module (Eq. 11-12), softmax head, the backbone and the character LM (heads.py,
backbone.py, charlm/model.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hmlstm_jax as H
import numpy_reference


def test_output_module_matches_equations():
  sizes, E = (3, 4, 2), 5
  params = H.init_output_module(jax.random.key(0), sizes, E)
  hs = [jax.random.normal(jax.random.key(i + 1), (6, d)) for i, d in enumerate(sizes)]
  h_all = np.concatenate([np.asarray(h, np.float64) for h in hs], axis=1)
  w, W_e = np.asarray(params["w_gate"], np.float64), np.asarray(params["W_e"], np.float64)
  offsets = np.cumsum((0,) + sizes)
  expected = np.zeros((6, E))
  for l, h in enumerate(hs):
    g = 1 / (1 + np.exp(-(h_all @ w[:, l])))                          # Eq. 11
    expected += g[:, None] * (np.asarray(h, np.float64) @ W_e[offsets[l]:offsets[l + 1]])
  expected = np.maximum(expected, 0)                                   # Eq. 12
  np.testing.assert_allclose(H.output_module(params, hs), expected, atol=1e-5)
  assert np.any(expected == 0) and np.any(expected > 0)
  with pytest.raises(ValueError, match="built for 3 layers"):
    H.output_module(params, hs[:2])


def test_softmax_head_and_charlm_loss_match_numpy():
  config = H.CharLMConfig(vocab_size=11, layer_sizes=(6, 5, 4), output_size=7, embed_size=3)
  params = H.init_charlm(jax.random.key(0), config)
  B, T = 2, 9
  tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, config.vocab_size)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  state0 = H.initial_state(config.rnn, B)
  nll, outs = H.charlm_loss(params, state0, inputs, targets, 1.0, config=config)
  logits, _ = H.charlm_apply(params, state0, inputs, 1.0, config=config)
  assert logits.shape == (B, T, config.vocab_size)
  # Independent NumPy pipeline: embedding rows → reference HM-LSTM → Eq. 11-12 → softmax.
  xs = np.asarray(params["embed"])[np.asarray(inputs).T]
  hs, _, _, _, _ = numpy_reference.run(params["hmlstm"], xs, 1.0, "step")
  h_all = np.concatenate(hs, axis=-1)
  w, W_e = np.asarray(params["output"]["w_gate"], np.float64), np.asarray(params["output"]["W_e"], np.float64)
  g = 1 / (1 + np.exp(-(h_all @ w)))
  gated = np.concatenate([g[..., l:l + 1] * h for l, h in enumerate(hs)], axis=-1)
  h_e = np.maximum(gated @ W_e, 0)
  ref_logits = h_e @ np.asarray(params["softmax"]["W"], np.float64) + np.asarray(params["softmax"]["b"])
  np.testing.assert_allclose(np.swapaxes(logits, 0, 1), ref_logits, atol=1e-4)
  log_p = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))
  ref_nll = -np.take_along_axis(log_p, np.asarray(targets).T[..., None], -1).mean()
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
  assert outs.rnn.h[0].shape == (T, B, 6)


def test_top_layer_head_reads_h_of_the_top_layer_alone():
  """output_head='top': logits = softmax layer of h^L_t; no output module parameters."""
  config = H.CharLMConfig(vocab_size=11, layer_sizes=(6, 5, 4), output_size=7, embed_size=3,
                          output_head="top")
  params = H.init_charlm(jax.random.key(0), config)
  assert "output" not in params and params["softmax"]["W"].shape == (4, 11)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
  logits, _ = H.charlm_apply(params, H.initial_state(config.rnn, 2), tokens, 1.0, config=config)
  hs, _, _, _, _ = numpy_reference.run(params["hmlstm"], np.asarray(params["embed"])[np.asarray(tokens).T],
                                       1.0, "step")
  ref_logits = hs[-1] @ np.asarray(params["softmax"]["W"], np.float64) + np.asarray(params["softmax"]["b"])
  np.testing.assert_allclose(np.swapaxes(logits, 0, 1), ref_logits, atol=1e-4)
  hw = H.HandwritingConfig(layer_sizes=(6, 5), output_size=7, num_components=2, output_head="top")
  from hmlstm_jax import handwriting
  hw_params = handwriting.init_handwriting(jax.random.key(0), hw)
  assert "output" not in hw_params and hw_params["mdn"]["W"].shape[0] == 5
  with pytest.raises(ValueError, match="output_head must be one of"):
    H.CharLMConfig(vocab_size=5, layer_sizes=(4,), output_head="bottom")


def test_charlm_trains_the_boundary_detectors():
  """The loss gradient reaches every layer's weights, the ž rows included."""
  config = H.CharLMConfig(vocab_size=7, layer_sizes=(8, 8, 8), output_size=8, embed_size=4)
  params = H.init_charlm(jax.random.key(0), config)
  tokens = jax.random.randint(jax.random.key(1), (3, 21), 0, 7)
  grads = jax.jit(jax.grad(lambda p: H.charlm_loss(p, H.initial_state(config.rnn, 3), tokens[:, :-1],
                                           tokens[:, 1:], 1.0, config=config)[0]))(params)
  for l in range(2):
    assert float(jnp.abs(grads["hmlstm"][l]["W"][:, -1]).sum()) > 0  # detector row
    assert float(jnp.abs(grads["hmlstm"][l]["U_top"]).sum()) > 0
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_charlm_config_validation():
  with pytest.raises(ValueError, match="vocab_size"):
    H.CharLMConfig(vocab_size=0, layer_sizes=(4,), output_size=4)
  with pytest.raises(ValueError, match="boundary must be one of"):
    H.CharLMConfig(vocab_size=5, layer_sizes=(4,), output_size=4, boundary="x")
  config = H.CharLMConfig(vocab_size=5, layer_sizes=[4, 4], output_size=4)
  assert config.layer_sizes == (4, 4)
  assert hash(config) == hash(H.CharLMConfig(vocab_size=5, layer_sizes=(4, 4), output_size=4))  # static-arg ready
  params = H.init_charlm(jax.random.key(0), config)
  with pytest.raises(ValueError, match=r"\(batch, time\)"):
    H.charlm_apply(params, H.initial_state(config.rnn, 2), jnp.zeros((2, 3, 1), jnp.int32), 1.0,
                   config=config)


def test_lstm_baseline_matches_flax_lstm_cell():
  """Without layer norm the baseline LSTM is Flax's LSTMCell (independent implementation)."""
  import flax.linen as nn
  config = H.CharLMConfig(vocab_size=9, layer_sizes=(6, 5), output_size=3, embed_size=4, model="lstm")
  params = H.init_charlm(jax.random.key(0), config)
  tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, 9)
  logits, outs = H.charlm_apply(params, H.initial_state(config.rnn, 3), tokens, 1.0, config=config)
  assert outs.rnn.z == ()
  x = params["embed"][tokens]
  hs = []
  for p, d in zip(params["lstm"], config.layer_sizes):
    cell = nn.OptimizedLSTMCell(d)
    gates = dict(zip("fiog", range(4)))
    flax_params = {}
    for g, k in gates.items():
      cols = slice(k * d, (k + 1) * d)
      flax_params["i" + g] = {"kernel": p["W"][:, cols]}
      flax_params["h" + g] = {"kernel": p["U"][:, cols], "bias": p["b"][cols]}
    carry = (jnp.zeros((3, d)), jnp.zeros((3, d)))
    steps = []
    for t in range(tokens.shape[1]):
      carry, h = cell.apply({"params": flax_params}, carry, x[:, t])
      steps.append(h)
    x = jnp.stack(steps, axis=1)
    hs.append(x)
  expected = H.output_module(params["output"], hs) @ params["softmax"]["W"] + params["softmax"]["b"]
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_boundary_rate_penalty_is_zero_in_the_band_and_quadratic_outside():
  """Σ_ℓ max(0, m − r)² + max(0, r − M)², r the share of (real) steps with z = 1, by hand."""
  from hmlstm_jax import backbone, hmlstm
  z1 = np.zeros((4, 2, 1))
  z1[:3, 0] = 1.0        # r¹ = 3/8
  z2 = np.zeros((4, 2, 1))
  z2[0, 1] = 1.0          # r² = 1/8
  z3 = np.zeros((4, 2, 1))                           # the last layer has no detector
  zs = tuple(jnp.asarray(z, jnp.float32) for z in (z1, z2, z3))
  np.testing.assert_allclose(hmlstm.boundary_rates(zs), [3 / 8, 1 / 8])
  assert float(hmlstm.boundary_rate_penalty(zs, (0.1, 0.1), (0.4, 0.2))) == 0.0
  expected = (3 / 8 - 0.25) ** 2 + (0.2 - 1 / 8) ** 2
  np.testing.assert_allclose(hmlstm.boundary_rate_penalty(zs, (0.0, 0.2), (0.25, 1.0)), expected,
                             rtol=1e-6)
  mask = np.ones((4, 2))
  mask[2:, 0] = 0.0         # row 0 has 2 real steps: r¹ = (2 + 0)/6
  np.testing.assert_allclose(hmlstm.boundary_rates(zs, jnp.asarray(mask)), [2 / 6, 1 / 6],
                             rtol=1e-6)
  config = H.CharLMConfig(vocab_size=5, layer_sizes=(6, 5, 4), rate_weight=3.0,
                          rate_min=(0.0, 0.2), rate_max=(0.25, 1.0))
  outs = hmlstm.UnrollOutputs(h=(), z=zs)
  np.testing.assert_allclose(backbone.boundary_penalty(outs, config), 3.0 * expected, rtol=1e-6)
  off = H.CharLMConfig(vocab_size=5, layer_sizes=(6, 5, 4))
  assert float(backbone.boundary_penalty(outs, off)) == 0.0


def test_boundary_rate_penalty_trains_the_detectors_toward_the_band():
  """The penalty alone sends a gradient to every detector row (straight-through), of the sign
  that moves each rate into its band: rates above the band push the ž bias down."""
  from hmlstm_jax import hmlstm
  config = hmlstm.HMLSTMConfig(input_size=3, layer_sizes=(6, 5, 4), boundary_bias=0.5)
  params = hmlstm.init_params(jax.random.key(0), config)
  xs = jax.random.normal(jax.random.key(1), (20, 4, 3))

  def penalty(params):
    _, out = hmlstm.unroll(params, hmlstm.initial_state(config, 4), xs, 1.0, config=config)
    return hmlstm.boundary_rate_penalty(out.z, (0.0, 0.0), (0.05, 0.05))

  assert float(penalty(params)) > 0
  grad = jax.grad(penalty)(params)
  assert float(grad[0]["b"][-1]) > 0 and float(grad[1]["b"][-1]) > 0  # descent lowers ž
  assert float(jnp.abs(grad[0]["W"][:, -1]).sum()) > 0  # the detector's weights too


def test_rate_penalty_settings_are_checked():
  with pytest.raises(ValueError, match="one value per detector"):
    H.CharLMConfig(layer_sizes=(6, 5, 4), rate_weight=1.0, rate_min=(0.1,), rate_max=(0.3,))
  with pytest.raises(ValueError, match="0 <= rate_min <= rate_max <= 1"):
    H.CharLMConfig(layer_sizes=(6, 5, 4), rate_weight=1.0, rate_min=(0.3, 0.1),
                   rate_max=(0.2, 0.2))
  with pytest.raises(ValueError, match="model=hmlstm"):
    H.CharLMConfig(model="lstm", layer_sizes=(6, 5, 4), rate_weight=1.0, rate_min=(0.1, 0.1),
                   rate_max=(0.2, 0.2))
  with pytest.raises(ValueError, match="must not be negative"):
    H.CharLMConfig(rate_weight=-1.0)


@jax.enable_x64(True)
@pytest.mark.parametrize("model,output_head", [("hmlstm", "module"), ("hmlstm", "top"),
                                                ("lstm", "module")])
def test_charlm_step_token_by_token_equals_charlm_apply(model, output_head):
  """Sampling's one-step path (``charlm_step``) gives the logits and state of ``charlm_apply``
  over the whole sequence; with ``skip_copy`` the same bits as without."""
  config = H.CharLMConfig(vocab_size=11, layer_sizes=(6, 5, 4), output_size=7, embed_size=5,
                          model=model, output_head=output_head, layer_norm=True,
                          boundary_bias=-0.5)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64),
                                  H.init_charlm(jax.random.key(0), config))
  tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 11)
  state0 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64),
                                  H.initial_state(config.rnn, 3))
  logits, outs = H.charlm_apply(params, state0, tokens, 1.0, config=config, deterministic=True)
  state = skipping = state0
  step = jax.jit(H.charlm_step, static_argnames=("config", "skip_copy"))  # bits: both compiled
  for t in range(tokens.shape[1]):
    step_logits, state = step(params, state, tokens[:, t], 1.0, config=config)
    skip_logits, skipping = step(params, skipping, tokens[:, t], 1.0, config=config,
                                 skip_copy=True)
    np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-12)
    np.testing.assert_array_equal(skip_logits, step_logits)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(outs.final_state)):
    np.testing.assert_allclose(a, b, atol=1e-12)
  with pytest.raises(ValueError, match=r"one symbol per row, shape \(batch,\)"):
    H.charlm_step(params, state, tokens, 1.0, config=config)
