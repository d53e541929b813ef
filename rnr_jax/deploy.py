"""A trained system as a deployable bundle (paper §2.3): the kept passages encoded (or their vectors reused),
indexed (INT8 by default, its recall measured) and written with weights, corpus and tokenizer."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from rnr_jax import embeddings, onnx_export, passage_filter, retrieval
from rnr_jax import tokenization as tk
from rnr_jax.bundle import flatten_params, write_bundle
from rnr_jax.data import PreparedData
from rnr_jax.index import DenseIndex
from rnr_jax.io import dir_lock, scratch_dir
from rnr_jax.qa_system import TOKENIZER_FILES, InferenceSettings, Records, write_passages
from rnr_jax.runtime import GRAPH_FILE
from rnr_jax.specs import SystemSpec
from rnr_jax.training import mesh as mesh_lib

Params = Any


def check_tokenizer(spec: SystemSpec, data: PreparedData) -> None:
  """Refuses a model trained with another tokenizer than the prepared data's (its token ids would mismatch)."""
  if spec.reader.tokenizer_fingerprint != data.manifest["settings"]["tokenizer"]:
    raise ValueError(f"the model was trained with another tokenizer than the one of {data.path}")


def corpus_records(data: PreparedData, subset: str | None) -> tuple[Sequence[np.ndarray], np.ndarray]:
  """``(records, passage ids)`` of the passages to ship: every prepared passage, or those of a subset file."""
  corpus = data.token_corpus()
  pids = passage_filter.subset_ids(subset, len(corpus))
  pids = np.arange(len(corpus), dtype=np.int64) if pids is None else pids
  return Records(corpus, pids), pids


def build_index(data: PreparedData, spec: SystemSpec, params: Params, records: Sequence[np.ndarray],
                pids: np.ndarray, mesh: jax.sharding.Mesh, *, embeddings_dir: str | None = None, kind: str = "int8",
                batch_size: int = 64, recall_split: str | None = None, recall_questions: int = 1000,
                vectors: np.ndarray | None = None) -> DenseIndex:
  """The index over the passages ``pids``: encoded now, rows of ``embeddings_dir`` (the whole corpus), or the given
  ``vectors`` of ``pids``; its recall measured on the questions of ``recall_split``, else on sampled passages."""
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  if vectors is not None:
    if vectors.shape[0] != len(pids):
      raise ValueError(f"{vectors.shape[0]} vectors given for {len(pids)} passages")
    vectors = np.asarray(vectors, np.float32)
  elif embeddings_dir:
    vectors = np.asarray(embeddings.reuse(embeddings_dir, spec, params, data.num_passages)[pids], np.float32)
  else:
    vectors = retrieval.encode_passages(spec, params, tokenizer, records, mesh, batch_size=batch_size, progress=True)
  eval_queries = None
  if recall_split:
    encoder = retrieval.BatchEncoder(spec.embed_fns()[0], mesh, mesh_lib.data_parallelism(mesh) * 8)
    questions = [q.question for q in data.questions(recall_split)[:recall_questions]]
    eval_queries = retrieval.encode_questions(encoder, params, tokenizer, questions,
                                              max_len=spec.retriever.question_len, buckets=spec.retriever.buckets)
  index = DenseIndex.build(vectors, kind, ids=pids, eval_queries=eval_queries)
  logging.info("Index: %s", index.build_report)
  return index


def write_system_bundle(out: str, data: PreparedData, spec: SystemSpec, params: Params, index: DenseIndex,
                        records: Sequence[np.ndarray], pids: np.ndarray, settings: InferenceSettings, *,
                        weights_dtype: str = "float16", overwrite: bool = False, onnx: bool = True) -> dict[str, Any]:
  """Writes the bundle of a system (weights, index, token-ID corpus of ``pids``, tokenizer, and with ``onnx`` for a
  unified BERT student the ONNX graph :mod:`rnr_jax.runtime` serves it with); returns the manifest."""
  check_tokenizer(spec, data)
  corpus = data.token_corpus()
  with dir_lock(out), scratch_dir(out) as tmp:  # a killed export's scratch is removed by the next writer of out
    corpus_dir = os.path.join(tmp, "corpus")
    write_passages(corpus_dir, records, pids, corpus.meta["vocab_size"], corpus.meta.get("tokenizer"))
    tokenizer_files = [os.path.join(data.tokenizer_path, f) for f in TOKENIZER_FILES
                       if os.path.isfile(os.path.join(data.tokenizer_path, f))]
    params = jax.device_get(params)
    extra = {}
    if onnx and onnx_export.supported(spec.to_json()):
      extra[GRAPH_FILE] = os.path.join(tmp, GRAPH_FILE)
      # Only the graph: the runtime supplies the bundle's own weights to it.
      onnx_export.save(extra[GRAPH_FILE], spec.to_json(), flatten_params(params))
    return write_bundle(out, params=params, model_config=spec.to_json(), index=index, token_corpus_dir=corpus_dir,
                        tokenizer_dir_or_files=tokenizer_files, extra_files=extra, weights_dtype=weights_dtype,
                        inference_config=settings.to_json(), overwrite=overwrite)


def export(*, out: str, prepared: str, spec: SystemSpec, params: Params, mesh: jax.sharding.Mesh,
           settings: InferenceSettings, subset: str | None = None, embeddings_dir: str | None = None,
           index_kind: str = "int8", weights_dtype: str = "float16", batch_size: int = 64,
           recall_split: str | None = None, recall_questions: int = 1000, overwrite: bool = False,
           vectors: np.ndarray | None = None, onnx: bool = True) -> dict[str, Any]:
  """Builds the index and writes the bundle of a system over a prepared corpus; returns a summary."""
  start = time.perf_counter()
  data = PreparedData.load(prepared)
  check_tokenizer(spec, data)
  records, pids = corpus_records(data, subset)
  index = build_index(data, spec, params, records, pids, mesh, embeddings_dir=embeddings_dir, kind=index_kind,
                      batch_size=batch_size, recall_split=recall_split, recall_questions=recall_questions,
                      vectors=vectors)
  manifest = write_system_bundle(out, data, spec, params, index, records, pids, settings,
                                 weights_dtype=weights_dtype, overwrite=overwrite, onnx=onnx)
  return {"bundle": os.path.abspath(out), "passages": len(pids), "unified": spec.unified, "index": index.build_report,
          "footprint": manifest["footprint"], "seconds": round(time.perf_counter() - start, 2)}
