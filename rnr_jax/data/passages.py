"""DPR-style passages: documents cut into consecutive chunks of 100 whitespace-separated words.

Passage ids are the running index in corpus order. A table is ``passages.jsonl`` plus column ``.npy`` arrays;
:meth:`PassageTable.open` reads it lazily through a memory map."""

from __future__ import annotations

import array
import json
import mmap
import os
from collections.abc import Iterable, Sequence

import numpy as np

from rnr_jax.data.readers import Document, Question
from rnr_jax.io import atomic_file
from rnr_jax.metrics import AnswerMatcher

DEFAULT_WORDS_PER_PASSAGE = 100
COLUMNS = {"offsets": "q", "doc_ids": "q", "chunks": "i"}  # passages.<column>.npy, as array typecodes


def split_words(text: str, words_per_passage: int = DEFAULT_WORDS_PER_PASSAGE) -> list[str]:
  """``text`` as chunks of ``words_per_passage`` words, the last one shorter."""
  if words_per_passage < 1:
    raise ValueError(f"words_per_passage must be >= 1, got {words_per_passage}")
  words = text.split()
  if not words:
    return [""]  # every document keeps a passage: its title makes it retrievable
  return [" ".join(words[i:i + words_per_passage]) for i in range(0, len(words), words_per_passage)]


class _JsonlColumn(Sequence):
  """Field ``key`` of each line of a jsonl file, read on access through a memory map."""

  def __init__(self, path: str, offsets: np.ndarray, key: str):
    with open(path, "rb") as f:
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if offsets[-1] else b""
    self._offsets, self._key = offsets, key

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, i: int) -> str:
    if not -len(self) <= i < len(self):
      raise IndexError(f"passage {i} out of range for {len(self)} passages")
    i %= len(self)
    return json.loads(self._map[self._offsets[i]:self._offsets[i + 1]])[self._key]


class PassageTable:
  """Passages in columns (``doc_ids`` int64, ``chunks`` int32, ``titles``, ``texts``); row ``pid`` is passage pid."""

  FILE = "passages.jsonl"

  def __init__(self, doc_ids: Sequence[int], chunks: Sequence[int], titles: Sequence[str], texts: Sequence[str]):
    if not len(doc_ids) == len(chunks) == len(titles) == len(texts):
      raise ValueError("doc_ids, chunks, titles and texts must have one entry per passage")
    self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
    self.chunks = np.asarray(chunks, dtype=np.int32)
    self.titles, self.texts = titles, texts
    self._runs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

  def __len__(self) -> int:
    return len(self.texts)

  def passages_of(self, doc_id: int) -> range:
    """The pids of document ``doc_id`` (consecutive); KeyError if it has none."""
    if self._runs is None:
      starts = np.flatnonzero(np.r_[True, self.doc_ids[1:] != self.doc_ids[:-1]]) if len(self) else np.zeros(0, int)
      order = np.argsort(self.doc_ids[starts], kind="stable")
      docs = self.doc_ids[starts][order]
      if (twice := np.flatnonzero(docs[1:] == docs[:-1])).size:
        d = int(docs[twice[0]])
        raise ValueError(f"document {d} appears twice in the passage table (rows {starts[order[twice[0]]]} and "
                         f"{starts[order[twice[0] + 1]]})")
      self._runs = docs, starts[order], np.r_[starts, len(self)][1:][order]
    docs, first, stop = self._runs
    i = int(np.searchsorted(docs, doc_id))
    if i == len(docs) or docs[i] != doc_id:
      raise KeyError(doc_id)
    return range(int(first[i]), int(stop[i]))

  def matcher(self) -> AnswerMatcher:
    """An :class:`AnswerMatcher` over these passages' texts (DPR ``has_answer``)."""
    return AnswerMatcher(self.texts.__getitem__)

  @classmethod
  def open(cls, path: str | os.PathLike) -> PassageTable:
    """The table written to ``path`` by :class:`PassageWriter`: columns memory-mapped, titles and texts lazy."""
    path = os.fspath(path)
    try:
      cols = {c: np.load(f"{path[:-len('.jsonl')]}.{c}.npy", mmap_mode="r") for c in COLUMNS}
    except FileNotFoundError:  # a table written without its column files: one pass over the lines
      with open(path, "rb") as f:
        lines = [(len(line), json.loads(line)) for line in f]
      cols = {"offsets": np.cumsum([0] + [n for n, _ in lines]), "doc_ids": [r["doc_id"] for _, r in lines],
              "chunks": [r["chunk"] for _, r in lines]}
    return cls(cols["doc_ids"], cols["chunks"], _JsonlColumn(path, cols["offsets"], "title"),
               _JsonlColumn(path, cols["offsets"], "text"))


class PassageWriter:
  """Writes a passage table line by line (``passages.jsonl`` and its column files), atomically on close."""

  def __init__(self, path: str | os.PathLike, words_per_passage: int = DEFAULT_WORDS_PER_PASSAGE):
    self.path, self.words_per_passage = os.fspath(path), words_per_passage
    self._file = atomic_file(self.path)
    self._f = self._file.__enter__()
    self._cols = {c: array.array(code) for c, code in COLUMNS.items()}  # 4-8 bytes per passage, not a Python int
    self._cols["offsets"].append(0)

  def __len__(self) -> int:
    return len(self._cols["doc_ids"])

  def add(self, doc_id: int, chunk: int, title: str, text: str) -> None:
    line = json.dumps({"pid": len(self), "doc_id": doc_id, "chunk": chunk, "title": title, "text": text},
                      ensure_ascii=False).encode() + b"\n"
    self._f.write(line)
    for name, value in (("offsets", self._cols["offsets"][-1] + len(line)), ("doc_ids", doc_id), ("chunks", chunk)):
      self._cols[name].append(value)

  def add_document(self, doc: Document) -> list[str]:
    """Adds the passages of ``doc``; returns their texts."""
    pieces = split_words(doc.text, self.words_per_passage)
    for chunk, piece in enumerate(pieces):
      self.add(doc.id, chunk, doc.title, piece)
    return pieces

  def __enter__(self) -> PassageWriter:
    return self

  def __exit__(self, *exc: object) -> None:
    self._file.__exit__(*exc)
    if exc[0] is None:
      from rnr_jax.data.token_corpus import save_npy  # pylint: disable=import-outside-toplevel  (import cycle)

      for name, values in self._cols.items():
        save_npy(f"{self.path[:-len('.jsonl')]}.{name}.npy", np.frombuffer(values, values.typecode))


def split_documents(docs: Iterable[Document], words_per_passage: int = DEFAULT_WORDS_PER_PASSAGE) -> PassageTable:
  """The passages of ``docs`` in order, in memory (document ids must be unique)."""
  doc_ids, chunks, titles, texts = [], [], [], []
  for doc in docs:
    pieces = split_words(doc.text, words_per_passage)
    doc_ids += [doc.id] * len(pieces)
    chunks += range(len(pieces))
    titles += [doc.title] * len(pieces)
    texts += pieces
  return PassageTable(doc_ids, chunks, titles, texts)


def gold_passages(table: PassageTable, question: Question, matcher: AnswerMatcher) -> list[int]:
  """Passages of the question's gold document that contain an answer, in order; KeyError if it is not in ``table``."""
  if question.gold_pid is None:
    return []
  pids = table.passages_of(question.gold_pid)
  flags = matcher.flags(question.answers, np.arange(pids.start, pids.stop))
  return [pids.start + int(i) for i in np.flatnonzero(flags)]
