"""What the TFDS builders of both tasks share (the corpora of :mod:`hmlstm_jax.charlm.data`,
IAM-OnDB of :mod:`hmlstm_jax.handwriting.data`): the split names, examples numbered and read
back in order, where the data lives (:class:`DataDirs`, the runs' settings), the manual
directory, a file's checksum for the log, and preparing a dataset once when several runs
start together."""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds

from hmlstm_jax.settings import setting

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class DataDirs:
  """Where TFDS keeps prepared datasets, and where manual downloads wait (both tasks' runs)."""
  data_dir: str | None = setting(None, "TFDS data directory (default ~/tensorflow_datasets).",
                                 changeable=True)
  manual_dir: str | None = setting(
      None, "Directory holding pre-downloaded archives (the dataset's flagfile names them); "
      "default <data_dir>/downloads/manual.", changeable=True)


def ordered_info(builder, features: dict, homepage: str, **kwargs) -> tfds.core.DatasetInfo:
  """A builder's info: its examples numbered by ``index`` and stored in order."""
  return tfds.core.DatasetInfo(
      builder=builder, description=builder.__doc__,
      features=tfds.features.FeaturesDict({"index": np.int64, **features}),
      disable_shuffling=True,  # as a DatasetInfo argument: a class attribute is ignored
      homepage=homepage, **kwargs)


def manual_dir_of(dl_manager) -> str:
  """The manual directory, whether or not it exists yet (TFDS asserts on a missing one)."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError:  # no manual directory, or an empty one
    return os.fspath(getattr(dl_manager, "_manual_dir", None) or "<data_dir>/downloads/manual")


def ordered_examples(builder: tfds.core.DatasetBuilder, split: str) -> list:
  """A prepared split's examples in ``index`` order, read from its array_record files."""
  source = builder.as_data_source(split)
  return sorted((source[i] for i in range(len(source))), key=lambda ex: int(ex["index"]))


def sha256_of(path: str) -> str:
  """Hex SHA-256 of a file (logged after a download, so that a run records what it read)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def prepared(builder_cls, data_dir: str | None, manual_dir: str | None):
  """A builder of ``builder_cls`` whose dataset is prepared (``download_and_prepare``).

  Local data dirs: under an exclusive lock (``<data_dir>/<name>/.prepare.lock``), so that runs
  started together (``experiments.reproduce``, a study) prepare it once: the others wait,
  then read it, where they raced to rename TFDS's incomplete directory and the loser failed
  ("Cannot rename ... already exists"). The builder is made inside the lock, so that it sees
  what the winner wrote, and removes the ``incomplete.*`` directories of a preparation that was
  killed (TFDS never cleans them). A full disk is one line naming the directory (OSError).
  """
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  root = os.fspath(builder_cls(data_dir=data_dir, file_format="array_record").data_path)
  lock_dir = os.path.dirname(root)  # <data_dir>/<name>/<version> → <data_dir>/<name>
  if "://" in root:  # a cloud bucket: no local lock to take
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=config)
    return builder
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, ".prepare.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for name in os.listdir(lock_dir):  # left by a preparation killed mid-way: no one else
      if name.startswith("incomplete."):  # prepares while we hold the lock
        shutil.rmtree(os.path.join(lock_dir, name), ignore_errors=True)
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    try:
      builder.download_and_prepare(download_config=config)
    except (RuntimeError, OSError) as err:
      full = next((why for why in _FULL if why in str(err)), None)
      if full is None:
        raise
      free = shutil.disk_usage(lock_dir).free / 2**20
      raise OSError(  # one line for the binaries (TFDS's is a 60-line traceback)
          f"cannot prepare {builder.name} in {lock_dir}: {full} ({free:.0f} MB free there now; "
          "TFDS removed its incomplete copy); free space on that disk (a few times the "
          "archive's unpacked size) or choose another --data_dir, then run again") from None
  return builder


#: What TFDS's writers say when the disk (or the process's file-size limit) refuses a write.
_FULL = ("No space left on device", "File too large", "Disk quota exceeded")
