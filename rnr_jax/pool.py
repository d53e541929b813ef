"""The candidate pool J_read of the unified student's training questions, and its resumable batches.

A batch holds, per question, ``m`` passages of its pool, one positive first: the reader rows, the question inputs
``q_*`` and the passage-only inputs ``p_*`` whose vectors give the retrieval scores."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rnr_jax import embeddings, exports, passage_filter
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.io import atomic_write_json, read_json, sha256_file
from rnr_jax.specs import SystemSpec
from rnr_jax.teacher import InputsFn, TeacherCache
from rnr_jax.training.loop import EpochIterator

POOL_STREAM = 0  # the seed stream of passage samples, apart from other draws seeded by train.seed


def data_fingerprint(data: PreparedData) -> str:
  """sha256 of what a prepared directory was built from (its manifest's sources and settings)."""
  manifest = {"settings": data.manifest["settings"], "sources": data.manifest["sources"]}
  return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


class TrainingPool:
  """J_read: ``<directory>/pool.npz`` (a ranked candidates file) with its key ``pool.json``; the examples are the
  questions with a positive and a negative, the first ``max_questions`` of each split."""

  def __init__(self, data: PreparedData, tokenizer: tk.Tokenizer, directory: str, splits: Sequence[str], k1: int,
               max_questions: int = 0, positives: str = "gold_article"):
    self.path = os.path.join(directory, "pool.npz")
    self._key_path = os.path.join(directory, "pool.json")
    self.split_names = tuple(splits)
    self.k1 = k1
    self._data = data
    self._tokenizer = tokenizer
    self._max_questions = max_questions
    self._positives = positives
    self.splits: list[rd.ReaderSplit] = []
    self.examples = np.zeros((0, 2), np.int64)

  def __len__(self) -> int:
    return len(self.examples)

  def has(self, key: Mapping[str, Any]) -> bool:
    """Whether the pool exists and was built with ``key``."""
    if not os.path.exists(self.path) or not os.path.exists(self._key_path):
      return False
    return read_json(self._key_path) == json.loads(json.dumps(dict(key)))

  def write(self, ranking: Mapping[str, np.ndarray], key: Mapping[str, Any]) -> None:
    """Saves the rankings of every training split, cut to k1 (process 0 writes)."""
    if jax.process_index() == 0:
      rd.save_ranked(self.path, {s: np.asarray(ranking[s])[:, : self.k1] for s in self.split_names})
      atomic_write_json(self._key_path, dict(key))
    multihost_utils.sync_global_devices("rnr_jax.pool.TrainingPool.write")

  def load(self) -> None:
    self.splits = [rd.load_reader_split(self._data, s, self._tokenizer, self.path, self.k1, self._positives)
                   for s in self.split_names]
    self.examples = np.asarray([(s, q) for s, split in enumerate(self.splits)
                                for q in split.trainable()[: self._max_questions or None]], np.int64).reshape(-1, 2)
    logging.info("Candidate pool (top %d): %d training questions.", self.k1, len(self.examples))

  def sample(self, i: int, s: int, m: int, seed: int) -> np.ndarray:
    """Sample ``s`` of example ``i``: ``m`` passage ids, a positive first (drawn from ``(seed, s, i)``)."""
    split, q = self.examples[i]
    rng = np.random.default_rng([seed, POOL_STREAM, s, int(i)])  # one stream per sample and example: resumable
    return self.splits[split].training_passages(int(q), m, rng)

  def question(self, i: int) -> tuple[str, np.ndarray, list[np.ndarray]]:
    """``(text, token ids, answer token ids)`` of example ``i``."""
    split, q = self.examples[i]
    s = self.splits[split]
    return s.questions[q].question, s.question_ids[q], s.answer_ids[q]


def initial_ranking(pool_cfg: Any, data: PreparedData, tokenizer: tk.Tokenizer, mesh: jax.sharding.Mesh | None
                    ) -> tuple[dict[str, Any], Callable[[], dict[str, np.ndarray]]]:
  """``(key, compute)`` of the pool's rankings, from ``pool.candidates``, ``pool.retriever`` or BM25: ``compute()``
  gives ``{split: int32 [Q, k]}``; ``key`` identifies it, so a restart reuses a saved pool without encoding again."""
  splits = tuple(pool_cfg.train_splits)
  key: dict[str, Any] = {"splits": list(splits), "k1": int(pool_cfg.k1), "data": data_fingerprint(data)}
  subset = pool_cfg.get("subset") or ""
  if subset:
    key["subset"] = sha256_file(subset)
  if pool_cfg.candidates and pool_cfg.retriever:
    raise ValueError("set pool.candidates or pool.retriever, not both")
  if pool_cfg.candidates:
    key.update(source="candidates", sha256=sha256_file(pool_cfg.candidates))
    return key, lambda: {s: rd.ranked_pids(data, s, pool_cfg.candidates) for s in splits}
  if pool_cfg.retriever:
    info = exports.read_info(pool_cfg.retriever)
    if info is None:
      raise FileNotFoundError(f"{pool_cfg.retriever}: no exported retriever")
    key.update(source="retriever", fingerprint=info["fingerprint"])

    def compute() -> dict[str, np.ndarray]:
      spec, params, _ = exports.load_retriever(pool_cfg.retriever, mesh)
      if spec.tokenizer_fingerprint != data.manifest["settings"]["tokenizer"]:
        raise ValueError(f"{pool_cfg.retriever} was trained with another tokenizer than {data.path}'s")
      index = embeddings.FreshIndex(*spec.embed_fns(), spec, tokenizer, data.token_corpus(), mesh,
                                   int(pool_cfg.encode_batch_size),
                                   passage_filter.subset_ids(subset, data.num_passages))
      return {s: index.search(params, 0, [q.question for q in data.questions(s)], int(pool_cfg.k1)) for s in splits}

    return key, compute
  key.update(source="bm25")
  return key, lambda: {s: np.asarray(data.candidates(s).bm25_pids, np.int32) for s in splits}


def load_pool(pool_cfg: Any, data: PreparedData, tokenizer: tk.Tokenizer, workdir: str,
              mesh: jax.sharding.Mesh | None) -> TrainingPool:
  """The stage's :class:`TrainingPool` in ``workdir``, built (or found) and loaded."""
  pool = TrainingPool(data, tokenizer, workdir, pool_cfg.train_splits, int(pool_cfg.k1),
                      int(pool_cfg.max_train_questions), pool_cfg.positives)
  key, compute = initial_ranking(pool_cfg, data, tokenizer, mesh)
  if not pool.has(key):
    logging.info("Building the candidate pool from %s.", key["source"])
    pool.write(compute(), key)
  pool.load()
  return pool


class UnifiedBatches(EpochIterator):
  """Resumable batches of the unified model (module docstring): example ``i`` in epoch ``e`` reads sample ``e mod S`` of
  its passages with a teacher cache (distillation), else sample ``e`` (drawn fresh every epoch)."""

  def __init__(self, pool: TrainingPool, tokenizer: tk.Tokenizer, corpus: Sequence[np.ndarray], system: SystemSpec,
               *, m: int, batch_size: int, seed: int, max_spans: int = 0, samples: int = 0,
               teacher_cache: Callable[[np.ndarray, InputsFn], TeacherCache] | None = None):
    """``max_spans``: answer spans kept as targets in the positive (0: none); ``samples``: S, with ``teacher_cache``:
    ``(pids [S, N, m], inputs) -> TeacherCache``, called on the first batch."""
    if teacher_cache is not None and samples < 1:
      raise ValueError(f"a teacher cache needs samples >= 1, got {samples}")
    self._pool = pool
    self._tokenizer = tokenizer
    self._corpus = corpus
    self._system = system
    self._m = m
    self._max_spans = max_spans
    self._samples = samples
    self._teacher_cache = teacher_cache
    self._cache: TeacherCache | None = None
    self._retriever_teacher: tuple[np.ndarray, np.ndarray] | None = None
    super().__init__(self._batch, len(pool), batch_size, seed=seed)

  @property
  def questions(self) -> list[str]:
    """The text of every example, in the order of :meth:`set_retriever_teacher`'s question vectors."""
    return [self._pool.question(i)[0] for i in range(len(self._pool))]

  def set_retriever_teacher(self, question_vectors: np.ndarray, passage_vectors: np.ndarray) -> None:
    """Adds a teacher retriever's vectors to every batch: ``t_q [B, d]`` and ``t_p [B * m, d]`` (``passage_vectors``
    indexed by passage id; zeros for padding passages)."""
    if len(question_vectors) != len(self._pool):
      raise ValueError(f"{len(question_vectors)} teacher question vectors for {len(self._pool)} training questions")
    if question_vectors.shape[1:] != passage_vectors.shape[1:]:
      raise ValueError(f"teacher question vectors {question_vectors.shape} and passage vectors "
                       f"{passage_vectors.shape} differ in width")
    self._retriever_teacher = (np.asarray(question_vectors, np.float32), passage_vectors)

  def reader_inputs(self, examples: np.ndarray, pids: np.ndarray, spans: bool = False) -> dict[str, np.ndarray]:
    """Reader rows of ``examples`` with passages ``pids [n, m]`` (:func:`rnr_jax.reader_data.reader_batch`)."""
    reader_spec = self._system.reader
    qs = [self._pool.question(int(i)) for i in examples]
    return rd.reader_batch(self._tokenizer, self._corpus, [q[1] for q in qs], pids,
                           [q[2] for q in qs] if spans else None, max_len=reader_spec.reader_len,
                           buckets=reader_spec.buckets, question_len=reader_spec.question_len,
                           max_answer_len=reader_spec.max_answer_len, max_spans=self._max_spans)

  def _cache_of_pool(self) -> TeacherCache:
    if self._cache is None:
      pids = np.stack([np.stack([self._pool.sample(i, s, self._m, self._seed) for i in range(len(self._pool))])
                       for s in range(self._samples)])
      self._cache = self._teacher_cache(pids, self.reader_inputs)
    return self._cache

  def _batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    epoch = self.state()["epoch"]
    if self._teacher_cache is not None:
      cache, sample = self._cache_of_pool(), epoch % self._samples
      pids = np.asarray(cache.pids[sample, idx])  # the passages the teacher read
    else:
      pids = np.stack([self._pool.sample(int(i), epoch, self._m, self._seed) for i in idx])
    batch = self.reader_inputs(idx, pids, spans=self._max_spans > 0)
    r = self._system.retriever
    q = self._tokenizer.questions([self._pool.question(int(i))[0] for i in idx], r.question_len, r.buckets)
    records = [self._corpus[p] if p != rd.NO_PASSAGE else np.zeros(0, np.int32) for p in pids.reshape(-1).tolist()]
    p = self._tokenizer.passages_from_records(records, r.passage_len, r.buckets, r.passage_token_type)
    batch.update({f"q_{k}": v for k, v in q.as_dict().items()})
    batch.update({f"p_{k}": v for k, v in p.as_dict().items()})
    if self._teacher_cache is not None:
      batch.update(cache.lookup(sample, idx, batch["input_ids"].shape[1]))
    if self._retriever_teacher is not None:
      tq, tp = self._retriever_teacher
      flat = pids.reshape(-1)
      t_p = np.asarray(tp[np.maximum(flat, 0)], np.float32)
      t_p[flat == rd.NO_PASSAGE] = 0.0  # padding passages get no teacher vector
      batch.update(t_q=tq[np.asarray(idx)], t_p=t_p)
    return batch
