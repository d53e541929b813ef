"""Dense retrieval: batched sharded encoding (resumable in chunks), the JAX inference engine, exact search and its
evaluation."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from rnr_jax import lexical
from rnr_jax import tokenization as tk
from rnr_jax.data.bm25 import BM25Index
from rnr_jax.data.token_corpus import save_npy
from rnr_jax.index_search import exact_search
from rnr_jax.io import atomic_write_json, read_json
from rnr_jax.metrics import DEFAULT_KS, AnswerMatcher, answer_top_k_accuracy
from rnr_jax.specs import EmbedFn, SystemSpec
from rnr_jax.training import mesh as mesh_lib

Params = Any
CHUNK_KEY = "key.json"


def pad_rows(batch: tk.EncodedBatch, rows: int) -> tk.EncodedBatch:
  """Pads a batch with empty rows up to ``rows`` (fixed batch shapes under jit)."""
  n = batch.input_ids.shape[0]
  if n >= rows:
    return batch

  def pad(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.zeros((rows - n,) + x.shape[1:], x.dtype)])

  mask = pad(batch.attention_mask)
  mask[n:, 0] = 1  # padding rows attend to one token, so no row is fully masked
  return tk.EncodedBatch(pad(batch.input_ids), mask, pad(batch.token_type_ids))


class BatchEncoder:
  """Runs a ``(params, batch) -> [rows, ...]`` function jitted over the mesh's data axes on padded batches, every
  process passing the same batches; two batches stay in flight."""

  def __init__(self, embed_fn: EmbedFn, mesh: Mesh, batch_size: int):
    self._parallel = mesh_lib.data_parallelism(mesh)
    if batch_size % self._parallel:
      raise ValueError(f"encoding batch size {batch_size} is not divisible by the {self._parallel} data-parallel "
                       "devices")
    self.mesh = mesh
    self.batch_size = batch_size
    self._fn = jax.jit(embed_fn)

  def _device_batch(self, batch: tk.EncodedBatch, rows: int) -> dict[str, jax.Array]:
    local = rows // jax.process_count()
    start = jax.process_index() * local
    padded = pad_rows(batch, rows).as_dict()
    return mesh_lib.make_global_batch({k: v[start:start + local] for k, v in padded.items()}, self.mesh)

  def __call__(self, params: Params, batches: Iterable[tuple[np.ndarray, tk.EncodedBatch]], total: int,
               on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Outputs ``[total, ...]`` float32 of ``(indices, batch)`` pairs (at most ``batch_size`` rows each): row ``i`` from
    the batch holding index ``i``; ``on_batch`` gets each finished batch's row count."""
    out: np.ndarray | None = None
    pending: list[tuple[np.ndarray, jax.Array]] = []

    def finish(idx: np.ndarray, vectors: jax.Array) -> None:
      nonlocal out
      v = np.asarray(multihost_utils.process_allgather(vectors, tiled=True), np.float32)
      if out is None:
        out = np.zeros((total,) + v.shape[1:], np.float32)
      out[idx] = v[: len(idx)]
      if on_batch is not None:
        on_batch(len(idx))

    for idx, batch in batches:
      if len(idx) > self.batch_size:
        raise ValueError(f"batch of {len(idx)} rows exceeds the encoding batch size {self.batch_size}")
      pending.append((idx, self._fn(params, self._device_batch(batch, self.batch_size))))
      if len(pending) > 2:  # two batches in flight: the host prepares while devices run
        finish(*pending.pop(0))
    for idx, vectors in pending:
      finish(idx, vectors)
    if out is None:
      raise ValueError("nothing to encode")
    return out

  def run(self, params: Params, batch: tk.EncodedBatch, rows: int) -> np.ndarray:
    """The outputs of one batch's rows, run padded to ``rows`` rounded up to a multiple of the devices (callers keep
    ``rows`` to a few sizes, e.g. powers of two, so only a few shapes compile)."""
    n = batch.input_ids.shape[0]
    size = -(-max(rows, n) // self._parallel) * self._parallel
    out = self._fn(params, self._device_batch(batch, size))
    return np.asarray(multihost_utils.process_allgather(out, tiled=True), np.float32)[:n]


def encode_questions(encoder: BatchEncoder, params: Params, tokenizer: tk.Tokenizer, questions: Sequence[str],
                     *, max_len: int, buckets: Sequence[int]) -> np.ndarray:
  """Question vectors ``[len(questions), d]`` (token type 0), batched by length bucket."""
  lengths = [min(len(ids) + 2, max_len) for ids in tokenizer.encode_texts(questions)]
  batches = ((idx, tokenizer.questions([questions[i] for i in idx], max_len, buckets))
             for idx in tk.bucketed_batches(lengths, encoder.batch_size, buckets))
  return encoder(params, batches, len(questions))


class CorpusEmbeddings(NamedTuple):
  """Result of :func:`encode_corpus`."""
  vectors: np.ndarray     # float32 [N, d]
  chunks_reused: int      # chunks read back from an earlier, interrupted run
  passages_per_s: float   # over the passages encoded by this call


def encode_corpus(encoder: BatchEncoder, params: Params, tokenizer: tk.Tokenizer, records: Sequence[np.ndarray],
                  *, max_len: int, buckets: Sequence[int], token_type: int = 1, chunk_dir: str | None = None,
                  chunk_size: int = 4096, key: Mapping[str, Any] | None = None,
                  progress: bool = False, out: np.ndarray | None = None) -> CorpusEmbeddings:
  """Embeds passage records into ``out`` (default: a new array) chunk by chunk; with ``chunk_dir`` finished
  chunks are saved and read back by a later call with the same ``key``, another key's refused."""
  n = len(records)
  if n == 0:
    raise ValueError("the corpus has no passages")
  if chunk_dir is not None:
    _check_chunk_key(chunk_dir, {**(key or {}), "num_passages": n, "chunk_size": chunk_size, "max_len": max_len,
                                 "token_type": token_type})
  bar = tqdm(total=n, desc="encode passages", unit="passage", dynamic_ncols=True, smoothing=0.1,
             disable=not progress or jax.process_index() != 0)
  reused, encoded, seconds = 0, 0, 0.0

  def keep(start: int, vectors: np.ndarray) -> None:
    nonlocal out
    if out is None:
      out = np.empty((n, *vectors.shape[1:]), np.float32)
    out[start:start + len(vectors)] = vectors

  for c, start in enumerate(range(0, n, chunk_size)):
    stop = min(start + chunk_size, n)
    path = None if chunk_dir is None else os.path.join(chunk_dir, f"{c:05d}.npy")
    if path is not None and os.path.exists(path):
      vectors = np.load(path)
      if len(vectors) != stop - start:
        raise ValueError(f"{path} holds {len(vectors)} rows, expected {stop - start}; delete {chunk_dir}")
      keep(start, vectors)
      reused += 1
      bar.update(stop - start)
      continue
    t = time.perf_counter()
    chunk = [np.asarray(records[i]) for i in range(start, stop)]
    lengths = [min(len(r) + 2, max_len) for r in chunk]
    batches = ((idx, tokenizer.passages_from_records([chunk[i] for i in idx], max_len, buckets, token_type))
               for idx in tk.bucketed_batches(lengths, encoder.batch_size, buckets))
    vectors = encoder(params, batches, len(chunk), on_batch=bar.update)
    seconds += time.perf_counter() - t
    encoded += len(chunk)
    bar.set_postfix(passages_per_s=f"{encoded / seconds:.1f}", refresh=False)
    if path is not None and jax.process_index() == 0:
      save_npy(path, vectors)
    keep(start, vectors)
  bar.close()
  rate = encoded / seconds if seconds else 0.0
  logging.info("Encoded %d passages (%.1f/s), reused %d finished chunks.", encoded, rate, reused)
  return CorpusEmbeddings(out, reused, rate)


def _check_chunk_key(chunk_dir: str, key: Mapping[str, Any]) -> None:
  """Writes ``key.json`` into a new chunk directory, or checks an existing one against ``key``."""
  path = os.path.join(chunk_dir, CHUNK_KEY)
  key = json.loads(json.dumps(dict(key)))  # tuples -> lists, as read back
  if os.path.exists(path):
    old = read_json(path)
    if old != key:
      changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
      raise ValueError(f"{chunk_dir} holds chunks of other embeddings (differing: {changed}); "
                       "delete it or choose another output directory")
  elif jax.process_index() == 0:
    os.makedirs(chunk_dir, exist_ok=True)
    atomic_write_json(path, key)
  multihost_utils.sync_global_devices("rnr_jax.retrieval.chunk_key")


def encode_passages(spec: SystemSpec, params: Params, tokenizer: tk.Tokenizer, records: Sequence[np.ndarray],
                    mesh: Mesh, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
  """float32 ``[len(records), dim]`` passage vectors of a system's token-ID records (``params`` placed on ``mesh``)."""
  parallel = mesh_lib.data_parallelism(mesh)
  encoder = BatchEncoder(spec.embed_fns()[1], mesh, -(-batch_size // parallel) * parallel)
  r = spec.retriever
  return encode_corpus(encoder, params, tokenizer, records, max_len=r.passage_len, buckets=r.buckets,
                       token_type=r.passage_token_type, progress=progress).vectors


@functools.lru_cache(maxsize=8)
def _runners(spec_json: str, mesh: Mesh) -> tuple[BatchEncoder, ...]:
  """The jitted question encoder, passage encoder and reader of a system, cached so reloaded systems reuse them."""
  spec, parallel = SystemSpec.from_json(json.loads(spec_json)), mesh_lib.data_parallelism(mesh)
  return tuple(BatchEncoder(fn, mesh, parallel) for fn in (*spec.embed_fns(), spec.read_fn()))


class JaxEngine:
  """The JAX engine of :class:`~rnr_jax.qa_system.QASystem`: a model jitted on a mesh, parameters replicated."""

  name = "jax"

  def __init__(self, spec: SystemSpec, params: Params, mesh: Mesh | None = None):
    self.mesh = mesh if mesh is not None else mesh_lib.data_mesh(jax.local_devices())
    self.params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
    self.parallel = mesh_lib.data_parallelism(self.mesh)
    self.question_runner, self.passage_runner, self.read_runner = _runners(json.dumps(spec.to_json(), sort_keys=True),
                                                                           self.mesh)

  def embed(self, batch: tk.EncodedBatch, rows: int, passages: bool = False) -> np.ndarray:
    return (self.passage_runner if passages else self.question_runner).run(self.params, batch, rows)

  def read(self, batch: tk.EncodedBatch, rows: int) -> np.ndarray:
    return self.read_runner.run(self.params, batch, rows)


def search_exact(queries: np.ndarray, passages: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-``min(k, len(passages))`` passages by inner product: ``(ids int64, scores float32)``, best first."""
  n = len(passages)
  if min(k, n) < 1:
    raise ValueError(f"need k >= 1 and at least one passage, got k={k} and {n} passages")
  return exact_search(np.asarray(passages, np.float32), np.asarray(queries, np.float32), min(k, n))


def evaluate_retrieval(question_vectors: np.ndarray, passage_vectors: np.ndarray,
                       answers: Sequence[Sequence[str]], matcher: AnswerMatcher,
                       ks: Sequence[int] = DEFAULT_KS, passage_ids: np.ndarray | None = None) -> dict[str, float]:
  """``{"top1": ..., ...}``: answer accuracy (DPR ``has_answer``) of exact search; row i of ``passage_vectors`` is
  passage ``passage_ids[i]`` (default: i)."""
  ids, _ = search_exact(question_vectors, passage_vectors, max(ks))
  if passage_ids is not None:
    ids = np.asarray(passage_ids)[ids]
  return {f"top{k}": v for k, v in answer_top_k_accuracy(ids, answers, matcher, ks).items()}


def evaluate_hybrid(question_vectors: np.ndarray, passage_vectors: np.ndarray, questions: Sequence[str],
                    bm25: BM25Index, weight: float, answers: Sequence[Sequence[str]], matcher: AnswerMatcher,
                    ks: Sequence[int] = DEFAULT_KS, candidates: int = lexical.CANDIDATES) -> dict[str, float]:
  """Top-k answer accuracy of dense + ``weight`` x BM25 (:func:`rnr_jax.lexical.fuse`) over the whole corpus, each
  retrieval contributing its top ``candidates`` (at least ``max(ks)``)."""
  if bm25.num_passages != len(passage_vectors):
    raise ValueError(f"the BM25 index holds {bm25.num_passages} passages, the embeddings {len(passage_vectors)}")
  if len(questions) != len(question_vectors):
    raise ValueError(f"{len(questions)} questions for {len(question_vectors)} question vectors")
  depth = max(candidates, *ks)
  dense_ids, dense_scores = search_exact(question_vectors, passage_vectors, depth)
  lexical_ids, lexical_scores = bm25.search(list(questions), depth)
  ids, _ = lexical.fuse(dense_ids, dense_scores, lexical_ids, lexical_scores, weight, max(ks))
  return {f"top{k}": v for k, v in answer_top_k_accuracy(ids, answers, matcher, ks).items()}
