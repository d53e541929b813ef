"""Evaluators, each built from its stage config and each ``(params, step) -> {name: value}``: a retriever's answer
accuracy, a reader's exact match, the passage filter's hit ratio and a unified student end to end."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rnr_jax import embeddings, passage_filter, reader, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData, Question
from rnr_jax.metrics import answer_top_k_accuracy, exact_match
from rnr_jax.specs import ReaderSpec, RetrieverSpec, SystemSpec, read_fn

Params = Any


def _check_select(select: str, names: set[str], field: str) -> None:
  if select not in names:
    raise ValueError(f"{field} {select!r} is not one of {sorted(names)}")


def _em(predictions: Sequence[str], questions: Sequence[Question]) -> float:
  return float(np.mean([exact_match(p, q.answers) for p, q in zip(predictions, questions)])) if questions else 0.0


class _Reading:
  """Reads ``m`` passages per question in batches and answers from the first n of them, for each n."""

  def __init__(self, model_fn: Any, spec: ReaderSpec, data: PreparedData, tokenizer: tk.Tokenizer,
               mesh: jax.sharding.Mesh, batch_size: int, m: int, rule: str):
    self._spec = spec
    self._data = data
    self._tokenizer = tokenizer
    self._batch = batch_size
    self._rule = rule
    self._is_continuation = reader.continuation_table(tokenizer.vocab())
    self._reader = retrieval.BatchEncoder(model_fn, mesh, batch_size * m)  # one compiled shape per bucket

  def answers(self, params: Params, question_ids: Sequence[np.ndarray], pids: np.ndarray, counts: Sequence[int]
              ) -> dict[int, list[str]]:
    """``{n: answer per question}`` reading each question's first n passages of ``pids [Q, m]``."""
    spec = self._spec
    out: dict[int, list[str]] = {n: [] for n in counts}
    for first in range(0, len(pids), self._batch):
      rows_of = slice(first, first + self._batch)
      batch = rd.reader_batch(self._tokenizer, self._data.token_corpus(), question_ids[rows_of], pids[rows_of],
                              max_len=spec.reader_len, buckets=spec.buckets, question_len=spec.question_len,
                              max_answer_len=spec.max_answer_len, max_spans=1)
      rows, length = batch["input_ids"].shape
      logits = self._reader(params, [(np.arange(rows), tk.EncodedBatch(*(batch[k] for k in tk.ENCODER_INPUTS)))], rows)
      for n in counts:
        out[n] += rd.predict_answers(self._tokenizer, self._is_continuation, self._data.passages.texts, batch,
                                     pids[rows_of], logits[:, :length], logits[:, length:2 * length],
                                     logits[:, 2 * length], n, max_answer_len=spec.max_answer_len, rule=self._rule)
    return out


class RetrievalEvaluator:
  """Top-k answer accuracy (``<split>/top<k>``, ``mean/top<k>``) of each ``retriever.eval_splits`` split."""

  def __init__(self, rcfg: Any, spec: RetrieverSpec, data: PreparedData, tokenizer: tk.Tokenizer,
               mesh: jax.sharding.Mesh):
    self._spec = spec
    self._data = data
    self._tokenizer = tokenizer
    self._ks = tuple(int(k) for k in rcfg.eval_ks)
    self._splits = tuple(rcfg.eval_splits)
    if not self._splits:
      raise ValueError("retriever.eval_splits is empty: the best parameters are chosen by an evaluation")
    self.names = {f"{s}/top{k}" for s in (*self._splits, "mean") for k in self._ks}
    _check_select(rcfg.select_metric, self.names, "retriever.select_metric")
    self._max_questions = int(rcfg.max_eval_questions) or None
    q_fn, p_fn = spec.embed_fns()
    self._q_encoder = retrieval.BatchEncoder(q_fn, mesh, int(rcfg.encode_batch_size))
    self._p_encoder = retrieval.BatchEncoder(p_fn, mesh, int(rcfg.encode_batch_size))
    self.passage_ids = passage_filter.subset_ids(rcfg.subset, data.num_passages)
    corpus = data.token_corpus()
    self._records = corpus if self.passage_ids is None else [corpus[int(p)] for p in self.passage_ids]
    self.last = None  # the last evaluation's corpus encoding (retrieval.CorpusEmbeddings)

  def __call__(self, params: Params, step: int) -> dict[str, float]:
    spec = self._spec
    self.last = retrieval.encode_corpus(self._p_encoder, params, self._tokenizer, self._records,
                                        max_len=spec.passage_len, buckets=spec.buckets,
                                        token_type=spec.passage_token_type, progress=True)
    metrics: dict[str, float] = {}
    for split in self._splits:
      questions = self._data.questions(split)[:self._max_questions]
      q = retrieval.encode_questions(self._q_encoder, params, self._tokenizer, [x.question for x in questions],
                                     max_len=spec.question_len, buckets=spec.buckets)
      accuracy = retrieval.evaluate_retrieval(q, self.last.vectors, [x.answers for x in questions],
                                              self._data.matcher(), self._ks, passage_ids=self.passage_ids)
      metrics.update({f"{split}/{name}": v for name, v in accuracy.items()})
    for k in self._ks:
      metrics[f"mean/top{k}"] = float(np.mean([metrics[f"{s}/top{k}"] for s in self._splits]))
    return metrics


class ReaderEvaluator:
  """Exact match on ``reader.eval_split``: ``em_gold_alone``, ``em_gold_ranked`` (among ``m - 1`` hard
  negatives), ``em_open@n`` (the top n retrieved passages) and ``em_open``, the best of those (appendix A.3)."""

  def __init__(self, rcfg: Any, spec: ReaderSpec, split: rd.ReaderSplit, data: PreparedData,
               tokenizer: tk.Tokenizer, mesh: jax.sharding.Mesh):
    self._split = split
    self._m = int(rcfg.m)
    self._counts = tuple(sorted(int(n) for n in rcfg.eval_passages))
    self.names = {"em_gold_alone", "em_gold_ranked", "em_open", *(f"em_open@{n}" for n in self._counts)}
    _check_select(rcfg.select_metric, self.names, "reader.select_metric")
    batch, fn = int(rcfg.eval_batch_size), read_fn(spec.build())
    self._alone = _Reading(fn, spec, data, tokenizer, mesh, batch, 1, rcfg.answer_rule)
    self._gold = _Reading(fn, spec, data, tokenizer, mesh, batch, self._m, rcfg.answer_rule)
    self._open = _Reading(fn, spec, data, tokenizer, mesh, batch, self._counts[-1], rcfg.answer_rule)
    self._open_questions = np.arange(len(split))[: int(rcfg.eval_questions) or None]
    self._gold_questions = np.asarray([q for q in self._open_questions if len(split.positives[q])], np.int64)

  def __call__(self, params: Params, step: int) -> dict[str, float]:
    split = self._split
    ids = lambda qs: [split.question_ids[q] for q in qs]
    gold_pids = np.asarray([split.gold_passages(q, self._m) for q in self._gold_questions]).reshape(-1, self._m)
    alone = self._alone.answers(params, ids(self._gold_questions), gold_pids[:, :1], [1])[1]
    ranked = self._gold.answers(params, ids(self._gold_questions), gold_pids, [self._m])[self._m]
    open_pids = np.stack([split.open_passages(q, self._counts[-1]) for q in self._open_questions])
    opened = self._open.answers(params, ids(self._open_questions), open_pids, self._counts)
    with_gold = [split.questions[q] for q in self._gold_questions]
    metrics = {"em_gold_alone": _em(alone, with_gold), "em_gold_ranked": _em(ranked, with_gold)}
    for n in self._counts:
      metrics[f"em_open@{n}"] = _em(opened[n], [split.questions[q] for q in self._open_questions])
    metrics["em_open"] = max(metrics[f"em_open@{n}"] for n in self._counts)
    return metrics


class FilterEvaluator:
  """``hit_val``: how often a ``J+val`` passage outscores a ``J-val`` one (paper §2.1)."""

  names = {"hit_val"}

  def __init__(self, scorer: retrieval.BatchEncoder, tokenizer: tk.Tokenizer, data: PreparedData,
               sets: passage_filter.FilterSets, *, max_len: int, buckets: Sequence[int]):
    self._scorer = scorer
    self._tokenizer = tokenizer
    self._corpus = data.token_corpus()
    self._pids = np.concatenate([sets.val_positives, sets.val_negatives])
    self._num_positives = len(sets.val_positives)
    self._max_len = max_len
    self._buckets = buckets

  def __call__(self, params: Params, step: int) -> dict[str, float]:
    scores = passage_filter.score_passages(self._scorer, params, self._tokenizer, self._corpus, self._pids,
                                           max_len=self._max_len, buckets=self._buckets)
    return {"hit_val": passage_filter.hit_ratio(scores[: self._num_positives], scores[self._num_positives :])}


class OpenEvaluator:
  """A unified student end to end on ``eval.split`` over a fresh index of the corpus: ``em_open@m'`` for each m' of
  ``eval.passages``, their best ``em_open`` (A.3), mean ``em_open_mean`` (A.2) and retrieval ``top<k>``."""

  def __init__(self, eval_cfg: Any, system: SystemSpec, data: PreparedData, tokenizer: tk.Tokenizer,
               index: embeddings.FreshIndex, mesh: jax.sharding.Mesh):
    self._data = data
    self._index = index
    self._counts = tuple(sorted(int(n) for n in eval_cfg.passages))
    self._ks = tuple(sorted(int(k) for k in eval_cfg.ks))
    self.names = {"em_open", "em_open_mean", *(f"em_open@{n}" for n in self._counts), *(f"top{k}" for k in self._ks)}
    _check_select(eval_cfg.select_metric, self.names, "eval.select_metric")
    self._questions = data.questions(eval_cfg.split)[: int(eval_cfg.questions) or None]
    self._question_ids = tokenizer.encode_texts([q.question for q in self._questions])
    self._reading = _Reading(read_fn(system.reader.build()), system.reader, data, tokenizer, mesh,
                             int(eval_cfg.batch_size), self._counts[-1], eval_cfg.answer_rule)

  def __call__(self, params: Params, step: int) -> dict[str, float]:
    t = time.perf_counter()
    ranked = self._index.search(params, step, [q.question for q in self._questions],
                                max(self._counts[-1], self._ks[-1]))
    metrics: dict[str, float] = {"index_s": time.perf_counter() - t}
    accuracy = answer_top_k_accuracy([r[r != rd.NO_PASSAGE] for r in ranked], [q.answers for q in self._questions],
                                     self._data.matcher(), self._ks)
    metrics.update({f"top{k}": v for k, v in accuracy.items()})
    predictions = self._reading.answers(params, self._question_ids, ranked[:, : self._counts[-1]], self._counts)
    for n in self._counts:
      metrics[f"em_open@{n}"] = _em(predictions[n], self._questions)
    ems = [metrics[f"em_open@{n}"] for n in self._counts]
    metrics["em_open"], metrics["em_open_mean"] = max(ems), float(np.mean(ems))
    return metrics
