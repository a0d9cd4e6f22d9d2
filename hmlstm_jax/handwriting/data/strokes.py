"""Pen trajectories for handwriting (§4.2): offsets, normalisation, padded batches of whole
sequences, and the embedded synthetic handwriting.

A line of handwriting is a sequence of points (x, y, p): p = 1 on the last point of each
stroke (the pen is lifted after it). [decision, decisions.md §5] The model reads offsets from the
previous point (Graves 2013), so a new stroke starts with a large shift after a pen-up;
offsets are normalised with the training split's mean and standard deviation of x and y.

The synthetic handwriting knows its hierarchy: glyphs are drawn as 1-3 strokes, glyphs make
words (a small gap between glyphs, a larger one between words), words make lines; each point
is labelled with whether a stroke, a glyph or a word ends there.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

MIN_POINTS = 300  # §4.2: sequences shorter than this are dropped
LEVELS = ("stroke", "glyph", "word")  # the synthetic data's boundary labels, finest first


class Lines(NamedTuple):
  """Lines of handwriting: per line (N, 3) float32 points (x, y, p) and per-label (N,) bool."""
  points: list
  labels: list  # per line {name: (N,) bool}; empty dicts when unknown (IAM-OnDB: pen-ups only)


def to_offsets(points: np.ndarray) -> np.ndarray:
  """(N, 3) points → (N, 3) offsets (x_t − x_{t−1}, y_t − y_{t−1}, p_t); the first is (0, 0, p_0)."""
  out = np.array(points, np.float32, copy=True)
  out[1:, :2] = np.diff(points[:, :2], axis=0)
  out[0, :2] = 0.0
  return out


def from_offsets(offsets: np.ndarray) -> np.ndarray:
  """Inverse of :func:`to_offsets` (starting at the origin)."""
  out = np.array(offsets, np.float32, copy=True)
  out[:, :2] = np.cumsum(offsets[:, :2], axis=0)
  return out


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """x and y offsets standardised with the training split's statistics (p untouched)."""
  mean: tuple[float, float]
  std: tuple[float, float]

  @classmethod
  def fit(cls, offsets: list) -> "Normalizer":
    xy = np.concatenate([o[:, :2] for o in offsets]).astype(np.float64)
    std = xy.std(axis=0)
    if not np.all(std > 0):
      raise ValueError("the training offsets have no spread in x or y")
    return cls(tuple(map(float, xy.mean(axis=0))), tuple(map(float, std)))

  def apply(self, offsets: np.ndarray) -> np.ndarray:
    out = np.array(offsets, np.float32, copy=True)
    out[..., :2] = (out[..., :2] - np.float32(self.mean)) / np.float32(self.std)
    return out

  def undo(self, offsets: np.ndarray) -> np.ndarray:
    out = np.array(offsets, np.float32, copy=True)
    out[..., :2] = out[..., :2] * np.float32(self.std) + np.float32(self.mean)
    return out


class SequenceBatch(NamedTuple):
  """A batch of whole sequences, padded at the end to the longest (rows leading).

  ``inputs[b, t]`` is offset t of sequence b and ``targets[b, t]`` offset t + 1; ``mask`` is
  1 where the target is real; ``labels[name][b, t]`` says whether a boundary of that kind
  ends at input t."""
  inputs: np.ndarray   # (B, T, 3) float32
  targets: np.ndarray  # (B, T, 3) float32
  mask: np.ndarray     # (B, T) float32
  labels: dict


class SequenceBatcher:
  """Whole sequences in padded batches: sequences sorted by length and cut into batches of
  neighbours (little padding), the batches in a fixed seeded order. ``[k]`` is batch k of
  every epoch (the trainer's data position), this process's rows of it.

  Every batch has ``batch_size`` rows (without ``drop_remainder`` the last is filled with empty
  rows, all masked) and a length rounded up to a multiple of ``length_multiple``, so that a
  jitted step compiles once per length bucket, not once per batch."""

  def __init__(self, sequences: list, labels: list, batch_size: int, *, seed: int = 0,
               drop_remainder: bool = True, length_multiple: int = 1, process_index: int = 0,
               process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} hosts")
    if not sequences or (drop_remainder and len(sequences) < batch_size):
      raise ValueError(f"{len(sequences)} sequences are fewer than one batch of {batch_size}")
    if any(len(s) < 2 for s in sequences):
      raise ValueError("every sequence needs at least 2 points (an input and a target)")
    order = np.argsort([len(s) for s in sequences], kind="stable")
    count = len(order) // batch_size if drop_remainder else -(-len(order) // batch_size)
    groups = [order[k * batch_size:(k + 1) * batch_size] for k in range(count)]
    groups = [np.r_[g, np.full(batch_size - len(g), -1)] for g in groups]  # -1: an empty row
    permutation = np.random.default_rng(seed).permutation(count)
    rows = slice(process_index * batch_size // process_count,
                 (process_index + 1) * batch_size // process_count)
    self._groups = [groups[k][rows] for k in permutation]
    self._sequences, self._labels = sequences, labels
    self.length_multiple = length_multiple
    self.num_sequences = len(sequences) if not drop_remainder else count * batch_size

  def _length(self, chosen) -> int:
    longest = max((len(self._sequences[i]) - 1 for i in chosen if i >= 0), default=1)
    return -(-longest // self.length_multiple) * self.length_multiple

  def __len__(self) -> int:
    return len(self._groups)

  def __getitem__(self, k: int) -> SequenceBatch:
    if not 0 <= k < len(self._groups):
      raise IndexError(f"batch {k} outside [0, {len(self._groups)})")
    chosen = self._groups[k]
    length = self._length(chosen)
    rows = len(chosen)
    inputs = np.zeros((rows, length, 3), np.float32)
    targets = np.zeros((rows, length, 3), np.float32)
    mask = np.zeros((rows, length), np.float32)
    names = list(self._labels[0]) if self._labels else []
    labels = {name: np.zeros((rows, length), bool) for name in names}
    for r, i in enumerate(chosen):
      if i < 0:
        continue
      seq, n = self._sequences[i], len(self._sequences[i]) - 1
      inputs[r, :n], targets[r, :n], mask[r, :n] = seq[:-1], seq[1:], 1.0
      for name in names:
        labels[name][r, :n] = self._labels[i][name][:-1]
    return SequenceBatch(inputs, targets, mask, labels)

  def padding_fraction(self) -> float:
    """Padded positions over all positions, over the epoch."""
    real = total = 0
    for chosen in self._groups:
      real += sum(len(self._sequences[i]) - 1 for i in chosen if i >= 0)
      total += self._length(chosen) * len(chosen)
    return 1.0 - real / max(total, 1)


# ----------------------------------------------------------------------------- synthetic


def _glyph_alphabet(rng: np.random.Generator, num_glyphs: int) -> list:
  """Each glyph: 1-3 strokes, each a polyline of 2-4 control points in the unit box."""
  glyphs = []
  for _ in range(num_glyphs):
    strokes = [rng.uniform(0.0, 1.0, size=(rng.integers(2, 5), 2))
               for _ in range(rng.integers(1, 4))]
    glyphs.append(strokes)
  return glyphs


def _draw(polyline: np.ndarray, spacing: float, rng: np.random.Generator, jitter: float) -> np.ndarray:
  """Points along a polyline, about ``spacing`` apart, with Gaussian jitter."""
  points = [polyline[0]]
  for a, b in zip(polyline[:-1], polyline[1:]):
    n = max(1, int(np.ceil(np.linalg.norm(b - a) / spacing)))
    points += [a + (b - a) * (i / n) for i in range(1, n + 1)]
  return np.asarray(points) + rng.normal(0.0, jitter, size=(len(points), 2))


def synthetic_lines(seed: int, num_lines: int, *, num_glyphs: int = 12, num_words: int = 40,
                    words_per_line: tuple[int, int] = (3, 7), spacing: float = 0.12,
                    jitter: float = 0.01) -> Lines:
  """Seeded synthetic handwriting with a known hierarchy (see the module docstring).

  A fixed vocabulary of ``num_words`` words (2-5 glyphs each, drawn from ``num_glyphs``
  glyphs; the same seed gives the same alphabet and vocabulary) is written in lines of
  ``words_per_line`` words chosen with Zipf-like frequencies; each glyph is redrawn with fresh
  jitter and a random slant and size, so no two instances are identical.
  """
  rng = np.random.default_rng(seed)
  glyphs = _glyph_alphabet(rng, num_glyphs)
  words = [rng.integers(0, num_glyphs, size=rng.integers(2, 6)) for _ in range(num_words)]
  freq = 1.0 / np.arange(1, num_words + 1)
  freq /= freq.sum()
  lines = Lines([], [])
  for _ in range(num_lines):
    points, ends = [], {name: [] for name in LEVELS}
    x, baseline = 0.0, 0.0
    for w in rng.choice(num_words, size=rng.integers(words_per_line[0], words_per_line[1] + 1), p=freq):
      for g_index, g in enumerate(words[w]):
        scale, slant = rng.uniform(0.85, 1.15), rng.uniform(-0.15, 0.15)
        strokes = glyphs[g]
        for s_index, stroke in enumerate(strokes):
          shape = stroke * scale
          shape = np.stack([shape[:, 0] + slant * shape[:, 1] + x, shape[:, 1] + baseline], axis=1)
          drawn = _draw(shape, spacing, rng, jitter)
          points.append(drawn)
          last_stroke = s_index == len(strokes) - 1
          for name, flag in (("stroke", True), ("glyph", last_stroke),
                             ("word", last_stroke and g_index == len(words[w]) - 1)):
            ends[name].append(np.r_[np.zeros(len(drawn) - 1, bool), flag])
        x += 1.0 * scale + 0.25
      x += 0.9
      baseline += rng.normal(0.0, 0.05)
    xy = np.concatenate(points).astype(np.float32)
    labels = {name: np.concatenate(v) for name, v in ends.items()}
    lines.points.append(np.concatenate([xy, labels["stroke"][:, None].astype(np.float32)], axis=1))
    lines.labels.append(labels)
  return lines
