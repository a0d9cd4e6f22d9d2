"""files.py: outputs written whole or not at all, and errors that name the file."""
import os
import subprocess
import sys
import textwrap


def test_a_refused_write_names_the_file_and_what_to_do(tmp_path):
  """``files.write_atomically`` (every output of the binaries): the error names the file and
  leaves no temporary file behind."""
  script = textwrap.dedent(f"""
      import errno, resource, signal
      from hmlstm_jax import files
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
      try:
        files.write_atomically({str(tmp_path / "out.json")!r}, "x" * 1000)
      except OSError as err:
        assert err.errno == errno.EFBIG
        print(err)
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
  assert f"cannot write {tmp_path / 'out.json'}: File too large; the file is over" in result.stdout
  assert os.listdir(tmp_path) == []
