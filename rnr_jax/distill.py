"""Training the unified retriever-reader: distillation (paper §2.2.3) and iterative finetuning (§2.2.4, Algorithm 1).

The unified model is one :class:`~rnr_jax.qa_model.RetrieverReader`: ``embed`` gives the retrieval vector (the
first d dims of the pooled output; questions ``[CLS] q [SEP]`` with token type 0, passages ``[CLS] title [SEP] text
[SEP]`` with token type 1) and ``read`` the start / end / passage-ranking logits of ``[CLS] q [SEP] title [SEP] text
[SEP]`` rows. Its retrieval settings are a unified :class:`~rnr_jax.qa_system.SystemSpec`, so an exported student is
served by :mod:`rnr_jax.qa_system` as it was trained.

**Training batches** (:class:`UnifiedBatches`): per question ``m`` passages from its candidate pool J_read
(:class:`TrainingPool`: the top-k1 passages of a retriever), exactly one answer-holding passage first and ``m - 1``
answer-free ones after it (DPR's ``has_answer``). A batch holds the reader rows (``input_ids`` ... ``[B*m, L]``,
``text_start/end``, ``passage_mask [B, m]``, span targets for finetuning), the question inputs ``q_* [B, Lq]`` and the
passage-only inputs ``p_* [B*m, Lp]`` whose vectors give the retrieval scores ``q . p_i`` of the m passages
(:func:`retrieval_scores`: questions and passages padded to one length and embedded in one encoder call).

**Distillation loss** (:func:`distill_loss`): ``L_read`` = KL(softmax(teacher/τ) || softmax(student/τ)) of the start
logits and of the end logits over the text positions of every real passage row, plus the KL of the m passage-ranking
logits; ``L_ret`` = the KL between the teacher ranker's m scores and the student's retrieval scores (``"kd"``, as in
appendix A.2), or the NLL of the positive among the m (``"nll"``). The four terms are summed without a τ² factor, as
the paper writes the loss (with Adam a constant factor on the whole loss changes almost nothing). ``"kd"`` needs a
teacher whose ranker separates the positive on the pool's negatives: a flat teacher ranking flattens the student's
retrieval scores too.

**Teacher cache** (:class:`TeacherCache`): the teacher never runs inside the student's step. For a pool, the m
passages of every (sample s, question i) are fixed in advance (``s < S = distill.cache_samples``; epoch e reads sample
``e mod S``), the teacher reads them once, and its logits go to float16 ``.npy`` memmaps under
``<workdir>/teacher_cache/<fingerprint>/``. The fingerprint covers the teacher's parameters and spec, the prepared
data, the input settings and the sampled passage ids (hence the pool, m, S and the sampling seed); any change makes a
new cache, a finished one is reused without calling the teacher. The teacher's parameters are thus neither
differentiated nor in any checkpoint: batches carry its outputs as data (``t_start``, ``t_end``, ``t_rank``).

**Iterative finetuning** (:func:`make_iterative_step`): Algorithm 1 as one jitted ``(state, batch, rng) -> (state,
metrics)`` step: (1) ``l`` = retrieval scores with θ(t) (a constant target); (2) θ̂ = optimiser update of θ(t) on the
reader loss (:func:`rnr_jax.reader.reader_loss`: marginal span NLL + ranking CE); (3) ``l̂`` = scores with θ̂; (4)
``L_recon`` = KL(softmax(l/τ) || softmax(l̂/τ)); (5) ``L_nll`` = CE of softmax(l̂) with the positive; (6) θ(t+1) =
update of θ̂ on ``L_recon + L_nll``. Steps (1) and (3) use the same dropout key, so ``l`` and ``l̂`` differ only through
the reader update. Optimiser state: ``"shared"`` (default) is one AdamW state that advances twice per step, as two
``optimizer.step()`` calls of one optimiser would (the learning-rate schedule then counts updates: 2 per step, warmup
doubled to match); ``"separate"`` keeps one AdamW state per update. :func:`make_joint_loss` is the simple alternative
(reader loss + retrieval NLL in one update).

**Fresh-index evaluation** (:class:`OpenEvaluator`, appendix A.5's future work): every evaluation encodes the corpus
with the current student (:class:`FreshIndex`), retrieves each dev question's top passages by exact search and reads
the top m' of them, for each m' of ``eval.passages``: ``em_open@m'``, their best ``em_open`` (appendix A.3) and mean
``em_open_mean`` (the selection metric of appendix A.2), plus the retrieval accuracy ``top<k>``. The best evaluation
is exported to ``<workdir>/best/`` and the ``eval.keep_best`` best ones to ``<workdir>/top/step_<step>/``
(:class:`TopExports`; each a :class:`~rnr_jax.reader_data.ParamsExport` that :func:`~rnr_jax.reader_data.load_reader`
and ``infer.export`` read, with the system spec and score scale in its ``model`` item, :func:`load_unified`).

**Index refresh** (beyond the paper; ``pool.refresh_every``): every that many steps the corpus and the training
questions are encoded by the current student and J_read is rebuilt from its top-k1 passages
(``<workdir>/pool/<step>.npz``; the data position in checkpoints names the pool in use, so a resumed run samples from
the same one). A question left without a positive or a negative keeps its initial lists. During distillation the
teacher then reads the new samples into a new cache (older caches are deleted).

:func:`train_loop` is the training core's loop (:func:`rnr_jax.training.loop.train_loop`: born-sharded state,
donated jitted step, resume order, metrics, evaluations, checkpoints) for a stage-supplied step function, with the
refresh hook.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from rnr_jax import passage_filter, qa_model, reader, retrieval
from rnr_jax import reader_data as rd
from rnr_jax import tokenization as tk
from rnr_jax.data import PreparedData
from rnr_jax.data.token_corpus import save_npy
from rnr_jax.io import atomic_write_json
from rnr_jax.metrics import answer_top_k_accuracy, exact_match
from rnr_jax.models import Params
from rnr_jax.qa_system import SystemSpec
from rnr_jax.training import checkpoint as ckpt_lib
from rnr_jax.training import losses
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from rnr_jax.training import loop as loop_lib
from rnr_jax.training.loop import EpochIterator, ResumableIterator
from rnr_jax.training.metrics_log import MetricsLogger, append_eval
from rnr_jax.training.optim import make_optimizer

PyTree = Any
Batch = Mapping[str, jax.Array]
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
RETRIEVAL_LOSSES = ("kd", "nll")
OPTIMIZER_STATES = ("shared", "separate")
CACHE_FORMAT = "rnr_jax.teacher_cache"
CACHE_VERSION = 1


# ---- model outputs --------------------------------------------------------------------


def _inputs(batch: Batch, prefix: str = "") -> dict[str, jax.Array]:
  return {k: batch[prefix + k] for k in ENCODER_INPUTS}


def _rngs(rng: jax.Array | None) -> dict[str, jax.Array]:
  return {} if rng is None else {"dropout": rng}


def score_passages(q: jax.Array, p: jax.Array, *, normalize: bool, scale: float) -> jax.Array:
  """Scores ``[B, m]`` of question vectors ``[B, d]`` against their passages ``[B, m, d]``.

  The inner product (paper §2.2.2), or ``scale`` x the cosine when the retriever normalises its vectors.
  """
  if normalize:
    q, p = retrieval.l2_normalize(q), retrieval.l2_normalize(p)
  scores = jnp.einsum("bd,bmd->bm", q, p, preferred_element_type=jnp.float32)
  return scores * scale if normalize else scores


def retrieval_vectors(model: qa_model.RetrieverReader, params: Params, batch: Batch, rng: jax.Array | None
                      ) -> tuple[jax.Array, jax.Array]:
  """Retrieval vectors of the questions ``[B, d]`` and of their passages ``[B * m, d]`` (``q_*`` / ``p_*`` inputs).

  Questions and passages are padded to one length and embedded in one encoder call (padding is masked, so the
  vectors are those of separate calls): one encoder in the compiled step instead of two. ``rng=None``: no dropout.
  """
  q, p = _inputs(batch, "q_"), _inputs(batch, "p_")
  length = max(q["input_ids"].shape[1], p["input_ids"].shape[1])
  rows = {k: jnp.concatenate([jnp.pad(x[k], ((0, 0), (0, length - x[k].shape[1]))) for x in (q, p)])
          for k in ENCODER_INPUTS}
  vectors = model.apply({"params": params}, rows, deterministic=rng is None, rngs=_rngs(rng), method="embed")
  num_q = batch["passage_mask"].shape[0]
  return vectors[:num_q], vectors[num_q:]


def retrieval_scores(model: qa_model.RetrieverReader, params: Params, batch: Batch, rng: jax.Array | None, *,
                     normalize: bool, scale: float) -> jax.Array:
  """Scores ``[B, m]`` of each question's m passages from the ``q_*`` and ``p_*`` inputs; ``rng=None``: no dropout."""
  q, p = retrieval_vectors(model, params, batch, rng)
  num_q, m = batch["passage_mask"].shape
  return score_passages(q, p.reshape(num_q, m, -1), normalize=normalize, scale=scale)


def score_in_batch(q: jax.Array, p: jax.Array, *, normalize: bool, scale: float) -> jax.Array:
  """Scores ``[B, B * m]`` of every question against every passage of the batch (``q [B, d]``, ``p [B * m, d]``)."""
  if normalize:
    q, p = retrieval.l2_normalize(q), retrieval.l2_normalize(p)
  scores = jnp.einsum("bd,pd->bp", q, p, preferred_element_type=jnp.float32)
  return scores * scale if normalize else scores


def own_scores(scores: jax.Array, m: int) -> jax.Array:
  """The ``[B, m]`` block of each question's own passages in in-batch scores ``[B, B * m]``."""
  num_q = scores.shape[0]
  return scores.reshape(num_q, num_q, m)[jnp.arange(num_q), jnp.arange(num_q)]


def in_batch_nll(scores: jax.Array, passage_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """NLL and top-1 accuracy of each question's positive (its first passage) among all real passages of the batch.

  ``scores [B, B * m]`` (:func:`score_in_batch`), ``passage_mask [B, m]``: the other questions' passages are
  negatives too, as DPR's in-batch negatives.
  """
  num_q, m = passage_mask.shape
  mask = passage_mask.reshape(1, num_q * m)
  positive = jnp.arange(num_q) * m
  log_p = reader.masked_log_softmax(scores, mask)
  nll = -jnp.mean(log_p[jnp.arange(num_q), positive])
  accuracy = jnp.mean(jnp.argmax(jnp.where(mask, scores, reader.NEG_INF), -1) == positive)
  return nll, accuracy


def read_outputs(model: qa_model.RetrieverReader, params: Params, batch: Batch, rng: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``start, end [B, m, L]``, ``rank [B, m]`` and the text-position mask ``valid [B, m, L]`` of the reader rows."""
  start, end, rank = model.apply({"params": params}, _inputs(batch), deterministic=rng is None, rngs=_rngs(rng),
                                 method="read")
  num_q, m = batch["passage_mask"].shape
  length = batch["input_ids"].shape[1]
  pos = jnp.arange(length)[None, :]
  valid = (pos >= batch["text_start"][:, None]) & (pos < batch["text_end"][:, None])
  shape = (num_q, m, length)
  return start.reshape(shape), end.reshape(shape), rank.reshape(num_q, m), valid.reshape(shape)


def read_fn(model: qa_model.RetrieverReader) -> retrieval.EmbedFn:
  """``(params, batch) -> [rows, 2L + 1]``: start logits, end logits and rank logit per row, for a BatchEncoder."""
  def read(params: Params, batch: dict[str, jax.Array]) -> jax.Array:
    start, end, rank = model.apply({"params": params}, batch, method="read")
    return jnp.concatenate([start, end, rank[:, None]], axis=1)
  return read


# ---- losses ---------------------------------------------------------------------------


def _positive_top1(scores: jax.Array, passage_mask: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(jnp.where(passage_mask, scores, reader.NEG_INF), -1) == 0)


def retrieval_nll(scores: jax.Array, passage_mask: jax.Array) -> jax.Array:
  """Mean NLL of the positive (index 0) among each question's real passages (``scores [B, m]``)."""
  return -jnp.mean(reader.masked_log_softmax(scores, passage_mask)[:, 0])


def distill_loss(start: jax.Array, end: jax.Array, rank: jax.Array, valid: jax.Array, passage_mask: jax.Array,
                 teacher_start: jax.Array, teacher_end: jax.Array, teacher_rank: jax.Array, scores: jax.Array, *,
                 temperature: float, retrieval_loss: str, read_weight: float = 1.0
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``read_weight x L_read + L_ret`` of paper §2.2.3 (module docstring) and its parts.

  Args:
    start, end, valid: the student's logits and text mask ``[B, m, L]``; rank: its ranking logits ``[B, m]``.
    passage_mask: ``[B, m]`` real passages.
    teacher_start, teacher_end: the teacher's logits, ``[B, m, L]`` or ``[B * m, L]``; teacher_rank: ``[B, m]``.
    scores: the student's retrieval scores ``[B, m]``.
    temperature: τ of every KL term.
    retrieval_loss: ``"kd"`` (KL to the teacher's ranking) or ``"nll"`` (of the positive).
    read_weight: the weight of L_read (the paper's loss: 1). Beyond the paper, τ² keeps the reading KL's
      gradient at the scale of a hard-label loss (Hinton et al.), which the softened KL otherwise loses by 1/τ²
      against L_ret. ``read_loss`` in the parts stays unweighted.
  """
  if retrieval_loss not in RETRIEVAL_LOSSES:
    raise ValueError(f"retrieval_loss must be one of {RETRIEVAL_LOSSES}, got {retrieval_loss!r}")
  rows = valid & passage_mask[..., None]
  start_kl = losses.kl_div(teacher_start.reshape(start.shape), start, temperature, rows)
  end_kl = losses.kl_div(teacher_end.reshape(end.shape), end, temperature, rows)
  rank_kl = losses.kl_div(teacher_rank, rank, temperature, passage_mask)
  if retrieval_loss == "kd":
    ret = losses.kl_div(teacher_rank, scores, temperature, passage_mask)
  else:
    ret = retrieval_nll(scores, passage_mask)
  read = start_kl + end_kl + rank_kl
  return read_weight * read + ret, {"start_kl": start_kl, "end_kl": end_kl, "rank_kl": rank_kl, "read_loss": read,
                      "retrieval_loss": ret, "retrieval_acc": _positive_top1(scores, passage_mask),
                      "rank_acc": _positive_top1(rank, passage_mask)}


def make_distill_loss(model: qa_model.RetrieverReader, *, normalize: bool, scale: float, temperature: float,
                      retrieval_loss: str, in_batch: bool = False, retriever_teacher_weight: float = 0.0,
                      retriever_teacher_temperature: float = 1.0, retriever_teacher_scale: float | None = None,
                      read_weight: float = 1.0, label_weight: float = 0.0,
                      embed_weight: float = 0.0) -> step_lib.LossFn:
  """``loss_fn(params, batch, rng)`` of distillation; the batch carries the teacher's cached outputs (``t_*``).

  Beyond the paper:

  * ``read_weight``: the weight of L_read (:func:`distill_loss`).
  * ``label_weight`` > 0: adds that weight x the hard-label reader loss (:func:`rnr_jax.reader.reader_loss`, the
    batch's span targets in each positive); the parts report it unweighted as ``label_loss``.
  * ``in_batch``: the ``"nll"`` retrieval loss ranks each positive among all passages of the batch (the other
    questions' passages as extra negatives, as in retriever training) instead of its own m.
  * ``retriever_teacher_weight`` > 0: adds that weight x τ'² x KL(softmax(t / τ') || softmax(s / τ')) between a
    teacher *retriever*'s scores ``t`` and the student's retrieval scores ``s`` over the batch's passages (all of
    them with ``in_batch``, else each question's m), τ' = ``retriever_teacher_temperature``. The batch then holds
    that retriever's vectors ``t_q [B, d]`` and ``t_p [B * m, d]``; its scores are ``t_q . t_p`` x
    ``retriever_teacher_scale`` (None: unscaled). The paper's L_ret distils the reader teacher's ranking, which
    is only useful when that ranker is strong; a two-encoder retriever is usually the better retrieval teacher.
  * ``embed_weight`` > 0 (needs the same teacher retriever's vectors): adds that weight x the mean of
    1 - cos(student vector, teacher vector) over the batch's questions and real passages, embedding matching
    (Kim et al., EmbedDistill, 2023): the teacher's whole vector, not only its scores over the batch's passages,
    so the student learns the teacher's geometry for the corpus it never sees in training. The student's
    retrieval vectors must be as wide as the teacher's; the parts report it unweighted as ``embed_loss``.
  """
  def loss_fn(params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    read_rng, ret_rng = jax.random.split(rng)
    start, end, rank, valid = read_outputs(model, params, batch, read_rng)
    q, p = retrieval_vectors(model, params, batch, ret_rng)
    mask = batch["passage_mask"]
    num_q, m = mask.shape
    if in_batch:
      everything = score_in_batch(q, p, normalize=normalize, scale=scale)
      scores = own_scores(everything, m)
    else:
      scores = score_passages(q, p.reshape(num_q, m, -1), normalize=normalize, scale=scale)
    loss, aux = distill_loss(start, end, rank, valid, mask, batch["t_start"], batch["t_end"], batch["t_rank"],
                             scores, temperature=temperature, retrieval_loss=retrieval_loss,
                             read_weight=read_weight)
    if label_weight:
      label, label_aux = reader.reader_loss(start, end, rank, valid, batch["span_starts"], batch["span_ends"],
                                            batch["span_mask"], mask)
      loss = loss + label_weight * label
      aux = {**aux, "label_loss": label, "span_loss": label_aux["span_loss"]}
    if in_batch and retrieval_loss == "nll":
      nll, accuracy = in_batch_nll(everything, mask)
      loss = loss - aux["retrieval_loss"] + nll
      aux = {**aux, "retrieval_loss": nll, "in_batch_acc": accuracy}
    if retriever_teacher_weight:
      teacher = jnp.einsum("bd,pd->bp", batch["t_q"], batch["t_p"], preferred_element_type=jnp.float32)
      teacher = teacher * retriever_teacher_scale if retriever_teacher_scale else teacher
      tau = retriever_teacher_temperature
      if in_batch:
        kd = losses.kl_div(teacher, everything, tau, mask.reshape(1, num_q * m))
      else:
        kd = losses.kl_div(own_scores(teacher, m), scores, tau, mask)
      kd = kd * tau ** 2
      loss = loss + retriever_teacher_weight * kd
      aux = {**aux, "retriever_kd": kd}
    if embed_weight:
      if q.shape[-1] != batch["t_q"].shape[-1]:
        raise ValueError(f"distill.embed_weight matches the student's {q.shape[-1]}-d retrieval vectors to the "
                         f"teacher retriever's {batch['t_q'].shape[-1]}-d ones: set model.retrieval_dim to "
                         f"{batch['t_q'].shape[-1]} (0 = the encoder's width)")
      embed = embedding_distance(q, p, batch["t_q"], batch["t_p"], mask.reshape(-1))
      loss = loss + embed_weight * embed
      aux = {**aux, "embed_loss": embed}
    return loss, aux
  return loss_fn


def embedding_distance(q: jax.Array, p: jax.Array, t_q: jax.Array, t_p: jax.Array, passage_mask: jax.Array
                       ) -> jax.Array:
  """Mean of 1 - cos between student and teacher vectors over the ``[B]`` questions and the real passages.

  ``q``, ``t_q``: ``[B, d]``; ``p``, ``t_p``: ``[B * m, d]``; ``passage_mask``: ``[B * m]`` (padding rows, whose
  teacher vectors are zero, do not count).
  """
  cos = lambda a, b: jnp.sum(retrieval.l2_normalize(a.astype(jnp.float32)) * retrieval.l2_normalize(
      b.astype(jnp.float32)), -1)
  weights = jnp.concatenate([jnp.ones(q.shape[:1], jnp.float32), passage_mask.astype(jnp.float32)])
  distance = 1.0 - jnp.concatenate([cos(q, t_q), cos(p, t_p)])
  return jnp.sum(weights * distance) / jnp.sum(weights)


def _reader_loss(model: qa_model.RetrieverReader, params: Params, batch: Batch, rng: jax.Array | None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  start, end, rank, valid = read_outputs(model, params, batch, rng)
  loss, aux = reader.reader_loss(start, end, rank, valid, batch["span_starts"], batch["span_ends"],
                                 batch["span_mask"], batch["passage_mask"])
  return loss, {**aux, "read_loss": loss}


def make_joint_loss(model: qa_model.RetrieverReader, *, normalize: bool, scale: float) -> step_lib.LossFn:
  """``loss_fn`` of joint finetuning: the reader loss plus the retrieval NLL of the positive, one update."""
  def loss_fn(params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    read_rng, ret_rng = jax.random.split(rng)
    read, aux = _reader_loss(model, params, batch, read_rng)
    scores = retrieval_scores(model, params, batch, ret_rng, normalize=normalize, scale=scale)
    nll = retrieval_nll(scores, batch["passage_mask"])
    return read + nll, {**aux, "retrieval_nll": nll, "retrieval_acc": _positive_top1(scores, batch["passage_mask"])}
  return loss_fn


# ---- Algorithm 1 ------------------------------------------------------------------------


def iterative_optimizer(optim_cfg: Any, num_steps: int, optimizer_states: str
                        ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser of iterative finetuning and its schedule over *updates* (two per step with a shared state)."""
  if optimizer_states not in OPTIMIZER_STATES:
    raise ValueError(f"optimizer_states must be one of {OPTIMIZER_STATES}, got {optimizer_states!r}")
  if optimizer_states == "separate":
    return make_optimizer(optim_cfg, num_steps)
  doubled = optim_cfg.copy_and_resolve_references()
  doubled.warmup_steps = 2 * int(optim_cfg.warmup_steps)
  return make_optimizer(doubled, 2 * num_steps)


def init_iterative_state(params: Params, optimizer: optax.GradientTransformation, optimizer_states: str
                         ) -> step_lib.TrainState:
  """Step 0 of Algorithm 1: one optimiser state, or ``{"read": ..., "retrieval": ...}``."""
  if optimizer_states == "shared":
    return step_lib.TrainState.create(params, optimizer)
  return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state={"read": optimizer.init(params), "retrieval": optimizer.init(params)})


def _accumulated(fn: Callable[[Batch, jax.Array, Any], tuple[PyTree, Any]], params: Params, batch: Batch,
                 rng: jax.Array, grad_accum: int, extra: Any = None) -> tuple[PyTree, Any]:
  """Mean gradients and stacked outputs of ``fn(batch, rng, extra) -> (grads, outputs)`` over micro-batches.

  ``grad_accum == 1``: ``fn`` sees the whole batch, ``rng`` and ``extra[0]``. Else micro-batch ``i`` (the training
  core's :func:`~rnr_jax.training.step.split_microbatches`) sees ``fold_in(rng, i)`` and ``extra[i]``, under
  ``lax.scan``. Outputs get a leading micro-batch axis either way.
  """
  if grad_accum == 1:
    grads, out = fn(batch, rng, None if extra is None else jax.tree.map(lambda x: x[0], extra))
    return grads, jax.tree.map(lambda x: x[None], out)

  def body(carry: PyTree, xs: tuple[jax.Array, Batch, Any]) -> tuple[PyTree, Any]:
    i, micro, ex = xs
    grads, out = fn(micro, jax.random.fold_in(rng, i), ex)
    return jax.tree.map(jnp.add, carry, grads), out

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  grads, outs = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), step_lib.split_microbatches(batch, grad_accum),
                                           extra))
  return jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grads, params), outs


def make_iterative_step(model: qa_model.RetrieverReader, optimizer: optax.GradientTransformation, *,
                        normalize: bool, scale: float, temperature: float, optimizer_states: str = "shared",
                        grad_accum: int = 1, schedule: optax.Schedule | None = None) -> step_lib.StepFn:
  """One iterative finetuning step (paper Algorithm 1, module docstring) as ``(state, batch, rng) -> (state, metrics)``.

  The step's key is ``fold_in(rng, state.step)``; its first split drives the reader's dropout, its second the
  retrieval forward passes of both steps (1) and (3). The batch needs span targets (positive first).
  Metrics: the reader loss and parts (update 1), ``recon_loss``, ``retrieval_nll``, ``retrieval_acc`` (update 2),
  ``loss`` (their sum), both gradient norms, ``param_norm`` and ``lr``.
  """
  if optimizer_states not in OPTIMIZER_STATES:
    raise ValueError(f"optimizer_states must be one of {OPTIMIZER_STATES}, got {optimizer_states!r}")

  def scores_of(params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
    return retrieval_scores(model, params, batch, rng, normalize=normalize, scale=scale)

  def retrieval_objective(params: Params, batch: Batch, rng: jax.Array, target: jax.Array
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    scores = scores_of(params, batch, rng)
    recon = losses.kl_div(target, scores, temperature, batch["passage_mask"])
    nll = retrieval_nll(scores, batch["passage_mask"])
    return recon + nll, {"recon_loss": recon, "retrieval_nll": nll,
                         "retrieval_acc": _positive_top1(scores, batch["passage_mask"])}

  def train_step(state: step_lib.TrainState, batch: Batch, base_rng: jax.Array
                 ) -> tuple[step_lib.TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(base_rng, state.step)
    theta = state.params
    if optimizer_states == "shared":
      read_opt = state.opt_state
    else:
      read_opt, retrieval_opt = state.opt_state["read"], state.opt_state["retrieval"]

    # (1) l(t) with θ(t), a constant target; (2) θ̂(t) = update of θ(t) on the reader loss.
    def read_pass(micro: Batch, r: jax.Array, _: Any) -> tuple[PyTree, Any]:
      read_rng, ret_rng = jax.random.split(r)
      target = jax.lax.stop_gradient(scores_of(theta, micro, ret_rng))
      (loss, aux), grads = jax.value_and_grad(lambda p: _reader_loss(model, p, micro, read_rng), has_aux=True)(theta)
      return grads, (target, loss, aux)

    read_grads, (targets, read_losses, read_aux) = _accumulated(read_pass, theta, batch, rng, grad_accum)
    updates, read_opt = optimizer.update(read_grads, read_opt, theta)
    theta_hat = optax.apply_updates(theta, updates)

    # (3)-(5) l̂(t) with θ̂(t), L_recon + L_nll; (6) θ(t+1) = update of θ̂(t).
    def retrieval_pass(micro: Batch, r: jax.Array, target: jax.Array) -> tuple[PyTree, Any]:
      _, ret_rng = jax.random.split(r)
      (loss, aux), grads = jax.value_and_grad(retrieval_objective, has_aux=True)(theta_hat, micro, ret_rng, target)
      return grads, (loss, aux)

    ret_grads, (ret_losses, ret_aux) = _accumulated(retrieval_pass, theta_hat, batch, rng, grad_accum, targets)
    if optimizer_states == "shared":
      updates, opt_state = optimizer.update(ret_grads, read_opt, theta_hat)
    else:
      updates, retrieval_opt = optimizer.update(ret_grads, retrieval_opt, theta_hat)
      opt_state = {"read": read_opt, "retrieval": retrieval_opt}
    params = optax.apply_updates(theta_hat, updates)

    metrics = {**jax.tree.map(jnp.mean, read_aux), **jax.tree.map(jnp.mean, ret_aux),
               "loss": read_losses.mean() + ret_losses.mean(), "read_grad_norm": optax.tree.norm(read_grads),
               "retrieval_grad_norm": optax.tree.norm(ret_grads), "param_norm": optax.tree.norm(params)}
    if schedule is not None:
      metrics["lr"] = schedule(state.step * (2 if optimizer_states == "shared" else 1))
    return step_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


# ---- the fresh index ------------------------------------------------------------------


class FreshIndex:
  """Exact search over the corpus encoded by a model's current parameters, encoded at most once per step.

  Shared by the evaluation and the pool refresh of one step, and used once with a retriever export for the
  initial pool. With ``passage_ids`` (e.g. the passage filter's subset) only those passages are indexed.
  """

  def __init__(self, question_fn: retrieval.EmbedFn, passage_fn: retrieval.EmbedFn, spec: retrieval.RetrieverSpec,
               tokenizer: tk.Tokenizer, corpus: Sequence[np.ndarray], mesh: jax.sharding.Mesh, batch_size: int,
               passage_ids: np.ndarray | None = None, cache_dir: str | None = None):
    self._spec = spec
    self._cache_dir = cache_dir
    self._tokenizer = tokenizer
    self._passage_ids = None if passage_ids is None else np.asarray(passage_ids, np.int64)
    self._corpus = corpus if passage_ids is None else [corpus[int(p)] for p in self._passage_ids]
    # The passage id of each row (the key of the kept encoding).
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
      if self._cache_dir:
        save_cached_vectors(self._cache_dir, self._vectors, params, self._row_ids)
    q = retrieval.encode_questions(self._questions, params, self._tokenizer, questions, max_len=spec.question_len,
                                   buckets=spec.buckets)
    ids, _ = retrieval.search_exact(q, self._vectors, k)
    if self._passage_ids is not None:
      ids = self._passage_ids[ids]
    return np.pad(ids.astype(np.int32), ((0, 0), (0, k - ids.shape[1])), constant_values=rd.NO_PASSAGE)


VECTORS_FILE, VECTORS_KEY_FILE = "vectors.npy", "vectors.json"


def _vectors_key(params: Params, passage_ids: np.ndarray) -> dict[str, str]:
  return {"params": retrieval.params_fingerprint(params),
          "passage_ids": hashlib.sha256(np.ascontiguousarray(passage_ids, np.int64).tobytes()).hexdigest()}


def save_cached_vectors(directory: str, vectors: np.ndarray, params: Params, passage_ids: np.ndarray) -> None:
  """Keeps the latest fresh-index encoding (``vectors.npy`` + its key) so that a later evaluation or export of the
  same parameters over the same passages reuses it instead of encoding the corpus again."""
  key = _vectors_key(params, passage_ids)
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  key_path = os.path.join(directory, VECTORS_KEY_FILE)
  if os.path.exists(key_path):
    os.remove(key_path)  # the key goes last: a half-written pair is never taken as valid
  save_npy(os.path.join(directory, VECTORS_FILE), np.asarray(vectors, np.float32))
  atomic_write_json(key_path, key)


def load_cached_vectors(directory: str, params: Params, passage_ids: np.ndarray) -> np.ndarray | None:
  """The vectors :func:`save_cached_vectors` kept for exactly these parameters and passages, else None."""
  key_path = os.path.join(directory, VECTORS_KEY_FILE)
  if not os.path.isfile(key_path):
    return None
  with open(key_path, encoding="utf-8") as f:
    if json.load(f) != _vectors_key(params, passage_ids):
      return None
  vectors = np.load(os.path.join(directory, VECTORS_FILE))
  return vectors if vectors.shape[0] == len(passage_ids) else None


# ---- the candidate pool ---------------------------------------------------------------


class TrainingPool:
  """J_read of the training questions: each question's top-k1 passages, as positives and negatives.

  Pools are ranked candidates files ``<directory>/<step>.npz`` (:func:`rnr_jax.reader_data.save_ranked`) with a
  ``<step>.json`` key: step 0 is the initial pool, a refreshed pool is named after the step it was built at. The
  examples (questions with a positive and a negative in the initial pool, the first ``max_questions`` of each
  split) are fixed by the initial pool, so example indices stay valid across refreshes.
  """

  def __init__(self, data: PreparedData, tokenizer: tk.Tokenizer, directory: str, splits: Sequence[str], k1: int,
               max_questions: int = 0):
    self.directory = directory
    self.split_names = tuple(splits)
    self.k1 = k1
    self._data = data
    self._tokenizer = tokenizer
    self._max_questions = max_questions
    self.step = -1
    self.splits: list[rd.ReaderSplit] = []
    self._initial: list[rd.ReaderSplit] = []
    self.examples = np.zeros((0, 2), np.int64)

  def __len__(self) -> int:
    return len(self.examples)

  def _path(self, step: int, ext: str) -> str:
    return os.path.join(self.directory, f"{step}.{ext}")

  def has(self, step: int, key: Mapping[str, Any]) -> bool:
    """Whether pool ``step`` exists and was built with ``key``."""
    if not os.path.exists(self._path(step, "npz")) or not os.path.exists(self._path(step, "json")):
      return False
    with open(self._path(step, "json"), encoding="utf-8") as f:
      return json.load(f) == json.loads(json.dumps(dict(key)))

  def write(self, step: int, ranking: Mapping[str, np.ndarray], key: Mapping[str, Any]) -> None:
    """Saves pool ``step`` (rankings of every training split, cut to k1; process 0 writes)."""
    if jax.process_index() == 0:
      rd.save_ranked(self._path(step, "npz"), {s: np.asarray(ranking[s])[:, : self.k1] for s in self.split_names})
      atomic_write_json(self._path(step, "json"), dict(key))
    multihost_utils.sync_global_devices("rnr_jax.distill.TrainingPool.write")

  def load(self, step: int) -> None:
    """Makes pool ``step`` current; the initial pool (step 0) is loaded first."""
    if not self._initial and step != 0:
      self.load(0)
    splits = [rd.load_reader_split(self._data, s, self._tokenizer, self._path(step, "npz"), self.k1)
              for s in self.split_names]
    if not self._initial:
      self._initial = splits
      self.examples = np.asarray([(s, q) for s, split in enumerate(splits)
                                  for q in split.trainable()[: self._max_questions or None]], np.int64).reshape(-1, 2)
    else:
      splits = [self._merged(new, old) for new, old in zip(splits, self._initial)]
    self.splits, self.step = splits, step
    logging.info("Candidate pool %d (top %d): %d training questions.", step, self.k1, len(self.examples))

  @staticmethod
  def _merged(new: rd.ReaderSplit, initial: rd.ReaderSplit) -> rd.ReaderSplit:
    """``new`` where a question has a positive and a negative, else the initial lists."""
    usable = [len(p) > 0 and len(n) > 0 for p, n in zip(new.positives, new.negatives)]
    return rd.ReaderSplit(new.questions, new.question_ids, new.answer_ids, new.ranked,
                          [p if ok else q for p, q, ok in zip(new.positives, initial.positives, usable)],
                          [n if ok else q for n, q, ok in zip(new.negatives, initial.negatives, usable)])

  def sample(self, i: int, s: int, m: int, seed: int) -> np.ndarray:
    """Sample ``s`` of example ``i``: ``m`` passage ids, a positive first (drawn from ``(seed, pool, s, i)``)."""
    split, q = self.examples[i]
    rng = np.random.default_rng([seed, self.step, s, int(i)])
    return self.splits[split].training_passages(int(q), m, rng)

  def question(self, i: int) -> tuple[str, np.ndarray, list[np.ndarray]]:
    """``(text, token ids, answer token ids)`` of example ``i``."""
    split, q = self.examples[i]
    s = self.splits[split]
    return s.questions[q].question, s.question_ids[q], s.answer_ids[q]

  def question_texts(self) -> dict[str, list[str]]:
    """Every question of each training split (refreshes rank them all)."""
    return {name: [q.question for q in self._data.questions(name)] for name in self.split_names}


def data_fingerprint(data: PreparedData) -> str:
  """sha256 of what a prepared directory was built from (its manifest's sources and settings)."""
  manifest = {"settings": data.manifest["settings"], "sources": data.manifest["sources"]}
  return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def initial_ranking(pool_cfg: Any, data: PreparedData, tokenizer: tk.Tokenizer, mesh: jax.sharding.Mesh | None
                    ) -> tuple[dict[str, Any], Callable[[], dict[str, np.ndarray]]]:
  """``(key, compute)`` of the initial pool's rankings, from ``pool.candidates``, ``pool.retriever`` or BM25.

  ``compute()`` gives ``{split: int32 [Q, k]}``; ``key`` identifies the result, so a restart reuses a saved pool
  without encoding the corpus again. ``mesh`` encodes with a retriever (None: on the first device).
  """
  splits = tuple(pool_cfg.train_splits)
  key: dict[str, Any] = {"splits": list(splits), "k1": int(pool_cfg.k1), "data": data_fingerprint(data)}
  subset = pool_cfg.get("subset") or ""
  if subset:
    with open(subset, "rb") as f:
      key["subset"] = hashlib.sha256(f.read()).hexdigest()
  if pool_cfg.candidates and pool_cfg.retriever:
    raise ValueError("set pool.candidates or pool.retriever, not both")
  if pool_cfg.candidates:
    with open(pool_cfg.candidates, "rb") as f:
      key.update(source="candidates", sha256=hashlib.sha256(f.read()).hexdigest())
    return key, lambda: {s: rd.ranked_pids(data, s, pool_cfg.candidates) for s in splits}
  if pool_cfg.retriever:
    export = retrieval.RetrieverExport(pool_cfg.retriever)
    info = export.latest_info()
    export.close()
    if info is None:
      raise FileNotFoundError(f"{pool_cfg.retriever}: no exported retriever")
    key.update(source="retriever", fingerprint=info["fingerprint"])

    def compute() -> dict[str, np.ndarray]:
      spec, params, _ = retrieval.load_retriever(pool_cfg.retriever, mesh)
      if spec.tokenizer_fingerprint != data.manifest["settings"]["tokenizer"]:
        raise ValueError(f"{pool_cfg.retriever} was trained with another tokenizer than {data.path}'s")
      index = FreshIndex(*spec.embed_fns(), spec, tokenizer, data.token_corpus(), mesh,
                         int(pool_cfg.encode_batch_size), passage_filter.subset_ids(subset, data.num_passages))
      return {s: index.search(params, 0, [q.question for q in data.questions(s)], int(pool_cfg.k1)) for s in splits}

    return key, compute
  key.update(source="bm25")
  return key, lambda: {s: np.asarray(data.candidates(s).bm25_pids, np.int32) for s in splits}


def load_pool(pool_cfg: Any, data: PreparedData, tokenizer: tk.Tokenizer, workdir: str,
              mesh: jax.sharding.Mesh | None) -> TrainingPool:
  """The stage's :class:`TrainingPool` in ``<workdir>/pool``, its initial pool built (or found) and loaded."""
  pool = TrainingPool(data, tokenizer, os.path.join(workdir, "pool"), pool_cfg.train_splits, int(pool_cfg.k1),
                      int(pool_cfg.max_train_questions))
  key, compute = initial_ranking(pool_cfg, data, tokenizer, mesh)
  if not pool.has(0, key):
    logging.info("Building the initial candidate pool from %s.", key["source"])
    pool.write(0, compute(), key)
  pool.load(0)
  return pool


# ---- the teacher and its cache --------------------------------------------------------


class Teacher:
  """The reader teacher: loaded once on first use, replicated on ``mesh``, never part of a student's state."""

  def __init__(self, directory: str, mesh: jax.sharding.Mesh, rows_per_call: int):
    self.directory = directory
    self._mesh = mesh
    self._rows = rows_per_call
    self._loaded: tuple[Params, retrieval.BatchEncoder] | None = None
    self._spec: rd.ReaderSpec | None = None
    self._fingerprint: str | None = None

  def _load(self) -> tuple[Params, retrieval.BatchEncoder]:
    if self._loaded is None:
      self._spec, model, params, _ = rd.load_reader(self.directory, self._mesh)
      self._loaded = params, retrieval.BatchEncoder(read_fn(model), self._mesh, self._rows)
      logging.info("Loaded the reader teacher from %s.", self.directory)
    return self._loaded

  @property
  def spec(self) -> rd.ReaderSpec:
    """The teacher's reader spec (kept after :meth:`release`)."""
    if self._spec is None:
      self._load()
    return self._spec

  def fingerprint(self) -> str:
    """sha256 of the teacher's parameters (kept after :meth:`release`)."""
    if self._fingerprint is None:
      self._fingerprint = retrieval.params_fingerprint(self._load()[0])
    return self._fingerprint

  def __call__(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``start, end [rows, L]`` and ``rank [rows]`` logits of a reader batch (numpy)."""
    params, encoder = self._load()
    rows, length = batch["input_ids"].shape
    out = encoder(params, [(np.arange(rows), tk.EncodedBatch(*(batch[k] for k in ENCODER_INPUTS)))], rows)
    return out[:, :length], out[:, length : 2 * length], out[:, 2 * length]

  def release(self) -> None:
    """Drops the parameters (loaded again if called again)."""
    self._loaded = None


InputsFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
TeacherFn = Callable[[Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray, np.ndarray]]


class TeacherCache:
  """The teacher's outputs on fixed passage samples: float16 ``.npy`` memmaps in ``<root>/<fingerprint>/``.

  Files: ``key.json``; ``pids.npy`` int32 ``[S, N, m]`` (sample, example, passage); ``start.npy`` and ``end.npy``
  float16 ``[S, N, m, W]`` (logits at positions ``< W`` = the reader length, which holds every text position);
  ``rank.npy`` float16 ``[S, N, m]``; ``progress.json`` (rows done) while building, ``done.json`` when complete. An
  interrupted build continues where it stopped.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.pids = np.load(os.path.join(directory, "pids.npy"), mmap_mode="r")
    self._start = np.load(os.path.join(directory, "start.npy"), mmap_mode="r")
    self._end = np.load(os.path.join(directory, "end.npy"), mmap_mode="r")
    self._rank = np.load(os.path.join(directory, "rank.npy"), mmap_mode="r")

  @staticmethod
  def fingerprint(key: Mapping[str, Any], pids: np.ndarray) -> str:
    """sha256 of ``key`` and the sampled passage ids."""
    h = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode())
    h.update(f"{pids.dtype.str}{pids.shape}".encode())
    h.update(np.ascontiguousarray(pids).tobytes())
    return h.hexdigest()

  @classmethod
  def open_or_build(cls, root: str, key: Mapping[str, Any], pids: np.ndarray, width: int, inputs: InputsFn,
                    teacher: TeacherFn, questions_per_call: int) -> TeacherCache:
    """The cache of ``key`` and ``pids [S, N, m]``: opened if complete, else built (or finished) first.

    Args:
      root: directory of the caches; other caches in it are deleted once this one is complete.
      key: what the teacher's outputs depend on besides ``pids`` (teacher fingerprint, data, input settings).
      pids: sampled passage ids of every (sample, example).
      width: positions kept per row (the reader input length).
      inputs: ``(example indices [n], pids [n, m]) -> reader batch`` of :func:`rnr_jax.reader_data.reader_batch`.
      teacher: reader batch -> ``(start [rows, L], end [rows, L], rank [rows])``.
      questions_per_call: examples per teacher call.
    """
    pids = np.asarray(pids, np.int32)
    samples, num, m = pids.shape
    directory = os.path.join(root, cls.fingerprint(key, pids)[:32])
    if os.path.exists(os.path.join(directory, "done.json")):
      logging.info("Teacher outputs found in %s.", directory)
      return cls(directory)
    writer = jax.process_index() == 0
    progress_path = os.path.join(directory, "progress.json")
    if writer:
      os.makedirs(directory, exist_ok=True)
      if not os.path.exists(progress_path):
        np.save(os.path.join(directory, "pids.npy"), pids)
        for name, shape in (("start", (samples, num, m, width)), ("end", (samples, num, m, width)),
                            ("rank", (samples, num, m))):
          np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), "w+", np.float16, shape).flush()
        atomic_write_json(os.path.join(directory, "key.json"), {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                                                "shape": [samples, num, m, width], **dict(key)})
        atomic_write_json(progress_path, {"done": 0})
    multihost_utils.sync_global_devices("rnr_jax.distill.TeacherCache.create")
    with open(progress_path, encoding="utf-8") as f:
      done = int(json.load(f)["done"])
    arrays = {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r+" if writer else "r")
              for name in ("start", "end", "rank")}
    flat_pids = pids.reshape(samples * num, m)
    total = samples * num
    t = time.perf_counter()
    logging.info("Teacher reading %d questions x %d passages (%d done) into %s.", total, m, done, directory)
    for first in range(done, total, questions_per_call):
      rows = np.arange(first, min(first + questions_per_call, total))
      s, i = np.divmod(rows, num)
      batch = inputs(i, flat_pids[rows])
      start, end, rank = teacher(batch)
      if writer:
        length = start.shape[1]
        for name, x in (("start", start), ("end", end)):
          x = x.reshape(len(rows), m, length)[..., :width]
          arrays[name][s, i, :, : x.shape[-1]] = x.astype(np.float16)
          arrays[name][s, i, :, x.shape[-1]:] = 0
        arrays["rank"][s, i] = rank.reshape(len(rows), m).astype(np.float16)
        for a in arrays.values():
          a.flush()
        atomic_write_json(progress_path, {"done": int(rows[-1]) + 1})
    if writer:
      atomic_write_json(os.path.join(directory, "done.json"), {"seconds": time.perf_counter() - t})
      os.remove(progress_path)
      for other in os.listdir(root):
        if other != os.path.basename(directory):
          shutil.rmtree(os.path.join(root, other), ignore_errors=True)
    multihost_utils.sync_global_devices("rnr_jax.distill.TeacherCache.done")
    return cls(directory)

  def lookup(self, sample: int, examples: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """``t_start, t_end`` float16 ``[B * m, length]`` and ``t_rank [B, m]`` of ``examples`` in ``sample``."""
    out = {}
    for name, x in (("t_start", self._start), ("t_end", self._end)):
      x = np.asarray(x[sample, examples])
      width = x.shape[-1]
      x = x[..., :length] if length <= width else np.pad(x, ((0, 0), (0, 0), (0, length - width)))
      out[name] = x.reshape(-1, length)
    out["t_rank"] = np.asarray(self._rank[sample, examples])
    return out


# ---- batches --------------------------------------------------------------------------


class UnifiedBatches:
  """Resumable batches of the unified model: reader rows, question and passage inputs (module docstring).

  The question order is the training core's :class:`~rnr_jax.training.loop.EpochIterator`; example ``i`` in epoch
  ``e`` reads sample ``e mod S`` of its passages with a teacher cache (distillation), else sample ``e`` (drawn
  fresh every epoch). The data position (``epoch``, ``index``, ``seed``, ``pool_step``) makes a resumed run see the
  same batches.
  """

  def __init__(self, pool: TrainingPool, tokenizer: tk.Tokenizer, corpus: Sequence[np.ndarray], system: SystemSpec,
               *, m: int, batch_size: int, seed: int, max_spans: int = 0, samples: int = 0,
               teacher_cache: Callable[[np.ndarray, InputsFn], TeacherCache] | None = None):
    """
    Args:
      pool: the candidate pool (its current pool is used).
      tokenizer, corpus: build the inputs from token-ID records.
      system: input lengths and the passages' token type.
      m: passages per question.
      batch_size: global questions per step.
      seed: data order and passage sampling seed.
      max_spans: answer spans kept as targets in the positive (0: no span targets).
      samples: S, passage samples per example cached (with ``teacher_cache``).
      teacher_cache: ``(pids [S, N, m], inputs) -> TeacherCache`` for the current pool, called on its first batch.
    """
    if teacher_cache is not None and samples < 1:
      raise ValueError(f"a teacher cache needs samples >= 1, got {samples}")
    self._pool = pool
    self._tokenizer = tokenizer
    self._corpus = corpus
    self._system = system
    self._m = m
    self._seed = seed
    self._max_spans = max_spans
    self._samples = samples
    self._teacher_cache = teacher_cache
    self._cache: TeacherCache | None = None
    self._retriever_teacher: tuple[np.ndarray, np.ndarray] | None = None
    self._order = EpochIterator(lambda idx: {"index": idx}, len(pool), batch_size, seed=seed)

  def __iter__(self) -> UnifiedBatches:
    return self

  @property
  def questions(self) -> list[str]:
    """The text of every example (the pool's training questions), in the order of :meth:`set_retriever_teacher`."""
    return [self._pool.question(i)[0] for i in range(len(self._pool))]

  def set_retriever_teacher(self, question_vectors: np.ndarray, passage_vectors: np.ndarray) -> None:
    """Adds a teacher retriever's vectors to every batch: ``t_q [B, d]`` (rows of ``question_vectors``, one per
    example of :attr:`questions`) and ``t_p [B * m, d]`` (``passage_vectors`` indexed by passage id, e.g. a memory
    map of its corpus embeddings; zeros for missing passages)."""
    if len(question_vectors) != len(self._pool):
      raise ValueError(f"{len(question_vectors)} teacher question vectors for {len(self._pool)} training questions")
    if question_vectors.shape[1:] != passage_vectors.shape[1:]:
      raise ValueError(f"teacher question vectors {question_vectors.shape} and passage vectors "
                       f"{passage_vectors.shape} differ in width")
    self._retriever_teacher = (np.asarray(question_vectors, np.float32), passage_vectors)

  def use_pool(self, step: int) -> None:
    """Samples from pool ``step`` from the next batch on."""
    if step != self._pool.step:
      self._pool.load(step)
      self._cache = None

  def reader_inputs(self, examples: np.ndarray, pids: np.ndarray, spans: bool = False) -> dict[str, np.ndarray]:
    """Reader rows of ``examples`` with passages ``pids [n, m]`` (:func:`rnr_jax.reader_data.reader_batch`)."""
    reader_spec = self._system.reader
    qs = [self._pool.question(int(i)) for i in examples]
    return rd.reader_batch(self._tokenizer, self._corpus, [q[1] for q in qs], pids,
                           [q[2] for q in qs] if spans else None, max_len=reader_spec.reader_len,
                           buckets=reader_spec.buckets, question_len=reader_spec.question_len,
                           max_answer_len=reader_spec.max_answer_len, max_spans=self._max_spans)

  def _cache_of_pool(self) -> TeacherCache:
    if self._cache is None:
      pids = np.stack([np.stack([self._pool.sample(i, s, self._m, self._seed) for i in range(len(self._pool))])
                       for s in range(self._samples)])
      self._cache = self._teacher_cache(pids, self.reader_inputs)
    return self._cache

  def __next__(self) -> dict[str, np.ndarray]:
    idx = next(self._order)["index"]
    epoch = self._order.state()["epoch"]
    if self._teacher_cache is not None:
      cache, sample = self._cache_of_pool(), epoch % self._samples
      pids = np.asarray(cache.pids[sample, idx])
    else:
      pids = np.stack([self._pool.sample(int(i), epoch, self._m, self._seed) for i in idx])
    batch = self.reader_inputs(idx, pids, spans=self._max_spans > 0)
    r = self._system.retriever
    q = self._tokenizer.questions([self._pool.question(int(i))[0] for i in idx], r.question_len, r.buckets)
    records = [self._corpus[p] if p != rd.NO_PASSAGE else np.zeros(0, np.int32) for p in pids.reshape(-1).tolist()]
    p = retrieval.passage_batch(self._tokenizer, records, r.passage_len, r.buckets, r.passage_token_type)
    batch.update({f"q_{k}": v for k, v in q.as_dict().items()})
    batch.update({f"p_{k}": v for k, v in p.as_dict().items()})
    if self._teacher_cache is not None:
      batch.update(cache.lookup(sample, idx, batch["input_ids"].shape[1]))
    if self._retriever_teacher is not None:
      tq, tp = self._retriever_teacher
      flat = pids.reshape(-1)
      t_p = np.asarray(tp[np.maximum(flat, 0)], np.float32)
      t_p[flat == rd.NO_PASSAGE] = 0.0
      batch.update(t_q=tq[np.asarray(idx)], t_p=t_p)
    return batch

  def state(self) -> dict[str, int]:
    return {**self._order.state(), "pool_step": self._pool.step}

  def restore(self, state: Mapping[str, Any]) -> None:
    self._order.restore(state)
    self.use_pool(int(state["pool_step"]))


class PoolRefresher:
  """Rebuilds J_read from the current student's top-k1 passages (the index refresh, module docstring)."""

  def __init__(self, pool: TrainingPool, batches: UnifiedBatches, index: FreshIndex):
    self._pool = pool
    self._batches = batches
    self._index = index

  def __call__(self, state: step_lib.TrainState, step: int) -> None:
    t = time.perf_counter()
    ranking = {s: self._index.search(state.params, step, texts, self._pool.k1)
               for s, texts in self._pool.question_texts().items()}
    self._pool.write(step, ranking, {"source": "refresh", "step": step, "k1": self._pool.k1})
    self._batches.use_pool(step)
    logging.info("Step %d: refreshed the candidate pool in %.1fs.", step, time.perf_counter() - t)


# ---- evaluation and exports -----------------------------------------------------------


def export_info(system: SystemSpec, scale: float) -> dict[str, Any]:
  """The ``model`` item of an exported student (besides metrics): reader spec, system spec and score scale."""
  return {"reader": system.reader.to_json(), "system": system.to_json(), "scale": scale}


def load_unified(directory: str, mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[SystemSpec, float, Params, dict[str, Any]]:
  """``(system, scale, params, model item)`` of an exported student (``<workdir>/best`` of these stages)."""
  _, _, params, info = rd.load_reader(directory, mesh)
  if "system" not in info:
    raise ValueError(f"{directory}: an exported reader, not a unified retriever-reader (no system spec)")
  return SystemSpec.from_json(info["system"]), float(info["scale"]), params, info


class TopExports:
  """The parameters of the ``keep`` best evaluations by ``select``: ParamsExports ``<directory>/step_<step>/``."""

  def __init__(self, directory: str, keep: int, select: str):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = directory
    self._keep = keep
    self._select = select

  def steps(self) -> dict[int, float]:
    """The exported steps and their ``select`` metric."""
    found = {}
    if os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        export = rd.ParamsExport(os.path.join(self.directory, name))
        info = export.latest_info()
        export.close()
        if info is not None:
          found[int(info["step"])] = float(info["metrics"][self._select])
    return found

  def update(self, step: int, params: Params, model: Mapping[str, Any]) -> bool:
    """Exports ``step`` (``model["metrics"]`` holds its metrics) if among the best; drops the worst. Collective."""
    top = self.steps()
    stale = [s for s in top if s >= step]  # left by a run resumed from an earlier checkpoint
    kept = sorted(((v, s) for s, v in top.items() if s < step), key=lambda vs: (-vs[0], vs[1]))
    value = float(model["metrics"][self._select])
    added = len(kept) < self._keep or value > kept[self._keep - 1][0]
    dropped = stale
    if added:
      export = rd.ParamsExport(os.path.join(self.directory, f"step_{step}"))  # replaces a stale export of step
      export.save(step, params, model)
      export.close()
      dropped = [s for s in stale if s != step] + [s for _, s in kept[self._keep - 1:]]
    if jax.process_index() == 0:
      for s in dropped:
        shutil.rmtree(os.path.join(self.directory, f"step_{s}"), ignore_errors=True)
    return added


class OpenEvaluator:
  """Dev exact match of the student with its own fresh index (module docstring); exports the best evaluations.

  Called by the loop as ``eval_fn(state, step)``; lines go to ``<workdir>/eval.jsonl``.
  """

  def __init__(self, eval_cfg: Any, workdir: str, system: SystemSpec, scale: float, data: PreparedData,
               tokenizer: tk.Tokenizer, index: FreshIndex, mesh: jax.sharding.Mesh):
    self._system = system
    self._info = export_info(system, scale)
    self._data = data
    self._tokenizer = tokenizer
    self._index = index
    self._counts = tuple(sorted(int(n) for n in eval_cfg.passages))
    self._ks = tuple(sorted(int(k) for k in eval_cfg.ks))
    self._rule = eval_cfg.answer_rule
    self._batch = int(eval_cfg.batch_size)
    self._questions = data.questions(eval_cfg.split)[: int(eval_cfg.questions) or None]
    self._question_ids = tokenizer.encode_texts([q.question for q in self._questions])
    self._is_continuation = reader.continuation_table(tokenizer.vocab())
    names = {"em_open", "em_open_mean", *(f"em_open@{n}" for n in self._counts), *(f"top{k}" for k in self._ks)}
    if eval_cfg.select_metric not in names:
      raise ValueError(f"eval.select_metric {eval_cfg.select_metric!r} is not one of {sorted(names)}")
    self._select = eval_cfg.select_metric
    keep = int(eval_cfg.keep_best)
    self._top = TopExports(os.path.join(workdir, "top"), keep, self._select) if keep else None
    self._reader = retrieval.BatchEncoder(read_fn(system.reader.build()), mesh, self._batch * self._counts[-1])
    self._path = os.path.join(workdir, "eval.jsonl")
    self._best_export = rd.ParamsExport(os.path.join(workdir, "best"))
    exported = self._best_export.latest_info()
    self._best = exported["metrics"][self._select] if exported else -np.inf

  def evaluate(self, params: Params, step: int) -> dict[str, float]:
    """``em_open@n``, ``em_open``, ``em_open_mean`` and ``top<k>`` of ``params`` with a fresh index."""
    t = time.perf_counter()
    texts = [q.question for q in self._questions]
    ranked = self._index.search(params, step, texts, max(self._counts[-1], self._ks[-1]))
    metrics: dict[str, float] = {"index_s": time.perf_counter() - t}
    answers = [q.answers for q in self._questions]
    accuracy = answer_top_k_accuracy([r[r != rd.NO_PASSAGE] for r in ranked], answers, self._data.matcher(),
                                     self._ks)
    metrics.update({f"top{k}": v for k, v in accuracy.items()})
    spec = self._system.reader
    predictions: dict[int, list[str]] = {n: [] for n in self._counts}
    for first in range(0, len(self._questions), self._batch):
      qs = np.arange(first, min(first + self._batch, len(self._questions)))
      pids = ranked[qs, : self._counts[-1]]
      batch = rd.reader_batch(self._tokenizer, self._data.token_corpus(), [self._question_ids[q] for q in qs], pids,
                              max_len=spec.reader_len, buckets=spec.buckets, question_len=spec.question_len,
                              max_answer_len=spec.max_answer_len, max_spans=1)
      rows, length = batch["input_ids"].shape
      out = self._reader(params, [(np.arange(rows), tk.EncodedBatch(*(batch[k] for k in ENCODER_INPUTS)))], rows)
      for n in self._counts:
        predictions[n] += rd.predict_answers(self._tokenizer, self._is_continuation, self._data.passages.texts,
                                             batch, pids, out[:, :length], out[:, length : 2 * length],
                                             out[:, 2 * length], n, max_answer_len=spec.max_answer_len,
                                             rule=self._rule)
    for n in self._counts:
      metrics[f"em_open@{n}"] = float(np.mean([exact_match(p, a) for p, a in zip(predictions[n], answers)]))
    ems = [metrics[f"em_open@{n}"] for n in self._counts]
    metrics["em_open"], metrics["em_open_mean"] = max(ems), float(np.mean(ems))
    return metrics

  def __call__(self, state: step_lib.TrainState, step: int) -> dict[str, float]:
    start = time.perf_counter()
    metrics = self.evaluate(state.params, step)
    metrics["eval_s"] = time.perf_counter() - start
    best = metrics[self._select] > self._best
    if best:
      self._best = metrics[self._select]
      self._best_export.save(step, state.params, {**self._info, "metrics": metrics, "select_metric": self._select})
      logging.info("Step %d: new best %s %.4f, exported to %s.", step, self._select, self._best,
                   self._best_export.directory)
    if self._top is not None:
      self._top.update(step, state.params, {**self._info, "metrics": metrics, "select_metric": self._select})
    append_eval(self._path, step, {**metrics, "best": best})
    return metrics

  def close(self) -> None:
    self._best_export.close()


# ---- the loop -------------------------------------------------------------------------


def train_loop(config: Any, *, workdir: str, init_fn: Callable[[jax.Array], PyTree],
               new_state: Callable[[PyTree], step_lib.TrainState], step_fn: step_lib.StepFn, data: ResumableIterator,
               eval_fn: Callable[[step_lib.TrainState, int], Mapping[str, Any]],
               refresh: Callable[[step_lib.TrainState, int], None] | None = None, refresh_every: int = 0,
               load_pretrained: Callable[[PyTree], PyTree] | None = None) -> step_lib.TrainState:
  """:func:`rnr_jax.training.loop.train_loop` with a given step function and optimiser state, and a refresh hook.

  Args:
    config: ``mesh``, ``optim`` and ``train`` sections.
    workdir: ``<workdir>/checkpoints``, ``<workdir>/metrics.jsonl``.
    init_fn: ``rng -> params``.
    new_state: ``params -> TrainState`` at step 0 (creates the optimiser state).
    step_fn: ``(state, batch, rng) -> (state, metrics)``; jitted with the state's shardings, the state donated.
    data: process-local batches with ``state()`` / ``restore()``.
    eval_fn: ``(state, step) -> metrics``, every ``train.eval_every`` steps and after the last.
    refresh: ``(state, step)``, after the evaluation of every ``refresh_every``-th step but the last, before the
      checkpoint (whose data position then names the new pool).
    load_pretrained: initial parameters of a fresh run (``params -> params``).
  """
  train_cfg = config.train
  total_steps = int(train_cfg.num_steps)
  mesh = mesh_lib.make_mesh(config.mesh)
  init_rng, base_rng = jax.random.split(loop_lib.make_key(train_cfg))
  abstract_state = jax.eval_shape(lambda rng: new_state(init_fn(rng)), init_rng)
  shardings = mesh_lib.param_shardings(abstract_state, mesh, config.mesh.rules)

  # Parameters and optimiser state are born sharded.
  init_params = jax.jit(init_fn, out_shardings=shardings.params)
  create_state = jax.jit(new_state, in_shardings=(shardings.params,), out_shardings=shardings)
  train_step = step_lib.jit_train_step(step_fn, shardings, mesh_lib.batch_sharding(mesh))

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=int(train_cfg.ckpt_every),
                                       max_to_keep=int(train_cfg.keep_ckpts), async_save=bool(train_cfg.async_ckpt))
  start = ckpt_lib.restore_or_initialize(
      checkpointer, mesh_lib.with_shardings(abstract_state, shardings), rng=base_rng,
      init_params=lambda: init_params(init_rng), create_state=create_state, load_pretrained=load_pretrained)
  state, rng = start.state, jax.device_put(start.rng, mesh_lib.replicated(mesh))
  if start.data_state is not None:
    data.restore(start.data_state)
  start_step = int(state.step)
  logging.info("Starting at step %d from %s; mesh %s; %d parameters.", start_step, start.source, dict(mesh.shape),
               sum(x.size for x in jax.tree.leaves(abstract_state.params)))

  logger = MetricsLogger(workdir, total_steps=total_steps, batch_size=int(train_cfg.batch_size),
                         start_step=start_step)
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = mesh_lib.make_global_batch(next(data), mesh)
      state, metrics = train_step(state, batch, rng)
      last = step == total_steps
      save = last or checkpointer.should_save(step)
      if save or step == start_step + 1 or step % train_cfg.log_every == 0:
        logger.log_train(step, metrics)
      if last or step % train_cfg.eval_every == 0:
        logger.log_eval(step, eval_fn(state, step))
      if refresh is not None and refresh_every and step % refresh_every == 0 and not last:
        refresh(state, step)
      if save:
        checkpointer.save(step, state, rng, data.state())
  finally:
    checkpointer.close()
    logger.close()
  return state
