"""Boundary scoring (analysis.py): counts, precision / recall / F1, the one-step-later labels."""
import numpy as np

from hmlstm_jax import analysis


def test_boundary_counts_and_scores_by_hand():
  z = np.array([[[1, 0, 1, 1, 0, 0]],    # layer 1 (rows=1, T=6)
                [[0, 0, 0, 0, 0, 0]]], float)
  labels = {"word": np.array([[1, 0, 0, 1, 1, 0]], bool)}
  counts = analysis.boundary_counts(z, labels)["word"]
  np.testing.assert_array_equal(counts, [[2, 1, 1], [0, 0, 3]])  # (tp, fp, fn) per layer
  prf = analysis.precision_recall_f1(counts)
  np.testing.assert_allclose(prf[0], [2 / 3, 2 / 3, 2 / 3])
  np.testing.assert_array_equal(prf[1], [0, 0, 0])  # undefined precision counts as 0


def test_boundary_counts_leave_masked_positions_out():
  z = np.array([[[1, 0, 1, 1, 0, 1]]], float)
  labels = {"pen": np.array([[1, 0, 0, 1, 1, 1]], bool)}
  mask = np.array([[1, 1, 1, 1, 0, 0]], np.float32)   # the last two are padding
  np.testing.assert_array_equal(analysis.boundary_counts(z, labels, mask)["pen"], [[2, 1, 0]])


def test_labels_one_step_later():
  labels = analysis.with_next_step({"word": np.array([True, False, True, True, False])})
  np.testing.assert_array_equal(labels["word+1"], [False, True, False, True, True])
  np.testing.assert_array_equal(labels["word"], [True, False, True, True, False])
