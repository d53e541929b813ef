"""Orbax checkpoints of a run (``state``, ``rng``, ``data`` position per step, committed atomically) and where a run's
initial state comes from: its own newest readable checkpoint (everything), else ``init_checkpoint`` (another run's
parameters, fresh optimiser), else the stage's pretrained weights, else the random initialisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from rnr_jax.training.step import TrainState

PyTree = Any
DataState = dict[str, Any]


class Restored(NamedTuple):
  """The state a run starts from (see the module docstring for the order)."""
  state: TrainState
  rng: jax.Array               # base key; step keys are fold_in(rng, step)
  data_state: DataState | None  # iterator position; None = start of the data
  source: str                  # human-readable origin, for the logs


class Checkpointer:
  """Keep-last-N, asynchronous, atomic checkpoints of one run (Orbax ``CheckpointManager``)."""

  def __init__(self, directory: epath.PathLike, *, save_every: int, max_to_keep: int = 2,
               async_save: bool = True):
    self.directory = epath.Path(directory)
    self._save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether ``step`` is a multiple of ``save_every``."""
    return step % self._save_every == 0

  def save(self, step: int, state: TrainState, rng: jax.Array, data_state: DataState) -> bool:
    """Starts saving ``step`` unless it exists; ``state`` may be donated to the next step as soon as this returns."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        rng=ocp.args.JsonSave({"key_data": np.asarray(jax.random.key_data(rng)).tolist(),
                               "impl": str(jax.random.key_impl(rng))}),
        data=ocp.args.JsonSave(dict(data_state)))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: TrainState
              ) -> tuple[TrainState, jax.Array, DataState]:
    """Restores ``step`` onto ``abstract_state`` (ShapeDtypeStructs carrying shardings)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              rng=ocp.args.JsonRestore(), data=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    # Checkpoints written before the implementation was recorded used JAX's default, threefry.
    rng = jax.random.wrap_key_data(np.asarray(restored.rng["key_data"], np.uint32),
                                   impl=restored.rng.get("impl", "threefry2x32"))
    return restored.state, rng, dict(restored.data)

  def restore_latest(self, abstract_state: TrainState
                     ) -> tuple[int, TrainState, jax.Array, DataState] | None:
    """Restores the newest readable checkpoint; None if the directory has none.

    A checkpoint that fails to restore (a file deleted or truncated, say) is reported and the previous one tried. Once
    an older one restores, the unreadable newer ones are deleted, so the resumed run can save those steps again. If no
    checkpoint restores, the first error is raised: that is more likely a changed model or optimiser than corruption,
    and nothing is deleted.
    """
    failed: list[int] = []
    first_error: Exception | None = None
    for step in reversed(self.all_steps()):
      try:
        state, rng, data_state = self.restore(step, abstract_state)
      except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
        logging.warning("Checkpoint %s is unreadable (%s: %s); trying the previous one.",
                        self.directory / str(step), type(e).__name__, e)
        failed.append(step)
        first_error = first_error or e
        continue
      for bad in failed:
        logging.warning("Deleting unreadable checkpoint %s (step %d restored instead).",
                        self.directory / str(bad), step)
        self._manager.delete(bad)
      return step, state, rng, data_state
    if first_error is not None:
      raise RuntimeError(f"No checkpoint in {self.directory} could be restored "
                         f"(tried steps {failed})") from first_error
    return None

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()


def load_params(path: epath.PathLike, abstract_params: PyTree) -> PyTree:
  """Restores only the parameters of another run's checkpoint, sharded like ``abstract_params``.

  ``path`` is a step directory (``.../checkpoints/1000``), a checkpoint directory (its newest step) or a workdir
  (``<workdir>/checkpoints``, newest step). The optimiser state in the checkpoint is not read, so it may come from any
  stage.
  """
  path = epath.Path(path)
  if (path / "checkpoints").is_dir() and not (path / "state").exists():
    path = path / "checkpoints"
  if not (path / "state").exists():
    steps = ocp.utils.checkpoint_steps(path) if path.is_dir() else []
    if not steps:
      raise FileNotFoundError(f"no checkpoint found at {path}")
    path = path / str(max(steps))
  target = {"params": abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
      path / "state",
      args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  return restored["params"]


def restore_or_initialize(checkpointer: Checkpointer, abstract_state: TrainState, *, rng: jax.Array,
                          init_params: Callable[[], PyTree], create_state: Callable[[PyTree], TrainState],
                          init_checkpoint: str | None = None,
                          load_pretrained: Callable[[PyTree], PyTree] | None = None) -> Restored:
  """The run's starting state, in the resume order of the module docstring. ``abstract_state`` carries the
  shardings; ``rng`` is a fresh run's base key; ``load_pretrained`` maps the random parameters to pretrained ones
  (placed with the parameter shardings)."""
  latest = checkpointer.restore_latest(abstract_state)
  if latest is not None:
    step, state, saved_rng, data_state = latest
    return Restored(state, saved_rng, data_state, f"checkpoint {checkpointer.directory / str(step)}")
  if init_checkpoint:
    params = load_params(init_checkpoint, abstract_state.params)
    return Restored(create_state(params), rng, None, f"parameters of {init_checkpoint}")
  params = init_params()
  if load_pretrained is not None:
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state.params)
    params = jax.device_put(load_pretrained(params), shardings)
    return Restored(create_state(params), rng, None, "pretrained weights")
  return Restored(create_state(params), rng, None, "random initialisation")
