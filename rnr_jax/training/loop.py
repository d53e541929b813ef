"""The one training loop every stage runs (:func:`train_loop`: sharded init, resume, steps, logs, evaluations,
the best export, checkpoints and profiler traces), and the resumable batch iterator."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np
from absl import logging
from etils import epath

from rnr_jax.io import relative_files
from rnr_jax.training import checkpoint as ckpt_lib
from rnr_jax.training import mesh as mesh_lib
from rnr_jax.training.metrics_log import MetricsLogger, write_text
from rnr_jax.training.step import Step, TrainState, jit_train_step

if TYPE_CHECKING:
  from rnr_jax.data.prepared import PreparedData
  from rnr_jax.exports import BestExport

PyTree = Any
LocalBatch = dict[str, np.ndarray]
Evaluator = Callable[[PyTree, int], Mapping[str, float]]  # (params, step) -> named metrics


def start_run(config: Any, workdir: str) -> str:
  """A stage's first call: joins other hosts (if configured), creates ``workdir`` and records the config."""
  mesh_lib.maybe_initialize_distributed(config.mesh)
  workdir = workdir if "://" in workdir else os.path.abspath(workdir)
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    write_text(os.path.join(workdir, "config.json"), json.dumps(json.loads(config.to_json_best_effort()), indent=2))
  return workdir


@contextlib.contextmanager
def profiler_trace(log_dir: str) -> Iterator[None]:
  """``jax.profiler.trace`` into ``log_dir``; a URI's trace goes to a local directory first, then through
  epath, since the profiler writes through its own file layer."""
  if "://" not in log_dir:
    with jax.profiler.trace(log_dir):
      yield
    return
  with tempfile.TemporaryDirectory() as local:
    with jax.profiler.trace(local):
      yield
    for relative, full in relative_files(local):
      target = epath.Path(log_dir) / relative
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(epath.Path(full).read_bytes())


def check_vocabulary(vocab_size: int, tokenizer: Any, data: PreparedData) -> None:
  """Refuses an encoder whose vocabulary is smaller than the prepared data's tokenizer."""
  if vocab_size < tokenizer.vocab_size:
    raise ValueError(f"the encoder's vocabulary ({vocab_size}) is smaller than the prepared data's tokenizer "
                     f"({tokenizer.vocab_size}, {data.tokenizer_path})")


class ResumableIterator(Protocol):
  """Yields process-local batches; ``state()`` / ``restore()`` save and set its position."""
  def __next__(self) -> LocalBatch: ...
  def state(self) -> dict[str, Any]: ...
  def restore(self, state: Mapping[str, Any]) -> None: ...


class EpochIterator:
  """Deterministic, resumable batches: epoch ``e`` visits ``default_rng(seed + e).permutation(num_examples)`` in
  global batches, process ``p`` taking its share; ``{seed, epoch, index}`` replays them after a restart.

  ``sizes(epoch)`` (``[num_examples]`` padded lengths, say) with ``group_batches = g`` groups by size: each run of
  ``g`` global batches of the permutation is sorted by size and cut into batches, and the epoch's batches are
  shuffled, so a batch pads to the longest of similar examples."""

  def __init__(self, fetch: Callable[[np.ndarray], LocalBatch], num_examples: int, global_batch_size: int, *,
               seed: int, process_index: int | None = None, process_count: int | None = None,
               sizes: Callable[[int], np.ndarray] | None = None, group_batches: int = 0):
    if sizes is not None and group_batches < 1:
      raise ValueError(f"grouping by size needs group_batches >= 1, got {group_batches}")
    self._fetch, self._num_examples = fetch, num_examples
    self._sizes, self._group_batches = sizes, group_batches
    self._process_index = jax.process_index() if process_index is None else process_index
    self._process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self._process_count:
      raise ValueError(f"global batch {global_batch_size} not divisible by {self._process_count} processes")
    self._global_batch_size, self._local_batch_size = global_batch_size, global_batch_size // self._process_count
    self.batches_per_epoch = num_examples // global_batch_size
    if self.batches_per_epoch == 0:
      raise ValueError(f"{num_examples} examples are fewer than one batch of {global_batch_size}")
    self._seed, self._epoch, self._index = seed, 0, 0
    self._order = self._epoch_order()

  def _epoch_order(self) -> np.ndarray:
    rng = np.random.default_rng(self._seed + self._epoch)
    order = rng.permutation(self._num_examples)
    if self._sizes is None:
      return order
    sizes, batch = np.asarray(self._sizes(self._epoch)), self._global_batch_size
    used = order[:self.batches_per_epoch * batch]
    group = self._group_batches * batch
    batches = np.concatenate([g[np.argsort(sizes[g], kind="stable")] for g in np.split(
        used, range(group, len(used), group))]).reshape(-1, batch)
    return np.concatenate([batches[rng.permutation(len(batches))].ravel(), order[len(used):]])

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
      logging.warning("Data seed %s from the checkpoint replaces the configured %s.", state["seed"], self._seed)
    self._seed, self._epoch, self._index = int(state["seed"]), int(state["epoch"]), int(state["index"])
    self._order = self._epoch_order()


def make_key(train_cfg: Any) -> jax.Array:
  """The run's base key: ``train.seed`` with the PRNG ``train.rng_impl`` (``"rbg"``: one XLA RngBitGenerator op per
  draw, the default ``"threefry2x32"`` a chain of ops; docs/speed.md times both); checkpoints record it."""
  return jax.random.key(int(train_cfg.seed), impl=train_cfg.get("rng_impl") or None)


def train_loop(config: Any, *, workdir: str, init_fn: Callable[[jax.Array], PyTree], step: Step,
               data: ResumableIterator, evaluator: Evaluator | None = None, best: BestExport | None = None,
               init_checkpoint: str | None = None, load_pretrained: Callable[[PyTree], PyTree] | None = None
               ) -> TrainState:
  """Trains ``config.train.num_steps`` steps, resuming from ``workdir``'s checkpoints; ``evaluator(params,
  step)`` runs every ``train.eval_every`` steps and after the last (and at step 0 with ``train.eval_at_start``), its
  metrics offered to ``best``. ``train.eval_every=0``: no evaluations, and ``best`` exports the last step."""
  train_cfg, total_steps, mesh = config.train, int(config.train.num_steps), mesh_lib.make_mesh(config.mesh)

  # Abstract shapes, then shardings from the config's rules: parameters and optimiser state are born sharded.
  init_rng, base_rng = jax.random.split(make_key(train_cfg))  # init and step keys never collide
  abstract_state = jax.eval_shape(lambda rng: step.init_state(init_fn(rng)), init_rng)
  shardings = mesh_lib.param_shardings(abstract_state, mesh, config.mesh.rules)
  init_params = jax.jit(init_fn, out_shardings=shardings.params)
  create_state = jax.jit(step.init_state, in_shardings=(shardings.params,), out_shardings=shardings)
  train_step = jit_train_step(step.update, shardings, mesh_lib.batch_sharding(mesh))

  # Resume: own checkpoint > init_checkpoint > pretrained weights > random init.
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=int(train_cfg.ckpt_every),
                                       max_to_keep=int(train_cfg.keep_ckpts), async_save=bool(train_cfg.async_ckpt))
  start = ckpt_lib.restore_or_initialize(
      checkpointer, mesh_lib.with_shardings(abstract_state, shardings), rng=base_rng, create_state=create_state,
      init_params=lambda: init_params(init_rng), init_checkpoint=init_checkpoint, load_pretrained=load_pretrained)
  state, rng = start.state, jax.device_put(start.rng, mesh_lib.replicated(mesh))
  if start.data_state is not None:
    data.restore(start.data_state)
  start_step = int(state.step)
  logging.info("Starting at step %d from %s; mesh %s; %d parameters.", start_step, start.source, dict(mesh.shape),
               sum(x.size for x in jax.tree.leaves(abstract_state.params)))

  logger = MetricsLogger(workdir, config, start_step=start_step)
  profile = tuple(train_cfg.get("profile_steps") or ())  # (first, last): a jax.profiler trace of those steps
  tracing = contextlib.ExitStack()
  if int(train_cfg.eval_every) <= 0:
    evaluator = None
  try:
    if evaluator is not None and train_cfg.get("eval_at_start") and start_step == 0:
      logger.log_eval(0, *evaluate(evaluator, best, state.params, 0))
    for step_num in range(start_step + 1, total_steps + 1):
      tic = time.perf_counter()
      batch = mesh_lib.make_global_batch(next(data), mesh)  # each process contributes its rows
      logger.data_seconds += time.perf_counter() - tic
      if profile and step_num == profile[0]:
        tracing.enter_context(profiler_trace(os.path.join(workdir, "profile")))
      state, metrics = train_step(state, batch, rng)
      if profile and step_num == profile[-1]:
        jax.block_until_ready(state)  # the trace ends after this step's device work
        tracing.close()
      last = step_num == total_steps
      save = last or checkpointer.should_save(step_num)
      # Metrics are fetched only when logged; a checkpoint step always checks the loss first.
      if save or step_num == start_step + 1 or step_num % train_cfg.log_every == 0:
        logger.log_train(step_num, metrics)
      if evaluator is not None and (last or step_num % train_cfg.eval_every == 0):
        logger.log_eval(step_num, *evaluate(evaluator, best, state.params, step_num))
      elif evaluator is None and last and best is not None:
        best.export_final(step_num, state.params)
      if save:
        checkpointer.save(step_num, state, rng, data.state())
        logger.flush()
  finally:
    tracing.close()
    checkpointer.close()  # waits for the last asynchronous save
    logger.close()
  return state


def evaluate(evaluator: Evaluator, best: BestExport | None, params: PyTree, step: int) -> tuple[dict[str, float], bool]:
  """``evaluator``'s metrics (its time as ``eval_s``), offered to ``best``, and whether they are the best so far."""
  start = time.perf_counter()
  metrics = {**evaluator(params, step)}
  metrics["eval_s"] = time.perf_counter() - start
  return metrics, bool(best.offer(step, params, metrics)) if best is not None else False
