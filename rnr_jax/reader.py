"""Reading: answer-span targets, reader losses and answer decoding.

As DPR's reader, a reader scores for each of m passages of a question a start and an end logit per token and one ranking
logit. Training (paper §2.2.3, footnote 6): ranking cross-entropy of the positive (first) passage plus the marginal
log-likelihood of all its gold spans. Decoding: paper appendix A.3, :func:`select_answer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e9


def find_answer_spans(input_ids: np.ndarray, text_start: int, text_end: int,
                      answers_ids: Sequence[np.ndarray], max_answer_len: int) -> list[tuple[int, int]]:
  """Sorted inclusive ``(start, end)`` token spans of the answers (at most ``max_answer_len`` long) in the text."""
  seq = np.asarray(input_ids[text_start:text_end])
  spans = set()
  for ans in answers_ids:
    ans = np.asarray(ans)
    n = len(ans)
    if n == 0 or n > max_answer_len or n > len(seq):
      continue
    for i in np.flatnonzero(seq[: len(seq) - n + 1] == ans[0]):
      if np.array_equal(seq[i : i + n], ans):
        spans.add((text_start + int(i), text_start + int(i) + n - 1))
  return sorted(spans)


def span_targets(spans_per_row: Sequence[Sequence[tuple[int, int]]], max_spans: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads lists of spans into ``starts, ends, mask`` arrays of shape ``[rows, max_spans]``."""
  starts = np.zeros((len(spans_per_row), max_spans), np.int32)
  ends = np.zeros_like(starts)
  mask = np.zeros(starts.shape, bool)
  for r, spans in enumerate(spans_per_row):
    for k, (s, e) in enumerate(spans[:max_spans]):
      starts[r, k], ends[r, k], mask[r, k] = s, e, True
  return starts, ends, mask


def text_mask(length: int, text_start: np.ndarray, text_end: np.ndarray) -> np.ndarray:
  """``[rows, length]`` bool mask of passage-text positions (where answers may be)."""
  pos = np.arange(length)[None, :]
  return (pos >= np.asarray(text_start)[:, None]) & (pos < np.asarray(text_end)[:, None])


def masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(jnp.where(mask, logits.astype(jnp.float32), NEG_INF), axis=-1)


def span_mml_loss(start_logits: jax.Array, end_logits: jax.Array, valid: jax.Array,
                  starts: jax.Array, ends: jax.Array, span_mask: jax.Array) -> jax.Array:
  """Per-row ``-log sum_{gold spans} P_start(s) P_end(e)``, 0 without a gold span."""
  lp = (jnp.take_along_axis(masked_log_softmax(start_logits, valid), starts, -1)
        + jnp.take_along_axis(masked_log_softmax(end_logits, valid), ends, -1))
  return jnp.where(span_mask.any(-1), -jax.nn.logsumexp(jnp.where(span_mask, lp, NEG_INF), axis=-1), 0.0)


def reader_loss(start_logits: jax.Array, end_logits: jax.Array, rank_logits: jax.Array,
                valid: jax.Array, starts: jax.Array, ends: jax.Array, span_mask: jax.Array,
                passage_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean ranking CE + span MML of ``B`` questions x ``m`` passages (the positive first), and its parts; ``[B, m, L]``
  logits and ``valid``, ``[B, m]`` rank logits and ``passage_mask`` (real passages), ``[B, S]`` positive spans."""
  if passage_mask is None:
    passage_mask = jnp.ones(rank_logits.shape, bool)
  rank_loss = -masked_log_softmax(rank_logits, passage_mask)[:, 0]
  span_loss = span_mml_loss(start_logits[:, 0], end_logits[:, 0], valid[:, 0], starts, ends, span_mask)
  loss = jnp.mean(rank_loss + span_loss)
  rank_acc = jnp.mean(jnp.argmax(jnp.where(passage_mask, rank_logits, NEG_INF), -1) == 0)
  return loss, {"rank_loss": rank_loss.mean(), "span_loss": span_loss.mean(), "rank_acc": rank_acc}


@dataclasses.dataclass(frozen=True)
class Span:
  passage: int  # index among the m passages
  start: int  # token position (inclusive)
  end: int  # token position (inclusive)
  score: float


def _log_softmax_np(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  x = np.where(mask, x.astype(np.float64), -np.inf)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def top_spans(start_logits: np.ndarray, end_logits: np.ndarray, valid: np.ndarray,
              max_answer_len: int, top_k: int, log_probs: bool = False) -> list[tuple[int, int, float]]:
  """Best ``top_k`` non-overlapping spans ``(s, e, score)`` of one passage inside ``valid``, as in DPR; score is
  ``start[s] + end[e]`` of the logits or, with ``log_probs``, of their log-softmaxes over ``valid``."""
  valid = np.asarray(valid, bool)
  if log_probs:
    s_sc, e_sc = _log_softmax_np(start_logits, valid), _log_softmax_np(end_logits, valid)
  else:
    s_sc, e_sc = np.where(valid, start_logits, -np.inf), np.where(valid, end_logits, -np.inf)
  length = len(s_sc)
  # scores[s, w] = start[s] + end[s + w]
  idx = np.arange(length)[:, None] + np.arange(max_answer_len)[None, :]
  inside = idx < length
  idx = np.minimum(idx, length - 1)
  scores = np.where(inside & valid[idx] & valid[:, None], s_sc[:, None] + e_sc[idx], -np.inf)
  chosen: list[tuple[int, int, float]] = []
  for f in np.argsort(-scores, axis=None):
    sc = scores.flat[f]
    if not np.isfinite(sc) or len(chosen) >= top_k:
      break
    s, w = divmod(int(f), max_answer_len)
    if all(s + w < cs or s > ce for cs, ce, _ in chosen):  # else it overlaps a better span
      chosen.append((s, s + w, float(sc)))
  return chosen


def _best_span(start_logits: np.ndarray, end_logits: np.ndarray, valid: np.ndarray, has_text: np.ndarray,
               max_answer_len: int, spans_per_passage: int, *, log_probs: bool, span_weight: float,
               passage_scores: np.ndarray) -> Span:
  """Maximum of ``span_weight * span score + passage_scores[p]`` over the top spans of every passage with text."""
  best = None
  for p in np.flatnonzero(has_text).tolist():
    for s, e, sc in top_spans(start_logits[p], end_logits[p], valid[p], max_answer_len, spans_per_passage,
                              log_probs=log_probs):
      total = span_weight * sc + passage_scores[p]
      if best is None or total > best.score:
        best = Span(p, s, e, float(total))
  if best is None:
    raise ValueError("no valid span in any passage")
  return best


def select_answer(start_logits: np.ndarray, end_logits: np.ndarray, rank_logits: np.ndarray, valid: np.ndarray,
                  max_answer_len: int = 10, rule: str = "dpr", passage_score_weight: float = 0.8,
                  spans_per_passage: int = 5, retrieval_scores: np.ndarray | None = None,
                  retrieval_scale: float = 20.0) -> Span:
  """The answer span among ``m`` passages of one question (arrays ``[m, L]`` and ``[m]``).

  ``"dpr"``: the best span of the top-ranked passage. Else the best of the top ``spans_per_passage`` spans of each
  passage by ``(1-λ)(log Ps + log Pe) + 2λ log Prank`` (``"weighted"``, λ = ``passage_score_weight``) or by ``start +
  end + log Prank + log Pret`` (``"fused"``, beyond the paper; ``Pret`` the softmax of ``retrieval_scale *
  retrieval_scores``): the retriever's evidence joins the reader's, which a weak ranker needs.
  """
  m = len(rank_logits)
  has_text = np.asarray(valid).any(-1)
  if not has_text.any():
    raise ValueError("no passage has text tokens to read")
  if rule == "dpr":
    for p in np.argsort(-np.where(has_text, rank_logits, -np.inf)):
      spans = top_spans(start_logits[p], end_logits[p], valid[p], max_answer_len, 1)
      if spans:
        return Span(int(p), *spans[0])
    raise ValueError("no valid span in any passage")
  if rule == "weighted":
    lam = passage_score_weight
    rank_lp = _log_softmax_np(np.asarray(rank_logits), has_text)
    return _best_span(start_logits, end_logits, valid, has_text, max_answer_len, spans_per_passage,
                      log_probs=True, span_weight=1 - lam, passage_scores=2 * lam * rank_lp)
  if rule != "fused":
    raise ValueError(f"unknown answer rule {rule!r}; expected 'dpr', 'weighted' or 'fused'")
  if retrieval_scores is None or np.shape(retrieval_scores) != (m,):
    raise ValueError(f"rule 'fused' needs the {m} passages' retrieval scores, got "
                     f"{None if retrieval_scores is None else np.shape(retrieval_scores)}")
  retrieval_lp = _log_softmax_np(retrieval_scale * np.asarray(retrieval_scores, np.float64), has_text)
  passage_lp = _log_softmax_np(np.asarray(rank_logits), has_text) + retrieval_lp
  return _best_span(start_logits, end_logits, valid, has_text, max_answer_len, spans_per_passage,
                    log_probs=False, span_weight=1.0, passage_scores=passage_lp)


def extend_to_words(input_ids: np.ndarray, start: int, end: int, text_start: int, text_end: int,
                    is_continuation: np.ndarray) -> tuple[int, int]:
  """Widens ``[start, end]`` within the text so it neither begins nor ends inside a word."""
  while start > text_start and is_continuation[input_ids[start]]:
    start -= 1
  while end + 1 < text_end and is_continuation[input_ids[end + 1]]:
    end += 1
  return start, end


def continuation_table(vocab: dict[str, int]) -> np.ndarray:
  """Boolean table over token ids: True for ``##`` continuation pieces."""
  table = np.zeros(max(vocab.values()) + 1, bool)
  table[[i for piece, i in vocab.items() if piece.startswith("##")]] = True
  return table
