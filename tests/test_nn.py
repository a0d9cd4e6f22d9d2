"""The flax.linen wrapper (nn.py) gives the functional API's parameters and numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hmlstm_jax as H


def test_flax_module_equals_functional_api():
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4), boundary="sample", layer_norm=True)
  module = H.HMLSTM(config, time_major=True, return_carry=True)
  xs = jax.random.normal(jax.random.key(0), (7, 2, 3))
  key = jax.random.key(1)
  variables = module.init({"params": jax.random.key(2), "boundary": key}, xs, 2.0)
  params = variables["params"]["hmlstm"]
  reference = H.init_params(jax.random.key(0), config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
  assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(params),
                                                 jax.tree_util.tree_leaves(reference)))
  final, out = module.apply(variables, xs, 2.0, key=key)
  final_f, out_f = H.unroll(params, H.initial_state(config, 2), xs, 2.0, key, config=config)
  for a, b in zip(jax.tree_util.tree_leaves((final, out)), jax.tree_util.tree_leaves((final_f, out_f))):
    np.testing.assert_array_equal(a, b)
  _, drawn = module.apply(variables, xs, 2.0, rngs={"boundary": key})  # from the RNG stream
  _, again = module.apply(variables, xs, 2.0, rngs={"boundary": key})
  _, other = module.apply(variables, xs, 2.0, rngs={"boundary": jax.random.key(5)})
  np.testing.assert_array_equal(drawn.z[0], again.z[0])
  assert not np.array_equal(drawn.z[0], other.z[0])
  _, det = module.apply(variables, xs, 2.0, deterministic=True)
  assert set(np.unique(np.asarray(det.z[0]))) <= {0.0, 1.0}


def test_linen_module_takes_lengths_batch_major_input_and_one_step():
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4), layer_norm=True)
  module = H.HMLSTM(config)
  xs = jax.random.normal(jax.random.key(0), (2, 7, 3))  # batch-major
  lengths = jnp.asarray([7, 4])
  carry = module.initialize_carry(2)
  variables = module.init(jax.random.key(2), xs, 2.0)
  params = variables["params"]["hmlstm"]
  final, out = module.apply(variables, xs, 2.0, initial_carry=carry, seq_lengths=lengths,
                            return_carry=True)
  final_f, out_f = H.unroll(params, carry, jnp.swapaxes(xs, 0, 1), 2.0, config=config,
                            seq_lengths=lengths)
  for a, b in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(final_f)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(out.h[1], jnp.swapaxes(out_f.h[1], 0, 1))
  stepped = module.apply(variables, carry, xs[:, 0], 2.0, method="step")
  np.testing.assert_array_equal(stepped[1].h, H.step(params, carry, xs[:, 0], 2.0,
                                                     config=config)[1].h)
  head = H.OutputModule((5, 4), 6)
  head_vars = head.init(jax.random.key(3), out.h)
  np.testing.assert_array_equal(head.apply(head_vars, out.h),
                                H.output_module(head_vars["params"]["output"], out.h))
  bf16 = H.HMLSTM(config, param_dtype=jnp.bfloat16)
  carry16 = bf16.initialize_carry(2)
  v16 = bf16.init(jax.random.key(2), xs.astype(jnp.bfloat16), 2.0)
  final16, out16 = bf16.apply(v16, xs.astype(jnp.bfloat16), 2.0, initial_carry=carry16,
                              return_carry=True)
  assert {x.dtype for x in jax.tree_util.tree_leaves((v16, final16, out16))} == {jnp.dtype(jnp.bfloat16)}


def test_nnx_module_equals_the_functional_api_with_lengths_steps_and_gradients():
  """Issue 19: an NNX module (Flax's recommended API), the same numbers as the functions."""
  from flax import nnx
  import optax
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4, 6), layer_norm=True)
  rnn = H.nnx.HMLSTM(config, rngs=nnx.Rngs(0))
  params = rnn.weights
  reference = H.init_params(jax.random.key(0), config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
  xs = jax.random.normal(jax.random.key(1), (3, 8, 3))
  lengths = jnp.asarray([8, 2, 5])
  carry = rnn.initialize_carry(3)
  final, out = rnn(xs, 1.5, initial_carry=carry, seq_lengths=lengths, return_carry=True)
  final_f, out_f = H.unroll(params, carry, jnp.swapaxes(xs, 0, 1), 1.5, config=config,
                            seq_lengths=lengths)
  for a, b in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(final_f)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(out.z[0], jnp.swapaxes(out_f.z[0], 0, 1))
  state = rnn.step(carry, xs[:, 0], 1.5, skip_copy=True)
  np.testing.assert_array_equal(state[2].h, H.step(params, carry, xs[:, 0], 1.5,
                                                   config=config)[2].h)

  head = H.nnx.OutputModule((5, 4, 6), 7, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(head(out.h), H.output_module(head.weights, out.h))

  def loss(rnn, head):
    final, out = rnn(xs, 1.5, seq_lengths=lengths, return_carry=True)
    return jnp.sum(head(out.h) ** 2) + jnp.sum(final[1].c)

  grads = nnx.grad(loss, argnums=(0, 1))(rnn, head)

  def functional(p, q):  # the same loss through the functions
    final, out = H.unroll(p, carry, jnp.swapaxes(xs, 0, 1), 1.5, config=config,
                          seq_lengths=lengths)
    return jnp.sum(H.output_module(q, out.h) ** 2) + jnp.sum(final[1].c)
  g_p, g_q = jax.grad(functional, argnums=(0, 1))(params, head.weights)
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(grads[0])), jax.tree_util.tree_leaves(g_p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(grads[1])), jax.tree_util.tree_leaves(g_q)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  optimizer = nnx.Optimizer(rnn, optax.adam(1e-2), wrt=nnx.Param)
  optimizer.update(rnn, grads[0])
  assert not np.array_equal(rnn.weights[0]["U"], params[0]["U"])

  bf16 = H.nnx.HMLSTM(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  final16, out16 = bf16(xs.astype(jnp.bfloat16), 1.5, return_carry=True)
  assert {x.dtype for x in jax.tree_util.tree_leaves((final16, out16))} == {jnp.dtype(jnp.bfloat16)}


def test_reverse_within_lengths_leaves_the_padding_and_undoes_itself():
  xs = jnp.arange(2 * 5).reshape(2, 5, 1)
  r = H.nnx.reverse_within_lengths(xs, jnp.asarray([5, 3]))
  np.testing.assert_array_equal(r[..., 0], [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]])
  np.testing.assert_array_equal(H.nnx.reverse_within_lengths(r, jnp.asarray([5, 3])), xs)


# Issue 31: a Flax user's habits. Each test below failed on the modules before it (time-major
# by default, the carry first and required, Flax's names refused, shapes quoted transposed).

def _nnx(config, **settings):
  from flax import nnx
  return H.nnx.HMLSTM(config, rngs=nnx.Rngs(0), **settings)


def test_the_modules_are_batch_major_by_default_also_when_the_batch_equals_the_length():
  """B == T: nothing in the shapes tells the layouts apart; as nnx.RNN, row b is xs[b]."""
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4))
  xs = jax.random.normal(jax.random.key(1), (6, 6, 3))
  rnn = _nnx(config)
  _, reference = H.unroll(rnn.weights, H.initial_state(config, 6), jnp.swapaxes(xs, 0, 1), 1.5,
                          config=config)
  out = rnn(xs, 1.5)
  np.testing.assert_array_equal(out.h[1], jnp.swapaxes(reference.h[1], 0, 1))
  np.testing.assert_array_equal(rnn(xs, 1.5, time_major=True).h[1], H.unroll(
      rnn.weights, H.initial_state(config, 6), xs, 1.5, config=config)[1].h[1])
  alone = rnn(xs[2:3], 1.5)  # a row run alone is that row of the batch
  np.testing.assert_allclose(alone.h[1][0], out.h[1][2], rtol=1e-6, atol=1e-7)
  linen = H.HMLSTM(config)
  variables = {"params": {"hmlstm": rnn.weights}}
  np.testing.assert_array_equal(linen.apply(variables, xs, 1.5).h[1], out.h[1])
  _, functional = H.unroll(rnn.weights, H.initial_state(config, 6), xs, 1.5, config=config,
                           time_major=False)
  np.testing.assert_array_equal(functional.h[1], out.h[1])


def test_errors_quote_the_shapes_as_the_user_passed_them():
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4))
  rnn = _nnx(config)
  xs = jnp.zeros((4, 10, 3))  # (B, T, input)
  with pytest.raises(ValueError, match=r"reset must have shape \(B, T\) = \(4, 10\) .*got "
                                       r"\(10, 4\)"):
    rnn(xs, reset=jnp.zeros((10, 4), bool))
  with pytest.raises(ValueError, match=r"inputs must be \(B, T, 3\), got shape \(4, 10, 5\)"):
    rnn(jnp.zeros((4, 10, 5)))
  with pytest.raises(ValueError, match=r"inputs \(4, 10, 3\) \(B, T, 3\) give batch 4.*the "
                                       r"inputs look time-major \(T, B, input\): pass "
                                       r"time_major=True"):
    rnn(xs, initial_carry=rnn.initialize_carry(10))
  with pytest.raises(ValueError, match=r"inputs must be \(T, B, 3\), got shape \(4, 10\)"):
    rnn(xs[..., 0], time_major=True)
  with pytest.raises(ValueError, match=r"output must be one of \('layers', 'top', 'all'\)"):
    rnn(xs, output="last")


def test_flax_names_initial_carry_return_carry_and_output():
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4, 6), layer_norm=True)
  rnn = _nnx(config)
  xs = jax.random.normal(jax.random.key(1), (3, 8, 3))
  lengths = jnp.asarray([8, 2, 5])
  whole, out = rnn(xs, 1.5, return_carry=True)
  carry, first = rnn(xs[:, :5], 1.5, return_carry=True)
  final, second = rnn(xs[:, 5:], 1.5, initial_carry=carry, return_carry=True)
  for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(final)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jnp.concatenate([first.h[2], second.h[2]], 1), out.h[2],
                             rtol=1e-6, atol=1e-6)
  assert isinstance(rnn(xs, 1.5), H.UnrollOutputs)  # return_carry=False: outputs only
  np.testing.assert_array_equal(rnn(xs, 1.5, output="top"), out.h[2])  # (B, T, d_L)
  np.testing.assert_array_equal(rnn(xs, 1.5, output="all"), jnp.concatenate(out.h, -1))
  top = _nnx(config, output="top", return_carry=True)
  carry, h = top(xs, 1.5, seq_lengths=lengths)
  assert h.shape == (3, 8, 6) and float(jnp.abs(h[1, 2:]).max()) == 0.0  # past row 1's end
  np.testing.assert_array_equal(carry[2].h, H.unroll(
      rnn.weights, H.initial_state(config, 3), xs, 1.5, config=config, seq_lengths=lengths,
      time_major=False)[0][2].h)


def test_flax_names_reverse_and_keep_order_as_flip_sequences():
  from flax.nnx.nn.recurrent import flip_sequences
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4))
  xs = jax.random.normal(jax.random.key(1), (3, 8, 3))
  lengths = jnp.asarray([8, 2, 5])
  real = (jnp.arange(8)[None, :] < lengths[:, None])[..., None]  # Flax also reverses padding
  np.testing.assert_array_equal(H.reverse_within_lengths(xs, lengths) * real,
                                flip_sequences(xs, lengths, 1, False) * real)
  np.testing.assert_array_equal(
      H.reverse_within_lengths(jnp.swapaxes(xs, 0, 1), lengths, time_major=True),
      jnp.swapaxes(H.reverse_within_lengths(xs, lengths), 0, 1))
  np.testing.assert_array_equal(H.reverse_within_lengths(xs), xs[:, ::-1])
  rnn = _nnx(config)
  flipped = flip_sequences(xs, lengths, 1, False)
  backwards = rnn(xs, 1.5, seq_lengths=lengths, reverse=True, output="top")
  np.testing.assert_array_equal(backwards, rnn(flipped, 1.5, seq_lengths=lengths, output="top"))
  kept = rnn(xs, 1.5, seq_lengths=lengths, reverse=True, keep_order=True, output="top")
  np.testing.assert_array_equal(kept, flip_sequences(backwards, lengths, 1, False) * real)
  assert not np.allclose(kept, backwards)
  with pytest.raises(ValueError, match="reset with reverse=True is ambiguous"):
    rnn(xs, reverse=True, reset=jnp.zeros((3, 8), bool))


def test_flax_names_rngs_and_eval_train_for_the_sampled_boundary():
  from flax import nnx
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4), boundary="sample")
  rnn = _nnx(config)
  xs = jax.random.normal(jax.random.key(1), (3, 8, 3))
  state = H.initial_state(config, 3)
  sampled = lambda key, **kw: H.unroll(rnn.weights, state, xs, 1.5, key, config=config,
                                       time_major=False, **kw)[1].z[0]
  key = nnx.Rngs(boundary=7).boundary()  # the key the module draws from the same Rngs
  np.testing.assert_array_equal(rnn(xs, 1.5, rngs=nnx.Rngs(boundary=7)).z[0], sampled(key))
  np.testing.assert_array_equal(rnn(xs, 1.5, rngs=nnx.Rngs(boundary=7).boundary).z[0],
                                sampled(key))
  np.testing.assert_array_equal(rnn(xs, 1.5, key=jax.random.key(3)).z[0],
                                sampled(jax.random.key(3)))
  with pytest.raises(ValueError, match=r"needs a PRNG key.*rngs=.*eval\(\)"):
    rnn(xs, 1.5)
  rnn.eval()  # deterministic: the step function, no key needed
  np.testing.assert_array_equal(rnn(xs, 1.5).z[0], sampled(None, deterministic=True))
  np.testing.assert_array_equal(rnn.step(state, xs[:, 0], 1.5)[0].z, H.step(
      rnn.weights, state, xs[:, 0], 1.5, config=config, deterministic=True)[0].z)
  rnn.train()
  with pytest.raises(ValueError, match="needs a PRNG key"):
    rnn.step(state, xs[:, 0], 1.5)
  with pytest.raises(ValueError, match="pass rngs or key, not both"):
    rnn(xs, 1.5, rngs=nnx.Rngs(0), key=key)


@jax.enable_x64(True)
@pytest.mark.parametrize("schedule", ["layers", "two_phase"])
def test_shard_map_with_its_default_check_vma_gives_one_devices_gradients(schedule):
  """Issue 31 item 5: inside shard_map (check_vma=True, its default) the zero state made in
  the body and the replicated params enter the scan and the custom backward as varying over
  the data axis; the gradient of the replicated params is summed over the 4 devices. float64:
  equal to one device's to 1e-12 (the order of the sum is the only difference)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4, 3), layer_norm=True,
                          schedule=schedule)
  params = H.init_params(jax.random.key(0), config, jnp.float64)
  xs = jax.random.normal(jax.random.key(1), (6, 8, 3), jnp.float64)  # (T, B, input)
  lengths = jnp.asarray([6, 2, 5, 1, 6, 3, 4, 6])
  reset = jnp.zeros((6, 8), bool).at[3, ::3].set(True)

  def loss(params, xs, lengths, reset):
    state = H.initial_state(config, xs.shape[1], jnp.float64)
    final, out = H.unroll(params, state, xs, 1.5, config=config, seq_lengths=lengths,
                          reset=reset)
    return jnp.sum(out.h[2] ** 2) + jnp.sum(final[0].c) + jnp.sum(out.z[1])

  mesh = jax.make_mesh((4,), ("data",))
  specs = (P(), P(None, "data"), P("data"), P(None, "data"))
  sharded = jax.shard_map(lambda *a: jax.lax.psum(loss(*a), "data"), mesh=mesh,
                          in_specs=specs, out_specs=P())
  args = (params, xs, lengths, reset)
  placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
  np.testing.assert_allclose(jax.jit(sharded)(*placed), loss(*args), rtol=1e-12)
  one = jax.grad(loss)(*args)
  four = jax.jit(jax.grad(sharded))(*placed)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(four)):
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
