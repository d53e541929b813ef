"""Inputs of ``train.prepare`` and the pipeline: data files recognised by content and extension, TFDS datasets, a
data directory of our jsonl files, and slices of any of them (smoke and CI runs).

Corpus specs: our corpus jsonl, DPR ``psgs_w100.tsv`` (gzip too), a SQuAD json (its paragraphs) or
``tfds:squad/SPLIT`` (its contexts). Question specs: our question jsonl, NQ-open jsonl, DPR retriever json, DPR
``*.qa.csv``, a SQuAD json, or ``tfds:NAME/SPLIT`` for natural_questions_open, trivia_qa and squad. SQuAD questions
get their paragraph as gold document when the same file (or TFDS split) is also a corpus spec.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rnr_jax.data import readers as R
from rnr_jax.data.prepared import PreparedData, Source, prepare
from rnr_jax.io import atomic_write_text, sha256_file
from train import formats

CORPUS_FORMATS = ("jsonl", "dpr_tsv", "squad", "tfds")
QUESTION_FORMATS = ("jsonl", "dpr_json", "dpr_qa_csv", "squad", "tfds")


@dataclasses.dataclass
class TfdsOptions:
  """Where TFDS datasets are prepared (None: TFDS's default), whether tfds may download, and a cap on examples."""

  data_dir: str | None = None
  download: bool = False
  limit: int | None = None


def file_source(path: str, read: Any) -> Source:
  """The file at ``path`` read by ``read(path, skip_bad=..., stats=...)``."""
  return Source(path, lambda skip_bad, stats: read(path, skip_bad=skip_bad, stats=stats),
                {"sha256": sha256_file(path), "size": os.path.getsize(path)})


def detect_format(spec: str) -> str:
  """The format of a spec: ``tfds``, ``jsonl`` (ours or NQ-open), ``dpr_tsv``, ``dpr_json``, ``dpr_qa_csv`` or
  ``squad``, from its first bytes (gunzipped) and its extension."""
  if spec.startswith("tfds:"):
    return "tfds"
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"{spec}: no such file")
  name = spec.lower().removesuffix(".gz")
  with R.open_data(spec, text=True, encoding="utf-8-sig") as f:
    head = f.read(1 << 16)
  first_line = head.split("\n", 1)[0].rstrip("\r")
  stripped = head.lstrip()
  if name.endswith(".tsv") or {"id", "text", "title"} <= set(first_line.split("\t")):
    return "dpr_tsv"
  if name.endswith(".csv"):
    return "dpr_qa_csv"
  if stripped.startswith("["):
    return "dpr_json"
  if stripped.startswith("{"):
    try:
      first = json.loads(stripped.split("\n", 1)[0])
    except json.JSONDecodeError:
      return "squad"  # a document over several lines
    return "squad" if "data" in first else "jsonl"  # a record per line, or a SQuAD document on one line
  if "\t" in first_line:
    return "dpr_qa_csv"
  raise ValueError(f"{spec}: unrecognised data format; expected our jsonl, NQ-open jsonl, DPR psgs_w100.tsv, DPR "
                   "retriever json, DPR *.qa.csv, SQuAD json (gzip allowed) or tfds:NAME/SPLIT")


def _tfds_name(spec: str) -> tuple[str, str]:
  name, _, split = spec.removeprefix("tfds:").rpartition("/")
  if not name or not split:
    raise ValueError(f"{spec}: expected tfds:NAME/SPLIT, e.g. tfds:natural_questions_open/train")
  return name, split


class Sources:
  """Builds :class:`Source` objects from specs; one instance per prepare, since SQuAD specs used as corpus and as
  questions share the document numbering it records (SQuAD paragraphs are numbered from 0 across its corpus specs)."""

  def __init__(self, tfds: TfdsOptions | None = None):
    self.tfds = tfds or TfdsOptions()
    self._first_ids: dict[str, int] = {}  # SQuAD corpus spec -> id of its first paragraph
    self._next_id = 0

  def corpus(self, spec: str) -> Source:
    fmt = detect_format(spec)
    if fmt not in CORPUS_FORMATS:
      raise ValueError(f"{spec}: a {fmt} file holds questions, not a corpus; corpus formats: our corpus jsonl, DPR "
                       "psgs_w100.tsv, SQuAD json, tfds:squad/SPLIT")
    if fmt == "jsonl":
      return file_source(spec, R.read_corpus)
    if fmt == "dpr_tsv":
      return file_source(spec, formats.read_dpr_tsv)

    def squad_documents(skip_bad: bool, stats: R.ReadStats) -> Iterator[R.Document]:
      if fmt == "squad":
        return (p.document for p in formats.read_squad(spec, first_doc_id=first, skip_bad=skip_bad, stats=stats))
      return iter(self._tfds_squad(spec, first, skip_bad, stats)[0])

    # Numbered now, after the SQuAD corpora before it, so that its questions link to it whatever is read first.
    self._first_ids[spec] = first = self._next_id
    self._next_id += sum(1 for _ in squad_documents(True, R.ReadStats()))
    return self._source(spec, squad_documents)

  def questions(self, spec: str) -> Source:
    fmt = detect_format(spec)
    if fmt not in QUESTION_FORMATS:
      raise ValueError(f"{spec}: a {fmt} file is a corpus, not questions")
    readers = {"jsonl": R.read_questions, "dpr_json": formats.read_dpr_questions,
               "dpr_qa_csv": formats.read_dpr_qa_csv}
    if fmt in readers:
      return file_source(spec, readers[fmt])

    def squad_questions(skip_bad: bool, stats: R.ReadStats) -> Iterator[R.Question]:
      first = self._first_ids.get(spec)
      if fmt == "squad":
        for p in formats.read_squad(spec, first_doc_id=first or 0, skip_bad=skip_bad, stats=stats):
          yield from (q if first is not None else dataclasses.replace(q, gold_pid=None) for q in p.questions)
      elif _tfds_name(spec)[0].split("/")[0] == "squad":
        yield from self._tfds_squad(spec, first or 0, skip_bad, stats, linked=first is not None)[1]
      else:
        from train import tfds_sources  # pylint: disable=import-outside-toplevel  (tfds is heavy)

        name, split = _tfds_name(spec)
        yield from tfds_sources.tfds_questions(name, split, data_dir=self.tfds.data_dir, download=self.tfds.download,
                                               limit=self.tfds.limit, skip_bad=skip_bad, stats=stats)

    return self._source(spec, squad_questions)

  def _source(self, spec: str, read: Any) -> Source:
    identity = {"tfds_data_dir": self.tfds.data_dir, "limit": self.tfds.limit} if spec.startswith("tfds:") else {
        "sha256": sha256_file(spec), "size": os.path.getsize(spec)}
    return Source(spec, read, identity)

  def _tfds_squad(self, spec: str, first: int, skip_bad: bool, stats: R.ReadStats, linked: bool = True
                  ) -> tuple[list[R.Document], list[R.Question]]:
    from train import tfds_sources  # pylint: disable=import-outside-toplevel  (tfds is heavy)

    name, split = _tfds_name(spec)
    docs, questions = tfds_sources.squad_open_domain(
        split, data_dir=self.tfds.data_dir, download=self.tfds.download, first_doc_id=first, limit=self.tfds.limit,
        skip_bad=skip_bad, stats=stats, **({"config": name} if "/" in name else {}))
    return docs, questions if linked else [dataclasses.replace(q, gold_pid=None) for q in questions]


def parse_questions(items: Sequence[str]) -> dict[str, str]:
  """``["NAME=SPEC", ...]`` as ``{name: spec}``: a name ending in ``_train`` is a training split, ``_dev`` a dev one."""
  out: dict[str, str] = {}
  for item in items:
    name, sep, spec = item.partition("=")
    if not sep or not spec or not name.endswith(("_train", "_dev")):
      raise ValueError(f"{item!r}: expected NAME=SPEC with a NAME ending in _train or _dev, e.g. nq_dev=dev.jsonl")
    if name in out:
      raise ValueError(f"question split {name!r} given twice")
    out[name] = spec
  return out


def data_dir_specs(data_dir: str) -> tuple[list[str], dict[str, str]]:
  """The specs of a data directory of our jsonl files: ``corpus.jsonl`` and ``*_train.jsonl`` / ``*_dev.jsonl``."""
  corpus = os.path.join(data_dir, "corpus.jsonl")
  if not os.path.isfile(corpus):
    raise FileNotFoundError(f"{data_dir}: no corpus.jsonl (is --data_dir / RNR_DATA the shared data directory?)")
  paths = sorted(p for pattern in ("*_train.jsonl", "*_dev.jsonl") for p in glob.glob(os.path.join(data_dir, pattern)))
  return [corpus], {os.path.basename(p)[:-len(".jsonl")]: p for p in paths}


def build(corpus: Sequence[str], questions: Mapping[str, str], tfds: TfdsOptions | None = None
          ) -> tuple[list[Source], dict[str, Source]]:
  """:class:`Source` objects of corpus and question specs."""
  s = Sources(tfds)
  return [s.corpus(c) for c in corpus], {name: s.questions(spec) for name, spec in questions.items()}


def data_dir_sources(data_dir: str) -> tuple[list[Source], dict[str, Source]]:
  """The sources of a data directory of our jsonl files (:func:`data_dir_specs`)."""
  return build(*data_dir_specs(data_dir))


def _write_jsonl(path: str, rows: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> None:
  atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_slice(corpus: Sequence[Source], questions: Mapping[str, Source], out: str, num_questions: int,
                distractors: int, seed: int = 0) -> tuple[list[str], dict[str, str]]:
  """A small data directory of our jsonl files: the first ``num_questions`` of each split, their gold and given
  documents, and ``distractors`` other documents drawn uniformly (reservoir sampling, one pass over the corpus)."""
  rng = np.random.default_rng(seed)
  os.makedirs(out, exist_ok=True)
  kept = {name: [q for _, q in zip(range(num_questions), s.read(False, R.ReadStats()))] for name, s in
          questions.items()}
  wanted = {d for qs in kept.values() for q in qs for d in (q.gold_pid, *q.positive_docs, *q.negative_docs)}
  gold, pool = [], []
  seen = 0
  for source in corpus:
    for doc in source.read(False, R.ReadStats()):
      if doc.id in wanted:
        gold.append(doc)
        continue
      seen += 1
      if len(pool) < distractors:
        pool.append(doc)
      elif (j := int(rng.integers(seen))) < distractors:
        pool[j] = doc
  _write_jsonl(os.path.join(out, "corpus.jsonl"),
               [{"id": d.id, "title": d.title, "text": d.text, "source": d.source} for d in gold + pool])
  for name, qs in kept.items():
    _write_jsonl(os.path.join(out, f"{name}.jsonl"), [q.to_json() for q in qs])
  return [os.path.join(out, "corpus.jsonl")], {name: os.path.join(out, f"{name}.jsonl") for name in kept}


def prepared_data(config: Any, workdir: str) -> PreparedData:
  """A stage's data: ``config.prepared_dir``, or ``<workdir>/prepared`` built (or found up to date) from the jsonl
  files of ``config.data_dir`` by process 0 while the others wait."""
  if config.prepared_dir:
    return PreparedData.load(config.prepared_dir)
  if "://" in workdir:  # memory-mapped arrays need a local file system
    raise ValueError(f"{workdir}: prepared data is read from a local disk; build it with train.prepare --out DIR "
                     "there and pass --config.prepared_dir=DIR")
  path = os.path.join(workdir, "prepared")
  if jax.process_index() == 0:
    prepare(*data_dir_sources(config.data_dir), path, echo=lambda s: logging.info("%s", s))
  multihost_utils.sync_global_devices("train.sources.prepared_data")
  return PreparedData.load(path)
