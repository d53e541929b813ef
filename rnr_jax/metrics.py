"""Answer and retrieval metrics of open-domain QA.

* :func:`exact_match` / :func:`f1_score`: SQuAD answer scoring (lowercase,
  punctuation and the articles a/an/the removed, whitespace collapsed; the best
  score over the reference answers).
* :func:`has_answer`: DPR's retrieval criterion: after Unicode NFD
  normalisation and DPR ``SimpleTokenizer``-style tokenisation, uncased, does
  the token sequence of some answer occur inside the passage's token sequence?
  :class:`AnswerMatcher` caches each passage's tokens, since one passage is
  checked against many questions.
* :func:`top_k_accuracy` and :func:`gold_recall_at_k`: fraction of questions
  with an answer-bearing (or gold) passage among the first k retrieved.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import regex

DEFAULT_KS = (1, 5, 20, 100)

# ---- SQuAD EM / F1 -----------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lowercase, drop punctuation and articles, collapse spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCT)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def _max_over(answers: Iterable[str], score: Callable[[str], float]) -> float:
  return max((score(a) for a in answers), default=0.0)


def exact_match(prediction: str, answers: Iterable[str]) -> float:
  """1.0 if the normalised prediction equals some normalised answer, else 0.0."""
  pred = normalize_answer(prediction)
  return _max_over(answers, lambda a: float(pred == normalize_answer(a)))


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
  """Best token-level F1 between the normalised prediction and any answer."""
  pred = normalize_answer(prediction).split()
  return _max_over(answers, lambda a: _token_f1(pred, normalize_answer(a).split()))


# ---- DPR has_answer ----------------------------------------------------------------

# DPR's SimpleTokenizer: runs of letters/numbers/marks, or any single character
# that is neither a separator (Z) nor "other" (C: controls, format, unassigned).
_DPR_TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]",
                           flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def dpr_tokenize(text: str) -> list[str]:
  """Uncased DPR tokens of ``text`` after Unicode NFD normalisation."""
  return [t.lower() for t in _DPR_TOKEN.findall(unicodedata.normalize("NFD", text))]


def _joined(tokens: Sequence[str]) -> str:
  # Tokens never contain separator or control characters, so " tok1 tok2 " is an
  # unambiguous encoding in which token-sequence containment is substring search.
  return " " + " ".join(tokens) + " "


def answer_patterns(answers: Iterable[str]) -> list[str]:
  """Searchable forms of the answers (empty answers, which match nothing, dropped)."""
  return [_joined(toks) for toks in (dpr_tokenize(a) for a in answers) if toks]


def has_answer(answers: Iterable[str], text: str) -> bool:
  """DPR's criterion: some answer's token sequence occurs in ``text``'s tokens."""
  passage = _joined(dpr_tokenize(text))
  return any(p in passage for p in answer_patterns(answers))


class AnswerMatcher:
  """``has_answer`` over a fixed passage collection, tokenising each passage once.

  Args:
    get_text: returns the text of passage ``pid``. Like DPR, pass the passage
      body only: the title is not searched for answers.
  """

  def __init__(self, get_text: Callable[[int], str]):
    self._get_text = get_text
    self._cache: dict[int, str] = {}

  def _passage(self, pid: int) -> str:
    joined = self._cache.get(pid)
    if joined is None:
      joined = self._cache[pid] = _joined(dpr_tokenize(self._get_text(pid)))
    return joined

  def has_answer(self, answers: Iterable[str], pid: int) -> bool:
    """Whether passage ``pid`` holds one of ``answers``."""
    passage = self._passage(int(pid))
    return any(p in passage for p in answer_patterns(answers))

  def flags(self, answers: Iterable[str], pids: Iterable[int] | np.ndarray) -> np.ndarray:
    """``has_answer`` of each passage in ``pids`` (any shape) as a bool array."""
    patterns = answer_patterns(answers)
    pids = np.asarray(pids)
    out = np.zeros(pids.shape, dtype=bool)
    if patterns:
      flat = out.reshape(-1)
      for i, pid in enumerate(pids.reshape(-1).tolist()):
        passage = self._passage(pid)
        flat[i] = any(p in passage for p in patterns)
    return out

  def __len__(self) -> int:
    """Number of passages tokenised so far."""
    return len(self._cache)


# ---- retrieval accuracy ------------------------------------------------------------


def top_k_accuracy(hits: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
  """Fraction of questions with a hit among the first k of each ranked list.

  Args:
    hits: ``[num_questions, depth]`` bool, ``hits[q, r]`` = the passage at rank r
      for question q holds an answer (e.g. from :meth:`AnswerMatcher.flags`).
    ks: cut-offs; a k beyond ``depth`` is evaluated at ``depth``.

  Returns:
    ``{k: accuracy}``; 0.0 for every k when there are no questions.
  """
  hits = np.asarray(hits, dtype=bool)
  if any(k < 1 for k in ks):
    raise ValueError(f"cut-offs must be >= 1, got {tuple(ks)}")
  if hits.ndim != 2:
    raise ValueError(f"hits must be [num_questions, depth], got shape {hits.shape}")
  num_questions, depth = hits.shape
  if num_questions == 0 or depth == 0:
    return {k: 0.0 for k in ks}
  cum = np.logical_or.accumulate(hits, axis=1)
  return {k: float(cum[:, min(k, depth) - 1].mean()) for k in ks}


def answer_top_k_accuracy(ranked: Sequence[Sequence[int]] | np.ndarray, answers: Sequence[Iterable[str]],
                          matcher: AnswerMatcher, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
  """Top-k answer accuracy of ranked passage ids (one list per question)."""
  if len(ranked) != len(answers):
    raise ValueError(f"{len(ranked)} ranked lists for {len(answers)} questions")
  depth = max((len(r) for r in ranked), default=0)
  hits = np.zeros((len(ranked), depth), bool)
  for q, (pids, ans) in enumerate(zip(ranked, answers)):
    hits[q, : len(pids)] = matcher.flags(ans, pids)
  return top_k_accuracy(hits, ks)


def gold_recall_at_k(ranked: Sequence[Sequence[int]] | np.ndarray, gold: Sequence[Iterable[int]],
                     ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
  """Fraction of questions with a gold passage among their first k retrieved.

  Questions with an empty gold set count as misses.
  """
  if len(ranked) != len(gold):
    raise ValueError(f"{len(ranked)} ranked lists for {len(gold)} gold sets")
  depth = max((len(r) for r in ranked), default=0)
  hits = np.zeros((len(ranked), depth), bool)
  for q, (pids, g) in enumerate(zip(ranked, gold)):
    gset = set(int(x) for x in g)
    hits[q, : len(pids)] = [int(p) in gset for p in pids]
  return top_k_accuracy(hits, ks)

