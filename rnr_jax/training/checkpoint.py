"""Orbax checkpoints of a run (``state``, ``rng``, ``data`` position and ``integrity`` checksums per step, committed
atomically) and where a run starts from: its own newest intact checkpoint (everything), else ``init_checkpoint``
(another run's parameters, fresh optimiser), else the stage's pretrained weights, else the random initialisation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from rnr_jax.io import BadFileError
from rnr_jax.training.mesh import path_name
from rnr_jax.training.step import TrainState

PyTree = Any
DataState = dict[str, Any]


class Restored(NamedTuple):
  """The state a run starts from (see the module docstring for the order)."""
  state: TrainState
  rng: jax.Array               # base key; step keys are fold_in(rng, step)
  data_state: DataState | None  # iterator position; None = start of the data
  source: str                  # human-readable origin, for the logs


def _checksum(x: jax.Array) -> jax.Array:
  """The sum of each element's bits times an odd weight of its position (mod 2^32): one flipped bit always changes
  it, and it is the same however ``x`` is sharded."""
  width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
  bits = (x if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, width)).astype(jnp.uint32).reshape(-1)
  return jnp.sum(bits * (jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | 1), dtype=jnp.uint32)


_fingerprint = jax.jit(lambda tree: (jax.tree.map(_checksum, tree), jax.tree.map(
    lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True), tree)))


def _checks(state: TrainState, rng: dict[str, Any], data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """The integrity record of a checkpoint's contents, and the names of the leaves with non-finite values."""
  sums, finite = (jax.tree_util.tree_flatten_with_path(t)[0] for t in jax.device_get(_fingerprint(state)))
  record = {"state": {path_name(p): int(s) for p, s in sums},
            "json": hashlib.sha256(json.dumps([rng, data], sort_keys=True).encode()).hexdigest()}
  return record, [path_name(p) for p, ok in finite if not ok]


class Checkpointer:
  """Keep-last-N, asynchronous, atomic checkpoints of one run (Orbax ``CheckpointManager``)."""

  def __init__(self, directory: epath.PathLike, *, save_every: int, max_to_keep: int = 2, async_save: bool = True):
    self.directory = epath.Path(directory)
    self._save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self._save_every == 0

  def save(self, step: int, state: TrainState, rng: jax.Array, data_state: DataState) -> bool:
    """Starts saving ``step`` unless it exists; ``state`` may be donated to the next step as soon as this returns."""
    if step in self._manager.all_steps():
      return False
    rng_json = {"key_data": np.asarray(jax.random.key_data(rng)).tolist(), "impl": str(jax.random.key_impl(rng))}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), rng=ocp.args.JsonSave(rng_json), data=ocp.args.JsonSave(dict(data_state)),
        integrity=ocp.args.JsonSave(_checks(state, rng_json, dict(data_state))[0]))
    return self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, jax.Array, DataState]:
    """Restores ``step`` onto ``abstract_state``; BadFileError unless values are finite and match their checksums."""
    where = self.directory / str(step)
    # A checkpoint from before checksums were saved has no "integrity": its values are only checked to be finite.
    names = ("rng", "data", "integrity") if (where / "integrity").exists() else ("rng", "data")
    items = {"state": ocp.args.StandardRestore(abstract_state), **{k: ocp.args.JsonRestore() for k in names}}
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    record, non_finite = _checks(restored.state, restored.rng, restored.data)
    saved = restored.get("integrity") or record
    bad = [n for n in sorted({*saved["state"], *record["state"]}) if saved["state"].get(n) != record["state"].get(n)]
    if non_finite or bad or saved["json"] != record["json"]:
      what = f"non-finite values in {', '.join(non_finite[:3])}" if non_finite else (
          f"{', '.join(bad[:3]) or 'rng or data position'} does not match the checksum saved with it")
      raise BadFileError(where, f"{what} (corrupt)")
    # Checkpoints written before the implementation was recorded used JAX's default, threefry.
    rng = jax.random.wrap_key_data(np.asarray(restored.rng["key_data"], np.uint32),
                                   impl=restored.rng.get("impl", "threefry2x32"))
    return restored.state, rng, dict(restored.data)

  def restore_latest(self, abstract_state: TrainState) -> tuple[int, TrainState, jax.Array, DataState] | None:
    """Restores the newest intact checkpoint (None without any), deleting newer unreadable or corrupt ones once
    an older one restores; if none restores, the first error is raised and nothing deleted."""
    failed: dict[int, str] = {}
    first_error: Exception | None = None
    for step in reversed(self.all_steps()):
      try:
        state, rng, data_state = self.restore(step, abstract_state)
      except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
        failed[step] = "corrupt" if isinstance(e, BadFileError) else "unreadable"
        logging.warning("Checkpoint %s is %s (%s: %s); trying the previous one.",
                        self.directory / str(step), failed[step], type(e).__name__, e)
        first_error = first_error or e
        continue
      for bad, problem in failed.items():
        logging.warning("Deleting %s checkpoint %s (step %d restored).", problem, self.directory / str(bad), step)
        self._manager.delete(bad)
      return step, state, rng, data_state
    if first_error is not None:
      raise RuntimeError(f"No checkpoint in {self.directory} could be restored "
                         f"(tried steps {list(failed)})") from first_error
    return None

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()


def load_params(path: epath.PathLike, abstract_params: PyTree) -> PyTree:
  """Restores only the parameters (not the optimiser state: any stage's) of a step directory, or of the newest step in
  a checkpoint directory or in ``<workdir>/checkpoints``, sharded like ``abstract_params``."""
  path = epath.Path(path)
  if (path / "checkpoints").is_dir() and not (path / "state").exists():
    path = path / "checkpoints"
  if not (path / "state").exists():
    steps = ocp.utils.checkpoint_steps(path) if path.is_dir() else []
    if not steps:
      raise FileNotFoundError(f"no checkpoint found at {path}")
    path = path / str(max(steps))
  target = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  return ocp.PyTreeCheckpointer().restore(path / "state", args=args)["params"]


def restore_or_initialize(checkpointer: Checkpointer, abstract_state: TrainState, *, rng: jax.Array,
                          init_params: Callable[[], PyTree], create_state: Callable[[PyTree], TrainState],
                          init_checkpoint: str | None = None,
                          load_pretrained: Callable[[PyTree], PyTree] | None = None) -> Restored:
  """The run's starting state, in the resume order of the module docstring."""
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
