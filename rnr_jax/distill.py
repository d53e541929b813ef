"""The unified retriever-reader's training outputs and the distillation loss (paper §2.2.3): ``L_read``, the KL of
start, end and ranking logits at temperature τ, plus ``L_ret`` (docs/design.md, "Distillation loss")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rnr_jax import qa_model
from rnr_jax.reader import NEG_INF
from rnr_jax.tokenization import ENCODER_INPUTS
from rnr_jax.training import losses
from rnr_jax.training.step import LossFn

Params = Any
Batch = Mapping[str, jax.Array]
RETRIEVAL_LOSSES = ("kd", "nll")


def _inputs(batch: Batch, prefix: str = "") -> dict[str, jax.Array]:
  return {k: batch[prefix + k] for k in ENCODER_INPUTS}


def _rngs(rng: jax.Array | None) -> dict[str, jax.Array]:
  return {} if rng is None else {"dropout": rng}


def score(q: jax.Array, p: jax.Array, *, normalize: bool, scale: float) -> jax.Array:
  """Scores of question vectors ``[B, d]`` against every passage ``[P, d] -> [B, P]``, or against each question's
  own ``[B, m, d] -> [B, m]``: the inner product (paper §2.2.2), or ``scale`` x the cosine when normalising."""
  if normalize:
    q, p = qa_model.l2_normalize(q), qa_model.l2_normalize(p)
  scores = jnp.einsum("bd,pd->bp" if p.ndim == 2 else "bd,bmd->bm", q, p, preferred_element_type=jnp.float32)
  return scores * scale if normalize else scores


def own_scores(scores: jax.Array, m: int) -> jax.Array:
  """The ``[B, m]`` block of each question's own passages in in-batch scores ``[B, B * m]``."""
  num_q = scores.shape[0]
  return scores.reshape(num_q, num_q, m)[jnp.arange(num_q), jnp.arange(num_q)]


def retrieval_vectors(model: qa_model.RetrieverReader, params: Params, batch: Batch, rng: jax.Array | None
                      ) -> tuple[jax.Array, jax.Array]:
  """Retrieval vectors of the questions ``[B, d]`` and their passages ``[B * m, d]``, embedded in one encoder call
  (padding is masked, so the vectors are those of separate calls); ``rng=None``: no dropout."""
  q, p = _inputs(batch, "q_"), _inputs(batch, "p_")
  length = max(q["input_ids"].shape[1], p["input_ids"].shape[1])  # one padded length: one encoder call
  rows = {k: jnp.concatenate([jnp.pad(x[k], ((0, 0), (0, length - x[k].shape[1]))) for x in (q, p)])
          for k in ENCODER_INPUTS}
  vectors = model.apply({"params": params}, rows, deterministic=rng is None, rngs=_rngs(rng), method="embed")
  num_q = batch["passage_mask"].shape[0]
  return vectors[:num_q], vectors[num_q:]


def retrieval_scores(model: qa_model.RetrieverReader, params: Params, batch: Batch, rng: jax.Array | None, *,
                     normalize: bool, scale: float) -> jax.Array:
  """Scores ``[B, m]`` of each question's m passages (``rng=None``: no dropout)."""
  q, p = retrieval_vectors(model, params, batch, rng)
  num_q, m = batch["passage_mask"].shape
  return score(q, p.reshape(num_q, m, -1), normalize=normalize, scale=scale)


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


def masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(jnp.where(mask, logits.astype(jnp.float32), NEG_INF), axis=-1)


def span_mml_loss(start_logits: jax.Array, end_logits: jax.Array, valid: jax.Array,
                  starts: jax.Array, ends: jax.Array, span_mask: jax.Array) -> jax.Array:
  """Per-row ``-log sum_{gold spans} P_start(s) P_end(e)``, 0 without a gold span."""
  lp = (jnp.take_along_axis(masked_log_softmax(start_logits, valid), starts, -1)
        + jnp.take_along_axis(masked_log_softmax(end_logits, valid), ends, -1))
  return jnp.where(span_mask.any(-1), -jax.nn.logsumexp(jnp.where(span_mask, lp, NEG_INF), axis=-1), 0.0)


def read_loss(start_logits: jax.Array, end_logits: jax.Array, rank_logits: jax.Array,
              valid: jax.Array, starts: jax.Array, ends: jax.Array, span_mask: jax.Array,
              passage_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPR's reader loss (paper §2.2.3): mean ranking CE of the positive (first) passage + the marginal NLL of its
  gold spans, and its parts; logits ``[B, m, L]``, rank logits ``[B, m]``, spans ``[B, S]``."""
  if passage_mask is None:
    passage_mask = jnp.ones(rank_logits.shape, bool)
  rank_loss = -masked_log_softmax(rank_logits, passage_mask)[:, 0]
  span_loss = span_mml_loss(start_logits[:, 0], end_logits[:, 0], valid[:, 0], starts, ends, span_mask)
  loss = jnp.mean(rank_loss + span_loss)
  return loss, {"rank_loss": rank_loss.mean(), "span_loss": span_loss.mean(),
                "rank_acc": positive_top1(rank_logits, passage_mask)}


def reader_loss(model: qa_model.RetrieverReader, params: Params, batch: Batch, rng: jax.Array | None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`read_loss` on the batch's span targets."""
  start, end, rank, valid = read_outputs(model, params, batch, rng)
  loss, aux = read_loss(start, end, rank, valid, batch["span_starts"], batch["span_ends"], batch["span_mask"],
                        batch["passage_mask"])
  return loss, {**aux, "read_loss": loss}


def positive_top1(scores: jax.Array, passage_mask: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(jnp.where(passage_mask, scores, NEG_INF), -1) == 0)


def retrieval_nll(scores: jax.Array, passage_mask: jax.Array) -> jax.Array:
  """Mean NLL of the positive (index 0) among each question's real passages (``scores [B, m]``)."""
  return -jnp.mean(masked_log_softmax(scores, passage_mask)[:, 0])


def distill_loss(start: jax.Array, end: jax.Array, rank: jax.Array, valid: jax.Array, passage_mask: jax.Array,
                 teacher_start: jax.Array, teacher_end: jax.Array, teacher_rank: jax.Array, scores: jax.Array, *,
                 temperature: float, retrieval_loss: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``L_read + L_ret`` (module docstring) and its parts; the teacher's logits are ``[B, m, L]`` or ``[B * m, L]``."""
  if retrieval_loss not in RETRIEVAL_LOSSES:
    raise ValueError(f"retrieval_loss must be one of {RETRIEVAL_LOSSES}, got {retrieval_loss!r}")
  rows = valid & passage_mask[..., None]  # padding passages and non-text positions leave the KL
  start_kl = losses.kl_div(teacher_start.reshape(start.shape), start, temperature, rows)
  end_kl = losses.kl_div(teacher_end.reshape(end.shape), end, temperature, rows)
  rank_kl = losses.kl_div(teacher_rank, rank, temperature, passage_mask)
  if retrieval_loss == "kd":
    ret = losses.kl_div(teacher_rank, scores, temperature, passage_mask)
  else:
    ret = retrieval_nll(scores, passage_mask)
  read = start_kl + end_kl + rank_kl
  return read + ret, {"start_kl": start_kl, "end_kl": end_kl, "rank_kl": rank_kl, "read_loss": read,
                      "retrieval_loss": ret, "retrieval_acc": positive_top1(scores, passage_mask),
                      "rank_acc": positive_top1(rank, passage_mask)}


def make_distill_loss(model: qa_model.RetrieverReader, *, normalize: bool, scale: float, temperature: float,
                      retrieval_loss: str, in_batch: bool = False, retriever_teacher_weight: float = 0.0,
                      retriever_teacher_scale: float | None = None) -> LossFn:
  """``loss_fn(params, batch, rng)`` of distillation, the batch carrying the teacher's cached outputs (``t_*``);
  ``in_batch`` and ``retriever_teacher_weight``: docs/design.md, "Distillation loss"."""
  def loss_fn(params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    read_rng, ret_rng = jax.random.split(rng)  # reading and retrieval passes draw different dropout
    start, end, rank, valid = read_outputs(model, params, batch, read_rng)
    q, p = retrieval_vectors(model, params, batch, ret_rng)
    mask = batch["passage_mask"]
    num_q, m = mask.shape
    if in_batch:
      everything = score(q, p, normalize=normalize, scale=scale)
      scores = own_scores(everything, m)
    else:
      scores = score(q, p.reshape(num_q, m, -1), normalize=normalize, scale=scale)
    loss, aux = distill_loss(start, end, rank, valid, mask, batch["t_start"], batch["t_end"], batch["t_rank"],
                             scores, temperature=temperature, retrieval_loss=retrieval_loss)
    if in_batch and retrieval_loss == "nll":
      nll, accuracy = losses.in_batch_nll(everything, mask.reshape(1, num_q * m))
      loss = loss - aux["retrieval_loss"] + nll  # the in-batch NLL replaces the per-question one
      aux = {**aux, "retrieval_loss": nll, "in_batch_acc": accuracy}
    if retriever_teacher_weight:
      teacher = jnp.einsum("bd,pd->bp", batch["t_q"], batch["t_p"], preferred_element_type=jnp.float32)
      teacher = teacher * retriever_teacher_scale if retriever_teacher_scale else teacher  # on the student's scale
      if in_batch:
        kd = losses.kl_div(teacher, everything, 1.0, mask.reshape(1, num_q * m))
      else:
        kd = losses.kl_div(own_scores(teacher, m), scores, 1.0, mask)
      loss = loss + retriever_teacher_weight * kd
      aux = {**aux, "retriever_kd": kd}
    return loss, aux
  return loss_fn
