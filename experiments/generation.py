"""Sampling speed: characters per second when a character LM generates one symbol at a time.

    python -m experiments.benchmark --mode=generate --shapes=ptb

Where one step runs at a time (sampling, streaming inference at batch 1 or a few rows), a
layer whose rows all COPY can be skipped outright (:func:`hmlstm_jax.hmlstm.step` with
``skip_copy``): the paper's saving of COPY (Fig. 4) made real. Timed in one process, in
alternation, with the same embedding, output module and softmax:

- ``hm-skip``: the HM-LSTM, one-step path skipping all-COPY layers;
- ``hm-dense``: the same model and weights computing every layer at every step;
- ``lstm``: an LSTM stack of the HM-LSTM's widths;
- ``lstm-eqp``: an LSTM stack as wide as makes its parameters closest to the HM-LSTM's.

An untrained model's boundaries fire at no useful rate, so the detector biases (the ž row's
b) are set by bisection until each layer computes on about the share of (row, step) pairs
asked for (``--compute``, default 100% / 50% / 10%, layer 1 always 100%); the table prints
the shares measured while timing, per row and per step (a layer runs on a step when any row
needs it, so at batch 8 the step share is higher than the row share).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp

import hmlstm_jax as hm
from hmlstm_jax import charlm

#: Models timed, in this order: (name, model, skip_copy).
MODELS = (("hm-skip", "hmlstm", True), ("hm-dense", "hmlstm", False),
          ("lstm", "lstm", False), ("lstm-eqp", "lstm", False))
DEFAULT_COMPUTE = (1.0, 0.5, 0.1)


def lm_config(shape, model: str = "hmlstm", width: int | None = None, layer_norm: bool = False,
              dtype: str | None = None, schedule: str = "layers",
              scan_unroll: int = 1) -> hm.CharLMConfig:
  """The character LM at a benchmark shape (``width``: every layer that wide instead); the
  training benchmark's too."""
  sizes = shape.layer_sizes if width is None else (width,) * len(shape.layer_sizes)
  return hm.CharLMConfig(vocab_size=shape.vocab, layer_sizes=sizes, output_size=shape.output_size,
                         embed_size=shape.embed, layer_norm=layer_norm, matmul_dtype=dtype,
                         model=model, schedule=schedule, scan_unroll=scan_unroll)


def parameter_count(config: hm.CharLMConfig) -> int:
  """Number of parameters of :func:`hm.init_charlm` (shapes only: nothing is initialised)."""
  shapes = jax.eval_shape(lambda: hm.init_charlm(jax.random.key(0), config))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def equal_parameter_width(shape, layer_norm: bool = False) -> int:
  """The LSTM width (all layers equal) whose character LM's parameter count is closest to
  the HM-LSTM's at ``shape``."""
  target = parameter_count(lm_config(shape, layer_norm=layer_norm))
  count = lambda w: parameter_count(lm_config(shape, "lstm", w, layer_norm))
  lo, hi = 1, 4 * max(shape.layer_sizes)
  while hi - lo > 1:  # the count grows with the width
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if count(mid) <= target else (lo, mid)
  return min((lo, hi), key=lambda w: abs(count(w) - target))


def with_detector_biases(params: dict, biases: Sequence[float]) -> dict:
  """The HM-LSTM's parameters with the ž row's bias of layer ℓ set to ``biases[ℓ-1]``."""
  layers = list(params["hmlstm"])
  for layer, bias in enumerate(biases):
    d = layers[layer]["U"].shape[0]
    layers[layer] = {**layers[layer], "b": layers[layer]["b"].at[4 * d].set(bias)}
  return {**params, "hmlstm": tuple(layers)}


def make_sampler(config: hm.CharLMConfig, batch: int, num_chars: int, skip_copy: bool):
  """A jitted ``run(params, key) -> (tokens (B, N), row_share (L,), step_share (L,))``:
  ``num_chars`` symbols drawn from the softmax and fed back one step at a time
  (:func:`charlm.charlm_step`), from the initial state. ``row_share``: per layer the share
  of (row, step) pairs that leave COPY; ``step_share``: of steps on which any row does."""
  L = len(config.layer_sizes)

  @jax.jit
  def run(params, key):
    def body(carry, k):
      state, token = carry
      logits, new = charlm.charlm_step(params, state, token, 1.0, config=config,
                                       skip_copy=skip_copy)
      if config.model == "lstm":
        needed = jnp.ones((L, batch), bool)
      else:
        z_below = [jnp.ones_like(new[0].z)] + [layer.z for layer in new[:-1]]
        needed = jnp.stack([(old.z[:, 0] != 0) | (zb[:, 0] != 0)
                            for old, zb in zip(state, z_below)])
      token = jax.random.categorical(k, logits).astype(jnp.int32)
      return (new, token), (token, needed)

    init = (hm.initial_state(config.rnn, batch), jnp.zeros((batch,), jnp.int32))
    _, (tokens, needed) = jax.lax.scan(body, init, jax.random.split(key, num_chars))
    return tokens.T, jnp.mean(needed, axis=(0, 2)), jnp.mean(jnp.any(needed, axis=2), axis=0)

  return run


def calibrate(params: dict, config: hm.CharLMConfig, compute: Sequence[float], batch: int = 8,
              num_chars: int = 200, iterations: int = 16, passes: int = 2
              ) -> tuple[dict, list[float]]:
  """Detector biases such that layer ℓ+1 computes on about ``compute[ℓ]`` of (row, step)
  pairs, found by bisection one layer after another (a higher bias of layer ℓ's detector fires
  z^ℓ more often, and z^ℓ is what wakes layer ℓ+1), in ``passes`` sweeps (layer ℓ+1's own
  boundaries also make it compute, by FLUSH). Returns the parameters and the biases."""
  sampler = make_sampler(config, batch, num_chars, skip_copy=False)
  biases = [0.0] * (len(config.layer_sizes) - 1)
  for layer in list(range(len(biases))) * passes:
    lo, hi = -20.0, 20.0
    for _ in range(iterations):
      biases[layer] = (lo + hi) / 2
      _, share, _ = sampler(with_detector_biases(params, biases), jax.random.key(7))
      lo, hi = (biases[layer], hi) if float(share[layer + 1]) < compute[layer + 1] else (lo, biases[layer])
  return with_detector_biases(params, biases), biases


def time_generation(shape, batches: Sequence[int] = (1, 8), num_chars: int = 500,
                    rounds: int = 3, compute: Sequence[float] = DEFAULT_COMPUTE,
                    layer_norm: bool = False, dtype: str | None = None) -> dict:
  """Characters per second of every model of :data:`MODELS` at each batch size, timed in
  alternating rounds in this process (median of ``rounds``); one JSON-able record."""
  if len(compute) != len(shape.layer_sizes) or compute[0] != 1.0:
    raise ValueError(f"compute needs one share per layer ({len(shape.layer_sizes)}), the first "
                     f"1.0 (layer 1 computes at every step), got {tuple(compute)}")
  width = equal_parameter_width(shape, layer_norm)
  configs = {"hmlstm": lm_config(shape, layer_norm=layer_norm, dtype=dtype),
             "lstm": lm_config(shape, "lstm", layer_norm=layer_norm, dtype=dtype),
             "lstm-eqp": lm_config(shape, "lstm", width, layer_norm, dtype)}
  params = {name: hm.init_charlm(jax.random.key(0), c) for name, c in configs.items()}
  params["hmlstm"], biases = calibrate(params["hmlstm"], configs["hmlstm"], compute)
  record = {"shape": dataclasses.asdict(shape), "layer_norm": layer_norm,
            "dtype": dtype or "float32", "num_chars": num_chars, "rounds": rounds,
            "compute_target": list(compute), "detector_biases": biases,
            "lstm_eqp_width": width,
            "parameters": {n: parameter_count(c) for n, c in configs.items()},
            "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
            "batches": {}}
  for batch in batches:
    runs = {}
    for name, model, skip in MODELS:
      key = "lstm-eqp" if name == "lstm-eqp" else model
      sampler = make_sampler(configs[key], batch, num_chars, skip)
      t0 = time.perf_counter()
      out = jax.block_until_ready(sampler(params[key], jax.random.key(1)))
      runs[name] = {"sampler": sampler, "params": params[key], "compile_s": time.perf_counter() - t0,
                    "times": [], "out": out}
    for _ in range(rounds):
      for run in runs.values():
        t0 = time.perf_counter()
        jax.block_until_ready(run["sampler"](run["params"], jax.random.key(1)))
        run["times"].append(time.perf_counter() - t0)
    same = bool(jnp.array_equal(runs["hm-skip"]["out"][0], runs["hm-dense"]["out"][0]))
    results = {}
    for name, run in runs.items():
      median = statistics.median(run["times"])
      results[name] = {"chars_per_s": batch * num_chars / median, "median_s": median,
                       "compile_s": run["compile_s"],
                       "row_share": [float(x) for x in run["out"][1]],
                       "step_share": [float(x) for x in run["out"][2]]}
    dense = results["hm-dense"]["median_s"]
    record["batches"][str(batch)] = {
        "models": results, "same_samples": same,
        "skip_speedup": dense / results["hm-skip"]["median_s"],
        "skip_over_lstm": results["lstm"]["median_s"] / results["hm-skip"]["median_s"]}
  return record


def format_generation(record: dict) -> str:
  """A plain-text table of a :func:`time_generation` record."""
  head = (f"{'batch':<7}{'model':<10}{'chars/s':>10}{'median s':>10}{'compile s':>11}"
          f"  compute per layer: rows (steps)")
  lines = [head, "-" * len(head)]
  for batch, b in record["batches"].items():
    for name, m in b["models"].items():
      shares = " / ".join(f"{r:.0%} ({s:.0%})" for r, s in zip(m["row_share"], m["step_share"]))
      lines.append(f"{batch:<7}{name:<10}{m['chars_per_s']:>10.0f}{m['median_s']:>10.4f}"
                   f"{m['compile_s']:>11.1f}  {shares}")
    lines.append(f"{'':<7}skip_speedup {b['skip_speedup']:.2f}x (hm-dense / hm-skip), hm-skip "
                 f"vs lstm {b['skip_over_lstm']:.2f}x, same samples: {b['same_samples']}")
  p = record["parameters"]
  lines.append(f"{record['shape']['name']}: {record['num_chars']} characters per run, median of "
               f"{record['rounds']} alternating rounds; {record['dtype']}, layer norm "
               f"{record['layer_norm']}; parameters hmlstm {p['hmlstm']:,}, lstm {p['lstm']:,}, "
               f"lstm-eqp {p['lstm-eqp']:,} (width {record['lstm_eqp_width']}); detector biases "
               f"{', '.join(f'{b:.2f}' for b in record['detector_biases'])} for compute "
               f"{' / '.join(f'{c:.0%}' for c in record['compute_target'])}; {record['device']}")
  return "\n".join(lines)
