"""The flax.linen wrapper (nn.py) gives the functional API's parameters and numbers."""
import jax
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
