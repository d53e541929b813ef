"""The generic training loop every stage runs, and a resumable batch iterator.

A stage's ``main`` parses flags, calls ``maybe_initialize_distributed`` (before
anything touches a device), builds its data iterator, then calls
:func:`train_loop` with its ``init_fn`` and ``loss_fn``. The loop reads the
``mesh``, ``optim`` and ``train`` config sections and runs, in this order:
mesh, optimiser, abstract shapes, shardings, jitted init, jitted step, resume,
then the steps with logging, evaluation and checkpoints, and a final save.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from absl import logging

from rnr_jax.io import atomic_write_json
from rnr_jax.training import checkpoint as ckpt_lib
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training import step as step_lib
from rnr_jax.training.metrics_log import MetricsLogger
from rnr_jax.training.optim import Mask, make_optimizer

PyTree = Any
LocalBatch = dict[str, np.ndarray]
EvalFn = Callable[[step_lib.TrainState, int], Mapping[str, Any]]


def start_run(config: Any, workdir: str) -> str:
  """A stage's first step: joins the other hosts (when configured) and records the config.

  Calls :func:`mesh.maybe_initialize_distributed` (before anything reads the process
  index), creates ``workdir`` and writes ``<workdir>/config.json`` from process 0.
  Returns the absolute workdir.
  """
  mesh_lib.maybe_initialize_distributed(config.mesh)
  workdir = os.path.abspath(workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    atomic_write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  return workdir


class ResumableIterator(Protocol):
  """Yields process-local batches; ``state()`` / ``restore()`` save and set its position."""

  def __next__(self) -> LocalBatch: ...
  def state(self) -> dict[str, Any]: ...
  def restore(self, state: Mapping[str, Any]) -> None: ...


class EpochIterator:
  """Deterministic, resumable batches over an indexable dataset.

  Epoch ``e`` visits the examples in the order
  ``np.random.default_rng(seed + e).permutation(num_examples)``, cut into global
  batches of ``global_batch_size`` (an epoch's last partial batch is dropped).
  Process ``p`` of ``P`` gets rows ``[p * G/P, (p + 1) * G/P)`` of each global
  batch, so together the processes see exactly the global batch. The position
  ``{seed, epoch, index}`` (index = batches done in the epoch) is all it takes to
  replay the same batches after a restart.
  """

  def __init__(self, fetch: Callable[[np.ndarray], LocalBatch], num_examples: int,
               global_batch_size: int, *, seed: int, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None):
    """
    Args:
      fetch: example indices [n] -> dict of arrays with leading dimension n.
      num_examples: size of the dataset.
      global_batch_size: examples per step over all processes.
      seed: shuffling seed (epoch ``e`` uses ``seed + e``).
      shuffle: False visits examples in index order (e.g. for tests or eval).
      process_index, process_count: default to this JAX process and the count.
    """
    self._fetch = fetch
    self._num_examples = num_examples
    self._process_index = jax.process_index() if process_index is None else process_index
    self._process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self._process_count:
      raise ValueError(f"global batch {global_batch_size} not divisible by "
                       f"{self._process_count} processes")
    self._global_batch_size = global_batch_size
    self._local_batch_size = global_batch_size // self._process_count
    self.batches_per_epoch = num_examples // global_batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(f"{num_examples} examples are fewer than one batch of {global_batch_size}")
    self._shuffle = shuffle
    self._seed = seed
    self._epoch = 0
    self._index = 0
    self._order = self._epoch_order()

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray], global_batch_size: int, *, seed: int,
                  **kwargs: Any) -> EpochIterator:
    """Batches of in-memory arrays sharing their leading dimension."""
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"arrays differ in length: { {k: len(v) for k, v in arrays.items()} }")
    return cls(lambda idx: {k: v[idx] for k, v in arrays.items()}, sizes.pop(),
               global_batch_size, seed=seed, **kwargs)

  def _epoch_order(self) -> np.ndarray:
    if not self._shuffle:
      return np.arange(self._num_examples)
    return np.random.default_rng(self._seed + self._epoch).permutation(self._num_examples)

  def __iter__(self) -> EpochIterator:
    return self

  def __next__(self) -> LocalBatch:
    if self._index == self.batches_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
      self._order = self._epoch_order()
    start = self._index * self._global_batch_size + self._process_index * self._local_batch_size
    self._index += 1
    return self._fetch(self._order[start:start + self._local_batch_size])

  def state(self) -> dict[str, int]:
    return {"seed": self._seed, "epoch": self._epoch, "index": self._index}

  def restore(self, state: Mapping[str, Any]) -> None:
    if int(state["seed"]) != self._seed:
      logging.warning("Data seed %s from the checkpoint replaces the configured %s.",
                      state["seed"], self._seed)
    self._seed, self._epoch, self._index = int(state["seed"]), int(state["epoch"]), int(state["index"])
    self._order = self._epoch_order()


def make_key(train_cfg: Any) -> jax.Array:
  """The run's base key: ``train.seed`` with the PRNG implementation ``train.rng_impl``.

  ``"rbg"`` draws dropout masks with XLA's RngBitGenerator, several times faster on CPU than the default
  ``"threefry2x32"``, whose bits are computed op by op; checkpoints record the implementation.
  """
  return jax.random.key(int(train_cfg.seed), impl=train_cfg.get("rng_impl") or None)


def train_loop(
    config: Any,
    *,
    workdir: str,
    init_fn: Callable[[jax.Array], PyTree],
    loss_fn: step_lib.LossFn,
    data: ResumableIterator,
    eval_fn: EvalFn | None = None,
    trainable_mask: Mask | None = None,
    init_checkpoint: str | None = None,
    load_pretrained: Callable[[PyTree], PyTree] | None = None,
) -> step_lib.TrainState:
  """Trains ``config.train.num_steps`` steps (resuming from ``workdir`` if it has checkpoints).

  Args:
    config: has ``mesh``, ``optim`` and ``train`` sections.
    workdir: checkpoints go to ``<workdir>/checkpoints``, logs to ``<workdir>/metrics.jsonl``.
    init_fn: ``rng -> params`` (float32 master weights).
    loss_fn: ``(params, batch, rng) -> (loss, aux_metrics)`` on global batches.
    data: process-local batches (``config.train.batch_size / process_count``
      examples; arrays may have more rows per example, e.g. passages).
    eval_fn: ``(state, step) -> metrics``, run every ``train.eval_every`` steps
      and after the last step.
    trainable_mask: frozen parameters (see ``make_optimizer``).
    init_checkpoint, load_pretrained: initial parameters of a fresh run, see
      ``checkpoint.restore_or_initialize`` for the resume order.

  Returns:
    The final TrainState.
  """
  train_cfg = config.train
  total_steps = int(train_cfg.num_steps)

  mesh = mesh_lib.make_mesh(config.mesh)
  optimizer, schedule = make_optimizer(config.optim, total_steps, trainable_mask)

  def new_state(params: PyTree) -> step_lib.TrainState:
    return step_lib.TrainState.create(params, optimizer)

  init_rng, base_rng = jax.random.split(make_key(train_cfg))
  abstract_state = jax.eval_shape(lambda rng: new_state(init_fn(rng)), init_rng)
  shardings = mesh_lib.param_shardings(abstract_state, mesh, config.mesh.rules)

  # Parameters and optimiser state are born sharded.
  init_params = jax.jit(init_fn, out_shardings=shardings.params)
  create_state = jax.jit(new_state, in_shardings=(shardings.params,), out_shardings=shardings)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(loss_fn, optimizer, grad_accum=int(config.optim.grad_accum),
                               schedule=schedule),
      shardings, mesh_lib.batch_sharding(mesh))

  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=int(train_cfg.ckpt_every),
      max_to_keep=int(train_cfg.keep_ckpts), async_save=bool(train_cfg.async_ckpt))
  start = ckpt_lib.restore_or_initialize(
      checkpointer, mesh_lib.with_shardings(abstract_state, shardings), rng=base_rng,
      init_params=lambda: init_params(init_rng), create_state=create_state,
      init_checkpoint=init_checkpoint, load_pretrained=load_pretrained)
  state, rng = start.state, jax.device_put(start.rng, mesh_lib.replicated(mesh))
  if start.data_state is not None:
    data.restore(start.data_state)
  start_step = int(state.step)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info("Starting at step %d from %s; mesh %s; %d parameters.",
               start_step, start.source, dict(mesh.shape), num_params)

  logger = MetricsLogger(workdir, total_steps=total_steps,
                         batch_size=int(train_cfg.batch_size), start_step=start_step)
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = mesh_lib.make_global_batch(next(data), mesh)
      state, metrics = train_step(state, batch, rng)

      last = step == total_steps
      save = last or checkpointer.should_save(step)
      # Metrics are fetched only when logged; a checkpoint step always checks the loss first.
      if save or step == start_step + 1 or step % train_cfg.log_every == 0:
        logger.log_train(step, metrics)
      if eval_fn is not None and (last or step % train_cfg.eval_every == 0):
        logger.log_eval(step, eval_fn(state, step))
      if save:
        checkpointer.save(step, state, rng, data.state())
  finally:
    checkpointer.close()  # waits for the last asynchronous save
    logger.close()
  return state
