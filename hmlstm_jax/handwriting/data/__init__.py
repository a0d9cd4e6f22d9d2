"""Data for handwriting: pen trajectories and their batching (:mod:`.strokes`, with the
synthetic lines), IAM-OnDB (:mod:`.iam_ondb`, a TFDS builder), and :func:`load_splits`."""
from __future__ import annotations

from hmlstm_jax.handwriting.data import strokes

DATASETS = ("synthetic", "iam_ondb")


def load_splits(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
                synthetic_seed: int = 0, synthetic_lines: int = 1500):
  """The splits of a handwriting dataset by name: ``'synthetic'`` (``synthetic_lines``
  training lines; validation and test a tenth each) or ``'iam_ondb'`` (prepared from
  ``manual_dir``).

  Returns:
    ``(splits, normalizer)``: per split (a list of (N, 3) raw offsets, a list of label dicts
    of per-point booleans: ``'stroke'`` ends, and on synthetic data ``'glyph'`` and
    ``'word'`` ends), and the normaliser stored with the dataset (IAM-OnDB) or ``None`` (to
    be fitted on the training split).
  """
  if name == "iam_ondb":
    from hmlstm_jax.handwriting.data import iam_ondb  # imports tensorflow_datasets: only when needed
    data = iam_ondb.load_iam_ondb(data_dir, manual_dir)
    return {split: ([strokes.to_offsets(p) for p in points],
                    [{"stroke": p[:, 2] > 0} for p in points])  # stroke ends = pen-ups
            for split, points in data.splits.items()}, data.normalizer
  if name != "synthetic":
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
  n = synthetic_lines
  lines = strokes.synthetic_lines(synthetic_seed, n + 2 * max(n // 10, 1))
  cut = {"train": slice(0, n), "validation": slice(n, n + max(n // 10, 1)),
         "test": slice(n + max(n // 10, 1), None)}
  return {split: ([strokes.to_offsets(p) for p in lines.points[s]], lines.labels[s])
          for split, s in cut.items()}, None


__all__ = ["DATASETS", "load_splits"]
