"""Reading in numpy: answer-span targets, text masks and whole-word spans.

As DPR's reader, a reader scores for each of m passages of a question a start and an end logit per token and one ranking
logit. Its loss (paper §2.2.3): :func:`rnr_jax.distill.read_loss`; answers (appendix A.3): :mod:`rnr_jax.answers`."""

from __future__ import annotations

from collections.abc import Sequence

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
