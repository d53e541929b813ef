"""Retriever and reader training candidates from BM25, and samplers over them.

For every question of a split, :func:`build_candidates` stores

* the BM25 top-k passages with their scores and DPR ``has_answer`` flags;
* ``gold``: the passages of the question's gold document that contain an answer;
* ``positives``: ``gold`` first, then the other BM25-retrieved passages that
  contain an answer, in rank order;
* ``hard_negatives``: the highest-ranked BM25 passages without an answer.

Ragged lists are stored flat with offsets (:class:`RaggedArray`), everything as
``.npy`` files that load memory-mapped. :func:`sample_retriever_passages` and
:func:`sample_reader_passages` draw training passages from these lists.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from rnr_jax.data.bm25 import BM25Index
from rnr_jax.data.passages import PassageTable, gold_passages
from rnr_jax.data.readers import Question
from rnr_jax.data.token_corpus import RaggedArray, save_npy
from rnr_jax.metrics import AnswerMatcher

DEFAULT_HARD_NEGATIVES = 30
DEFAULT_BM25_TOPK = 100


@dataclasses.dataclass
class SplitCandidates:
  """Candidates of one split; row / index ``q`` belongs to question ``q``.

  Attributes:
    bm25_pids: ``int32[n, k]`` BM25 top-k passage ids, best first.
    bm25_scores: ``float32[n, k]`` their BM25 scores.
    bm25_has_answer: ``bool[n, k]`` whether each holds an answer (DPR criterion).
    gold: answer-bearing passages of the gold document (may be empty).
    positives: ``gold`` then BM25 answer-bearing passages (may be empty).
    hard_negatives: top BM25 passages without an answer.
  """

  bm25_pids: np.ndarray
  bm25_scores: np.ndarray
  bm25_has_answer: np.ndarray
  gold: RaggedArray
  positives: RaggedArray
  hard_negatives: RaggedArray

  ARRAYS = ("bm25_pids", "bm25_scores", "bm25_has_answer")
  RAGGED = ("gold", "positives", "hard_negatives")

  def __len__(self) -> int:
    return len(self.bm25_pids)

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the ``.npy`` files into ``directory`` (each file atomically)."""
    os.makedirs(directory, exist_ok=True)
    for name in self.ARRAYS:
      save_npy(os.path.join(directory, f"{name}.npy"), getattr(self, name))
    for name in self.RAGGED:
      getattr(self, name).save(directory, name)

  @classmethod
  def load(cls, directory: str | os.PathLike, *, mmap: bool = True) -> "SplitCandidates":
    mode = "r" if mmap else None
    arrays = {n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode=mode) for n in cls.ARRAYS}
    ragged = {n: RaggedArray.load(directory, n, mmap=mmap) for n in cls.RAGGED}
    return cls(**arrays, **ragged)

  def retriever_passages(self, q: int, num_hard_negatives: int, rng: np.random.Generator
                         ) -> tuple[int, np.ndarray]:
    """A positive and hard negatives of question ``q`` (:func:`sample_retriever_passages`)."""
    return sample_retriever_passages(self.positives[q], self.hard_negatives[q], num_hard_negatives, rng)

  def reader_passages(self, q: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` passages of question ``q``, the positive first (:func:`sample_reader_passages`)."""
    return sample_reader_passages(self.positives[q], self.hard_negatives[q], m, rng)

  def trainable(self) -> np.ndarray:
    """Indices of the questions with at least one positive and one hard negative."""
    return np.flatnonzero((self.positives.lengths() > 0) & (self.hard_negatives.lengths() > 0))


def build_candidates(questions: Sequence[Question], table: PassageTable, index: BM25Index, matcher: AnswerMatcher,
                     *, k: int = DEFAULT_BM25_TOPK, num_hard_negatives: int = DEFAULT_HARD_NEGATIVES,
                     n_threads: int | None = None) -> SplitCandidates:
  """BM25-retrieves every question at once and derives its training passages.

  Args:
    questions: the split's questions (``gold_pid`` = corpus document id, or None).
    table: the passages the index was built on.
    index: BM25 over ``table``.
    matcher: ``has_answer`` over ``table`` (e.g. ``table.matcher()``).
    k: BM25 depth (capped at the number of passages).
    num_hard_negatives: how many answer-free BM25 passages to keep per question.
    n_threads: BM25 retrieval threads (default: all CPUs).
  """
  if len(index) != len(table):
    raise ValueError(f"the BM25 index has {len(index)} passages, the passage table {len(table)}")
  pids, scores = index.search([q.question for q in questions], k, n_threads=n_threads)
  flags = np.zeros(pids.shape, bool)
  gold, positives, negatives = [], [], []
  for i, q in enumerate(questions):
    flags[i] = matcher.flags(q.answers, pids[i])
    g = gold_passages(table, q, matcher)
    seen = set(g)
    pos = list(g)
    for pid, hit in zip(pids[i].tolist(), flags[i].tolist()):
      if hit and pid not in seen:
        seen.add(pid)
        pos.append(pid)
    gold.append(g)
    positives.append(pos)
    negatives.append(pids[i][~flags[i]][:num_hard_negatives])
  return SplitCandidates(pids, scores, flags, RaggedArray.from_sequences(gold, np.int32),
                         RaggedArray.from_sequences(positives, np.int32),
                         RaggedArray.from_sequences(negatives, np.int32))


def sample_retriever_passages(positives: np.ndarray, hard_negatives: np.ndarray, num_hard_negatives: int,
                              rng: np.random.Generator) -> tuple[int, np.ndarray]:
  """One positive and ``num_hard_negatives`` hard negatives for a retriever step.

  The positive is the first one (the gold passage when there is one) and the
  negatives are drawn without replacement (with replacement when there are
  fewer than asked for).

  Raises:
    ValueError: no positive, or hard negatives asked for but none available.
  """
  if len(positives) == 0:
    raise ValueError("the question has no positive passage")
  negs = _draw(hard_negatives, num_hard_negatives, rng)
  return int(positives[0]), negs


def sample_reader_passages(positives: np.ndarray, negatives: np.ndarray, m: int, rng: np.random.Generator
                           ) -> np.ndarray:
  """``m >= 2`` passage ids: a random positive first, then ``m - 1`` negatives.

  Only the first passage contains an answer (paper, Algorithm 1). Negatives
  are drawn without replacement, or with replacement when there are fewer than
  ``m - 1``.

  Raises:
    ValueError: ``m < 2``, no positive or no negative.
  """
  if m < 2:
    raise ValueError(f"m must be >= 2, got {m}")
  if len(positives) == 0:
    raise ValueError("the question has no positive passage")
  first = positives[int(rng.integers(len(positives)))]
  return np.concatenate([[first], _draw(negatives, m - 1, rng)]).astype(np.int32)


def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  if n <= 0:
    return np.zeros(0, np.int32)
  if len(pool) == 0:
    raise ValueError("the question has no negative passage")
  return np.asarray(rng.choice(np.asarray(pool), size=n, replace=len(pool) < n), np.int32)
