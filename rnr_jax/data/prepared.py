"""The prepared dataset directory: built once by ``python -m train.prepare``, read by every later stage.

``manifest.json`` (written last), the passage table, ``token_corpus/``, ``bm25/`` and ``splits/<split>/``; sources
stream, so a corpus of any size is prepared in bounded memory (docs/design.md, "Data preparation")."""

from __future__ import annotations

import bz2
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import lzma
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rnr_jax.data.bm25 import BM25Builder, BM25Index, resolve_stemmer
from rnr_jax.data.examples import DEFAULT_BM25_TOPK, DEFAULT_HARD_NEGATIVES, SplitCandidates, build_candidates
from rnr_jax.data.passages import DEFAULT_WORDS_PER_PASSAGE, PassageTable, PassageWriter
from rnr_jax.data.readers import DataFormatError, Document, Question, ReadStats, read_questions
from rnr_jax.data.token_corpus import COMPRESSORS, LEVEL_ARG, TokenCorpus
from rnr_jax.io import atomic_dir, atomic_write_json, sha256_file
from rnr_jax.metrics import DEFAULT_KS, AnswerMatcher, gold_recall_at_k, top_k_accuracy

logger = logging.getLogger(__name__)

FORMAT = "rnr_jax.prepared"
VERSION = 1  # directories without the passage table's column files still read
MANIFEST = "manifest.json"
PASSAGES_FILE = PassageTable.FILE
TOKEN_CORPUS_DIR = "token_corpus"
BM25_DIR = "bm25"
SPLITS_DIR = "splits"
QUESTIONS_FILE = "questions.jsonl"
CHUNK = 8192  # passages tokenised at once
# Compressed sizes per passage are measured on the passages in a stream's first 64 MiB (all of a corpus of up to
# ~150k passages): lzma -9 compresses about 1 MB/s, hours for DPR's 9 GB of Wikipedia text.
SIZE_SAMPLE_BYTES = 64 << 20


class PreparedDataError(RuntimeError):
  """A prepared directory is missing, incomplete or of another version."""


@dataclasses.dataclass(frozen=True)
class Source:
  """An input of :func:`prepare`: ``spec`` names it (a path, or ``tfds:name/split``), ``read(skip_bad, stats)`` streams
  its documents or questions, and ``identity`` (a file's sha256 and size, a dataset's version) marks a change."""

  spec: str
  read: Callable[[bool, ReadStats], Iterator[Any]]
  identity: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  """Everything that changes the content of a prepared directory (the flags of ``train.prepare``)."""

  tokenizer: str | None = None  # None: the installed all-MiniLM-L6-v2
  words_per_passage: int = DEFAULT_WORDS_PER_PASSAGE
  bm25_topk: int = DEFAULT_BM25_TOPK
  hard_negatives: int = DEFAULT_HARD_NEGATIVES
  max_train_questions: int | None = None  # keep only the first N questions of each *_train split
  # The last N questions of each *_train split become its held-out split (nq_train -> nq_holdout): never trained
  # on, they choose checkpoints and inference settings without looking at the dev sets.
  holdout: int = 0
  stemmer: str = "auto"  # see bm25.resolve_stemmer
  bm25_k1: float = 1.5
  bm25_b: float = 0.75
  compress: tuple[str, ...] = ("bz2", "lzma")
  skip_bad: bool = False

  def __post_init__(self) -> None:
    if self.words_per_passage < 1 or self.bm25_topk < 1 or self.hard_negatives < 0:
      raise ValueError(f"need words_per_passage >= 1, bm25_topk >= 1, hard_negatives >= 0: {self}")
    if self.max_train_questions is not None and self.max_train_questions < 1:
      raise ValueError(f"max_train_questions must be >= 1 or None, got {self.max_train_questions}")
    if self.holdout < 0:
      raise ValueError(f"holdout must be >= 0, got {self.holdout}")
    if unknown := set(self.compress) - set(COMPRESSORS):
      raise ValueError(f"unknown compression(s) {sorted(unknown)}; choose from {sorted(COMPRESSORS)}")


@dataclasses.dataclass(frozen=True)
class PrepareResult:
  """What :func:`prepare` did: ``built`` False means the directory was up to date."""

  path: str
  manifest: dict[str, Any]
  built: bool


def _tokenizer_fingerprint(path: str) -> str:
  """sha256 over the tokenizer files that define the ids."""
  h = hashlib.sha256()
  names = [n for n in ("tokenizer.json", "vocab.txt") if os.path.exists(os.path.join(path, n))]
  if not names:
    raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")
  for name in names:
    h.update(name.encode() + sha256_file(os.path.join(path, name)).encode())
  return h.hexdigest()


def _read_manifest(path: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


class _Corpus:
  """The documents of the corpus sources, checked (ids unique, not empty) and cut into passages as they stream."""

  def __init__(self, sources: Sequence[Source], skip_bad: bool):
    self.sources, self.skip_bad = sources, skip_bad
    self.doc_ids: set[int] = set()
    self.stats = ReadStats()
    self.empty = 0

  def documents(self) -> Iterator[Document]:
    for source in self.sources:
      for doc in source.read(self.skip_bad, self.stats):
        if not doc.title.strip() and not doc.text.strip():
          self.empty += 1  # it would be a passage of nothing
        elif doc.id in self.doc_ids:
          _reject(DataFormatError(source.spec, doc.line, f"is a duplicate: an earlier document has id {doc.id}",
                                  field="id"), self.skip_bad, self.stats)
        else:
          self.doc_ids.add(doc.id)
          yield doc
    if self.empty:
      logger.warning("left out %d document(s) with an empty title and text", self.empty)

  def passage_chunks(self, writer: PassageWriter) -> Iterator[tuple[list[str], list[str]]]:
    """``(titles, texts)`` of up to :data:`CHUNK` passages at a time, each written to ``writer`` first."""
    titles: list[str] = []
    texts: list[str] = []
    for doc in self.documents():
      pieces = writer.add_document(doc)
      titles += [doc.title] * len(pieces)
      texts += pieces
      if len(texts) >= CHUNK:
        yield titles, texts
        titles, texts = [], []
    if texts:
      yield titles, texts


class _TextSizes:
  """UTF-8 bytes per passage of the ``title TAB text`` lines, plain and (on the sample) compressed."""

  def __init__(self, methods: Sequence[str]):
    self._compressors = {m: bz2.BZ2Compressor(9) if m == "bz2" else lzma.LZMACompressor(preset=9) for m in methods}
    self._bytes = dict.fromkeys(["", *methods], 0)
    self._sample_bytes = self._sampled = 0

  def add(self, titles: Sequence[str], texts: Sequence[str]) -> None:
    data = "".join(f"{a}\t{b}\n" for a, b in zip(titles, texts)).encode()
    self._bytes[""] += len(data)
    if self._sample_bytes < SIZE_SAMPLE_BYTES:
      self._sample_bytes += len(data)
      self._sampled += len(texts)
      for m, c in self._compressors.items():
        self._bytes[m] += len(c.compress(data))

  def per_passage(self, n: int) -> dict[str, float]:
    for m, c in self._compressors.items():
      self._bytes[m] += len(c.flush())
    return {"text_utf8" + (m and "_" + m): round(v / (n if not m else self._sampled), 2)
            for m, v in self._bytes.items()}


def _token_id_sizes(corpus: TokenCorpus, methods: Sequence[str]) -> dict[str, float]:
  """Bytes per passage of the token-ID arrays, plain and compressed (on the sample)."""
  tokens, offsets = corpus.tokens, corpus.offsets
  sizes = {"token_ids": round((tokens.nbytes + offsets.nbytes) / len(corpus), 2)}
  sampled = max(1, int(np.searchsorted(offsets, SIZE_SAMPLE_BYTES // tokens.itemsize, side="right")) - 1)
  data = (np.asarray(tokens[:offsets[sampled]]).tobytes(), np.asarray(offsets[:sampled + 1]).tobytes())
  for m in methods:
    packed = sum(len(COMPRESSORS[m].compress(d, **{LEVEL_ARG[m]: 9})) for d in data)
    sizes[f"token_ids_{m}"] = round(packed / sampled, 2)
  return sizes


def _reject(error: DataFormatError, skip_bad: bool, stats: ReadStats) -> None:
  """Raises ``error``, or with ``skip_bad`` counts it."""
  if not skip_bad:
    raise error
  stats.skip(error)


def _split_questions(source: Source, doc_ids: set[int], skip_bad: bool, stats: ReadStats, limit: int | None
                     ) -> list[Question]:
  """The questions of a split, checked: ids unique, ``gold_pid`` a document of the corpus."""
  seen: set[str] = set()

  def checked() -> Iterator[Question]:
    for q in source.read(skip_bad, stats):
      if q.id in seen:
        _reject(DataFormatError(source.spec, q.line, f"is a duplicate: an earlier question has id {q.id!r}",
                                field="id"), skip_bad, stats)
      elif q.gold_pid is not None and q.gold_pid not in doc_ids:
        _reject(DataFormatError(source.spec, q.line, f"{q.gold_pid} is not a document id of the corpus",
                                field="gold_pid"), skip_bad, stats)
      else:
        seen.add(q.id)
        yield q

  return list(itertools.islice(checked(), limit))


def holdout_name(train_split: str) -> str:
  """The held-out split of a training split: ``nq_train`` -> ``nq_holdout``."""
  return train_split.removesuffix("_train") + "_holdout"


def _read_splits(name: str, source: Source, doc_ids: set[int], settings: PrepareSettings
                 ) -> dict[str, tuple[list[Question], ReadStats]]:
  """One source's questions as ``{split: (questions, stats)}``: a training split is cut to its first
  ``max_train_questions`` after its last ``holdout`` questions went to its held-out split."""
  stats = ReadStats()
  if not name.endswith("_train"):
    return {name: (_split_questions(source, doc_ids, settings.skip_bad, stats, None), stats)}
  if not settings.holdout:
    return {name: (_split_questions(source, doc_ids, settings.skip_bad, stats, settings.max_train_questions), stats)}
  questions = _split_questions(source, doc_ids, settings.skip_bad, stats, None)
  if len(questions) <= settings.holdout:
    raise ValueError(f"{source.spec}: {len(questions)} questions, not more than the {settings.holdout} to hold out")
  train = questions[:-settings.holdout][:settings.max_train_questions]
  return {name: (train, stats), holdout_name(name): (questions[-settings.holdout:], ReadStats())}


def _prepare_split(split_dir: str, spec: str, questions: list[Question], stats: ReadStats, table: PassageTable,
                   index: BM25Index, matcher: AnswerMatcher, settings: PrepareSettings,
                   n_threads: int | None) -> dict[str, Any]:
  """Builds and saves one split's questions and candidates; returns its manifest entry."""
  cands = build_candidates(questions, table, index, matcher, k=settings.bm25_topk,
                           num_hard_negatives=settings.hard_negatives, n_threads=n_threads)
  os.makedirs(split_dir)
  with open(os.path.join(split_dir, QUESTIONS_FILE), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(q.to_json(), ensure_ascii=False) + "\n" for q in questions)
  cands.save(split_dir)
  acc = top_k_accuracy(np.asarray(cands.bm25_has_answer), DEFAULT_KS)
  recall = gold_recall_at_k(np.asarray(cands.bm25_pids), [cands.gold[i] for i in range(len(cands))], DEFAULT_KS)
  metrics = {f"bm25_top{k}_answer_acc": round(v, 4) for k, v in acc.items()}
  metrics.update({f"bm25_gold_recall@{k}": round(v, 4) for k, v in recall.items()})
  pos_len = cands.positives.lengths()
  return {"spec": spec, "questions": len(questions), "skipped_bad": stats.skipped, "no_answer": stats.excluded,
          "with_gold": int((cands.gold.lengths() > 0).sum()), "with_positive": int((pos_len > 0).sum()),
          "trainable": len(cands.trainable()),
          "mean_positives": round(float(pos_len.mean()), 3) if len(pos_len) else 0.0,
          "given_documents_missing": cands.given_missing, "bm25_depth": int(cands.bm25_pids.shape[1]),
          "metrics": metrics}


def prepare(corpus: Sequence[Source], questions: Mapping[str, Source], out: str,
            settings: PrepareSettings = PrepareSettings(), *, n_threads: int | None = None, force: bool = False,
            echo: Callable[[str], None] = print) -> PrepareResult:
  """Builds ``out`` atomically from the corpus and ``{split: source}`` questions (``*_train``: training) if stale."""
  from rnr_jax.tokenization import Tokenizer, default_tokenizer_path  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  out = os.path.abspath(os.fspath(out))
  if not corpus:
    raise ValueError("no corpus source given")
  tokenizer_path = os.path.abspath(os.fspath(settings.tokenizer or default_tokenizer_path()))
  config = dataclasses.asdict(settings)
  config.update(tokenizer=_tokenizer_fingerprint(tokenizer_path), stemmer=resolve_stemmer(settings.stemmer),
                compress=list(settings.compress), splits=sorted(questions))
  sources = {"corpus": [{"spec": s.spec, **s.identity} for s in corpus],
             "questions": {name: {"spec": s.spec, **s.identity} for name, s in sorted(questions.items())}}

  old = _read_manifest(out)
  if (not force and old is not None and old.get("format") == FORMAT and old.get("version") == VERSION
      and old.get("settings") == config and old.get("sources") == sources):
    return PrepareResult(out, old, built=False)

  timings: dict[str, float] = {}

  def lap(name: str, since: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - since, 3)
    return now

  with atomic_dir(out) as tmp:
    t = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(tokenizer_path)
    docs = _Corpus(corpus, settings.skip_bad)
    bm25 = BM25Builder(tmp, stemmer=config["stemmer"], k1=settings.bm25_k1, b=settings.bm25_b)
    text = _TextSizes(settings.compress)
    with PassageWriter(os.path.join(tmp, PASSAGES_FILE), settings.words_per_passage) as writer:

      def records() -> Iterator[np.ndarray]:
        for titles, texts in docs.passage_chunks(writer):
          bm25.add(titles, texts)
          text.add(titles, texts)
          yield from tokenizer.passage_token_ids(titles, texts)

      token_corpus = TokenCorpus.write(os.path.join(tmp, TOKEN_CORPUS_DIR), records(), tokenizer.vocab_size,
                                       tokenizer=tokenizer_path)
    n = len(token_corpus)
    if not n:
      raise ValueError(f"{', '.join(s.spec for s in corpus)}: no documents")
    echo(f"{len(docs.doc_ids)} documents -> {n} passages of <= {settings.words_per_passage} words")
    t = lap("passages_and_tokens", t)

    index = bm25.build()
    index.save(os.path.join(tmp, BM25_DIR))
    del index  # searched below memory-mapped
    echo(f"BM25 index over {n} passages (stemmer: {bm25.stemmer})")
    t = lap("bm25_index", t)

    sizes = {**_token_id_sizes(token_corpus, settings.compress), **text.per_passage(n)}
    t = lap("compress", t)

    table = PassageTable.open(os.path.join(tmp, PASSAGES_FILE))
    index = BM25Index.load(os.path.join(tmp, BM25_DIR), mmap=True)
    matcher = table.matcher()
    split_info: dict[str, Any] = {}
    for name, source in sorted(questions.items()):
      for split, (qs, stats) in _read_splits(name, source, docs.doc_ids, settings).items():
        split_info[split] = _prepare_split(os.path.join(tmp, SPLITS_DIR, split), source.spec, qs, stats, table,
                                           index, matcher, settings, n_threads)
      t = lap(f"split_{name}", t)

    manifest = {"format": FORMAT, "version": VERSION, "created": datetime.datetime.now(datetime.UTC).isoformat(),
                "tokenizer_path": tokenizer_path, "settings": config, "sources": sources,
                "counts": {"documents": len(docs.doc_ids), "passages": n, "tokens": int(len(token_corpus.tokens)),
                           "skipped_bad_documents": docs.stats.skipped, "empty_documents": docs.empty},
                "bytes_per_passage": sizes, "splits": split_info, "timings_s": timings}
    timings["total"] = round(time.perf_counter() - t_start, 3)
    atomic_write_json(os.path.join(tmp, MANIFEST), manifest)
  return PrepareResult(out, manifest, built=True)


class PreparedData:
  """Read access to a prepared directory; its parts load lazily, once, and arrays are memory-mapped."""

  def __init__(self, path: str, manifest: dict[str, Any]):
    self.path = path
    self.manifest = manifest
    self._cache: dict[Any, Any] = {}

  def _cached(self, key: Any, load: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = load()
    return self._cache[key]

  @classmethod
  def load(cls, path: str | os.PathLike) -> "PreparedData":
    """Opens ``path``; :class:`PreparedDataError` if it is missing or incomplete."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
      raise PreparedDataError(f"{path}: no prepared dataset here; build it with "
                              f"`python -m train.prepare --corpus CORPUS --questions NAME=FILE --out {path}`")
    manifest = _read_manifest(path)
    if manifest is None:
      raise PreparedDataError(f"{path}: incomplete prepared dataset (no readable {MANIFEST}); rebuild it with "
                              "python -m train.prepare")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
      raise PreparedDataError(f"{path}: prepared format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r}, this code reads {FORMAT!r} version {VERSION}; rebuild it")
    required = [PASSAGES_FILE, TOKEN_CORPUS_DIR, BM25_DIR] + [os.path.join(SPLITS_DIR, s) for s in manifest["splits"]]
    if missing := [r for r in required if not os.path.exists(os.path.join(path, r))]:
      raise PreparedDataError(f"{path}: incomplete prepared dataset, missing {missing}; rebuild it")
    return cls(path, manifest)

  @property
  def splits(self) -> list[str]:
    return list(self.manifest["splits"])

  @property
  def tokenizer_path(self) -> str:
    return self.manifest["tokenizer_path"]

  @property
  def passages(self) -> PassageTable:
    return self._cached("passages", lambda: PassageTable.open(os.path.join(self.path, PASSAGES_FILE)))

  @property
  def num_passages(self) -> int:
    return int(self.manifest["counts"]["passages"])

  def token_corpus(self) -> TokenCorpus:
    """The memory-mapped token-ID corpus."""
    return self._cached("token_corpus", lambda: TokenCorpus.load(os.path.join(self.path, TOKEN_CORPUS_DIR)))

  def bm25(self) -> BM25Index:
    return self._cached("bm25", lambda: BM25Index.load(os.path.join(self.path, BM25_DIR), mmap=True))

  def matcher(self) -> AnswerMatcher:
    """DPR ``has_answer`` over the passages, one shared cache of passage tokens."""
    return self._cached("matcher", lambda: self.passages.matcher())

  def _split_dir(self, split: str) -> str:
    if split not in self.manifest["splits"]:
      raise KeyError(f"no split {split!r} in {self.path}; splits: {self.splits}")
    return os.path.join(self.path, SPLITS_DIR, split)

  def questions(self, split: str) -> list[Question]:
    """The split's questions; index q matches row q of :meth:`candidates`."""
    return self._cached(("questions", split),
                        lambda: list(read_questions(os.path.join(self._split_dir(split), QUESTIONS_FILE))))

  def candidates(self, split: str) -> SplitCandidates:
    """BM25 candidates, gold passages, positives and hard negatives of the split."""
    return self._cached(("candidates", split), lambda: SplitCandidates.load(self._split_dir(split)))
