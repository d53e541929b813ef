"""Losses shared by the training stages, in float32 whatever the input dtype; means, so a batch split into equal
micro-batches gives the same loss on average."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED_LOGIT = -1e9


def in_batch_nll(scores: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """DPR's in-batch NLL and top-1 accuracy of each question's positive (first of its ``P/B`` rows) among all
  ``scores [B, P]`` of the global batch; ``mask [1, P]`` leaves padding out (docs/design.md, "Sharding")."""
  num_q, num_p = scores.shape
  if num_p % num_q:
    raise ValueError(f"{num_p} passages are not a multiple of {num_q} questions")
  positive = jnp.arange(num_q) * (num_p // num_q)
  scores = scores.astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, _MASKED_LOGIT)
  log_probs = jax.nn.log_softmax(scores, axis=-1)
  nll = -jnp.mean(log_probs[jnp.arange(num_q), positive])
  return nll, jnp.mean(jnp.argmax(scores, axis=-1) == positive)


def kl_div(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0,
           mask: jax.Array | None = None) -> jax.Array:
  """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)), the teacher constant; ``mask`` leaves
  entries out, and rows without one out of the mean."""
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  if mask is not None:
    # A large finite value rather than -inf keeps fully masked rows (and their
    # gradients) finite; their probabilities underflow to exactly 0.
    mask = jnp.broadcast_to(mask, s.shape)
    t = jnp.where(mask, t, _MASKED_LOGIT)
    s = jnp.where(mask, s, _MASKED_LOGIT)
  log_pt = jax.nn.log_softmax(t, axis=-1)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  p_t = jnp.exp(log_pt)
  # Entries with p_t = 0 contribute 0, also where the caller's logits are -inf.
  kl = jnp.where(p_t > 0, p_t * (log_pt - log_ps), 0.0).sum(-1)
  if mask is None:
    return kl.mean()
  rows = mask.any(axis=-1).astype(kl.dtype)
  return (kl * rows).sum() / jnp.maximum(rows.sum(), 1.0)
