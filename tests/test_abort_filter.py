"""The stderr filter of multi-process runs (hmlstm_jax/training/abort_filter.py), fed the lines
JAX's runtime writes when it ends a process (as captured from a survivor, jaxlib 0.10.2)."""
import os
import select
import subprocess
import sys
import time

from hmlstm_jax.training import abort_filter

ABORT = b"""\
W1204 19:50:06.552458   30756 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Socket closed
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/GetKeyValue:
:UNKNOWN:Error received from peer  {grpc_message:"Socket closed", grpc_status:14}. This is only expected if one of the tasks is unhealthy.
E1204 19:50:06.552526   30756 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1204 19:50:06.552530   30756 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:"Socket closed"}
*** Check failure stack trace: ***
    @     0x7f0e6b3040ee  xla::CoordinationServiceAgent::SetError()
    @     0x7f0e768a71f5  (unknown)
Fatal Python error: Aborted

Thread 0x00007f0e76fcfb80 (most recent call first):
  File "/work/main/hmlstm_jax/training/steps.py", line 118 in train_step
"""
BEFORE = b"charlm: warning: checkpoint 40 cannot be read; moved aside\nsome library's warning\n"
OWN = b"charlm: process 1: an operation across the processes failed, most likely because another process of the run stopped or died; see its log (Gloo)\n"
SUMMARY = abort_filter.summary("charlm", "1", "127.0.0.1:1234")


def _filter(data: bytes) -> str:
  return subprocess.run([sys.executable, "-I", abort_filter.__file__, "charlm", "1",
                         "127.0.0.1:1234"], input=data, capture_output=True,
                        timeout=60).stdout.decode()


def test_the_runtimes_abort_becomes_one_line_after_what_came_before():
  assert _filter(BEFORE + ABORT) == BEFORE.decode() + SUMMARY + "\n"
  assert "another process of the run stopped or died" in SUMMARY


def test_the_processs_own_line_after_the_abort_began_is_kept_instead():
  assert _filter(BEFORE + ABORT + OWN + b"Thread 0x0000 (most recent call first):\n") == (
      BEFORE + OWN).decode()


def test_coordination_lines_without_an_abort_pass_through_unchanged():
  held = ABORT.split(b"F1204")[0]  # the lines before the fatal one, and no fatal line
  text = BEFORE + held + b"step 5/10\n" + held + OWN + held
  assert _filter(text) == text.decode()


def test_held_lines_pass_on_within_the_hold_time_when_nothing_fatal_follows():
  held = ABORT.split(b"F1204")[0]
  proc = subprocess.Popen([sys.executable, "-I", abort_filter.__file__, "charlm", "1", "x"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    proc.stdin.write(held)
    proc.stdin.flush()
    deadline, out = time.time() + abort_filter.HOLD_S + 5, b""
    while len(out) < len(held) and time.time() < deadline:
      if select.select([proc.stdout], [], [], 0.1)[0]:
        out += proc.stdout.read1(65536)
    assert out == held
    assert proc.poll() is None  # still filtering: the writer has not closed the pipe
  finally:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_install_filters_this_processs_stderr_to_its_abort():
  """install() in a process that then writes a line, the runtime's abort text, and aborts."""
  code = ("import os, sys\n"
          "from hmlstm_jax.training import abort_filter\n"
          "abort_filter.install('charlm', '1', '127.0.0.1:1234')\n"
          "sys.stderr.write('before\\n'); sys.stderr.flush()\n"
          f"os.write(2, {ABORT!r}); os.abort()\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == -6
  assert result.stderr.decode() == "before\n" + SUMMARY + "\n"
