"""Truncated-BPTT batching (decisions.md §4): contiguous streams, each row continuing the last.

The split (N symbols) is cut into ``batch_size`` contiguous streams of
L = (N − 1) // batch_size symbols; batch k holds symbols [k·T, (k+1)·T) of every stream as
inputs and the symbols one further as targets, so row r of batch k+1 continues row r of batch
k and the recurrent state carried from one batch to the next is the state of the same text.
Rows are divided over hosts and devices: host h owns the rows
[h·B/H, (h+1)·B/H), and its local devices split those evenly.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np


class Segment(NamedTuple):
  """One batch of the streams (a pytree): arrays of shape (rows, T)."""
  inputs: np.ndarray
  targets: np.ndarray
  labels: dict[str, np.ndarray]  # per-position boolean labels of the inputs (e.g. word ends)


class StreamBatcher:
  """Serves the truncated-BPTT segments of one split: ``len()`` segments, ``[k]`` segment k
  (the trainer's :class:`~hmlstm_jax.training.Batches`).

  Args:
    tokens: the whole split as integer ids, (N,).
    batch_size: number of streams B (the global batch).
    seq_len: segment length T.
    labels: optional per-position boolean arrays of length N, cut like the inputs (so that
      a model's boundaries can be scored against word or phrase ends).
    process_index, process_count: which slice of the rows this host serves.
    drop_remainder: serve only full segments (training); otherwise the last, shorter one too.
  """

  def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int,
               labels: dict[str, np.ndarray] | None = None, process_index: int = 0,
               process_count: int = 1, drop_remainder: bool = True):
    tokens = np.asarray(tokens)
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} hosts")
    stream_len = (len(tokens) - 1) // batch_size
    if stream_len < seq_len:
      raise ValueError(
          f"a split of {len(tokens)} symbols cut into {batch_size} streams gives streams of "
          f"{stream_len} symbols, shorter than the segment length {seq_len}; use a smaller "
          "batch or sequence length")
    rows = slice(process_index * batch_size // process_count,
                 (process_index + 1) * batch_size // process_count)
    n = batch_size * stream_len
    self.inputs = tokens[:n].reshape(batch_size, stream_len)[rows]
    self.targets = tokens[1:n + 1].reshape(batch_size, stream_len)[rows]
    self.labels = {k: np.asarray(v)[:n].reshape(batch_size, stream_len)[rows]
                   for k, v in (labels or {}).items()}
    self.seq_len = seq_len
    self.stream_len = stream_len
    full = stream_len // seq_len
    self.num_segments = full if drop_remainder or stream_len % seq_len == 0 else full + 1

  def __len__(self) -> int:
    return self.num_segments

  def __getitem__(self, k: int) -> Segment:
    """Segment k of the epoch (0 ≤ k < ``num_segments``)."""
    if not 0 <= k < self.num_segments:
      raise IndexError(f"segment {k} outside [0, {self.num_segments})")
    cols = slice(k * self.seq_len, min((k + 1) * self.seq_len, self.stream_len))
    return Segment(inputs=self.inputs[:, cols], targets=self.targets[:, cols],
                   labels={name: v[:, cols] for name, v in self.labels.items()})

  def __iter__(self) -> Iterator[Segment]:
    return (self[k] for k in range(self.num_segments))
