"""Hybrid retrieval (beyond the paper): BM25 over a bundle's own passages, fused with the dense scores.

Dense 128-d retrieval is the minimal system's weakest part, and on SQuAD-style questions BM25 beats every dense
retriever we train. The BM25 index costs no bundle bytes: it is built on first use from the shipped passages."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
from absl import logging

from rnr_jax.data.bm25 import BM25Index

CANDIDATES = 100  # default candidates taken from each of the two retrievals before fusing


class LexicalIndex:
  """BM25 (bm25s, stemmed, stopwords removed) over passages given as ``(title, text)``, keyed by passage id."""

  def __init__(self, bm25: BM25Index, passage_ids: np.ndarray, version: int = 0):
    self.bm25 = bm25
    self.passage_ids = np.asarray(passage_ids, np.int64)
    self.version = version

  @classmethod
  def build(cls, passage_ids: np.ndarray, passage_text: Callable[[int], tuple[str, str]], *,
            version: int = 0) -> LexicalIndex:
    """Indexes the passages ``passage_ids`` with their ``(title, text)``; ``version`` tags the store state."""
    start = time.perf_counter()
    ids = np.asarray(passage_ids, np.int64)
    if not len(ids):
      raise ValueError("cannot build a lexical index over no passages")
    titles, texts = zip(*(passage_text(int(p)) for p in ids.tolist()))
    index = cls(BM25Index.build(list(titles), list(texts)), ids, version)
    logging.info("lexical index: BM25 over %d passages built in %.1f s", len(ids), time.perf_counter() - start)
    return index

  def __len__(self) -> int:
    return len(self.passage_ids)

  def search(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(passage ids int64[Q, k], BM25 scores float32[Q, k])``, best first, ``k`` capped at the passages."""
    rows, scores = self.bm25.search(questions, k)
    return self.passage_ids[rows], scores


def fuse(dense_ids: np.ndarray, dense_scores: np.ndarray, lexical_ids: np.ndarray, lexical_scores: np.ndarray,
         weight: float, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top ``k`` of ``dense + weight * lexical`` over each question's two ``[Q, n]`` candidate lists (Ma et al., 2021): a
  passage in one list gets the other's lowest score; ids < 0 are empty, the result padded with -1, -inf."""
  if dense_ids.shape != dense_scores.shape or lexical_ids.shape != lexical_scores.shape:
    raise ValueError(f"ids and scores differ in shape: {dense_ids.shape} vs {dense_scores.shape}, "
                     f"{lexical_ids.shape} vs {lexical_scores.shape}")
  if len(dense_ids) != len(lexical_ids):
    raise ValueError(f"{len(dense_ids)} questions of dense candidates, {len(lexical_ids)} of lexical ones")
  out_ids = np.full((len(dense_ids), k), -1, np.int64)
  out_scores = np.full((len(dense_ids), k), -np.inf, np.float32)
  for q in range(len(dense_ids)):
    d_ok, l_ok = dense_ids[q] >= 0, lexical_ids[q] >= 0
    d_ids, d_sc = dense_ids[q][d_ok], dense_scores[q][d_ok].astype(np.float64)
    l_ids, l_sc = lexical_ids[q][l_ok], lexical_scores[q][l_ok].astype(np.float64)
    ids = np.concatenate([d_ids, l_ids[~np.isin(l_ids, d_ids)]])
    if not len(ids):
      continue
    dense = np.full(len(ids), d_sc.min() if len(d_sc) else 0.0)
    dense[:len(d_ids)] = d_sc
    lexical = np.full(len(ids), l_sc.min() if len(l_sc) else 0.0)
    pos = {int(p): i for i, p in enumerate(ids.tolist())}
    lexical[[pos[int(p)] for p in l_ids.tolist()]] = l_sc
    total = dense + weight * lexical
    order = np.argsort(-total, kind="stable")[:k]  # stable: the union lists dense candidates first
    out_ids[q, :len(order)] = ids[order]
    out_scores[q, :len(order)] = total[order]
  return out_ids, out_scores
