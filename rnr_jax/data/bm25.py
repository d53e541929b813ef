"""BM25 over passages with ``bm25s`` (eager sparse scoring), saved and reloaded.

Passages are indexed as ``title + " " + text``. Text is tokenised by bm25s'
regex tokenizer with its English stopword list and, when PyStemmer is
installed, the Snowball English stemmer (``stemmer="auto"``). The stemmer in
use is saved with the index, so queries are always tokenised like the corpus.
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


def stemmer_available() -> bool:
  """Whether PyStemmer (the ``Stemmer`` module) can be imported."""
  try:
    import Stemmer  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def resolve_stemmer(stemmer: str | None) -> str | None:
  """The stemmer to use: ``"auto"`` is ``"english"`` with PyStemmer, else ``None``."""
  if stemmer == "auto":
    if stemmer_available():
      return "english"
    logger.warning("PyStemmer is not installed: BM25 runs without stemming (pip install PyStemmer for it)")
    return None
  if stemmer in ("", "none"):
    return None
  return stemmer


def _stem_fn(stemmer: str | None) -> Callable[[list[str]], list[str]] | None:
  if stemmer is None:
    return None
  try:
    import Stemmer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"BM25 stemmer {stemmer!r} needs PyStemmer: pip install PyStemmer") from e
  return Stemmer.Stemmer(stemmer).stemWords


class BM25Index:
  """A bm25s index over passage ids ``0 .. n-1``.

  Build with :meth:`build`, query with :meth:`search`, persist with
  :meth:`save` / :meth:`load`.
  """

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
    corpus = [f"{t} {x}" for t, x in zip(titles, texts)]
    tokens = bm25s.tokenize(corpus, stopwords=STOPWORDS, stemmer=_stem_fn(stemmer), show_progress=False)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(tokens, show_progress=False)
    return cls(retriever, stemmer)

  def tokenize_queries(self, queries: Sequence[str]) -> list[list[str]]:
    """Query tokens, tokenised like the indexed passages."""
    return bm25s.tokenize(list(queries), stopwords=STOPWORDS, stemmer=self._stem, return_ids=False,
                          show_progress=False)

  def search(self, queries: Sequence[str], k: int, *, n_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` passages of each query, best first.

    ``k`` is capped at the number of passages. Returns ``(pids int32[n, k],
    scores float32[n, k])``. A query with no indexed word scores 0 everywhere.
    """
    k = min(int(k), self.num_passages)
    if not queries:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    threads = (os.cpu_count() or 1) if n_threads is None else n_threads
    docs, scores = self.retriever.retrieve(self.tokenize_queries(queries), k=k, n_threads=threads,
                                           show_progress=False, backend_selection="numpy")
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
    retriever = bm25s.BM25.load(path, mmap=mmap, show_progress=False)
    return cls(retriever, settings["stemmer"])
