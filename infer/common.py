"""What the inference commands share: the engine flag, JAX's persistent compilation cache, the devices they run on, and
compiling every input shape ahead of the first request. JAX is imported only for the JAX engine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from rnr_jax import tokenization as tk
from rnr_jax.io import user_cache_dir
from rnr_jax.qa_system import ENGINES, QASystem, resolve_engine

CACHE_ENV = "RNR_JAX_COMPILATION_CACHE"


def define_engine_flag() -> None:
  flags.DEFINE_enum("engine", "auto", list(ENGINES), "What runs the model: jax, onnx (ONNX Runtime, the bundle's "
                    "extra/student.onnx) or auto (JAX where it is installed, else ONNX Runtime).")


def enable_compilation_cache(engine: str = "jax", directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache for the JAX ``engine``, so a restarted command reuses its compiled
  programs: in ``directory``, else ``$RNR_JAX_COMPILATION_CACHE`` (``off``: none), else ``<user cache>/jax``. Returns
  it (None for ONNX Runtime, which compiles nothing ahead)."""
  directory = directory or os.environ.get(CACHE_ENV) or os.path.join(user_cache_dir(), "jax")
  if directory == "off" or resolve_engine(engine) != "jax":
    return None
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # the reader's small shapes count too
  return directory


def local_mesh(devices: int = 0, engine: str = "jax") -> Any:
  """A ``("data",)`` mesh over the first ``devices`` local devices (0: all of them); None for ONNX Runtime."""
  if resolve_engine(engine) != "jax":
    return None
  import jax  # pylint: disable=import-outside-toplevel
  from rnr_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
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
  """Compiles every input shape a system's questions and reading can take on the JAX engine (and passage encoding for
  knowledge edits), so no request waits for a compilation; returns how many (0 on ONNX Runtime)."""
  if system.engine.name != "jax":
    return 0
  q, r, engine = system.spec.retriever, system.spec.reader, system.engine
  shapes = [(engine.embed, rows, length) for length in _lengths(q.question_len, q.buckets)
            for rows in _padded(system.settings.question_batch)]
  shapes += [(engine.read, rows, length) for length in _lengths(r.reader_len, r.buckets)
             for rows in _padded(system.read_rows)]
  for run, rows, length in shapes:
    ones = np.ones((rows, length), np.int32)
    run(tk.EncodedBatch(ones, ones, 0 * ones), rows)
  if passages:
    system.embed_passages([np.ones(n - 2, np.int32) for n in _lengths(q.passage_len, q.buckets)])
  return len(shapes)
