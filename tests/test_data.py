"""Corpora (TFDS builders from local archives), the synthetic corpus, truncated-BPTT batching."""
import io
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from hmlstm_jax.charlm import data
from hmlstm_jax.charlm.data import corpora
from hmlstm_jax.charlm.data import synthetic
from conftest import SHARED_DATA

PTB_DIR = os.path.join(SHARED_DATA, "ptb_char")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_corpus_is_seeded_and_knows_its_boundaries():
  a, b = synthetic.make_splits(3, 2000, 300, 300), synthetic.make_splits(3, 2000, 300, 300)
  assert a["train"].text == b["train"].text
  assert a["train"].text != synthetic.make_splits(4, 2000, 300, 300)["train"].text
  grammar = synthetic.make_grammar(3)
  lexicon = {w for words in grammar.classes for w in words}
  text = a["train"]
  chars = np.array(list(text.text))
  np.testing.assert_array_equal(text.word_ends, (chars == " ") | (chars == "."))
  np.testing.assert_array_equal(text.phrase_ends, chars == ".")
  phrases = text.text.split(".")[:-1]  # the last may be cut
  assert len(phrases) > 50
  for phrase in phrases[1:]:
    words = phrase.split(" ")
    assert 2 <= len(words) <= 4 and all(w in lexicon for w in words)
  assert a["validation"].text != a["train"].text[:300]  # independent streams


def test_synthetic_corpus_as_corpus():
  corpus = data.load("synthetic", synthetic_chars=3000, synthetic_seed=1)
  assert set(corpus.splits) == {"train", "validation", "test"}
  assert len(corpus.splits["train"]) == 3000 and len(corpus.splits["test"]) == 300
  text = corpus.vocab.decode(corpus.splits["train"])
  np.testing.assert_array_equal(corpus.labels["train"]["word"], np.isin(list(text), [" ", "."]))


# ----------------------------------------------------------------------------- batching


def test_batch_k_plus_1_continues_batch_k():
  tokens = np.arange(1000)
  b = data.StreamBatcher(tokens, batch_size=4, seq_len=7, labels={"even": tokens % 2 == 0})
  assert b.stream_len == 249 and b.num_segments == 35
  for k in range(b.num_segments - 1):
    now, nxt = b[k], b[k + 1]
    np.testing.assert_array_equal(nxt.inputs[:, 0], now.inputs[:, -1] + 1)  # same row continues
    np.testing.assert_array_equal(now.targets, now.inputs + 1)              # next symbol
    np.testing.assert_array_equal(now.labels["even"], now.inputs % 2 == 0)
  np.testing.assert_array_equal(b[0].inputs[:, 0], [0, 249, 498, 747])  # contiguous streams
  tail = data.StreamBatcher(tokens, 4, 7, drop_remainder=False)
  assert tail.num_segments == 36 and tail[35].inputs.shape == (4, 4)
  with pytest.raises(IndexError):
    b[35]


def test_rows_are_divided_over_hosts():
  tokens = np.arange(801)
  full = data.StreamBatcher(tokens, 8, 10)
  host1 = data.StreamBatcher(tokens, 8, 10, process_index=1, process_count=2)
  np.testing.assert_array_equal(host1[3].inputs, full[3].inputs[4:])
  with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
    data.StreamBatcher(tokens, 8, 10, process_index=0, process_count=3)


def test_segment_longer_than_split_is_a_clear_error():
  with pytest.raises(ValueError, match="shorter than the segment length 100"):
    data.StreamBatcher(np.arange(500), batch_size=8, seq_len=100)


# ----------------------------------------------------------------------------- TFDS builders


@pytest.fixture
def small_chunks(monkeypatch):
  monkeypatch.setattr(corpora, "CHUNK_BYTES", 97)  # several chunks per split: order must hold


def _zip(path, member, payload):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(member, payload)


@pytest.mark.parametrize("name,member", [("text8", "text8"), ("enwik8", "enwik8")])
def test_zip_builders_prepare_the_90_5_5_splits(tmp_path, small_chunks, name, member):
  rng = np.random.default_rng(0)
  alphabet = np.frombuffer(b"abcdefghij <>\n", np.uint8) if name == "enwik8" else np.frombuffer(b"abcdefghij ", np.uint8)
  payload = rng.choice(alphabet, 4000).tobytes()
  manual = tmp_path / "manual"
  manual.mkdir()
  _zip(manual / f"{member}.zip", member, payload)
  corpus = corpora.load_corpus(name, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  decoded = {s: corpus.vocab.decode(ids).encode("latin-1") for s, ids in corpus.splits.items()}
  assert decoded["train"] == payload[:3600]
  assert decoded["validation"] == payload[3600:3800]
  assert decoded["test"] == payload[3800:]
  assert corpus.vocab.symbols == tuple(sorted(set(payload[:3600])))
  np.testing.assert_array_equal(corpus.labels["test"]["word"],
                                np.isin(np.frombuffer(payload[3800:], np.uint8), list(corpora.WORD_SEPARATORS[name])))
  # Prepared once: a second load reads the array_record files without the archive.
  os.remove(manual / f"{member}.zip")
  again = corpora.load_corpus(name, data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  np.testing.assert_array_equal(again.splits["train"], corpus.splits["train"])


def _ptb_archive(manual, texts, repeat=20):
  manual.mkdir()
  with tarfile.open(manual / "simple-examples.tgz", "w:gz") as tar:
    for split, text in texts.items():
      blob = (text * repeat).encode()
      info = tarfile.TarInfo(f"./simple-examples/data/ptb.char.{split}.txt")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))


class _Zeros:
  """A file of ``size`` zero bytes that is never held in memory."""

  def __init__(self, size):
    self.left = size

  def read(self, n=-1):
    n = self.left if n < 0 else min(n, self.left)
    self.left -= n
    return bytes(n)


def test_a_crafted_archive_is_refused_unread_with_bounded_memory(tmp_path):
  """Issue 32: a simple-examples.tgz whose training member is 512 MB of zeros (0.5 MB packed)
  took 4.96 GB of memory; now it is refused from its header, and the process stays under
  1 GB (TFDS and JAX imported)."""
  manual = tmp_path / "manual"
  manual.mkdir()
  size = 512 * 2**20
  with tarfile.open(manual / "simple-examples.tgz", "w:gz", compresslevel=1) as tar:
    for split in ("valid", "test", "train"):
      info = tarfile.TarInfo(f"./simple-examples/data/ptb.char.{split}.txt")
      info.size = size if split == "train" else 10
      tar.addfile(info, _Zeros(info.size))
  # The peak of this process's own address space: ru_maxrss would not do, since Linux carries
  # it across exec (a child of the full suite's 1.6 GB pytest process reports 1.6 GB).
  script = ("import sys\n"
            "from hmlstm_jax.charlm.data import corpora\n"
            "try:\n"
            f"  corpora.load_corpus('ptb', data_dir={str(tmp_path / 'tfds')!r}, manual_dir={str(manual)!r})\n"
            "except ValueError as err:\n"
            "  print(err)\n"
            "print(next(line.split()[1] for line in open('/proc/self/status')\n"
            "           if line.startswith('VmHWM:')))\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = out.stdout.strip().splitlines()
  assert out.returncode == 0 and len(lines) >= 2, out.stderr[-2000:]
  assert f"ptb.char.train.txt unpacks to {size:,} bytes, more than 1.5x the canonical" in lines[-2]
  assert int(lines[-1]) < 2**20  # kB: under 1 GB at its peak


def test_a_zip_member_far_larger_than_the_canonical_file_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(corpora.ZipCorpus, "MEMBER_BYTES", 1000)
  manual = tmp_path / "manual"
  manual.mkdir()
  _zip(manual / "text8.zip", "text8", b"ab " * 600)  # 1,800 bytes
  with pytest.raises(ValueError, match="text8 unpacks to 1,800 bytes, more than 1.5x"):
    corpora.load_corpus("text8", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))


def test_ptb_builder_reads_simple_examples_tgz(tmp_path, small_chunks):
  texts = {"train": "a _ c a t\n t h e _ d o g\n", "valid": "t h e _ c a t\n", "test": "a _ d o g\n"}
  manual = tmp_path / "manual"
  _ptb_archive(manual, texts)
  corpus = corpora.load_corpus("ptb", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert corpus.vocab.decode(corpus.splits["validation"]) == "the_cat\n" * 20
  assert corpus.vocab.decode(corpus.splits["train"][:17]) == "a_cat\nthe_dog\na_c"
  assert corpus.vocab.decode(range(corpus.vocab.size)) == "\n_acdeghot"
  np.testing.assert_array_equal(corpus.labels["test"]["word"][:6], [False, True, False, False, False, True])


def test_a_garbage_or_empty_archive_is_one_clear_error(tmp_path):
  """Fault 6: these escaped as tarfile.ReadError and TFDS's AssertionError."""
  manual = tmp_path / "garbage"
  manual.mkdir()
  (manual / "simple-examples.tgz").write_bytes(b"this is not a gzipped tar" * 10)
  with pytest.raises(ValueError, match=r"simple-examples.tgz is not a readable simple-examples.tgz "
                                       r"\(ReadError.*delete it and download it again"):
    corpora.load_corpus("ptb", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  _ptb_archive(tmp_path / "empty", {"train": "", "valid": "a _ b\n", "test": "a _ b\n"})
  with pytest.raises(ValueError, match=r"the train split\(s\) are empty"):
    corpora.load_corpus("ptb", data_dir=str(tmp_path / "tfds2"), manual_dir=str(tmp_path / "empty"))


def test_missing_archive_and_no_network_names_file_url_and_directory(tmp_path, monkeypatch):
  monkeypatch.setattr(corpora.Text8, "URL", "http://127.0.0.1:9/text8.zip")  # refused at once
  manual = tmp_path / "manual"
  with pytest.raises(FileNotFoundError) as err:
    corpora.load_corpus("text8", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  message = str(err.value)
  assert "text8.zip" in message and "http://127.0.0.1:9/text8.zip" in message and str(manual) in message


def test_unknown_corpus_and_foreign_symbols_are_clear_errors():
  with pytest.raises(ValueError, match="unknown dataset 'wiki'"):
    data.load("wiki")
  vocab = data.Vocabulary.from_bytes(np.frombuffer(b"abc", np.uint8))
  with pytest.raises(ValueError, match=r"\[b'z'\]"):
    vocab.encode(np.frombuffer(b"abz", np.uint8))


def test_real_ptb_char_files_read_as_the_paper_describes():
  """Mikolov's real validation and test files (../shared/data/ptb_char)."""
  for name, start in (("ptb.char.valid.txt", b"consumers_may_want_to_move_their_telephones_a_little_closer_to_the_tv_set\n"),
                      ("ptb.char.test.txt", b"no_it_was_n't_black_monday\n")):
    with open(os.path.join(PTB_DIR, name), "rb") as f:
      raw = f.read()
    stream = corpora.read_ptb_char(raw)
    lines = [l for l in raw.decode().splitlines() if l.strip()]
    assert stream.count(b"\n") == len(lines)
    assert len(stream) == sum(len(l.split()) for l in lines) + len(lines)
    symbols = set(stream)
    assert 45 <= len(symbols) <= 51 and ord("_") in symbols and ord(" ") not in symbols
    assert stream.startswith(start)
  vocab = data.Vocabulary.from_bytes(np.frombuffer(stream, np.uint8))
  labels = corpora.separator_labels(np.frombuffer(stream, np.uint8), corpora.WORD_SEPARATORS["ptb"])
  assert labels["word"].sum() == stream.count(b"_") + stream.count(b"\n")
  assert vocab.decode(vocab.encode(np.frombuffer(stream[:40], np.uint8))) == stream[:40].decode()


def test_ptb_study_corpus_trains_on_the_test_file_and_halves_the_valid_file(tmp_path):
  """The small-scale study's corpus from the real files: every line once, in order."""
  corpus = corpora.load_corpus("ptb_study", data_dir=str(tmp_path / "tfds"), manual_dir=PTB_DIR)
  texts = {}
  for name in ("ptb.char.test.txt", "ptb.char.valid.txt"):
    with open(os.path.join(PTB_DIR, name), "rb") as f:
      texts[name] = corpora.read_ptb_char(f.read())
  decoded = {s: corpus.vocab.decode(ids).encode() for s, ids in corpus.splits.items()}
  assert decoded["train"] == texts["ptb.char.test.txt"]
  assert decoded["validation"] + decoded["test"] == texts["ptb.char.valid.txt"]
  lines = texts["ptb.char.valid.txt"].count(b"\n")
  assert decoded["validation"].count(b"\n") == lines // 2
  assert corpus.labels["test"]["word"].sum() == decoded["test"].count(b"_") + decoded["test"].count(b"\n")
  with pytest.raises(FileNotFoundError, match="ptb.char.test.txt, ptb.char.valid.txt not in"):
    corpora.load_corpus("ptb_study", data_dir=str(tmp_path / "tfds2"), manual_dir=str(tmp_path))


def test_a_non_ascii_file_is_an_error_that_names_it(tmp_path):
  """Issue 20, item 4: was "'ascii' codec can't decode byte 0xc3 in position 8", no file."""
  manual = tmp_path / "study"
  manual.mkdir()
  (manual / "ptb.char.test.txt").write_bytes("a _ c a t\n t h é\n".encode("utf-8"))
  (manual / "ptb.char.valid.txt").write_bytes(b"a _ d o g\n")
  with pytest.raises(ValueError, match=r"ptb.char.test.txt is not ASCII text \(byte 0xc3 at "
                                       r"offset 15\).*check that this is the right file"):
    corpora.load_corpus("ptb_study", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  archive = tmp_path / "archive"
  _ptb_archive(archive, {"train": "a _ c a t\n", "valid": "t h é\n", "test": "a _ b\n"})
  with pytest.raises(ValueError, match=r"simple-examples.tgz: ptb.char.valid.txt is not ASCII"):
    corpora.load_corpus("ptb", data_dir=str(tmp_path / "tfds2"), manual_dir=str(archive))



def test_a_wrong_archive_is_not_cached_and_the_right_one_then_prepares(tmp_path):
  """Issue 20, item 1: a readable archive whose training file lacks symbols of the other
  splits was prepared and cached, and every later run on that data_dir failed, even with the
  right archive in place."""
  manual, data_dir = tmp_path / "manual", str(tmp_path / "tfds")
  _ptb_archive(manual, {"train": "a _ b\n", "valid": "c _ a\n", "test": "a _ b\n"})
  with pytest.raises(ValueError, match=r"the validation split has symbols \[b'c'\] that the "
                                       r"train split does not have.*nothing was prepared"):
    corpora.load_corpus("ptb", data_dir=data_dir, manual_dir=str(manual))
  (manual / "simple-examples.tgz").unlink()
  manual.rmdir()
  _ptb_archive(manual, {"train": "a _ c a b\n", "valid": "c _ a\n", "test": "a _ b\n"})
  corpus = corpora.load_corpus("ptb", data_dir=data_dir, manual_dir=str(manual))
  assert corpus.vocab.decode(corpus.splits["validation"][:4]) == "c_a\n"
