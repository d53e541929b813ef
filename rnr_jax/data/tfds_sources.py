"""Questions (and SQuAD paragraphs) from TensorFlow Datasets, without TensorFlow.

Uses ``tfds.data_source`` (random-access ArrayRecord files, no TensorFlow
needed) for

* ``natural_questions_open``: ``{question, answer: [str]}``;
* ``squad`` (``squad/v1.1``): ``{id, title, context, question, answers: {text, answer_start}}``;
  :func:`squad_open_domain` turns its contexts into a corpus of documents;
* ``trivia_qa`` (default config ``unfiltered.nocontext``, the open-domain
  setting): the answer's ``value`` and ``aliases`` are the answers.

The data must already be prepared in ``data_dir`` in ``array_record`` format
(``tfds build NAME --data_dir DIR --file_format array_record`` on a machine
with internet access); with ``download=True`` tfds tries to download and build
it. Any failure to open a dataset raises :class:`TfdsSourceError` saying so.
Text features may come back as ``bytes`` or ``str``; both are accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rnr_jax.data.readers import BadRecordPolicy, DataFormatError, Document, Question, ReadStats

DEFAULT_CONFIGS = {
    "natural_questions_open": "natural_questions_open",
    "squad": "squad/v1.1",
    "trivia_qa": "trivia_qa/unfiltered.nocontext",
}


class TfdsSourceError(RuntimeError):
  """A TFDS dataset could not be opened (not prepared locally, no network, ...)."""


def open_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                download: bool = False) -> Sequence[dict[str, Any]]:
  """``tfds.data_source(name, split=split, data_dir=data_dir)`` with a clear error.

  ``name`` may be a key of :data:`DEFAULT_CONFIGS` or a full ``name/config``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  full = DEFAULT_CONFIGS.get(name, name)
  where = os.fspath(data_dir) if data_dir is not None else "the default TFDS data_dir (~/tensorflow_datasets)"
  try:
    source = tfds.data_source(full, split=split, data_dir=data_dir, download=download)
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
  return source


def _text(v: Any) -> str:
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray) and v.ndim == 0:
    return _text(v.item())
  return str(v)


def _texts(v: Any) -> list[str]:
  return [_text(x) for x in np.asarray(v, dtype=object).reshape(-1)]


def _dedup(items: list[str]) -> tuple[str, ...]:
  return tuple(dict.fromkeys(x for x in items if x))


def _examples(source: Sequence[dict[str, Any]], limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
  n = len(source) if limit is None else min(limit, len(source))
  for i in range(n):
    yield i, source[i]


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
  """Questions of ``natural_questions_open``, ``squad`` or ``trivia_qa``.

  Ids are the dataset's own (``id`` / ``question_id``) or, for
  ``natural_questions_open``, the example index. Errors name
  ``tfds:<dataset>/<split>`` and the 1-based example number as the "line".
  SQuAD questions have ``gold_pid=None`` here; use :func:`squad_open_domain`
  for questions linked to documents.
  """
  kind = DEFAULT_CONFIGS.get(name, name).split("/")[0]
  if kind not in DEFAULT_CONFIGS:
    raise ValueError(f"unsupported TFDS question dataset {name!r}; choose from {sorted(DEFAULT_CONFIGS)}")
  source = open_source(name, split, data_dir=data_dir, download=download)
  origin = f"tfds:{DEFAULT_CONFIGS.get(name, name)}/{split}"
  guard = BadRecordPolicy(origin, skip_bad, stats)
  for i, ex in _examples(source, limit):
    try:
      text = _question_text(ex, origin, i)
      if kind == "natural_questions_open":
        answers, qid = _dedup(_texts(ex["answer"])), str(i)
      elif kind == "squad":
        answers, qid = _dedup(_texts(ex["answers"]["text"])), _text(ex["id"])
      else:
        ans = ex["answer"]
        answers, qid = _dedup([_text(ans["value"])] + _texts(ans["aliases"])), _text(ex["question_id"])
      if not answers:
        raise DataFormatError(origin, i + 1, "has no non-empty answer", field="answer")
    except DataFormatError as e:
      guard.bad(e)
      continue
    guard.stats.records += 1
    yield Question(id=qid, question=text, answers=answers)
  guard.done()


def squad_open_domain(split: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                      config: str = DEFAULT_CONFIGS["squad"], first_doc_id: int = 0, limit: int | None = None,
                      skip_bad: bool = False, stats: ReadStats | None = None
                      ) -> tuple[list[Document], list[Question]]:
  """SQuAD as an open-domain task: its distinct contexts as documents, questions linked to them.

  Documents are numbered from ``first_doc_id`` in order of first appearance;
  each question's ``gold_pid`` is its context's document id.
  """
  source = open_source(config, split, data_dir=data_dir, download=download)
  origin = f"tfds:{config}/{split}"
  guard = BadRecordPolicy(origin, skip_bad, stats)
  doc_of: dict[tuple[str, str], int] = {}
  docs: list[Document] = []
  questions: list[Question] = []
  for i, ex in _examples(source, limit):
    try:
      text = _question_text(ex, origin, i)
      answers = _dedup(_texts(ex["answers"]["text"]))
      if not answers:
        raise DataFormatError(origin, i + 1, "has no non-empty answer", field="answers")
      title, context = _text(ex["title"]).replace("_", " "), _text(ex["context"])
    except DataFormatError as e:
      guard.bad(e)
      continue
    key = (title, context)
    if key not in doc_of:
      doc_of[key] = first_doc_id + len(docs)
      docs.append(Document(id=doc_of[key], title=title, text=context, source="squad"))
    questions.append(Question(id=_text(ex["id"]), question=text, answers=answers, gold_pid=doc_of[key]))
    guard.stats.records += 1
  guard.done()
  return docs, questions
