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


def test_a_detector_that_never_fires_over_the_split_is_counted_dead():
  """z¹ fires; z² fires only on padding, so it is dead; the last layer has no detector."""
  import jax.numpy as jnp
  from hmlstm_jax import hmlstm
  z = np.zeros((3, 4, 2, 1), np.float32)   # layers, (T, rows, 1) each
  z[0, 1, 0] = 1.0                          # z¹ fires once, on a real step
  z[1, 3, 1] = 1.0                          # z² fires once, on padding
  rnn = hmlstm.UnrollOutputs(h=(), z=tuple(jnp.asarray(zl) for zl in z))
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)   # (rows, T)
  initial = tuple(hmlstm.LayerState(h=jnp.zeros((2, 1)), c=jnp.zeros((2, 1)),
                                    z=jnp.zeros((2, 1))) for _ in range(3))
  sums = analysis.boundary_sums(initial, rnn, {"word": np.zeros((2, 4), bool)}, mask)
  np.testing.assert_array_equal(sums["fires"], [1, 0, 0])
  result = analysis.boundary_results(sums, ["word"])
  assert result["dead_layers"] == [2]
  assert analysis.boundary_scalars(result)["dead_detectors"] == 1.0
  assert analysis.operation_lines(result["op_counts"], result["dead_layers"])[-1] == (
      "  dead detectors (z never fired): layer 2")
  alive = analysis.boundary_results(dict(sums, fires=np.array([1, 1, 0])), ["word"])
  assert alive["dead_layers"] == [] and len(analysis.operation_lines(alive["op_counts"])) == 3



def test_both_experiments_report_a_dead_detector_in_their_summary():
  """The path a validation takes: summarize (results and their scalars) → summary_lines."""
  from hmlstm_jax.charlm import experiment as charlm
  from hmlstm_jax.handwriting import experiment as handwriting
  counts = np.array([[1, 1, 0], [0, 0, 2], [0, 0, 2]])   # (tp, fp, fn) per layer
  sums = {"op_counts": np.array([[0, 9, 1], [8, 2, 0], [10, 0, 0]]), "fires": np.array([2, 0, 0]),
          "boundaries": {"word": counts, "word+1": counts}}
  for experiment, own in ((charlm.CharLM(charlm.Config()), {"nll": 20.0, "count": 10.0}),
                          (handwriting.Handwriting(handwriting.Config()),
                           {"loglik": 5.0, "sequences": 1.0, "points": 10.0})):
    experiment.label_names = ["word", "word+1"]  # what load_data sets
    result = experiment.summarize(dict(sums, **own))
    assert result["dead_layers"] == [2] and result["dead_detectors"] == 1.0
    lines = experiment.summary_lines("validation", result)
    assert "  dead detectors (z never fired): layer 2" in lines
