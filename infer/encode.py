r"""Encodes the whole prepared corpus with a retriever (or a unified retriever-reader), for the index stage.

  python -m infer.encode --workdir W --out EMB                   # W's exported best retriever, W/prepared
  python -m infer.encode --model_dir W/best --prepared P --out EMB
  python -m infer.encode --model_dir DISTILL/best --prepared P --out EMB   # a unified student (its retrieval
                                                                 # settings); infer.export --embeddings EMB reuses it
  python -m infer.encode --config configs/retriever.py --config.model.pooling=mean \
      --config.model.retrieval_dim=0 --config.retriever.normalize=True --config.retriever.passage_token_type=0 \
      --prepared P --out EMB --eval_splits nq_dev,squadshifts_dev
                                                                 # the config's initial (untrained) encoder

Writes ``EMB/embeddings.npy`` (float32 ``[N, d]``, row i = passage id i) and
``EMB/embeddings.json`` (dim, pooling, model fingerprint, spec, speed); see
:mod:`rnr_jax.retrieval`. Passages are encoded in length-bucketed batches split
over every device, chunk by chunk (``--chunk_size``); each finished chunk is
saved under ``EMB/chunks/``, so a killed run started again skips the finished
chunks. A finished output for the same model and corpus is left as it is. With
``--eval_splits``, the questions of those prepared splits are encoded too and
their top-k answer accuracy over the whole corpus printed and written to
``EMB/eval.json``; ``--lexical_weight W`` adds that of the hybrid ranking dense +
W x BM25 (the prepared BM25 index, :func:`rnr_jax.lexical.fuse`) to
``EMB/eval_lexical.json``. Run again on a finished output, only the evaluation runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from infer import export as export_lib
from rnr_jax import lexical, retrieval
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.io import atomic_write_json
from rnr_jax.metrics import DEFAULT_KS
from rnr_jax.models import Params
from rnr_jax.qa_system import SystemSpec

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  flags.DEFINE_string("workdir", None, "Retriever run directory: encodes with <workdir>/best, reads "
                      "<workdir>/prepared.")
  flags.DEFINE_string("model_dir", None, "Exported retriever directory, or a unified retriever-reader's exported "
                      "with its system spec (train.distill, train.finetune, the pipeline's merge); default: "
                      "<workdir>/best.")
  config_flags.DEFINE_config_file("config", None, "Instead of an exported retriever: a retriever config whose "
                                  "initial encoder (model.init, e.g. the untrained MiniLM) is used.")
  flags.DEFINE_string("prepared", None, "Prepared dataset directory (default: <workdir>/prepared).")
  flags.DEFINE_string("out", None, "Output directory of the embeddings.")
  flags.DEFINE_integer("batch_size", 64, "Passages per encoding batch (a multiple of the device count).")
  flags.DEFINE_integer("chunk_size", 4096, "Passages per saved chunk (the unit of resumption).")
  flags.DEFINE_list("eval_splits", [], "Prepared splits whose top-k answer accuracy to report.")
  flags.DEFINE_integer("max_eval_questions", 0, "First N questions of each eval split; 0 = all.")
  flags.DEFINE_float("lexical_weight", 0.0, "With --eval_splits and > 0: also the accuracy of dense + weight x "
                     "BM25 (the prepared data's index, rnr_jax.lexical.fuse over both top 100s), in "
                     "<out>/eval_lexical.json.")
  flags.mark_flag_as_required("out")


def _retrieval_spec(spec: retrieval.RetrieverSpec | SystemSpec) -> retrieval.RetrieverSpec:
  """The retrieval inputs and vectors of a retriever's or a unified system's spec."""
  return spec.retriever if isinstance(spec, SystemSpec) else spec


def _is_retriever_export(model_dir: str) -> bool:
  export = retrieval.RetrieverExport(model_dir)
  try:
    model = export.latest_info()
  finally:
    export.close()
  return model is None or "spec" in model  # None: load_retriever names the missing export


def resolve_model(workdir: str | None, model_dir: str | None, config: Any, tokenizer_fingerprint: str,
                  mesh: jax.sharding.Mesh) -> tuple[retrieval.RetrieverSpec | SystemSpec, Params, str]:
  """``(spec, params replicated on mesh, fingerprint)`` of an exported retriever, an exported unified
  retriever-reader (a :class:`SystemSpec`) or a config's initial retriever."""
  if config is not None:
    if workdir or model_dir:
      raise app.UsageError("pass either --config or --workdir/--model_dir, not both")
    encoder_config, pretrained = retrieval.initial_encoder(config.model)
    spec = retrieval.RetrieverSpec.from_config(config, encoder_config, tokenizer_fingerprint)
    params = retrieval.initial_params(spec.build(), jax.random.key(config.seed), pretrained)
    fingerprint = retrieval.params_fingerprint(params)
    return spec, jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())), fingerprint
  model_dir = model_dir or (os.path.join(workdir, "best") if workdir else None)
  if not model_dir:
    raise app.UsageError("pass --workdir, --model_dir or --config")
  if os.path.isdir(model_dir) and not _is_retriever_export(model_dir):
    spec, params = export_lib.load_system(model_dir, None, mesh, require_system=True)
    fingerprint = retrieval.params_fingerprint(params)
    logging.info("Unified retriever-reader of %s.", model_dir)
  else:
    spec, params, model = retrieval.load_retriever(model_dir, mesh)
    fingerprint = model["fingerprint"]
    logging.info("Retriever of %s, step %d (%s).", model_dir, model["step"], model["info"].get("metrics"))
  if _retrieval_spec(spec).tokenizer_fingerprint != tokenizer_fingerprint:
    raise ValueError(f"{model_dir} was trained with another tokenizer than the prepared data's; "
                     "its embeddings of these token ids would be meaningless")
  return spec, params, fingerprint


def encode(*, out: str, prepared: str, spec: retrieval.RetrieverSpec | SystemSpec, params: Params, fingerprint: str,
           mesh: jax.sharding.Mesh, batch_size: int, chunk_size: int, eval_splits: Sequence[str] = (),
           max_eval_questions: int = 0, lexical_weight: float = 0.0) -> dict[str, Any]:
  """Encodes the corpus of ``prepared`` into ``out`` (resuming or reusing earlier work); returns the info written.

  With ``eval_splits`` the info holds ``eval``: ``{split: {"top1": ..., ...}}``; with ``lexical_weight`` > 0 also
  ``eval_lexical``: the same for dense + ``lexical_weight`` x BM25 (also written to ``<out>/eval_lexical.json``).
  """
  if lexical_weight < 0:
    raise ValueError(f"lexical_weight must be >= 0, got {lexical_weight}")
  data = PreparedData.load(prepared)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  corpus = data.token_corpus()
  r = _retrieval_spec(spec)
  key = {"model_fingerprint": fingerprint, "corpus_sha256": corpus.meta["sha256"], "pooling": r.pooling,
         "retrieval_dim": r.retrieval_dim, "normalize": r.normalize, "passage_len": r.passage_len,
         "passage_token_type": r.passage_token_type}
  q_fn, p_fn = spec.embed_fns()
  try:
    vectors, info = retrieval.load_embeddings(out)
    if any(info.get(k) != v for k, v in key.items()):
      raise ValueError(f"{out} holds embeddings of another model or corpus; choose another --out")
    logging.info("%s: embeddings up to date.", out)
  except FileNotFoundError:
    start = time.perf_counter()
    result = retrieval.encode_corpus(
        retrieval.BatchEncoder(p_fn, mesh, batch_size), params, tokenizer, corpus, max_len=r.passage_len,
        buckets=r.buckets, token_type=r.passage_token_type,
        chunk_dir=os.path.join(out, retrieval.CHUNKS_DIR), chunk_size=chunk_size, key=key, progress=True)
    vectors = result.vectors
    info = {**key, "dim": spec.dim, "spec": spec.to_json(), "prepared": data.path, "devices": jax.device_count(),
            "passages_per_s": round(result.passages_per_s, 2), "chunks_reused": result.chunks_reused,
            "wall_s": round(time.perf_counter() - start, 2)}
    if jax.process_index() == 0:
      retrieval.save_embeddings(out, vectors, info)
    logging.info("Wrote %s: %d x %d embeddings, %.1f passages/s.", out, *vectors.shape, result.passages_per_s)
  if eval_splits:
    start = time.perf_counter()
    q_encoder = retrieval.BatchEncoder(q_fn, mesh, batch_size)
    results, hybrid = {}, {}
    for split in eval_splits:
      questions = data.questions(split)[:max_eval_questions or None]
      texts, answers = [x.question for x in questions], [x.answers for x in questions]
      q = retrieval.encode_questions(q_encoder, params, tokenizer, texts, max_len=r.question_len,
                                     buckets=r.buckets)
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


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prepared = FLAGS.prepared or (os.path.join(FLAGS.workdir, "prepared") if FLAGS.workdir else None)
  if not prepared:
    raise app.UsageError("pass --prepared (or --workdir with a <workdir>/prepared)")
  mesh = retrieval.data_mesh()
  tokenizer_fingerprint = PreparedData.load(prepared).manifest["settings"]["tokenizer"]
  spec, params, fingerprint = resolve_model(FLAGS.workdir, FLAGS.model_dir, FLAGS.config, tokenizer_fingerprint, mesh)
  info = encode(out=FLAGS.out, prepared=prepared, spec=spec, params=params, fingerprint=fingerprint, mesh=mesh,
                batch_size=FLAGS.batch_size, chunk_size=FLAGS.chunk_size, eval_splits=FLAGS.eval_splits,
                max_eval_questions=FLAGS.max_eval_questions, lexical_weight=FLAGS.lexical_weight)
  summary = ("dim", "pooling", "passages_per_s", "wall_s", "eval", "eval_lexical", "eval_s")
  print(json.dumps({k: info[k] for k in summary if k in info}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
