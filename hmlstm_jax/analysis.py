"""What the boundaries learned, for either task: update counts, boundary rates, precision,
recall and F1 against labels, their report lines, and the PNG helpers of the figures.

Boundary scoring: layer ℓ's z^ℓ_t against a per-position label (a word separator, a phrase
end, a pen-up); precision = P(label | z = 1), recall = P(z = 1 | label), F1 their harmonic
mean. z^ℓ_t is produced after reading x_t, so it is compared with the label of x_t itself
(and, with :func:`with_next_step`, with the label one step later).
"""
from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np

from hmlstm_jax import files
from hmlstm_jax import hmlstm


def boundary_counts(z: jax.Array, labels: dict[str, jax.Array],
                    mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per label, (L, 3) int32 counts of (true positives, false positives, false negatives).

  Runs inside the evaluation step (on the device), so that only the counts are summed and
  read back.

  Args:
    z: (L, rows, T) boundaries (> 0.5 counts as a boundary).
    labels: name → (rows, T) bool.
    mask: (rows, T); only positions where it is nonzero count (padding left out).
  """
  real = jnp.ones(jnp.shape(z)[1:], bool) if mask is None else jnp.asarray(mask) > 0
  fired = (jnp.asarray(z) > 0.5) & real[None]
  out = {}
  for name, lab in labels.items():
    lab = (jnp.asarray(lab, bool) & real)[None]
    count = lambda x: jnp.sum(x, axis=(1, 2), dtype=jnp.int32)
    out[name] = jnp.stack([count(fired & lab), count(fired & ~lab), count(~fired & lab)], axis=1)
  return out


def boundary_sums(initial: hmlstm.State, rnn: hmlstm.UnrollOutputs, labels: dict,
                  mask: jax.Array | None = None) -> dict:
  """An evaluation batch's boundary bookkeeping, on the device: ``op_counts`` (L, 3) COPY /
  UPDATE / FLUSH per layer (decisions.md §3), ``fires`` (L,) the steps on which each layer's
  z = 1, and ``boundaries`` (per label, :func:`boundary_counts`).

  Args:
    initial: the state before the batch (the operation at step 0 depends on its z).
    rnn: the unroll's outputs, time-major (z (T, rows, 1) per layer; empty for the LSTM).
    labels: name → (rows, T) bool.
    mask: (rows, T); only positions where it is nonzero count (padding left out).
  """
  ops = hmlstm.operations(initial, rnn)
  z = jnp.stack([jnp.swapaxes(z[..., 0], 0, 1) for z in rnn.z])  # (L, rows, T)
  fired = z > 0.5 if mask is None else (z > 0.5) & (jnp.asarray(mask)[None] > 0)
  return {"op_counts": hmlstm.operation_counts(ops, None if mask is None else jnp.asarray(mask).T),
          "fires": jnp.sum(fired, axis=(1, 2), dtype=jnp.int32),
          "boundaries": boundary_counts(z, labels, mask)}


def boundary_results(sums: dict, label_names) -> dict:
  """The summed :func:`boundary_sums` as JSON-able results: ``op_counts`` per layer,
  ``dead_layers`` (the layers 1..L-1 whose boundary detector's z never fired over the
  split) and, per label, each layer's (precision, recall, F1)."""
  fires = np.asarray(sums["fires"])[:-1]  # the last layer has no detector
  return {"op_counts": np.asarray(sums["op_counts"]).tolist(),
          "dead_layers": [l + 1 for l in range(len(fires)) if fires[l] == 0],
          "boundaries": {name: precision_recall_f1(sums["boundaries"][name]).tolist()
                         for name in label_names}}


def boundary_rate_scalars(rnn: hmlstm.UnrollOutputs, mask: jax.Array | None = None) -> dict:
  """``{'z<ℓ>_rate': the share of (masked) steps on which z^ℓ = 1}`` for each layer with a
  boundary detector (every layer but the last); empty for the LSTM. ``mask``: (rows, T).
  Logged during training, so that the curves show when boundaries form or die."""
  if not rnn.z:
    return {}
  rates = hmlstm.boundary_rates(rnn.z, None if mask is None else jnp.asarray(mask).T)
  return {f"z{layer + 1}_rate": rates[layer] for layer in range(len(rnn.z) - 1)}


def boundary_scalars(result: dict) -> dict:
  """Flat scalars of :func:`boundary_results` for curves: ``compute<ℓ>`` (the share of steps
  on which layer ℓ UPDATEs or FLUSHes) per layer, ``dead_detectors`` (how many detectors never
  fired: in every validation of the history, so that one sees when a detector dies),
  ``f1_z<ℓ>_<label>`` per detector and label."""
  counts = np.asarray(result["op_counts"], np.float64)  # (L, 3) COPY, UPDATE, FLUSH
  out = {f"compute{l + 1}": float(counts[l, 1:].sum() / max(counts[l].sum(), 1.0))
         for l in range(len(counts))}
  out["dead_detectors"] = float(len(result["dead_layers"]))
  for name, prf in result["boundaries"].items():
    out.update({f"f1_z{l + 1}_{name}": float(prf[l][2]) for l in range(len(prf) - 1)})
  return out


def with_next_step(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds ``'<name>+1'``: each label moved one step later (the step just after a word end).

  The paper sees z^1 fire "at or just after" spaces; scoring against both shows which.
  """
  shifted = {f"{name}+1": np.concatenate([[False], np.asarray(lab, bool)[:-1]]) for name, lab in labels.items()}
  return {**labels, **shifted}


def precision_recall_f1(counts: np.ndarray) -> np.ndarray:
  """(L, 3) (tp, fp, fn) → (L, 3) (precision, recall, F1); 0 where undefined."""
  tp, fp, fn = (np.asarray(counts, np.float64)[:, i] for i in range(3))
  precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
  recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                 where=precision + recall > 0)
  return np.stack([precision, recall, f1], axis=1)


def pyplot():
  """matplotlib.pyplot with a file backend, or a clear error naming the extra to install."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as err:
    raise ImportError("the figures need matplotlib: pip install 'hmlstm_jax[plot]'") from err
  return plt


def save_png(fig, path: str) -> None:
  """Writes a figure as a PNG to ``path`` atomically (temporary file, then rename) and closes it."""
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  pyplot().close(fig)
  files.write_atomically(path, png.getvalue())


def operation_lines(op_counts, dead_layers=()) -> list[str]:
  """One line per layer: its UPDATE / COPY / FLUSH counts and how often it computes; and a
  line naming the dead detectors (z never fired), if any."""
  counts = np.asarray(op_counts)
  lines = [f"  layer {l + 1}: UPDATE {update:.0f}  COPY {copy:.0f}  FLUSH {flush:.0f}  "
           f"(computes on {(update + flush) / counts[0].sum():.1%} of steps)"
           for l, (copy, update, flush) in enumerate(counts)]
  if dead_layers:
    lines.append(f"  dead detectors (z never fired): layer {', '.join(map(str, dead_layers))}")
  return lines


def boundary_lines(boundaries: dict, unit: str = "ends") -> list[str]:
  """One line per label and detector layer: precision, recall and F1 (label names ending
  in '+1' are the labels one step later)."""
  lines = []
  for label, prf in boundaries.items():
    for l, (p, r, f) in enumerate(prf[:-1]):
      where = f"{label[:-2]} {unit} +1 step" if label.endswith("+1") else f"{label} {unit}"
      lines.append(f"  z{l + 1} vs {where}: precision {p:.3f}  recall {r:.3f}  F1 {f:.3f}")
  return lines
