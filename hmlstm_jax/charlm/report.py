"""What the character LM learned, shown: the Fig. 3-4 figure (a passage of text, one row of
cells per layer with a boundary detector beneath it, filled where z = 1, and the ℓ2-norm of
every layer's h) and sampled continuations."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hmlstm_jax import analysis
from hmlstm_jax import hmlstm
from hmlstm_jax.charlm import model as charlm_model


def passage(params, config: charlm_model.CharLMConfig, tokens: np.ndarray, slope: float):
  """Runs one stream from the zero state; returns z (L, N) and ‖h^ℓ_t‖ (L, N)."""
  tokens = jnp.asarray(tokens, jnp.int32)[None]
  _, outs = jax.jit(charlm_model.charlm_apply, static_argnames=("config", "deterministic"))(
      params, hmlstm.initial_state(config.rnn, 1), tokens, slope, config=config,
      deterministic=True)
  h_norm = np.stack([np.linalg.norm(np.asarray(h)[:, 0], axis=-1) for h in outs.rnn.h])
  z = np.stack([np.asarray(z)[:, 0, 0] for z in outs.rnn.z]) if outs.rnn.z else np.zeros((0, tokens.shape[1]))
  return z, h_norm


def boundary_figure(path: str, text: str, z: np.ndarray, h_norm: np.ndarray, title: str = "",
                    chars_per_row: int = 60) -> None:
  """Writes the Fig. 3-4 style PNG to ``path`` atomically (temporary file, then rename).

  Args:
    text: the passage, one character per step (newlines shown as '⏎', spaces as '␣').
    z: (L, N) boundaries; rows of layers without a detector (the last) are skipped.
    h_norm: (L, N) norms of h^ℓ_t.
  """
  plt = analysis.pyplot()
  n = len(text)
  detectors = z[:-1] if len(z) else z
  chunks = [(s, min(s + chars_per_row, n)) for s in range(0, n, chars_per_row)]
  fig, axes = plt.subplots(len(chunks) + 1, 1, figsize=(chars_per_row * 0.22, 1.2 * len(chunks) + 2.5),
                           gridspec_kw={"height_ratios": [1] * len(chunks) + [2]})
  for ax, (s, e) in zip(axes, chunks):
    rows = max(len(detectors), 1)
    ax.imshow(detectors[:, s:e] if len(detectors) else np.zeros((1, e - s)), cmap="Greys",
              vmin=0, vmax=1, aspect="auto", extent=(-0.5, e - s - 0.5, rows - 0.5, -0.5))
    ax.set_yticks(range(rows), [f"z{l + 1}" for l in range(rows)], fontsize=7)
    ax.set_xticks(range(e - s), [{"\n": "⏎", " ": "␣"}.get(c, c) for c in text[s:e]], fontsize=7,
                  family="monospace")
    ax.tick_params(axis="x", length=0, labeltop=True, labelbottom=False)
    ax.set_xlim(-0.5, chars_per_row - 0.5)
  for l, norms in enumerate(h_norm):
    axes[-1].plot(norms, label=f"‖h{l + 1}‖", linewidth=1)
  axes[-1].set_xlim(0, max(n - 1, 1))
  axes[-1].set_xlabel("step")
  axes[-1].legend(fontsize=7, loc="upper right")
  if title:
    axes[0].set_title(title, fontsize=9)
  analysis.save_png(fig, path)


def sample(params, config: charlm_model.CharLMConfig, prompt: np.ndarray, num_chars: int,
           key: jax.Array, num_samples: int, slope: float) -> np.ndarray:
  """Sampled continuations: reads ``prompt`` (ids), then draws ``num_chars`` symbols from the
  model's softmax, feeding each back one step at a time (:func:`charlm_model.charlm_step`, the
  HM-LSTM's all-COPY layers skipped); returns (num_samples, num_chars) ids."""
  prompt = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (num_samples, len(prompt)))

  @jax.jit
  def run(key):
    logits, outs = charlm_model.charlm_apply(
        params, hmlstm.initial_state(config.rnn, num_samples), prompt, slope, config=config,
        deterministic=True)

    def body(carry, k):
      state, last_logits = carry
      token = jax.random.categorical(k, last_logits)
      logits, state = charlm_model.charlm_step(params, state, token, slope, config=config,
                                               skip_copy=True)
      return (state, logits), token

    _, tokens = jax.lax.scan(body, (outs.final_state, logits[:, -1]), jax.random.split(key, num_chars))
    return tokens.T

  return np.asarray(run(key))
