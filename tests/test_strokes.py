"""Pen trajectories: offsets, normalisation, padded batches of whole sequences, and the
synthetic handwriting's hierarchy."""
import numpy as np
import pytest

from hmlstm_jax.handwriting.data import strokes


def test_offsets_round_trip_and_pen_ups_stay():
  points = np.array([[1.0, 2.0, 0], [1.5, 2.5, 1], [4.0, 0.0, 0], [4.5, 1.0, 1]], np.float32)
  offsets = strokes.to_offsets(points)
  np.testing.assert_allclose(offsets, [[0, 0, 0], [0.5, 0.5, 1], [2.5, -2.5, 0], [0.5, 1.0, 1]])
  np.testing.assert_allclose(strokes.from_offsets(offsets)[:, :2], points[:, :2] - points[0, :2])


def test_normalizer_uses_the_training_statistics_and_undoes_itself():
  rng = np.random.default_rng(0)
  train = [np.c_[rng.normal(3.0, 2.0, (50, 2)), rng.integers(0, 2, 50)].astype(np.float32) for _ in range(4)]
  norm = strokes.Normalizer.fit(train)
  flat = np.concatenate([norm.apply(o) for o in train])
  np.testing.assert_allclose(flat[:, :2].mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(flat[:, :2].std(0), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(flat[:, 2], np.concatenate([o[:, 2] for o in train]))
  np.testing.assert_allclose(norm.undo(norm.apply(train[0])), train[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no spread"):
    strokes.Normalizer.fit([np.zeros((5, 3), np.float32)])


def test_synthetic_hierarchy_is_nested_and_seeded():
  lines = strokes.synthetic_lines(3, 20)
  again = strokes.synthetic_lines(3, 20)
  for points, labels, other in zip(lines.points, lines.labels, again.points):
    np.testing.assert_array_equal(points, other)
    np.testing.assert_array_equal(points[:, 2] == 1, labels["stroke"])   # p = 1: pen up
    assert np.all(labels["word"] <= labels["glyph"]) and np.all(labels["glyph"] <= labels["stroke"])
    assert labels["word"][-1] and labels["word"].sum() >= 3               # a line ends a word
  offsets = strokes.to_offsets(lines.points[0])
  after_pen_up = np.abs(offsets[1:, 0][lines.points[0][:-1, 2] == 1])
  within = np.abs(offsets[1:, 0][lines.points[0][:-1, 2] == 0])
  assert np.median(after_pen_up) > 3 * np.median(within)  # a new stroke starts with a jump
  assert not np.array_equal(strokes.synthetic_lines(4, 1).points[0], lines.points[0])


def _sequences(lengths):
  return ([np.c_[np.full((n, 2), i, np.float32), np.arange(n) % 2] .astype(np.float32)
           for i, n in enumerate(lengths)],
          [{"stroke": np.arange(n) % 2 == 1} for n in lengths])


def test_batches_pad_at_the_end_and_mask_the_padding():
  seqs, labels = _sequences([5, 9, 6, 12, 7, 8])
  batcher = strokes.SequenceBatcher(seqs, labels, batch_size=2, seed=0)
  assert len(batcher) == 3
  seen = set()
  for k in range(len(batcher)):
    b = batcher[k]
    for r in range(2):
      i = int(b.inputs[r, 0, 0])
      seen.add(i)
      n = len(seqs[i]) - 1
      np.testing.assert_array_equal(b.inputs[r, :n], seqs[i][:-1])
      np.testing.assert_array_equal(b.targets[r, :n], seqs[i][1:])
      assert b.mask[r].sum() == n and not b.mask[r, n:].any() and not b.inputs[r, n:].any()
      np.testing.assert_array_equal(b.labels["stroke"][r, :n], labels[i]["stroke"][:-1])
  assert seen == set(range(6))
  # neighbours by length: inputs of (4, 5), (6, 7), (8, 11): 41 real of 2 * (5 + 7 + 11)
  assert batcher.padding_fraction() == pytest.approx(1 - 41 / 46)


def test_a_last_partial_batch_is_filled_with_empty_rows_and_lengths_round_up():
  seqs, labels = _sequences([5, 9, 6, 12, 7])
  batcher = strokes.SequenceBatcher(seqs, labels, batch_size=2, drop_remainder=False,
                                    length_multiple=4)
  assert len(batcher) == 3 and batcher.num_sequences == 5
  shapes = {batcher[k].inputs.shape for k in range(3)}
  assert all(s[0] == 2 and s[1] % 4 == 0 for s in shapes)
  masks = [batcher[k].mask for k in range(3)]
  assert sum(float(m.sum()) for m in masks) == sum(n - 1 for n in (5, 9, 6, 12, 7))
  assert sum(int((m.sum(axis=1) > 0).sum()) for m in masks) == 5  # one empty row


def test_batches_split_rows_over_hosts_and_keep_their_order():
  seqs, labels = _sequences([5, 9, 6, 12, 7, 8, 10, 11])
  full = strokes.SequenceBatcher(seqs, labels, batch_size=4, seed=1)
  host1 = strokes.SequenceBatcher(seqs, labels, batch_size=4, seed=1, process_index=1, process_count=2)
  for k in range(len(full)):
    rows = full[k].inputs[2:, :, 0].max(axis=1)
    np.testing.assert_array_equal(host1[k].inputs[:, :, 0].max(axis=1), rows)
  with pytest.raises(ValueError, match="fewer than one batch"):
    strokes.SequenceBatcher(seqs[:3], labels[:3], batch_size=4)
  with pytest.raises(IndexError):
    full[len(full)]
