"""Reader inputs from a prepared dataset: question + m passages, span targets, answer text.

A reader example is one question with ``m`` passages, the positive (a passage
holding an answer) first and ``m - 1`` negatives (retrieved passages without
one) after it, as DPR's reader is trained (paper §2.2.3, footnote 6). Inputs
are built from the token-ID corpus records (``title [SEP] text``) with
:meth:`Tokenizer.reader_from_records`, so no passage text is tokenized during
training; all rows of a batch are padded to one length bucket. Span targets
are every occurrence of a tokenized answer in the positive's text region
(:func:`rnr_jax.reader.find_answer_spans`).

Where passages come from (:func:`load_reader_split`):

* by default the prepared BM25 candidates: positives = gold passages then BM25
  answer passages, negatives = the top BM25 passages without an answer, and the
  BM25 ranking for the open setting;
* or a *ranked candidates file* written by a retriever (:func:`save_ranked`):
  positives = gold passages then the retrieved answer passages, negatives = the
  top retrieved passages without an answer, and the retriever's ranking.

Ranked candidates file: an ``.npz`` archive (``numpy.savez``) with one array per
split, named after the split (``nq_dev``, ...), of shape ``[Q, k]`` and dtype
int32: row ``q`` lists the passage ids retrieved for question ``q`` of
``PreparedData.questions(split)``, best first; ``-1`` pads rows with fewer than
``k`` passages. Passage ids are rows of the prepared ``passages.jsonl``.

Answers are decoded from the original passage text: the predicted token span
is widened to whole words and mapped back through the character offsets of the
passage text, so casing and punctuation are those of the corpus.

Exported parameters (:class:`ParamsExport`): an Orbax directory ``<dir>/<step>/``
with two items, ``params`` (the parameter pytree) and ``model`` (JSON: what
rebuilds the model, e.g. a :class:`ReaderSpec`, plus the step's metrics); only
the newest step is kept. The reader stage exports its best evaluation there and
:func:`load_reader` reads it back (e.g. as the distillation teacher).

:func:`load_prepared` is also used by the passage filter stage (``train.filter``);
exports use :class:`rnr_jax.training.checkpoint.ParamsExport`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rnr_jax import qa_model, reader, retrieval
from rnr_jax.data.examples import sample_reader_passages
from rnr_jax.data.prepared import PreparedData, prepare
from rnr_jax.data.readers import Question
from rnr_jax.data.token_corpus import TokenCorpus
from rnr_jax.io import atomic_write_bytes
from rnr_jax.models import EncoderConfig, Params, config_from_hf_dict
from rnr_jax.models.encoder import resolve_num_layers
from rnr_jax.tokenization import Tokenizer
from rnr_jax.training.checkpoint import ParamsExport

NO_PASSAGE = -1


# ---- stage set-up -----------------------------------------------------------------------


def load_prepared(config: Any, workdir: str) -> PreparedData:
  """``config.prepared_dir``, or ``<workdir>/prepared`` built (or found up to date) from ``config.data_dir``."""
  if config.prepared_dir:
    return PreparedData.load(config.prepared_dir)
  path = os.path.join(workdir, "prepared")
  if jax.process_index() == 0:
    prepare(config.data_dir, path, echo=lambda s: logging.info("%s", s))
  multihost_utils.sync_global_devices("rnr_jax.reader_data.load_prepared")
  return PreparedData.load(path)


# ---- ranked candidates files ------------------------------------------------------------


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


# ---- per-question passage pools ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReaderSplit:
  """A split's questions with tokenized questions/answers and their passage pools.

  Attributes:
    questions: the split's questions (index ``q`` everywhere below).
    question_ids: token ids of each question (no special tokens).
    answer_ids: token ids of each reference answer of each question.
    ranked: ``int32[Q, k]`` retrieved passages, best first, -1 = none.
    positives: answer passages of each question, gold passages first.
    negatives: retrieved passages without an answer, in rank order.
  """

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


def load_reader_split(data: PreparedData, split: str, tokenizer: Tokenizer, candidates: str | None = None,
                      num_negatives: int = 30) -> ReaderSplit:
  """The pools of ``split`` (see the module docstring); ``candidates`` is a ranked candidates file or None.

  ``num_negatives`` caps the negatives taken from a candidates file (the
  prepared hard negatives were capped when the directory was built).
  """
  questions = data.questions(split)
  cands = data.candidates(split)
  ranked = ranked_pids(data, split, candidates)
  if candidates:
    matcher = data.matcher()
    positives, negatives = [], []
    for q, question in enumerate(questions):
      row = ranked[q][ranked[q] != NO_PASSAGE]
      hits = matcher.flags(question.answers, row)
      gold = np.asarray(cands.gold[q], np.int32)
      positives.append(np.concatenate([gold, row[hits & ~np.isin(row, gold)]]).astype(np.int32))
      negatives.append(row[~hits][:num_negatives])
  else:
    positives = [np.asarray(cands.positives[q], np.int32) for q in range(len(questions))]
    negatives = [np.asarray(cands.hard_negatives[q], np.int32) for q in range(len(questions))]
  question_ids = tokenizer.encode_texts([q.question for q in questions])
  flat_answers = tokenizer.encode_texts([a for q in questions for a in q.answers])
  answer_ids, i = [], 0
  for q in questions:
    answer_ids.append(flat_answers[i : i + len(q.answers)])
    i += len(q.answers)
  return ReaderSplit(questions, question_ids, answer_ids, ranked, positives, negatives)


# ---- batches ----------------------------------------------------------------------------


def reader_batch(tokenizer: Tokenizer, corpus: TokenCorpus, question_ids: Sequence[np.ndarray], pids: np.ndarray,
                 answer_ids: Sequence[Sequence[np.ndarray]] | None = None, *, max_len: int,
                 buckets: Sequence[int], question_len: int, max_answer_len: int, max_spans: int
                 ) -> dict[str, np.ndarray]:
  """Reader inputs for ``B`` questions x ``m`` passages (``pids [B, m]``, -1 = empty padding passage).

  Returns ``input_ids, attention_mask, token_type_ids`` (``int32[B * m, L]``,
  question ``b``'s passages in rows ``b * m ... b * m + m - 1``, all padded to one
  length bucket ``L``), ``text_start, text_end`` (``int32[B * m]``, the passage-text
  token range of each row) and ``passage_mask`` (``bool[B, m]``). With
  ``answer_ids``, also the answer spans in each question's first passage:
  ``span_starts, span_ends`` (``int32[B, max_spans]``) and ``span_mask``.
  """
  pids = np.asarray(pids)
  per_question = []
  for q_ids, row in zip(question_ids, pids):
    records = [corpus[p] if p != NO_PASSAGE else np.zeros(0, np.int32) for p in row.tolist()]
    per_question.append(tokenizer.reader_from_records(q_ids, records, max_len, buckets, question_len))
  length = max(b.input_ids.shape[1] for b in per_question)

  def stack(name: str, pad: int) -> np.ndarray:
    parts = [getattr(b, name) for b in per_question]
    return np.concatenate([np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=pad) for x in parts])

  out = {
      "input_ids": stack("input_ids", tokenizer.pad_id),
      "attention_mask": stack("attention_mask", 0),
      "token_type_ids": stack("token_type_ids", 0),
      "text_start": np.concatenate([b.text_start for b in per_question]),
      "text_end": np.concatenate([b.text_end for b in per_question]),
      "passage_mask": pids != NO_PASSAGE,
  }
  if answer_ids is not None:
    m = pids.shape[1]
    spans = [reader.find_answer_spans(out["input_ids"][b * m], int(out["text_start"][b * m]),
                                      int(out["text_end"][b * m]), answers, max_answer_len)
             for b, answers in enumerate(answer_ids)]
    out["span_starts"], out["span_ends"], out["span_mask"] = reader.span_targets(spans, max_spans)
  return out


# ---- answers ----------------------------------------------------------------------------


def answer_text(tokenizer: Tokenizer, is_continuation: np.ndarray, input_ids: np.ndarray, text_start: int,
                text_end: int, start: int, end: int, passage_text: str) -> str:
  """The passage-text substring of token span ``[start, end]`` of one reader row, widened to whole words.

  ``input_ids`` is the row's ids; ``passage_text`` the text of its passage (the
  record's text part must be its tokenization, truncated or not).
  """
  start, end = reader.extend_to_words(input_ids, start, end, text_start, text_end, is_continuation)
  text_ids, offsets = tokenizer.encode_texts_with_offsets([passage_text])[0]
  n = text_end - text_start
  if not np.array_equal(text_ids[:n], input_ids[text_start:text_end]):
    raise ValueError("the passage record does not match the tokenization of its text: was the token "
                     "corpus built with another tokenizer?")
  return passage_text[offsets[start - text_start, 0] : offsets[end - text_start, 1]]


def predict_answers(tokenizer: Tokenizer, is_continuation: np.ndarray, texts: Sequence[str],
                    batch: Mapping[str, np.ndarray], pids: np.ndarray, start_logits: np.ndarray,
                    end_logits: np.ndarray, rank_logits: np.ndarray, num_passages: int, *,
                    max_answer_len: int, rule: str = "dpr") -> list[str]:
  """The answer of each question of a reader batch, reading only its first ``num_passages`` passages.

  ``batch`` is from :func:`reader_batch` with ``pids [B, m]``; the logits are
  ``[B * m, L]`` and ``[B * m]`` (host arrays); ``texts[pid]`` is a passage's
  text. A question without any passage text gets the empty answer.
  """
  num_q, m = pids.shape
  length = batch["input_ids"].shape[1]
  valid = reader.text_mask(length, batch["text_start"], batch["text_end"]).reshape(num_q, m, length)
  start_logits = start_logits.reshape(num_q, m, length)
  end_logits = end_logits.reshape(num_q, m, length)
  rank_logits = rank_logits.reshape(num_q, m)
  n = min(num_passages, m)
  answers = []
  for b in range(num_q):
    if not valid[b, :n].any():
      answers.append("")
      continue
    span = reader.select_answer(start_logits[b, :n], end_logits[b, :n], rank_logits[b, :n], valid[b, :n],
                                max_answer_len, rule)
    row = b * m + span.passage
    answers.append(answer_text(tokenizer, is_continuation, batch["input_ids"][row], int(batch["text_start"][row]),
                               int(batch["text_end"][row]), span.start, span.end, texts[pids[b, span.passage]]))
  return answers


# ---- the exported reader ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
  """What rebuilds a reader (:class:`~rnr_jax.qa_model.RetrieverReader`) and its inputs.

  Attributes:
    encoder: transformers ``config.json`` dict of the encoder (layers kept).
    pooling, retrieval_dim: the model's retrieval head (unused when only reading).
    tokenizer_fingerprint: sha256 of the tokenizer files (as in a prepared manifest).
    question_len, reader_len, max_answer_len: input and answer lengths in tokens.
    buckets: padding lengths.
    dtype: compute dtype name.
  """

  encoder: Mapping[str, Any]
  pooling: str
  retrieval_dim: int
  tokenizer_fingerprint: str
  question_len: int
  reader_len: int
  max_answer_len: int
  buckets: tuple[int, ...]
  dtype: str = "float32"

  @classmethod
  def from_config(cls, config: Any, encoder: EncoderConfig, tokenizer_fingerprint: str) -> ReaderSpec:
    """The spec of a stage config (sections ``model`` and ``tokens``)."""
    return cls(encoder=encoder.to_hf_dict(), pooling=config.model.pooling,
               retrieval_dim=int(config.model.retrieval_dim), tokenizer_fingerprint=tokenizer_fingerprint,
               question_len=int(config.tokens.question_len), reader_len=int(config.tokens.reader_len),
               max_answer_len=int(config.tokens.max_answer_len), buckets=tuple(int(b) for b in config.tokens.buckets),
               dtype=config.model.dtype)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> ReaderSpec:
    return cls(**{**d, "buckets": tuple(d["buckets"])})

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "encoder": dict(self.encoder), "buckets": list(self.buckets)}

  def build(self) -> qa_model.RetrieverReader:
    return qa_model.RetrieverReader(config_from_hf_dict(self.encoder), pooling=self.pooling,
                                    retrieval_dim=self.retrieval_dim, dtype=jnp.dtype(self.dtype))


def load_reader(directory: str, mesh: Mesh | None = None
                ) -> tuple[ReaderSpec, qa_model.RetrieverReader, Params, dict[str, Any]]:
  """``(spec, model, params, model item)`` of a reader export (e.g. ``<reader workdir>/best``).

  Parameters are restored replicated over ``mesh`` (default: on the first device).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no exported reader (no such directory)")
  export = ParamsExport(directory)
  try:
    info = export.latest_info()
    if info is None or "reader" not in info:
      raise FileNotFoundError(f"{directory}: no exported reader")
    spec = ReaderSpec.from_json(info["reader"])
    model = spec.build()
    sharding = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), retrieval.dummy_inputs())["params"])
    params = export.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                         abstract))
    return spec, model, params, info
  finally:
    export.close()


def load_reader_encoder(directory: str, num_layers: int | None = None
                        ) -> tuple[EncoderConfig, Params, dict[str, Params]]:
  """``(encoder config, encoder params, heads)`` of a reader export, its encoder cut to the first ``num_layers``.

  Starts a student from the reader teacher (``model.init=<reader>/best``): the encoder that already reads, and
  ``heads`` (``qa_outputs``, ``qa_classifier``) for :func:`rnr_jax.qa_model.with_pretrained_heads`. Host numpy
  arrays.
  """
  spec, _, params, _ = load_reader(directory)
  config = config_from_hf_dict(dict(spec.encoder))
  keep = resolve_num_layers(config.num_hidden_layers, num_layers)
  encoder = jax.device_get(params["encoder"])
  if any(not k.split("_")[1].isdigit() for k in encoder if k.startswith("layer_")):
    raise ValueError(f"{directory}: unexpected encoder layer names {sorted(encoder)}")
  encoder = {k: v for k, v in encoder.items() if not (k.startswith("layer_") and int(k.split("_")[1]) >= keep)}
  heads = {k: jax.device_get(params[k]) for k in qa_model.HEAD_NAMES}
  return dataclasses.replace(config, num_hidden_layers=keep), encoder, heads
