"""Answer choice and display text in numpy, apart from any model call, so every inference engine can share them.

:func:`nbest` ranks candidate spans under an answer rule (paper appendix A.3), with probabilities normalised over the
candidates; :class:`Detokenizer` turns WordPiece ids into display text with each token's character range."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rnr_jax.metrics import normalize_answer


def log_softmax(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """float64 log-softmax over the last axis where ``mask`` (-inf elsewhere)."""
  x = np.where(mask, x.astype(np.float64), -np.inf)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def top_spans(start_logits: np.ndarray, end_logits: np.ndarray, valid: np.ndarray,
              max_answer_len: int, top_k: int) -> list[tuple[int, int, float]]:
  """Best ``top_k`` non-overlapping spans ``(s, e, start[s] + end[e])`` of one passage inside ``valid``, as in DPR."""
  valid = np.asarray(valid, bool)
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


def nbest(start_logits: np.ndarray, end_logits: np.ndarray, rank_logits: np.ndarray, valid: np.ndarray, *,
          max_answer_len: int, rule: str, passage_score_weight: float = 0.8, retrieval_scores: np.ndarray | None = None,
          retrieval_scale: float = 20.0, spans_per_passage: int = 5) -> list[tuple[int, int, int, float, float]]:
  """``(passage, start, end, score, probability)`` of the top ``spans_per_passage`` spans of each passage, best first
  by ``rule`` (docs/reading.md); ``probability``: a softmax over all candidates (for ``dpr``, of the reader's score)."""
  has_text = np.asarray(valid).any(-1)
  if rule == "fused" and np.shape(retrieval_scores) != np.shape(rank_logits):
    raise ValueError(f"rule 'fused' needs the {len(rank_logits)} passages' retrieval scores, got {retrieval_scores}")
  rank_lp = log_softmax(np.asarray(rank_logits), has_text)
  cands = []  # passage, start, end, start + end logits, log Ps + log Pe
  for p in np.flatnonzero(has_text).tolist():
    lp_s, lp_e = log_softmax(start_logits[p], valid[p]), log_softmax(end_logits[p], valid[p])
    cands += [(p, s, e, sc, lp_s[s] + lp_e[e])
              for s, e, sc in top_spans(start_logits[p], end_logits[p], valid[p], max_answer_len, spans_per_passage)]
  if not cands:
    return []
  p, logit, lp = (np.asarray([c[i] for c in cands]) for i in (0, 3, 4))
  if rule == "dpr":
    position = np.argsort(np.argsort(-np.where(has_text, rank_logits, -np.inf), kind="stable"))
    score, log_prob, order = logit, rank_lp[p] + lp, np.lexsort((-logit, position[p]))
  elif rule == "weighted":
    lam = passage_score_weight
    score = log_prob = (1 - lam) * lp + (2 * lam * rank_lp)[p]
  elif rule == "fused":
    retrieval_lp = log_softmax(retrieval_scale * np.asarray(retrieval_scores, np.float64), has_text)
    score = log_prob = logit + (rank_lp + retrieval_lp)[p]
  else:
    raise ValueError(f"unknown answer rule {rule!r}; expected 'dpr', 'weighted' or 'fused'")
  if rule != "dpr":
    order = np.argsort(-score, kind="stable")  # ties: the first in passage, then span order
  prob = np.exp(log_prob - log_prob.max())
  prob /= prob.sum()
  return [(int(p[i]), cands[i][1], cands[i][2], float(score[i]), float(prob[i])) for i in order.tolist()]


def merge_answers(texts: Sequence[str], probabilities: Sequence[float], n: int) -> list[tuple[int, float]]:
  """``(index of its first candidate, total probability)`` of the first ``n`` distinct (SQuAD-normalised) answers."""
  total: dict[str, list] = {}
  for i, (text, prob) in enumerate(zip(texts, probabilities)):
    total.setdefault(normalize_answer(text) or text, [i, 0.0])[1] += prob
  return [(i, min(p, 1.0)) for i, p in list(total.values())[:n]]


_CLITICS = frozenset({"s", "t", "re", "ve", "ll", "d", "m"})
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%")
_NO_SPACE_AFTER = frozenset("([{$")
_JOINING = frozenset("-/–—")  # within-word hyphens, slashes and dashes, as Wikipedia writes them
_NUMERIC = frozenset(".,:")  # between digits: 3.5, 10:30 and 1,000 (a comma only before 3 digits: not "1956, 1972")


class Detokenizer:
  """Display text of WordPiece ids: continuation pieces joined, punctuation spaced as in prose, PTB quotes
  (```` `` ````, ``''``) as ``"``, special tokens dropped; with each token's ``[start, end)`` characters."""

  def __init__(self, vocab: Mapping[str, int], special_ids: Sequence[int] = ()):
    self._pieces = [""] * (max(vocab.values()) + 1)
    self._continues = np.zeros(len(self._pieces), bool)
    for piece, i in vocab.items():
      self._continues[i] = piece.startswith("##")
      self._pieces[i] = piece[2:] if self._continues[i] else piece
    for i in special_ids:
      self._pieces[i] = ""

  def __call__(self, ids: Sequence[int] | np.ndarray) -> tuple[str, np.ndarray]:
    """``(text, offsets int32[n, 2])``; a dropped token gets an empty range."""
    ids = [int(i) for i in ids]
    words = [self._pieces[i] for i in ids]
    for k in range(len(words) - 1):  # `` and '' (two tokens each) are one double quote
      if words[k] == words[k + 1] and words[k] in ("`", "'"):
        words[k], words[k + 1] = '"', ""
    following, nxt, tail = [""] * len(words), "", ""
    for k in range(len(words) - 1, -1, -1):  # the next whole word (continuations joined) after each token
      following[k] = nxt
      if self._continues[ids[k]]:
        tail = words[k] + tail
      elif words[k]:
        nxt, tail = words[k] + tail, ""
    parts, offsets, length = [], np.zeros((len(ids), 2), np.int32), 0
    prev, open_quote, glue = "", False, True
    for k, (i, word, nxt) in enumerate(zip(ids, words, following)):
      if not word:
        offsets[k] = length
        continue
      space = not (glue or self._continues[i] or word in _NO_SPACE_BEFORE or word in _JOINING)
      glue = word in _NO_SPACE_AFTER or word in _JOINING
      if word in _NUMERIC and prev[-1:].isdigit() and nxt.isdigit() and (word != "," or len(nxt) == 3):
        space, glue = False, True
      elif word == "'" and nxt in _CLITICS and prev[-1:].isalnum():
        space, glue = False, True
      elif word == '"' or word == "'":
        space, glue = space and not open_quote, not open_quote
        open_quote = not open_quote
      if space:
        parts.append(" ")
        length += 1
      parts.append(word)
      offsets[k] = length, length + len(word)
      length += len(word)
      prev = word
    return "".join(parts), offsets
