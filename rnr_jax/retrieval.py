"""Dense retrieval with a retriever: encoding, exact search, evaluation and the exported model.

* :class:`RetrieverSpec`: everything that rebuilds a :class:`~rnr_jax.qa_model.Retriever`
  and feeds it (encoder architecture, sharing, pooling, dimension, input layout);
  :func:`initial_encoder` and :func:`initial_params` give the weights a config starts from.
* :class:`BatchEncoder`: jitted embedding of padded batches with the batch dimension
  split over the mesh's data axes (every device, every process).
* :func:`encode_questions`; :func:`encode_corpus`, length-bucketed and resumable in
  chunks; :func:`save_embeddings` / :func:`load_embeddings`, the files the index stage reads.
* :func:`search_exact` and :func:`evaluate_retrieval`: top-k answer accuracy of
  exact inner-product search over a whole corpus.
* :class:`RetrieverExport` / :func:`load_retriever`: a run's exported parameters.

**Embeddings directory** (:func:`save_embeddings`)::

  embeddings.npy    float32 [N, d]; row i is passage id i of the prepared directory
  embeddings.json   written last: format, num_passages, dim, pooling, model fingerprint, spec, ...
  chunks/           while encoding only: key.json and <chunk>.npy, one per finished chunk

**Exported retriever** (:class:`RetrieverExport`): an Orbax checkpoint directory
``<dir>/<step>/`` with two items, ``params`` (the parameter pytree, restorable onto
any mesh) and ``model`` (JSON: the :class:`RetrieverSpec`, the parameters'
fingerprint and free-form info such as the step's metrics). Only the newest step
is kept; Orbax commits each step atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rnr_jax import embed, lexical, qa_model
from rnr_jax import tokenization as tk
from rnr_jax.data.bm25 import BM25Index
from rnr_jax.data.token_corpus import save_npy
from rnr_jax.index import exact_search
from rnr_jax.io import atomic_write_json
from rnr_jax.metrics import DEFAULT_KS, AnswerMatcher, answer_top_k_accuracy
from rnr_jax.models import EncoderConfig, Params, config_from_hf_dict, load_hf_encoder, load_minilm
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training.checkpoint import ParamsExport

EmbedFn = Callable[[Params, dict[str, jax.Array]], jax.Array]

EMBEDDINGS_FORMAT = "rnr_jax.embeddings"
EMBEDDINGS_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDINGS_META = "embeddings.json"
CHUNKS_DIR = "chunks"
CHUNK_KEY = "key.json"


# ---- the model -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetrieverSpec:
  """What rebuilds a retriever and its inputs; saved beside exported parameters.

  Attributes:
    encoder: transformers ``config.json`` dict of the encoder (``num_hidden_layers``
      = the layers kept).
    shared: one encoder for questions and passages (paper §2.2.2) or two (DPR).
    pooling: ``"cls"`` or ``"mean"``.
    retrieval_dim: first d dims of the pooled vector; 0 = full width.
    normalize: L2-normalise the retrieval vectors, so inner products are cosine
      similarities (how sentence-transformers models such as all-MiniLM-L6-v2 were
      trained); False scores by the raw inner product (DPR and the paper).
    passage_token_type: token type id of passage inputs (questions use 0).
    tokenizer_fingerprint: sha256 of the tokenizer files (as in a prepared
      directory's manifest), so ids from another vocabulary are refused.
    question_len, passage_len: maximum input lengths.
    buckets: padding lengths (see :mod:`rnr_jax.tokenization`).
    dtype: compute dtype name.
  """

  encoder: Mapping[str, Any]
  shared: bool
  pooling: str
  retrieval_dim: int
  normalize: bool
  passage_token_type: int
  tokenizer_fingerprint: str
  question_len: int
  passage_len: int
  buckets: tuple[int, ...]
  dtype: str = "float32"

  def __post_init__(self) -> None:
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
    if self.passage_token_type not in (0, 1):
      raise ValueError(f"passage_token_type must be 0 or 1, got {self.passage_token_type}")
    width = self.encoder_config().hidden_size
    if not 0 <= self.retrieval_dim <= width:
      raise ValueError(f"retrieval_dim must be in [0, {width}] (0 = full width), got {self.retrieval_dim}")
    object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))

  @classmethod
  def from_config(cls, config: Any, encoder: EncoderConfig, tokenizer_fingerprint: str) -> RetrieverSpec:
    """The spec of a stage config (sections ``model``, ``tokens``, ``retriever``)."""
    return cls(encoder=encoder.to_hf_dict(), shared=bool(config.retriever.shared),
               pooling=config.model.pooling, retrieval_dim=int(config.model.retrieval_dim),
               normalize=bool(config.retriever.normalize),
               passage_token_type=int(config.retriever.passage_token_type),
               tokenizer_fingerprint=tokenizer_fingerprint, question_len=int(config.tokens.question_len),
               passage_len=int(config.tokens.passage_len), buckets=tuple(config.tokens.buckets),
               dtype=config.model.dtype)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> RetrieverSpec:
    return cls(**{**d, "buckets": tuple(d["buckets"])})

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "encoder": dict(self.encoder), "buckets": list(self.buckets)}

  def encoder_config(self) -> EncoderConfig:
    return config_from_hf_dict(self.encoder)

  @property
  def dim(self) -> int:
    """Width of the retrieval vectors."""
    return self.retrieval_dim or self.encoder_config().hidden_size

  def build(self) -> qa_model.Retriever:
    return qa_model.Retriever(self.encoder_config(), shared=self.shared, pooling=self.pooling,
                              retrieval_dim=self.retrieval_dim, dtype=jnp.dtype(self.dtype))

  def finish(self, vectors: jax.Array) -> jax.Array:
    """The model's retrieval vectors as scored: L2-normalised if ``normalize``."""
    return l2_normalize(vectors) if self.normalize else vectors

  def embed_fns(self) -> tuple[EmbedFn, EmbedFn]:
    """``(question_fn, passage_fn)``: ``(params, batch) -> [B, dim]`` without dropout (not jitted)."""
    model = self.build()

    def questions(params: Params, batch: dict[str, jax.Array]) -> jax.Array:
      return self.finish(model.apply({"params": params}, batch, method="embed_questions"))

    def passages(params: Params, batch: dict[str, jax.Array]) -> jax.Array:
      return self.finish(model.apply({"params": params}, batch, method="embed_passages"))

    return questions, passages


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def is_reader_export(path: str) -> bool:
  """Whether ``path`` is an exported model directory (``<dir>/<step>/``) rather than a Hugging Face one."""
  return (bool(path) and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))
          and any(d.isdigit() for d in os.listdir(path)))


def initial_encoder(model_cfg: Any) -> tuple[EncoderConfig, Params | None]:
  """The encoder a config starts from: ``(config, pretrained params or None)``.

  ``model_cfg.init``: ``"minilm"`` (the installed all-MiniLM-L6-v2), a Hugging Face
  directory or hub id, an exported reader (its encoder), or ``""`` for a random
  initialisation of ``model_cfg.hf_config``. ``model_cfg.num_layers`` keeps the first
  layers; ``model_cfg.dropout`` sets the hidden and attention dropout.
  """
  if model_cfg.init == "minilm":
    config, params = load_minilm(model_cfg.num_layers)
  elif is_reader_export(model_cfg.init):
    from rnr_jax import reader_data  # pylint: disable=import-outside-toplevel  (reader_data imports this module)
    config, params, _ = reader_data.load_reader_encoder(model_cfg.init, model_cfg.num_layers)
  elif model_cfg.init:
    config, params = load_hf_encoder(model_cfg.init, model_cfg.num_layers)
  else:
    config, params = config_from_hf_dict(dict(model_cfg.hf_config)), None
    if model_cfg.num_layers is not None:
      config = dataclasses.replace(config, num_hidden_layers=int(model_cfg.num_layers))
  return dataclasses.replace(config, hidden_dropout_prob=float(model_cfg.dropout),
                             attention_probs_dropout_prob=float(model_cfg.dropout)), params


def dummy_inputs() -> dict[str, np.ndarray]:
  """A one-row input batch for ``init`` (parameter shapes do not depend on it)."""
  ones = np.ones((1, 4), np.int32)
  return {"input_ids": ones, "attention_mask": ones, "token_type_ids": np.zeros_like(ones)}


def initial_params(model: qa_model.Retriever, rng: jax.Array, pretrained: Params | None = None) -> Params:
  """Randomly initialised retriever parameters, every encoder replaced by ``pretrained`` if given."""
  x = dummy_inputs()
  params = jax.jit(lambda key: model.init(key, x, x)["params"])(rng)
  return params if pretrained is None else qa_model.with_pretrained_encoders(params, pretrained)


def params_fingerprint(params: Params) -> str:
  """sha256 over the parameters' paths, dtypes, shapes and values (gathered from all processes)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    x = np.asarray(multihost_utils.process_allgather(leaf, tiled=True) if isinstance(leaf, jax.Array) else leaf)
    h.update(f"{mesh_lib.path_name(path)}:{x.dtype.str}:{x.shape};".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


# ---- batched, sharded encoding -------------------------------------------------------


def passage_batch(tokenizer: tk.Tokenizer, records: Sequence[np.ndarray], max_len: int, buckets: Sequence[int],
                  token_type: int) -> tk.EncodedBatch:
  """Passage inputs from token-ID records with token type ``token_type`` on every real token."""
  b = tokenizer.passages_from_records(records, max_len, buckets)
  return tk.EncodedBatch(b.input_ids, b.attention_mask, (b.attention_mask > 0).astype(np.int32) * token_type)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis ``("data",)`` mesh over ``devices`` (default: all), for inference with replicated parameters."""
  return mesh_lib.make_mesh(types.SimpleNamespace(shape=(-1,), axes=("data",)), devices)


def data_parallelism(mesh: Mesh) -> int:
  """Number of ways a batch is split: the product of the mesh's data axes."""
  return int(np.prod([mesh.shape[a] for a in mesh_lib.DATA_AXES if a in mesh.shape]))


class BatchEncoder:
  """Embeds padded batches of a fixed size with a jitted function, split over the mesh's data axes.

  Every process passes the same full batches; each puts its own rows on its
  devices and the vectors are gathered back to every process. Batches of one
  length bucket share one compilation. A couple of batches stay in flight so the
  host prepares the next one while the devices compute.
  """

  def __init__(self, embed_fn: EmbedFn, mesh: Mesh, batch_size: int):
    parallel = data_parallelism(mesh)
    if batch_size % parallel:
      raise ValueError(f"encoding batch size {batch_size} is not divisible by the {parallel} data-parallel devices")
    self.mesh = mesh
    self.batch_size = batch_size
    self._fn = jax.jit(embed_fn)

  def _device_batch(self, batch: tk.EncodedBatch) -> dict[str, jax.Array]:
    rows = self.batch_size // jax.process_count()
    start = jax.process_index() * rows
    padded = embed.pad_rows(batch, self.batch_size).as_dict()
    return mesh_lib.make_global_batch({k: v[start:start + rows] for k, v in padded.items()}, self.mesh)

  def __call__(self, params: Params, batches: Iterable[tuple[np.ndarray, tk.EncodedBatch]], total: int,
               on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Vectors ``[total, d]`` float32: row ``i`` from the batch holding index ``i``.

    Args:
      params: parameters placed on ``mesh`` (sharded or replicated).
      batches: ``(indices, batch)`` pairs, at most ``batch_size`` rows each.
      total: number of rows of the result.
      on_batch: called with the number of rows of each finished batch (progress).
    """
    out: np.ndarray | None = None
    pending: list[tuple[np.ndarray, jax.Array]] = []

    def finish(idx: np.ndarray, vectors: jax.Array) -> None:
      nonlocal out
      v = np.asarray(multihost_utils.process_allgather(vectors, tiled=True), np.float32)
      if out is None:
        out = np.zeros((total, v.shape[1]), np.float32)
      out[idx] = v[: len(idx)]
      if on_batch is not None:
        on_batch(len(idx))

    for idx, batch in batches:
      if len(idx) > self.batch_size:
        raise ValueError(f"batch of {len(idx)} rows exceeds the encoding batch size {self.batch_size}")
      pending.append((idx, self._fn(params, self._device_batch(batch))))
      if len(pending) > 2:
        finish(*pending.pop(0))
    for idx, vectors in pending:
      finish(idx, vectors)
    if out is None:
      raise ValueError("nothing to encode")
    return out


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
                  progress: bool = False) -> CorpusEmbeddings:
  """Embeds every passage record (``title [SEP] text`` ids, e.g. a :class:`TokenCorpus`).

  Records are encoded in chunks of ``chunk_size``, each batched by length bucket.
  With ``chunk_dir``, every finished chunk is saved there atomically
  (``<chunk>.npy``) and a later call with the same ``key`` reads it back instead
  of encoding it again, so a killed run continues where it stopped. Multi-process
  runs need ``chunk_dir`` on a filesystem every process sees; process 0 writes.

  Args:
    encoder: a :class:`BatchEncoder` of the passage embedding function.
    params: its parameters, placed on the encoder's mesh.
    tokenizer: builds the ``[CLS] record [SEP]`` inputs.
    records: token ids of each passage; row i of the result is record i.
    max_len, buckets: input length limit and padding buckets.
    token_type: token type id of the passage inputs.
    chunk_dir: where finished chunks go (None: keep nothing).
    chunk_size: passages per chunk.
    key: what identifies the embeddings (model fingerprint, corpus hash, ...);
      chunks written under another key raise ``ValueError`` instead of being mixed in.
    progress: show a progress bar with passages/s.
  """
  n = len(records)
  if n == 0:
    raise ValueError("the corpus has no passages")
  if chunk_dir is not None:
    _check_chunk_key(chunk_dir, {**(key or {}), "num_passages": n, "chunk_size": chunk_size, "max_len": max_len,
                                 "token_type": token_type})
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(total=n, desc="encode passages", unit="passage", dynamic_ncols=True, smoothing=0.1)
  parts, reused, encoded, seconds = [], 0, 0, 0.0
  for c, start in enumerate(range(0, n, chunk_size)):
    stop = min(start + chunk_size, n)
    path = None if chunk_dir is None else os.path.join(chunk_dir, f"{c:05d}.npy")
    if path is not None and os.path.exists(path):
      vectors = np.load(path)
      if len(vectors) != stop - start:
        raise ValueError(f"{path} holds {len(vectors)} rows, expected {stop - start}; delete {chunk_dir}")
      parts.append(vectors)
      reused += 1
      if bar is not None:
        bar.update(stop - start)
      continue
    t = time.perf_counter()
    chunk = [np.asarray(records[i]) for i in range(start, stop)]
    lengths = [min(len(r) + 2, max_len) for r in chunk]
    batches = ((idx, passage_batch(tokenizer, [chunk[i] for i in idx], max_len, buckets, token_type))
               for idx in tk.bucketed_batches(lengths, encoder.batch_size, buckets))
    vectors = encoder(params, batches, len(chunk), on_batch=None if bar is None else bar.update)
    seconds += time.perf_counter() - t
    encoded += len(chunk)
    if bar is not None:
      bar.set_postfix(passages_per_s=f"{encoded / seconds:.1f}", refresh=False)
    if path is not None and jax.process_index() == 0:
      save_npy(path, vectors)
    parts.append(vectors)
  if bar is not None:
    bar.close()
  rate = encoded / seconds if seconds else 0.0
  logging.info("Encoded %d passages (%.1f/s), reused %d finished chunks.", encoded, rate, reused)
  return CorpusEmbeddings(np.concatenate(parts), reused, rate)


def _check_chunk_key(chunk_dir: str, key: Mapping[str, Any]) -> None:
  """Writes ``key.json`` into a new chunk directory, or checks an existing one against ``key``."""
  path = os.path.join(chunk_dir, CHUNK_KEY)
  key = json.loads(json.dumps(dict(key)))  # tuples -> lists, as read back
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if old != key:
      changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
      raise ValueError(f"{chunk_dir} holds chunks of other embeddings (differing: {changed}); "
                       "delete it or choose another output directory")
  elif jax.process_index() == 0:
    os.makedirs(chunk_dir, exist_ok=True)
    atomic_write_json(path, key)
  multihost_utils.sync_global_devices("rnr_jax.retrieval.chunk_key")


def save_embeddings(out_dir: str, vectors: np.ndarray, info: Mapping[str, Any]) -> None:
  """Writes ``embeddings.npy`` then ``embeddings.json`` (``info`` plus format, count and dim); drops ``chunks/``."""
  os.makedirs(out_dir, exist_ok=True)
  save_npy(os.path.join(out_dir, EMBEDDINGS_FILE), np.asarray(vectors, np.float32))
  atomic_write_json(os.path.join(out_dir, EMBEDDINGS_META), {
      "format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "num_passages": int(vectors.shape[0]),
      "dim": int(vectors.shape[1]), **info})
  shutil.rmtree(os.path.join(out_dir, CHUNKS_DIR), ignore_errors=True)


def load_embeddings(out_dir: str, mmap: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
  """``(vectors [N, d] float32, info)`` of a directory written by :func:`save_embeddings`."""
  meta_path = os.path.join(out_dir, EMBEDDINGS_META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{out_dir}: no {EMBEDDINGS_META} (encoding unfinished or not an embeddings directory)")
  with open(meta_path, encoding="utf-8") as f:
    info = json.load(f)
  if info.get("format") != EMBEDDINGS_FORMAT or info.get("version") != EMBEDDINGS_VERSION:
    raise ValueError(f"{meta_path}: format {info.get('format')!r} version {info.get('version')!r}, "
                     f"expected {EMBEDDINGS_FORMAT!r} version {EMBEDDINGS_VERSION}")
  vectors = np.load(os.path.join(out_dir, EMBEDDINGS_FILE), mmap_mode="r" if mmap else None)
  if vectors.shape != (info["num_passages"], info["dim"]) or vectors.dtype != np.float32:
    raise ValueError(f"{out_dir}: {EMBEDDINGS_FILE} is {vectors.dtype}{list(vectors.shape)}, "
                     f"{EMBEDDINGS_META} says float32[{info['num_passages']}, {info['dim']}]")
  return vectors, info


def teacher_vectors(teacher: str, embeddings: str, questions: Sequence[str], data: Any, tokenizer: tk.Tokenizer,
                    mesh: Mesh, batch_size: int, *, field: str = "teacher"
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
  """A teacher retriever's vectors for distilling its scores: ``(questions [Q, d], passages [P, d], normalize)``.

  ``teacher`` is an exported retriever and ``embeddings`` its corpus embeddings (the :func:`save_embeddings`
  layout, a memory map indexed by passage id of the prepared ``data``); the questions are encoded here, once.
  ``normalize`` says whether the teacher scores by cosine (its vectors are then unit length). ``field`` names the
  setting in errors.
  """
  spec, params, model = load_retriever(teacher, mesh)
  if not embeddings:
    raise ValueError(f"{field}={teacher} needs its corpus embeddings (infer.encode's output directory)")
  passages, info = load_embeddings(embeddings)
  if info.get("model_fingerprint") != model["fingerprint"]:
    raise ValueError(f"{embeddings}: encoded by another model than {field}={teacher}")
  if passages.shape != (data.num_passages, spec.dim):
    raise ValueError(f"{embeddings}: shape {passages.shape}, expected ({data.num_passages}, {spec.dim}) "
                     "(one vector per prepared passage)")
  if spec.tokenizer_fingerprint != data.manifest["settings"]["tokenizer"]:
    raise ValueError(f"{field}={teacher}: trained with another tokenizer than the prepared data's")
  start = time.perf_counter()
  q_fn, _ = spec.embed_fns()
  vectors = encode_questions(BatchEncoder(q_fn, mesh, batch_size), params, tokenizer, list(questions),
                             max_len=spec.question_len, buckets=spec.buckets)
  logging.info("Teacher retriever %s: %d questions encoded in %.1f s.", teacher, len(vectors),
               time.perf_counter() - start)
  return vectors, passages, bool(spec.normalize)


# ---- search and evaluation -----------------------------------------------------------


def search_exact(queries: np.ndarray, passages: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k passages by inner product: ``(ids [Q, k'] int64, scores [Q, k'] float32)``, best first.

  ``k' = min(k, len(passages))``; blocked as :func:`rnr_jax.index.exact_search`.
  """
  n = len(passages)
  if min(k, n) < 1:
    raise ValueError(f"need k >= 1 and at least one passage, got k={k} and {n} passages")
  return exact_search(np.asarray(passages, np.float32), np.asarray(queries, np.float32), min(k, n))


def evaluate_retrieval(question_vectors: np.ndarray, passage_vectors: np.ndarray,
                       answers: Sequence[Sequence[str]], matcher: AnswerMatcher,
                       ks: Sequence[int] = DEFAULT_KS, passage_ids: np.ndarray | None = None) -> dict[str, float]:
  """Top-k answer accuracy (DPR ``has_answer``) of exact search over the passages.

  Row i of ``passage_vectors`` is passage id ``passage_ids[i]`` of ``matcher`` (default: i).
  Returns ``{"top1": ..., "top5": ..., ...}``.
  """
  ids, _ = search_exact(question_vectors, passage_vectors, max(ks))
  if passage_ids is not None:
    ids = np.asarray(passage_ids)[ids]
  return {f"top{k}": v for k, v in answer_top_k_accuracy(ids, answers, matcher, ks).items()}


def evaluate_hybrid(question_vectors: np.ndarray, passage_vectors: np.ndarray, questions: Sequence[str],
                    bm25: BM25Index, weight: float, answers: Sequence[Sequence[str]], matcher: AnswerMatcher,
                    ks: Sequence[int] = DEFAULT_KS, candidates: int = lexical.CANDIDATES) -> dict[str, float]:
  """Top-k answer accuracy of dense + ``weight`` x BM25 (:func:`rnr_jax.lexical.fuse`) over the whole corpus.

  Row i of ``passage_vectors`` and row i of ``bm25`` are passage i. Each retrieval contributes its top
  ``candidates`` (at least ``max(ks)``); ``weight`` 0 ranks by the dense scores alone.
  """
  if bm25.num_passages != len(passage_vectors):
    raise ValueError(f"the BM25 index holds {bm25.num_passages} passages, the embeddings {len(passage_vectors)}")
  if len(questions) != len(question_vectors):
    raise ValueError(f"{len(questions)} questions for {len(question_vectors)} question vectors")
  depth = max(candidates, *ks)
  dense_ids, dense_scores = search_exact(question_vectors, passage_vectors, depth)
  lexical_ids, lexical_scores = bm25.search(list(questions), depth)
  ids, _ = lexical.fuse(dense_ids, dense_scores, lexical_ids, lexical_scores, weight, max(ks))
  return {f"top{k}": v for k, v in answer_top_k_accuracy(ids, answers, matcher, ks).items()}


# ---- exported parameters -------------------------------------------------------------


class RetrieverExport:
  """A run's exported retriever: a :class:`ParamsExport` whose ``model`` item holds spec, fingerprint and info."""

  def __init__(self, directory: str):
    self._export = ParamsExport(directory)
    self.directory = self._export.directory

  def latest_info(self) -> dict[str, Any] | None:
    """The ``model`` item (spec, fingerprint, step, info) of the exported step, or None."""
    return self._export.latest_info()

  def save(self, step: int, spec: RetrieverSpec, params: Params, info: Mapping[str, Any]) -> str:
    """Exports ``params`` as step ``step`` (replacing any export); returns the fingerprint.

    Every process must call it (the parameters may be sharded over processes).
    """
    fingerprint = params_fingerprint(params)
    self._export.save(step, params, {"spec": spec.to_json(), "fingerprint": fingerprint, "info": dict(info)})
    return fingerprint

  def load(self, mesh: Mesh | None = None) -> tuple[RetrieverSpec, Params, dict[str, Any]]:
    """``(spec, params, model item)`` of the exported step; params replicated over ``mesh`` (or on device 0)."""
    model = self.latest_info()
    if model is None:
      raise FileNotFoundError(f"{self.directory}: no exported retriever")
    if "spec" not in model:
      raise ValueError(f"{self.directory}: not a retriever export (its model item has no retriever spec, only "
                       f"{sorted(model)}); a reader's or a unified student's export loads with "
                       "rnr_jax.reader_data.load_reader, and python -m infer.encode --model_dir DIR encodes the "
                       "corpus with it")
    spec = RetrieverSpec.from_json(model["spec"])
    sharding = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    abstract = jax.eval_shape(lambda: initial_params(spec.build(), jax.random.key(0)))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    return spec, self._export.restore(target), model

  def close(self) -> None:
    self._export.close()


def load_retriever(directory: str, mesh: Mesh | None = None) -> tuple[RetrieverSpec, Params, dict[str, Any]]:
  """``(spec, params, model item)`` of an export (:class:`RetrieverExport` directory).

  Parameters are restored replicated over ``mesh`` (default: on the first device).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no exported retriever (no such directory)")
  export = RetrieverExport(directory)
  try:
    return export.load(mesh)
  finally:
    export.close()
