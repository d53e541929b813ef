"""The in-memory QA system: encode questions, search the index, read the top passages, answer.

One :class:`QASystem` serves a freshly trained model (:meth:`~QASystem.from_parts`) and a deployed bundle
(:meth:`~QASystem.from_bundle`) alike. A bundle ships token ids only (paper §2.3), so its texts are decoded from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rnr_jax import lexical, reader, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.bundle import BundleError, load_bundle
from rnr_jax.data.token_corpus import TokenCorpus, save_npy
from rnr_jax.index import DenseIndex
from rnr_jax.lexical import LexicalIndex
from rnr_jax.models import Params
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.training import mesh as mesh_lib

RULES = ("dpr", "weighted", "fused")
PASSAGE_IDS_FILE = "passage_ids.npy"  # In a token-ID corpus directory: int64 [n], the passage id of each row.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
NO_PASSAGE = rd.NO_PASSAGE


def encode_passages(spec: SystemSpec, params: Params, tokenizer: tk.Tokenizer, records: Sequence[np.ndarray],
                    mesh: Mesh, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
  """float32 ``[len(records), dim]`` passage vectors of token-ID records (``params`` placed on ``mesh``)."""
  parallel = mesh_lib.data_parallelism(mesh)
  encoder = retrieval.BatchEncoder(spec.embed_fns()[1], mesh, -(-batch_size // parallel) * parallel)
  r = spec.retriever
  return retrieval.encode_corpus(encoder, params, tokenizer, records, max_len=r.passage_len, buckets=r.buckets,
                                 token_type=r.passage_token_type, progress=progress).vectors


class PassageStore:
  """Token-ID records by passage id, edits held in memory until :meth:`write` saves a new corpus directory."""

  def __init__(self, corpus: TokenCorpus, passage_ids: np.ndarray | None = None):
    ids = np.arange(len(corpus), dtype=np.int64) if passage_ids is None else np.asarray(passage_ids)
    if ids.shape != (len(corpus),) or ids.dtype.kind not in "iu":
      raise ValueError(f"passage_ids must be {len(corpus)} integers, got {ids.dtype}{list(ids.shape)}")
    ids = ids.astype(np.int64)
    if len(ids) and (ids.min() < 0 or len(np.unique(ids)) != len(ids)):
      raise ValueError("passage_ids must be unique and non-negative")
    self.corpus = corpus
    self._ids = ids
    self._order = np.argsort(ids, kind="stable")
    self._removed = np.zeros(len(ids), bool)
    self._edited: dict[int, np.ndarray] = {}  # Added or replaced records.
    self._edited_texts: dict[int, tuple[str, str]] = {}  # Their (title, text), when given.
    self.version = 0  # Counts edits, so indexes built over the passages know when they are stale.

  @classmethod
  def load(cls, directory: str | os.PathLike) -> PassageStore:
    """A corpus directory with an optional ``passage_ids.npy`` (absent: row i is passage i)."""
    ids_path = os.path.join(directory, PASSAGE_IDS_FILE)
    return cls(TokenCorpus.load(directory), np.load(ids_path, allow_pickle=False) if os.path.exists(ids_path) else None)

  def _row(self, pid: int) -> int:
    """Corpus row of a live, unedited passage, else -1."""
    if not len(self._ids):
      return -1
    pos = min(int(np.searchsorted(self._ids, pid, sorter=self._order)), len(self._ids) - 1)
    row = int(self._order[pos])
    return row if self._ids[row] == pid and not self._removed[row] else -1

  def __contains__(self, pid: int) -> bool:
    return int(pid) in self._edited or self._row(int(pid)) >= 0

  def __getitem__(self, pid: int) -> np.ndarray:
    """The ``title [SEP] text`` ids of a passage (``int32``)."""
    pid = int(pid)
    if pid in self._edited:
      return self._edited[pid]
    row = self._row(pid)
    if row < 0:
      raise KeyError(f"no passage with id {pid}")
    return self.corpus[row]

  def __len__(self) -> int:
    return int(len(self._ids) - self._removed.sum() + len(self._edited))

  @property
  def ids(self) -> np.ndarray:
    """Ids of the live passages: unedited corpus rows in order, then added or replaced ones."""
    return np.concatenate([self._ids[~self._removed], np.fromiter(self._edited, np.int64, len(self._edited))])

  @property
  def pending_edits(self) -> int:
    return int(self._removed.sum() + len(self._edited))

  def next_id(self) -> int:
    """One more than the largest passage id ever held (removed ones included), so new ids are never reused."""
    return int(max(self._ids.max(initial=-1), max(self._edited, default=-1))) + 1

  def edited_text(self, pid: int) -> tuple[str, str] | None:
    """``(title, text)`` given with an added or replaced passage, else None."""
    return self._edited_texts.get(int(pid))

  def put(self, pids: Sequence[int], records: Sequence[np.ndarray],
          texts: Sequence[tuple[str, str]] | None = None) -> None:
    """Adds passages or replaces the records of existing ones (``texts``: their ``(title, text)``)."""
    if len(pids) != len(records) or (texts is not None and len(texts) != len(pids)):
      raise ValueError(f"{len(pids)} passage ids for {len(records)} records")
    self.version += 1
    for i, (pid, record) in enumerate(zip(pids, records)):
      pid = int(pid)
      row = self._row(pid)
      if row >= 0:
        self._removed[row] = True
      self._edited[pid] = np.asarray(record, np.int32)
      self._edited_texts.pop(pid, None)
      if texts is not None:
        self._edited_texts[pid] = texts[i]

  def delete(self, pids: Iterable[int]) -> None:
    """Removes passages; ``KeyError`` (and nothing removed) if one is absent."""
    pids = [int(p) for p in pids]
    missing = [p for p in pids if p not in self]
    if missing:
      raise KeyError(f"no passages with ids {missing[:10]}")
    self.version += 1
    for pid in pids:
      self._edited_texts.pop(pid, None)
      if self._edited.pop(pid, None) is None:
        self._removed[self._row(pid)] = True

  def write(self, directory: str | os.PathLike) -> None:
    """Writes the live passages as a token-ID corpus directory with ``passage_ids.npy``."""
    ids = self.ids
    write_passages(directory, [self[p] for p in ids.tolist()], ids, self.corpus.meta["vocab_size"],
                   self.corpus.meta.get("tokenizer"))


def write_passages(directory: str | os.PathLike, records: Sequence[np.ndarray], passage_ids: np.ndarray,
                   vocab_size: int, tokenizer: str | None = None) -> None:
  """Writes records as a token-ID corpus directory whose row i holds passage ``passage_ids[i]``."""
  if len(records) != len(passage_ids):
    raise ValueError(f"{len(records)} records for {len(passage_ids)} passage ids")
  TokenCorpus.write(directory, records, vocab_size, tokenizer=tokenizer)
  save_npy(os.path.join(directory, PASSAGE_IDS_FILE), np.asarray(passage_ids, np.int64))


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """Default answering settings (a bundle's ``config.json["inference"]``; rules: :func:`rnr_jax.reader.select_answer`).

  ``lexical_weight`` > 0 ranks passages by ``dense + lexical_weight * BM25`` over the two retrievals' top
  ``lexical_candidates`` (:func:`rnr_jax.lexical.fuse`); 0 retrieves by the dense index alone, as the paper does."""

  top_k: int = 20
  read_passages: int = 10
  rule: str = "dpr"
  passage_score_weight: float = 0.8
  retrieval_scale: float = 20.0
  lexical_weight: float = 0.0
  lexical_candidates: int = lexical.CANDIDATES
  question_batch: int = 32
  read_batch: int = 4

  def __post_init__(self) -> None:
    if self.rule not in RULES:
      raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
    if min(self.top_k, self.read_passages, self.question_batch, self.read_batch) < 1:
      raise ValueError(f"top_k, read_passages, question_batch and read_batch must be >= 1: {self}")
    if not 0.0 <= self.passage_score_weight <= 1.0:
      raise ValueError(f"passage_score_weight must be in [0, 1], got {self.passage_score_weight}")
    if not (self.retrieval_scale > 0.0 and np.isfinite(self.retrieval_scale)):
      raise ValueError(f"retrieval_scale must be a finite number > 0, got {self.retrieval_scale}")
    if not (self.lexical_weight >= 0.0 and np.isfinite(self.lexical_weight)):
      raise ValueError(f"lexical_weight must be a finite number >= 0, got {self.lexical_weight}")
    if self.lexical_candidates < 1:
      raise ValueError(f"lexical_candidates must be >= 1, got {self.lexical_candidates}")

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> InferenceSettings:
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The answer to one question from passage ``passage_id``: its character range in ``passage`` (-1 if unknown),
  ``score`` under the rule, the passage's ``retrieval_score`` and ``rank`` (0 = best). Without a retrieved passage
  with text: answer "", ids, ranges and rank -1, scores 0."""

  question: str
  answer: str
  passage_id: int
  title: str
  passage: str
  answer_start: int
  answer_end: int
  score: float
  retrieval_score: float
  rank: int

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Results:
  """Retrieved ``passage_ids`` (``int64[Q, k]``, best first, -1: empty slot), their ``passage_scores``
  (``float32[Q, k]``) and ``predictions`` (``{m': [Prediction per question]}`` reading the first m' passages)."""

  passage_ids: np.ndarray
  passage_scores: np.ndarray
  predictions: dict[int, list[Prediction]]


def _power_of_two(n: int, limit: int) -> int:
  """Smallest power of two >= ``n``, or ``limit`` when that is smaller: a padded batch size, so few shapes compile."""
  return min(1 << max(n - 1, 0).bit_length(), limit)


def _locate(text: str, part: str, near: int) -> int:
  """Start of the occurrence of ``part`` in ``text`` closest to ``near`` (the first of equals), or -1."""
  starts = [m.start() for m in re.finditer(f"(?={re.escape(part)})", text)] if part else []
  return min(starts, key=lambda i: abs(i - near), default=-1)


@functools.lru_cache(maxsize=8)
def _runners(spec_json: str, mesh: Mesh) -> tuple[retrieval.BatchEncoder, retrieval.BatchEncoder]:
  """The jitted question encoder and reader of a spec, cached so reloaded systems reuse the compilations."""
  spec = SystemSpec.from_json(json.loads(spec_json))
  parallel = mesh_lib.data_parallelism(mesh)
  return (retrieval.BatchEncoder(spec.embed_fns()[0], mesh, parallel),
          retrieval.BatchEncoder(spec.read_fn(), mesh, parallel))


class QASystem:
  """Retrieve-and-read question answering over a passage index (``params`` replicated on ``mesh``). Not thread-safe: one
  caller at a time (the server batches requests onto one thread)."""

  def __init__(self, spec: SystemSpec, params: Params, index: DenseIndex, store: PassageStore,
               tokenizer: tk.Tokenizer, *, settings: InferenceSettings | None = None,
               passage_texts: Callable[[int], tuple[str, str]] | None = None, mesh: Mesh | None = None):
    if index.dim != spec.dim:
      raise ValueError(f"the index holds {index.dim}-dim vectors, the model retrieves with {spec.dim}")
    missing = ~np.isin(index.ids, store.ids)
    if missing.any():
      raise ValueError(f"indexed passages missing from the corpus: {index.ids[missing][:10].tolist()}")
    self.spec = spec
    self.mesh = mesh if mesh is not None else mesh_lib.data_mesh(jax.devices()[:1])
    self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
    self.index = index
    self.store = store
    self.tokenizer = tokenizer
    self.settings = settings or InferenceSettings()
    self._passage_texts = passage_texts
    self._lexical: LexicalIndex | None = None
    self._is_continuation = reader.continuation_table(tokenizer.vocab())
    self._embed_questions, self._read = _runners(json.dumps(spec.to_json(), sort_keys=True), self.mesh)

  @classmethod
  def from_parts(cls, spec: SystemSpec | ReaderSpec, params: Params, index: DenseIndex,
                 token_corpus: TokenCorpus, tokenizer: tk.Tokenizer, *, passage_ids: np.ndarray | None = None,
                 passage_texts: Callable[[int], tuple[str, str]] | None = None,
                 settings: InferenceSettings | None = None, mesh: Mesh | None = None) -> QASystem:
    """A system from in-memory parts; a reader ``spec`` makes a unified retriever-reader. ``passage_ids``: the ids
    of the corpus rows (default: row numbers); ``passage_texts(pid)``: ``(title, text)`` to cut answers from (None:
    decode the token ids); ``mesh``: a one-axis ``("data",)`` mesh (default: the first device)."""
    if isinstance(spec, ReaderSpec):
      spec = SystemSpec.unified_model(spec)
    return cls(spec, params, index, PassageStore(token_corpus, passage_ids), tokenizer, settings=settings,
               passage_texts=passage_texts, mesh=mesh)

  @classmethod
  def from_bundle(cls, path: str | os.PathLike, *, mesh: Mesh | None = None, cache_dir: str | None = None,
                  verify: bool = True) -> QASystem:
    """The system of a bundle written by ``python -m infer.export``; ``BundleError`` names a bad file."""
    bundle = load_bundle(path, cache_dir=cache_dir, verify=verify)
    for part, directory in (("corpus", bundle.corpus_dir), ("tokenizer", bundle.tokenizer_dir)):
      if directory is None:
        raise BundleError(path, f"has no {part}/ component")
    try:
      spec = SystemSpec.from_json(bundle.config["model"])
      settings = InferenceSettings.from_json(bundle.config["inference"])
    except (KeyError, TypeError, ValueError) as e:
      raise BundleError(os.path.join(bundle.unpacked_dir, "config.json"),
                        f"not a QA system configuration ({e!r})") from e
    try:
      store = PassageStore.load(bundle.corpus_dir)
    except (OSError, ValueError) as e:
      raise BundleError(bundle.corpus_dir, f"not a readable token-ID corpus ({e})") from e
    tokenizer = tk.Tokenizer.from_pretrained(bundle.tokenizer_dir)
    try:
      return cls(spec, bundle.params, bundle.index, store, tokenizer, settings=settings, mesh=mesh)
    except ValueError as e:
      raise BundleError(path, f"inconsistent components: {e}") from e

  def embed_questions(self, questions: Sequence[str]) -> np.ndarray:
    """float32 ``[Q, dim]`` question vectors, encoded in length-bucketed jitted batches."""
    questions = tk.check_questions(questions)
    r, limit = self.spec.retriever, self.settings.question_batch
    out = np.zeros((len(questions), self.spec.dim), np.float32)
    lengths = [min(len(ids) + 2, r.question_len) for ids in self.tokenizer.encode_texts(questions)]
    for idx in tk.bucketed_batches(lengths, limit, r.buckets):
      batch = self.tokenizer.questions([questions[i] for i in idx], r.question_len, r.buckets)
      out[idx] = self._embed_questions.run(self.params, batch, _power_of_two(len(idx), limit))
    return out

  def embed_passages(self, records: Sequence[np.ndarray], *, progress: bool = False) -> np.ndarray:
    """float32 ``[n, dim]`` vectors of ``title [SEP] text`` token-ID records."""
    return encode_passages(self.spec, self.params, self.tokenizer, records, self.mesh, progress=progress)

  def search(self, questions: Sequence[str], top_k: int, *, lexical_weight: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(passage ids [Q, k], scores [Q, k])``, ``k = min(top_k, passages)``; ``lexical_weight`` > 0 fuses BM25."""
    s = self.settings if lexical_weight is None else dataclasses.replace(self.settings, lexical_weight=lexical_weight)
    questions = tk.check_questions(questions)
    return self._retrieve(questions, self.embed_questions(questions), top_k, s)

  def lexical_index(self) -> LexicalIndex:
    """BM25 over the indexed passages' text, built on first use and again after knowledge edits."""
    version = (self.store.version, len(self.index))
    if self._lexical is None or self._lexical.version != version:
      self._lexical = LexicalIndex.build(self.index.ids, self.passage, version=version)
    return self._lexical

  def _retrieve(self, questions: Sequence[str], vectors: np.ndarray, top_k: int, s: InferenceSettings
                ) -> tuple[np.ndarray, np.ndarray]:
    if s.lexical_weight == 0.0:
      return self.index.search(vectors, min(top_k, len(self.index)))
    n = min(max(top_k, s.lexical_candidates), len(self.index))
    dense_ids, dense_scores = self.index.search(vectors, n)
    lexical_ids, lexical_scores = self.lexical_index().search(list(questions), n)
    return lexical.fuse(dense_ids, dense_scores, lexical_ids, lexical_scores, s.lexical_weight,
                        min(top_k, len(self.index)))

  def passage(self, pid: int) -> tuple[str, str]:
    """``(title, text)`` of a passage: the original text if known, else decoded from its token ids."""
    if self._passage_texts is not None:
      return self.store.edited_text(pid) or self._passage_texts(int(pid))
    title_ids, text_ids = self.tokenizer.split_record(self.store[pid])
    return self.tokenizer.decode(title_ids), self.tokenizer.decode(text_ids)

  def answer(self, questions: Sequence[str], *, top_k: int | None = None, read_passages: int | None = None,
             rule: str | None = None, passage_score_weight: float | None = None,
             lexical_weight: float | None = None) -> list[Prediction]:
    """The answer to each question; unset settings take :attr:`settings`."""
    m = read_passages or self.settings.read_passages
    return self.predict(questions, top_k=top_k, read_counts=(m,), rule=rule, passage_score_weight=passage_score_weight,
                        lexical_weight=lexical_weight).predictions[m]

  def predict(self, questions: Sequence[str], *, top_k: int | None = None, read_counts: Sequence[int] | None = None,
              rule: str | None = None, passage_score_weight: float | None = None,
              lexical_weight: float | None = None) -> Results:
    """Retrieves ``top_k`` passages per question, reads them once, and answers from the first m' for each m' of
    ``read_counts`` (an m' beyond ``top_k`` reads all); unset settings take :attr:`settings`."""
    given = dict(top_k=top_k, rule=rule, passage_score_weight=passage_score_weight, lexical_weight=lexical_weight)
    s = dataclasses.replace(self.settings, **{k: v for k, v in given.items() if v is not None})
    counts = tuple(dict.fromkeys(read_counts or (s.read_passages,)))
    if min(counts) < 1:
      raise ValueError(f"read counts must be >= 1, got {list(counts)}")
    questions = tk.check_questions(questions)
    if not questions:
      return Results(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32), {n: [] for n in counts})
    pids, scores = self._retrieve(questions, self.embed_questions(questions), s.top_k, s)
    answers: dict[int, list[Prediction]] = {n: [] for n in counts}
    m = min(max(counts), pids.shape[1])
    q_ids = self.tokenizer.encode_texts(questions)
    r = self.spec.reader
    for start in range(0, len(questions), s.read_batch):
      group = range(start, min(start + s.read_batch, len(questions)))
      batch = rd.reader_batch(self.tokenizer, self.store, [q_ids[q] for q in group], pids[group.start:group.stop, :m],
                              max_len=r.reader_len, buckets=r.buckets, question_len=r.question_len,
                              max_answer_len=r.max_answer_len, max_spans=1)
      inputs = tk.EncodedBatch(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
      logits = self._read.run(self.params, inputs, _power_of_two(len(group), s.read_batch) * m)
      for b, q in enumerate(group):
        for n in counts:
          answers[n].append(self._choose(questions[q], batch, logits, b, m, min(n, m), pids[q], scores[q], s))
    return Results(pids, scores, answers)

  def _choose(self, question: str, batch: Mapping[str, np.ndarray], logits: np.ndarray, b: int, m: int, n: int,
              pids: np.ndarray, scores: np.ndarray, s: InferenceSettings) -> Prediction:
    """The answer of question ``b`` of a read group from its first ``n`` of ``m`` passages."""
    rows = slice(b * m, b * m + n)
    length = batch["input_ids"].shape[1]
    valid = reader.text_mask(length, batch["text_start"][rows], batch["text_end"][rows])
    if not valid.any():
      return Prediction(question, "", NO_PASSAGE, "", "", -1, -1, 0.0, 0.0, -1)
    span = reader.select_answer(logits[rows, :length], logits[rows, length:2 * length], logits[rows, 2 * length],
                                valid, self.spec.reader.max_answer_len, s.rule, s.passage_score_weight,
                                retrieval_scores=scores[:n], retrieval_scale=s.retrieval_scale)
    row = b * m + span.passage
    pid = int(pids[span.passage])
    answer, title, passage, char_start = self._span_text(pid, batch["input_ids"][row], int(batch["text_start"][row]),
                                                         int(batch["text_end"][row]), span.start, span.end)
    return Prediction(question, answer, pid, title, passage, char_start,
                      char_start + len(answer) if char_start >= 0 else -1, float(span.score),
                      float(scores[span.passage]), int(span.passage))

  def _span_text(self, pid: int, input_ids: np.ndarray, text_start: int, text_end: int, start: int, end: int
                 ) -> tuple[str, str, str, int]:
    """``(answer, title, passage, answer's first character)`` of token span ``[start, end]`` of a reader row."""
    start, end = reader.extend_to_words(input_ids, start, end, text_start, text_end, self._is_continuation)
    title, passage = self.passage(pid)
    if self._passage_texts is not None:
      text_ids, offsets = self.tokenizer.encode_texts_with_offsets([passage])[0]
      if not np.array_equal(text_ids[:text_end - text_start], input_ids[text_start:text_end]):
        raise ValueError(f"passage {pid}: its token-ID record does not match the tokenization of its text")
      first, last = offsets[start - text_start, 0], offsets[end - text_start, 1]
      return passage[first:last], title, passage, int(first)
    answer = self.tokenizer.decode(input_ids[start:end + 1])
    prefix = self.tokenizer.decode(input_ids[text_start:start])
    return answer, title, passage, _locate(passage, answer, len(prefix) + bool(prefix))
