"""What the inference commands share: JAX's persistent compilation cache and the devices they run on."""

from __future__ import annotations

import os

import jax
from jax.sharding import Mesh

from rnr_jax.io import user_cache_dir
from rnr_jax.training import mesh as mesh_lib

CACHE_ENV = "RNR_JAX_COMPILATION_CACHE"


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache, so a restarted command reuses its compiled programs: in
  ``directory``, else ``$RNR_JAX_COMPILATION_CACHE`` (``off``: none), else ``<user cache>/jax``. Returns it."""
  directory = directory or os.environ.get(CACHE_ENV) or os.path.join(user_cache_dir(), "jax")
  if directory == "off":
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # the reader's small shapes count too
  return directory


def local_mesh(devices: int = 0) -> Mesh:
  """A ``("data",)`` mesh over the first ``devices`` local devices (0: all of them)."""
  local = jax.local_devices()
  if not 0 <= devices <= len(local):
    raise ValueError(f"--devices={devices}, but this host has {len(local)} local devices")
  return mesh_lib.data_mesh(local[:devices or None])
