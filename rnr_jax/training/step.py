"""Train state and the jitted train step, with gradient accumulation.

A stage supplies ``loss_fn(params, batch, rng) -> (loss, aux_metrics)``: a
scalar loss (mean over the examples of ``batch``) and a dict of scalar metrics.
``batch`` holds global arrays sharded over the data axes; ``params`` are the
float32 master weights (cast them, or let the model compute in bfloat16 through
its ``dtype``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training.optim import cast_floating

PyTree = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, Metrics]]
StepFn = Callable[["TrainState", Batch, jax.Array], tuple["TrainState", Metrics]]


@flax.struct.dataclass
class TrainState:
  """What a checkpoint restores: the step count, parameters and optimiser state.

  The step's random key is not stored here: it is ``fold_in(base_rng, step)``,
  so a resumed run draws exactly the keys an uninterrupted one would.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState

  @classmethod
  def create(cls, params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def split_microbatches(batch: Batch, num: int) -> Batch:
  """Splits a batch into ``num`` micro-batches: [R, ...] -> [num, R/num, ...].

  The number of examples B is the smallest leading dimension in the batch; an
  array of R = m * B rows holds m consecutive rows per example (e.g. a positive
  and a hard-negative passage per question). Micro-batch i gets examples
  i, i + num, i + 2 * num, ... with all their rows, in order, so each
  micro-batch has the same layout as the full batch. The strided choice keeps
  every micro-batch spread over all data shards: a device holding a contiguous
  block of examples holds a slice of each micro-batch, and no data moves.
  """
  num_examples = min(x.shape[0] for x in jax.tree.leaves(batch))
  if num_examples % num:
    raise ValueError(f"{num_examples} examples per batch not divisible by grad_accum={num}")

  def split(x: jax.Array) -> jax.Array:
    rows_per_example, rest = divmod(x.shape[0], num_examples)
    if rest:
      raise ValueError(f"batch array of {x.shape[0]} rows is not a multiple of "
                       f"{num_examples} examples")
    x = x.reshape((num_examples // num, num, rows_per_example) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((num, -1) + x.shape[3:])

  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1, schedule: optax.Schedule | None = None,
                    compute_dtype: jnp.dtype | None = None) -> StepFn:
  """Returns the pure function ``train_step(state, batch, base_rng) -> (state, metrics)``.

  Args:
    loss_fn: ``(params, batch, rng) -> (scalar loss, dict of scalar metrics)``.
    optimizer: e.g. from :func:`rnr_jax.training.optim.make_optimizer`.
    grad_accum: split the batch into this many micro-batches (see
      :func:`split_microbatches`) and accumulate their gradients with
      ``lax.scan``; the update is that of the mean of the micro-batch losses.
    schedule: learning-rate schedule, to report ``lr``.
    compute_dtype: cast floating parameters to this dtype inside the
      differentiated function (gradients stay float32); None leaves it to the model.

  Metrics: ``loss``, the loss_fn's aux metrics (means over micro-batches),
  ``grad_norm`` (global norm of the unclipped gradient), ``param_norm`` (after
  the update) and ``lr``.
  """
  def loss_and_grads(params: PyTree, batch: Batch, rng: jax.Array
                     ) -> tuple[tuple[jax.Array, Metrics], PyTree]:
    def compute_loss(p: PyTree) -> tuple[jax.Array, Metrics]:
      return loss_fn(cast_floating(p, compute_dtype), batch, rng)
    return jax.value_and_grad(compute_loss, has_aux=True)(params)

  def train_step(state: TrainState, batch: Batch, base_rng: jax.Array
                 ) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(base_rng, state.step)
    if grad_accum == 1:
      (loss, aux), grads = loss_and_grads(state.params, batch, rng)
    else:
      def accumulate(carry: PyTree, xs: tuple[jax.Array, Batch]) -> tuple[PyTree, Any]:
        i, micro = xs
        (loss, aux), grads = loss_and_grads(state.params, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, grads), (loss, aux)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      grads, (losses, auxes) = jax.lax.scan(
          accumulate, zeros, (jnp.arange(grad_accum), split_microbatches(batch, grad_accum)))
      grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grads, state.params)
      loss, aux = losses.mean(), jax.tree.map(jnp.mean, auxes)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def jit_train_step(step_fn: StepFn, state_shardings: PyTree, batch_sharding: NamedSharding, *,
                   donate: bool = True) -> Callable[..., tuple[TrainState, Metrics]]:
  """``jax.jit`` of a train step with explicit shardings.

  Args:
    step_fn: from :func:`make_train_step`.
    state_shardings: NamedSharding pytree of the TrainState (output = input, so
      the state keeps its layout step after step and nothing recompiles).
    batch_sharding: one NamedSharding applied to every batch array.
    donate: reuse the old state's buffers for the new state (halves its memory).
      The caller must not touch the state passed in after the call.
  """
  replicated = mesh_lib.replicated(batch_sharding.mesh)
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,) if donate else ())
