"""The benchmark binary's structure and bookkeeping (its timings are figures, not tests)."""
import json
import os
import subprocess
import sys

import pytest

from experiments import benchmark
from experiments import profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  for model in ("hmlstm", "hmlstm_autodiff", "hmlstm_two_phase", "lstm"):
    m = record[model]
    assert m["median_s"] > 0 and m["min_s"] <= m["median_s"] and m["tokens_per_s"] > 0
    assert m["compile_s"] > 0 and m["peak_memory_mb"] > 0 and m["achieved_gflops"] > 0
  # One fused matmul per layer per step forward, and one per layer backward: the custom
  # backward leaves every weight gradient out of the reverse scan.
  assert record["hmlstm"]["loop_matmuls_per_step"] == [3, 3]
  assert record["hmlstm_autodiff"]["loop_matmuls_per_step"] == [3, 6]  # dX and dW in the loop
  assert record["hmlstm"]["loop_matmul_chain"] == [3, 3]  # layer 1 → 2 → 3 each step
  # Two phases: layers 1 and 3, then layer 2; backward 3 and 1 then 2.
  assert record["hmlstm_two_phase"]["loop_matmuls_per_step"] == [3, 3]
  assert record["hmlstm_two_phase"]["loop_matmul_chain"] == [2, 2]
  assert record["critical_path"] == {"layers": 60, "two_phase": 41}
  assert 0 < record["hmlstm"]["fraction_of_machine"] < 2
  assert record["time_ratio"] > 0 and all(v > 0 for v in record["machine_matmul_gflops"].values())
  table = benchmark.format_table([record])
  assert "HM-LSTM / LSTM" in table and "quick" in table
  json.dumps(record)


def test_loop_matmul_counts_reads_nested_computations():
  text = """HloModule m

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
  assert profiling.loop_matmul_counts(text) == [2]


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


def test_instruction_categories_follow_what_a_fusion_holds():
  text = """HloModule m

%dot_fusion (p: f32[2,2]) -> f32[2,2] {
  %p = f32[2,2] parameter(0)
  ROOT %d = f32[2,2] dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%dus_fusion (p: f32[4,2], q: f32[1,2], i: s32[]) -> f32[4,2] {
  %p = f32[4,2] parameter(0)
  %q = f32[1,2] parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %u = f32[4,2] dynamic-update-slice(%p, %q, %i, %z)
}

%math_fusion (p: f32[2,2]) -> f32[2,2] {
  %p = f32[2,2] parameter(0)
  %t = f32[2,2] tanh(%p)
  ROOT %m = f32[2,2] multiply(%t, %p)
}

%cond (t: (s32[], f32[2,2])) -> pred[] {
  %t = (s32[], f32[2,2]) parameter(0)
  %n = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%n, %c), direction=LT
}

%body (t: (s32[], f32[2,2])) -> (s32[], f32[2,2]) {
  %f = f32[2,2] fusion(%x), kind=kOutput, calls=%dot_fusion
  %g = f32[4,2] fusion(%y, %z, %i), kind=kLoop, calls=%dus_fusion
  %h = f32[2,2] fusion(%f), kind=kLoop, calls=%math_fusion
  %k = s32[] add(%i, %one)
  %tr = f32[2,2]{0,1} transpose(%h), dimensions={1,0}
}

ENTRY %main (a: f32[2,2]) -> f32[2,2] {
  %w = (s32[], f32[2,2]) while(%t), condition=%cond, body=%body
}
"""
  computations = profiling.parse(text)
  by_name = {i.name: i for body in computations.values() for i in body}
  kinds = {n: profiling.category(by_name[n], computations, frozenset({"cond"}))
           for n in ("f", "g", "h", "k", "tr", "w", "lt")}
  assert kinds == {"f": "matmul", "g": "dynamic slice", "h": "element-wise", "k": "loop control",
                   "tr": "copy / transpose", "w": None, "lt": "loop control"}
  assert by_name["w"].opcode == "while" and by_name["w"].callees == ("cond", "body")


def test_profile_mode_charges_both_loops_and_formats_a_table():
  record = benchmark.profile_models(benchmark.SHAPES["quick"], runs=1)
  for model in ("hmlstm", "lstm"):
    ms = record[model]["ms"]
    assert ms["forward loops"]["matmul"] > 0 and ms["backward loops"]["matmul"] > 0
    assert ms["forward loops"]["element-wise"] > 0 and record[model]["wall_ms"] > 0
    assert set().union(*ms.values()) <= set(profiling.CATEGORIES)
    walls = record[model]["wall"]
    assert all(walls[r] > 0 for r in ("forward loops", "backward loops", "outside loops"))
    assert sum(walls.values()) == pytest.approx(record[model]["wall_ms"])
  table = benchmark.format_profiles(record)
  assert "quick hmlstm" in table and "quick lstm" in table and "wall time" in table
  json.dumps(record)


def test_union_and_region_walls_count_overlapping_time_once():
  assert profiling.union_ms([(0, 2_000_000), (1_000_000, 3_000_000), (5_000_000, 6_000_000),
                       (5_500_000, 5_700_000)]) == pytest.approx(4.0)
  assert profiling.union_ms([]) == 0.0
  # Two forward loops overlapping in time, one backward loop; a gap between them is outside.
  events = [("a", "w1", 10_000_000, 12_000_000), ("b", "w1", 13_000_000, 14_000_000),
            ("c", "w2", 13_500_000, 15_000_000), ("d", None, 0, 1_000_000),
            ("e", "w3", 20_000_000, 21_000_000), ("f", "w3", 24_000_000, 25_000_000),
            ("g", None, 25_000_000, 30_000_000)]
  walls = profiling.region_walls(events, {"w1": "forward loops", "w2": "forward loops",
                                    "w3": "backward loops"})
  assert walls == pytest.approx({"forward loops": 5.0, "backward loops": 5.0,
                                 "outside loops": 20.0})


@pytest.mark.parametrize("args,message", [
    (("--quick", "--iters=0"), "flag --iters=0: 0 is not a positive integer"),
    (("--mode=profile", "--quick", "--profile_runs=0"), "flag --profile_runs=0"),
    (("--shapes=nope",), "unknown shapes ['nope']"),
    (("--quick", "--models=hmlstm,nope"), "unknown models ['nope']"),
    (("--mode=generate", "--quick", "--gen_chars=0"), "flag --gen_chars=0"),
])
def test_bad_flags_are_one_clear_error(args, message, tmp_path):
  out = tmp_path / "bench.json"
  result = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args,
                           f"--json_out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode != 0 and message in result.stderr
  assert "Traceback" not in result.stderr and not out.exists()


def test_generation_reaches_the_compute_shares_and_samples_the_same_with_skipping():
  """The sampling benchmark's bookkeeping: detector biases that reach the asked compute
  shares, identical samples with and without skipping, every model timed."""
  from experiments import generation
  record = generation.time_generation(benchmark.SHAPES["quick"], batches=(1,), num_chars=60,
                                      rounds=1, compute=(1.0, 0.5, 0.1))
  b = record["batches"]["1"]
  assert b["same_samples"] and set(b["models"]) == {"hm-skip", "hm-dense", "lstm", "lstm-eqp"}
  rows = b["models"]["hm-skip"]["row_share"]
  assert rows[0] == 1.0 and abs(rows[1] - 0.5) < 0.15 and abs(rows[2] - 0.1) < 0.1
  assert b["models"]["lstm"]["row_share"] == [1.0, 1.0, 1.0]
  assert b["skip_speedup"] > 0 and record["lstm_eqp_width"] > 32
  p = record["parameters"]
  assert abs(p["lstm-eqp"] - p["hmlstm"]) < abs(p["lstm"] - p["hmlstm"])
  assert "skip_speedup" in generation.format_generation(record)
  from experiments import device_report
  text = device_report.markdown({"machine": device_report.machine(), "date": "today",
                                 "seconds": 1.0, "train": [], "generate": [record],
                                 "left_out": []})
  assert "| quick | 1 | hm-skip |" in text and "same samples: True" in text
  json.dumps(record)
  with pytest.raises(ValueError, match="one share per layer"):
    generation.time_generation(benchmark.SHAPES["quick"], compute=(1.0, 0.5))


def test_device_report_writes_json_and_markdown_and_keeps_to_its_budget(tmp_path):
  """``--budget_s=1``: the first part runs (the quick training steps in float32), every later
  part is named as left out; both files are written; cuDNN's row says why it is missing."""
  result = subprocess.run([sys.executable, "-m", "experiments.device_report", "--quick",
                           "--budget_s=1", "--iters=1", "--warmup=0", f"--out_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / "report.json").read_text())
  assert [(r["shape"]["name"], r["dtype"]) for r in report["train"]] == [("quick", "float32")]
  assert report["left_out"] == ["train quick bfloat16", "generate quick"]
  assert report["train"][0]["models"] == ["hmlstm", "hmlstm_two_phase", "hmlstm_unroll2",
                                          "hmlstm_unroll4", "lstm"]
  # scan_unroll k: k steps' matmuls (3 layers) in each iteration of both loops
  for k in (2, 4):
    assert report["train"][0][f"hmlstm_unroll{k}"]["loop_matmuls_per_step"] == [3 * k, 3 * k]
  assert "NVIDIA GPU" in report["train"][0]["skipped"]["cudnn_lstm"]
  assert report["machine"]["platform"] == "cpu" and report["machine"]["jax"]
  text = (tmp_path / "report.md").read_text()
  assert "| quick | float32 | hm-2ph |" in text and "not timed: cuDNN" in text
  assert "Left out (over the time budget): train quick bfloat16, generate quick" in text
