"""What the inference commands share: JAX's persistent compilation cache, the devices they run on, and compiling every
input shape ahead of the first request."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from rnr_jax import tokenization as tk
from rnr_jax.io import user_cache_dir
from rnr_jax.qa_system import QASystem
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


def _padded(limit: int) -> list[int]:
  """The row counts a batch of up to ``limit`` rows is padded to (powers of two, and ``limit``)."""
  return sorted({min(1 << max(n - 1, 0).bit_length(), limit) for n in range(1, limit + 1)})


def _lengths(max_len: int, buckets: Sequence[int]) -> list[int]:
  """Every padded length :func:`rnr_jax.tokenization.bucket_length` gives under ``max_len``."""
  return sorted({min(b, max_len) for b in buckets} | {max_len})


def compile_shapes(system: QASystem, *, passages: bool = False) -> int:
  """Compiles every input shape a system's questions and reading can take (and passage encoding for knowledge
  edits), so no request waits for a compilation; returns how many."""
  q, r = system.spec.retriever, system.spec.reader
  shapes = [(system.question_runner, rows, length) for length in _lengths(q.question_len, q.buckets)
            for rows in _padded(system.settings.question_batch)]
  shapes += [(system.read_runner, rows, length) for length in _lengths(r.reader_len, r.buckets)
             for rows in _padded(system.read_rows)]
  for runner, rows, length in shapes:
    ones = np.ones((rows, length), np.int32)
    runner.run(system.params, tk.EncodedBatch(ones, ones, 0 * ones), rows)
  if passages:
    system.embed_passages([np.ones(n - 2, np.int32) for n in _lengths(q.passage_len, q.buckets)])
  return len(shapes)
