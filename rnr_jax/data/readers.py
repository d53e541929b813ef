"""Streaming readers of open-domain QA files into :class:`Document` / :class:`Question`.

Formats:

* ours: corpus jsonl ``{"id": int, "title", "text", "source"?}`` and question
  jsonl ``{"id", "question", "answers": [str], "gold_pid": int}``
  (:func:`read_corpus`, :func:`read_questions`);
* NQ-open / EfficientQA jsonl ``{"question", "answer": [str]}``
  (:func:`read_nq_open`; :func:`read_questions` detects it);
* DPR's Wikipedia split ``psgs_w100.tsv`` (``id\\ttext\\ttitle`` with a header,
  text fields quoted CSV-style) (:func:`read_dpr_tsv`);
* DPR retriever-training json, a list of ``{question, answers, positive_ctxs,
  negative_ctxs, hard_negative_ctxs}`` (:func:`read_dpr_biencoder`);
* SQuAD json ``data[].paragraphs[].qas[]`` (:func:`read_squad`): paragraphs
  become documents, their questions point at them through ``gold_pid``.

Every reader is a generator that reads its file incrementally (JSON documents
too, element by element), so multi-gigabyte DPR files stream in bounded memory.
A malformed record raises :class:`DataFormatError` naming the file, the 1-based
line and the field. With ``skip_bad=True`` malformed records are skipped
instead, counted in a :class:`ReadStats` (pass your own to inspect it) and
reported in one logged warning when the file has been read. Syntax errors
inside a JSON document (not jsonl) are always fatal: the reader cannot find the
next record after them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Container, Iterator
from typing import IO, Any, TypeVar

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Document:
  """One knowledge-source document (a paragraph, an article or a passage)."""

  id: int
  title: str
  text: str
  source: str | None = None


@dataclasses.dataclass(frozen=True)
class Question:
  """A question with its reference answers.

  ``gold_pid`` is the id of the corpus document holding the gold paragraph, when
  known.
  """

  id: str
  question: str
  answers: tuple[str, ...]
  gold_pid: int | None = None

  def to_json(self) -> dict[str, Any]:
    """The record of our question jsonl format."""
    return {"id": self.id, "question": self.question, "answers": list(self.answers), "gold_pid": self.gold_pid}


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


class DataFormatError(ValueError):
  """A malformed record: ``file:line: [where: ]field 'name' problem``.

  Attributes:
    path: the file.
    line: 1-based line where the record starts (or where a syntax error is).
    field: the offending field, or ``None`` for record-level problems.
    where: position inside a JSON document (e.g. ``[3].positive_ctxs[0]``).
    problem: what is wrong.
  """

  def __init__(self, path: PathLike, line: int, problem: str, field: str | None = None, where: str | None = None):
    self.path = os.fspath(path)
    self.line = line
    self.field = field
    self.where = where
    self.problem = problem
    loc = f"{self.path}:{line}: "
    if where:
      loc += f"{where}: "
    super().__init__(loc + (f"field '{field}' {problem}" if field else problem))

  def __reduce__(self):
    return type(self), (self.path, self.line, self.problem, self.field, self.where)


class ReadStats:
  """Counts of one read: records yielded and malformed records skipped."""

  MAX_EXAMPLES = 5

  def __init__(self) -> None:
    self.records = 0
    self.skipped = 0
    self.examples: list[str] = []  # the first few skipped records' errors

  def skip(self, error: DataFormatError) -> None:
    self.skipped += 1
    if len(self.examples) < self.MAX_EXAMPLES:
      self.examples.append(str(error))

  def report(self, path: PathLike) -> None:
    """Logs one warning when records were skipped."""
    if self.skipped:
      logger.warning("%s: skipped %d malformed record(s) (%d read); first: %s", os.fspath(path), self.skipped,
                     self.records, " | ".join(self.examples))


class BadRecordPolicy:
  """What a reader does with a :class:`DataFormatError`: raise it, or (``skip_bad``) count it in ``stats``."""

  def __init__(self, path: PathLike, skip_bad: bool, stats: ReadStats | None):
    self.path = path
    self.skip_bad = skip_bad
    self.stats = stats if stats is not None else ReadStats()

  def bad(self, error: DataFormatError) -> None:
    if not self.skip_bad:
      raise error
    self.stats.skip(error)

  def done(self) -> None:
    self.stats.report(self.path)


# ---- field checks ------------------------------------------------------------------


class _Record:
  """Typed access to the fields of one JSON object, raising located errors."""

  def __init__(self, obj: Any, path: PathLike, line: int, where: str | None = None):
    if not isinstance(obj, dict):
      raise DataFormatError(path, line, f"record must be a JSON object, got {_kind(obj)}", where=where)
    self.obj, self.path, self.line, self.where = obj, path, line, where

  def error(self, field: str, problem: str) -> DataFormatError:
    return DataFormatError(self.path, self.line, problem, field=field, where=self.where)

  def _get(self, field: str, optional: bool) -> Any:
    if field not in self.obj:
      if optional:
        return None
      raise self.error(field, "is missing")
    return self.obj[field]

  def string(self, field: str, *, optional: bool = False, nonempty: bool = False) -> str | None:
    v = self._get(field, optional)
    if v is None and optional:
      return None
    if not isinstance(v, str):
      raise self.error(field, f"must be a string, got {_kind(v)}")
    if nonempty and not v.strip():
      raise self.error(field, "must not be empty")
    return v

  def integer(self, field: str, *, optional: bool = False) -> int | None:
    v = self._get(field, optional)
    if v is None and optional:
      return None
    if isinstance(v, bool) or not isinstance(v, int):
      raise self.error(field, f"must be an integer, got {_kind(v)}")
    if v < 0:
      raise self.error(field, f"must be >= 0, got {v}")
    return v

  def identifier(self, field: str) -> str:
    v = self._get(field, False)
    if isinstance(v, bool) or not isinstance(v, (str, int)):
      raise self.error(field, f"must be a string or an integer, got {_kind(v)}")
    return str(v)

  def strings(self, field: str, *, nonempty: bool = True) -> tuple[str, ...]:
    v = self._get(field, False)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
      raise self.error(field, "must be a list of strings")
    if nonempty and not v:
      raise self.error(field, "must not be an empty list")
    return tuple(v)

  def array(self, field: str, *, optional: bool = False) -> list[Any]:
    v = self._get(field, optional)
    if v is None and optional:
      return []
    if not isinstance(v, list):
      raise self.error(field, f"must be a list, got {_kind(v)}")
    return v


def _kind(v: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
          int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


# ---- jsonl -------------------------------------------------------------------------


def _iter_jsonl(path: PathLike, guard: BadRecordPolicy) -> Iterator[tuple[int, Any]]:
  """``(line number, parsed object)`` of each non-blank line."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        yield line_no, json.loads(raw)
      except json.JSONDecodeError as e:
        guard.bad(DataFormatError(path, line_no, f"invalid JSON: {e.msg} (column {e.colno})"))
      except UnicodeDecodeError as e:
        guard.bad(DataFormatError(path, line_no, f"invalid UTF-8: {e.reason}"))


def _read_jsonl(path: PathLike, make: Callable[[_Record], T], skip_bad: bool, stats: ReadStats | None
                ) -> Iterator[T]:
  """``make(record)`` for each record of a jsonl file, under the bad-record policy."""
  guard = BadRecordPolicy(path, skip_bad, stats)
  for line, obj in _iter_jsonl(path, guard):
    try:
      item = make(_Record(obj, path, line))
    except DataFormatError as e:
      guard.bad(e)
      continue
    guard.stats.records += 1
    yield item
  guard.done()


def _document(r: _Record) -> Document:
  return Document(id=r.integer("id"), title=r.string("title"), text=r.string("text"),
                  source=r.string("source", optional=True))


def read_corpus(path: PathLike, *, skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Document]:
  """Documents of our corpus jsonl ``{"id": int, "title", "text", "source"?}``."""
  return _read_jsonl(path, _document, skip_bad, stats)


def _our_question(r: _Record, require_gold_pid: bool, doc_ids: Container[int] | None) -> Question:
  gold_pid = r.integer("gold_pid", optional=not require_gold_pid)
  if gold_pid is not None and doc_ids is not None and gold_pid not in doc_ids:
    raise r.error("gold_pid", f"{gold_pid} is not a document id of the corpus")
  return Question(id=r.identifier("id"), question=r.string("question", nonempty=True), answers=r.strings("answers"),
                  gold_pid=gold_pid)


def _nq_open_question(r: _Record) -> Question:
  qid = r.identifier("id") if "id" in r.obj else str(r.line - 1)
  return Question(id=qid, question=r.string("question", nonempty=True), answers=r.strings("answer"))


def read_questions(path: PathLike, *, require_gold_pid: bool = False, doc_ids: Container[int] | None = None,
                   skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Question]:
  """Questions of a jsonl file in our format or in NQ-open format.

  The format is detected from the first well-formed record (``answers`` = ours,
  ``answer`` = NQ-open) and then required of every record. NQ-open records
  without an ``id`` get their 0-based line index as id.

  Args:
    path: the jsonl file.
    require_gold_pid: reject our-format records without ``gold_pid``.
    doc_ids: when given, a ``gold_pid`` must be one of these corpus ids.
    skip_bad: skip (and count) malformed records instead of raising.
    stats: filled with the counts of this read.
  """
  detected: Callable[[_Record], Question] | None = None

  def make(r: _Record) -> Question:
    nonlocal detected
    if detected is None:
      if "answers" in r.obj:
        detected = lambda rec: _our_question(rec, require_gold_pid, doc_ids)  # noqa: E731
      elif "answer" in r.obj:
        detected = _nq_open_question
      else:
        raise r.error("answers", "is missing (neither our format with 'answers' nor NQ-open with 'answer')")
    return detected(r)

  return _read_jsonl(path, make, skip_bad, stats)


def read_nq_open(path: PathLike, *, skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Question]:
  """Questions of an NQ-open / EfficientQA jsonl file ``{"question", "answer": [str]}``."""
  return _read_jsonl(path, _nq_open_question, skip_bad, stats)


# ---- DPR tsv -----------------------------------------------------------------------


def read_dpr_tsv(path: PathLike, *, source: str | None = "dpr", skip_bad: bool = False,
                 stats: ReadStats | None = None) -> Iterator[Document]:
  """Passages of DPR's ``psgs_w100.tsv`` (header ``id text title``) as documents."""
  guard = BadRecordPolicy(path, skip_bad, stats)
  with open(path, encoding="utf-8", newline="") as f:
    rows = csv.reader(f, delimiter="\t", quotechar='"')
    try:
      header = next(rows)
    except StopIteration:
      raise DataFormatError(path, 1, "empty file; expected the header 'id<TAB>text<TAB>title'") from None
    missing = [c for c in ("id", "text", "title") if c not in header]
    if missing:
      raise DataFormatError(path, 1, f"header {header!r} lacks column(s) {missing}")
    col = {name: header.index(name) for name in ("id", "text", "title")}
    start = rows.line_num + 1
    while True:
      try:
        row = next(rows)
      except StopIteration:
        break
      except csv.Error as e:
        guard.bad(DataFormatError(path, start, f"malformed TSV: {e}"))
        start = rows.line_num + 1
        continue
      line, start = start, rows.line_num + 1
      if not row:
        continue
      try:
        if len(row) != len(header):
          raise DataFormatError(path, line, f"expected {len(header)} tab-separated columns, got {len(row)}")
        raw_id = row[col["id"]]
        try:
          pid = int(raw_id)
        except ValueError:
          raise DataFormatError(path, line, f"must be an integer, got {raw_id!r}", field="id") from None
        doc = Document(id=pid, title=row[col["title"]], text=row[col["text"]], source=source)
      except DataFormatError as e:
        guard.bad(e)
        continue
      guard.stats.records += 1
      yield doc
  guard.done()


# ---- streaming JSON documents ------------------------------------------------------


class _JsonStream:
  """Incremental reader of one JSON document, value by value, tracking lines.

  Reads the file in chunks and decodes each requested value with the C JSON
  decoder; a value cut by the chunk boundary is retried with more text.
  """

  _WS = " \t\r\n"

  def __init__(self, f: IO[str], path: PathLike, chunk_size: int = 1 << 20):
    self._f = f
    self._path = path
    self._chunk = chunk_size
    self._buf = ""
    self._pos = 0
    self._line = 1  # line of self._buf[self._pos]
    self._eof = False
    self._decoder = json.JSONDecoder()

  @property
  def line(self) -> int:
    return self._line

  def _fill(self) -> bool:
    """Appends more text (at least as much as is buffered); False at end of file."""
    if self._eof:
      return False
    self._buf = self._buf[self._pos:]
    self._pos = 0
    more = self._f.read(max(self._chunk, len(self._buf)))
    if not more:
      self._eof = True
      return False
    self._buf += more
    return True

  def _advance(self, end: int) -> None:
    self._line += self._buf.count("\n", self._pos, end)
    self._pos = end

  def peek(self) -> str:
    """The next non-whitespace character ('' at end of file), not consumed."""
    while True:
      end = self._pos
      while end < len(self._buf) and self._buf[end] in self._WS:
        end += 1
      self._advance(end)
      if self._pos < len(self._buf):
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
          continue
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
    index = 0
    while True:
      obj, line = self.value()
      yield index, obj, line
      index += 1
      if self.expect(",]", f"after element {index - 1} of {context}") == "]":
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
    c = self.peek()
    if c:
      raise DataFormatError(self._path, self._line, f"invalid JSON: unexpected {c!r} after the document")


def _open_json(path: PathLike) -> IO[str]:
  return open(path, encoding="utf-8-sig")


def _dpr_ctxs(r: _Record, field: str) -> tuple[DprContext, ...]:
  out = []
  for j, ctx in enumerate(r.array(field, optional=field != "positive_ctxs")):
    c = _Record(ctx, r.path, r.line, where=f"{r.where}.{field}[{j}]")
    if "passage_id" in ctx:
      pid = c.identifier("passage_id")
    elif "psg_id" in ctx:
      pid = c.identifier("psg_id")
    else:
      raise c.error("passage_id", "is missing (nor is 'psg_id' given)")
    score = ctx.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
      raise c.error("score", f"must be a number, got {_kind(score)}")
    out.append(DprContext(passage_id=pid, title=c.string("title"), text=c.string("text"),
                          score=None if score is None else float(score)))
  return tuple(out)


def read_dpr_biencoder(path: PathLike, *, skip_bad: bool = False,
                       stats: ReadStats | None = None) -> Iterator[DprExample]:
  """Examples of DPR's retriever-training json (a top-level list of questions).

  ``negative_ctxs`` and ``hard_negative_ctxs`` may be absent (read as empty);
  a context's id is ``passage_id`` or, in older files, ``psg_id``.
  """
  guard = BadRecordPolicy(path, skip_bad, stats)
  with _open_json(path) as f:
    stream = _JsonStream(f, path)
    for i, obj, line in stream.array("at the start of a DPR retriever-training file"):
      try:
        r = _Record(obj, path, line, where=f"[{i}]")
        ex = DprExample(question=r.string("question", nonempty=True), answers=r.strings("answers"),
                        positive_ctxs=_dpr_ctxs(r, "positive_ctxs"), negative_ctxs=_dpr_ctxs(r, "negative_ctxs"),
                        hard_negative_ctxs=_dpr_ctxs(r, "hard_negative_ctxs"))
      except DataFormatError as e:
        guard.bad(e)
        continue
      guard.stats.records += 1
      yield ex
    stream.end()
  guard.done()


# ---- SQuAD -------------------------------------------------------------------------


def _squad_article(obj: Any, a: int, line: int, path: PathLike, *, next_id: int, include_unanswerable: bool,
                   source: str | None) -> list[SquadParagraph]:
  """The paragraphs of article ``data[a]`` (starting on ``line``), numbered from ``next_id``."""
  art = _Record(obj, path, line, where=f"data[{a}]")
  title = art.string("title").replace("_", " ")
  out = []
  for p, par in enumerate(art.array("paragraphs")):
    pr = _Record(par, path, line, where=f"data[{a}].paragraphs[{p}]")
    context = pr.string("context")
    doc = Document(id=next_id + len(out), title=title, text=context, source=source)
    questions = []
    for k, qa in enumerate(pr.array("qas")):
      qr = _Record(qa, path, line, where=f"data[{a}].paragraphs[{p}].qas[{k}]")
      answers: list[str] = []
      for n, ans in enumerate(qr.array("answers")):
        ar = _Record(ans, path, line, where=f"{qr.where}.answers[{n}]")
        text = ar.string("text")
        start = ar.integer("answer_start")
        if start + len(text) > len(context):
          raise ar.error("answer_start", f"{start} + len(text) exceeds the context length {len(context)}")
        if text not in answers:
          answers.append(text)
      if not answers:
        if qa.get("is_impossible") is True:
          if not include_unanswerable:
            continue
        else:
          raise qr.error("answers", "must not be an empty list (the question is not marked is_impossible)")
      questions.append(Question(id=qr.identifier("id"), question=qr.string("question", nonempty=True),
                                answers=tuple(answers), gold_pid=doc.id))
    out.append(SquadParagraph(doc, tuple(questions)))
  return out


def read_squad(path: PathLike, *, first_doc_id: int = 0, source: str | None = "squad",
               include_unanswerable: bool = False, skip_bad: bool = False,
               stats: ReadStats | None = None) -> Iterator[SquadParagraph]:
  """Paragraphs of a SQuAD-format json as documents, each with its questions.

  Paragraphs are numbered from ``first_doc_id`` in file order and every
  question's ``gold_pid`` is its paragraph's id. Article titles have ``_``
  replaced by spaces. Unanswerable SQuAD 2.0 questions (``is_impossible``) are
  left out unless ``include_unanswerable``. A malformed article is one record:
  with ``skip_bad`` the whole article is skipped (and numbering continues).
  ``stats.records`` counts paragraphs.
  """
  guard = BadRecordPolicy(path, skip_bad, stats)
  next_id = first_doc_id
  with _open_json(path) as f:
    stream = _JsonStream(f, path)
    seen_data = False
    for key in stream.object_keys("at the start of a SQuAD file"):
      if key != "data":
        stream.value()
        continue
      seen_data = True
      for a, obj, line in stream.array("as the value of 'data'"):
        try:
          paragraphs = _squad_article(obj, a, line, path, next_id=next_id, include_unanswerable=include_unanswerable,
                                      source=source)
        except DataFormatError as e:
          guard.bad(e)
          continue
        next_id += len(paragraphs)
        guard.stats.records += len(paragraphs)
        yield from paragraphs
    stream.end()
    if not seen_data:
      raise DataFormatError(path, 1, "is missing", field="data")
  guard.done()
