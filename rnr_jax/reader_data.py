"""Reader inputs from a prepared dataset: a question with m passages, span targets, answer text.

As DPR's reader is trained (paper §2.2.3), an example is a question with its positive passage first and ``m - 1``
answer-free negatives, built from the token-ID corpus. A *ranked candidates file* is an ``.npz`` with one ``int32 [Q,
k]`` array per split: the passages retrieved for each question of the split, best first, -1 padded."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
from collections.abc import Mapping, Sequence

import numpy as np

from rnr_jax import reader
from rnr_jax.answers import nbest
from rnr_jax.data.examples import sample_reader_passages
from rnr_jax.data.prepared import PreparedData
from rnr_jax.data.readers import Question
from rnr_jax.data.token_corpus import TokenCorpus
from rnr_jax.io import atomic_write_bytes
from rnr_jax.tokenization import Tokenizer

NO_PASSAGE = -1


def save_ranked(path: str | os.PathLike, ranked: Mapping[str, np.ndarray]) -> None:
  """Writes a ranked candidates file (see the module docstring), atomically."""
  buf = io.BytesIO()
  np.savez(buf, **{split: np.asarray(pids, np.int32) for split, pids in ranked.items()})
  atomic_write_bytes(path, buf.getvalue())


def load_ranked(path: str | os.PathLike, split: str, num_questions: int, num_passages: int) -> np.ndarray:
  """The ``int32[Q, k]`` ranking of ``split`` from a ranked candidates file, validated."""
  with np.load(path, allow_pickle=False) as archive:
    if split not in archive.files:
      raise KeyError(f"{os.fspath(path)}: no ranking for split {split!r} (has {sorted(archive.files)})")
    pids = archive[split]
  if pids.ndim != 2 or pids.shape[0] != num_questions or not np.issubdtype(pids.dtype, np.integer):
    raise ValueError(f"{os.fspath(path)}[{split}]: expected integer [{num_questions}, k] passage ids, "
                     f"got {pids.dtype} {pids.shape}")
  if pids.size and (pids.min() < NO_PASSAGE or pids.max() >= num_passages):
    raise ValueError(f"{os.fspath(path)}[{split}]: passage ids outside [-1, {num_passages})")
  return pids.astype(np.int32)


def ranked_pids(data: PreparedData, split: str, candidates: str | None) -> np.ndarray:
  """``int32[Q, k]`` ranking of ``split``: from ``candidates`` if given, else the prepared BM25 top-k."""
  if candidates:
    return load_ranked(candidates, split, len(data.questions(split)), data.num_passages)
  return np.asarray(data.candidates(split).bm25_pids, np.int32)


@dataclasses.dataclass(frozen=True)
class ReaderSplit:
  """A split's questions, their token ids and their answers', and passage pools: ``ranked`` (``int32[Q, k]``, -1 =
  none), ``positives[q]`` (answer passages, gold first) and ``negatives[q]`` (retrieved ones without, in rank order)."""

  questions: list[Question]
  question_ids: list[np.ndarray]
  answer_ids: list[list[np.ndarray]]
  ranked: np.ndarray
  positives: list[np.ndarray]
  negatives: list[np.ndarray]

  def __len__(self) -> int:
    return len(self.questions)

  def trainable(self) -> np.ndarray:
    """Questions with at least one positive and one negative passage."""
    return np.asarray([q for q in range(len(self)) if len(self.positives[q]) and len(self.negatives[q])], np.int64)

  def training_passages(self, q: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` passages of a trainable question: a random positive, then negatives (drawn at random)."""
    return sample_reader_passages(self.positives[q], self.negatives[q], m, rng)

  def gold_passages(self, q: int, m: int) -> np.ndarray:
    """``m`` passages with the gold given: the first positive, then the top negatives (-1 padded)."""
    pids = np.concatenate([self.positives[q][:1], self.negatives[q][: m - 1]]).astype(np.int32)
    return np.pad(pids, (0, m - len(pids)), constant_values=NO_PASSAGE)

  def open_passages(self, q: int, m: int) -> np.ndarray:
    """The top-``m`` retrieved passages (-1 padded)."""
    pids = self.ranked[q, :m]
    return np.pad(pids, (0, m - len(pids)), constant_values=NO_PASSAGE)


POSITIVES = ("gold_article", "any")


def load_reader_split(data: PreparedData, split: str, tokenizer: Tokenizer, candidates: str | None = None,
                      num_negatives: int = 30, positives: str = "gold_article") -> ReaderSplit:
  """The pools of ``split``, from a ranked candidates file or the prepared BM25 pools; ``positives``:
  ``"gold_article"`` prefers the gold document's answer passages, ``"any"`` takes every answer-holding one."""
  if positives not in POSITIVES:
    raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
  questions = data.questions(split)
  cands = data.candidates(split)
  ranked = ranked_pids(data, split, candidates)
  matcher = data.matcher() if candidates else None
  pos, negatives = [], []
  for q, question in enumerate(questions):
    gold = np.asarray(cands.gold[q], np.int32)
    if candidates:
      row = ranked[q][ranked[q] != NO_PASSAGE]
      hits = matcher.flags(question.answers, row)
      others = row[hits & ~np.isin(row, gold)]
      negatives.append(row[~hits][:num_negatives])
    else:
      others = np.asarray(cands.positives[q][len(gold):], np.int32)  # gold first, then BM25's answer passages
      negatives.append(np.asarray(cands.hard_negatives[q], np.int32))
    pos.append(gold if positives == "gold_article" and len(gold) else np.concatenate([gold, others]).astype(np.int32))
  question_ids = tokenizer.encode_texts([q.question for q in questions])
  flat_answers = iter(tokenizer.encode_texts([a for q in questions for a in q.answers]))
  answer_ids = [list(itertools.islice(flat_answers, len(q.answers))) for q in questions]
  return ReaderSplit(questions, question_ids, answer_ids, ranked, pos, negatives)


def reader_batch(tokenizer: Tokenizer, corpus: TokenCorpus, question_ids: Sequence[np.ndarray], pids: np.ndarray,
                 answer_ids: Sequence[Sequence[np.ndarray]] | None = None, *, max_len: int, buckets: Sequence[int],
                 question_len: int, max_answer_len: int, max_spans: int) -> dict[str, np.ndarray]:
  """Reader inputs for ``B`` questions x ``m`` passages (``pids [B, m]``, -1 = padding): rows ``int32[B * m, L]``,
  ``text_start``, ``text_end``, ``passage_mask``, and with ``answer_ids`` the first passage's ``span_*``."""
  pids = np.asarray(pids)
  per_question = []
  for q_ids, row in zip(question_ids, pids):
    records = [corpus[p] if p != NO_PASSAGE else np.zeros(0, np.int32) for p in row.tolist()]
    per_question.append(tokenizer.reader_from_records(q_ids, records, max_len, buckets, question_len))
  length = max(b.input_ids.shape[1] for b in per_question)

  def stack(name: str, pad: int) -> np.ndarray:
    return np.concatenate([np.pad(getattr(b, name), ((0, 0), (0, length - b.input_ids.shape[1])), constant_values=pad)
                           for b in per_question])

  out = {"input_ids": stack("input_ids", tokenizer.pad_id), "attention_mask": stack("attention_mask", 0),
         "token_type_ids": stack("token_type_ids", 0),
         "text_start": np.concatenate([b.text_start for b in per_question]),
         "text_end": np.concatenate([b.text_end for b in per_question]), "passage_mask": pids != NO_PASSAGE}
  if answer_ids is not None:
    m = pids.shape[1]
    spans = [reader.find_answer_spans(out["input_ids"][b * m], int(out["text_start"][b * m]),
                                      int(out["text_end"][b * m]), answers, max_answer_len)
             for b, answers in enumerate(answer_ids)]
    out["span_starts"], out["span_ends"], out["span_mask"] = reader.span_targets(spans, max_spans)
  return out


def answer_text(tokenizer: Tokenizer, is_continuation: np.ndarray, input_ids: np.ndarray, text_start: int,
                text_end: int, start: int, end: int, passage_text: str) -> str:
  """The ``passage_text`` substring of token span ``[start, end]`` of one reader row, widened to whole words."""
  start, end = reader.extend_to_words(input_ids, start, end, text_start, text_end, is_continuation)
  text_ids, offsets = tokenizer.encode_texts_with_offsets([passage_text])[0]
  if not np.array_equal(text_ids[: text_end - text_start], input_ids[text_start:text_end]):
    raise ValueError("the passage record does not match the tokenization of its text: was the token "
                     "corpus built with another tokenizer?")
  return passage_text[offsets[start - text_start, 0] : offsets[end - text_start, 1]]


def predict_answers(tokenizer: Tokenizer, is_continuation: np.ndarray, texts: Sequence[str],
                    batch: Mapping[str, np.ndarray], pids: np.ndarray, start_logits: np.ndarray, end_logits: np.ndarray,
                    rank_logits: np.ndarray, num_passages: int, *, max_answer_len: int, rule: str = "dpr") -> list[str]:
  """The answer of each question of a :func:`reader_batch` (``pids [B, m]``) from its first ``num_passages`` (``[B * m,
  L]`` and ``[B * m]`` host logits; ``texts[pid]``: a passage's text; no passage text: answer "")."""
  num_q, m = pids.shape
  valid = reader.text_mask(batch["input_ids"].shape[1], batch["text_start"], batch["text_end"])
  n = min(num_passages, m)
  answers = []
  for b in range(num_q):
    rows = slice(b * m, b * m + n)
    if not valid[rows].any():
      answers.append("")
      continue
    p, start, end, _, _ = nbest(start_logits[rows], end_logits[rows], rank_logits[rows], valid[rows],
                                max_answer_len=max_answer_len, rule=rule)[0]
    answers.append(answer_text(tokenizer, is_continuation, batch["input_ids"][b * m + p],
                               int(batch["text_start"][b * m + p]), int(batch["text_end"][b * m + p]), start, end,
                               texts[pids[b, p]]))
  return answers
