"""Streaming readers of our jsonl, NQ-open, DPR (tsv, retriever json, qa.csv) and SQuAD files.

Readers are generators reading incrementally (gzip transparently, JSON documents element by element), so multi-gigabyte
files stream in bounded memory. A malformed record raises :class:`DataFormatError` naming file, 1-based line and field,
or with ``skip_bad=True`` is skipped and counted in a :class:`ReadStats`; syntax errors inside a JSON document are fatal.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import gzip
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Container, Iterable, Iterator
from typing import IO, Any, TypeVar

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
T = TypeVar("T")
_NON_WS = re.compile(r"[^ \t\r\n]")  # JSON whitespace is only these four
MAX_ID = 2**63 - 1  # ids are stored as int64


@dataclasses.dataclass(frozen=True)
class Document:
  """One knowledge-source document (a paragraph, an article or a passage); ``line`` locates it in its file."""

  id: int
  title: str
  text: str
  source: str | None = None
  line: int = dataclasses.field(default=0, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Question:
  """A question with its reference answers; ``gold_pid`` is the corpus id of its gold document, when known;
  ``positive_docs`` / ``negative_docs`` are given positive and hard-negative documents (DPR's retriever json)."""

  id: str
  question: str
  answers: tuple[str, ...]
  gold_pid: int | None = None
  positive_docs: tuple[int, ...] = ()
  negative_docs: tuple[int, ...] = ()
  line: int = dataclasses.field(default=0, compare=False, repr=False)

  def to_json(self) -> dict[str, Any]:
    """The record of our question jsonl format."""
    rec = {"id": self.id, "question": self.question, "answers": list(self.answers), "gold_pid": self.gold_pid}
    rec.update({k: list(v) for k, v in (("positive_docs", self.positive_docs), ("negative_docs", self.negative_docs))
                if v})
    return rec


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
  """A malformed record: ``file:line: [where: ][field 'name' ]problem``; ``where`` as in ``[3].positive_ctxs[0]``."""

  def __init__(self, path: PathLike, line: int, problem: str, field: str | None = None, where: str | None = None):
    self.path = os.fspath(path)
    self.line, self.field, self.where, self.problem = line, field, where, problem
    loc = f"{self.path}:{line}: " + (f"{where}: " if where else "")
    super().__init__(loc + (f"field '{field}' {problem}" if field else problem))

  def __reduce__(self):  # picklable although __init__ takes more than the message
    return type(self), (self.path, self.line, self.problem, self.field, self.where)


class ExcludedRecord(DataFormatError):
  """A record left out by design, never an error: a question without a non-empty answer (an empty reference would
  match every passage and every empty prediction)."""


@dataclasses.dataclass
class ReadStats:
  """Counts of one read: records yielded, malformed records skipped, records excluded, and the first few of both."""

  records: int = 0
  skipped: int = 0
  excluded: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)

  def skip(self, error: DataFormatError) -> None:
    if isinstance(error, ExcludedRecord):
      self.excluded += 1
    else:
      self.skipped += 1
    if len(self.examples) < 5:
      self.examples.append(str(error))


def read_records(path: PathLike, makers: Iterable[Callable[[], T]], skip_bad: bool, stats: ReadStats | None
                 ) -> Iterator[T]:
  """``make()`` of each maker; a :class:`DataFormatError` is raised, or with ``skip_bad`` counted and logged."""
  stats = stats if stats is not None else ReadStats()
  for make in makers:
    try:
      item = make()
    except DataFormatError as e:
      if not skip_bad and not isinstance(e, ExcludedRecord):
        raise
      stats.skip(e)
      continue
    stats.records += 1
    yield item
  if stats.skipped or stats.excluded:
    logger.warning("%s: skipped %d malformed and left out %d record(s) (%d read); first: %s", os.fspath(path),
                   stats.skipped, stats.excluded, stats.records, " | ".join(stats.examples))


def open_data(path: PathLike, text: bool = False, encoding: str = "utf-8") -> IO[Any]:
  """``path`` for reading, gunzipped when it starts with gzip's magic bytes. Text mode maps bytes that are not UTF-8
  to lone surrogates, so that :func:`check_text` reports them at their record's line instead of the decoder failing."""
  with open(path, "rb") as f:
    gz = f.read(2) == b"\x1f\x8b"
  raw = gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115 - returned to the caller
  return io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape", newline="") if text else raw


def text_problem(value: str) -> str | None:
  """Why ``value`` is no valid Unicode text (a lone surrogate, or a byte that was not UTF-8), else None."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    c = ord(value[e.start])
    what = f"byte 0x{c - 0xDC00:02x} that is not UTF-8" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
    return f"holds a {what} (character {e.start})"
  return None


class _Record:
  """Typed access to the fields of one JSON object, raising located errors."""

  def __init__(self, obj: Any, path: PathLike, line: int, where: str | None = None):
    if not isinstance(obj, dict):
      raise DataFormatError(path, line, f"record must be a JSON object, got {_kind(obj)}", where=where)
    self.obj, self.path, self.line, self.where = obj, path, line, where

  def error(self, field: str, problem: str) -> DataFormatError:
    return DataFormatError(self.path, self.line, problem, field=field, where=self.where)

  def checked(self, field: str, optional: bool, ok: Callable[[Any], bool], expected: str) -> Any:
    """The field's value, which must pass ``ok``; None if ``optional`` and missing or null."""
    if field not in self.obj and not optional:
      raise self.error(field, "is missing")
    v = self.obj.get(field)
    if v is None and optional:
      return None
    if not ok(v):
      raise self.error(field, f"must be {expected}, got {_kind(v)}")
    return v

  def string(self, field: str, *, optional: bool = False, nonempty: bool = False) -> str | None:
    v = self.checked(field, optional, lambda x: isinstance(x, str), "a string")
    if v is not None and (problem := text_problem(v)):
      raise self.error(field, problem)
    if nonempty and not v.strip():
      raise self.error(field, "must not be empty")
    return v

  def integer(self, field: str, *, optional: bool = False) -> int | None:
    v = self.checked(field, optional, _is_int, "an integer")
    if v is not None and not 0 <= v <= MAX_ID:
      raise self.error(field, f"must be in [0, 2**63), got {v}")
    return v

  def integers(self, field: str) -> tuple[int, ...]:
    """An optional list of ids."""
    v = self.checked(field, True, lambda x: isinstance(x, list) and all(_is_int(i) for i in x), "a list of integers")
    if v and not all(0 <= i <= MAX_ID for i in v):
      raise self.error(field, "must hold integers in [0, 2**63)")
    return tuple(v or ())

  def identifier(self, field: str) -> str:
    v = self.checked(field, False, lambda x: _is_int(x) or isinstance(x, str), "a string or an integer")
    if isinstance(v, str) and (problem := text_problem(v)):
      raise self.error(field, problem)
    return str(v)

  def strings(self, field: str) -> tuple[str, ...]:
    """A non-empty list of non-empty strings."""
    if field not in self.obj:
      raise self.error(field, "is missing")
    return answers_of(self.obj[field], self.error, field)

  def array(self, field: str, *, optional: bool = False) -> list[Any]:
    return self.checked(field, optional, lambda x: isinstance(x, list), "a list") or []


def answers_of(v: Any, error: Callable[[str, str], DataFormatError], field: str = "answers") -> tuple[str, ...]:
  """``v`` as answers: a non-empty list of strings, empty ones dropped; none left: an :class:`ExcludedRecord`."""
  if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
    raise error(field, "must be a list of strings")
  if not v:
    raise error(field, "must not be an empty list")
  for x in v:
    if problem := text_problem(x):
      raise error(field, problem)
  if not (answers := tuple(x for x in v if x.strip())):
    e = error(field, f"has no non-empty answer ({v!r}): question left out")
    raise ExcludedRecord(e.path, e.line, e.problem, e.field, e.where)
  return answers


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a number


def _kind(v: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
          int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _read_jsonl(path: PathLike, make: Callable[[_Record], T], skip_bad: bool, stats: ReadStats | None
                ) -> Iterator[T]:
  """``make(record)`` of each non-blank line of a jsonl file."""

  def parse(line: int, raw: bytes) -> T:
    try:
      obj = json.loads(raw)
    except json.JSONDecodeError as e:
      raise DataFormatError(path, line, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
      raise DataFormatError(path, line, f"invalid UTF-8: {e.reason} (byte {e.start})") from None
    return make(_Record(obj, path, line))

  def makers() -> Iterator[Callable[[], T]]:
    with open_data(path) as f:
      for line, raw in enumerate(f, start=1):
        if raw.strip():
          yield functools.partial(parse, line, raw)

  return read_records(path, makers(), skip_bad, stats)


def _document(r: _Record) -> Document:
  return Document(id=r.integer("id"), title=r.string("title"), text=r.string("text"),
                  source=r.string("source", optional=True), line=r.line)


def read_corpus(path: PathLike, *, skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Document]:
  """Documents of our corpus jsonl ``{"id": int, "title", "text", "source"?}``."""
  return _read_jsonl(path, _document, skip_bad, stats)


def _our_question(r: _Record, require_gold_pid: bool, doc_ids: Container[int] | None) -> Question:
  gold_pid = r.integer("gold_pid", optional=not require_gold_pid)
  if gold_pid is not None and doc_ids is not None and gold_pid not in doc_ids:
    raise r.error("gold_pid", f"{gold_pid} is not a document id of the corpus")
  return Question(id=r.identifier("id"), question=r.string("question", nonempty=True), answers=r.strings("answers"),
                  gold_pid=gold_pid, positive_docs=r.integers("positive_docs"),
                  negative_docs=r.integers("negative_docs"), line=r.line)


def _nq_open_question(r: _Record) -> Question:
  qid = r.identifier("id") if "id" in r.obj else str(r.line - 1)
  return Question(id=qid, question=r.string("question", nonempty=True), answers=r.strings("answer"), line=r.line)


def read_questions(path: PathLike, *, require_gold_pid: bool = False, doc_ids: Container[int] | None = None,
                   skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Question]:
  """Questions in our jsonl format (``answers``) or NQ-open's (``answer``), as the first good record shows.

  ``doc_ids``, when given, are the allowed ``gold_pid`` values; NQ-open ids default to the 0-based line index.
  """
  detected: Callable[[_Record], Question] | None = None

  def make(r: _Record) -> Question:
    nonlocal detected
    if detected is None:
      if "answers" in r.obj:
        detected = functools.partial(_our_question, require_gold_pid=require_gold_pid, doc_ids=doc_ids)
      elif "answer" in r.obj:
        detected = _nq_open_question
      else:
        raise r.error("answers", "is missing (neither our format with 'answers' nor NQ-open with 'answer')")
    return detected(r)

  return _read_jsonl(path, make, skip_bad, stats)


def read_nq_open(path: PathLike, *, skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Question]:
  """Questions of an NQ-open / EfficientQA jsonl file ``{"question", "answer": [str]}``."""
  return _read_jsonl(path, _nq_open_question, skip_bad, stats)


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


def _dpr_ctxs(r: _Record, field: str) -> tuple[DprContext, ...]:
  out = []
  for j, ctx in enumerate(r.array(field, optional=field != "positive_ctxs")):
    c = _Record(ctx, r.path, r.line, where=f"{r.where}.{field}[{j}]")
    key = "passage_id" if "passage_id" in ctx else "psg_id"  # psg_id: older files
    if key not in ctx:
      raise c.error("passage_id", "is missing (nor is 'psg_id' given)")
    pid = c.identifier(key)
    score = c.checked("score", True, lambda x: _is_int(x) or isinstance(x, float), "a number")
    out.append(DprContext(passage_id=pid, title=c.string("title"), text=c.string("text"),
                          score=None if score is None else float(score)))
  return tuple(out)


def _dpr_example(r: _Record) -> DprExample:
  return DprExample(question=r.string("question", nonempty=True), answers=r.strings("answers"),
                    positive_ctxs=_dpr_ctxs(r, "positive_ctxs"), negative_ctxs=_dpr_ctxs(r, "negative_ctxs"),
                    hard_negative_ctxs=_dpr_ctxs(r, "hard_negative_ctxs"))


def _read_json_array(path: PathLike, make: Callable[[int, _Record], T], context: str, skip_bad: bool,
                     stats: ReadStats | None) -> Iterator[T]:
  """``make(index, record)`` of each element of a file holding one JSON array."""

  def parse(i: int, obj: Any, line: int) -> T:
    return make(i, _Record(obj, path, line, where=f"[{i}]"))

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

  def question(i: int, r: _Record) -> Question:
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
    art = _Record(obj, path, line, where=f"data[{a}]")
    title = art.string("title").replace("_", " ")
    out = []
    for p, par in enumerate(art.array("paragraphs")):
      pr = _Record(par, path, line, where=f"{art.where}.paragraphs[{p}]")
      context = pr.string("context")
      doc = Document(id=next_id + len(out), title=title, text=context, source=source, line=line)
      questions = []
      for k, qa in enumerate(pr.array("qas")):
        qr = _Record(qa, path, line, where=f"{pr.where}.qas[{k}]")
        answers: list[str] = []
        for n, ans in enumerate(qr.array("answers")):
          ar = _Record(ans, path, line, where=f"{qr.where}.answers[{n}]")
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
