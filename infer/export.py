r"""Exports a trained QA system as a deployable bundle (paper §2.3, appendix A.4).

  python -m infer.export --workdir W --out BUNDLE                  # W/best (unified retriever-reader), W/prepared
  python -m infer.export --model W/best --prepared P --out BUNDLE \
      [--subset F/subset.npz] [--embeddings EMB] [--recall_split nq_dev]
  python -m infer.export --retriever R/best --model W/best --prepared P --out BUNDLE   # retriever + separate reader

The model is a unified retriever-reader exported by a reader-style stage
(``W/best/``, :func:`rnr_jax.reader_data.load_reader`): its ``embed`` encodes
questions and passages, its ``read`` reads. An export of ``train.distill`` or
``train.finetune`` carries its :class:`~rnr_jax.qa_system.SystemSpec` (retrieval
input settings), which is kept; for a plain reader export ``--passage_len``,
``--passage_token_type`` and ``--normalize`` give them. With ``--retriever`` (an
exported retriever, :func:`rnr_jax.retrieval.load_retriever`) the system is a
retriever plus a separate reader instead.

Steps: the corpus of the prepared directory (or the passages kept by the passage
filter, ``--subset``) is encoded with the system's passage encoder (or taken from
``--embeddings``, an ``infer.encode`` output of the same model over the whole
corpus); the INT8 ScaNN index is built over it, and its recall@10/@20 against
exact search reported (on the questions of ``--recall_split``, or on sampled
passages); the bundle gets the weights as FP16 values, the index, the token-ID
corpus of the kept passages (with their passage ids), the tokenizer files and
the configuration (:class:`rnr_jax.qa_system.SystemSpec` and default
:class:`~rnr_jax.qa_system.InferenceSettings`), each file bzip2 (binary) or
lzma (text) compressed, with a sha256 manifest. Prints the footprint table
(model, index, corpus, other; paper Table 3) and, last, one JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from rnr_jax import passage_filter, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.bundle import WEIGHTS_DTYPES, format_footprint, write_bundle
from rnr_jax.data import PreparedData
from rnr_jax.index import KINDS, DenseIndex
from rnr_jax.models import Params
from rnr_jax.qa_system import (RULES, TOKENIZER_FILES, InferenceSettings, SystemSpec, encode_passages,
                               write_passages)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("workdir", None, "Run directory: exports <workdir>/best with <workdir>/prepared.")
  flags.DEFINE_string("model", None, "Exported unified retriever-reader (or reader, with --retriever) directory.")
  flags.DEFINE_string("retriever", None, "Exported retriever directory: a two-model system (retriever + reader).")
  flags.DEFINE_string("prepared", None, "Prepared dataset directory (default: <workdir>/prepared).")
  flags.DEFINE_string("subset", None, "Passage filter subset (train.filter's subset.npz): only its passages ship.")
  flags.DEFINE_string("embeddings", None, "Embeddings directory of the whole corpus (infer.encode) to reuse.")
  flags.DEFINE_string("out", None, "Bundle directory to write.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --out.")
  flags.DEFINE_enum("index_kind", "int8", list(KINDS), "Index kind (int8 = the paper's INT8 index).")
  flags.DEFINE_enum("weights_dtype", "float16", list(WEIGHTS_DTYPES), "Stored weight values (float16+int8-embeddings: "
                    "the word-embedding table as per-row int8; int8: every matrix as int8, per row or output unit).")
  flags.DEFINE_integer("passage_len", 256, "Unified model without a system spec: passage tokens when encoding.")
  flags.DEFINE_integer("passage_token_type", 1, "Unified model without a system spec: passage token type.")
  flags.DEFINE_bool("normalize", False, "Unified model without a system spec: L2-normalise retrieval vectors.")
  flags.DEFINE_integer("batch_size", 64, "Passages per encoding batch.")
  flags.DEFINE_string("recall_split", None, "Prepared split whose questions measure the index recall.")
  flags.DEFINE_integer("recall_questions", 1000, "Questions of --recall_split used for the recall.")
  flags.DEFINE_integer("top_k", 20, "Default passages retrieved per question.")
  flags.DEFINE_integer("read_passages", 10, "Default passages read per question (m').")
  flags.DEFINE_enum("rule", "dpr", list(RULES), "Default answer rule (appendix A.3).")
  flags.DEFINE_float("passage_score_weight", 0.8, "Default λ of the weighted rule.")
  flags.DEFINE_float("lexical_weight", 0.0, "Default BM25 fusion weight of retrieval (0 = dense only; BM25 is built "
                     "from the shipped passages at load, no bundle bytes; choose it with bench.hybrid_sweep).")
  flags.mark_flag_as_required("out")


def load_system(model_dir: str, retriever_dir: str | None, mesh: jax.sharding.Mesh, *, passage_len: int = 256,
                passage_token_type: int = 1, normalize: bool = False,
                require_system: bool = False) -> tuple[SystemSpec, Params]:
  """The spec and parameters (replicated on ``mesh``) of a unified model, or of a retriever plus a reader.

  A unified model exported with its system spec (``train.distill``, ``train.finetune``) keeps its own retrieval
  settings; for a plain reader export ``passage_len``, ``passage_token_type`` and ``normalize`` set them
  (:meth:`SystemSpec.unified_model`), or, with ``require_system``, it is refused. A separate retriever's come
  from its own spec.
  """
  reader_spec, _, reader_params, info = rd.load_reader(model_dir, mesh)
  if retriever_dir is None:
    if "system" in info:
      return SystemSpec.from_json(info["system"]), reader_params
    if require_system:
      raise ValueError(f"{model_dir}: a reader export without a system spec (its retrieval settings: passage "
                       "length, token type, normalisation); python -m infer.export --model DIR takes them as flags")
    return SystemSpec.unified_model(reader_spec, passage_len=passage_len, passage_token_type=passage_token_type,
                                    normalize=normalize), reader_params
  retriever_spec, retriever_params, _ = retrieval.load_retriever(retriever_dir, mesh)
  return SystemSpec.two_models(retriever_spec, reader_spec), {"retriever": retriever_params, "reader": reader_params}


def check_tokenizer(spec: SystemSpec, data: PreparedData) -> None:
  """Refuses a model trained with another tokenizer than the prepared data's (its token ids would mismatch)."""
  if spec.reader.tokenizer_fingerprint != data.manifest["settings"]["tokenizer"]:
    raise ValueError(f"the model was trained with another tokenizer than the one of {data.path}")


def reuse_embeddings(path: str, spec: SystemSpec, params: Params, num_passages: int) -> np.ndarray:
  """The vectors of an embeddings directory, checked to come from this model with these input settings."""
  vectors, info = retrieval.load_embeddings(path)
  r = spec.retriever
  expected = {"num_passages": num_passages, "dim": spec.dim, "pooling": r.pooling, "retrieval_dim": r.retrieval_dim,
              "normalize": r.normalize, "passage_len": r.passage_len, "passage_token_type": r.passage_token_type,
              "model_fingerprint": retrieval.params_fingerprint(params if spec.unified else params["retriever"])}
  differing = sorted(k for k, v in expected.items() if k in info and info[k] != v)
  if differing:
    raise ValueError(f"{path}: embeddings of another model, corpus or input settings (differing: {differing})")
  return vectors


def corpus_records(data: PreparedData, subset: str | None) -> tuple[list[np.ndarray], np.ndarray]:
  """``(records, passage ids)`` of the passages to ship: every prepared passage, or those of a subset file."""
  corpus = data.token_corpus()
  if subset:
    pids, _, total = passage_filter.load_subset(subset)
    if total != len(corpus):
      raise ValueError(f"{subset} selects from {total} passages, {data.path} has {len(corpus)}")
    pids = np.sort(pids.astype(np.int64))
  else:
    pids = np.arange(len(corpus), dtype=np.int64)
  return [corpus[p] for p in pids.tolist()], pids


def build_index(data: PreparedData, spec: SystemSpec, params: Params, records: Sequence[np.ndarray],
                pids: np.ndarray, mesh: jax.sharding.Mesh, *, embeddings: str | None = None, kind: str = "int8",
                batch_size: int = 64, recall_split: str | None = None, recall_questions: int = 1000,
                vectors: np.ndarray | None = None) -> DenseIndex:
  """The index over the passages ``pids`` (encoded now, rows of ``embeddings``, or the given ``vectors`` of
  ``pids``), with its recall measured.

  The recall is measured on the questions of ``recall_split`` when given, else on sampled passages.
  """
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  if vectors is not None:
    if vectors.shape[0] != len(pids):
      raise ValueError(f"{vectors.shape[0]} vectors given for {len(pids)} passages")
    vectors = np.asarray(vectors, np.float32)
  elif embeddings:
    vectors = np.asarray(reuse_embeddings(embeddings, spec, params, data.num_passages)[pids], np.float32)
  else:
    vectors = encode_passages(spec, params, tokenizer, records, mesh, batch_size=batch_size, progress=True)
  eval_queries = None
  if recall_split:
    encoder = retrieval.BatchEncoder(spec.embed_fns()[0], mesh, retrieval.data_parallelism(mesh) * 8)
    questions = [q.question for q in data.questions(recall_split)[:recall_questions]]
    eval_queries = retrieval.encode_questions(encoder, params, tokenizer, questions,
                                              max_len=spec.retriever.question_len, buckets=spec.retriever.buckets)
  index = DenseIndex.build(vectors, kind, ids=pids, eval_queries=eval_queries)
  logging.info("Index: %s", index.build_report)
  return index


def write_system_bundle(out: str, data: PreparedData, spec: SystemSpec, params: Params, index: DenseIndex,
                        records: Sequence[np.ndarray], pids: np.ndarray, settings: InferenceSettings, *,
                        weights_dtype: str = "float16", overwrite: bool = False) -> dict[str, Any]:
  """Writes the bundle of a system (weights, index, token-ID corpus of ``pids``, tokenizer); returns the manifest."""
  check_tokenizer(spec, data)
  corpus = data.token_corpus()
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".export-", dir=parent) as tmp:
    corpus_dir = os.path.join(tmp, "corpus")
    write_passages(corpus_dir, records, pids, corpus.meta["vocab_size"], corpus.meta.get("tokenizer"))
    tokenizer_files = [os.path.join(data.tokenizer_path, f) for f in TOKENIZER_FILES
                       if os.path.isfile(os.path.join(data.tokenizer_path, f))]
    return write_bundle(out, params=jax.device_get(params), model_config=spec.to_json(), index=index,
                        token_corpus_dir=corpus_dir, tokenizer_dir_or_files=tokenizer_files,
                        weights_dtype=weights_dtype, inference_config=settings.to_json(), overwrite=overwrite)


def export(*, out: str, prepared: str, spec: SystemSpec, params: Params, mesh: jax.sharding.Mesh,
           settings: InferenceSettings, subset: str | None = None, embeddings: str | None = None,
           index_kind: str = "int8", weights_dtype: str = "float16", batch_size: int = 64,
           recall_split: str | None = None, recall_questions: int = 1000, overwrite: bool = False,
           vectors: np.ndarray | None = None) -> dict[str, Any]:
  """Builds the index and writes the bundle of a system over a prepared corpus; returns a summary."""
  start = time.perf_counter()
  data = PreparedData.load(prepared)
  check_tokenizer(spec, data)
  records, pids = corpus_records(data, subset)
  index = build_index(data, spec, params, records, pids, mesh, embeddings=embeddings, kind=index_kind,
                      batch_size=batch_size, recall_split=recall_split, recall_questions=recall_questions,
                      vectors=vectors)
  manifest = write_system_bundle(out, data, spec, params, index, records, pids, settings,
                                 weights_dtype=weights_dtype, overwrite=overwrite)
  return {"bundle": os.path.abspath(out), "passages": len(pids), "unified": spec.unified,
          "index": index.build_report, "footprint": manifest["footprint"],
          "seconds": round(time.perf_counter() - start, 2)}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  model_dir = FLAGS.model or (os.path.join(FLAGS.workdir, "best") if FLAGS.workdir else None)
  prepared = FLAGS.prepared or (os.path.join(FLAGS.workdir, "prepared") if FLAGS.workdir else None)
  if not model_dir or not prepared:
    raise app.UsageError("pass --workdir, or --model and --prepared")
  mesh = retrieval.data_mesh()
  spec, params = load_system(model_dir, FLAGS.retriever, mesh, passage_len=FLAGS.passage_len,
                             passage_token_type=FLAGS.passage_token_type, normalize=FLAGS.normalize)
  settings = InferenceSettings(top_k=FLAGS.top_k, read_passages=FLAGS.read_passages, rule=FLAGS.rule,
                               passage_score_weight=FLAGS.passage_score_weight, lexical_weight=FLAGS.lexical_weight)
  summary = export(out=FLAGS.out, prepared=prepared, spec=spec, params=params, mesh=mesh, settings=settings,
                   subset=FLAGS.subset, embeddings=FLAGS.embeddings, index_kind=FLAGS.index_kind,
                   weights_dtype=FLAGS.weights_dtype, batch_size=FLAGS.batch_size, recall_split=FLAGS.recall_split,
                   recall_questions=FLAGS.recall_questions, overwrite=FLAGS.overwrite)
  report = summary["index"]
  print(f"index: {report['kind']}, {report['n']} x {report['dim']}, recall@10 {report['recall@10']:.4f}, "
        f"recall@20 {report['recall@20']:.4f} vs exact ({report['eval_source']})")
  print(format_footprint(summary["footprint"]))
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
