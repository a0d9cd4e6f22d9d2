"""The benchmark binary's structure and bookkeeping (its timings are figures, not tests)."""
import json

import pytest

from experiments import benchmark


def test_flop_counts_follow_the_equations():
  ptb = benchmark.SHAPES["ptb"]
  per_token = benchmark.hmlstm_flops_per_token(ptb)
  expected = (2 * (128 + 512 + 512) * 2049 + 2 * (512 + 512 + 512) * 2049 + 2 * (512 + 512) * 2048
              + 2 * 1536 * 3 + 2 * 1536 * 512 + 2 * 512 * 50)
  assert per_token == expected
  assert benchmark.lstm_flops_per_token(ptb) == 2 * (128 + 512) * 2048 + 2 * 2 * 1024 * 2048 + 2 * 512 * 50
  ratio = per_token / benchmark.lstm_flops_per_token(ptb)
  assert 1.45 < ratio < 1.55  # "about 1.5x" (the issue)


def test_quick_run_reports_every_figure_and_the_loop_structure(tmp_path):
  record = benchmark.run(benchmark.SHAPES["quick"], warmup=1, iters=2)
  for model in ("hmlstm", "hmlstm_autodiff", "lstm"):
    m = record[model]
    assert m["median_s"] > 0 and m["min_s"] <= m["median_s"] and m["tokens_per_s"] > 0
    assert m["compile_s"] > 0 and m["peak_memory_mb"] > 0 and m["achieved_gflops"] > 0
  # One fused matmul per layer per step forward, and one per layer backward: the custom
  # backward leaves every weight gradient out of the reverse scan.
  assert record["hmlstm"]["loop_matmuls_per_step"] == [3, 3]
  assert record["hmlstm_autodiff"]["loop_matmuls_per_step"] == [3, 6]  # dX and dW in the loop
  assert record["time_ratio"] > 0 and all(v > 0 for v in record["machine_matmul_gflops"].values())
  table = benchmark.format_table([record])
  assert "HM-LSTM / LSTM" in table and "quick" in table
  json.dumps(record)


def test_loop_matmul_counts_reads_nested_computations():
  hlo = """HloModule m

%inner (p: f32[2,2]) -> f32[2,2] {
  %p = f32[2,2] parameter(0)
  ROOT %d = f32[2,2] dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], f32[2,2])) -> (s32[], f32[2,2]) {
  %f = f32[2,2] fusion(%x), kind=kOutput, calls=%inner
  %g = f32[2,2] dot(%f, %f), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[2,2]) -> f32[2,2] {
  %w = (s32[], f32[2,2]) while(%t), condition=%cond, body=%body
}
"""
  assert benchmark.loop_matmul_counts(hlo) == [2]


def test_trainer_loop_mode_times_the_real_loop_against_the_bare_step():
  record = benchmark.time_trainer_loop(benchmark.SHAPES["quick"], rounds=2, round_steps=4,
                                       log_every=2)
  assert len(record["bare_tokens_per_s"]) == len(record["loop_tokens_per_s"]) == 2
  assert all(v > 0 for v in record["bare_tokens_per_s"] + record["loop_tokens_per_s"])
  assert record["loop_over_bare"] > 0 and record["vocab"] == 28  # the synthetic corpus's
  line = benchmark.format_loop(record)
  assert line.startswith("quick: bare step") and "loop/bare" in line
  json.dumps(record)


def test_trainer_loop_rounds_must_end_on_a_progress_line():
  with pytest.raises(ValueError, match="multiple of log_every"):
    benchmark.time_trainer_loop(benchmark.SHAPES["quick"], round_steps=5, log_every=2)
