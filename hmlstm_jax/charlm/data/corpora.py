"""Text8, enwik8 and Penn Treebank (characters) as TFDS builders, and the loader that reads them.

Each builder downloads its canonical archive (decisions.md §4) or takes the one the user placed in
the manual directory, checks its size, and writes the paper's three splits as array_record
files (no TensorFlow needed) of consecutive chunks of the byte stream, in order
(``disable_shuffling``). :func:`load_corpus` prepares a builder if needed and returns the
splits as arrays of symbol ids with the vocabulary built from the training split.

* text8: ``text8.zip`` (100,000,000 characters): first 90M train, next 5M validation, last 5M test.
* enwik8: ``enwik8.zip`` (100,000,000 bytes): the same 90/5/5 cut of the bytes.
* ptb_char: Mikolov's ``simple-examples.tgz``, ``data/ptb.char.{train,valid,test}.txt``: one
  sentence a line, characters separated by spaces, ``_`` between words. Each line becomes its
  characters followed by ``\\n`` (end of sentence), giving the ~50 symbols of the paper.
"""
from __future__ import annotations

import os
import socket
import tarfile
import urllib.parse
import zipfile

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from hmlstm_jax.charlm.data.corpus import Corpus
from hmlstm_jax.charlm.data.corpus import Vocabulary
from hmlstm_jax.charlm.data.corpus import separator_labels
from hmlstm_jax.tfds_util import SPLITS
from hmlstm_jax.tfds_util import manual_dir_of
from hmlstm_jax.tfds_util import ordered_examples
from hmlstm_jax.tfds_util import ordered_info
from hmlstm_jax.tfds_util import prepared
from hmlstm_jax.tfds_util import sha256_of

CHUNK_BYTES = 1 << 20


class CorpusBuilder(tfds.core.GeneratorBasedBuilder):
  """A character corpus stored as ordered byte chunks; subclasses say where the bytes come from."""
  VERSION = tfds.core.Version("1.0.0")
  URL: str = ""
  ARCHIVE: str = ""
  ARCHIVE_BYTES: int = 0  # the canonical archive's size, checked after download
  HOMEPAGE: str = ""
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Download the archive named in the error message into the manual directory."
  VOCABULARY_SPLITS: tuple[str, ...] = ("train",)  # the splits whose symbols make the vocabulary

  def _info(self) -> tfds.core.DatasetInfo:
    return ordered_info(self, {"chunk": tfds.features.Tensor(shape=(None,), dtype=np.uint8)},
                        self.HOMEPAGE)

  def _archive_path(self, dl_manager) -> str:
    """The archive in the manual directory, else downloaded from ``URL``; clear error otherwise."""
    manual = manual_dir_of(dl_manager)
    if os.path.exists(os.path.join(manual, self.ARCHIVE)):
      path = os.path.join(manual, self.ARCHIVE)
      logging.info("%s: using %s (sha256 %s)", self.name, path, sha256_of(path))
      return path
    try:
      _check_reachable(self.URL)  # fail in seconds, not after TFDS's ten retries with backoff
      path = os.fspath(dl_manager.download(self.URL))
    except Exception as err:  # network errors come in many types
      raise FileNotFoundError(
          f"{self.name}: {self.ARCHIVE} is not in the manual directory {manual} and downloading "
          f"{self.URL} failed ({type(err).__name__}: {err}). Download {self.URL} yourself, put "
          f"{self.ARCHIVE} in {manual}, and run again.") from err
    size = os.path.getsize(path)
    if self.ARCHIVE_BYTES and size != self.ARCHIVE_BYTES:
      raise ValueError(f"{path} has {size} bytes, the canonical {self.ARCHIVE} has "
                       f"{self.ARCHIVE_BYTES}: delete it and download again")
    logging.info("%s: downloaded %s (%d bytes, sha256 %s)", self.name, path, size, sha256_of(path))
    return path

  def read_splits(self, archive: str) -> dict[str, bytes]:
    """The three splits' bytes from the archive (subclasses)."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    archive = self._archive_path(dl_manager)
    try:
      data = self.read_splits(archive)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
      raise ValueError(f"{archive} is not a readable {self.ARCHIVE} ({type(err).__name__}: "
                       f"{err}); delete it and download it again") from None
    empty = [split for split in SPLITS if not data[split]]
    if empty:
      raise ValueError(f"{archive}: the {', '.join(empty)} split(s) are empty; the archive is "
                       f"not the canonical {self.ARCHIVE}: delete it and download it again")
    self._check_symbols(data, archive)
    return {split: self._generate_examples(data[split]) for split in SPLITS}

  def _check_symbols(self, data: dict[str, bytes], source: str) -> None:
    """Every split's symbols are in the vocabulary splits': checked before TFDS writes
    anything, so that a wrong archive is never prepared and cached in ``--data_dir``."""
    present = {s: np.bincount(np.frombuffer(data[s], np.uint8), minlength=256) > 0 for s in SPLITS}
    vocab = np.any([present[s] for s in self.VOCABULARY_SPLITS], axis=0)
    for split in SPLITS:
      foreign = np.flatnonzero(present[split] & ~vocab)
      if foreign.size:
        raise ValueError(
            f"{source}: the {split} split has symbols {[bytes([b]) for b in foreign[:10]]} that "
            f"the {'/'.join(self.VOCABULARY_SPLITS)} split does not have, so it is not the "
            f"canonical data: replace it and run again (nothing was prepared)")

  def _generate_examples(self, data: bytes):
    for i, start in enumerate(range(0, len(data), CHUNK_BYTES)):
      yield i, {"index": i, "chunk": np.frombuffer(data[start:start + CHUNK_BYTES], np.uint8)}


def _check_reachable(url: str, timeout: float = 10.0) -> None:
  """Opens (and closes) a TCP connection to the URL's host; raises OSError if it cannot."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  socket.create_connection((parts.hostname, port), timeout=timeout).close()


def _cut_90_5_5(data: bytes) -> dict[str, bytes]:
  n = len(data)
  a, b = n * 90 // 100, n * 95 // 100
  return {"train": data[:a], "validation": data[a:b], "test": data[b:]}


#: How much larger than the canonical file an archive's member may unpack to before it is
#: refused unread: a crafted archive (2 GB of zeros pack into 2.4 MB) must not exhaust memory,
#: since a member is read whole and processed at several times its size.
MAX_GROWTH = 1.5


def check_member_size(archive: str, member: str, size: int, canonical: int) -> None:
  """ValueError when ``member`` unpacks to more than ``MAX_GROWTH`` × ``canonical`` bytes."""
  if size > MAX_GROWTH * canonical:
    raise ValueError(
        f"{archive}: {member} unpacks to {size:,} bytes, more than {MAX_GROWTH}x the canonical "
        f"file's {canonical:,}: it is not the canonical data (nothing was read); replace the "
        "archive and run again")


def _read_zip_member(archive: str, member: str, canonical: int) -> bytes:
  with zipfile.ZipFile(archive) as z:
    if member not in z.namelist():
      raise ValueError(f"{archive} has no member {member!r} (it has {z.namelist()[:5]})")
    check_member_size(archive, member, z.getinfo(member).file_size, canonical)
    return z.read(member)


class ZipCorpus(CorpusBuilder):
  """A corpus that is one file ``MEMBER`` in a zip archive, cut 90 / 5 / 5 in order."""
  MEMBER: str = ""
  MEMBER_BYTES = 100_000_000  # text8 and enwik8 are both the first 10^8 bytes of a dump

  def read_splits(self, archive):
    return _cut_90_5_5(_read_zip_member(archive, self.MEMBER, self.MEMBER_BYTES))


class Text8(ZipCorpus):
  """text8: the first 10^8 characters of a cleaned English Wikipedia dump (27 symbols)."""
  URL = "http://mattmahoney.net/dc/text8.zip"
  ARCHIVE = "text8.zip"
  ARCHIVE_BYTES = 31_344_016
  HOMEPAGE = "http://mattmahoney.net/dc/textdata.html"
  MEMBER = "text8"


class Enwik8(ZipCorpus):
  """enwik8 (Hutter Prize): the first 10^8 bytes of an English Wikipedia XML dump."""
  URL = "http://mattmahoney.net/dc/enwik8.zip"
  ARCHIVE = "enwik8.zip"
  ARCHIVE_BYTES = 36_445_475
  HOMEPAGE = "http://prize.hutter1.net/"
  MEMBER = "enwik8"


def read_ptb_char(text: bytes | str, source: str = "the text") -> bytes:
  """Mikolov's ptb.char format → a byte stream: each line's characters, then ``\\n``.
  ``source`` names the file in the error a non-ASCII byte raises."""
  if isinstance(text, bytes):
    text = ascii_text(text, source)
  return "".join("".join(line.split()) + "\n" for line in text.splitlines() if line.strip()).encode("ascii")


def ascii_text(raw: bytes, source: str) -> str:
  """``raw`` decoded as ASCII (Mikolov's PTB files are), or a ValueError naming ``source``,
  the first offending byte and its offset."""
  try:
    return raw.decode("ascii")
  except UnicodeDecodeError as err:
    raise ValueError(f"{source} is not ASCII text (byte {raw[err.start]:#04x} at offset "
                     f"{err.start}): Mikolov's ptb.char files are; check that this is the "
                     "right file") from None


class PtbChar(CorpusBuilder):
  """Penn Treebank, Mikolov's character-level version (~50 symbols, ``_`` between words)."""
  URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
  ARCHIVE = "simple-examples.tgz"
  ARCHIVE_BYTES = 34_869_662
  HOMEPAGE = "http://www.fit.vutbr.cz/~imikolov/rnnlm/"
  FILES = {"train": "ptb.char.train.txt", "validation": "ptb.char.valid.txt", "test": "ptb.char.test.txt"}
  FILE_BYTES = {"ptb.char.train.txt": 10_034_964, "ptb.char.valid.txt": 786_084,
                "ptb.char.test.txt": 884_846}  # Mikolov's (../shared/data/ptb_char/README.md)

  def read_splits(self, archive):
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
      members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
      for split, name in self.FILES.items():
        if name not in members:
          raise ValueError(f"{archive} has no data/{name}")
        check_member_size(archive, name, members[name].size, self.FILE_BYTES[name])
        out[split] = read_ptb_char(tar.extractfile(members[name]).read(), f"{archive}: {name}")
    return out


class PtbCharStudy(CorpusBuilder):
  """Penn Treebank characters without the training file: the small-scale study's corpus.

  Reads Mikolov's ``ptb.char.test.txt`` and ``ptb.char.valid.txt`` (as they stand in
  ``simple-examples.tgz``; this repository's tests and study use the copies in
  ``../shared/data/ptb_char``) from the manual directory: trains on the test file, validates
  on the first half of the valid file's lines and tests on the second half. For studies that
  cannot have the 5 MB training file; its numbers are not the paper's PTB numbers.
  """
  HOMEPAGE = PtbChar.HOMEPAGE
  FILES = ("ptb.char.test.txt", "ptb.char.valid.txt")
  VOCABULARY_SPLITS = SPLITS  # the valid file has '*' and '4', the test file has not

  def _split_generators(self, dl_manager):
    manual = manual_dir_of(dl_manager)
    missing = [f for f in self.FILES if not os.path.isfile(os.path.join(manual, f))]
    if missing:
      raise FileNotFoundError(
          f"{self.name}: {', '.join(missing)} not in the manual directory {manual}; pass "
          "--manual_dir=DIR with Mikolov's ptb.char.test.txt and ptb.char.valid.txt (this "
          "repository's are in ../shared/data/ptb_char)")
    texts = {}
    for name in self.FILES:
      path = os.path.join(manual, name)
      check_member_size(manual, name, os.path.getsize(path), PtbChar.FILE_BYTES[name])
      logging.info("%s: using %s (sha256 %s)", self.name, path, sha256_of(path))
      with open(path, "rb") as f:
        texts[name] = [line for line in ascii_text(f.read(), path).splitlines() if line.strip()]
    valid = texts["ptb.char.valid.txt"]
    halves = {"validation": valid[:len(valid) // 2], "test": valid[len(valid) // 2:]}
    data = {"train": read_ptb_char("\n".join(texts["ptb.char.test.txt"])),
            **{split: read_ptb_char("\n".join(lines)) for split, lines in halves.items()}}
    self._check_symbols(data, manual)
    return {split: self._generate_examples(data[split]) for split in SPLITS}


BUILDERS = {"text8": Text8, "enwik8": Enwik8, "ptb": PtbChar, "ptb_study": PtbCharStudy}

# Characters that end a word (and so where a first-layer boundary is expected) per corpus.
WORD_SEPARATORS = {"text8": b" ", "enwik8": b" \n", "ptb": b"_\n", "ptb_study": b"_\n"}


def read_split_bytes(builder: tfds.core.DatasetBuilder, split: str) -> np.ndarray:
  """The split's bytes, chunks in order, from the prepared array_record files."""
  return np.concatenate([np.asarray(ex["chunk"], np.uint8) for ex in ordered_examples(builder, split)])


def load_corpus(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> Corpus:
  """Prepares (once) and loads ``name`` ∈ {'text8', 'enwik8', 'ptb', 'ptb_study'}.

  Args:
    name: the corpus.
    data_dir: TFDS data directory (default ``~/tensorflow_datasets``).
    manual_dir: where a pre-downloaded archive is looked for (default
      ``<data_dir>/downloads/manual``).
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown corpus {name!r}; choose from {sorted(BUILDERS)}")
  builder = prepared(BUILDERS[name], data_dir, manual_dir)
  raw = {split: read_split_bytes(builder, split) for split in SPLITS}
  vocab = Vocabulary.from_bytes(np.concatenate([raw[s] for s in builder.VOCABULARY_SPLITS]))
  try:
    splits = {s: vocab.encode(b, f"the {s} split of {name}") for s, b in raw.items()}
  except ValueError as err:  # prepared by an older version from a wrong archive
    raise ValueError(f"{err}; the prepared copy in {builder.data_dir} came from a wrong "
                     "archive: delete that directory and run again to prepare it anew") from None
  return Corpus(name=name, vocab=vocab, splits=splits,
                labels={s: separator_labels(b, WORD_SEPARATORS[name]) for s, b in raw.items()})
