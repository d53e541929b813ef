"""Questions of NQ-open, SQuAD v1.1 and TriviaQA (open-domain config) from TFDS's ``data_source``, without TensorFlow.

The data must already be prepared in ``data_dir`` as ``array_record`` files, or ``download=True`` lets tfds try.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from rnr_jax.data.readers import DataFormatError, Document, ExcludedRecord, Question, ReadStats, read_records

DEFAULT_CONFIGS = {"natural_questions_open": "natural_questions_open", "squad": "squad/v1.1",
                   "trivia_qa": "trivia_qa/unfiltered.nocontext"}


class TfdsSourceError(RuntimeError):
  """A TFDS dataset could not be opened (not prepared locally, no network, ...)."""


def open_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                download: bool = False) -> Sequence[dict[str, Any]]:
  """``tfds.data_source`` of ``name`` (a key of :data:`DEFAULT_CONFIGS` or ``name/config``), or a clear error."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  full = DEFAULT_CONFIGS.get(name, name)
  where = os.fspath(data_dir) if data_dir is not None else "the default TFDS data_dir (~/tensorflow_datasets)"
  try:
    return tfds.data_source(full, split=split, data_dir=data_dir, download=download)
  except Exception as e:  # noqa: BLE001 - tfds raises many unrelated types; re-raised with context
    cause = f"(tfds: {type(e).__name__}: {e})"
    build = (f"`tfds build {full} --data_dir DIR --file_format array_record` on a machine with internet access "
             f"and pass that DIR as data_dir")
    if download:
      raise TfdsSourceError(f"could not download and build TFDS dataset {full!r} split {split!r} into {where} "
                            f"(this machine may have no internet access) {cause}. Instead run {build}.") from e
    raise TfdsSourceError(f"TFDS dataset {full!r} split {split!r} is not available in {where} {cause}. It must "
                          f"already be prepared there in array_record format: run {build}, or pass "
                          f"download=True where there is internet access.") from e


def _text(v: Any) -> str:
  """A text feature, which tfds may give as ``bytes``, ``str`` or a 0-d array of either."""
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray) and v.ndim == 0:
    return _text(v.item())
  return str(v)


def _answers(*features: Any) -> tuple[str, ...]:
  """The distinct non-empty texts of ``features``, each a text or an array of texts."""
  texts = (_text(x) for v in features for x in np.asarray(v, dtype=object).reshape(-1))
  return tuple(dict.fromkeys(t for t in texts if t))


def _makers(make: Callable[[int], Any], source: Sequence[Any], limit: int | None) -> Iterator[Callable[[], Any]]:
  return (functools.partial(make, i) for i in range(len(source) if limit is None else min(limit, len(source))))


def _question_text(ex: dict[str, Any], origin: str, i: int) -> str:
  if ex.get("question") is None:
    raise DataFormatError(origin, i + 1, "is missing", field="question")
  text = _text(ex["question"])
  if not text.strip():
    raise DataFormatError(origin, i + 1, "must not be empty", field="question")
  return text


def tfds_questions(name: str, split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                   limit: int | None = None, skip_bad: bool = False,
                   stats: ReadStats | None = None) -> Iterator[Question]:
  """Questions of ``natural_questions_open``, ``squad`` or ``trivia_qa``; errors give the example number as line."""
  kind = DEFAULT_CONFIGS.get(name, name).split("/")[0]
  if kind not in DEFAULT_CONFIGS:
    raise ValueError(f"unsupported TFDS question dataset {name!r}; choose from {sorted(DEFAULT_CONFIGS)}")
  source = open_source(name, split, data_dir=data_dir, download=download)
  origin = f"tfds:{DEFAULT_CONFIGS.get(name, name)}/{split}"

  def question(i: int) -> Question:
    ex = source[i]
    text = _question_text(ex, origin, i)
    if kind == "natural_questions_open":
      answers, qid = _answers(ex["answer"]), str(i)
    elif kind == "squad":
      answers, qid = _answers(ex["answers"]["text"]), _text(ex["id"])
    else:
      ans = ex["answer"]
      answers, qid = _answers(ans["value"], ans["aliases"]), _text(ex["question_id"])
    if not answers:
      raise ExcludedRecord(origin, i + 1, "has no non-empty answer: question left out", field="answer")
    return Question(id=qid, question=text, answers=answers)

  yield from read_records(origin, _makers(question, source, limit), skip_bad, stats)


def squad_open_domain(split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                      config: str = DEFAULT_CONFIGS["squad"], first_doc_id: int = 0, limit: int | None = None,
                      skip_bad: bool = False, stats: ReadStats | None = None
                      ) -> tuple[list[Document], list[Question]]:
  """SQuAD's distinct contexts as documents numbered from ``first_doc_id``, and its questions linked to them."""
  source = open_source(config, split, data_dir=data_dir, download=download)
  origin = f"tfds:{config}/{split}"

  def parse(i: int) -> tuple[str, str, Question]:
    ex = source[i]
    text = _question_text(ex, origin, i)
    answers = _answers(ex["answers"]["text"])
    if not answers:
      raise ExcludedRecord(origin, i + 1, "has no non-empty answer: question left out", field="answers")
    question = Question(id=_text(ex["id"]), question=text, answers=answers)
    return _text(ex["title"]).replace("_", " "), _text(ex["context"]), question

  doc_of: dict[tuple[str, str], int] = {}
  docs: list[Document] = []
  questions: list[Question] = []
  for title, context, question in read_records(origin, _makers(parse, source, limit), skip_bad, stats):
    if (title, context) not in doc_of:
      doc_of[title, context] = first_doc_id + len(docs)
      docs.append(Document(id=doc_of[title, context], title=title, text=context, source="squad"))
    questions.append(dataclasses.replace(question, gold_pid=doc_of[title, context]))
  return docs, questions
