"""A corpus ready for training: symbol ids per split, the vocabulary, boundary labels."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Symbol ↔ id. ``symbols`` are byte values, sorted; id i is ``symbols[i]``."""
  symbols: tuple[int, ...]

  @classmethod
  def from_bytes(cls, data: np.ndarray) -> "Vocabulary":
    return cls(tuple(int(b) for b in np.unique(np.asarray(data, np.uint8))))

  @property
  def size(self) -> int:
    return len(self.symbols)

  def encode(self, data: np.ndarray, what: str = "text") -> np.ndarray:
    """Bytes → int32 ids; a byte outside the vocabulary is an error naming it."""
    table = np.full(256, -1, np.int32)
    table[list(self.symbols)] = np.arange(self.size, dtype=np.int32)
    ids = table[np.asarray(data, np.uint8)]
    if (ids < 0).any():
      bad = sorted({bytes([b]) for b in np.asarray(data, np.uint8)[ids < 0][:100]})
      raise ValueError(f"{what} has symbols {bad} that the training split does not have")
    return ids

  def decode(self, ids) -> str:
    return bytes(self.symbols[int(i)] for i in np.asarray(ids).reshape(-1)).decode("latin-1")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A corpus ready for training: per split the ids, and per split boundary labels."""
  name: str
  vocab: Vocabulary
  splits: dict[str, np.ndarray]                 # split → (N,) int32 ids
  labels: dict[str, dict[str, np.ndarray]]      # split → {'word': (N,) bool, ...}


def separator_labels(data: np.ndarray, separators: bytes) -> dict[str, np.ndarray]:
  """{'word': True on each separator byte}: where a finished word is expected to be marked."""
  return {"word": np.isin(np.asarray(data, np.uint8), np.frombuffer(separators, np.uint8))}
