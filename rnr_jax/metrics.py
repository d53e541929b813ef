"""Answer and retrieval metrics of open-domain QA: SQuAD's :func:`exact_match` and :func:`f1_score` (best over the
references), DPR's retrieval criterion :func:`has_answer` (does some answer's token sequence occur in the passage's,
uncased DPR ``SimpleTokenizer`` tokens after Unicode NFD?) and top-k accuracies."""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import regex

DEFAULT_KS = (1, 5, 20, 100)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lowercase, drop punctuation and articles, collapse spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Iterable[str]) -> float:
  """1.0 if the normalised prediction equals some normalised answer, else 0.0. An answer empty after normalisation
  ("", "the") is ignored: it would match an empty prediction or a lone article."""
  pred = normalize_answer(prediction)
  return max((float(pred == g) for g in map(normalize_answer, answers) if g), default=0.0)


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
  if not pred_tokens or not gold_tokens:
    return float(pred_tokens == gold_tokens)
  same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if same == 0:
    return 0.0
  precision = same / len(pred_tokens)
  recall = same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Iterable[str]) -> float:
  """Best token-level F1 between the normalised prediction and any answer (empty ones ignored, as by EM)."""
  pred = normalize_answer(prediction).split()
  return max((_token_f1(pred, g.split()) for g in map(normalize_answer, answers) if g), default=0.0)


# DPR's SimpleTokenizer: runs of letters/numbers/marks, or any single character that is neither a separator (Z) nor
# "other" (C: controls, format, unassigned).
_DPR_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]",
                           flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def dpr_tokenize(text: str) -> list[str]:
  """Uncased DPR tokens of ``text`` after Unicode NFD normalisation."""
  return [t.lower() for t in _DPR_TOKEN.findall(unicodedata.normalize("NFD", text))]


def _joined(tokens: Sequence[str]) -> str:
  # Tokens never contain separator or control characters, so " tok1 tok2 " is an unambiguous encoding in which
  # token-sequence containment is substring search.
  return " " + " ".join(tokens) + " "


def answer_patterns(answers: Iterable[str]) -> list[str]:
  """Searchable forms of the answers (empty answers, which match nothing, dropped)."""
  return [_joined(toks) for toks in (dpr_tokenize(a) for a in answers) if toks]


def has_answer(answers: Iterable[str], text: str) -> bool:
  """DPR's criterion: some answer's token sequence occurs in ``text``'s tokens."""
  passage = _joined(dpr_tokenize(text))
  return any(p in passage for p in answer_patterns(answers))


class AnswerMatcher:
  """DPR's ``has_answer`` over passages' text ``get_text(pid)`` (titles not searched), each tokenised once."""

  def __init__(self, get_text: Callable[[int], str]):
    self._get_text = get_text
    self._cache: dict[int, str] = {}

  def _passage(self, pid: int) -> str:
    if pid not in self._cache:
      self._cache[pid] = _joined(dpr_tokenize(self._get_text(pid)))
    return self._cache[pid]

  def has_answer(self, answers: Iterable[str], pid: int) -> bool:
    return bool(self.flags(answers, [int(pid)])[0])

  def flags(self, answers: Iterable[str], pids: Iterable[int] | np.ndarray) -> np.ndarray:
    """``has_answer`` of each passage in ``pids`` (any shape) as a bool array."""
    patterns = answer_patterns(answers)
    pids = np.asarray(pids)
    if not patterns:
      return np.zeros(pids.shape, dtype=bool)
    passages = [self._passage(pid) for pid in pids.reshape(-1).tolist()]
    return np.asarray([any(p in passage for p in patterns) for passage in passages], bool).reshape(pids.shape)

  def __len__(self) -> int:
    """Number of passages tokenised so far."""
    return len(self._cache)


def top_k_accuracy(hits: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
  """``{k: fraction of questions q with some hits[q, r < k]}`` (0.0 without questions); ``hits`` is
  ``bool[num_questions, depth]`` and a k beyond ``depth`` counts as ``depth``."""
  hits = np.asarray(hits, dtype=bool)
  if any(k < 1 for k in ks):
    raise ValueError(f"cut-offs must be >= 1, got {tuple(ks)}")
  if hits.ndim != 2:
    raise ValueError(f"hits must be [num_questions, depth], got shape {hits.shape}")
  if hits.size == 0:
    return {k: 0.0 for k in ks}
  cum = np.logical_or.accumulate(hits, axis=1)
  return {k: float(cum[:, min(k, hits.shape[1]) - 1].mean()) for k in ks}


def _hits(ranked: Sequence[Sequence[int]] | np.ndarray, flags: Callable[[int, Sequence[int]], Any]) -> np.ndarray:
  """``bool[Q, depth]`` of ``flags(q, ranked[q])`` per question, False past a shorter list's end."""
  hits = np.zeros((len(ranked), max((len(r) for r in ranked), default=0)), bool)
  for q, pids in enumerate(ranked):
    hits[q, : len(pids)] = flags(q, pids)
  return hits


def answer_top_k_accuracy(ranked: Sequence[Sequence[int]] | np.ndarray, answers: Sequence[Iterable[str]],
                          matcher: AnswerMatcher, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
  """Top-k answer accuracy of ranked passage ids (one list per question)."""
  if len(ranked) != len(answers):
    raise ValueError(f"{len(ranked)} ranked lists for {len(answers)} questions")
  return top_k_accuracy(_hits(ranked, lambda q, pids: matcher.flags(answers[q], pids)), ks)


def gold_recall_at_k(ranked: Sequence[Sequence[int]] | np.ndarray, gold: Sequence[Iterable[int]],
                     ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
  """Fraction of questions with a gold passage among their first k retrieved (an empty gold set: a miss)."""
  if len(ranked) != len(gold):
    raise ValueError(f"{len(ranked)} ranked lists for {len(gold)} gold sets")
  gold_sets = [{int(x) for x in g} for g in gold]
  return top_k_accuracy(_hits(ranked, lambda q, pids: [int(p) in gold_sets[q] for p in pids]), ks)
