"""Reading: answer-span targets, reader losses and answer decoding.

As DPR's reader, a reader scores for each of m passages of a question a start and an end logit per token and one ranking
logit. Training (paper §2.2.3, footnote 6): ranking cross-entropy of the positive (first) passage plus the marginal
log-likelihood of all its gold spans. Decoding (paper appendix A.3): :mod:`rnr_jax.answers`.
"""

from __future__ import annotations

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
