"""IAM-OnDB (Liwicki & Bunke, 2005) as a TFDS builder: lines of on-line handwriting (§4.2).

The database needs registration (:data:`PAGE`), so there is no download: the user puts these
files, as IAM-OnDB distributes them, in the manual directory (default
``<data_dir>/downloads/manual``):

* ``lineStrokes-all.tar.gz``: one XML file per line of handwriting,
  ``lineStrokes/<writer>/<form>/<sample>-<NN>.xml``, e.g. ``lineStrokes/a01/a01-000/a01-000u-01.xml``;
  inside, ``<StrokeSet>`` holds ``<Stroke>`` elements of ``<Point x="…" y="…" time="…"/>``.
* ``trainset.txt``, ``testset_v.txt``, ``testset_t.txt``, ``testset_f.txt``: the sample lists
  of the recognition task IAM-OnDB-t1 (one sample id a line, e.g. ``a01-000u``; a sample's
  lines are its ``<sample>-NN.xml`` files).

Each line becomes a sequence of points (x, y, p): the pen positions in the order written,
strokes concatenated, p = 1 on the last point of each stroke (the pen is lifted after it),
y negated so that it points up (the whiteboard's y points down). Lines shorter than
:data:`MIN_POINTS` points are dropped, as in the paper.

[decision] The paper's split. The paper counts 12,179 examples: exactly the lines of the four
task lists (5,364 + 1,438 + 1,518 + 3,859). After dropping lines under 300 points it has
10,465 / 581 / 582 sequences, which are 10,465 = ⌊0.9 N⌋, 581 = ⌊0.05 N⌋ and 582 the rest of
N = 11,628 (no other N gives these three counts): a 90 / 5 / 5 cut of the remaining lines, not
the task's own four sets (whose sizes are nothing like these). The paper does not say in which
order the lines were cut; the builder orders them by the SHA-256 of their line id, a fixed
pseudo-random order (the same on every machine and NumPy version, no seed), so that every split
draws on all writers as a random cut would, then cuts 90 / 5 / 5. It logs the counts it gets.

The training split's offset statistics (for the normalisation of §4.2) are stored in the
dataset's metadata (:func:`load_iam_ondb` returns them as a :class:`~strokes.Normalizer`).
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import xml.etree.ElementTree as ElementTree
from typing import NamedTuple

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from hmlstm_jax import tfds_util
from hmlstm_jax.handwriting.data import strokes
from hmlstm_jax.tfds_util import SPLITS

PAGE = "https://fki.tic.heia-fr.ch/databases/iam-on-line-handwriting-database"
ARCHIVE = "lineStrokes-all.tar.gz"
TASK_LISTS = ("trainset.txt", "testset_v.txt", "testset_t.txt", "testset_f.txt")
MIN_POINTS = strokes.MIN_POINTS
PAPER_COUNTS = {"train": 10_465, "validation": 581, "test": 582}
_LINE_FILE = re.compile(r"^(?P<sample>[a-z0-9]+-[0-9]+[a-z]?)-(?P<line>[0-9]+)\.xml$")


def required_files() -> tuple[str, ...]:
  """The files the builder reads from the manual directory."""
  return (ARCHIVE,) + TASK_LISTS


def missing_files_message(manual_dir: str, missing: list[str]) -> str:
  """One line naming what is missing, where it goes and where to get it."""
  return (f"IAM-OnDB needs {', '.join(missing)} in {manual_dir}: register at {PAGE}, download "
          f"{ARCHIVE} (the data section) and the four sample lists of task IAM-OnDB-t1 "
          f"({', '.join(TASK_LISTS)}), put them there (or pass --manual_dir), and run again")


def parse_line(xml: bytes, name: str = "a line") -> np.ndarray:
  """One line's stroke XML → (N, 3) float32 points (x, y up, p = 1 on each stroke's last point).

  Empty strokes are skipped; a file that is not stroke XML raises ValueError naming it."""
  try:
    root = ElementTree.fromstring(xml)
  except ElementTree.ParseError as err:
    raise ValueError(f"{name} is not readable XML ({err})") from None
  stroke_set = root.find("StrokeSet")
  if stroke_set is None:
    raise ValueError(f"{name} has no <StrokeSet>: not an IAM-OnDB lineStrokes file")
  pieces = []
  for stroke in stroke_set.iter("Stroke"):
    try:
      xy = [(float(p.attrib["x"]), -float(p.attrib["y"])) for p in stroke.iter("Point")]
    except (KeyError, ValueError) as err:
      raise ValueError(f"{name}: a <Point> without a numeric x or y ({err})") from None
    if xy:
      pen = np.zeros((len(xy), 1), np.float32)
      pen[-1] = 1.0
      pieces.append(np.concatenate([np.asarray(xy, np.float32), pen], axis=1))
  if not pieces:
    return np.zeros((0, 3), np.float32)
  return np.concatenate(pieces)


def read_task_list(text: str) -> list[str]:
  """Sample ids of one task list (blank lines ignored)."""
  return [line.strip() for line in text.splitlines() if line.strip()]


def paper_split(ids: list[str]) -> dict[str, list[str]]:
  """The 90 / 5 / 5 cut of the kept lines in the order of their ids' SHA-256 (module docstring)."""
  order = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
  n = len(order)
  a, b = n * 90 // 100, n * 90 // 100 + n * 5 // 100
  return {"train": order[:a], "validation": order[a:b], "test": order[b:]}


class IamOndb(tfds.core.GeneratorBasedBuilder):
  """IAM-OnDB lines of handwriting as (x, y, p) points, the paper's 90 / 5 / 5 split (§4.2)."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Register at {PAGE}, then put {ARCHIVE} and the task IAM-OnDB-t1 lists "
      f"({', '.join(TASK_LISTS)}) in the manual directory.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds_util.ordered_info(
        self, {"id": tfds.features.Text(),
               "points": tfds.features.Tensor(shape=(None, 3), dtype=np.float32)},
        PAGE, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    manual = tfds_util.manual_dir_of(dl_manager)
    missing = [f for f in required_files() if not os.path.isfile(os.path.join(manual, f))]
    if missing:
      raise FileNotFoundError(missing_files_message(manual, missing))
    lines = self._read_lines(manual)
    kept = {i: p for i, p in lines.items() if len(p) >= MIN_POINTS}
    splits = paper_split(list(kept))
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
      raise ValueError(f"IAM-OnDB: only {len(kept)} lines of {MIN_POINTS} points or more, too few "
                       f"for a {'/'.join(empty)} split; is {ARCHIVE} the whole archive?")
    counts = {s: len(v) for s, v in splits.items()}
    logging.info("IAM-OnDB: %d lines in the task lists, %d of %d points or more: train %d, "
                 "validation %d, test %d (the paper: %s)", len(lines), len(kept), MIN_POINTS,
                 counts["train"], counts["validation"], counts["test"],
                 " / ".join(f"{v:,}" for v in PAPER_COUNTS.values()))
    normalizer = strokes.Normalizer.fit([strokes.to_offsets(kept[i]) for i in splits["train"]])
    self.info.metadata.update({"normalizer_mean": list(normalizer.mean),
                               "normalizer_std": list(normalizer.std), "counts": counts,
                               "lines_in_task_lists": len(lines), "min_points": MIN_POINTS})
    return {s: self._generate_examples([(i, kept[i]) for i in splits[s]]) for s in SPLITS}

  def _read_lines(self, manual: str) -> dict[str, np.ndarray]:
    """Every line of every sample in the four task lists, by line id."""
    samples = []
    for name in TASK_LISTS:
      with open(os.path.join(manual, name), encoding="utf-8", errors="replace") as f:
        samples += read_task_list(f.read())
    wanted = set(samples)
    archive = os.path.join(manual, ARCHIVE)
    logging.info("IAM-OnDB: reading %s (sha256 %s) for %d samples", archive, tfds_util.sha256_of(archive),
                 len(wanted))
    lines, found = {}, set()
    try:
      with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
          match = _LINE_FILE.match(os.path.basename(member.name))
          if not member.isfile() or not match or match["sample"] not in wanted:
            continue
          line_id = match["sample"] + "-" + match["line"]
          lines[line_id] = parse_line(tar.extractfile(member).read(), f"{ARCHIVE}:{member.name}")
          found.add(match["sample"])
          if len(lines) % 2000 == 0:
            logging.info("IAM-OnDB: %d lines read", len(lines))
    except (tarfile.TarError, EOFError, OSError) as err:
      raise ValueError(f"{archive} is not a readable {ARCHIVE} ({type(err).__name__}: {err}); "
                       "download it again") from None
    if not lines:
      raise ValueError(f"{archive} holds no line of the samples in {', '.join(TASK_LISTS)}: is it "
                       f"IAM-OnDB's {ARCHIVE}?")
    absent = sorted(wanted - found)
    if absent:
      logging.warning("IAM-OnDB: %d samples of the task lists have no line in %s (e.g. %s)",
                      len(absent), ARCHIVE, ", ".join(absent[:5]))
    return lines

  def _generate_examples(self, lines):
    for index, (line_id, points) in enumerate(lines):
      yield line_id, {"index": index, "id": line_id, "points": points}


class IamOndbData(NamedTuple):
  """The prepared dataset: per split the lines' (N, 3) points and ids, and the normaliser."""
  splits: dict      # split → list of (N, 3) float32 points
  ids: dict         # split → list of line ids
  normalizer: strokes.Normalizer


def load_iam_ondb(data_dir: str | None = None, manual_dir: str | None = None) -> IamOndbData:
  """Prepares IAM-OnDB once (from the manual directory) and reads its three splits.

  Args:
    data_dir: TFDS data directory (default ``~/tensorflow_datasets``).
    manual_dir: where the archive and task lists are (default ``<data_dir>/downloads/manual``).
  """
  builder = tfds_util.prepared(IamOndb, data_dir, manual_dir)
  splits, ids = {}, {}
  for split in SPLITS:
    examples = tfds_util.ordered_examples(builder, split)
    splits[split] = [np.asarray(ex["points"], np.float32) for ex in examples]
    ids[split] = [ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
                  for ex in examples]
  meta = builder.info.metadata
  normalizer = strokes.Normalizer(tuple(meta["normalizer_mean"]), tuple(meta["normalizer_std"]))
  return IamOndbData(splits, ids, normalizer)
