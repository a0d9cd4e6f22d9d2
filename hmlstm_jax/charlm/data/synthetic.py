"""A seeded synthetic corpus with a known two-level hierarchy, for the demo and the tests.

A lexicon of words (random letter strings) is split into word classes; a small grammar of
phrase templates (sequences of classes) generates phrases. Words are separated by a space and
phrases by a separator character, so the text has words inside phrases, and the generator
knows where every word and every phrase ends: the positions against which the HM-LSTM's
boundaries z^1, z^2 are scored (precision, recall, F1).
"""
from __future__ import annotations

import dataclasses
import string

import numpy as np

from hmlstm_jax.charlm.data.corpus import Corpus
from hmlstm_jax.charlm.data.corpus import Vocabulary

WORD_SEPARATOR = " "
PHRASE_SEPARATOR = "."


@dataclasses.dataclass(frozen=True)
class Grammar:
  """The lexicon and phrase templates drawn from one seed."""
  classes: tuple[tuple[str, ...], ...]   # words of each class
  templates: tuple[tuple[int, ...], ...]  # phrase templates: class indices


@dataclasses.dataclass(frozen=True)
class LabelledText:
  """A text and, per character, whether it ends a word / a phrase.

  ``word_ends[i]`` is True where character i is a separator (space or phrase separator):
  the step at which the segment of the word just read is complete. ``phrase_ends[i]`` is True
  on the phrase separator.
  """
  text: str
  word_ends: np.ndarray    # (len(text),) bool
  phrase_ends: np.ndarray  # (len(text),) bool


def make_grammar(seed: int, num_classes: int = 6, words_per_class: int = 8,
                 num_templates: int = 6, min_word: int = 2, max_word: int = 6) -> Grammar:
  """Draws the lexicon (distinct lowercase words) and the phrase templates from ``seed``."""
  rng = np.random.default_rng(seed)
  letters = np.array(list(string.ascii_lowercase))
  seen: set[str] = set()
  classes = []
  for _ in range(num_classes):
    words = []
    while len(words) < words_per_class:
      word = "".join(rng.choice(letters, rng.integers(min_word, max_word + 1)))
      if word not in seen:
        seen.add(word)
        words.append(word)
    classes.append(tuple(words))
  templates = tuple(tuple(int(c) for c in rng.integers(0, num_classes, rng.integers(2, 5)))
                    for _ in range(num_templates))
  return Grammar(classes=tuple(classes), templates=templates)


def generate(grammar: Grammar, num_chars: int, seed: int) -> LabelledText:
  """At least ``num_chars`` characters of phrases drawn from ``grammar``, cut to length."""
  rng = np.random.default_rng(seed)
  pieces: list[str] = []
  length = 0
  while length < num_chars:
    template = grammar.templates[rng.integers(len(grammar.templates))]
    words = [grammar.classes[c][rng.integers(len(grammar.classes[c]))] for c in template]
    phrase = WORD_SEPARATOR.join(words) + PHRASE_SEPARATOR
    pieces.append(phrase)
    length += len(phrase)
  text = "".join(pieces)[:num_chars]
  chars = np.frombuffer(text.encode("ascii"), np.uint8)
  phrase_ends = chars == ord(PHRASE_SEPARATOR)
  word_ends = phrase_ends | (chars == ord(WORD_SEPARATOR))
  return LabelledText(text=text, word_ends=word_ends, phrase_ends=phrase_ends)


def make_splits(seed: int, train_chars: int, valid_chars: int,
                test_chars: int) -> dict[str, LabelledText]:
  """Train / validation / test texts from one grammar and three independent streams."""
  grammar = make_grammar(seed)
  sizes = {"train": train_chars, "validation": valid_chars, "test": test_chars}
  return {name: generate(grammar, n, seed=seed * 1000 + i + 1) for i, (name, n) in enumerate(sizes.items())}


def synthetic_corpus(seed: int = 0, train_chars: int = 200_000, valid_chars: int = 20_000,
                     test_chars: int = 20_000) -> Corpus:
  """The synthetic splits as a :class:`Corpus`, labelled with word and phrase ends."""
  splits = make_splits(seed, train_chars, valid_chars, test_chars)
  raw = {name: np.frombuffer(s.text.encode("ascii"), np.uint8) for name, s in splits.items()}
  vocab = Vocabulary.from_bytes(np.concatenate(list(raw.values())))
  return Corpus(
      name="synthetic", vocab=vocab,
      splits={name: vocab.encode(b) for name, b in raw.items()},
      labels={name: {"word": s.word_ends, "phrase": s.phrase_ends} for name, s in splits.items()})
