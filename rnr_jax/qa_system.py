"""The in-memory QA system: encode questions, search the index, read the top passages, answer.

One :class:`QASystem` serves a trained model and a deployed bundle alike, on a JAX or ONNX Runtime engine imported only
when chosen, so this module needs neither JAX nor Flax."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from rnr_jax import answers, lexical, reader
from rnr_jax import tokenization as tk
from rnr_jax.bundle import BundleError, load_bundle
from rnr_jax.data.readers import Question
from rnr_jax.data.token_corpus import TokenCorpus, save_npy
from rnr_jax.index import DenseIndex
from rnr_jax.lexical import LexicalIndex
from rnr_jax.metrics import DEFAULT_KS, AnswerMatcher, answer_top_k_accuracy, exact_match, f1_score
from rnr_jax.specs import ReaderSpec, SystemSpec

if TYPE_CHECKING:
  from rnr_jax.retrieval import JaxEngine
  from rnr_jax.runtime import OnnxStudent

RULES = ("dpr", "weighted", "fused")
ENGINES = ("auto", "jax", "onnx")
PASSAGE_IDS_FILE = "passage_ids.npy"  # In a token-ID corpus directory: int64 [n], the passage id of each row.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def resolve_engine(engine: str) -> str:
  """``"jax"`` or ``"onnx"``: ``"auto"`` is JAX where JAX and Flax import, else ONNX Runtime."""
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
  if engine != "auto":
    return engine
  try:
    import flax, jax  # noqa: F401,E401  # pylint: disable=import-outside-toplevel,unused-import,multiple-imports
  except ImportError:
    return "onnx"
  return "jax"


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
    if missing := [p for p in pids if p not in self]:
      raise KeyError(f"no passages with ids {missing[:10]}")
    self.version += 1
    for pid in pids:
      self._edited_texts.pop(pid, None)
      if self._edited.pop(pid, None) is None:
        self._removed[self._row(pid)] = True

  def write(self, directory: str | os.PathLike) -> None:
    """Writes the live passages as a token-ID corpus directory with ``passage_ids.npy``."""
    ids = self.ids
    write_passages(directory, Records(self, ids), ids, self.corpus.meta["vocab_size"],
                   self.corpus.meta.get("tokenizer"))


class Records(Sequence[np.ndarray]):
  """The records of passages ``ids`` of ``source`` (a corpus or store), read when indexed, so that writing a corpus
  does not hold one array object per passage in memory at once."""

  def __init__(self, source: Any, ids: np.ndarray):
    self._source, self._ids = source, ids

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
    return self._source[int(self._ids[i])]


def write_passages(directory: str | os.PathLike, records: Sequence[np.ndarray], passage_ids: np.ndarray,
                   vocab_size: int, tokenizer: str | None = None) -> None:
  """Writes records as a token-ID corpus directory whose row i holds passage ``passage_ids[i]``."""
  if len(records) != len(passage_ids):
    raise ValueError(f"{len(records)} records for {len(passage_ids)} passage ids")
  TokenCorpus.write(directory, records, vocab_size, tokenizer=tokenizer)
  save_npy(os.path.join(directory, PASSAGE_IDS_FILE), np.asarray(passage_ids, np.int64))


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """Default answering settings (a bundle's ``config.json["inference"]``); ``lexical_weight`` > 0 fuses BM25 over
  both retrievals' top ``lexical_candidates`` (:func:`rnr_jax.lexical.fuse`), 0 retrieves as the paper does."""

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
    bad = [f"{name} {want}" for name, want, ok in (
        ("rule", f"in {RULES}", self.rule in RULES),
        ("top_k, read_passages, question_batch, read_batch, lexical_candidates", ">= 1",
         min(self.top_k, self.read_passages, self.question_batch, self.read_batch, self.lexical_candidates) >= 1),
        ("passage_score_weight", "in [0, 1]", 0.0 <= self.passage_score_weight <= 1.0),
        ("retrieval_scale", "finite and > 0", 0.0 < self.retrieval_scale < np.inf),
        ("lexical_weight", "finite and >= 0", 0.0 <= self.lexical_weight < np.inf)) if not ok]
    if bad:
      raise ValueError(f"inference settings need {'; '.join(bad)}: {self}")

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> InferenceSettings:
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RetrievedPassage:
  """A retrieved passage: its display ``title`` and ``text``, retrieval ``score`` and ``rank`` (0 = best)."""

  id: int
  title: str
  text: str
  score: float
  rank: int


@dataclasses.dataclass(frozen=True)
class Answer:
  """One of a question's n-best answers: ``passage.text[start:end]``, its ``probability`` among the candidate spans of
  the passages read (:func:`rnr_jax.answers.nbest`) and its ``score`` under the rule."""

  text: str
  probability: float
  score: float
  start: int
  end: int
  passage: RetrievedPassage


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The n-best ``answers`` to a question (ordered by the rule) and its retrieved ``passages``, best first;
  ``no_answer``: nothing was read, or the best answer's probability is below the threshold."""

  question: str
  answers: tuple[Answer, ...]
  passages: tuple[RetrievedPassage, ...]
  no_answer: bool = False

  @property
  def answer(self) -> str:
    """The answer's text ("" for no answer)."""
    return "" if self.no_answer else self.answers[0].text

  def to_json(self) -> dict[str, Any]:
    return {"question": self.question, "answer": self.answer, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Results:
  """Retrieved ``passage_ids`` (``int64[Q, k]``, best first, -1: empty slot), their ``passage_scores``
  (``float32[Q, k]``) and ``predictions`` (``{m': [Prediction per question]}`` reading the first m' passages)."""

  passage_ids: np.ndarray
  passage_scores: np.ndarray
  predictions: dict[int, list[Prediction]]


@dataclasses.dataclass(frozen=True)
class Reading:
  """Questions with their retrieved passages and, per question, the reader rows of the first passages read:
  ``(input_ids, text_start, text_end, start_logits, end_logits, rank_logit)`` (:meth:`QASystem.read`)."""

  questions: list[str]
  passage_ids: np.ndarray
  passage_scores: np.ndarray
  passages: list[tuple[RetrievedPassage, ...]]
  rows: list[list[tuple[np.ndarray, int, int, np.ndarray, np.ndarray, float]]]


def _power_of_two(n: int, limit: int) -> int:
  """Smallest power of two >= ``n``, or ``limit`` when that is smaller: a padded batch size, so few shapes compile."""
  return min(1 << max(n - 1, 0).bit_length(), limit)


def is_local_bundle(bundle: str | os.PathLike) -> bool:
  """Whether ``bundle`` names a local path (absolute, ``.``/``~``-relative or existing) rather than a Hub model id."""
  return os.path.exists(bundle) or os.path.isabs(bundle) or str(bundle).startswith((".", "~"))


class QASystem:
  """Retrieve-and-read question answering over a passage index, its model run by ``engine``. Not thread-safe: one
  caller at a time (the server runs requests and edits on one thread)."""

  def __init__(self, spec: SystemSpec, engine: JaxEngine | OnnxStudent, index: DenseIndex, store: PassageStore,
               tokenizer: tk.Tokenizer, *, settings: InferenceSettings | None = None,
               passage_texts: Callable[[int], tuple[str, str]] | None = None):
    if index.dim != spec.dim:
      raise ValueError(f"the index holds {index.dim}-dim vectors, the model retrieves with {spec.dim}")
    missing = ~np.isin(index.ids, store.ids)
    if missing.any():
      raise ValueError(f"indexed passages missing from the corpus: {index.ids[missing][:10].tolist()}")
    self.spec = spec
    self.engine = engine
    self.mesh = getattr(engine, "mesh", None)  # the JAX engine's devices
    self.index = index
    self.store = store
    self.tokenizer = tokenizer
    self.settings = settings or InferenceSettings()
    self._passage_texts = passage_texts
    self._lexical: LexicalIndex | None = None
    self._is_continuation = reader.continuation_table(tokenizer.vocab())
    self._detokenize = answers.Detokenizer(tokenizer.vocab(), (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id))
    self._views: dict[int, tuple[str, str, np.ndarray]] = {}
    self._views_version = store.version
    # Reader rows run in chunks of at most this many, padded to a power of two, so few shapes compile.
    self.read_rows = max(_power_of_two(self.settings.read_batch * self.settings.read_passages, 1 << 30),
                         engine.parallel)

  @classmethod
  def from_parts(cls, spec: SystemSpec | ReaderSpec, params: Any, index: DenseIndex, token_corpus: TokenCorpus,
                 tokenizer: tk.Tokenizer, *, passage_texts: Callable[[int], tuple[str, str]] | None = None,
                 settings: InferenceSettings | None = None, mesh: Any = None) -> QASystem:
    """A system from in-memory parts on the JAX engine (a reader ``spec``: a unified model); ``passage_texts(pid)``
    gives ``(title, text)`` to cut answers from (None: detokenize)."""
    from rnr_jax.retrieval import JaxEngine  # pylint: disable=import-outside-toplevel
    if isinstance(spec, ReaderSpec):
      spec = SystemSpec.unified_model(spec)
    return cls(spec, JaxEngine(spec, params, mesh), index, PassageStore(token_corpus), tokenizer,
               settings=settings, passage_texts=passage_texts)

  @classmethod
  def from_bundle(cls, path: str | os.PathLike, *, engine: str = "auto", mesh: Any = None,
                  cache_dir: str | None = None, verify: bool = True) -> QASystem:
    """The system of a bundle (``python -m infer.export``) on ``engine``; ``BundleError`` names a bad file."""
    engine = resolve_engine(engine)
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
    if engine == "onnx":
      from rnr_jax.runtime import OnnxStudent  # pylint: disable=import-outside-toplevel
      model, bundle.params = OnnxStudent.from_bundle(bundle), None  # ONNX Runtime keeps its own copy of the weights
    else:
      from rnr_jax.retrieval import JaxEngine  # pylint: disable=import-outside-toplevel
      model = JaxEngine(spec, bundle.params, mesh)
    try:
      return cls(spec, model, bundle.index, store, tokenizer, settings=settings)
    except ValueError as e:
      raise BundleError(path, f"inconsistent components: {e}") from e

  @classmethod
  def from_pretrained(cls, bundle: str | os.PathLike, *, revision: str | None = None, endpoint: str | None = None,
                      token: str | None = None, **kwargs: Any) -> QASystem:
    """The system of a bundle directory or a Hugging Face Hub model id; ``kwargs`` go to :meth:`from_bundle`."""
    if is_local_bundle(bundle):
      return cls.from_bundle(bundle, **kwargs)
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
    return cls.from_bundle(snapshot_download(str(bundle), revision=revision, endpoint=endpoint, token=token), **kwargs)

  def embed_questions(self, questions: Sequence[str]) -> np.ndarray:
    """float32 ``[Q, dim]`` question vectors, encoded in length-bucketed batches."""
    questions, r = tk.check_questions(questions), self.spec.retriever
    lengths = [min(len(ids) + 2, r.question_len) for ids in self.tokenizer.encode_texts(questions)]
    return self._embed(lengths, lambda idx: self.tokenizer.questions([questions[i] for i in idx], r.question_len,
                                                                      r.buckets), self.settings.question_batch)

  def embed_passages(self, records: Sequence[np.ndarray]) -> np.ndarray:
    """float32 ``[n, dim]`` vectors of ``title [SEP] text`` token-ID records (knowledge edits)."""
    r, tok = self.spec.retriever, self.tokenizer
    return self._embed([min(len(x) + 2, r.passage_len) for x in records], lambda idx: tok.passages_from_records(
        [records[i] for i in idx], r.passage_len, r.buckets, r.passage_token_type), 64, passages=True)

  def _embed(self, lengths: Sequence[int], make_batch: Callable[[np.ndarray], tk.EncodedBatch], limit: int,
             passages: bool = False) -> np.ndarray:
    out = np.zeros((len(lengths), self.spec.dim), np.float32)
    for idx in tk.bucketed_batches(lengths, limit, self.spec.retriever.buckets):
      # Passages (a few per edit) always pad to ``limit`` rows: one compiled shape per length, not one per count.
      out[idx] = self.engine.embed(make_batch(idx), limit if passages else _power_of_two(len(idx), limit), passages)
    return out

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

  def _view(self, pid: int) -> tuple[str, str, np.ndarray]:
    """``(title, text, character range of each text token)`` of a passage: its original text if known (given, or
    added by an edit), else the token ids detokenized; cached until the passages are edited."""
    if self._views_version != self.store.version or len(self._views) > 50_000:
      self._views, self._views_version = {}, self.store.version
    pid = int(pid)
    if pid not in self._views:
      title_ids, text_ids = self.tokenizer.split_record(self.store[pid])
      given = self.store.edited_text(pid) or (self._passage_texts and self._passage_texts(pid))
      if not given:
        text, offsets = self._detokenize(text_ids)
        self._views[pid] = (self._detokenize(title_ids)[0], text, offsets)
      else:
        title, text = given
        ids, offsets = self.tokenizer.encode_texts_with_offsets([text])[0]
        if not np.array_equal(ids, text_ids):
          raise ValueError(f"passage {pid}: its token-ID record does not match the tokenization of its text")
        self._views[pid] = (title, text, offsets)
    return self._views[pid]

  def passage(self, pid: int) -> tuple[str, str]:
    """``(title, text)`` of a passage for display: the original text if known, else detokenized from its ids."""
    return self._view(pid)[:2]

  def retrieved(self, pids: np.ndarray, scores: np.ndarray) -> tuple[RetrievedPassage, ...]:
    """The passages of one question's retrieved ids and scores (empty slots, -1, dropped)."""
    return tuple(RetrievedPassage(int(p), *self.passage(p), float(sc), rank)
                 for rank, (p, sc) in enumerate(zip(pids.tolist(), scores.tolist())) if p >= 0)

  def read(self, questions: Sequence[str], *, top_k: int | None = None, read_passages: int | None = None,
           lexical_weight: float | None = None) -> Reading:
    """Retrieves ``top_k`` passages per question and reads the first ``read_passages`` in jitted chunks."""
    s = self.settings if lexical_weight is None else dataclasses.replace(self.settings, lexical_weight=lexical_weight)
    questions = tk.check_questions(questions)
    top_k, m = top_k or s.top_k, read_passages or s.read_passages
    if min(top_k, m) < 1:
      raise ValueError(f"top_k and read_passages must be >= 1, got {top_k} and {m}")
    if not questions:
      return Reading([], np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32), [], [])
    pids, scores = self._retrieve(questions, self.embed_questions(questions), top_k, s)
    r = self.spec.reader
    rows = []  # (question, input_ids, token types, text_start, text_end) of each row, in order
    for q, q_ids in enumerate(self.tokenizer.encode_texts(questions)):
      read = [p for p in pids[q, :m].tolist() if p >= 0]
      b = self.tokenizer.reader_from_records(q_ids, [self.store[p] for p in read], r.reader_len, r.buckets,
                                             r.question_len)
      rows += [(q, b.input_ids[i, :n], b.token_type_ids[i, :n], int(b.text_start[i]), int(b.text_end[i]))
               for i, n in enumerate(b.attention_mask.sum(1)[:len(read)].tolist())]
    read_of: list[Any] = [None] * len(rows)
    # Rows of any questions share chunks, each chunk within one length bucket, so a chunk pads to the bucket of its
    # own rows rather than to the longest of the questions it happens to hold.
    for chunk_idx in tk.bucketed_batches([len(row[1]) for row in rows], self.read_rows, r.buckets):
      chunk = [rows[i] for i in chunk_idx]
      length = tk.bucket_length(max(len(row[1]) for row in chunk), r.buckets, r.reader_len)
      ids = np.full((len(chunk), length), self.tokenizer.pad_id, np.int32)
      mask, types = np.zeros_like(ids), np.zeros_like(ids)
      for i, (_, row, row_types, _, _) in enumerate(chunk):
        ids[i, :len(row)], mask[i, :len(row)], types[i, :len(row)] = row, 1, row_types
      logits = self.engine.read(tk.EncodedBatch(ids, mask, types), _power_of_two(len(chunk), 1 << 30))
      for i, (r_i, (_, row, _, text_start, text_end)) in enumerate(zip(chunk_idx.tolist(), chunk)):
        n = len(row)
        read_of[r_i] = (row, text_start, text_end, logits[i, :n], logits[i, length:length + n],
                        float(logits[i, 2 * length]))
    per_question: list[list[Any]] = [[] for _ in questions]
    for (q, *_), read in zip(rows, read_of):  # back in each question's retrieval order
      per_question[q].append(read)
    passages = [self.retrieved(pids[q], scores[q]) for q in range(len(questions))]
    return Reading(questions, pids, scores, passages, per_question)

  def choose(self, reading: Reading, q: int, read_passages: int | None = None, *, rule: str | None = None,
             passage_score_weight: float | None = None, n_best: int = 1, no_answer_threshold: float = 0.0
             ) -> Prediction:
    """Question ``q``'s answers from the first ``read_passages`` passages read (numpy only, no model call)."""
    s = self.settings
    rule, lam = rule or s.rule, s.passage_score_weight if passage_score_weight is None else passage_score_weight
    rows = reading.rows[q][:read_passages or s.read_passages]
    passages = {p.id: p for p in reading.passages[q]}
    if not rows:
      return Prediction(reading.questions[q], (), reading.passages[q], True)
    length = max(len(row[0]) for row in rows)
    pad = lambda x: np.pad(x, (0, length - len(x)), constant_values=reader.NEG_INF)
    valid = reader.text_mask(length, [row[1] for row in rows], [row[2] for row in rows])
    candidates = answers.nbest(
        np.stack([pad(row[3]) for row in rows]), np.stack([pad(row[4]) for row in rows]),
        np.asarray([row[5] for row in rows]), valid, max_answer_len=self.spec.reader.max_answer_len, rule=rule,
        passage_score_weight=lam, retrieval_scores=reading.passage_scores[q, :len(rows)],
        retrieval_scale=s.retrieval_scale)
    spans = []
    for p, start, end, _, _ in candidates:
      input_ids, text_start, text_end = rows[p][:3]
      start, end = reader.extend_to_words(input_ids, start, end, text_start, text_end, self._is_continuation)
      title, text, offsets = self._view(int(reading.passage_ids[q, p]))
      first, last = int(offsets[start - text_start, 0]), int(offsets[end - text_start, 1])
      spans.append((text[first:last], first, last))
    best = [Answer(spans[i][0], prob, candidates[i][3], spans[i][1], spans[i][2],
                   passages[int(reading.passage_ids[q, candidates[i][0]])])
            for i, prob in answers.merge_answers([sp[0] for sp in spans], [c[4] for c in candidates], n_best)]
    return Prediction(reading.questions[q], tuple(best), reading.passages[q],
                      not best or best[0].probability < no_answer_threshold)

  def answer(self, questions: Sequence[str], *, top_k: int | None = None, read_passages: int | None = None,
             **choice: Any) -> list[Prediction]:
    """The answer to each question; unset settings take :attr:`settings` (``choice``: see :meth:`predict`)."""
    m = read_passages or self.settings.read_passages
    return self.predict(questions, top_k=top_k, read_counts=(m,), **choice).predictions[m]

  def predict(self, questions: Sequence[str], *, top_k: int | None = None, read_counts: Sequence[int] | None = None,
              lexical_weight: float | None = None, **choice: Any) -> Results:
    """Retrieves ``top_k`` passages per question, reads them once, and answers from the first m' for each m' of
    ``read_counts``; ``choice``: keywords of :meth:`choose`; unset settings take :attr:`settings`."""
    counts = tuple(dict.fromkeys(read_counts or (self.settings.read_passages,)))
    if min(counts) < 1:
      raise ValueError(f"read counts must be >= 1, got {list(counts)}")
    choice = {k: v for k, v in choice.items() if v is not None}
    reading = self.read(questions, top_k=top_k, read_passages=max(counts), lexical_weight=lexical_weight)
    return Results(reading.passage_ids, reading.passage_scores,
                   {n: [self.choose(reading, q, n, **choice) for q in range(len(reading.questions))] for n in counts})


def read_counts(top_k: int, max_read: int = 0) -> list[int]:
  """The m' of appendix A.3 up to ``top_k``: 1, 10, 20, ..., and ``top_k`` itself; none above ``max_read`` (> 0)."""
  counts = sorted({1, *range(10, top_k + 1, 10), top_k})
  return [n for n in counts if n <= max_read] if max_read > 0 else counts


def evaluate_system(system: QASystem, questions: Sequence[Question], *, top_k: int, rule: str,
                    passage_score_weight: float, batch_size: int = 64, progress: bool = True, max_read: int = 0,
                    lexical_weight: float | None = None, n_best: int = 1) -> tuple[dict[str, Any], list[Prediction]]:
  """``(summary, predictions at the best m')`` on ``questions`` (appendix A.3): EM and F1 at each m' of
  :func:`read_counts` and at the best, retrieval ``top_k_accuracy``, speed; ``max_read`` > 0 caps m'."""
  if not questions:
    raise ValueError("no questions to evaluate")
  if max_read < 0:
    raise ValueError(f"max_read must be >= 0, got {max_read}")
  top_k = min(top_k, len(system.index))
  lexical_weight = system.settings.lexical_weight if lexical_weight is None else float(lexical_weight)
  counts = read_counts(top_k, max_read)
  predictions: dict[int, list[Prediction]] = {n: [] for n in counts}
  ranked = []
  start = time.perf_counter()
  with tqdm(total=len(questions), desc="evaluate", unit="question", disable=not progress, file=sys.stderr) as bar:
    for i in range(0, len(questions), batch_size):
      chunk = questions[i:i + batch_size]
      results = system.predict([q.question for q in chunk], top_k=top_k, read_counts=counts, rule=rule,
                               passage_score_weight=passage_score_weight, lexical_weight=lexical_weight, n_best=n_best)
      for n in counts:
        predictions[n] += results.predictions[n]
      ranked.append(results.passage_ids)
      bar.update(len(chunk))
  seconds = time.perf_counter() - start
  answers = [q.answers for q in questions]
  em_at = {n: float(np.mean([exact_match(p.answer, a) for p, a in zip(predictions[n], answers)])) for n in counts}
  f1_at = {n: float(np.mean([f1_score(p.answer, a) for p, a in zip(predictions[n], answers)])) for n in counts}
  best = max(counts, key=lambda n: (em_at[n], -n))  # EM at the best m', as the paper; ties: fewer
  matcher = AnswerMatcher(lambda pid: system.passage(pid)[1] if pid >= 0 else "")  # -1: an empty index slot
  ks = sorted({k for k in DEFAULT_KS if k < top_k} | {top_k})
  accuracy = answer_top_k_accuracy(np.concatenate(ranked), answers, matcher, ks)
  summary = {"n": len(questions), "em": em_at[best], "f1": f1_at[best], "best_read_passages": best,
             "em_at": {str(n): v for n, v in em_at.items()}, "f1_at": {str(n): v for n, v in f1_at.items()},
             "top_k_accuracy": {f"top{k}": v for k, v in accuracy.items()},
             "questions_per_s": round(len(questions) / seconds, 3), "seconds": round(seconds, 3),
             "top_k": top_k, "rule": rule, "passage_score_weight": passage_score_weight,
             "lexical_weight": lexical_weight, "engine": system.engine.name}
  return summary, predictions[best]
