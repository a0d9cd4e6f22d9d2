"""IAM-OnDB's TFDS builder on small archives made here in the database's real layout and XML."""
import io
import logging
import os
import tarfile

import numpy as np
import pytest

from hmlstm_jax.handwriting.data import iam_ondb
from hmlstm_jax.handwriting.data import strokes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

XML_HEAD = """<?xml version="1.0" encoding="ISO-8859-1"?>
<WhiteboardCaptureSession>
  <WhiteboardDescription>
    <SensorLocation corner="top_left"/>
    <DiagonallyOppositeCoords x="6512" y="1376"/>
    <VerticallyOppositeCoords x="966" y="1376"/>
    <HorizontallyOppositeCoords x="6512" y="787"/>
  </WhiteboardDescription>
  <StrokeSet>
"""


def _xml(strokes_xy) -> bytes:
  """A lineStrokes file: each stroke a list of (x, y) integer points."""
  out, t = [XML_HEAD], 100.0
  for stroke in strokes_xy:
    out.append(f'    <Stroke colour="black" start_time="{t:.2f}" end_time="{t + 1:.2f}">\n')
    for x, y in stroke:
      t += 0.01
      out.append(f'      <Point x="{x}" y="{y}" time="{t:.2f}"/>\n')
    out.append("    </Stroke>\n")
  out.append("  </StrokeSet>\n</WhiteboardCaptureSession>\n")
  return "".join(out).encode("iso-8859-1")


def _line(rng, points: int):
  """Random strokes with `points` points in all, integer whiteboard coordinates."""
  cuts = np.sort(rng.choice(np.arange(5, points - 5), size=3, replace=False))
  xy = np.cumsum(rng.integers(-20, 40, size=(points, 2)), axis=0) + 1000
  return [xy[a:b].tolist() for a, b in zip(np.r_[0, cuts], np.r_[cuts, points])]


def _add(tar, name, payload: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def make_manual_dir(path, seed=0, samples=None):
  """Eight samples of four lines (the fourth too short) in the task lists, and one sample in
  none; returns {line id: strokes}."""
  rng = np.random.default_rng(seed)
  samples = samples or {"trainset.txt": ["a01-000u", "a01-001", "b02-010z"],
                        "testset_v.txt": ["c03-020"], "testset_t.txt": ["d04-030x"],
                        "testset_f.txt": ["e05-040", "f06-050a", "g07-060"]}
  path.mkdir(parents=True, exist_ok=True)
  lines = {}
  with tarfile.open(path / iam_ondb.ARCHIVE, "w:gz") as tar:
    for sample in [s for ids in samples.values() for s in ids] + ["z99-999"]:  # z99: in no list
      writer, form = sample.split("-")[0], sample.rstrip("abcdefghijklmnopqrstuvwxyz")
      for k in range(1, 5):
        line_id = f"{sample}-{k:02d}"
        # every fourth line one point too short, every first line just long enough
        length = {1: 300, 4: 299}.get(k) or int(rng.integers(301, 420))
        lines[line_id] = _line(rng, length)
        _add(tar, f"lineStrokes/{writer}/{form}/{line_id}.xml", _xml(lines[line_id]))
    _add(tar, "lineStrokes/a01/a01-000/README", b"not a line")
  for name, ids in samples.items():
    (path / name).write_text("".join(f"{i}\n" for i in ids))
  return lines


def test_parse_line_pen_ups_and_y_up():
  xml = _xml([[(10, 20), (11, 25), (13, 27)], [], [(40, 5), (41, 6)]])
  points = iam_ondb.parse_line(xml)
  np.testing.assert_array_equal(points, [[10, -20, 0], [11, -25, 0], [13, -27, 1],
                                         [40, -5, 0], [41, -6, 1]])
  with pytest.raises(ValueError, match="not readable XML"):
    iam_ondb.parse_line(b"<broken", "x.xml")
  with pytest.raises(ValueError, match="no <StrokeSet>"):
    iam_ondb.parse_line(b"<a/>", "x.xml")


def test_paper_split_reproduces_the_papers_counts():
  ids = [f"a{i:05d}-01" for i in range(11_628)]
  split = iam_ondb.paper_split(ids)
  assert {s: len(v) for s, v in split.items()} == iam_ondb.PAPER_COUNTS
  assert sorted(sum(split.values(), [])) == ids  # a partition
  assert split == iam_ondb.paper_split(ids[::-1])  # the input order does not matter
  assert split["validation"] != sorted(split["validation"])  # not the ids' own order


def test_builder_reads_the_task_lists_lines_drops_short_ones_and_cuts_90_5_5(tmp_path, caplog):
  lines = make_manual_dir(tmp_path / "manual")
  with caplog.at_level(logging.INFO):
    data = iam_ondb.load_iam_ondb(str(tmp_path / "tfds"), str(tmp_path / "manual"))
  assert "32 lines in the task lists, 24 of 300 points or more: train 21, validation 1, test 2" in caplog.text
  ids = [i for s in iam_ondb.SPLITS for i in data.ids[s]]
  expected = sorted(i for i in lines if not i.endswith("-04") and not i.startswith("z99"))
  assert sorted(ids) == expected  # every listed line of 300+ points, once; z99 in no list
  assert data.ids == iam_ondb.paper_split(expected)
  assert [len(data.ids[s]) for s in iam_ondb.SPLITS] == [21, 1, 2]  # 90 / 5 / 5 of 24
  for split in iam_ondb.SPLITS:
    for line_id, points in zip(data.ids[split], data.splits[split]):
      xy = np.concatenate(lines[line_id])
      np.testing.assert_array_equal(points[:, 0], xy[:, 0])
      np.testing.assert_array_equal(points[:, 1], -xy[:, 1])
      pen_ups = np.cumsum([len(s) for s in lines[line_id]]) - 1
      np.testing.assert_array_equal(np.flatnonzero(points[:, 2]), pen_ups)
  # the normaliser: the training split's offsets, stored with the dataset
  offsets = np.concatenate([strokes.to_offsets(p)[:, :2] for p in data.splits["train"]]).astype(np.float64)
  np.testing.assert_allclose(data.normalizer.mean, offsets.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(data.normalizer.std, offsets.std(axis=0), rtol=1e-6)
  # prepared once: the manual files are not needed again
  for name in iam_ondb.required_files():
    os.remove(tmp_path / "manual" / name)
  again = iam_ondb.load_iam_ondb(str(tmp_path / "tfds"), str(tmp_path / "manual"))
  assert again.ids == data.ids and again.normalizer == data.normalizer
  np.testing.assert_array_equal(again.splits["test"][1], data.splits["test"][1])


def test_missing_files_are_named_with_the_page_and_directory(tmp_path):
  manual = tmp_path / "manual"
  make_manual_dir(manual)
  os.remove(manual / "testset_t.txt")
  with pytest.raises(FileNotFoundError) as err:
    iam_ondb.load_iam_ondb(str(tmp_path / "tfds"), str(manual))
  message = str(err.value)
  assert "testset_t.txt" in message and iam_ondb.PAGE in message and str(manual) in message
  assert iam_ondb.ARCHIVE not in message.split(":")[0]  # only what is missing is named first
  assert not (tmp_path / "tfds" / "iam_ondb" / "1.0.0").exists()  # nothing half-written


def test_a_garbage_archive_or_foreign_lists_are_clear_errors(tmp_path):
  manual = tmp_path / "garbage"
  make_manual_dir(manual)
  (manual / iam_ondb.ARCHIVE).write_bytes(b"not a tar" * 100)
  with pytest.raises(ValueError, match="not a readable lineStrokes-all.tar.gz"):
    iam_ondb.load_iam_ondb(str(tmp_path / "tfds"), str(manual))
  foreign = tmp_path / "foreign"
  make_manual_dir(foreign)
  for name in iam_ondb.TASK_LISTS:
    (foreign / name).write_text("q00-000\n")
  with pytest.raises(ValueError, match="holds no line of the samples"):
    iam_ondb.load_iam_ondb(str(tmp_path / "tfds2"), str(foreign))
