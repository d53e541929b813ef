"""Device mesh, parameter sharding rules, global batches and multi-host start-up (the ``mesh`` config section).

The batch is split over every data-parallel axis (``data`` and ``fsdp``); parameters, and through the same regex rules
the optimiser moments (whose paths end with the parameter path), are split over ``fsdp`` where a rule says so and
replicated otherwise."""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
# One entry per array dimension: None (replicated), an axis name, or a tuple of axis names.
SpecEntry = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, Sequence[SpecEntry]]]

DATA_AXES = ("data", "fsdp")


def maybe_initialize_distributed(mesh_cfg: Any) -> None:
  """Calls ``jax.distributed.initialize()`` when ``mesh_cfg.distributed`` is set; must run before anything
  touches a JAX device (first thing in a stage's ``main``)."""
  if getattr(mesh_cfg, "distributed", False) and not jax.distributed.is_initialized():
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces the single -1 entry of ``shape`` so that the product is ``num_devices``."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {shape} has more than one -1 entry")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape {shape} does not divide {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
  return shape


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The device mesh of ``mesh_cfg.shape`` (one entry may be -1) over ``mesh_cfg.axes``; ``AxisType.Auto`` axes
  let XLA gather data-sharded passages for ``q @ p.T`` itself."""
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(mesh_cfg.axes)
  shape = resolve_mesh_shape(mesh_cfg.shape, len(devices))
  if len(shape) != len(axes):
    raise ValueError(f"mesh.shape {shape} and mesh.axes {axes} differ in length")
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis ``("data",)`` mesh over ``devices`` (default: all), for inference with replicated parameters."""
  return make_mesh(types.SimpleNamespace(shape=(-1,), axes=("data",)), devices)


def data_parallelism(mesh: Mesh) -> int:
  """Number of ways a batch is split: the product of the mesh's data axes."""
  return int(np.prod([mesh.shape[a] for a in DATA_AXES if a in mesh.shape]))


def path_name(path: Sequence[Any]) -> str:
  """'/'-joined name of a pytree key path, e.g. ``params/encoder/layer_0/query/kernel``."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def tree_map_with_names(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """``jax.tree.map`` where ``fn`` receives ``(path_name, leaf)``."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def _axis_names(entry: SpecEntry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
  """PartitionSpec of one array by the first rule whose regex fully matches ``name``; unmatched arrays, and
  dimensions not divisible by their mesh axes (logged), are replicated."""
  if not shape:
    return PartitionSpec()
  for pattern, spec in rules:
    if re.fullmatch(pattern, name):
      break
  else:
    return PartitionSpec()
  # Entries may come from the command line as lists: PartitionSpec wants tuples.
  spec = tuple(tuple(e) if isinstance(e, list) else e for e in spec)
  if len(spec) > len(shape):
    raise ValueError(f"sharding rule {pattern!r} -> {spec} has more entries than {name} has dimensions {tuple(shape)}")
  entries = []
  for dim, entry in zip(shape, spec):
    if unknown := [a for a in _axis_names(entry) if a not in mesh.shape]:
      raise ValueError(f"sharding rule {pattern!r} names axes {unknown} not in mesh {dict(mesh.shape)}")
    if dim % math.prod(mesh.shape[a] for a in _axis_names(entry)):
      logging.info("Replicating dim of size %d of %s: not divisible by mesh axes %s (rule %r)",
                   dim, name, entry, pattern)
      entry = None
    entries.append(entry)
  return PartitionSpec(*entries)


def param_shardings(abstract_tree: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  """NamedSharding of every array of a pytree by regex rules on its path (optimiser moments' paths end with
  their parameter's, so ``.*`` rules shard them alike)."""
  return tree_map_with_names(lambda name, x: NamedSharding(mesh, spec_for(name, x.shape, mesh, rules)), abstract_tree)


def with_shardings(abstract_tree: PyTree, shardings: PyTree) -> PyTree:
  """Attaches shardings to a tree of ``ShapeDtypeStruct`` (targets for restores)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch arrays: leading dimension split over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(tuple(a for a in DATA_AXES if a in mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a value held in full by every device."""
  return NamedSharding(mesh, PartitionSpec())


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays sharded over the data axes from each process's ``local_batch`` (its share of the rows)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
