"""The flax.linen wrapper (nn.py) gives the functional API's parameters and numbers."""
import jax
import jax.numpy as jnp
import numpy as np

import hmlstm_jax as H


def test_flax_module_equals_functional_api():
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4), boundary="sample", layer_norm=True)
  module = H.HMLSTM(config)
  carry = module.initialize_carry(2)
  xs = jax.random.normal(jax.random.key(0), (7, 2, 3))
  key = jax.random.key(1)
  variables = module.init(jax.random.key(2), carry, xs, 2.0, key)
  params = variables["params"]["hmlstm"]
  reference = H.init_params(jax.random.key(0), config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
  assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(params),
                                                 jax.tree_util.tree_leaves(reference)))
  final, out = module.apply(variables, carry, xs, 2.0, key)
  final_f, out_f = H.unroll(params, H.initial_state(config, 2), xs, 2.0, key, config=config)
  for a, b in zip(jax.tree_util.tree_leaves((final, out)), jax.tree_util.tree_leaves((final_f, out_f))):
    np.testing.assert_array_equal(a, b)
  _, det = module.apply(variables, carry, xs, 2.0, deterministic=True)
  assert set(np.unique(np.asarray(det.z[0]))) <= {0.0, 1.0}


def test_linen_module_takes_lengths_batch_major_input_and_one_step():
  config = H.HMLSTMConfig(input_size=3, layer_sizes=(5, 4), layer_norm=True)
  module = H.HMLSTM(config)
  xs = jax.random.normal(jax.random.key(0), (2, 7, 3))  # batch-major
  lengths = jnp.asarray([7, 4])
  carry = module.initialize_carry(2)
  variables = module.init(jax.random.key(2), carry, xs, 2.0, time_major=False)
  params = variables["params"]["hmlstm"]
  final, out = module.apply(variables, carry, xs, 2.0, seq_lengths=lengths, time_major=False)
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
  v16 = bf16.init(jax.random.key(2), carry16, xs.astype(jnp.bfloat16), 2.0, time_major=False)
  final16, out16 = bf16.apply(v16, carry16, xs.astype(jnp.bfloat16), 2.0, time_major=False)
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
  final, out = rnn(carry, xs, 1.5, seq_lengths=lengths, time_major=False)
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
    final, out = rnn(rnn.initialize_carry(3), xs, 1.5, seq_lengths=lengths, time_major=False)
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
  final16, out16 = bf16(bf16.initialize_carry(3), xs.astype(jnp.bfloat16), 1.5, time_major=False)
  assert {x.dtype for x in jax.tree_util.tree_leaves((final16, out16))} == {jnp.dtype(jnp.bfloat16)}


def test_reverse_within_lengths_leaves_the_padding_and_undoes_itself():
  xs = jnp.arange(2 * 5).reshape(2, 5, 1)
  r = H.nnx.reverse_within_lengths(xs, jnp.asarray([5, 3]))
  np.testing.assert_array_equal(r[..., 0], [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]])
  np.testing.assert_array_equal(H.nnx.reverse_within_lengths(r, jnp.asarray([5, 3])), xs)
