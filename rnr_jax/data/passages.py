"""DPR-style passages: documents cut into consecutive chunks of 100 whitespace-separated words.

Every passage keeps its document's title. Passage ids (``pid``) are the running index in corpus order, so the same
corpus and setting always give the same ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from rnr_jax.data.readers import Document, Question
from rnr_jax.io import atomic_file
from rnr_jax.metrics import AnswerMatcher

DEFAULT_WORDS_PER_PASSAGE = 100


@dataclasses.dataclass(frozen=True)
class Passage:
  """One passage: ``pid`` (row in the passage table), its document and its chunk index in the document."""

  pid: int
  doc_id: int
  chunk: int
  title: str
  text: str


def split_words(text: str, words_per_passage: int = DEFAULT_WORDS_PER_PASSAGE) -> list[str]:
  """``text`` as chunks of ``words_per_passage`` words, the last one shorter."""
  if words_per_passage < 1:
    raise ValueError(f"words_per_passage must be >= 1, got {words_per_passage}")
  words = text.split()
  if not words:
    return [""]  # every document keeps a passage: its title makes it retrievable
  return [" ".join(words[i:i + words_per_passage]) for i in range(0, len(words), words_per_passage)]


class PassageTable:
  """Passages in columns (``doc_ids`` int64, ``chunks`` int32, ``titles``, ``texts``); row ``pid`` is passage pid."""

  FILE = "passages.jsonl"

  def __init__(self, doc_ids: Sequence[int], chunks: Sequence[int], titles: Sequence[str], texts: Sequence[str]):
    if not len(doc_ids) == len(chunks) == len(titles) == len(texts):
      raise ValueError("doc_ids, chunks, titles and texts must have one entry per passage")
    self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
    self.chunks = np.asarray(chunks, dtype=np.int32)
    self.titles = list(titles)
    self.texts = list(texts)
    self._doc_ranges: dict[int, range] | None = None

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, pid: int) -> Passage:
    pid = int(pid)
    return Passage(pid, int(self.doc_ids[pid]), int(self.chunks[pid]), self.titles[pid], self.texts[pid])

  def passages_of(self, doc_id: int) -> range:
    """The pids of document ``doc_id`` (consecutive); KeyError if it has none."""
    if self._doc_ranges is None:
      ranges: dict[int, range] = {}
      if len(self):
        starts = np.flatnonzero(np.r_[True, self.doc_ids[1:] != self.doc_ids[:-1]])
        for s, e in zip(starts.tolist(), np.r_[starts[1:], len(self)].tolist()):
          d = int(self.doc_ids[s])
          if d in ranges:
            raise ValueError(f"document {d} appears twice in the passage table (rows {ranges[d].start} and {s})")
          ranges[d] = range(s, e)
      self._doc_ranges = ranges
    return self._doc_ranges[int(doc_id)]

  def matcher(self) -> AnswerMatcher:
    """An :class:`AnswerMatcher` over these passages' texts (DPR ``has_answer``)."""
    return AnswerMatcher(self.texts.__getitem__)

  def write_jsonl(self, path: str | os.PathLike) -> None:
    """Writes ``{"pid", "doc_id", "chunk", "title", "text"}`` lines, atomically."""
    with atomic_file(path) as f:
      for pid in range(len(self)):
        rec = {"pid": pid, "doc_id": int(self.doc_ids[pid]), "chunk": int(self.chunks[pid]),
               "title": self.titles[pid], "text": self.texts[pid]}
        f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")

  @classmethod
  def read_jsonl(cls, path: str | os.PathLike) -> "PassageTable":
    """Reads a file written by :meth:`write_jsonl` (pids must be 0, 1, 2, ...)."""
    columns: dict[str, list] = {"doc_id": [], "chunk": [], "title": [], "text": []}
    with open(path, encoding="utf-8") as f:
      for pid, line in enumerate(f):
        rec = json.loads(line)
        if rec["pid"] != pid:
          raise ValueError(f"{os.fspath(path)}:{pid + 1}: pid {rec['pid']} out of order (expected {pid})")
        for key, column in columns.items():
          column.append(rec[key])
    return cls(*columns.values())


def split_documents(docs: Iterable[Document], words_per_passage: int = DEFAULT_WORDS_PER_PASSAGE) -> PassageTable:
  """The passages of ``docs`` in order (document ids must be unique)."""
  doc_ids, chunks, titles, texts = [], [], [], []
  seen = set()
  for doc in docs:
    if doc.id in seen:
      raise ValueError(f"duplicate document id {doc.id}")
    seen.add(doc.id)
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
