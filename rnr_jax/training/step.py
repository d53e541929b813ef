"""The train state, gradient accumulation and the jitted step every stage runs.

A stage's step is ``(state, batch, base_rng) -> (state, metrics)``: :func:`adamw_step` builds the usual one from a
``loss_fn(params, batch, rng) -> (loss, aux)``; Algorithm 1 (:mod:`rnr_jax.iterative`) builds its own two-update step
from the same :func:`accumulate`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training.optim import Mask, make_optimizer

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, Metrics]]
StepFn = Callable[["TrainState", Batch, jax.Array], tuple["TrainState", Metrics]]


@flax.struct.dataclass
class TrainState:
  """What a checkpoint restores: step, parameters and optimiser state (the step's key is ``fold_in(base_rng,
  step)``, so a resumed run draws the keys an uninterrupted one would)."""
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState

  @classmethod
  def create(cls, params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


class Step(NamedTuple):
  """A stage's training step: ``update(state, batch, base_rng)`` and ``init_state(params)`` at step 0."""
  update: StepFn
  init_state: Callable[[PyTree], TrainState]


def split_microbatches(batch: Batch, num: int) -> Batch:
  """``[R, ...] -> [num, R / num, ...]``: micro-batch i holds examples i, i + num, ... with all their rows
  (strided, so every micro-batch spans all data shards and no data moves)."""
  num_examples = min(x.shape[0] for x in jax.tree.leaves(batch))
  if num_examples % num:
    raise ValueError(f"{num_examples} examples per batch not divisible by grad_accum={num}")

  def split(x: jax.Array) -> jax.Array:
    rows_per_example, rest = divmod(x.shape[0], num_examples)
    if rest:
      raise ValueError(f"batch array of {x.shape[0]} rows is not a multiple of {num_examples} examples")
    x = x.reshape((num_examples // num, num, rows_per_example) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((num, -1) + x.shape[3:])

  return jax.tree.map(split, batch)


def accumulate(fn: Callable[[Batch, jax.Array, Any], tuple[PyTree, Any]], params: PyTree, batch: Batch,
               rng: jax.Array, grad_accum: int, extra: Any = None) -> tuple[PyTree, Any]:
  """Mean gradients and stacked outputs of ``fn(micro_batch, rng, extra)`` over micro-batches (under
  ``lax.scan``, micro-batch i seeing ``fold_in(rng, i)`` and ``extra[i]``; one whole batch when ``grad_accum == 1``)."""
  if grad_accum == 1:
    grads, out = fn(batch, rng, None if extra is None else jax.tree.map(lambda x: x[0], extra))
    return grads, jax.tree.map(lambda x: x[None], out)

  def body(carry: PyTree, xs: tuple[jax.Array, Batch, Any]) -> tuple[PyTree, Any]:
    i, micro, ex = xs
    grads, out = fn(micro, jax.random.fold_in(rng, i), ex)
    return jax.tree.map(jnp.add, carry, grads), out

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)  # sums in float32
  grads, outs = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), split_microbatches(batch, grad_accum), extra))
  return jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grads, params), outs


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, grad_accum: int = 1,
                    schedule: optax.Schedule | None = None) -> StepFn:
  """``train_step(state, batch, base_rng) -> (state, metrics)``: one optimiser update on the mean micro-batch
  loss; metrics add ``grad_norm`` (unclipped), ``param_norm`` and ``lr``."""
  def train_step(state: TrainState, batch: Batch, base_rng: jax.Array) -> tuple[TrainState, Metrics]:
    def micro_step(micro: Batch, rng: jax.Array, _: Any) -> tuple[PyTree, Any]:
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, micro, rng)
      return grads, (loss, aux)

    rng = jax.random.fold_in(base_rng, state.step)  # a resumed run draws the same keys
    grads, (losses, auxes) = accumulate(micro_step, state.params, batch, rng, grad_accum)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**jax.tree.map(jnp.mean, auxes), "loss": losses.mean(), "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def adamw_step(config: Any, loss_fn: LossFn, trainable_mask: Mask | None = None) -> Step:
  """The usual step of a stage config (``optim``, ``train.num_steps``): AdamW on ``loss_fn``."""
  optimizer, schedule = make_optimizer(config.optim, int(config.train.num_steps), trainable_mask)
  update = make_train_step(loss_fn, optimizer, grad_accum=int(config.optim.grad_accum), schedule=schedule)
  return Step(update, lambda params: TrainState.create(params, optimizer))


def jit_train_step(step_fn: StepFn, state_shardings: PyTree, batch_sharding: NamedSharding
                   ) -> Callable[..., tuple[TrainState, Metrics]]:
  """``jax.jit`` of a step with explicit shardings (the state keeps its layout, so nothing recompiles), the old
  state donated: the caller must not touch it after the call."""
  replicated = mesh_lib.replicated(batch_sharding.mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
