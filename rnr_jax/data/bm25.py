"""BM25 over passages (``title + " " + text``) with ``bm25s``, saved and reloaded.

Text is tokenised by bm25s' regex tokenizer with its English stopwords and, when PyStemmer is installed, the Snowball
English stemmer. The stemmer is saved with the index, so queries are tokenised like the corpus.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence

import bm25s
import numpy as np

from rnr_jax.io import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)

STOPWORDS = "en"
SETTINGS_FILE = "rnr_bm25.json"


def resolve_stemmer(stemmer: str | None) -> str | None:
  """A Snowball language or None for ``stemmer``: ``"auto"`` is ``"english"`` with PyStemmer, ``"none"`` None."""
  if stemmer == "auto":
    try:
      import Stemmer  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      logger.warning("PyStemmer is not installed: BM25 runs without stemming (pip install PyStemmer for it)")
      return None
    return "english"
  return None if stemmer in ("", "none") else stemmer


def _stem_fn(stemmer: str | None) -> Callable[[list[str]], list[str]] | None:
  if stemmer is None:
    return None
  try:
    import Stemmer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"BM25 stemmer {stemmer!r} needs PyStemmer: pip install PyStemmer") from e
  return Stemmer.Stemmer(stemmer).stemWords


class BM25Index:
  """A bm25s index over passage ids ``0 .. n-1``."""

  def __init__(self, retriever: bm25s.BM25, stemmer: str | None):
    self.retriever = retriever
    self.stemmer = stemmer
    self._stem = _stem_fn(stemmer)

  @property
  def num_passages(self) -> int:
    return int(self.retriever.scores["num_docs"])

  def __len__(self) -> int:
    return self.num_passages

  @classmethod
  def build(cls, titles: Sequence[str], texts: Sequence[str], *, stemmer: str | None = "auto", k1: float = 1.5,
            b: float = 0.75) -> "BM25Index":
    """Indexes passages (``title + " " + text``); ``stemmer`` as in :func:`resolve_stemmer`."""
    if len(titles) != len(texts):
      raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    if not texts:
      raise ValueError("cannot build a BM25 index over no passages")
    stemmer = resolve_stemmer(stemmer)
    tokens = bm25s.tokenize([f"{t} {x}" for t, x in zip(titles, texts)], stopwords=STOPWORDS,
                            stemmer=_stem_fn(stemmer), show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(tokens, show_progress=False)
    return cls(retriever, stemmer)

  def search(self, queries: Sequence[str], k: int, *, n_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(pids int32[n, k], scores float32[n, k])``: each query's top-``k`` passages (``k`` capped), best first."""
    k = min(int(k), self.num_passages)
    if not queries:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    tokens = bm25s.tokenize(list(queries), stopwords=STOPWORDS, stemmer=self._stem, return_ids=False,
                            show_progress=False)
    threads = (os.cpu_count() or 1) if n_threads is None else n_threads
    docs, scores = self.retriever.retrieve(tokens, k=k, n_threads=threads, show_progress=False,
                                           backend_selection="numpy")
    return np.asarray(docs, np.int32), np.asarray(scores, np.float32)

  def save(self, path: str | os.PathLike) -> None:
    """Saves the index (bm25s files plus our settings) into directory ``path``, atomically."""
    with atomic_dir(path) as tmp:
      self.retriever.save(tmp, show_progress=False)
      atomic_write_json(os.path.join(tmp, SETTINGS_FILE), {"stemmer": self.stemmer, "stopwords": STOPWORDS})

  @classmethod
  def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> "BM25Index":
    """Loads an index written by :meth:`save` (``mmap`` memory-maps the score matrix)."""
    path = os.fspath(path)
    settings_path = os.path.join(path, SETTINGS_FILE)
    if not os.path.exists(settings_path):
      raise FileNotFoundError(f"{path}: not a saved BM25 index (no {SETTINGS_FILE})")
    with open(settings_path, encoding="utf-8") as f:
      settings = json.load(f)
    return cls(bm25s.BM25.load(path, mmap=mmap, show_progress=False), settings["stemmer"])
