"""Corpus embeddings of a prepared corpus, and the fresh index a training run searches with its current parameters.

``embeddings.npy`` (float32 ``[N, d]``, row i = passage i), then ``embeddings.json`` (format, model fingerprint, input
settings), written last; ``chunks/`` lets a killed encoding resume."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rnr_jax import exports, lexical, retrieval
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.io import atomic_write_json, read_json
from rnr_jax.metrics import DEFAULT_KS
from rnr_jax.reader_data import NO_PASSAGE
from rnr_jax.specs import EmbedFn, RetrieverSpec, SystemSpec

Params = Any
FORMAT = "rnr_jax.embeddings"
VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "embeddings.json"
CHUNKS_DIR = "chunks"
SHARDS_DIR = "shards"
_RUN_FIELDS = ("shard", "rows", "num_passages", "wall_s", "passages_per_s", "chunks_reused", "devices")


class _Rows:
  """Records ``rows`` of a corpus, indexed from 0."""

  def __init__(self, corpus: Sequence[np.ndarray], rows: range):
    self._corpus, self._rows = corpus, rows

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> np.ndarray:
    return self._corpus[self._rows[i]]


class _Discard:
  """Takes row assignments and keeps nothing."""

  def __setitem__(self, index: Any, value: Any) -> None:
    pass


def retrieval_spec(spec: RetrieverSpec | SystemSpec) -> RetrieverSpec:
  """The retrieval inputs and vectors of a retriever's or a QA system's spec."""
  return spec.retriever if isinstance(spec, SystemSpec) else spec


def key_of(spec: RetrieverSpec | SystemSpec, fingerprint: str, corpus_sha256: str) -> dict[str, Any]:
  """What identifies an encoding of a corpus: the model, the corpus and the retrieval input settings."""
  r = retrieval_spec(spec)
  return {"model_fingerprint": fingerprint, "corpus_sha256": corpus_sha256, "pooling": r.pooling,
          "retrieval_dim": r.retrieval_dim, "normalize": r.normalize, "passage_len": r.passage_len,
          "passage_token_type": r.passage_token_type}


def save(out_dir: str, vectors: np.ndarray, info: Mapping[str, Any]) -> None:
  """Writes ``embeddings.npy`` then ``embeddings.json`` (``info`` plus format, count and dim); drops ``chunks/``."""
  out = _open_output(out_dir, vectors.shape)
  out[:] = vectors
  out.flush()
  _finish(out_dir, vectors.shape, info)


def _finish(out_dir: str, shape: tuple[int, ...], info: Mapping[str, Any]) -> None:
  atomic_write_json(os.path.join(out_dir, META_FILE), {
      "format": FORMAT, "version": VERSION, "num_passages": int(shape[0]), "dim": int(shape[1]), **info})
  shutil.rmtree(os.path.join(out_dir, CHUNKS_DIR), ignore_errors=True)


def _open_output(out_dir: str, shape: tuple[int, int]) -> np.ndarray:
  """A new ``embeddings.npy`` of ``shape`` as a writable memory map (an old ``embeddings.json`` removed first)."""
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(os.path.join(out_dir, META_FILE)):
    os.remove(os.path.join(out_dir, META_FILE))  # the meta goes last: a half-written pair is never taken as valid
  return np.lib.format.open_memmap(os.path.join(out_dir, EMBEDDINGS_FILE), "w+", np.float32, shape)


def shard_dir(out: str, shard: int, num_shards: int) -> str:
  return os.path.join(out, SHARDS_DIR, f"{shard}-of-{num_shards}")


def shard_rows(num_passages: int, shard: int, num_shards: int) -> range:
  """The contiguous passage ids of shard ``shard`` of ``num_shards``."""
  return range(shard * num_passages // num_shards, (shard + 1) * num_passages // num_shards)


def merge_shards(out: str) -> dict[str, Any]:
  """Joins and deletes the shards of ``encode_prepared(shard=(i, n))`` into ``out``'s embeddings; returns the info."""
  found = sorted(glob.glob(os.path.join(out, SHARDS_DIR, "*-of-*")))
  if not found:
    raise FileNotFoundError(f"{out}: no shards in {os.path.join(out, SHARDS_DIR)}")
  num = int(found[0].rsplit("-of-", 1)[1])
  parts = []
  for i in range(num):
    try:
      parts.append(load(shard_dir(out, i, num)))
    except FileNotFoundError:
      raise FileNotFoundError(f"{out}: shard {i} of {num} is missing or unfinished") from None
  common = {k: v for k, v in parts[0][1].items() if k not in _RUN_FIELDS}
  for i, (_, info) in enumerate(parts):
    if {k: v for k, v in info.items() if k not in _RUN_FIELDS} != common:
      raise ValueError(f"{shard_dir(out, i, num)}: encoded by another model or corpus than shard 0")
  total = parts[-1][1]["rows"][1]
  merged = _open_output(out, (total, common["dim"]))
  for vectors, info in parts:
    for first in range(0, len(vectors), 1 << 16):  # block by block: shards may be larger than memory
      block = vectors[first:first + (1 << 16)]
      merged[info["rows"][0] + first:info["rows"][0] + first + len(block)] = block
  merged.flush()
  info = {**common, "shards": num, "wall_s": round(sum(p[1]["wall_s"] for p in parts), 2),
          "passages_per_s": round(sum(p[1]["passages_per_s"] for p in parts), 2)}
  _finish(out, merged.shape, info)
  shutil.rmtree(os.path.join(out, SHARDS_DIR))
  return {**info, "num_passages": total}


def load(out_dir: str, mmap: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
  """``(vectors [N, d] float32, info)`` of a directory written by :func:`save`."""
  meta_path = os.path.join(out_dir, META_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{out_dir}: no {META_FILE} (encoding unfinished or not an embeddings directory)")
  info = read_json(meta_path)
  if info.get("format") != FORMAT or info.get("version") != VERSION:
    raise ValueError(f"{meta_path}: format {info.get('format')!r} version {info.get('version')!r}, "
                     f"expected {FORMAT!r} version {VERSION}")
  vectors = np.load(os.path.join(out_dir, EMBEDDINGS_FILE), mmap_mode="r" if mmap else None)
  if vectors.shape != (info["num_passages"], info["dim"]) or vectors.dtype != np.float32:
    raise ValueError(f"{out_dir}: {EMBEDDINGS_FILE} is {vectors.dtype}{list(vectors.shape)}, "
                     f"{META_FILE} says float32[{info['num_passages']}, {info['dim']}]")
  return vectors, info


def reuse(path: str, spec: SystemSpec, params: Params, num_passages: int) -> np.ndarray:
  """The vectors of an embeddings directory, checked to come from this model with these input settings."""
  vectors, info = load(path)
  fingerprint = exports.params_fingerprint(params if spec.unified else params["retriever"])
  expected = {**key_of(spec, fingerprint, info.get("corpus_sha256")), "num_passages": num_passages, "dim": spec.dim}
  if differing := sorted(k for k, v in expected.items() if k in info and info[k] != v):
    raise ValueError(f"{path}: embeddings of another model, corpus or input settings (differing: {differing})")
  return vectors


def encode_prepared(*, out: str, prepared: str, spec: RetrieverSpec | SystemSpec, params: Params, fingerprint: str,
                    mesh: Mesh, batch_size: int, chunk_size: int = 4096, eval_splits: Sequence[str] = (),
                    max_eval_questions: int = 0, lexical_weight: float = 0.0,
                    shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
  """Encodes the corpus of ``prepared`` into ``out`` chunk by chunk (resuming, or reusing the same model's
  embeddings); returns the info written. ``shard=(i, n)``: the i-th of n parts only (:func:`merge_shards`)."""
  if lexical_weight < 0:
    raise ValueError(f"lexical_weight must be >= 0, got {lexical_weight}")
  data = PreparedData.load(prepared)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  corpus = data.token_corpus()
  r = retrieval_spec(spec)
  key = key_of(spec, fingerprint, corpus.meta["sha256"])
  rows = shard_rows(len(corpus), *shard)
  target = out if shard[1] == 1 else shard_dir(out, *shard)
  q_fn, p_fn = spec.embed_fns()
  try:
    vectors, info = load(target)
    if any(info.get(k) != v for k, v in key.items()) or info.get("rows", [0, len(corpus)]) != [rows.start, rows.stop]:
      raise ValueError(f"{target} holds embeddings of another model or corpus; choose another output directory")
    logging.info("%s: embeddings up to date.", target)
  except FileNotFoundError:
    start = time.perf_counter()
    writer = jax.process_index() == 0
    # Other processes encode their rows of every batch and discard what comes back; they read the file afterwards.
    sink = _open_output(target, (len(rows), spec.dim)) if writer else _Discard()
    result = retrieval.encode_corpus(
        retrieval.BatchEncoder(p_fn, mesh, batch_size), params, tokenizer, _Rows(corpus, rows),
        max_len=r.passage_len, buckets=r.buckets, token_type=r.passage_token_type,
        chunk_dir=os.path.join(target, CHUNKS_DIR), chunk_size=chunk_size, key={**key, "rows": [rows.start, rows.stop]},
        progress=True, out=sink)
    info = {**key, "dim": spec.dim, "spec": spec.to_json(), "prepared": data.path, "devices": jax.device_count(),
            "passages_per_s": round(result.passages_per_s, 2), "chunks_reused": result.chunks_reused,
            "wall_s": round(time.perf_counter() - start, 2)}
    if shard[1] > 1:
      info.update(shard=list(shard), rows=[rows.start, rows.stop])
    if writer:
      sink.flush()
      _finish(target, sink.shape, info)
    multihost_utils.sync_global_devices("rnr_jax.embeddings.encode_prepared")
    vectors, info = load(target)
    logging.info("Wrote %s: %d x %d embeddings, %.1f passages/s.", target, *vectors.shape, result.passages_per_s)
  if eval_splits and shard[1] == 1:
    start = time.perf_counter()
    q_encoder = retrieval.BatchEncoder(q_fn, mesh, batch_size)
    results, hybrid = {}, {}
    for split in eval_splits:
      questions = data.questions(split)[:max_eval_questions or None]
      texts, answers = [x.question for x in questions], [x.answers for x in questions]
      q = retrieval.encode_questions(q_encoder, params, tokenizer, texts, max_len=r.question_len, buckets=r.buckets)
      results[split] = retrieval.evaluate_retrieval(q, vectors, answers, data.matcher(), DEFAULT_KS)
      if lexical_weight > 0:
        hybrid[split] = retrieval.evaluate_hybrid(q, vectors, texts, data.bm25(), lexical_weight, answers,
                                                  data.matcher(), DEFAULT_KS)
    info = {**info, "eval": results, "eval_s": round(time.perf_counter() - start, 2)}
    if jax.process_index() == 0:
      atomic_write_json(os.path.join(out, "eval.json"), results)
    if hybrid:
      info["eval_lexical"] = {"lexical_weight": lexical_weight, "candidates": lexical.CANDIDATES, "splits": hybrid}
      if jax.process_index() == 0:
        atomic_write_json(os.path.join(out, "eval_lexical.json"), info["eval_lexical"])
  return info


def teacher_vectors(teacher: str, embeddings: str, questions: Sequence[str], data: PreparedData,
                    tokenizer: tk.Tokenizer, mesh: Mesh, batch_size: int, *, field: str = "teacher"
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
  """``(questions [Q, d], passages [P, d], normalize)`` of a teacher retriever from its corpus ``embeddings``;
  ``normalize``: it scores by cosine; ``field`` names the setting in errors."""
  spec, params, model = exports.load_retriever(teacher, mesh)
  if not embeddings:
    raise ValueError(f"{field}={teacher} needs its corpus embeddings (infer.encode's output directory)")
  passages, info = load(embeddings)
  if info.get("model_fingerprint") != model["fingerprint"]:
    raise ValueError(f"{embeddings}: encoded by another model than {field}={teacher}")
  if passages.shape != (data.num_passages, spec.dim):
    raise ValueError(f"{embeddings}: shape {passages.shape}, expected ({data.num_passages}, {spec.dim}) "
                     "(one vector per prepared passage)")
  if spec.tokenizer_fingerprint != data.manifest["settings"]["tokenizer"]:
    raise ValueError(f"{field}={teacher}: trained with another tokenizer than the prepared data's")
  start = time.perf_counter()
  vectors = retrieval.encode_questions(retrieval.BatchEncoder(spec.embed_fns()[0], mesh, batch_size), params,
                                       tokenizer, list(questions), max_len=spec.question_len, buckets=spec.buckets)
  logging.info("Teacher retriever %s: %d questions encoded in %.1f s.", teacher, len(vectors),
               time.perf_counter() - start)
  return vectors, passages, bool(spec.normalize)


class FreshIndex:
  """Exact search over the corpus (or ``passage_ids``) as encoded once per step by the current parameters; with
  ``cache_dir`` the latest encoding is kept for a later export (:func:`load_fresh`)."""

  def __init__(self, question_fn: EmbedFn, passage_fn: EmbedFn, spec: RetrieverSpec, tokenizer: tk.Tokenizer,
               corpus: Sequence[np.ndarray], mesh: Mesh, batch_size: int, passage_ids: np.ndarray | None = None,
               cache_dir: str | None = None):
    self._spec = spec
    self._cache_dir = cache_dir
    self._tokenizer = tokenizer
    self._passage_ids = None if passage_ids is None else np.asarray(passage_ids, np.int64)
    self._corpus = corpus if passage_ids is None else [corpus[int(p)] for p in self._passage_ids]
    self._row_ids = np.arange(len(corpus), dtype=np.int64) if passage_ids is None else self._passage_ids
    self._questions = retrieval.BatchEncoder(question_fn, mesh, batch_size)
    self._passages = retrieval.BatchEncoder(passage_fn, mesh, batch_size)
    self._step: int | None = None
    self._vectors: np.ndarray | None = None

  def search(self, params: Params, step: int, questions: Sequence[str], k: int) -> np.ndarray:
    """``int32 [len(questions), k]`` passage ids, best first (-1 padded past the corpus size)."""
    spec = self._spec
    if self._step != step or self._vectors is None:
      self._vectors = retrieval.encode_corpus(self._passages, params, self._tokenizer, self._corpus,
                                              max_len=spec.passage_len, buckets=spec.buckets,
                                              token_type=spec.passage_token_type).vectors
      self._step = step
      if self._cache_dir and jax.process_index() == 0:
        save(self._cache_dir, self._vectors, fresh_key(params, self._row_ids))
    q = retrieval.encode_questions(self._questions, params, self._tokenizer, questions, max_len=spec.question_len,
                                   buckets=spec.buckets)
    ids, _ = retrieval.search_exact(q, self._vectors, k)
    if self._passage_ids is not None:
      ids = self._passage_ids[ids]
    return np.pad(ids.astype(np.int32), ((0, 0), (0, k - ids.shape[1])), constant_values=NO_PASSAGE)


def fresh_key(params: Params, passage_ids: np.ndarray) -> dict[str, str]:
  """What identifies an encoding of some passages by some parameters."""
  return {"model_fingerprint": exports.params_fingerprint(params),
          "passage_ids_sha256": hashlib.sha256(np.ascontiguousarray(passage_ids, np.int64).tobytes()).hexdigest()}


def load_fresh(directory: str, params: Params, passage_ids: np.ndarray) -> np.ndarray | None:
  """The vectors kept in ``directory`` for exactly these parameters and passages, else None."""
  try:
    vectors, info = load(directory, mmap=False)
  except FileNotFoundError:
    return None
  key = fresh_key(params, passage_ids)
  return vectors if all(info.get(k) == v for k, v in key.items()) and len(vectors) == len(passage_ids) else None
