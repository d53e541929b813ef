"""AdamW with warmup / decay, global-norm clipping, frozen subtrees and a learning-rate multiple for the task heads (the
``optim`` config section)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rnr_jax.training.mesh import tree_map_with_names

PyTree = Any
# Pytree of bools like the parameters (True = trained), or a function params -> such a tree.
Mask = PyTree | Callable[[PyTree], PyTree]

# Parameters without weight decay: biases and normalisation parameters (Flax names
# LayerNorm's parameters 'scale' and 'bias'), as in BERT's AdamW recipe.
NO_DECAY_REGEX = r"(.*/)?(bias|scale)"
# The task heads on top of a pretrained encoder: the reader's span (qa_outputs) and ranking (qa_classifier) layers.
HEAD_REGEX = r"(.*/)?(qa_outputs|qa_classifier)/.*"


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, then linear decay to 0 at ``total_steps`` or constant."""
  lr = float(optim_cfg.lr)
  warmup = int(optim_cfg.warmup_steps)
  kind = optim_cfg.schedule
  if kind not in ("linear", "constant"):
    raise ValueError(f"optim.schedule must be 'linear' or 'constant', got {kind!r}")
  if kind == "linear" and total_steps <= warmup:
    raise ValueError(f"linear schedule needs total_steps ({total_steps}) > warmup_steps ({warmup})")

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    factor = jnp.minimum(1.0, step / warmup) if warmup > 0 else jnp.ones_like(step)
    if kind == "linear":
      factor = jnp.minimum(factor, jnp.maximum(0.0, (total_steps - step) / (total_steps - warmup)))
    return lr * factor

  return schedule


def regex_mask(regex: str, params: PyTree, *, match: bool = True) -> PyTree:
  """Tree of bools: whether each parameter path fully matches ``regex`` (or not, if ``match=False``)."""
  return tree_map_with_names(lambda name, _: bool(re.fullmatch(regex, name)) == match, params)


def make_optimizer(optim_cfg: Any, total_steps: int, trainable_mask: Mask | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``(optimizer, schedule)``: AdamW with clipping and warmup; ``trainable_mask`` (a pytree of bools, or a
  function of the params) freezes False leaves: no update, no decay, no part in the clipping norm."""
  schedule = make_schedule(optim_cfg, total_steps)
  head_mult = float(optim_cfg.get("head_lr_mult", 1.0))
  if head_mult <= 0:
    raise ValueError(f"optim.head_lr_mult must be > 0, got {head_mult}")

  def adamw(lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay,
                       mask=lambda params: regex_mask(NO_DECAY_REGEX, params, match=False))

  def trained(params: PyTree) -> PyTree:
    if trainable_mask is None:
      return jax.tree.map(lambda _: True, params)
    return trainable_mask(params) if callable(trainable_mask) else trainable_mask

  clip = [optax.clip_by_global_norm(float(optim_cfg.clip_norm))] if optim_cfg.clip_norm else []
  if head_mult == 1.0:
    # One AdamW for every trained parameter (the optimiser state layout of earlier checkpoints).
    optimizer = optax.chain(*clip, adamw(schedule))
    if trainable_mask is not None:
      optimizer = optax.multi_transform(
          {"trainable": optimizer, "frozen": optax.set_to_zero()},
          lambda params: jax.tree.map(lambda t: "trainable" if t else "frozen", trained(params)))
    return optimizer, schedule

  # Heads at head_mult x the encoder's rate: a freshly initialised layer on a pretrained encoder moves at most
  # ~lr per Adam step, so at BERT-finetuning rates a few hundred steps leave it near its random init.
  head_regex = optim_cfg.get("head_regex", HEAD_REGEX)

  def head_schedule(step: jax.Array) -> jax.Array:
    return head_mult * schedule(step)

  def group_labels(params: PyTree) -> PyTree:
    return jax.tree.map(lambda t, h: ("head" if h else "body") if t else "frozen",
                        trained(params), regex_mask(head_regex, params))

  # Frozen gradients are zeroed before clipping, so they do not count in the global norm.
  optimizer = optax.chain(
      optax.masked(optax.set_to_zero(), lambda params: jax.tree.map(lambda t: not t, trained(params))), *clip,
      optax.multi_transform({"body": adamw(schedule), "head": adamw(head_schedule),
                             "frozen": optax.set_to_zero()}, group_labels))
  return optimizer, schedule
