"""BM25 over passages (``title + " " + text``) with ``bm25s``, saved and reloaded; queries are tokenised like the
corpus (bm25s' regex tokenizer, English stopwords, the saved Snowball stemmer when PyStemmer is installed)."""

from __future__ import annotations

import array
import itertools
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import bm25s
import numpy as np

from rnr_jax.io import atomic_dir, atomic_write_json, read_json

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


def _stemmer(stemmer: str | None) -> Any:
  """PyStemmer's stemmer of language ``stemmer`` (None: none), as bm25s' tokenizers take it."""
  if stemmer is None:
    return None
  try:
    import Stemmer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"BM25 stemmer {stemmer!r} needs PyStemmer: pip install PyStemmer") from e
  return Stemmer.Stemmer(stemmer)


class BM25Builder:
  """A :class:`BM25Index` from passages given chunk by chunk, their token ids spooled to a file, not held in memory."""

  def __init__(self, workdir: str, *, stemmer: str | None = "auto", k1: float = 1.5, b: float = 0.75):
    self.stemmer = resolve_stemmer(stemmer)
    self._tokenizer = bm25s.tokenization.Tokenizer(stopwords=STOPWORDS, stemmer=_stemmer(self.stemmer))
    self._k1, self._b = k1, b
    self._ids = open(os.path.join(workdir, "bm25_ids.raw"), "wb")  # pylint: disable=consider-using-with
    self._offsets = array.array("q", [0])

  def add(self, titles: Sequence[str], texts: Sequence[str]) -> None:
    """Tokenises the next passages (``title + " " + text``)."""
    docs = self._tokenizer.tokenize([f"{t} {x}" for t, x in zip(titles, texts, strict=True)], update_vocab=True,
                                    return_as="ids", show_progress=False)
    np.fromiter(itertools.chain.from_iterable(docs), np.int32).tofile(self._ids)
    self._offsets.frombytes((np.cumsum([len(d) for d in docs]) + self._offsets[-1]).astype(np.int64).tobytes())

  def build(self) -> "BM25Index":
    self._ids.close()
    if len(self._offsets) == 1:
      raise ValueError("cannot build a BM25 index over no passages")
    ids = np.memmap(self._ids.name, np.int32, "r") if self._offsets[-1] else np.zeros(0, np.int32)
    # scipy's CSC construction needs about half the memory of bm25s' numpy one; a runtime install has no scipy.
    retriever = bm25s.BM25(k1=self._k1, b=self._b, csc_backend="scipy" if _has_scipy() else "numpy")
    retriever.index(bm25s.tokenization.Tokenized(_RaggedIds(ids, np.frombuffer(self._offsets, np.int64)),
                                                 self._tokenizer.get_vocab_dict()), show_progress=False)
    os.remove(self._ids.name)
    return BM25Index(retriever, self.stemmer)


def _has_scipy() -> bool:
  try:
    import scipy.sparse  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


class _RaggedIds:
  """Each passage's token ids as a list, read back from the files one block at a time (bm25s iterates them thrice)."""

  def __init__(self, values: np.ndarray, offsets: np.ndarray):
    self._values, self._offsets = values, offsets

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __iter__(self) -> Iterator[list[int]]:
    for first in range(0, len(self), 1 << 16):
      ends = self._offsets[first:first + (1 << 16) + 1]
      flat = np.asarray(self._values[ends[0]:ends[-1]]).tolist()
      bounds = (ends - ends[0]).tolist()
      yield from (flat[a:z] for a, z in zip(bounds[:-1], bounds[1:]))


class BM25Index:
  """A bm25s index over passage ids ``0 .. n-1``."""

  def __init__(self, retriever: bm25s.BM25, stemmer: str | None):
    self.retriever = retriever
    self.stemmer = stemmer
    self._stem = _stemmer(stemmer)

  @property
  def num_passages(self) -> int:
    return int(self.retriever.scores["num_docs"])

  def __len__(self) -> int:
    return self.num_passages

  @classmethod
  def build(cls, titles: Sequence[str], texts: Sequence[str], *, stemmer: str | None = "auto", k1: float = 1.5,
            b: float = 0.75) -> "BM25Index":
    """Indexes passages (``title + " " + text``) in memory; ``stemmer`` as in :func:`resolve_stemmer`."""
    if len(titles) != len(texts):
      raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    with tempfile.TemporaryDirectory(prefix="rnr_bm25_") as tmp:
      builder = BM25Builder(tmp, stemmer=stemmer, k1=k1, b=b)
      builder.add(titles, texts)
      return builder.build()

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
    return cls(bm25s.BM25.load(path, mmap=mmap, show_progress=False), read_json(settings_path)["stemmer"])
