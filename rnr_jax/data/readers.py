"""Documents and questions, and streaming readers of our jsonl files (and NQ-open's) with located errors.

A malformed record raises :class:`DataFormatError` naming file, 1-based line and field, or with ``skip_bad=True`` is
skipped and counted in a :class:`ReadStats`."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import logging
import os
from collections.abc import Callable, Container, Iterable, Iterator
from typing import IO, Any, TypeVar

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
T = TypeVar("T")
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
  to lone surrogates, so that :func:`text_problem` reports them at their record's line, not as a decoder failure."""
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


class Record:
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
    v = self.checked(field, optional, is_int, "an integer")
    if v is not None and not 0 <= v <= MAX_ID:
      raise self.error(field, f"must be in [0, 2**63), got {v}")
    return v

  def integers(self, field: str) -> tuple[int, ...]:
    """An optional list of ids."""
    v = self.checked(field, True, lambda x: isinstance(x, list) and all(is_int(i) for i in x), "a list of integers")
    if v and not all(0 <= i <= MAX_ID for i in v):
      raise self.error(field, "must hold integers in [0, 2**63)")
    return tuple(v or ())

  def identifier(self, field: str) -> str:
    v = self.checked(field, False, lambda x: is_int(x) or isinstance(x, str), "a string or an integer")
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


def is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a number


def _kind(v: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
          int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def read_jsonl(path: PathLike, make: Callable[[Record], T], skip_bad: bool, stats: ReadStats | None) -> Iterator[T]:
  """``make(record)`` of each non-blank line of a jsonl file."""

  def parse(line: int, raw: bytes) -> T:
    try:
      obj = json.loads(raw)
    except json.JSONDecodeError as e:
      raise DataFormatError(path, line, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
      raise DataFormatError(path, line, f"invalid UTF-8: {e.reason} (byte {e.start})") from None
    return make(Record(obj, path, line))

  def makers() -> Iterator[Callable[[], T]]:
    with open_data(path) as f:
      for line, raw in enumerate(f, start=1):
        if raw.strip():
          yield functools.partial(parse, line, raw)

  return read_records(path, makers(), skip_bad, stats)


def _document(r: Record) -> Document:
  return Document(id=r.integer("id"), title=r.string("title"), text=r.string("text"),
                  source=r.string("source", optional=True), line=r.line)


def read_corpus(path: PathLike, *, skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Document]:
  """Documents of our corpus jsonl ``{"id": int, "title", "text", "source"?}``."""
  return read_jsonl(path, _document, skip_bad, stats)


def _our_question(r: Record, require_gold_pid: bool, doc_ids: Container[int] | None) -> Question:
  gold_pid = r.integer("gold_pid", optional=not require_gold_pid)
  if gold_pid is not None and doc_ids is not None and gold_pid not in doc_ids:
    raise r.error("gold_pid", f"{gold_pid} is not a document id of the corpus")
  return Question(id=r.identifier("id"), question=r.string("question", nonempty=True), answers=r.strings("answers"),
                  gold_pid=gold_pid, positive_docs=r.integers("positive_docs"),
                  negative_docs=r.integers("negative_docs"), line=r.line)


def _nq_open_question(r: Record) -> Question:
  qid = r.identifier("id") if "id" in r.obj else str(r.line - 1)
  return Question(id=qid, question=r.string("question", nonempty=True), answers=r.strings("answer"), line=r.line)


def read_questions(path: PathLike, *, require_gold_pid: bool = False, doc_ids: Container[int] | None = None,
                   skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[Question]:
  """Questions in our jsonl format (``answers``) or NQ-open's (``answer``), as the first good record shows;
  ``doc_ids``: the allowed ``gold_pid`` values. NQ-open ids default to the 0-based line index."""
  detected: Callable[[Record], Question] | None = None

  def make(r: Record) -> Question:
    nonlocal detected
    if detected is None:
      if "answers" in r.obj:
        detected = functools.partial(_our_question, require_gold_pid=require_gold_pid, doc_ids=doc_ids)
      elif "answer" in r.obj:
        detected = _nq_open_question
      else:
        raise r.error("answers", "is missing (neither our format with 'answers' nor NQ-open with 'answer')")
    return detected(r)

  return read_jsonl(path, make, skip_bad, stats)
