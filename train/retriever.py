r"""Trains the retriever: a DPR bi-encoder, or the paper's single shared encoder (§2.2.2).

  python -m train.retriever --config configs/retriever.py --workdir W [--config.retriever.shared=False ...]

Each step takes ``train.batch_size`` questions of the prepared training splits,
each with its positive passage and ``retriever.hard_negatives`` BM25 hard
negatives (rows ``[pos, neg, ...]`` per question), and minimises the NLL of the
positive among *all* passages of the global batch (``losses.in_batch_nll``).
Questions are ``[CLS] q [SEP]`` with token type 0, passages ``[CLS] title [SEP]
text [SEP]`` with ``retriever.passage_token_type``; both padded to length buckets.
The retrieval vector is the first ``model.retrieval_dim`` dims of the pooled output,
L2-normalised with ``retriever.normalize`` (then scores are ``retriever.scale`` x cosine).

Beyond the paper: with ``retriever.teacher`` (an exported retriever, e.g. the two-encoder teacher system's) and
its corpus embeddings (``retriever.teacher_embeddings``, the ``infer.encode`` layout), the loss adds
``retriever.teacher_weight`` x τ² x KL(softmax(teacher / τ) || softmax(student / τ)) over the same global batch
of passages, τ = ``retriever.teacher_temperature``. The teacher's question vectors are encoded once before
training; its passage vectors are looked up, so a step costs no teacher forward pass.

Every ``train.eval_every`` steps (and after the last) the whole prepared corpus
is encoded and each dev split's top-k answer accuracy is measured with exact
inner-product search; the numbers go to ``W/metrics.jsonl`` (as ``eval/...``)
and ``W/eval.jsonl``. The parameters of the best evaluation (``retriever.select_metric``)
are exported to ``W/best/<step>/`` (Orbax: ``params`` + ``model`` JSON, see
:class:`rnr_jax.retrieval.RetrieverExport`), which ``python -m infer.encode
--workdir W`` reads. Checkpoints (``W/checkpoints``) and resuming are the
training core's.

The prepared data come from ``config.prepared_dir``, or are built into
``W/prepared`` from ``config.data_dir`` (``$RNR_DATA``) when it is empty.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from rnr_jax import passage_filter, qa_model, retrieval
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData, prepare, sample_retriever_passages
from rnr_jax.training import loop, losses
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training.metrics_log import append_eval
from rnr_jax.training.step import LossFn, TrainState

FLAGS = flags.FLAGS
PyTree = Any


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so entry modules import together)."""
  config_flags.DEFINE_config_file("config", "configs/retriever.py", "Retriever training config file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, evaluations, exported best model.")
  flags.mark_flag_as_required("workdir")


def load_prepared(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
  """``config.prepared_dir``, or ``<workdir>/prepared`` built (or found up to date) from ``config.data_dir``."""
  if config.prepared_dir:
    return PreparedData.load(config.prepared_dir)
  path = os.path.join(workdir, "prepared")
  if jax.process_index() == 0:
    prepare(config.data_dir, path, echo=lambda s: logging.info("%s", s))
  multihost_utils.sync_global_devices("rnr_jax.train.retriever.prepare")
  return PreparedData.load(path)


class RetrieverBatches:
  """Resumable training batches in the DPR layout: questions, and per question its positive then hard negatives.

  Arrays ``q_*`` have one row per question, ``p_*`` have ``1 + hard_negatives``
  rows per question. The question order is the training core's
  :class:`~rnr_jax.training.loop.EpochIterator`; hard negatives are drawn with a
  generator seeded by ``(seed, epoch, batch, process)``, so a resumed run sees the
  same batches. A hard negative is never one of the (process-local) batch's
  positives unless a question has no other, so no positive is also trained as a
  negative; two questions may still share their positive (questions about one
  paragraph, rare in a random batch).
  """

  def __init__(self, data: PreparedData, tokenizer: tk.Tokenizer, spec: retrieval.RetrieverSpec, *,
               splits: Sequence[str], hard_negatives: int, batch_size: int, max_questions: int, seed: int,
               holdout_tail: int = 0):
    self._tokenizer = tokenizer
    self._teacher: tuple[np.ndarray, np.ndarray] | None = None
    self._spec = spec
    self._hard_negatives = hard_negatives
    self._seed = seed
    self._corpus = data.token_corpus()
    self._questions: list[str] = []
    self._positives: list[np.ndarray] = []
    self._negatives: list[np.ndarray] = []
    for split in splits:
      cands = data.candidates(split)
      usable = cands.positives.lengths() > 0
      if hard_negatives:
        usable &= cands.hard_negatives.lengths() > 0
      if holdout_tail:  # the last questions stay unseen (e.g. to choose a merge scale on them)
        usable[max(len(usable) - holdout_tail, 0):] = False
      rows = np.flatnonzero(usable)[:max_questions or None]
      texts = data.questions(split)
      self._questions += [texts[q].question for q in rows]
      self._positives += [np.asarray(cands.positives[q]) for q in rows]
      self._negatives += [np.asarray(cands.hard_negatives[q]) for q in rows]
      logging.info("Training split %s: %d of %d questions have a positive%s.", split, len(rows), len(cands),
                   " and a hard negative" if hard_negatives else "")
    if len(self._questions) < batch_size:
      raise ValueError(f"{len(self._questions)} training questions in {list(splits)}, fewer than one batch "
                       f"of {batch_size}")
    self._order = loop.EpochIterator(lambda idx: {"index": idx}, len(self._questions), batch_size, seed=seed)

  @property
  def questions(self) -> list[str]:
    """The training questions, in the order of :meth:`set_teacher`'s question vectors."""
    return list(self._questions)

  def set_teacher(self, question_vectors: np.ndarray, passage_vectors: np.ndarray) -> None:
    """Adds the teacher's vectors to every batch: ``t_q [B, d]`` (of :attr:`questions`) and ``t_p [Bp, d]``
    (``passage_vectors`` indexed by passage id, e.g. a memory map of the corpus embeddings)."""
    if len(question_vectors) != len(self._questions):
      raise ValueError(f"{len(question_vectors)} teacher question vectors for {len(self._questions)} questions")
    self._teacher = (question_vectors, passage_vectors)

  def __iter__(self) -> RetrieverBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    idx = next(self._order)["index"]
    position = self._order.state()
    rng = np.random.default_rng([self._seed, position["epoch"], position["index"], jax.process_index()])
    taken = np.array([self._positives[i][0] for i in idx])
    pids = []
    for i in idx:
      pool = self._negatives[i]
      free = pool[~np.isin(pool, taken)]
      pos, negs = sample_retriever_passages(self._positives[i], free if len(free) else pool,
                                            self._hard_negatives, rng)
      pids += [pos, *negs.tolist()]
    spec = self._spec
    q = self._tokenizer.questions([self._questions[i] for i in idx], spec.question_len, spec.buckets)
    p = retrieval.passage_batch(self._tokenizer, [self._corpus[pid] for pid in pids], spec.passage_len,
                                spec.buckets, spec.passage_token_type)
    batch = {**{f"q_{k}": v for k, v in q.as_dict().items()}, **{f"p_{k}": v for k, v in p.as_dict().items()}}
    if self._teacher is not None:
      tq, tp = self._teacher
      batch["t_q"] = np.asarray(tq[idx], np.float32)
      batch["t_p"] = np.asarray(tp[np.asarray(pids)], np.float32)
    return batch

  def state(self) -> dict[str, int]:
    return self._order.state()

  def restore(self, state: Mapping[str, Any]) -> None:
    self._order.restore(state)


def _inputs(batch: Mapping[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
  return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def make_loss_fn(spec: retrieval.RetrieverSpec, scale: float, *, teacher_weight: float = 0.0,
                 teacher_temperature: float = 1.0, teacher_scale: float | None = None) -> LossFn:
  """``loss_fn(params, batch, rng)``: in-batch-negative NLL of each question's positive, with dropout.

  ``batch`` holds global arrays (``q_*``, ``p_*``, see :class:`RetrieverBatches`);
  every question is scored against every passage of the global batch. With
  ``spec.normalize`` the scores are cosine similarities times ``scale`` (their
  range [-1, 1] alone is too narrow for a softmax over the batch). With
  ``teacher_weight`` > 0 the batch also holds the teacher's vectors ``t_q``, ``t_p``
  and the loss adds ``teacher_weight`` x τ² x KL to the teacher's scores over the
  same passages (teacher scores: ``t_q . t_p`` x ``teacher_scale``, None = no scaling).
  """
  model = spec.build()

  def loss_fn(params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    q, p = model.apply({"params": params}, _inputs(batch, "q_"), _inputs(batch, "p_"), deterministic=False,
                       rngs={"dropout": rng})
    q, p = spec.finish(q), spec.finish(p)
    q = q * scale if spec.normalize else q
    nll, accuracy = losses.in_batch_nll(q, p)
    if not teacher_weight:
      return nll, {"in_batch_accuracy": accuracy}
    teacher = batch["t_q"] @ batch["t_p"].T * (teacher_scale or 1.0)
    student = jnp.einsum("qd,pd->qp", q, p, preferred_element_type=jnp.float32)
    kd = losses.kl_div(teacher, student, teacher_temperature) * teacher_temperature ** 2
    return nll + teacher_weight * kd, {"in_batch_accuracy": accuracy, "nll": nll, "teacher_kl": kd}

  return loss_fn


class Evaluator:
  """Top-k answer accuracy of the dev splits over the whole corpus; exports the best parameters.

  Called by the training loop as ``eval_fn(state, step)``. Metrics are
  ``<split>/top<k>`` and ``mean/top<k>`` (mean over splits), plus ``eval_s``.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, spec: retrieval.RetrieverSpec,
               data: PreparedData, tokenizer: tk.Tokenizer, mesh: jax.sharding.Mesh):
    rcfg = config.retriever
    self._spec = spec
    self._data = data
    self._tokenizer = tokenizer
    self._ks = tuple(int(k) for k in rcfg.eval_ks)
    self._splits = tuple(rcfg.eval_splits)
    self._export = retrieval.RetrieverExport(os.path.join(workdir, "best"))
    if not self._splits:  # no evaluation: every call (the last after the final step) exports the parameters
      if rcfg.save_embeddings:
        raise ValueError("retriever.save_embeddings needs retriever.eval_splits (the embeddings of an evaluation)")
      return
    names = {f"{s}/top{k}" for s in (*self._splits, "mean") for k in self._ks}
    if rcfg.select_metric not in names:
      raise ValueError(f"retriever.select_metric {rcfg.select_metric!r} is not one of {sorted(names)}")
    self._select = rcfg.select_metric
    self._max_questions = int(rcfg.max_eval_questions) or None
    q_fn, p_fn = spec.embed_fns()
    self._q_encoder = retrieval.BatchEncoder(q_fn, mesh, int(rcfg.encode_batch_size))
    self._p_encoder = retrieval.BatchEncoder(p_fn, mesh, int(rcfg.encode_batch_size))
    self._passage_ids = passage_filter.subset_ids(rcfg.subset, data.num_passages)
    corpus = data.token_corpus()
    self._records = corpus if self._passage_ids is None else [corpus[int(p)] for p in self._passage_ids]
    self._embeddings_dir = os.path.join(workdir, "embeddings") if rcfg.save_embeddings else None
    self._path = os.path.join(workdir, "eval.jsonl")
    exported = self._export.latest_info()
    self._best = exported["info"]["metrics"].get(self._select, -math.inf) if exported else -math.inf

  def __call__(self, state: TrainState, step: int) -> dict[str, float]:
    start = time.perf_counter()
    spec = self._spec
    if not self._splits:
      self._export.save(step, spec, state.params, {"metrics": {}, "select_metric": None})
      logging.info("Step %d: exported to %s (no evaluation: retriever.eval_splits is empty).", step,
                   self._export.directory)
      return {"export_s": time.perf_counter() - start}
    encoded = retrieval.encode_corpus(self._p_encoder, state.params, self._tokenizer, self._records,
                                      max_len=spec.passage_len, buckets=spec.buckets,
                                      token_type=spec.passage_token_type, progress=True)
    passages = encoded.vectors
    metrics: dict[str, float] = {}
    for split in self._splits:
      questions = self._data.questions(split)[:self._max_questions]
      q = retrieval.encode_questions(self._q_encoder, state.params, self._tokenizer,
                                     [x.question for x in questions], max_len=spec.question_len, buckets=spec.buckets)
      accuracy = retrieval.evaluate_retrieval(q, passages, [x.answers for x in questions], self._data.matcher(),
                                              self._ks, passage_ids=self._passage_ids)
      metrics.update({f"{split}/{name}": v for name, v in accuracy.items()})
    for k in self._ks:
      metrics[f"mean/top{k}"] = float(np.mean([metrics[f"{s}/top{k}"] for s in self._splits]))
    metrics["eval_s"] = time.perf_counter() - start
    best = metrics[self._select] > self._best
    if best:
      self._best = metrics[self._select]
      fingerprint = self._export.save(step, spec, state.params, {"metrics": metrics, "select_metric": self._select})
      if self._embeddings_dir and self._passage_ids is None and jax.process_index() == 0:
        corpus = self._data.token_corpus()
        # The keys infer.encode checks before reusing embeddings.
        retrieval.save_embeddings(self._embeddings_dir, passages, {
            "model_fingerprint": fingerprint, "corpus_sha256": corpus.meta["sha256"], "pooling": spec.pooling,
            "retrieval_dim": spec.retrieval_dim, "normalize": spec.normalize, "passage_len": spec.passage_len,
            "passage_token_type": spec.passage_token_type, "dim": spec.dim, "spec": spec.to_json(),
            "prepared": self._data.path, "devices": jax.device_count(),
            "passages_per_s": round(encoded.passages_per_s, 2), "step": step})
      logging.info("Step %d: new best %s %.4f, exported to %s.", step, self._select, self._best,
                   self._export.directory)
    append_eval(self._path, step, {**metrics, "best": best})
    return metrics

  def close(self) -> None:
    self._export.close()


def attach_teacher(batches: RetrieverBatches, rcfg: ml_collections.ConfigDict, data: PreparedData,
                   tokenizer: tk.Tokenizer, mesh: jax.sharding.Mesh) -> float | None:
  """Gives ``batches`` the teacher retriever's vectors (``retriever.teacher``, ``retriever.teacher_embeddings``);
  returns the scale of its scores (``retriever.scale`` when it normalises, else None)."""
  questions, passages, normalize = retrieval.teacher_vectors(
      rcfg.teacher, rcfg.teacher_embeddings, batches.questions, data, tokenizer, mesh, int(rcfg.encode_batch_size),
      field="retriever.teacher")
  batches.set_teacher(questions, passages)
  return float(rcfg.scale) if normalize else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains and evaluates the retriever of ``config`` in ``workdir`` (resuming if it holds checkpoints)."""
  rcfg = config.retriever
  workdir = loop.start_run(config, workdir)

  # Mesh: the training loop builds the same one from config.mesh; evaluation encodes on this one.
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.train.batch_size % retrieval.data_parallelism(mesh):
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by the "
                     f"{retrieval.data_parallelism(mesh)} data-parallel devices")

  # Input: prepared data, the model's input layout, resumable batches.
  data = load_prepared(config, workdir)
  tokenizer = tk.Tokenizer.from_pretrained(data.tokenizer_path)
  encoder_config, pretrained = retrieval.initial_encoder(config.model)
  if encoder_config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"the encoder's vocabulary ({encoder_config.vocab_size}) is smaller than the prepared "
                     f"data's tokenizer ({tokenizer.vocab_size}, {data.tokenizer_path})")
  spec = retrieval.RetrieverSpec.from_config(config, encoder_config, data.manifest["settings"]["tokenizer"])
  batches = RetrieverBatches(data, tokenizer, spec, splits=tuple(rcfg.train_splits),
                             hard_negatives=int(rcfg.hard_negatives), batch_size=int(config.train.batch_size),
                             max_questions=int(rcfg.max_train_questions), seed=int(config.train.seed),
                             holdout_tail=int(rcfg.holdout_tail))

  # Model: parameter init and the loss. Abstract shapes, shardings, the jitted init
  # (params born sharded), the step and the resume order are the training loop's.
  model = spec.build()

  def init_fn(rng: jax.Array) -> PyTree:
    return retrieval.initial_params(model, rng)

  load_pretrained = qa_model.pretrained_loader(pretrained)

  teacher_weight = float(rcfg.teacher_weight) if rcfg.teacher else 0.0
  teacher_scale = None
  if rcfg.teacher:
    teacher_scale = attach_teacher(batches, rcfg, data, tokenizer, mesh)
  loss_fn = make_loss_fn(spec, float(rcfg.scale), teacher_weight=teacher_weight,
                         teacher_temperature=float(rcfg.teacher_temperature), teacher_scale=teacher_scale)

  # Evals, then the loop.
  evaluator = Evaluator(config, workdir, spec, data, tokenizer, mesh)
  try:
    return loop.train_loop(config, workdir=workdir, init_fn=init_fn, loss_fn=loss_fn, data=batches,
                           eval_fn=evaluator, init_checkpoint=rcfg.init_checkpoint or None,
                           load_pretrained=load_pretrained)
  finally:
    evaluator.close()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
