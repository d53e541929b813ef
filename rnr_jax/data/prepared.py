"""The prepared dataset directory: built once by ``python -m train.prepare``, read by every later stage.

Layout: ``manifest.json`` (written last: the inputs' sha256, settings, counts, metrics), ``passages.jsonl`` (pid = line
index), ``token_corpus/`` with its ``token_corpus.<bz2|lzma>/`` forms, ``bm25/``, and for each question file
``<split>.jsonl`` a ``splits/<split>/`` with ``questions.jsonl`` and the :class:`SplitCandidates` arrays.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rnr_jax.data.bm25 import BM25Index, resolve_stemmer
from rnr_jax.data.examples import DEFAULT_BM25_TOPK, DEFAULT_HARD_NEGATIVES, SplitCandidates, build_candidates
from rnr_jax.data.passages import DEFAULT_WORDS_PER_PASSAGE, PassageTable, split_documents
from rnr_jax.data.readers import Question, ReadStats, read_corpus, read_questions
from rnr_jax.data.token_corpus import COMPRESSORS, TokenCorpus, compress, compress_bytes, data_bytes
from rnr_jax.io import atomic_dir, atomic_write_json, sha256_file
from rnr_jax.metrics import DEFAULT_KS, AnswerMatcher, gold_recall_at_k, top_k_accuracy

FORMAT = "rnr_jax.prepared"
VERSION = 1
MANIFEST = "manifest.json"
CORPUS_FILE = "corpus.jsonl"
PASSAGES_FILE = PassageTable.FILE
TOKEN_CORPUS_DIR = "token_corpus"
BM25_DIR = "bm25"
SPLITS_DIR = "splits"
QUESTIONS_FILE = "questions.jsonl"


class PreparedDataError(RuntimeError):
  """A prepared directory is missing, incomplete or of another version."""


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  """Everything that changes the content of a prepared directory (the flags of ``train.prepare``)."""

  tokenizer: str | None = None  # None: the installed all-MiniLM-L6-v2
  words_per_passage: int = DEFAULT_WORDS_PER_PASSAGE
  bm25_topk: int = DEFAULT_BM25_TOPK
  hard_negatives: int = DEFAULT_HARD_NEGATIVES
  max_train_questions: int | None = None  # keep only the first N questions of each *_train split
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


def _write_token_corpus(tmp: str, table: PassageTable, tokenizer: Any, tokenizer_path: str,
                        methods: Sequence[str]) -> tuple[TokenCorpus, dict[str, float]]:
  """Writes the token-ID corpus and its compressed forms; returns it with their bytes per passage and the text's."""
  corpus_dir = os.path.join(tmp, TOKEN_CORPUS_DIR)
  corpus = TokenCorpus.write(corpus_dir, tokenizer.passage_token_ids(table.titles, table.texts),
                             tokenizer.vocab_size, tokenizer=tokenizer_path)
  n = len(table)
  text = "".join(f"{a}\t{b}\n" for a, b in zip(table.titles, table.texts)).encode()
  sizes = {"token_ids": round(data_bytes(corpus_dir) / n, 2), "text_utf8": round(len(text) / n, 2)}
  for method in methods:
    sizes[f"token_ids_{method}"] = round(data_bytes(compress(corpus_dir, method)) / n, 2)
    sizes[f"text_utf8_{method}"] = round(len(compress_bytes(text, method)) / n, 2)
  return corpus, sizes


def _prepare_split(split_dir: str, path: str, table: PassageTable, index: BM25Index, matcher: AnswerMatcher,
                   doc_ids: set[int], settings: PrepareSettings, limit: int | None,
                   n_threads: int | None) -> dict[str, Any]:
  """Builds and saves one split's questions and candidates; returns its manifest entry."""
  stats = ReadStats()
  questions = list(itertools.islice(read_questions(path, doc_ids=doc_ids, skip_bad=settings.skip_bad, stats=stats),
                                    limit))
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
  return {
      "questions": len(questions), "skipped_bad": stats.skipped,
      "with_gold": int((cands.gold.lengths() > 0).sum()), "with_positive": int((pos_len > 0).sum()),
      "trainable": len(cands.trainable()), "mean_positives": round(float(pos_len.mean()), 3) if len(pos_len) else 0.0,
      "bm25_depth": int(cands.bm25_pids.shape[1]), "metrics": metrics,
  }


def prepare(data_dir: str, out: str, settings: PrepareSettings = PrepareSettings(), *, n_threads: int | None = None,
            force: bool = False, echo: Callable[[str], None] = print) -> PrepareResult:
  """Builds ``out`` (replaced atomically) from ``corpus.jsonl`` and the question files of ``data_dir`` if outdated."""
  from rnr_jax.tokenization import Tokenizer, default_tokenizer_path  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  data_dir = os.fspath(data_dir)
  out = os.path.abspath(os.fspath(out))
  corpus_path = os.path.join(data_dir, CORPUS_FILE)
  if not os.path.isfile(corpus_path):
    raise FileNotFoundError(f"{data_dir}: no {CORPUS_FILE} (is --data_dir / RNR_DATA the shared data directory?)")
  paths = [p for pattern in ("*_train.jsonl", "*_dev.jsonl") for p in glob.glob(os.path.join(data_dir, pattern))]
  splits = {os.path.basename(p)[:-len(".jsonl")]: p for p in sorted(paths)}
  tokenizer_path = os.path.abspath(os.fspath(settings.tokenizer or default_tokenizer_path()))
  config = dataclasses.asdict(settings)
  config.update(tokenizer=_tokenizer_fingerprint(tokenizer_path), stemmer=resolve_stemmer(settings.stemmer),
                compress=list(settings.compress), splits=sorted(splits))
  sources = {os.path.basename(p): {"sha256": sha256_file(p), "size": os.path.getsize(p)}
             for p in [corpus_path, *splits.values()]}

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
    corpus_stats = ReadStats()
    docs = list(read_corpus(corpus_path, skip_bad=settings.skip_bad, stats=corpus_stats))
    if not docs:
      raise ValueError(f"{corpus_path}: no documents")
    table = split_documents(docs, settings.words_per_passage)
    table.write_jsonl(os.path.join(tmp, PASSAGES_FILE))
    echo(f"{len(docs)} documents -> {len(table)} passages of <= {settings.words_per_passage} words")
    t = lap("passages", t)

    token_corpus, sizes = _write_token_corpus(tmp, table, Tokenizer.from_pretrained(tokenizer_path),
                                              tokenizer_path, settings.compress)
    t = lap("token_corpus", t)

    index = BM25Index.build(table.titles, table.texts, stemmer=config["stemmer"], k1=settings.bm25_k1,
                            b=settings.bm25_b)
    index.save(os.path.join(tmp, BM25_DIR))
    echo(f"BM25 index over {len(index)} passages (stemmer: {index.stemmer})")
    t = lap("bm25_index", t)

    matcher = table.matcher()
    doc_ids = {d.id for d in docs}
    split_info: dict[str, Any] = {}
    for name, path in splits.items():
      limit = settings.max_train_questions if name.endswith("_train") else None
      split_info[name] = _prepare_split(os.path.join(tmp, SPLITS_DIR, name), path, table, index, matcher, doc_ids,
                                        settings, limit, n_threads)
      t = lap(f"split_{name}", t)

    manifest = {
        "format": FORMAT, "version": VERSION, "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "data_dir": os.path.abspath(data_dir), "tokenizer_path": tokenizer_path,
        "settings": config, "sources": sources,
        "counts": {"documents": len(docs), "passages": len(table), "tokens": int(len(token_corpus.tokens)),
                   "skipped_bad_documents": corpus_stats.skipped},
        "bytes_per_passage": sizes, "splits": split_info, "timings_s": timings,
    }
    timings["total"] = round(time.perf_counter() - t_start, 3)
    atomic_write_json(os.path.join(tmp, MANIFEST), manifest)
  return PrepareResult(out, manifest, built=True)


def summary_line(manifest: dict[str, Any]) -> dict[str, Any]:
  """The one-line JSON summary: passage count and BM25 accuracy of each dev split."""
  line: dict[str, Any] = {"passages": manifest["counts"]["passages"]}
  for name, info in manifest["splits"].items():
    if name.endswith("_dev"):
      acc = {f"bm25_top{k}_answer_acc": info["metrics"][f"bm25_top{k}_answer_acc"] for k in DEFAULT_KS}
      line[name] = {"questions": info["questions"], **acc}
  return {**line, "bytes_per_passage": manifest["bytes_per_passage"], "prepare_s": manifest["timings_s"]["total"]}


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
                              f"`python -m train.prepare --data_dir DATA --out {path}`")
    manifest = _read_manifest(path)
    if manifest is None:
      raise PreparedDataError(f"{path}: incomplete prepared dataset (no readable {MANIFEST}); "
                              f"rebuild it with `python -m train.prepare --out {path}`")
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
    return self._cached("passages", lambda: PassageTable.read_jsonl(os.path.join(self.path, PASSAGES_FILE)))

  @property
  def num_passages(self) -> int:
    return int(self.manifest["counts"]["passages"])

  def token_corpus(self, tokenizer: Any = None) -> TokenCorpus:
    """The memory-mapped token-ID corpus (``tokenizer`` enables ``text(i)``)."""
    corpus = self._cached("token_corpus", lambda: TokenCorpus.load(os.path.join(self.path, TOKEN_CORPUS_DIR)))
    if tokenizer is not None:
      corpus.tokenizer = tokenizer
    return corpus

  def bm25(self) -> BM25Index:
    return self._cached("bm25", lambda: BM25Index.load(os.path.join(self.path, BM25_DIR)))

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
