"""Iterative finetuning of the unified retriever-reader: paper §2.2.4, Algorithm 1, as one jitted step.

Its six steps and the shared AdamW state that advances twice per step: docs/design.md, "Iterative finetuning"."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from rnr_jax import distill, qa_model
from rnr_jax.training import losses
from rnr_jax.training.optim import make_optimizer
from rnr_jax.training.step import Batch, Step, TrainState, accumulate

Params = Any


def iterative_step(config: Any, model: qa_model.RetrieverReader, *, normalize: bool, scale: float) -> Step:
  """Algorithm 1's step for a stage config; ``fold_in(rng, step)``'s first split drives the reader's dropout, its
  second the retrieval passes (1) and (3), so ``l`` and ``l̂`` differ only through the reader update."""
  doubled = config.optim.copy_and_resolve_references()
  doubled.warmup_steps = 2 * int(config.optim.warmup_steps)  # two updates per step
  optimizer, schedule = make_optimizer(doubled, 2 * int(config.train.num_steps))
  temperature, grad_accum = float(config.finetune.temperature), int(config.optim.grad_accum)

  def scores_of(params: Params, batch: Batch, rng: jax.Array) -> jax.Array:
    return distill.retrieval_scores(model, params, batch, rng, normalize=normalize, scale=scale)

  def retrieval_objective(params: Params, batch: Batch, rng: jax.Array, target: jax.Array
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    scores = scores_of(params, batch, rng)
    recon = losses.kl_div(target, scores, temperature, batch["passage_mask"])
    nll = distill.retrieval_nll(scores, batch["passage_mask"])
    return recon + nll, {"recon_loss": recon, "retrieval_nll": nll,
                         "retrieval_acc": distill.positive_top1(scores, batch["passage_mask"])}

  def update(state: TrainState, batch: Batch, base_rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(base_rng, state.step)
    theta = state.params

    # (1) l(t) with θ(t), a constant target; (2) θ̂(t) = update of θ(t) on the reader loss.
    def read_pass(micro: Batch, r: jax.Array, _: Any) -> tuple[Params, Any]:
      read_rng, ret_rng = jax.random.split(r)
      target = jax.lax.stop_gradient(scores_of(theta, micro, ret_rng))  # (1) is a constant target
      (loss, aux), grads = jax.value_and_grad(
          lambda p: distill.reader_loss(model, p, micro, read_rng), has_aux=True)(theta)
      return grads, (target, loss, aux)

    read_grads, (targets, read_losses, read_aux) = accumulate(read_pass, theta, batch, rng, grad_accum)
    updates, opt_state = optimizer.update(read_grads, state.opt_state, theta)
    theta_hat = optax.apply_updates(theta, updates)

    # (3)-(5) l̂(t) with θ̂(t), L_recon + L_nll; (6) θ(t+1) = update of θ̂(t).
    def retrieval_pass(micro: Batch, r: jax.Array, target: jax.Array) -> tuple[Params, Any]:
      _, ret_rng = jax.random.split(r)  # the same key as (1): l and l-hat differ only by the reader update
      (loss, aux), grads = jax.value_and_grad(retrieval_objective, has_aux=True)(theta_hat, micro, ret_rng, target)
      return grads, (loss, aux)

    ret_grads, (ret_losses, ret_aux) = accumulate(retrieval_pass, theta_hat, batch, rng, grad_accum, targets)
    updates, opt_state = optimizer.update(ret_grads, opt_state, theta_hat)  # the shared state, advanced again
    params = optax.apply_updates(theta_hat, updates)

    metrics = {**jax.tree.map(jnp.mean, read_aux), **jax.tree.map(jnp.mean, ret_aux),
               "loss": read_losses.mean() + ret_losses.mean(), "read_grad_norm": optax.tree.norm(read_grads),
               "retrieval_grad_norm": optax.tree.norm(ret_grads), "param_norm": optax.tree.norm(params),
               "lr": schedule(state.step * 2)}  # the schedule counts updates
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return Step(update, lambda params: TrainState.create(params, optimizer))
