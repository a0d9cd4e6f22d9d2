"""The L-layer HM-LSTM (hmlstm.py) against the NumPy reference and against itself."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hmlstm_jax as H
import numpy_reference

T, B, D = 12, 3, 5
SIZES = (6, 5, 4)


#: Layer-norm variants of the tests: False, True (per term), 'boundary' (per term, ž row too),
#: 'sum' (of the gated sum), 'sum_boundary', 'sum_no_cell' (c not normalised).
LN_VARIANTS = {False: {}, True: {}, "boundary": {"ln_boundary": True},
               "sum": {"ln_placement": "sum"},
               "sum_boundary": {"ln_placement": "sum", "ln_boundary": True},
               "sum_no_cell": {"ln_placement": "sum", "ln_cell": False}}


def _setup(boundary="step", layer_norm=False, seed=0, sizes=SIZES, **extra):
  """``layer_norm``: a key of :data:`LN_VARIANTS`; ``extra``: more HMLSTMConfig settings."""
  config = H.HMLSTMConfig(input_size=D, layer_sizes=sizes, boundary=boundary,
                          layer_norm=bool(layer_norm), **LN_VARIANTS[layer_norm], **extra)
  k_p, k_x, k_ln = jax.random.split(jax.random.key(seed), 3)
  params = H.init_params(k_p, config)
  if layer_norm:  # non-trivial gains and biases, so that a misplaced one shows
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(k_ln, len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  xs = jax.random.normal(k_x, (T, B, D))
  return config, params, xs


def _float64(tree):
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


@pytest.mark.parametrize("boundary,layer_norm",
                         list(itertools.product(("step", "sample", "soft"), (False, True)))
                         + [("step", "boundary"), ("soft", "boundary"), ("step", "sum"),
                            ("sample", "sum"), ("soft", "sum"), ("step", "sum_boundary"),
                            ("step", "sum_no_cell")])
def test_matches_numpy_reference(boundary, layer_norm):
  """In float64 on both sides, so that any deviation from the equations shows above 1e-9."""
  config, params, xs = _setup(boundary, layer_norm)
  slope = 1.7
  key = jax.random.key(42)
  with jax.enable_x64(True):
    params, xs = _float64(params), _float64(xs)
    state0 = H.initial_state(config, B, jnp.float64)
    final, out = H.unroll(params, state0, xs, slope, key, config=config)
    assert out.h[0].dtype == jnp.float64
    uniforms = None
    if boundary == "sample":
      uniforms = np.stack([np.asarray(H.boundary_noise(k, config, B, jnp.float64))[..., 0]
                           for k in jax.random.split(key, T)])
    jax_ops = H.operations(state0, out)
  hs, cs, zs, ops, margin = numpy_reference.run(params, xs, slope, boundary, uniforms)
  if boundary != "soft":
    assert margin > 1e-6, "the run passes too close to a boundary flip to compare"
    seen = {op for layer_ops in ops for op in layer_ops.ravel()}
    assert seen == {"FLUSH", "UPDATE", "COPY"}, f"the random run must exercise every operation, saw {seen}"
  for l in range(len(SIZES)):
    np.testing.assert_allclose(out.h[l], hs[l], atol=1e-9, rtol=1e-9)
    np.testing.assert_allclose(out.z[l][..., 0], zs[l], atol=1e-9)
    np.testing.assert_allclose(final[l].c, cs[l][-1], atol=1e-9, rtol=1e-9)
  if boundary != "soft":
    names = np.array(["COPY", "UPDATE", "FLUSH"], dtype=object)
    for l in range(len(SIZES)):
      np.testing.assert_array_equal(names[np.asarray(jax_ops[l])], ops[l])


def test_float32_run_stays_close_to_reference():
  config, params, xs = _setup("step", layer_norm=True)
  _, out = H.unroll(params, H.initial_state(config, B), xs, 1.0, config=config)
  hs, _, zs, _, _ = numpy_reference.run(params, xs, 1.0, "step")
  for l in range(len(SIZES)):
    np.testing.assert_allclose(out.h[l], hs[l], atol=2e-4)
    np.testing.assert_array_equal(out.z[l][..., 0], zs[l])


def test_sample_eval_uses_step_function():
  config, params, xs = _setup("sample")
  state0 = H.initial_state(config, B)
  _, out = H.unroll(params, state0, xs, 1.0, None, config=config, deterministic=True)
  hs, _, zs, _, _ = numpy_reference.run(params, xs, 1.0, "step")
  for l in range(len(SIZES)):
    np.testing.assert_allclose(out.z[l][..., 0], zs[l])
    np.testing.assert_allclose(out.h[l], hs[l], atol=2e-5, rtol=1e-4)


def test_sample_without_key_is_a_clear_error():
  config, params, xs = _setup("sample")
  with pytest.raises(ValueError, match="needs a PRNG key"):
    H.unroll(params, H.initial_state(config, B), xs, 1.0, None, config=config)


def test_layer_one_never_copies_and_last_layer_never_flushes():
  config, params, xs = _setup("step")
  state0 = H.initial_state(config, B)
  _, out = H.unroll(params, state0, xs, 1.0, config=config)
  ops = H.operations(state0, out)
  assert not np.any(np.asarray(ops[0]) == H.COPY)
  assert not np.any(np.asarray(ops[-1]) == H.FLUSH)
  assert not np.any(np.asarray(out.z[-1]))  # no detector on the last layer
  assert params[-1]["b"].shape == (4 * SIZES[-1],) and "U_top" not in params[-1]
  counts = H.operation_counts(ops)
  assert counts.shape == (3, 3) and int(counts.sum()) == 3 * T * B
  mask = np.zeros((T, B), np.float32)
  mask[: T // 2] = 1.0  # the second half is padding
  half = H.operation_counts(ops, mask)
  expected = [np.bincount(np.asarray(op)[: T // 2].ravel(), minlength=3) for op in ops]
  np.testing.assert_array_equal(half, expected)
  assert half.dtype == jnp.int32


@jax.enable_x64(True)
@pytest.mark.parametrize("schedule", ["layers", "two_phase"])
@pytest.mark.parametrize("sizes", [(4,), (4, 5), (4, 5, 6), (4, 5, 6, 3), (4, 5, 6, 3, 4)])
def test_a_loop_of_step_equals_unroll_for_every_schedule(schedule, sizes):
  """A user's decoding loop over ``step`` gives ``unroll``'s states, two-phase included
  (step once took the two-phase layer order without its time skew: layer 3 read layer 2 of
  the previous step)."""
  config, params, xs = _setup("step", False, sizes=sizes, schedule=schedule)
  params, xs = _float64(params), _float64(xs)
  state = H.initial_state(config, B, jnp.float64)
  _, out = H.unroll(params, state, xs, 1.0, config=config)
  for t in range(T):
    state = H.step(params, state, xs[t], 1.0, config=config)
    for l in range(len(sizes)):
      np.testing.assert_allclose(state[l].h, out.h[l][t], atol=1e-12)
      np.testing.assert_array_equal(state[l].z, out.z[l][t])


@jax.enable_x64(True)
def test_unroll_equals_python_loop_over_step():
  """float64, so that the only difference left is the order of rounding (the scan hoists W x)."""
  config, params, xs = _setup("sample", layer_norm=True)
  params, xs = _float64(params), _float64(xs)
  key = jax.random.key(3)
  state = H.initial_state(config, B, jnp.float64)
  final, out = H.unroll(params, state, xs, 2.0, key, config=config)
  step = jax.jit(H.step, static_argnames=("config", "deterministic"))
  for t, k in enumerate(jax.random.split(key, T)):
    state = step(params, state, xs[t], 2.0, k, config=config)
    for l in range(len(SIZES)):
      np.testing.assert_allclose(state[l].h, out.h[l][t], atol=1e-12)
      np.testing.assert_array_equal(state[l].z, out.z[l][t])
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(final)):
    np.testing.assert_allclose(a, b, atol=1e-12)


@jax.enable_x64(True)
def test_jit_equals_no_jit():
  config, params, xs = _setup("step", layer_norm=True)
  params, xs = _float64(params), _float64(xs)
  state0 = H.initial_state(config, B, jnp.float64)
  eager = H.unroll(params, state0, xs, 1.5, config=config)
  jitted = jax.jit(H.unroll, static_argnames=("config", "deterministic"))(
      params, state0, xs, 1.5, config=config)
  for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_two_segments_equal_one_long_unroll():
  config, params, xs = _setup("step")
  state0 = H.initial_state(config, B)
  full_final, full = H.unroll(params, state0, xs, 1.0, config=config)
  mid, first = H.unroll(params, state0, xs[:5], 1.0, config=config)
  last_final, second = H.unroll(params, jax.lax.stop_gradient(mid), xs[5:], 1.0, config=config)
  for l in range(len(SIZES)):
    np.testing.assert_allclose(jnp.concatenate([first.h[l], second.h[l]]), full.h[l], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(jnp.concatenate([first.z[l], second.z[l]]), full.z[l])
  for a, b in zip(jax.tree_util.tree_leaves(last_final), jax.tree_util.tree_leaves(full_final)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_carried_state_is_honoured_against_reference():
  """A non-zero initial state (a carried segment) enters exactly as the equations say."""
  config, params, xs = _setup("step", seed=5)
  state0 = H.initial_state(config, B)
  mid, _ = H.unroll(params, state0, xs[:6], 1.0, config=config)
  _, out = H.unroll(params, mid, xs[6:], 1.0, config=config)
  init = [(s.h, s.c, s.z) for s in mid]
  hs, _, zs, _, _ = numpy_reference.run(params, xs[6:], 1.0, "step", init=init)
  for l in range(len(SIZES)):
    np.testing.assert_allclose(out.h[l], hs[l], atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(out.z[l][..., 0], zs[l])


def test_vmap_over_sequences_equals_batch():
  config, params, xs = _setup("step")
  state0 = H.initial_state(config, B)
  _, batched = H.unroll(params, state0, xs, 1.0, config=config)

  def one(x):  # x: (T, D) -> unroll with batch 1
    _, o = H.unroll(params, H.initial_state(config, 1), x[:, None], 1.0, config=config)
    return o.h[-1][:, 0]

  np.testing.assert_allclose(jax.vmap(one, in_axes=1, out_axes=1)(xs), batched.h[-1], atol=1e-5, rtol=1e-5)


def test_single_layer_is_an_lstm_without_detector():
  config, params, xs = _setup("step", sizes=(7,))
  _, out = H.unroll(params, H.initial_state(config, B), xs, 1.0, config=config)
  hs, _, _, ops, _ = numpy_reference.run(params, xs, 1.0, "step")
  assert {op for op in ops[0].ravel()} == {"UPDATE"}
  np.testing.assert_allclose(out.h[0], hs[0], atol=2e-5, rtol=1e-4)


def test_bad_config_and_shapes_fail_clearly():
  with pytest.raises(ValueError, match="boundary must be one of"):
    H.HMLSTMConfig(input_size=3, layer_sizes=(4,), boundary="hard")
  with pytest.raises(ValueError, match="layer_sizes"):
    H.HMLSTMConfig(input_size=3, layer_sizes=())
  with pytest.raises(ValueError, match="input_size"):
    H.HMLSTMConfig(input_size=0, layer_sizes=(4,))
  config, params, xs = _setup()
  with pytest.raises(ValueError, match=r"inputs must be \(T, B, 5\), got shape \(12, 3, 2\)"):
    H.unroll(params, H.initial_state(config, B), xs[..., :2], 1.0, config=config)
  with pytest.raises(ValueError, match="state has 1 layers"):
    H.unroll(params, H.initial_state(config, B)[:1], xs, 1.0, config=config)
  # Issue 19, item 4: these failed deep in jax ("mul got incompatible shapes (3, 1), (5, 33)").
  with pytest.raises(ValueError, match=r"state of layer 1 has shapes h \(5, 6\).*batch 3.*"
                                       r"initial_state\(config, 3\)"):
    H.unroll(params, H.initial_state(config, 5), xs, 1.0, config=config)
  with pytest.raises(ValueError, match=r"the inputs look batch-major \(B, T, input\): pass "
                                       r"time_major=False, or jnp.swapaxes\(xs, 0, 1\)"):
    H.unroll(params, H.initial_state(config, B), jnp.swapaxes(xs, 0, 1), 1.0, config=config)
  with pytest.raises(ValueError, match=r"state is float32 but the inputs are bfloat16"):
    H.unroll(params, H.initial_state(config, B), xs.astype(jnp.bfloat16), 1.0, config=config)
  with pytest.raises(ValueError, match=r"inputs must be \(B, 5\)"):
    H.step(params, H.initial_state(config, B), xs, 1.0, config=config)
  for slope in (0.0, -1.0, float("nan")):  # ran silently: -1 flipped the gradient
    with pytest.raises(ValueError, match="the slope a must be positive"):
      H.unroll(params, H.initial_state(config, B), xs, slope, config=config)
    with pytest.raises(ValueError, match="the slope a must be positive"):
      H.step(params, H.initial_state(config, B), xs[0], slope, config=config)
  with pytest.raises(ValueError, match="the slope a must be positive"):  # ZeroDivisionError
    H.straight_through_boundary(jnp.ones(3), 0.0, 0.5)
  # Issue 31, item 3: each of these failed elsewhere or ran silently.
  state = H.initial_state(config, B)
  with pytest.raises(ValueError, match=r"the slope a must be a scalar .* got shape \(3,\)"):
    H.unroll(params, state, xs, jnp.ones(3), config=config)  # "Only scalar arrays can be ..."
  with pytest.raises(ValueError, match="inputs must be floating point .* got int32: embed"):
    H.unroll(params, state, xs.astype(jnp.int32), 1.0, config=config)  # "make the state int32"
  T = xs.shape[0]
  for lengths in ([T + 1] + [T] * (B - 1), [-1] + [T] * (B - 1)):  # clamped silently
    with pytest.raises(ValueError, match=rf"seq_lengths must be in \[0, {T}\]"):
      H.unroll(params, state, xs, 1.0, config=config, seq_lengths=jnp.array(lengths))
  as_numpy = H.HMLSTMConfig(input_size=np.int64(D), layer_sizes=tuple(np.int64(d) for d in SIZES))
  assert as_numpy == H.HMLSTMConfig(input_size=D, layer_sizes=SIZES)  # np.int64 was refused


def test_params_of_another_config_are_named_at_the_boundary():
  """Issue 31, item 3: params of another width, input size, depth or layer-norm setting
  failed deep in cell.py ("dot_general requires contracting dimensions ...")."""
  config, params, xs = _setup()
  state = H.initial_state(config, B)
  other = lambda **kw: H.init_params(jax.random.key(0), dataclasses.replace(config, **kw))
  sizes = config.layer_sizes
  for bad, words in ((other(input_size=7), r"params\[0\]\['W'\] has shape \(7, "),
                     (other(layer_sizes=(sizes[0] + 1,) + sizes[1:]),
                      r"params\[0\]\['U'\] has shape"),
                     (params[:-1], rf"params must be a tuple of {len(sizes)} per-layer dicts"),
                     (other(layer_norm=not config.layer_norm),
                      r"params\[0\]\['ln_\w+'\]\['\w+'\] (is missing|is not a parameter)")):
    with pytest.raises(ValueError, match=words):
      H.unroll(bad, state, xs, 1.0, config=config)
    with pytest.raises(ValueError, match=words):
      H.step(bad, state, xs[0], 1.0, config=config)
  jax.jit(lambda p: H.unroll(p, state, xs, 1.0, config=config))(params)  # the right ones pass


def test_float32_params_with_bfloat16_inputs_compute_in_bfloat16_in_unroll_and_step():
  """Issue 31, item 4: the dtype policy (Flax's dtype / param_dtype): unroll failed with a
  lax.scan carry TypeError, step promoted to float32. Now both compute in the inputs' dtype,
  bit for bit as with bf16 params, and the gradient comes back float32."""
  config, params, xs = _setup(layer_norm=True)
  xs16, state16 = xs.astype(jnp.bfloat16), H.initial_state(config, B, jnp.bfloat16)
  params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
  for run in (lambda p: H.unroll(p, state16, xs16, 1.0, config=config)[1].h,
              lambda p: tuple(s.h for s in H.step(p, state16, xs16[0], 1.0, config=config))):
    mixed, pure = run(params), run(params16)
    for a, b in zip(mixed, pure):
      assert a.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    grads = jax.grad(lambda p: sum(h.astype(jnp.float32).sum() for h in run(p)))(params)
    assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}
  assert H.HMLSTMConfig(input_size=D, layer_sizes=SIZES,
                        matmul_dtype=jnp.bfloat16).matmul_dtype == "bfloat16"  # was refused


def test_init_params_shapes_follow_the_paper():
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(4, 5, 6), layer_norm=True)
  p = H.init_params(jax.random.key(0), config)
  assert p[0]["W"].shape == (3, 17) and p[0]["U"].shape == (4, 17) and p[0]["U_top"].shape == (5, 17)
  assert p[1]["W"].shape == (4, 21) and p[1]["U_top"].shape == (6, 21) and p[1]["b"].shape == (21,)
  assert p[2]["W"].shape == (5, 24) and p[2]["U"].shape == (6, 24) and "U_top" not in p[2]
  assert p[2]["ln_U"]["scale"].shape == (24,) and "ln_U_top" not in p[2] and p[2]["ln_c"]["bias"].shape == (6,)
  assert p[0]["ln_W"]["scale"].shape == (16,)  # gate rows only, not ž
  np.testing.assert_array_equal(p[1]["b"][:5], 1.0)  # forget-gate bias
  np.testing.assert_array_equal(p[1]["b"][5:], 0.0)
  for layer in p:  # layer-norm gains 1 (Ba et al.), biases 0
    for name in [n for n in layer if n.startswith("ln_")]:
      np.testing.assert_array_equal(layer[name]["scale"], 1.0)
      np.testing.assert_array_equal(layer[name]["bias"], 0.0)
  half = H.init_params(jax.random.key(0), dataclasses.replace(config, ln_gain=0.5))
  assert all(np.all(l[n]["scale"] == 0.5) for l in half for n in l if n.startswith("ln_"))
  np.testing.assert_array_equal(half[1]["U"], p[1]["U"])  # only the gains differ
  from hmlstm_jax import lstm  # the LSTM baseline reads the same setting
  lstm_config = H.CharLMConfig(model="lstm", layer_sizes=(4, 5), layer_norm=True, ln_gain=0.5).rnn
  assert isinstance(lstm_config, lstm.LSTMConfig)
  assert all(np.all(l[n]["scale"] == 0.5) for l in lstm.init_params(jax.random.key(0), lstm_config)
             for n in l if n.startswith("ln_"))
  rare = H.init_params(jax.random.key(0), dataclasses.replace(config, boundary_bias=-2.0))
  assert rare[0]["b"][16] == rare[1]["b"][20] == -2.0 and p[0]["b"][16] == 0.0  # the ž rows
  np.testing.assert_array_equal(rare[0]["b"][:16], p[0]["b"][:16])
  np.testing.assert_array_equal(rare[2]["b"], p[2]["b"])  # the last layer has no ž row
  with pytest.raises(ValueError, match="ln_gain must be positive"):
    H.HMLSTMConfig(input_size=3, layer_sizes=(4,), ln_gain=0.0)
  z_ln = H.init_params(jax.random.key(0), dataclasses.replace(config, ln_boundary=True))
  assert z_ln[0]["ln_U_top"]["scale"].shape == (17,) and z_ln[1]["ln_W"]["bias"].shape == (21,)
  assert z_ln[2]["ln_U"]["scale"].shape == (24,)  # the last layer has no ž row
  summed = H.init_params(jax.random.key(0), dataclasses.replace(
      config, layer_norm=True, ln_placement="sum", ln_cell=False))
  assert [sorted(k for k in p if k.startswith("ln_")) for p in summed] == [["ln_s"]] * 3
  assert [p["ln_s"]["scale"].shape for p in summed] == [(16,), (20,), (24,)]  # gate rows
  for bad, match in (({"ln_placement": "gates"}, "ln_placement"),
                     ({"st_gradient": "identity"}, "st_gradient")):
    with pytest.raises(ValueError, match=match):
      dataclasses.replace(config, **bad)
  with pytest.raises(ValueError, match="set layer_norm too"):
    H.HMLSTMConfig(input_size=3, layer_sizes=(4,), ln_boundary=True)


@pytest.mark.parametrize("boundary,layer_norm,st_gradient",
                         [(b, ln, "hard_sigmoid") for b, ln in
                          itertools.product(("step", "sample", "soft"), (False, True))]
                         + [("soft", "boundary", "hard_sigmoid"), ("step", "sum", "hard_sigmoid"),
                            ("soft", "sum", "hard_sigmoid"), ("step", "sum_no_cell", "hard_sigmoid"),
                            ("step", True, "linear"), ("sample", "sum", "linear"),
                            ("step", "sum", "sigmoid"), ("sample", False, "sigmoid")])
def test_fast_backward_equals_autodiff_of_the_plain_scan(boundary, layer_norm, st_gradient):
  """The custom backward gives jax.grad of the plain lax.scan: params, initial state, inputs,
  for every straight-through derivative."""
  config, params, xs = _setup(boundary, layer_norm, seed=11, st_gradient=st_gradient)
  key = jax.random.key(5)
  with jax.enable_x64(True):
    params, xs = _float64(params), _float64(xs)
    state0 = jax.tree_util.tree_map(
        lambda x: 0.5 * jnp.ones_like(x), H.initial_state(config, B, jnp.float64))
    state0 = tuple(s._replace(z=jnp.array([[1.0], [0.0], [1.0]])) for s in state0)
    weights = [jax.random.normal(jax.random.key(i), (T, B, d), jnp.float64) for i, d in enumerate(SIZES)]

    def loss(params, state, xs, fast):
      final, out = H.unroll(params, state, xs, 1.3, key, config=config, fast_backward=fast)
      value = sum(jnp.sum(w * h) for w, h in zip(weights, out.h))
      value += sum(jnp.sum(z * (l + 1.0)) for l, z in enumerate(out.z))  # z's own cotangent
      value += sum(jnp.sum(s.c ** 2) + jnp.sum(s.h) + jnp.sum(s.z) for s in final)
      return value

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    fast, plain = grad(params, state0, xs, True), grad(params, state0, xs, False)
    assert float(jnp.abs(fast[0][0]["W"][:, -1]).sum()) > 0  # the detector's weights learn
  flat_fast, tree_fast = jax.tree_util.tree_flatten(fast)
  flat_plain, tree_plain = jax.tree_util.tree_flatten(plain)
  assert tree_fast == tree_plain
  for a, b in zip(flat_fast, flat_plain):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_bfloat16_matmuls_stay_close_and_keep_the_backward_exact():
  config32, params, xs = _setup("soft", layer_norm=True, seed=2)
  config16 = H.HMLSTMConfig(input_size=D, layer_sizes=SIZES, boundary="soft", layer_norm=True,
                            matmul_dtype="bfloat16")
  state0 = H.initial_state(config32, B)
  _, out32 = H.unroll(params, state0, xs, 1.0, config=config32)
  _, out16 = H.unroll(params, state0, xs, 1.0, config=config16)
  assert out16.h[0].dtype == jnp.float32  # element-wise math stays float32
  np.testing.assert_allclose(out16.h[-1], out32.h[-1], atol=0.05)
  assert not np.allclose(out16.h[-1], out32.h[-1], atol=1e-6)  # bf16 is really used

  def loss(params, fast):
    _, out = H.unroll(params, state0, xs, 1.0, config=config16, fast_backward=fast)
    return sum(jnp.sum(h ** 2) for h in out.h)

  fast, plain = (jax.grad(loss)(params, True), jax.grad(loss)(params, False))
  for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.02 * float(jnp.abs(b).max()) + 1e-6)
  with pytest.raises(ValueError, match="matmul_dtype"):
    H.HMLSTMConfig(input_size=D, layer_sizes=SIZES, matmul_dtype="int8")


@pytest.mark.parametrize("sizes,steps,boundary,layer_norm", [
    (SIZES, T, "step", False), (SIZES, T, "sample", True), (SIZES, T, "soft", False),
    ((4, 5, 6, 3, 4), T, "step", True), ((4, 5, 6, 3), 1, "step", False)])
def test_two_phase_schedule_gives_the_same_bits_forward_and_backward(sizes, steps, boundary,
                                                                     layer_norm):
  """Outputs, final state and every gradient of the custom backward equal bit for bit with
  binary boundaries.

  Equal to rounding: the soft variant (its blends of fractional masks are multiply-adds that
  XLA may contract into FMAs differently in the two loop bodies) and autodiff of the
  two-phase scan (it sums some cotangents in the forward body's order, which changes)."""
  plain, params, xs = _setup(boundary, layer_norm, seed=3, sizes=sizes)
  xs = xs[:steps]
  two = dataclasses.replace(plain, schedule="two_phase")
  key = jax.random.key(9)
  state0 = tuple(s._replace(z=jnp.array([[1.0], [0.0], [1.0]]), h=s.h + 0.5)
                 for s in H.initial_state(plain, B))
  weights = [jax.random.normal(jax.random.key(i), (steps, B, d)) for i, d in enumerate(sizes)]

  def loss(params, state, xs, config, fast):
    final, out = H.unroll(params, state, xs, 1.3, key, config=config, fast_backward=fast)
    value = sum(jnp.sum(w * h) for w, h in zip(weights, out.h))
    value += sum(jnp.sum(z * (l + 1.0)) for l, z in enumerate(out.z))
    value += sum(jnp.sum(s.c ** 2) + jnp.sum(s.h) + jnp.sum(s.z) for s in final)
    return value, (final, out)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=(3, 4))
  for fast in (True, False) if len(sizes) == 3 and boundary == "step" else (True,):
    (g_plain, aux_plain), (g_two, aux_two) = grad(params, state0, xs, plain, fast), grad(
        params, state0, xs, two, fast)
    flat_plain, flat_two = (jax.tree_util.tree_leaves(t) for t in ((g_plain, aux_plain), (g_two, aux_two)))
    assert len(flat_plain) == len(flat_two)
    for a, b in zip(flat_plain, flat_two):
      if fast and boundary != "soft":
        np.testing.assert_array_equal(a, b)
      else:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 sums, reordered
  ops = H.operations(state0, aux_plain[1])
  if len(sizes) > 1 and steps == T:
    assert {int(v) for v in np.unique(np.asarray(ops[1]))} == {0, 1, 2}  # every operation ran


@pytest.mark.parametrize("schedule", ["layers", "two_phase"])
@jax.enable_x64(True)
def test_scan_unroll_gives_the_same_outputs_and_gradients_with_fewer_loop_iterations(schedule):
  """``scan_unroll`` (lax.scan's unroll, a GPU speed setting) with T = 5 and unroll 3 (a
  remainder): the plain scan's outputs and custom-backward gradients
  (float64: XLA may fuse unrolled iterations differently, so equal up to rounding); the
  forward and backward scans of the program carry the unroll."""
  plain, params, xs = _setup("step", False, seed=4, schedule=schedule)
  params, xs = _float64(params), _float64(xs[:5])
  weights = [jax.random.normal(jax.random.key(i), (5, B, d), jnp.float64)
             for i, d in enumerate(SIZES)]

  def loss(params, xs, config):
    final, out = H.unroll(params, H.initial_state(config, B, jnp.float64), xs, 1.3,
                          config=config)
    value = sum(jnp.sum(w * h) for w, h in zip(weights, out.h))
    return value + sum(jnp.sum(s.c ** 2) for s in final), out.z

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  reference = grad(params, xs, plain)
  config = dataclasses.replace(plain, scan_unroll=3)
  got = grad(params, xs, config)
  for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  jaxpr = jax.make_jaxpr(jax.grad(loss, has_aux=True), static_argnums=2)(params, xs, config)
  unrolls = [e.params["unroll"] for e in _equations(jaxpr.jaxpr) if e.primitive.name == "scan"]
  assert unrolls == [3, 3], unrolls  # forward and custom backward
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="scan_unroll must be a positive int"):
      dataclasses.replace(plain, scan_unroll=bad)


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def test_schedule_plans_and_critical_paths():
  from hmlstm_jax import schedule
  assert schedule.plan("layers", 3) == ((0, 0, 0), (0, 1, 2))
  assert schedule.plan("layers", 3, backward=True) == ((0, 0, 0), (2, 1, 0))
  assert schedule.plan("two_phase", 3) == ((0, 0, 1), (0, 2, 1))
  assert schedule.plan("two_phase", 5) == ((0, 0, 1, 1, 2), (0, 2, 4, 1, 3))
  assert schedule.plan("two_phase", 4, backward=True) == ((1, 1, 0, 0), (3, 1, 2, 0))
  assert schedule.critical_path("layers", 3, 100) == 300
  assert schedule.critical_path("two_phase", 3, 100) == 201
  with pytest.raises(ValueError, match="schedule must be one of"):
    H.HMLSTMConfig(input_size=3, layer_sizes=(4,), schedule="diagonal")


@pytest.mark.parametrize("layer_norm", [False, True, "sum"])
def test_local_straight_through_keeps_the_forward_and_cuts_the_detectors_loop(layer_norm):
  """st_local: the same outputs bit for bit; the custom backward = autodiff (float64); a
  boundary's gradient reaches its detector's weights but no earlier input or state, where the
  paper's estimator reaches both."""
  config, params, xs = _setup("step", layer_norm, seed=3)
  local = dataclasses.replace(config, st_local=True)
  state0 = H.initial_state(config, B)
  _, out = H.unroll(params, state0, xs, 1.5, config=config)
  _, out_local = H.unroll(params, state0, xs, 1.5, config=local)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(out_local)):
    np.testing.assert_array_equal(a, b)

  def last_boundaries(params, state, xs, cfg, fast=True):
    _, out = H.unroll(params, state, xs, 1.5, config=cfg, fast_backward=fast)
    return jnp.sum(out.z[0][-1]) + jnp.sum(out.z[1][-1])

  grad = jax.grad(last_boundaries, argnums=(0, 1, 2))
  g_paper, g_local = grad(params, state0, xs, config), grad(params, state0, xs, local)
  assert float(jnp.abs(g_paper[2][:-1]).sum()) > 0  # the paper's: back through the states
  np.testing.assert_array_equal(g_local[2][:-1], 0.0)  # local: only x_T, read directly
  assert all(float(jnp.abs(s.h).sum()) == 0 for s in g_local[1])
  assert float(jnp.abs(g_local[0][1]["U"][:, -1]).sum()) > 0  # the detector still learns
  with jax.enable_x64(True):
    p64, x64 = _float64(params), _float64(xs)
    s64 = H.initial_state(config, B, jnp.float64)
    weights = [jax.random.normal(jax.random.key(i), (T, B, d), jnp.float64) for i, d in enumerate(SIZES)]

    def loss(params, fast):
      _, out = H.unroll(params, s64, x64, 1.5, config=local, fast_backward=fast)
      return (sum(jnp.sum(w * h) for w, h in zip(weights, out.h))
              + sum(jnp.sum(z * (l + 1.0)) for l, z in enumerate(out.z)))

    fast, plain = jax.grad(loss)(p64, True), jax.grad(loss)(p64, False)
  for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
  with pytest.raises(ValueError, match="st_local"):
    dataclasses.replace(config, layer_norm=True, ln_boundary=True, st_local=True)


def _gradient_reach(seed: int, steps: int = 500, **settings) -> float:
  """max_t |∂ Σ_ℓ Σ h^ℓ_T / ∂x_t| / |∂ Σ_ℓ Σ h^ℓ_T / ∂x_T| at initialisation, 3 × 64 units
  on random inputs: how much more an input `steps` back moves the last state than the last
  input does (1 when the gradient only fades back in time)."""
  config = H.HMLSTMConfig(input_size=32, layer_sizes=(64, 64, 64), **settings)
  params = H.init_params(jax.random.key(seed), config)
  xs = jax.random.normal(jax.random.key(seed + 1), (steps, 1, 32))

  def last_state(xs):
    final, _ = H.unroll(params, H.initial_state(config, 1), xs, 1.0, config=config)
    return sum(jnp.sum(layer.h) for layer in final)

  norms = np.linalg.norm(np.asarray(jax.grad(last_state)(xs))[:, 0], axis=-1)
  return float(np.max(norms) / norms[-1])


def test_gradient_reach_at_initialisation_stays_within_100_for_the_shipped_layer_norm():
  """decisions.md §3: layer norm of the sum, gains 0.5, local straight-through gradient (the
  flagfiles' model) keeps the gradient of 500 steps within a factor 100; the paper's reading
  (per-term layer norm, gains 1) does not (it overflows float32 on some seeds)."""
  shipped = dict(layer_norm=True, ln_placement="sum", ln_gain=0.5, st_local=True)
  for seed in range(3):
    assert _gradient_reach(seed, **shipped) < 100
  assert not _gradient_reach(0, layer_norm=True) < 1e4  # nan / inf count as failing too


@pytest.mark.parametrize("boundary,layer_norm,extra", [
    ("step", False, {}), ("step", True, {}), ("step", "sum", {"st_local": True}),
    ("sample", False, {}), ("sample", "sum", {}), ("soft", False, {}),
    ("step", False, {"schedule": "two_phase"}), ("step", True, {"matmul_dtype": "bfloat16"})])
@pytest.mark.parametrize("sizes", [(4, 5, 6), (4, 5, 6, 3, 4)])
@pytest.mark.parametrize("batch", [1, 3])
def test_step_skipping_copy_layers_gives_the_same_bits(boundary, layer_norm, extra, sizes, batch):
  """``skip_copy`` hands back the state of a layer whose rows all COPY instead of computing
  it: the states are bit-identical to the plain step's, and layers were skipped."""
  config, params, xs = _setup(boundary, layer_norm, sizes=sizes, boundary_bias=-0.7, **extra)
  xs = xs[:, :batch]
  step = jax.jit(H.step, static_argnames=("config", "deterministic", "skip_copy"))
  plain = skipping = H.initial_state(config, batch)
  skipped = 0
  for t, key in enumerate(jax.random.split(jax.random.key(5), T)):
    plain = step(params, plain, xs[t], 1.5, key, config=config)
    before, skipping = skipping, step(params, skipping, xs[t], 1.5, key, config=config,
                                      skip_copy=True)
    skipped += sum(not bool(H.hmlstm.layer_needed(before[l].z, skipping[l - 1].z))
                   for l in range(1, len(sizes)))  # z^ℓ_{t-1} and z^(ℓ-1)_t
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(skipping)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if boundary != "soft":
    assert skipped > 0, "no layer was ever all-COPY: the test would not see a wrong skip"


@pytest.mark.parametrize("layer_norm,extra", [(False, {}), (True, {}), ("sum", {"st_local": True})])
def test_step_skipping_a_closed_term_gives_the_same_bits(layer_norm, extra):
  """Within a layer that runs, ``skip_copy`` leaves out the top-down term while z^ℓ_{t-1} = 0
  and the bottom-up term while z^(ℓ-1)_t = 0 (Eq. 6-7): both happen here (counted), and a
  term left out under the wrong gate would change the state."""
  config, params, _ = _setup("step", layer_norm, sizes=(4, 5, 6), boundary_bias=0.0, **extra)
  xs = jax.random.normal(jax.random.key(3), (40, 1, D))
  step = jax.jit(H.step, static_argnames=("config", "deterministic", "skip_copy"))
  plain = skipping = H.initial_state(config, 1)
  without_top = without_bottom = 0
  for x_t in xs:
    before = skipping
    plain = step(params, plain, x_t, 1.5, config=config)
    skipping = step(params, skipping, x_t, 1.5, config=config, skip_copy=True)
    for layer in (1, 2):
      z_prev, z_below = bool(before[layer].z[0, 0]), bool(skipping[layer - 1].z[0, 0])
      without_top += layer == 1 and z_below and not z_prev
      without_bottom += z_prev and not z_below
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(skipping)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert without_top > 0 and without_bottom > 0, (without_top, without_bottom)


LENGTHS = (12, 5, 9)  # one per row of B = 3; T = 12


@jax.enable_x64(True)
@pytest.mark.parametrize("schedule,boundary,layer_norm", [
    ("layers", "step", False), ("two_phase", "step", True), ("layers", "soft", "sum")])
def test_seq_lengths_give_each_row_its_state_as_if_run_alone(schedule, boundary, layer_norm):
  """Issue 19: with padding the final state was the state after the padding (|Δc| 1.73)."""
  config, params, xs = _setup(boundary, layer_norm, sizes=(4, 5, 6), schedule=schedule)
  params, xs = _float64(params), _float64(xs)
  lengths = jnp.asarray(LENGTHS)
  final, out = H.unroll(params, H.initial_state(config, B, jnp.float64), xs, 1.5, config=config,
                        seq_lengths=lengths)
  for b, n in enumerate(LENGTHS):
    alone, out_b = H.unroll(params, H.initial_state(config, 1, jnp.float64), xs[:n, b:b + 1], 1.5,
                            config=config)
    for got, want in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(alone)):
      np.testing.assert_allclose(got[b], want[0], atol=1e-12)
    for l in range(3):
      np.testing.assert_allclose(out.h[l][:n, b], out_b.h[l][:, 0], atol=1e-12)
      np.testing.assert_allclose(out.z[l][:n, b], out_b.z[l][:, 0], atol=1e-12)
      assert not np.any(np.asarray(out.h[l][n:, b])) and not np.any(np.asarray(out.z[l][n:, b]))


@jax.enable_x64(True)
@pytest.mark.parametrize("schedule", ["layers", "two_phase"])
def test_reset_starts_a_row_afresh_and_leaves_the_others(schedule):
  config, params, xs = _setup("step", True, sizes=(4, 5, 6), schedule=schedule)
  params, xs = _float64(params), _float64(xs)
  state0 = jax.tree_util.tree_map(lambda x: x + 0.3, H.initial_state(config, B, jnp.float64))
  reset = np.zeros((T, B), bool)
  reset[4, 1] = True   # row 1: a new document at step 4
  final, out = H.unroll(params, state0, xs, 1.5, config=config, reset=jnp.asarray(reset))
  plain, plain_out = H.unroll(params, state0, xs, 1.5, config=config)
  fresh, fresh_out = H.unroll(params, H.initial_state(config, 1, jnp.float64), xs[4:, 1:2], 1.5,
                              config=config)
  for got, same, new in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(plain),
                            jax.tree_util.tree_leaves(fresh)):
    np.testing.assert_array_equal(got[0], same[0])
    np.testing.assert_array_equal(got[2], same[2])
    np.testing.assert_allclose(got[1], new[0], atol=1e-12)
  np.testing.assert_array_equal(out.h[2][:4, 1], plain_out.h[2][:4, 1])
  np.testing.assert_allclose(out.h[2][4:, 1], fresh_out.h[2][:, 0], atol=1e-12)


@jax.enable_x64(True)
@pytest.mark.parametrize("schedule,layer_norm,extra", [
    ("layers", False, {}), ("layers", True, {}), ("two_phase", True, {}),
    ("two_phase", "sum", {"st_local": True})])
def test_custom_backward_with_lengths_and_reset_equals_autodiff(schedule, layer_norm, extra):
  config, params, xs = _setup("step", layer_norm, sizes=(4, 5, 6), schedule=schedule, **extra)
  params, xs = _float64(params), _float64(xs)
  state0 = jax.tree_util.tree_map(lambda x: x + 0.2, H.initial_state(config, B, jnp.float64))
  reset = jnp.zeros((T, B), bool).at[3, 0].set(True).at[7, 2].set(True)
  weights = jax.random.normal(jax.random.key(9), (T, B, 6), jnp.float64)

  def loss(params, state0, xs, fast):
    final, out = H.unroll(params, state0, xs, 2.0, config=config, fast_backward=fast,
                          seq_lengths=jnp.asarray(LENGTHS), reset=reset)
    return (jnp.sum(out.h[2] * weights) + jnp.sum(out.h[0] ** 2) + jnp.sum(out.z[1])
            + sum(jnp.sum(s.c * s.h) for s in final))

  fast = jax.grad(loss, argnums=(0, 1, 2))(params, state0, xs, True)
  slow = jax.grad(loss, argnums=(0, 1, 2))(params, state0, xs, False)
  for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(slow)):
    np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-8)
  d_xs = np.asarray(fast[2])
  for b, n in enumerate(LENGTHS):
    assert not np.any(d_xs[n:, b])  # nothing flows into the padding
  assert np.any(d_xs[:3, 0]) and np.any(d_xs[3:, 0])


@jax.enable_x64(True)
def test_step_with_valid_and_reset_equals_unroll():
  config, params, xs = _setup("step", True, sizes=(4, 5, 6))
  params, xs = _float64(params), _float64(xs)
  lengths = jnp.asarray(LENGTHS)
  reset = jnp.zeros((T, B), bool).at[2, 1].set(True)
  state = H.initial_state(config, B, jnp.float64)
  final, out = H.unroll(params, state, xs, 1.0, config=config, seq_lengths=lengths, reset=reset)
  for t in range(T):
    state = H.step(params, state, xs[t], 1.0, config=config, valid=t < lengths, reset=reset[t])
    for l in range(3):
      np.testing.assert_allclose(state[l].h * (t < lengths)[:, None], out.h[l][t], atol=1e-12)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(final)):
    np.testing.assert_allclose(a, b, atol=1e-12)
  with pytest.raises(ValueError, match=r"seq_lengths must be \(3,\) integers"):
    H.unroll(params, state, xs, 1.0, config=config, seq_lengths=jnp.asarray([1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match=r"reset must have shape \(T, B\) = \(12, 3\)"):
    H.unroll(params, state, xs, 1.0, config=config, reset=reset.T)


@jax.enable_x64(True)
def test_init_params_dtype_and_a_bfloat16_model_stay_in_their_dtype():
  """Issue 19, item 5: init_params was float32 even with x64 on."""
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(4, 5), layer_norm=True)
  for dtype in (jnp.float64, jnp.bfloat16):
    params = H.init_params(jax.random.key(0), config, dtype)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(dtype)}
    xs = jnp.ones((4, 2, 3), dtype)
    final, out = H.unroll(params, H.initial_state(config, 2, dtype), xs, 1.0, config=config)
    assert {x.dtype for x in jax.tree_util.tree_leaves((final, out))} == {jnp.dtype(dtype)}
  np.testing.assert_array_equal(H.init_params(jax.random.key(0), config, jnp.float64)[0]["U"],
                                H.init_params(jax.random.key(0), config)[0]["U"])


@pytest.mark.parametrize("layer_norm", [False, "sum", "boundary"])
def test_internals_give_c_and_the_boundary_probability_of_every_step(layer_norm):
  """Issue 19, item 5: ž before the threshold and c per step, without rewriting the unroll."""
  config, params, xs = _setup("step", layer_norm, sizes=(4, 5, 6), boundary_bias=-0.3)
  state0 = H.initial_state(config, B)
  lengths = jnp.asarray(LENGTHS)
  final, out, inner = H.internals(params, state0, xs, 1.5, config=config, seq_lengths=lengths)
  final_u, out_u = H.unroll(params, state0, xs, 1.5, config=config, seq_lengths=lengths)
  for a, b in zip(jax.tree_util.tree_leaves((final, out)), jax.tree_util.tree_leaves((final_u, out_u))):
    np.testing.assert_array_equal(a, b)
  state = state0
  real = (jnp.arange(T)[:, None] < lengths[None, :])[..., None]
  for t in range(T):
    state = H.step(params, state, xs[t], 1.5, config=config, valid=t < lengths)
    for l in range(3):
      np.testing.assert_allclose(inner.c[l][t], state[l].c * real[t], atol=1e-5)
  ops = H.operations(state0, out)
  for l, z_tilde in enumerate(inner.z_tilde):  # z = 1[ž > 0.5] wherever the layer computed
    assert z_tilde.shape == (T, B, 1) and bool(jnp.all((z_tilde >= 0) & (z_tilde <= 1)))
    computed = np.asarray((ops[l] != H.COPY) & real[..., 0])
    np.testing.assert_array_equal(np.asarray(z_tilde[..., 0] > 0.5)[computed],
                                  np.asarray(out.z[l][..., 0] > 0.5)[computed])
    assert 0 < computed.sum() and not np.any(np.asarray(z_tilde)[~np.asarray(real)])
  grad = jax.grad(lambda p: sum(jnp.sum(z) for z in H.internals(
      p, state0, xs, 1.5, config=config)[2].z_tilde))(params)
  assert np.any(np.asarray(grad[1]["b"]))  # differentiable: a regulariser can use it
