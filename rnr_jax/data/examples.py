"""Retriever and reader training candidates from BM25, stored as memory-mappable ``.npy`` files, and samplers.

Per question: its BM25 top-k, ``gold`` (its gold document's answer passages), ``positives`` and ``hard_negatives``."""

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
  """Candidates of one split (see the module docstring); row ``q`` belongs to question ``q``."""

  bm25_pids: np.ndarray  # int32[n, k], best first
  bm25_scores: np.ndarray  # float32[n, k]
  bm25_has_answer: np.ndarray  # bool[n, k]
  gold: RaggedArray
  positives: RaggedArray
  hard_negatives: RaggedArray
  given_missing: int = 0  # given documents (positive_docs, negative_docs) not in the corpus

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
  def load(cls, directory: str | os.PathLike) -> "SplitCandidates":
    """The arrays written by :meth:`save`, memory-mapped."""
    arrays = {n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in cls.ARRAYS}
    return cls(**arrays, **{n: RaggedArray.load(directory, n) for n in cls.RAGGED})

  def trainable(self) -> np.ndarray:
    """Indices of the questions with at least one positive and one hard negative."""
    return np.flatnonzero((self.positives.lengths() > 0) & (self.hard_negatives.lengths() > 0))


def build_candidates(questions: Sequence[Question], table: PassageTable, index: BM25Index, matcher: AnswerMatcher,
                     *, k: int = DEFAULT_BM25_TOPK, num_hard_negatives: int = DEFAULT_HARD_NEGATIVES,
                     n_threads: int | None = None) -> SplitCandidates:
  """BM25-retrieves every question and derives its training passages; a question's given documents (DPR's
  contexts) join ``gold`` and replace the BM25 hard negatives, those missing from the corpus counted."""
  if len(index) != len(table):
    raise ValueError(f"the BM25 index has {len(index)} passages, the passage table {len(table)}")
  pids, scores = index.search([q.question for q in questions], k, n_threads=n_threads)
  flags = np.zeros(pids.shape, bool)
  gold, positives, negatives = [], [], []
  missing = 0

  def passages(docs: Sequence[int]) -> list[int]:
    nonlocal missing
    out = []
    for d in docs:
      try:
        out += table.passages_of(d)
      except KeyError:
        missing += 1
    return out

  for i, q in enumerate(questions):
    flags[i] = matcher.flags(q.answers, pids[i])
    g = list(dict.fromkeys(gold_passages(table, q, matcher) + passages(q.positive_docs)))
    gold.append(g)
    positives.append(list(dict.fromkeys(g + pids[i][flags[i]].tolist())))  # gold first, then rank order, no repeats
    given = passages(q.negative_docs)
    negatives.append(given[:num_hard_negatives] if given else pids[i][~flags[i]][:num_hard_negatives])
  ragged = [RaggedArray.from_sequences(lists, np.int32) for lists in (gold, positives, negatives)]
  return SplitCandidates(pids, scores, flags, *ragged, given_missing=missing)


def sample_retriever_passages(positives: np.ndarray, hard_negatives: np.ndarray, num_hard_negatives: int,
                              rng: np.random.Generator) -> tuple[int, np.ndarray]:
  """The first positive (the gold passage when there is one) and ``num_hard_negatives`` drawn hard negatives."""
  if len(positives) == 0:
    raise ValueError("the question has no positive passage")
  return int(positives[0]), _draw(hard_negatives, num_hard_negatives, rng)


def sample_reader_passages(positives: np.ndarray, negatives: np.ndarray, m: int, rng: np.random.Generator
                           ) -> np.ndarray:
  """``m >= 2`` passage ids: a random positive first, then ``m - 1`` drawn negatives (paper, Algorithm 1)."""
  if m < 2:
    raise ValueError(f"m must be >= 2, got {m}")
  if len(positives) == 0:
    raise ValueError("the question has no positive passage")
  first = positives[int(rng.integers(len(positives)))]
  return np.concatenate([[first], _draw(negatives, m - 1, rng)]).astype(np.int32)


def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """``n`` of ``pool``, without replacement unless the pool is smaller."""
  if n <= 0:
    return np.zeros(0, np.int32)
  if len(pool) == 0:
    raise ValueError("the question has no negative passage")
  return np.asarray(rng.choice(np.asarray(pool), size=n, replace=len(pool) < n), np.int32)
