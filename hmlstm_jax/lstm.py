"""The (layer-normalised) LSTM stack: the baseline of the paper's Table 1 (LayerNorm LSTM).

Per layer, with x_t = h^(ℓ-1)_t:  s = LN(W x_t) + LN(U h_{t-1}) + b (Ba et al. 2016);
f, i, o = sigmoid, g = tanh; c_t = f⊙c_{t-1} + i⊙g; h_t = o⊙tanh(LN(c_t)). Without layer norm
the LNs are identities. The state has the HM-LSTM's shape ((h, c, z) per layer, z unused and
0), so the training loop carries either model the same way.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hmlstm_jax import cell
from hmlstm_jax import hmlstm


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  """Static description of the LSTM stack (hashable).

  Attributes:
    input_size: width of x_t.
    layer_sizes: d_1, ..., d_L.
    layer_norm: Ba et al.'s layer normalisation of W x, U h and c.
    ln_gain: the layer-norm gains at initialisation.
    matmul_dtype: ``None`` or ``'bfloat16'`` (operands; float32 accumulation).
  """
  input_size: int
  layer_sizes: tuple[int, ...]
  layer_norm: bool = False
  ln_gain: float = 1.0
  matmul_dtype: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "layer_sizes", tuple(self.layer_sizes))


def init_params(key: jax.Array, config: LSTMConfig) -> tuple[dict, ...]:
  """Per layer ``W`` (d_(ℓ-1), 4d), ``U`` (d, 4d), ``b`` (4d, forget bias 1), and with layer
  norm ``ln_W``, ``ln_U`` (4d) and ``ln_c`` (d) with gains ``config.ln_gain``. Rows ordered
  f, i, o, g."""
  params = []
  d_in = config.input_size
  for d in config.layer_sizes:
    key, k_w, k_u = jax.random.split(key, 3)
    p = {"W": jax.random.normal(k_w, (d_in, 4 * d)) / jnp.sqrt(d_in),
         "U": jax.random.normal(k_u, (d, 4 * d)) / jnp.sqrt(d),
         "b": jnp.zeros((4 * d,)).at[:d].set(1.0)}
    if config.layer_norm:
      ln = lambda n: cell.layer_norm_params(n, config.ln_gain)
      p.update(ln_W=ln(4 * d), ln_U=ln(4 * d), ln_c=ln(d))
    params.append(p)
    d_in = d
  return tuple(params)


def unroll(params, state: hmlstm.State, xs: jax.Array, *,
           config: LSTMConfig) -> tuple[hmlstm.State, tuple[jax.Array, ...]]:
  """Runs the stack over time-major ``xs`` (T, B, input_size); returns the final state and
  every layer's h (T, B, d). Each layer's input projection is one matmul over all T steps."""
  new_state, hs = [], []
  inputs = xs
  for p, s0 in zip(params, state):
    d = p["U"].shape[0]
    bottom_up = cell.normalized_term(cell.matmul(inputs, p["W"], config.matmul_dtype), p.get("ln_W"), d)
    kernel = p["U"].astype(config.matmul_dtype) if config.matmul_dtype else p["U"]

    def body(carry, bu, p=p, d=d, kernel=kernel):
      h, c = carry
      s = bu + cell.normalized_term(cell.matmul(h, kernel, config.matmul_dtype), p.get("ln_U"), d) + p["b"]
      f, i, o = (jax.nn.sigmoid(s[:, k * d:(k + 1) * d]) for k in range(3))
      c = f * c + i * jnp.tanh(s[:, 3 * d:])
      h = o * jnp.tanh(c if "ln_c" not in p else cell.layer_norm(c, p["ln_c"]))
      return (h, c), h

    (h, c), h_seq = jax.lax.scan(body, (s0.h, s0.c), bottom_up)
    new_state.append(hmlstm.LayerState(h=h, c=c, z=s0.z))
    hs.append(h_seq)
    inputs = h_seq
  return tuple(new_state), tuple(hs)
