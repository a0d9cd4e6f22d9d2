"""Data for the character-level experiments: corpora, vocabularies, truncated-BPTT batching."""
from hmlstm_jax.charlm.data.batching import Segment
from hmlstm_jax.charlm.data.batching import StreamBatcher
from hmlstm_jax.charlm.data.corpus import Corpus
from hmlstm_jax.charlm.data.corpus import Vocabulary

DATASETS = ("synthetic", "ptb", "text8", "enwik8", "ptb_study")


def load(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
         synthetic_seed: int = 0, synthetic_chars: int = 200_000) -> Corpus:
  """Loads a corpus by name: ``'synthetic'`` (generated, no download) or a TFDS corpus.

  ``synthetic_chars`` is the training split's size; validation and test get a tenth each.
  """
  if name == "synthetic":
    from hmlstm_jax.charlm.data import synthetic
    return synthetic.synthetic_corpus(synthetic_seed, synthetic_chars, synthetic_chars // 10,
                                      synthetic_chars // 10)
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
  from hmlstm_jax.charlm.data import corpora  # imports tensorflow_datasets: only when needed
  return corpora.load_corpus(name, data_dir=data_dir, manual_dir=manual_dir)


__all__ = ["Corpus", "DATASETS", "Segment", "StreamBatcher", "Vocabulary", "load"]
