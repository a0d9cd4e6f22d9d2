"""Shared setup. Tests run on the CPU with small shapes and 8 simulated devices.

The device count must be set before JAX starts, so it is set here, before any test module
imports jax. So is JAX's persistent compilation cache, in a directory of this session's
(removed at its end): the many binaries the tests start (kill and resume, multi-process,
the study) compile the same small programs again and again; with the cache each is compiled
once per suite (tests/test_training.py: 153 s without, 82 s with).
"""
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # pytest-xdist's workers inherit the controller's
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hmlstm_jax_tests_xla_")
  os.environ["HMLSTM_JAX_TESTS_OWN_CACHE"] = "1"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# A size bound turns on the cache's file lock (filelock), so that processes compiling the same
# program at once (xdist workers, a multi-process run) never read an entry half written.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
#: What a test that builds a clean environment for a binary keeps: the compilation cache.
CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                   "JAX_COMPILATION_CACHE_MAX_SIZE")
sys.path.insert(0, os.path.dirname(__file__))  # tests/numpy_reference.py

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: starts the binaries as processes (`make test-fast` "
                          "leaves these files out; `make test` and CI run everything)")


def pytest_sessionfinish(session):
  """The controller (not an xdist worker) removes the compilation cache it made."""
  if os.environ.get("HMLSTM_JAX_TESTS_OWN_CACHE") and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
