"""Readers of other projects' data files: DPR's ``psgs_w100.tsv``, retriever-training json and ``*.qa.csv``, and SQuAD
json, into the documents and questions of :mod:`rnr_jax.data.readers`, with its located errors and ``skip_bad``.

All stream: TSV row by row, JSON documents element by element (a C-decoded value at a time), gzip transparently.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import itertools
import json
import re
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

from rnr_jax.data.readers import (MAX_ID, DataFormatError, Document, PathLike, Question, ReadStats, Record, answers_of,
                                  is_int, open_data, read_records, text_problem)

T = TypeVar("T")
_NON_WS = re.compile(r"[^ \t\r\n]")  # JSON whitespace is only these four


@dataclasses.dataclass(frozen=True)
class DprContext:
  """A passage of DPR's retriever-training files."""

  passage_id: str
  title: str
  text: str
  score: float | None = None


@dataclasses.dataclass(frozen=True)
class DprExample:
  """One question of DPR's retriever-training files with its passages."""

  question: str
  answers: tuple[str, ...]
  positive_ctxs: tuple[DprContext, ...]
  negative_ctxs: tuple[DprContext, ...]
  hard_negative_ctxs: tuple[DprContext, ...]


@dataclasses.dataclass(frozen=True)
class SquadParagraph:
  """A SQuAD paragraph as a document, with the questions asked about it."""

  document: Document
  questions: tuple[Question, ...]


def _tsv_rows(path: PathLike) -> Iterator[tuple[int, list[str] | DataFormatError]]:
  """``(line, fields)`` of each non-empty row of a tab-separated file with CSV quoting, or ``(line, error)``; a quoted
  field may span lines, so a row's line is the one it starts on."""
  with open_data(path, text=True) as f:
    rows = csv.reader(f, delimiter="\t", quotechar='"')
    start = 1
    while True:
      try:
        row = next(rows)
      except StopIteration:
        return
      except csv.Error as e:
        row = DataFormatError(path, start, f"malformed TSV: {e}")
      line, start = start, rows.line_num + 1
      if row:
        yield line, row


def read_dpr_tsv(path: PathLike, *, source: str | None = "dpr", skip_bad: bool = False,
                 stats: ReadStats | None = None) -> Iterator[Document]:
  """Passages of DPR's ``psgs_w100.tsv`` (header ``id text title``, CSV-style quoting) as documents."""

  def makers() -> Iterator[Callable[[], Document]]:
    rows = _tsv_rows(path)
    _, header = next(rows, (1, None))
    if not isinstance(header, list):
      raise header or DataFormatError(path, 1, "empty file; expected the header 'id<TAB>text<TAB>title'")
    if missing := [c for c in ("id", "text", "title") if c not in header]:
      raise DataFormatError(path, 1, f"header {header!r} lacks column(s) {missing}")
    col = {name: header.index(name) for name in ("id", "text", "title")}

    def document(line: int, row: list[str] | DataFormatError) -> Document:
      if isinstance(row, DataFormatError):
        raise row
      if len(row) != len(header):
        raise DataFormatError(path, line, f"expected {len(header)} tab-separated columns, got {len(row)}")
      for name in ("title", "text"):
        if problem := text_problem(row[col[name]]):
          raise DataFormatError(path, line, problem, field=name)
      return Document(id=_int_field(path, line, "id", row[col["id"]]), title=row[col["title"]],
                      text=row[col["text"]], source=source, line=line)

    for line, row in rows:
      yield functools.partial(document, line, row)

  return read_records(path, makers(), skip_bad, stats)


def _int_field(path: PathLike, line: int, field: str, value: str) -> int:
  try:
    v = int(value)
  except ValueError:
    raise DataFormatError(path, line, f"must be an integer, got {value!r}", field=field) from None
  if not 0 <= v <= MAX_ID:
    raise DataFormatError(path, line, f"must be in [0, 2**63), got {v}", field=field)
  return v


def read_dpr_qa_csv(path: PathLike, *, skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Question]:
  """Questions of DPR's ``*.qa.csv`` (``question<TAB>['answer', ...]``, no header); ids are 0-based row indices."""

  def question(index: int, line: int, row: list[str] | DataFormatError) -> Question:
    if isinstance(row, DataFormatError):
      raise row
    if len(row) != 2:
      raise DataFormatError(path, line, f"expected 2 tab-separated columns (question, answers), got {len(row)}")
    try:
      answers = ast.literal_eval(row[1])
    except (ValueError, SyntaxError, MemoryError, RecursionError):
      raise DataFormatError(path, line, f"must be a Python list of strings, got {row[1][:80]!r}",
                            field="answers") from None
    text = row[0]
    if problem := text_problem(text) or (None if text.strip() else "must not be empty"):
      raise DataFormatError(path, line, problem, field="question")
    return Question(id=str(index), question=text, line=line,
                    answers=answers_of(answers, lambda f, p: DataFormatError(path, line, p, field=f)))

  makers = (functools.partial(question, i, line, row) for i, (line, row) in enumerate(_tsv_rows(path)))
  return read_records(path, makers, skip_bad, stats)


class _JsonStream:
  """Incremental reader of one JSON document, value by value, tracking lines; decodes with the C JSON decoder."""

  def __init__(self, f: IO[str], path: PathLike, chunk_size: int = 1 << 20):
    self._f, self._path, self._chunk = f, path, chunk_size
    self._buf, self._pos, self._eof = "", 0, False
    self._line = 1  # line of self._buf[self._pos]
    self._decoder = json.JSONDecoder()

  def _fill(self) -> bool:
    """Appends more text (at least as much as is buffered); False at end of file."""
    if self._eof:
      return False
    self._buf, self._pos = self._buf[self._pos:], 0
    more = self._f.read(max(self._chunk, len(self._buf)))
    self._buf += more
    self._eof = not more
    return not self._eof

  def _advance(self, end: int) -> None:
    self._line += self._buf.count("\n", self._pos, end)
    self._pos = end

  def peek(self) -> str:
    """The next non-whitespace character ('' at end of file), not consumed."""
    while True:
      m = _NON_WS.search(self._buf, self._pos)
      self._advance(m.start() if m else len(self._buf))
      if m:
        return self._buf[self._pos]
      if not self._fill():
        return ""

  def expect(self, chars: str, context: str) -> str:
    """Consumes and returns the next character, which must be one of ``chars``."""
    c = self.peek()
    if not c or c not in chars:
      found = repr(c) if c else "end of file"
      raise DataFormatError(self._path, self._line, f"invalid JSON: expected {' or '.join(map(repr, chars))} "
                            f"{context}, found {found}")
    self._advance(self._pos + 1)
    return c

  def value(self) -> tuple[Any, int]:
    """Decodes the next value; returns it with the line it starts on."""
    self.peek()
    start_line = self._line
    while True:
      try:
        obj, end = self._decoder.raw_decode(self._buf, self._pos)
      except json.JSONDecodeError as e:
        if self._fill():
          continue  # the value may be cut by the end of the buffer
        line = self._line + self._buf.count("\n", self._pos, e.pos)
        raise DataFormatError(self._path, line, f"invalid JSON: {e.msg}") from None
      if end == len(self._buf) and self._fill():
        continue  # a number may continue in the next chunk
      self._advance(end)
      return obj, start_line

  def array(self, context: str) -> Iterator[tuple[int, Any, int]]:
    """``(index, value, line)`` of each element of the array that comes next."""
    self.expect("[", context)
    if self.peek() == "]":
      self._advance(self._pos + 1)
      return
    for index in itertools.count():
      obj, line = self.value()
      yield index, obj, line
      if self.expect(",]", f"after element {index} of {context}") == "]":
        return

  def object_keys(self, context: str) -> Iterator[str]:
    """Keys of the object that comes next; consume each key's value before the next."""
    self.expect("{", context)
    if self.peek() == "}":
      self._advance(self._pos + 1)
      return
    while True:
      key, line = self.value()
      if not isinstance(key, str):
        raise DataFormatError(self._path, line, f"invalid JSON: object key must be a string in {context}")
      self.expect(":", f"after key {key!r}")
      yield key
      if self.expect(",}", f"after the value of {key!r}") == "}":
        return

  def end(self) -> None:
    """Checks that only whitespace follows the document."""
    if c := self.peek():
      raise DataFormatError(self._path, self._line, f"invalid JSON: unexpected {c!r} after the document")


def _dpr_ctxs(r: Record, field: str) -> tuple[DprContext, ...]:
  out = []
  for j, ctx in enumerate(r.array(field, optional=field != "positive_ctxs")):
    c = Record(ctx, r.path, r.line, where=f"{r.where}.{field}[{j}]")
    key = "passage_id" if "passage_id" in ctx else "psg_id"  # psg_id: older files
    if key not in ctx:
      raise c.error("passage_id", "is missing (nor is 'psg_id' given)")
    pid = c.identifier(key)
    score = c.checked("score", True, lambda x: is_int(x) or isinstance(x, float), "a number")
    out.append(DprContext(passage_id=pid, title=c.string("title"), text=c.string("text"),
                          score=None if score is None else float(score)))
  return tuple(out)


def _dpr_example(r: Record) -> DprExample:
  return DprExample(question=r.string("question", nonempty=True), answers=r.strings("answers"),
                    positive_ctxs=_dpr_ctxs(r, "positive_ctxs"), negative_ctxs=_dpr_ctxs(r, "negative_ctxs"),
                    hard_negative_ctxs=_dpr_ctxs(r, "hard_negative_ctxs"))


def _read_json_array(path: PathLike, make: Callable[[int, Record], T], context: str, skip_bad: bool,
                     stats: ReadStats | None) -> Iterator[T]:
  """``make(index, record)`` of each element of a file holding one JSON array."""

  def parse(i: int, obj: Any, line: int) -> T:
    return make(i, Record(obj, path, line, where=f"[{i}]"))

  def makers() -> Iterator[Callable[[], T]]:
    with open_data(path, text=True, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
      stream = _JsonStream(f, path)
      for element in stream.array(context):
        yield functools.partial(parse, *element)
      stream.end()

  return read_records(path, makers(), skip_bad, stats)


def read_dpr_biencoder(path: PathLike, *, skip_bad: bool = False,
                       stats: ReadStats | None = None) -> Iterator[DprExample]:
  """Examples of DPR's retriever-training json, a list; absent ``negative_ctxs`` / ``hard_negative_ctxs`` are empty."""
  return _read_json_array(path, lambda i, r: _dpr_example(r), "at the start of a DPR retriever-training file",
                          skip_bad, stats)


def read_dpr_questions(path: PathLike, *, skip_bad: bool = False,
                       stats: ReadStats | None = None) -> Iterator[Question]:
  """Questions of DPR's retriever-training json: ``positive_docs`` / ``negative_docs`` are the passage ids of its
  ``positive_ctxs`` / ``hard_negative_ctxs`` (ids of ``psgs_w100.tsv``); question ids are element indices."""

  def question(i: int, r: Record) -> Question:
    ex = _dpr_example(r)

    def ids(field: str, ctxs: tuple[DprContext, ...]) -> tuple[int, ...]:
      return tuple(_int_field(path, r.line, f"{field}[{j}].passage_id", c.passage_id) for j, c in enumerate(ctxs))

    return Question(id=str(i), question=ex.question, answers=ex.answers, line=r.line,
                    positive_docs=ids("positive_ctxs", ex.positive_ctxs),
                    negative_docs=ids("hard_negative_ctxs", ex.hard_negative_ctxs))

  return _read_json_array(path, question, "at the start of a DPR retriever-training file", skip_bad, stats)


def read_squad(path: PathLike, *, first_doc_id: int = 0, source: str | None = "squad",
               include_unanswerable: bool = False, skip_bad: bool = False,
               stats: ReadStats | None = None) -> Iterator[SquadParagraph]:
  """Paragraphs of a SQuAD json as documents numbered from ``first_doc_id``, each with its questions (gold_pid)."""
  stats = stats if stats is not None else ReadStats()
  next_id = first_doc_id

  def article(a: int, obj: Any, line: int) -> list[SquadParagraph]:
    """The paragraphs of article ``data[a]``: one record, skipped whole with ``skip_bad``."""
    art = Record(obj, path, line, where=f"data[{a}]")
    title = art.string("title").replace("_", " ")
    out = []
    for p, par in enumerate(art.array("paragraphs")):
      pr = Record(par, path, line, where=f"{art.where}.paragraphs[{p}]")
      context = pr.string("context")
      doc = Document(id=next_id + len(out), title=title, text=context, source=source, line=line)
      questions = []
      for k, qa in enumerate(pr.array("qas")):
        qr = Record(qa, path, line, where=f"{pr.where}.qas[{k}]")
        answers: list[str] = []
        for n, ans in enumerate(qr.array("answers")):
          ar = Record(ans, path, line, where=f"{qr.where}.answers[{n}]")
          text = ar.string("text", nonempty=True)
          start = ar.integer("answer_start")
          if start + len(text) > len(context):
            raise ar.error("answer_start", f"{start} + len(text) exceeds the context length {len(context)}")
          if text not in answers:
            answers.append(text)
        if not answers:
          if qa.get("is_impossible") is not True:
            raise qr.error("answers", "must not be an empty list (the question is not marked is_impossible)")
          if not include_unanswerable:
            continue
        questions.append(Question(id=qr.identifier("id"), question=qr.string("question", nonempty=True),
                                  answers=tuple(answers), gold_pid=doc.id, line=line))
      out.append(SquadParagraph(doc, tuple(questions)))
    return out

  def makers() -> Iterator[Callable[[], list[SquadParagraph]]]:
    with open_data(path, text=True, encoding="utf-8-sig") as f:
      stream = _JsonStream(f, path)
      seen_data = False
      for key in stream.object_keys("at the start of a SQuAD file"):
        if key != "data":
          stream.value()
          continue
        seen_data = True
        for element in stream.array("as the value of 'data'"):
          yield functools.partial(article, *element)
      stream.end()
      if not seen_data:
        raise DataFormatError(path, 1, "is missing", field="data")

  for paragraphs in read_records(path, makers(), skip_bad, stats):
    next_id += len(paragraphs)
    stats.records += len(paragraphs) - 1  # read_records counted the article as one
    yield from paragraphs
