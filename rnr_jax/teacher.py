"""The reader teacher of distillation and the cache of its outputs (paper §2.2.3).

The teacher reads fixed passage samples once, outside the student's step, into float16 memmaps keyed by a fingerprint
of everything they depend on (docs/design.md, "Teacher cache")."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rnr_jax import exports, retrieval
from rnr_jax import tokenization as tk
from rnr_jax.io import atomic_write_json, read_json
from rnr_jax.specs import read_fn

Params = Any
CACHE_FORMAT = "rnr_jax.teacher_cache"
CACHE_VERSION = 1


class Teacher:
  """The reader teacher, replicated on ``mesh``: it fills the cache, then releases its parameters."""

  def __init__(self, directory: str, mesh: jax.sharding.Mesh, rows_per_call: int):
    self.spec, self._params, _ = exports.load_reader(directory, mesh)
    self.fingerprint = exports.params_fingerprint(self._params)
    self._read = retrieval.BatchEncoder(read_fn(self.spec.build()), mesh, rows_per_call)
    logging.info("Loaded the reader teacher from %s.", directory)

  def __call__(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``start, end [rows, L]`` and ``rank [rows]`` logits of a reader batch (numpy)."""
    rows, length = batch["input_ids"].shape
    out = self._read(self._params, [(np.arange(rows), tk.EncodedBatch(*(batch[k] for k in tk.ENCODER_INPUTS)))], rows)
    return out[:, :length], out[:, length : 2 * length], out[:, 2 * length]

  def release(self) -> None:
    """Frees the parameters' device memory once every output is cached."""
    self._params = None


InputsFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
TeacherFn = Callable[[Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray, np.ndarray]]


class TeacherCache:
  """The teacher's outputs on fixed passage samples in ``<root>/<fingerprint>/``: ``pids.npy`` ``[S, N, m]``,
  float16 ``start.npy`` / ``end.npy`` ``[S, N, m, W]`` and ``rank.npy``; ``done.json`` when complete."""

  def __init__(self, directory: str):
    self.directory = directory
    self.pids = np.load(os.path.join(directory, "pids.npy"), mmap_mode="r")
    self._start = np.load(os.path.join(directory, "start.npy"), mmap_mode="r")
    self._end = np.load(os.path.join(directory, "end.npy"), mmap_mode="r")
    self._rank = np.load(os.path.join(directory, "rank.npy"), mmap_mode="r")

  @staticmethod
  def fingerprint(key: Mapping[str, Any], pids: np.ndarray) -> str:
    """sha256 of ``key`` and the sampled passage ids."""
    h = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode())
    h.update(f"{pids.dtype.str}{pids.shape}".encode())
    h.update(np.ascontiguousarray(pids).tobytes())
    return h.hexdigest()

  @classmethod
  def open_or_build(cls, root: str, key: Mapping[str, Any], pids: np.ndarray, width: int, inputs: InputsFn,
                    teacher: TeacherFn, questions_per_call: int) -> TeacherCache:
    """The cache of ``key`` and ``pids [S, N, m]``: opened if complete, else built or finished (other caches in
    ``root`` then deleted); ``inputs(examples, pids)`` builds a reader batch for ``teacher``."""
    pids = np.asarray(pids, np.int32)
    samples, num, m = pids.shape
    directory = os.path.join(root, cls.fingerprint(key, pids)[:32])
    if os.path.exists(os.path.join(directory, "done.json")):
      logging.info("Teacher outputs found in %s.", directory)
      return cls(directory)
    writer = jax.process_index() == 0
    progress_path = os.path.join(directory, "progress.json")
    if writer:
      os.makedirs(directory, exist_ok=True)
      if not os.path.exists(progress_path):
        np.save(os.path.join(directory, "pids.npy"), pids)
        for name, shape in (("start", (samples, num, m, width)), ("end", (samples, num, m, width)),
                            ("rank", (samples, num, m))):
          np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), "w+", np.float16, shape).flush()
        atomic_write_json(os.path.join(directory, "key.json"), {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                                                "shape": [samples, num, m, width], **dict(key)})
        atomic_write_json(progress_path, {"done": 0})
    multihost_utils.sync_global_devices("rnr_jax.teacher.TeacherCache.create")
    done = int(read_json(progress_path)["done"])
    arrays = {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r+" if writer else "r")
              for name in ("start", "end", "rank")}
    flat_pids = pids.reshape(samples * num, m)
    total = samples * num
    t = time.perf_counter()
    logging.info("Teacher reading %d questions x %d passages (%d done) into %s.", total, m, done, directory)
    for first in range(done, total, questions_per_call):
      rows = np.arange(first, min(first + questions_per_call, total))
      s, i = np.divmod(rows, num)
      batch = inputs(i, flat_pids[rows])
      start, end, rank = teacher(batch)
      if writer:
        length = start.shape[1]
        for name, x in (("start", start), ("end", end)):
          x = x.reshape(len(rows), m, length)[..., :width]
          arrays[name][s, i, :, : x.shape[-1]] = x.astype(np.float16)
          arrays[name][s, i, :, x.shape[-1]:] = 0  # positions past a short bucket
        arrays["rank"][s, i] = rank.reshape(len(rows), m).astype(np.float16)
        for a in arrays.values():
          a.flush()
        atomic_write_json(progress_path, {"done": int(rows[-1]) + 1})  # after the flush: a killed build resumes here
    if writer:
      atomic_write_json(os.path.join(directory, "done.json"), {"seconds": time.perf_counter() - t})
      os.remove(progress_path)
      for other in os.listdir(root):
        if other != os.path.basename(directory):
          shutil.rmtree(os.path.join(root, other), ignore_errors=True)
    multihost_utils.sync_global_devices("rnr_jax.teacher.TeacherCache.done")
    return cls(directory)

  def lookup(self, sample: int, examples: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """``t_start, t_end`` float16 ``[B * m, length]`` and ``t_rank [B, m]`` of ``examples`` in ``sample``."""
    out = {}
    for name, x in (("t_start", self._start), ("t_end", self._end)):
      x = np.asarray(x[sample, examples])
      width = x.shape[-1]
      x = x[..., :length] if length <= width else np.pad(x, ((0, 0), (0, 0), (0, length - width)))
      out[name] = x.reshape(-1, length)
    out["t_rank"] = np.asarray(self._rank[sample, examples])
    return out
