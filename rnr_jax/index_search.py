"""Search kernels behind :class:`rnr_jax.index.DenseIndex`: exact float32 top-k, recall, and ScaNN searchers, with
:class:`NumpySearcher` in their place where ScaNN is not installed."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

_SCORE_BLOCK_ELEMS = 1 << 25  # float32 score entries per exact-search tile (128 MiB).
_PASSAGE_BLOCK = 1 << 17  # rows per exact-search tile: smaller corpora are scored whole


def recall_at_k(reference_ids: np.ndarray, ids: np.ndarray, k: int | None = None) -> float:
  """Mean over queries of ``|reference[:k] & ids[:k]| / k`` (``[Q, >=k]`` ids, best first; ``-1`` never matches)."""
  reference_ids, ids = np.asarray(reference_ids), np.asarray(ids)
  if reference_ids.ndim != 2 or ids.ndim != 2 or len(reference_ids) != len(ids):
    raise ValueError(f"expected two [Q, k] arrays, got shapes {reference_ids.shape} and {ids.shape}")
  k = reference_ids.shape[1] if k is None else k
  if k < 1 or reference_ids.shape[1] < k or ids.shape[1] < k:
    raise ValueError(f"k={k} needs at least k columns in both arrays, got {reference_ids.shape} and {ids.shape}")
  ref, got = reference_ids[:, :k], ids[:, :k]
  return float(((ref[:, :, None] == got[:, None, :]) & (got[:, None, :] >= 0)).any(-1).mean())


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int,
                 excluded_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k rows by inner product, ``(rows [Q, k] int64, scores [Q, k] float32)``; ``excluded_rows`` score
  ``-inf`` (row -1). Tiles of queries by ``_PASSAGE_BLOCK`` rows read the corpus once per query block."""
  n, q = len(vectors), len(queries)
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}]")
  rows = np.empty((q, k), np.int64)
  scores = np.empty((q, k), np.float32)
  rows_per_tile = min(n, max(_PASSAGE_BLOCK, k))
  block = max(1, _SCORE_BLOCK_ELEMS // rows_per_tile)
  excluded_rows = np.zeros(0, np.int64) if excluded_rows is None else np.asarray(excluded_rows)
  for start in range(0, q, block):
    best_rows = best_scores = None
    for first in range(0, n, rows_per_tile):
      s = queries[start:start + block] @ np.asarray(vectors[first:first + rows_per_tile]).T
      s[:, excluded_rows[(excluded_rows >= first) & (excluded_rows < first + s.shape[1])] - first] = -np.inf
      kk = min(k, s.shape[1])
      top = np.argpartition(s, s.shape[1] - kk, axis=1)[:, s.shape[1] - kk:]
      tile_rows, tile_scores = top + first, np.take_along_axis(s, top, axis=1)
      if best_rows is not None:
        tile_rows = np.concatenate([best_rows, tile_rows], 1)
        tile_scores = np.concatenate([best_scores, tile_scores], 1)
      best_rows, best_scores = sort_topk(tile_rows, tile_scores, k)
    rows[start:start + block], scores[start:start + block] = best_rows, best_scores
  rows[np.isneginf(scores)] = -1
  return rows, scores


def sort_topk(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The best ``k`` columns of ``[Q, *]`` results by score, best first (stable on ties)."""
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def merge_topk(ids_a: np.ndarray, scores_a: np.ndarray, ids_b: np.ndarray, scores_b: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
  """Best ``k`` of two ``[Q, *]`` result lists by score (``-inf`` slots last)."""
  return sort_topk(np.concatenate([ids_a, ids_b], axis=1), np.concatenate([scores_a, scores_b], axis=1), k)


def ah_settings(vectors: np.ndarray, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """Tree-AH settings derived from the data (AVQ threshold 0.2 x the median norm), then ``overrides``."""
  n = len(vectors)
  sample = vectors[:: max(1, n // 10_000)]
  num_leaves = int(overrides.get("num_leaves") or max(1, min(math.isqrt(n), n // 100)))
  settings = {"num_leaves": num_leaves, "num_leaves_to_search": max(1, math.ceil(num_leaves / 10)),
              "training_sample_size": min(n, 100_000), "dims_per_block": 2,
              "anisotropic_quantization_threshold": 0.2 * float(np.median(np.linalg.norm(sample, axis=1))),
              "reorder_k": 100, "reorder_dtype": "int8", **overrides}
  if settings["reorder_dtype"] not in ("int8", "float32"):
    raise ValueError(f"reorder_dtype must be 'int8' or 'float32', got {settings['reorder_dtype']!r}")
  if not 1 <= settings["num_leaves_to_search"] <= settings["num_leaves"]:
    raise ValueError(f"num_leaves_to_search={settings['num_leaves_to_search']} must be in "
                     f"[1, num_leaves={settings['num_leaves']}]")
  return settings


def row_settings(overrides: Mapping[str, Any]) -> dict[str, Any]:
  """``"int8_row"`` settings: ``reorder_k`` candidates (default 100) reordered exactly."""
  settings = {"reorder_k": 100, **overrides}
  if int(settings["reorder_k"]) < 1:
    raise ValueError(f"reorder_k must be >= 1, got {settings['reorder_k']}")
  return settings


class NumpySearcher:
  """ScaNN's brute-force INT8 search in numpy, for machines without ScaNN (``vectors``: the dequantized codes);
  with ``reorder`` rows, the best ``pre_reorder_k`` are rescored exactly."""

  def __init__(self, vectors: np.ndarray, reorder: np.ndarray | None = None):
    self.vectors, self.reorder = vectors, reorder

  @classmethod
  def quantized(cls, vectors: np.ndarray, reorder: bool) -> NumpySearcher:
    """Per-dimension codes as ScaNN makes them: ``round(x * m)``, ``m_j = 127 / max_i |x_ij|`` (1 for a zero column)."""
    peak = np.abs(vectors).max(axis=0)
    m = np.where(peak > 0, 127.0 / np.where(peak > 0, peak, 1.0), 1.0).astype(np.float32)
    codes = np.clip(np.rint(vectors * m), -127, 127)
    return cls((codes / m).astype(np.float32), vectors if reorder else None)

  def size(self) -> int:
    return len(self.vectors)

  def search_batched(self, queries: np.ndarray, k: int, pre_reorder_k: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    if self.reorder is None:
      return exact_search(self.vectors, queries, k)
    rows = exact_search(self.vectors, queries, min(max(k, pre_reorder_k or k), len(self.vectors)))[0]
    return sort_topk(rows, np.einsum("qd,qkd->qk", queries, self.reorder[rows]), k)

  def search_batched_parallel(self, queries: np.ndarray, k: int, pre_reorder_k: int | None = None,
                              batch_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return self.search_batched(queries, k, pre_reorder_k)  # numpy's BLAS is already multithreaded

  def serialize(self, directory: str, relative_path: bool = True) -> None:
    raise RuntimeError("saving an 'int8' or 'ah' index needs ScaNN: pip install 'rnr-jax[scann]'")


def build_scann(vectors: np.ndarray, kind: str, settings: Mapping[str, Any]):
  """A dot-product ScaNN searcher (a :class:`NumpySearcher` without ScaNN) for kind ``"int8"`` (codes
  ``round(x * m)``, ``m_j = 127 / max_i |x_ij|``), ``"int8_row"`` or ``"ah"``."""
  try:
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=import-outside-toplevel
  except ImportError:
    return NumpySearcher(vectors) if kind == "ah" else NumpySearcher.quantized(vectors, kind == "int8_row")

  builder = scann_ops_pybind.builder(vectors, 10, "dot_product")
  if kind == "int8":
    return builder.score_brute_force(quantize=True).build()
  if kind == "int8_row":
    return builder.score_brute_force(quantize=True).reorder(int(settings["reorder_k"]), quantize=False).build()
  return (builder.tree(num_leaves=settings["num_leaves"], num_leaves_to_search=settings["num_leaves_to_search"],
                       training_sample_size=settings["training_sample_size"])
          .score_ah(settings["dims_per_block"],
                    anisotropic_quantization_threshold=settings["anisotropic_quantization_threshold"])
          .reorder(settings["reorder_k"], quantize=settings["reorder_dtype"] == "int8")
          .build())


def scann_vectors(scann_dir: str) -> np.ndarray:
  """float32 vectors of a serialized ScaNN searcher: its float32 dataset, or ``codes / multipliers``, which
  quantize back to the same codes, so a rebuild from them loses no precision."""
  codes_path = os.path.join(scann_dir, "int8_dataset.npy")
  if os.path.isfile(codes_path):
    multipliers = np.load(os.path.join(scann_dir, "int8_multipliers.npy"), allow_pickle=False)
    return np.load(codes_path, allow_pickle=False).astype(np.float32) / multipliers
  return np.load(os.path.join(scann_dir, "dataset.npy"), allow_pickle=False).astype(np.float32)


def scann_search(searcher: Any, queries: np.ndarray, k: int,
                 pre_reorder_k: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Top-``k`` ``(rows [Q, k] int64, scores [Q, k] float32)`` of a ScaNN searcher; missing slots score ``-inf``."""
  if len(queries) > 1:
    batch = max(1, math.ceil(len(queries) / (os.cpu_count() or 1)))
    rows, scores = searcher.search_batched_parallel(queries, k, pre_reorder_k, batch_size=min(batch, 256))
  else:
    rows, scores = searcher.search_batched(queries, k, pre_reorder_k)
  return rows.astype(np.int64), np.where(np.isnan(scores), -np.inf, scores).astype(np.float32)  # NaN: ScaNN's pad
