r"""Distils the reader teacher into the unified retriever-reader (paper §2.2.3, appendix A.2).

  python -m train.distill --config configs/distill.py --workdir W --config.distill.teacher=READER/best \
      --config.unified.init_retriever=RETRIEVER/best [--config.pool.retriever=RETRIEVER/best]

The student is one :class:`~rnr_jax.qa_model.RetrieverReader` started from the shared-encoder retriever of §2.2.2
(``unified.init_retriever``: its encoder; reader heads fresh or ``unified.init_heads``: an exported reader's, e.g. the
teacher's when the retriever started from the teacher's encoder) or from ``model.init``. Each step takes
``train.batch_size`` training questions with ``distill.m`` passages of their candidate pool J_read (the top
``pool.k1`` passages of ``pool.candidates``, ``pool.retriever`` or BM25), the positive first, and minimises
``L_read + L_ret`` (:func:`rnr_jax.distill.distill_loss`): the KL to the teacher's start / end / ranking logits at
temperature ``distill.temperature``, and the KL of the student's retrieval scores to the teacher's ranking (or the
positive's NLL, ``distill.retrieval_loss``). Beyond the paper, ``distill.in_batch`` ranks each positive among all
passages of the batch, and ``distill.retriever_teacher`` (an exported retriever with its corpus embeddings
``distill.retriever_teacher_embeddings``, e.g. the two-encoder teacher system's) adds the KL to that retriever's
scores over the batch's passages (:func:`rnr_jax.distill.make_distill_loss`): with both, a student started from
the teacher *reader* learns to retrieve while the reading KL keeps what it reads, with no retrieval-only stage.

The teacher (``distill.teacher``, a :func:`rnr_jax.reader_data.load_reader` export) is loaded once and reads the
sampled passages of every question once: its logits are cached in ``W/teacher_cache/`` (float16 memmaps keyed by a
fingerprint of teacher, data and samples, :class:`rnr_jax.distill.TeacherCache`) and travel with the batches, so it
is never differentiated nor checkpointed. ``distill.cache_samples`` fixed samples per question are cached; epoch e
reads sample e mod S.

Every ``train.eval_every`` steps (and after the last) the dev split is answered end to end with a fresh index of the
corpus encoded by the student (:class:`rnr_jax.distill.OpenEvaluator`): ``W/eval.jsonl``, ``eval/...`` in
``W/metrics.jsonl``; the best evaluation (``eval.select_metric``) is exported to ``W/best/`` and the
``eval.keep_best`` best to ``W/top/step_<step>/``, which ``train.finetune`` and ``infer.export`` read. With
``pool.refresh_every`` J_read is rebuilt from the student's own retrieval every that many steps. Checkpoints
(``W/checkpoints``) and resuming are the training core's; the prepared data come from ``config.prepared_dir`` or are
built into ``W/prepared``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rnr_jax import distill, passage_filter, qa_model, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.models import Params
from rnr_jax.qa_system import SystemSpec
from rnr_jax.training import loop
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from rnr_jax.training.optim import make_optimizer

FLAGS = flags.FLAGS
PyTree = Any


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  config_flags.DEFINE_config_file("config", "configs/distill.py", "Distillation config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, evaluations, teacher cache, exports.")
  flags.mark_flag_as_required("workdir")


def student_spec(config: ml_collections.ConfigDict, data: PreparedData) -> tuple[SystemSpec, Params | None]:
  """The student's system spec and its initial encoder weights (None: random init of ``model.hf_config``)."""
  ucfg, tokens = config.unified, config.tokens
  tokenizer = data.manifest["settings"]["tokenizer"]
  if ucfg.init_retriever:
    spec, params, _ = retrieval.load_retriever(ucfg.init_retriever)
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
    encoder, pretrained = retrieval.initial_encoder(config.model)
    pooling, dim = config.model.pooling, int(config.model.retrieval_dim)
    normalize, token_type = bool(ucfg.normalize), int(ucfg.passage_token_type)
  reader_spec = rd.ReaderSpec(encoder=encoder.to_hf_dict(), pooling=pooling, retrieval_dim=dim,
                              tokenizer_fingerprint=tokenizer, question_len=int(tokens.question_len),
                              reader_len=int(tokens.reader_len), max_answer_len=int(tokens.max_answer_len),
                              buckets=tuple(int(b) for b in tokens.buckets), dtype=config.model.dtype)
  return SystemSpec.unified_model(reader_spec, passage_len=int(tokens.passage_len), passage_token_type=token_type,
                                  normalize=normalize), pretrained


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Distils ``config.distill.teacher`` into the student of ``config`` in ``workdir`` (resuming if it can)."""
  dcfg, pcfg = config.distill, config.pool
  if not dcfg.teacher:
    raise ValueError("distill.teacher (an exported reader directory) is required")
  label_weight = float(dcfg.label_weight)
  if label_weight < 0 or (label_weight and int(dcfg.max_spans) < 1):
    raise ValueError(f"distill.label_weight must be >= 0 (got {dcfg.label_weight}) and needs distill.max_spans >= 1 "
                     f"(got {dcfg.max_spans})")
  embed_weight = float(dcfg.embed_weight)
  if embed_weight < 0 or (embed_weight and not dcfg.retriever_teacher):
    raise ValueError(f"distill.embed_weight must be >= 0 (got {dcfg.embed_weight}) and needs "
                     "distill.retriever_teacher (the vectors it matches)")
  workdir = loop.start_run(config, workdir)

  # Mesh: the training loop builds the same one from config.mesh; caching, encoding and evaluation run on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  m = int(dcfg.m)
  check_divisible(config, retrieval.data_parallelism(mesh), m)

  # Input: prepared data, the student's input layout, the candidate pool, the teacher and its cache, batches.
  data = rd.load_prepared(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  system, pretrained = student_spec(config, data)
  if system.reader.build().config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"the encoder's vocabulary is smaller than the prepared data's tokenizer ({data.tokenizer_path})")
  pool = distill.load_pool(pcfg, data, tokenizer, workdir, mesh)
  teacher = distill.Teacher(dcfg.teacher, mesh, int(dcfg.cache_batch_size) * m)
  refresh_every = int(pcfg.refresh_every)

  def teacher_cache(pids: np.ndarray, inputs: distill.InputsFn) -> distill.TeacherCache:
    if teacher.spec.tokenizer_fingerprint != system.reader.tokenizer_fingerprint:
      raise ValueError(f"the teacher {dcfg.teacher} was trained with another tokenizer than {data.path}'s")
    reader_spec = system.reader
    key = {"teacher": teacher.fingerprint(), "teacher_spec": teacher.spec.to_json(),
           "data": distill.data_fingerprint(data), "examples": hashlib.sha256(pool.examples.tobytes()).hexdigest(),
           "inputs": {"reader_len": reader_spec.reader_len, "question_len": reader_spec.question_len,
                      "buckets": list(reader_spec.buckets)}}
    cache = distill.TeacherCache.open_or_build(os.path.join(workdir, "teacher_cache"), key, pids,
                                               reader_spec.reader_len, inputs, teacher, int(dcfg.cache_batch_size))
    if not refresh_every:
      teacher.release()  # no other pool will need it
    return cache

  batches = distill.UnifiedBatches(pool, tokenizer, data.token_corpus(), system, m=m,
                                   batch_size=int(config.train.batch_size), seed=int(config.train.seed),
                                   samples=int(dcfg.cache_samples), teacher_cache=teacher_cache,
                                   max_spans=int(dcfg.max_spans) if label_weight else 0)

  # Model: parameter init, the loss and the step (shardings, jitted init and resume order are the loop's).
  model = system.reader.build()
  normalize, scale = system.retriever.normalize, float(config.unified.scale)

  def init_fn(rng: jax.Array) -> PyTree:
    return model.init(rng, retrieval.dummy_inputs())["params"]

  heads = rd.load_reader_encoder(config.unified.init_heads)[2] if config.unified.init_heads else None

  def load_pretrained(params: PyTree) -> PyTree:
    if pretrained is not None:
      params = qa_model.with_pretrained_encoders(params, pretrained)
    return params if heads is None else qa_model.with_pretrained_heads(params, heads)

  teacher_weight, teacher_scale = 0.0, None
  if dcfg.retriever_teacher:
    questions, passages, teacher_normalize = retrieval.teacher_vectors(
        dcfg.retriever_teacher, dcfg.retriever_teacher_embeddings, batches.questions, data, tokenizer, mesh,
        int(pcfg.encode_batch_size), field="distill.retriever_teacher")
    batches.set_retriever_teacher(questions, passages)
    teacher_weight, teacher_scale = float(dcfg.retriever_teacher_weight), scale if teacher_normalize else None
  loss_fn = distill.make_distill_loss(model, normalize=normalize, scale=scale, temperature=float(dcfg.temperature),
                                      retrieval_loss=dcfg.retrieval_loss, in_batch=bool(dcfg.in_batch),
                                      retriever_teacher_weight=teacher_weight,
                                      retriever_teacher_temperature=float(dcfg.retriever_teacher_temperature),
                                      retriever_teacher_scale=teacher_scale,
                                      read_weight=float(dcfg.read_weight),
                                      label_weight=label_weight, embed_weight=embed_weight)
  optimizer, schedule = make_optimizer(config.optim, int(config.train.num_steps))
  step_fn = step_lib.make_train_step(loss_fn, optimizer, grad_accum=int(config.optim.grad_accum), schedule=schedule)

  # Evals (a fresh index of the corpus, shared with the pool refresh), then the loop.
  index = distill.FreshIndex(*system.embed_fns(), system.retriever, tokenizer, data.token_corpus(), mesh,
                             int(pcfg.encode_batch_size), passage_filter.subset_ids(pcfg.subset, data.num_passages),
                             cache_dir=os.path.join(workdir, "index"))
  evaluator = distill.OpenEvaluator(config.eval, workdir, system, scale, data, tokenizer, index, mesh)
  try:
    return distill.train_loop(config, workdir=workdir, init_fn=init_fn,
                              new_state=lambda params: step_lib.TrainState.create(params, optimizer),
                              step_fn=step_fn, data=batches, eval_fn=evaluator,
                              refresh=distill.PoolRefresher(pool, batches, index), refresh_every=refresh_every,
                              load_pretrained=None if pretrained is None and heads is None else load_pretrained)
  finally:
    evaluator.close()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
