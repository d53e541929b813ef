r"""Distils the reader teacher into the unified retriever-reader (paper §2.2.3, appendix A.2).

  python -m train.distill --config configs/distill.py --workdir W --config.distill.teacher=READER/best \
      --config.unified.init_retriever=RETRIEVER/best [--config.pool.retriever=RETRIEVER/best]

The student is one :class:`~rnr_jax.qa_model.RetrieverReader`, started from a shared-encoder retriever
(``unified.init_retriever``, fresh reader heads) or from ``model.init`` (an exported reader gives its encoder and
heads). Each step takes ``train.batch_size`` questions with ``distill.m`` passages of their candidate pool J_read, the
positive first, and minimises ``L_read + L_ret`` (:mod:`rnr_jax.distill`). The teacher reads every sampled passage once,
into a cache (:mod:`rnr_jax.teacher`). Every ``train.eval_every`` steps the dev split is answered end to end with a
fresh index (:class:`rnr_jax.evaluation.OpenEvaluator`); the best student is exported to ``W/best/``, which
``train.finetune`` and ``infer.export`` read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rnr_jax import distill, embeddings, exports, passage_filter, qa_model
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.evaluation import OpenEvaluator
from rnr_jax.pool import UnifiedBatches, data_fingerprint, load_pool
from rnr_jax.specs import ReaderSpec, SystemSpec
from rnr_jax.teacher import InputsFn, Teacher, TeacherCache
from rnr_jax.training import loop
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from train import define_stage_flags, run_stage, sources

Params = Any


def student(config: ml_collections.ConfigDict, data: PreparedData
            ) -> tuple[SystemSpec, Params | None, Params | None]:
  """The student's system spec and its initial encoder and reader heads (None: random init)."""
  ucfg, tokens = config.unified, config.tokens
  tokenizer = data.manifest["settings"]["tokenizer"]
  heads = None
  if ucfg.init_retriever:
    spec, params, _ = exports.load_retriever(ucfg.init_retriever)
    if not spec.shared:
      raise ValueError(f"{ucfg.init_retriever}: a unified model starts from a shared-encoder retriever (§2.2.2)")
    if spec.tokenizer_fingerprint != tokenizer:
      raise ValueError(f"{ucfg.init_retriever} was trained with another tokenizer than {data.path}'s")
    encoder = dataclasses.replace(spec.encoder_config(), hidden_dropout_prob=float(config.model.dropout),
                                  attention_probs_dropout_prob=float(config.model.dropout))
    pooling, dim, normalize, token_type = spec.pooling, spec.retrieval_dim, spec.normalize, spec.passage_token_type
    pretrained = jax.device_get(params["encoder"])
    logging.info("Student from the retriever %s: pooling %s, retrieval_dim %d, normalize %s, passage token type %d.",
                 ucfg.init_retriever, pooling, dim, normalize, token_type)
  else:
    encoder, pretrained, heads = exports.initial_encoder(config.model)
    pooling, dim = config.model.pooling, int(config.model.retrieval_dim)
    normalize, token_type = bool(ucfg.normalize), int(ucfg.passage_token_type)
  reader_spec = ReaderSpec(encoder=encoder.to_hf_dict(), pooling=pooling, retrieval_dim=dim,
                           tokenizer_fingerprint=tokenizer, question_len=int(tokens.question_len),
                           reader_len=int(tokens.reader_len), max_answer_len=int(tokens.max_answer_len),
                           buckets=tuple(int(b) for b in tokens.buckets), dtype=config.model.dtype)
  system = SystemSpec.unified_model(reader_spec, passage_len=int(tokens.passage_len), passage_token_type=token_type,
                                    normalize=normalize)
  return system, pretrained, heads


def check_divisible(config: ml_collections.ConfigDict, parallel: int, m: int) -> None:
  """Batch sizes of training, caching, encoding and reading must split over the data-parallel devices."""
  sizes = {"train.batch_size": int(config.train.batch_size),
           "pool.encode_batch_size": int(config.pool.encode_batch_size),
           "eval.batch_size x max(eval.passages)": int(config.eval.batch_size) * max(config.eval.passages)}
  if "distill" in config:
    sizes["distill.cache_batch_size x m"] = int(config.distill.cache_batch_size) * m
  bad = {k: v for k, v in sizes.items() if v % parallel}
  if bad:
    raise ValueError(f"{bad} must be divisible by the {parallel} data-parallel devices")


def fresh_evaluation(config: ml_collections.ConfigDict, workdir: str, system: SystemSpec, scale: float,
                     data: PreparedData, tokenizer: tk.Tokenizer, mesh: jax.sharding.Mesh
                     ) -> tuple[OpenEvaluator, exports.BestExport]:
  """The unified stages' evaluation (a fresh index of the filtered corpus, kept in ``W/index`` for the export of
  the same parameters) and the export of the best student."""
  pcfg = config.pool
  index = embeddings.FreshIndex(*system.embed_fns(), system.retriever, tokenizer, data.token_corpus(), mesh,
                               int(pcfg.encode_batch_size),
                               passage_filter.subset_ids(pcfg.subset, data.num_passages),
                               cache_dir=os.path.join(workdir, "index"))
  evaluator = OpenEvaluator(config.eval, system, data, tokenizer, index, mesh)
  return evaluator, exports.BestExport(workdir, exports.unified_info(system, scale), config.eval.select_metric)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Distils ``config.distill.teacher`` into the student of ``config`` in ``workdir`` (resuming if it can)."""
  dcfg, pcfg = config.distill, config.pool
  if not dcfg.teacher:
    raise ValueError("distill.teacher (an exported reader directory) is required")
  workdir = loop.start_run(config, workdir)

  # Mesh: the loop builds the same one from config.mesh; caching, encoding and evaluation run on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  m = int(dcfg.m)
  check_divisible(config, mesh_lib.data_parallelism(mesh), m)

  # Input: prepared data, the student's inputs, the candidate pool, the teacher's cached outputs, batches.
  data = sources.prepared_data(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  system, pretrained, heads = student(config, data)
  loop.check_vocabulary(system.reader.build().config.vocab_size, tokenizer, data)
  pool = load_pool(pcfg, data, tokenizer, workdir, mesh)
  teacher = Teacher(dcfg.teacher, mesh, int(dcfg.cache_batch_size) * m)
  if teacher.spec.tokenizer_fingerprint != system.reader.tokenizer_fingerprint:
    raise ValueError(f"the teacher {dcfg.teacher} was trained with another tokenizer than {data.path}'s")

  def teacher_cache(pids: np.ndarray, inputs: InputsFn) -> TeacherCache:
    r = system.reader
    key = {"teacher": teacher.fingerprint, "teacher_spec": teacher.spec.to_json(), "data": data_fingerprint(data),
           "examples": hashlib.sha256(pool.examples.tobytes()).hexdigest(),
           "inputs": {"reader_len": r.reader_len, "question_len": r.question_len, "buckets": list(r.buckets)}}
    cache = TeacherCache.open_or_build(os.path.join(workdir, "teacher_cache"), key, pids, r.reader_len, inputs,
                                       teacher, int(dcfg.cache_batch_size))
    teacher.release()  # its outputs are all cached
    return cache

  batches = UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=m,
                           batch_size=int(config.train.batch_size), seed=int(config.train.seed),
                           samples=int(dcfg.cache_samples), teacher_cache=teacher_cache)
  normalize, scale = system.retriever.normalize, float(config.unified.scale)
  teacher_weight, teacher_scale = 0.0, None
  if dcfg.retriever_teacher:  # its vectors travel with the batches, as the reader teacher's logits do
    questions, passages, teacher_normalize = embeddings.teacher_vectors(
        dcfg.retriever_teacher, dcfg.retriever_teacher_embeddings, batches.questions, data, tokenizer, mesh,
        int(pcfg.encode_batch_size), field="distill.retriever_teacher")
    batches.set_retriever_teacher(questions, passages)
    teacher_weight, teacher_scale = float(dcfg.retriever_teacher_weight), scale if teacher_normalize else None

  # Model and step: L_read + L_ret.
  model = system.reader.build()
  step = step_lib.adamw_step(config, distill.make_distill_loss(
      model, normalize=normalize, scale=scale, temperature=float(dcfg.temperature),
      retrieval_loss=dcfg.retrieval_loss, in_batch=bool(dcfg.in_batch), retriever_teacher_weight=teacher_weight,
      retriever_teacher_scale=teacher_scale))

  # Evals.
  evaluator, best = fresh_evaluation(config, workdir, system, scale, data, tokenizer, mesh)

  # The loop.
  try:
    return loop.train_loop(config, workdir=workdir, init_fn=lambda rng: qa_model.init_params(model, rng), step=step,
                           data=batches, evaluator=evaluator, best=best,
                           load_pretrained=None if pretrained is None and heads is None else
                           lambda params: qa_model.with_pretrained(params, encoder=pretrained, heads=heads))
  finally:
    best.close()


if __name__ == "__main__":
  define_stage_flags("configs/distill.py", "Distillation")
  run_stage(train_and_evaluate)
