"""The passage filter (paper §2.1, appendix A.1): a classifier that keeps the passages worth indexing.

A passage scores ``s_j = v_j . w``, trained with binary cross-entropy on oversampled positives and uniform negatives
(docs/design.md, "The passage filter"); the top-n passages are kept (a count, a fraction or a byte budget)."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnr_jax import qa_model, retrieval
from rnr_jax.data.token_corpus import TokenCorpus
from rnr_jax.io import atomic_write_bytes
from rnr_jax.metrics import AnswerMatcher
from rnr_jax.models import EncoderConfig, build_encoder
from rnr_jax.reader_data import NO_PASSAGE
from rnr_jax.tokenization import Tokenizer, bucketed_batches

OFFSET_BYTES = 8  # one int64 entry of the token corpus' offsets per passage


class PassageFilter(nn.Module):
  """``s_j = pool(encoder(p_j, token type 1)) . w``; parameters ``{"encoder": ..., "w": [hidden]}``."""

  config: EncoderConfig
  pooling: str = "cls"
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = build_encoder(self.config, dtype=self.dtype)
    self.w = self.param("w", nn.initializers.normal(0.02), (self.config.hidden_size,))

  def __call__(self, batch: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:
    """Scores ``[B]`` (float32) of passage inputs ``input_ids, attention_mask, token_type_ids``."""
    out = self.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                       deterministic=deterministic)
    v = qa_model.pool(out.sequence, batch["attention_mask"], self.pooling).astype(jnp.float32)
    return v @ self.w.astype(jnp.float32)


def filter_loss(scores: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean binary cross-entropy of ``scores`` (logits) against 0/1 ``labels`` (same size), and accuracy."""
  scores = scores.astype(jnp.float32).reshape(-1)
  labels = labels.astype(jnp.float32).reshape(-1)
  loss = optax.sigmoid_binary_cross_entropy(scores, labels).mean()
  return loss, {"accuracy": jnp.mean((scores > 0) == (labels > 0.5))}


def retrieval_frequency(rankings: Sequence[np.ndarray], top_k: int, num_passages: int) -> np.ndarray:
  """``int64[num_passages]``: for how many questions each passage is in the top-``top_k`` (-1 ignored)."""
  counts = np.zeros(num_passages, np.int64)
  for ranked in rankings:
    top = np.sort(np.asarray(ranked)[:, :top_k], axis=1)
    first = np.ones(top.shape, bool)
    first[:, 1:] = top[:, 1:] != top[:, :-1]  # count a passage once per question
    counts += np.bincount(top[first & (top >= 0)], minlength=num_passages)
  return counts


def smoothed_frequency(freq: np.ndarray, base: float = 10.0) -> np.ndarray:
  """``log_base(freq) + 1`` (float64), for ``freq >= 1``."""
  freq = np.asarray(freq, np.float64)
  if (freq < 1).any():
    raise ValueError("smoothed frequency is defined for frequencies >= 1")
  return np.log(freq) / np.log(base) + 1.0


def oversampled_pool(pids: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One epoch of positives: ``floor(w)`` copies of each, plus one with probability ``frac(w)``."""
  weights = np.asarray(weights, np.float64)
  copies = np.floor(weights).astype(np.int64)
  copies += rng.random(len(weights)) < weights - copies
  return np.repeat(np.asarray(pids, np.int32), copies)


@dataclasses.dataclass(frozen=True)
class FilterSets:
  """Passage ids of ``J+train`` (with their smoothed frequencies), ``J-train`` without the validation passages,
  ``J+val`` (may overlap ``J+train``) and ``J-val`` (disjoint from both)."""

  train_positives: np.ndarray
  weights: np.ndarray
  train_negatives: np.ndarray
  val_positives: np.ndarray
  val_negatives: np.ndarray


def make_filter_sets(num_passages: int, freq: np.ndarray, val_positives: np.ndarray, num_val_negatives: int,
                     log_base: float, rng: np.random.Generator) -> FilterSets:
  """Splits the corpus by each passage's retrieval frequency ``freq`` and ``J+val``; ``J-val`` gets
  ``num_val_negatives`` passages (fewer if the corpus is short of them), kept out of the training negatives too."""
  positives = np.flatnonzero(freq > 0).astype(np.int32)
  val_positives = np.unique(np.asarray(val_positives, np.int32))
  if not len(positives) or not len(val_positives):
    raise ValueError(f"empty positive set: {len(positives)} training and {len(val_positives)} validation positives")
  outside = np.setdiff1d(np.arange(num_passages, dtype=np.int32), np.union1d(positives, val_positives))
  val_negatives = np.sort(rng.choice(outside, size=min(num_val_negatives, len(outside)), replace=False))
  negatives = np.setdiff1d(outside, val_negatives)
  if not len(negatives):
    raise ValueError(f"no training negatives: all {num_passages} passages are positives or validation passages; "
                     "retrieve fewer passages per question (top_k) or use fewer validation negatives")
  return FilterSets(positives, smoothed_frequency(freq[positives], log_base), negatives.astype(np.int32),
                    val_positives, val_negatives.astype(np.int32))


def training_pairs(sets: FilterSets, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """``(positives, negatives)`` of equal length: one epoch of oversampled positives, each with a uniform negative."""
  pos = rng.permutation(oversampled_pool(sets.train_positives, sets.weights, rng))
  neg = rng.choice(sets.train_negatives, size=len(pos), replace=len(sets.train_negatives) < len(pos))
  return pos, neg.astype(np.int32)


def pair_batch(tokenizer: Tokenizer, corpus: TokenCorpus, positives: np.ndarray, negatives: np.ndarray, *,
               max_len: int, buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """Passage inputs ``[2n, L]`` (rows ``2i, 2i + 1`` = pair ``i``'s positive and negative) and ``labels [n, 2]``
  (one row per pair, so micro-batches split whole pairs and stay balanced)."""
  records = [corpus[p] for pair in zip(positives.tolist(), negatives.tolist()) for p in pair]
  batch = tokenizer.passages_from_records(records, max_len, buckets).as_dict()
  batch["labels"] = np.tile(np.asarray([[1.0, 0.0]], np.float32), (len(positives), 1))
  return batch


def score_passages(encoder: retrieval.BatchEncoder, params: Any, tokenizer: Tokenizer, corpus: TokenCorpus,
                   pids: np.ndarray, *, max_len: int, buckets: Sequence[int]) -> np.ndarray:
  """``float32`` scores of passages ``pids``, batched by length bucket (``encoder`` wraps :func:`score_fn`)."""
  pids = np.asarray(pids)
  lengths = np.minimum(corpus.lengths()[pids] + 2, max_len)  # + [CLS] and [SEP]
  batches = ((idx, tokenizer.passages_from_records([corpus[p] for p in pids[idx]], max_len, buckets))
             for idx in bucketed_batches(lengths, encoder.batch_size, buckets))
  return encoder(params, batches, len(pids))[:, 0]


def score_fn(model: PassageFilter) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
  """``(params, batch) -> scores [B, 1]`` without dropout, for a :class:`retrieval.BatchEncoder`."""
  def scores(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return model.apply({"params": params}, batch)[:, None]
  return scores


def first_answer_passages(ranked: np.ndarray, answers: Sequence[Sequence[str]], matcher: AnswerMatcher) -> np.ndarray:
  """``J+val``: each question's best-ranked retrieved passage holding an answer (unique, sorted)."""
  found = set()
  for row, question_answers in zip(np.asarray(ranked), answers):
    for pid in row[row >= 0].tolist():
      if matcher.has_answer(question_answers, pid):
        found.add(pid)
        break
  return np.asarray(sorted(found), np.int32)


def hit_ratio(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
  """Fraction of positives among the top-``P`` scores of positives and negatives (``P`` = #positives); ties go
  against the positives, so a constant scorer does not score well."""
  num_pos = len(positive_scores)
  scores = np.concatenate([np.asarray(negative_scores), np.asarray(positive_scores)])
  top = np.argsort(-scores, kind="stable")[:num_pos]
  return float(np.sum(top >= len(negative_scores)) / max(num_pos, 1))


def record_bytes(corpus: TokenCorpus) -> np.ndarray:
  """Bytes each passage takes in the token-ID corpus: its token ids plus one offset entry."""
  return corpus.lengths() * corpus.tokens.dtype.itemsize + OFFSET_BYTES


def select_top(scores: np.ndarray, keep: float, keep_bytes: int = 0, sizes: np.ndarray | None = None) -> np.ndarray:
  """Ids of the top-n passages by score, best first: n the longest prefix whose ``sizes`` sum to at most
  ``keep_bytes`` (> 0), else ``keep`` (an integer count, or a fraction < 1 of the passages)."""
  scores = np.asarray(scores)
  order = np.argsort(-scores, kind="stable").astype(np.int32)
  if keep_bytes > 0:
    if sizes is None:
      raise ValueError("keep_bytes needs the passage sizes")
    n = int(np.searchsorted(np.cumsum(np.asarray(sizes)[order]), keep_bytes, side="right"))
  elif keep >= 1:
    if keep != int(keep):
      raise ValueError(f"keep >= 1 is a passage count and must be an integer, got {keep}")
    n = min(int(keep), len(scores))
  elif keep > 0:
    n = int(round(keep * len(scores)))
  else:
    raise ValueError(f"keep must be > 0 (a count or a fraction) unless keep_bytes is set, got {keep}")
  return order[:n]


def save_subset(path: str | os.PathLike, pids: np.ndarray, scores: np.ndarray, num_passages: int) -> None:
  """Writes the kept passages (best first) and their scores as an ``.npz``, atomically."""
  buf = io.BytesIO()
  np.savez(buf, pids=np.asarray(pids, np.int32), scores=np.asarray(scores, np.float32),
           num_passages=np.asarray(num_passages, np.int64))
  atomic_write_bytes(path, buf.getvalue())


def load_subset(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
  """``(pids, scores, num_passages)`` of a subset file written by :func:`save_subset`."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return f["pids"], f["scores"], int(f["num_passages"])
  except KeyError as e:
    raise ValueError(f"{path}: not a passage subset file (no field {e})") from None


def subset_ids(path: str | os.PathLike | None, num_passages: int) -> np.ndarray | None:
  """Sorted int64 passage ids of a subset file (None for no file), checked against the corpus size."""
  if not path:
    return None
  pids, _, total = load_subset(path)
  if total != num_passages:
    raise ValueError(f"{path} selects from {total} passages, the corpus has {num_passages}")
  return np.sort(pids.astype(np.int64))


def restrict_ranking(rows: np.ndarray, keep: np.ndarray, width: int | None = None) -> np.ndarray:
  """Each row's passage ids that ``keep`` (bool per passage) keeps, in order, padded with -1 to ``width``."""
  out = np.full((len(rows), width or rows.shape[1]), NO_PASSAGE, np.int32)
  for i, row in enumerate(rows):
    row = row[(row >= 0) & keep[np.maximum(row, 0)]][:out.shape[1]]
    out[i, :len(row)] = row
  return out
