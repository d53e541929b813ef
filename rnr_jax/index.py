"""Maximum-inner-product search over passage embeddings: :class:`DenseIndex`, its edits and its files.

Kinds: ``"exact"`` float32; ``"int8"`` ScaNN over int8 codes, a scale per dimension (paper §2.3); ``"int8_row"`` a
scale per row, exactly reordered; ``"ah"`` ScaNN tree + anisotropic hashing. Without ScaNN, numpy searches them."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from rnr_jax.index_search import (NumpySearcher, ah_settings, build_scann, exact_search, merge_topk, recall_at_k,
                                  row_settings, scann_search, scann_vectors, sort_topk)
from rnr_jax.io import BadFileError, atomic_dir, atomic_write_json, check_file, read_json, relative_files, sha256_file
from rnr_jax.quantize import dequantize_rows, quantize_rows

PathLike = str | os.PathLike

KINDS = ("exact", "int8", "int8_row", "ah")
FORMAT = "rnr_jax.dense_index"
VERSION = 1
META_FILE = "index.json"
IDS_FILE = "ids.npy"
VECTORS_FILE = "vectors.npy"
SCANN_DIR = "scann"
CODES_FILE = "codes.npy"
ROW_SCALES_FILE = "row_scales.npy"
RECALL_KS = (10, 20)

_KIND_OPTIONS = {"exact": (), "int8": (), "int8_row": ("reorder_k",),
                 "ah": ("num_leaves", "num_leaves_to_search", "training_sample_size", "dims_per_block",
                        "anisotropic_quantization_threshold", "reorder_k", "reorder_dtype")}


class IndexFileError(BadFileError):
  """An index file is missing, truncated, corrupt or inconsistent; ``path`` names it."""


def _as_embeddings(x: Any, dim: int | None, what: str) -> np.ndarray:
  """``x`` as a C-contiguous finite float32 ``[n, dim]`` array, or a ValueError naming ``what``."""
  x = np.ascontiguousarray(x, dtype=np.float32)
  if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
    want = f"[n, {dim}]" if dim is not None else "[n, d]"
    raise ValueError(f"{what} must be a 2-D {want} array, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"{what} contain NaN or infinite values")
  return x


def _as_ids(ids: Any, n: int, what: str) -> np.ndarray:
  """``ids`` as a duplicate-free non-negative int64 ``[n]`` array, or a ValueError naming ``what``."""
  arr = np.asarray(ids)
  if arr.ndim != 1 or len(arr) != n or (n and arr.dtype.kind not in "iu"):
    raise ValueError(f"{what} must be {n} integers in a 1-D array, got shape {arr.shape} dtype {arr.dtype}")
  arr = arr.astype(np.int64)
  if n and (arr < 0).any():
    raise ValueError(f"{what} must be non-negative (-1 marks an empty result slot)")
  uniq, counts = np.unique(arr, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"{what} contain duplicates, e.g. {uniq[counts > 1][:5].tolist()}")
  return arr


def _quantize_blocked(x: np.ndarray, block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
  """:func:`quantize_rows` a block of rows at a time, so its float32 temporaries stay small for any corpus."""
  codes, scales = np.empty(x.shape, np.int8), np.empty(len(x), np.float32)
  for first in range(0, len(x), block):
    codes[first:first + block], scales[first:first + block] = quantize_rows(x[first:first + block])
  return codes, scales


class _Dequantized:
  """int8 rows read as float32 on indexing: exact search and sampling over them make no float32 copy of them all."""

  def __init__(self, codes: np.ndarray, scales: np.ndarray):
    self.parts = codes, scales

  def __len__(self) -> int:
    return len(self.parts[0])

  def __getitem__(self, rows: Any) -> np.ndarray:
    return dequantize_rows(self.parts[0][rows], self.parts[1][rows])


def _sample_rows(x: np.ndarray, num: int, seed: int) -> np.ndarray:
  """``min(num, len(x))`` distinct rows of ``x``, in order, drawn with ``seed``."""
  return x[np.sort(np.random.default_rng(seed).choice(len(x), min(num, len(x)), replace=False))]


class DenseIndex:
  """Maximum-inner-product index over passage embeddings with external passage ids; edits go to tombstones and an
  exact side index until :meth:`compact` (called by :meth:`save`) rebuilds the main index."""

  def __init__(self, kind: str, dim: int, options: Mapping[str, Any]):
    """Empty shell; use :meth:`build` or :meth:`load`."""
    if kind not in KINDS:
      raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    self.kind = kind
    self.dim = dim
    # Build overrides (re-applied when compacting), as plain Python scalars for index.json.
    self.options = {k: v.item() if isinstance(v, np.generic) else v for k, v in options.items()}
    self.settings: dict[str, Any] = {}  # Resolved ScaNN settings ("ah", "int8_row").
    self.build_report: dict[str, Any] = {}
    self._vectors: np.ndarray | None = None  # "exact" main rows.
    self._searcher = None  # "int8" / "int8_row" / "ah" main rows.
    self._codes: tuple[np.ndarray, np.ndarray] | None = None  # "int8_row": (codes, row scales).
    self._set_rows(np.zeros(0, np.int64))

  @classmethod
  def build(cls, embeddings: np.ndarray, kind: str = "int8", *, ids: np.ndarray | None = None,
            eval_queries: np.ndarray | None = None, num_eval_queries: int = 1000, seed: int = 0,
            **options: Any) -> "DenseIndex":
    """An index over float32 ``embeddings [N, d]`` with passage ``ids`` (default ``arange(N)``); ``build_report``
    gets recall@10 and @20 on ``eval_queries`` (or sampled rows); ``options``: ``_KIND_OPTIONS``."""
    if kind not in KINDS:
      raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    if unknown := set(options) - set(_KIND_OPTIONS[kind]):
      raise ValueError(f"unknown options for a {kind!r} index: {sorted(unknown)}; "
                       f"accepted: {list(_KIND_OPTIONS[kind])}")
    x = _as_embeddings(embeddings, None, "embeddings")
    if len(x) == 0:
      raise ValueError("cannot build an index over zero embeddings")
    if kind == "exact" and np.may_share_memory(x, embeddings):
      x = x.copy()  # The index keeps these rows: later changes to the caller's array must not leak in.
    ids = np.arange(len(x), dtype=np.int64) if ids is None else _as_ids(ids, len(x), "ids")
    if eval_queries is not None:
      eval_queries = _as_embeddings(eval_queries, x.shape[1], "eval_queries")
      source = "given"
    elif num_eval_queries > 0:
      eval_queries = _sample_rows(x, num_eval_queries, seed)
      source = f"{len(eval_queries)} sampled embeddings (seed {seed})"
    else:
      source = "none"
    index = cls(kind, x.shape[1], options)
    index._build_main(x, ids, eval_queries, reference="float32 embeddings")
    index.build_report["eval_source"] = source
    return index

  def _build_main(self, vectors: Any, ids: np.ndarray, eval_queries: np.ndarray | None, reference: str) -> None:
    """(Re)builds the main rows from ``vectors`` (``int8_row``: or ``_Dequantized`` codes); clears pending edits."""
    start = time.perf_counter()
    self._searcher = None  # the old one's memory goes before the new one's arrives
    if self.kind == "exact":
      self._vectors = vectors
    elif self.kind == "int8_row":
      self.settings = row_settings(self.options)
      self._codes = vectors.parts if isinstance(vectors, _Dequantized) else _quantize_blocked(vectors)
      self._searcher = build_scann(dequantize_rows(*self._codes), self.kind, self.settings)
    else:
      self.settings = ah_settings(vectors, self.options) if self.kind == "ah" else {}
      self._searcher = build_scann(vectors, self.kind, self.settings)
    self._set_rows(ids)
    report: dict[str, Any] = {"kind": self.kind, "n": len(ids), "dim": self.dim,
                              "build_seconds": round(time.perf_counter() - start, 3), "reference": reference}
    if self.settings:
      report["settings"] = dict(self.settings)
    if eval_queries is not None and len(eval_queries):
      report["eval_queries"] = len(eval_queries)
      for k in RECALL_KS:
        if self.kind == "exact":
          report[f"recall@{k}"] = 1.0
          continue
        ref, _ = exact_search(vectors, eval_queries, min(k, len(ids)))
        got, _ = self.search(eval_queries, min(k, len(ids)))
        report[f"recall@{k}"] = round(recall_at_k(ids[ref], got), 5)
    self.build_report = report

  def _set_rows(self, ids: np.ndarray) -> None:
    self._ids = ids  # Passage id of each main row.
    self._removed = np.zeros(len(ids), bool)  # Tombstones over main rows.
    self._order = np.argsort(ids, kind="stable")  # id -> row lookups.
    self._delta_vectors = np.zeros((0, self.dim), np.float32)  # Added since the last (re)build.
    self._delta_ids = np.zeros(0, np.int64)

  def __len__(self) -> int:
    return int(len(self._ids) - self._removed.sum() + len(self._delta_ids))

  def __repr__(self) -> str:
    return f"DenseIndex(kind={self.kind!r}, dim={self.dim}, size={len(self)}, pending_edits={self.pending_edits})"

  @property
  def ids(self) -> np.ndarray:
    """Passage ids of the live passages: main rows in order, then added ones."""
    return np.concatenate([self._ids[~self._removed], self._delta_ids])

  @property
  def pending_edits(self) -> int:
    """Removed main rows plus added rows not yet folded in by :meth:`compact`."""
    return int(self._removed.sum() + len(self._delta_ids))

  def __contains__(self, passage_id: int) -> bool:
    return bool(self._live_mask(np.asarray([passage_id], np.int64))[0][0])

  def _live_mask(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(live, main_rows, in_delta)`` per id; ``main_rows`` is -1 for ids not live in the main rows."""
    rows = np.full(len(ids), -1, np.int64)
    if len(self._ids):
      found = self._order[np.minimum(np.searchsorted(self._ids, ids, sorter=self._order), len(self._ids) - 1)]
      rows = np.where((self._ids[found] == ids) & ~self._removed[found], found, -1)
    in_delta = np.isin(ids, self._delta_ids)
    return (rows >= 0) | in_delta, rows, in_delta

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [Q, k] int64, scores [Q, k] float32)`` of the best passages by inner product, best first; ``k`` is
    clipped, with a ``UserWarning``, to ``len(self)``; empty ``"ah"`` slots hold ``-1`` / ``-inf``."""
    q = _as_embeddings(queries, self.dim, "queries")
    live = len(self)
    if live == 0:
      raise ValueError("the index is empty: every passage was removed")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    if k > live:
      warnings.warn(f"k={k} exceeds the {live} passages in the index; returning {live} per query", stacklevel=2)
      k = live
    ids, scores = self._search_main(q, k)
    if len(self._delta_ids):
      rows, d_scores = exact_search(self._delta_vectors, q, min(k, len(self._delta_ids)))
      ids, scores = merge_topk(ids, scores, self._delta_ids[rows], d_scores, k)
    return ids, scores

  def _search_main(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` live main rows as passage ids (``-1`` / ``-inf`` where fewer exist)."""
    n_main = len(self._ids)
    removed = np.flatnonzero(self._removed)
    if n_main == len(removed):
      return np.full((len(q), 0), -1, np.int64), np.zeros((len(q), 0), np.float32)
    if self.kind == "exact":
      rows, scores = exact_search(self._vectors, q, min(k, n_main), removed)
    else:
      # Over-fetch by the number of removed rows so that k live rows remain after filtering.
      fetch = min(n_main, k + len(removed))
      pre = max(fetch, self.settings.get("reorder_k", 0)) if self.kind in ("ah", "int8_row") else None
      rows, scores = scann_search(self._searcher, q, fetch, pre)
      if len(removed):
        scores[self._removed[rows]] = -np.inf
      rows, scores = sort_topk(rows, scores, k)
    ids = self._ids[np.maximum(rows, 0)]
    ids[np.isneginf(scores)] = -1
    return ids, scores

  def add(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
    """Adds passages, searchable at once (in the exact side index until :meth:`compact`); ids must be new."""
    x = _as_embeddings(embeddings, self.dim, "embeddings")
    ids = _as_ids(ids, len(x), "ids")
    present = self._live_mask(ids)[0]
    if present.any():
      raise ValueError(f"passage ids already in the index (use replace): {ids[present][:10].tolist()}")
    self._delta_vectors = np.concatenate([self._delta_vectors, x])
    self._delta_ids = np.concatenate([self._delta_ids, ids])

  def remove(self, passage_ids: np.ndarray) -> None:
    """Removes passages for good; raises KeyError, removing nothing, if some ids are not in the index."""
    ids = _as_ids(np.atleast_1d(passage_ids), np.size(passage_ids), "passage_ids")
    live, rows, in_delta = self._live_mask(ids)
    if not live.all():
      raise KeyError(f"passage ids not in the index: {ids[~live][:10].tolist()}")
    self._removed[rows[rows >= 0]] = True
    keep = ~np.isin(self._delta_ids, ids[in_delta])
    self._delta_vectors, self._delta_ids = self._delta_vectors[keep], self._delta_ids[keep]

  def replace(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
    """Replaces the embeddings of passages in the index; all or nothing, raising as :meth:`remove` and :meth:`add`."""
    x = _as_embeddings(embeddings, self.dim, "embeddings")
    ids = _as_ids(ids, len(x), "ids")
    self.remove(ids)  # Checks every id before removing any; x is valid, so the add cannot fail.
    self.add(x, ids)

  def compact(self, num_eval_queries: int = 1000, seed: int = 0) -> None:
    """Folds pending edits into a main index rebuilt from the stored and added vectors, its recall measured again."""
    if not self.pending_edits:
      return
    if len(self) == 0:
      raise ValueError("cannot compact an empty index: every passage was removed")
    keep = ~self._removed
    if self.kind == "int8_row":  # the kept rows keep their codes: no float32 copy of the index is made
      added = _quantize_blocked(self._delta_vectors)
      vectors = _Dequantized(*(np.concatenate([a[keep], b]) for a, b in zip(self._codes, added)))
    else:
      vectors = np.concatenate([self._main_vectors()[keep], self._delta_vectors])
    ids = np.concatenate([self._ids[keep], self._delta_ids])
    eval_queries = _sample_rows(vectors, num_eval_queries, seed) if num_eval_queries > 0 else None
    self._build_main(vectors, ids, eval_queries,
                     reference="float32 embeddings" if self.kind == "exact" else "stored vectors + added embeddings")
    self.build_report["eval_source"] = (f"{len(eval_queries)} sampled rows (seed {seed}), after compaction"
                                        if eval_queries is not None else "none")

  def _main_vectors(self) -> np.ndarray:
    """float32 ``[n_main, d]`` vectors of the main rows (dequantized for ScaNN kinds but ``int8_row``)."""
    if self.kind == "exact":
      return self._vectors
    if isinstance(self._searcher, NumpySearcher):
      return self._searcher.vectors
    with tempfile.TemporaryDirectory(prefix="rnr_index_") as tmp:
      self._searcher.serialize(tmp, relative_path=True)
      return scann_vectors(tmp)

  def save(self, directory: PathLike) -> dict[str, int]:
    """Writes the index to ``directory`` atomically (compacting first; only an index directory is replaced):
    ``index.json`` with the others' sha256, ``ids.npy`` and the kind's arrays; returns ``{file: bytes}``."""
    if len(self) == 0:
      raise ValueError("cannot save an empty index: every passage was removed")
    directory = os.fspath(directory)
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.isfile(os.path.join(directory, META_FILE)):
      raise FileExistsError(f"{directory}: exists and is not an index directory; refusing to replace it")
    self.compact()
    with atomic_dir(directory) as tmp:
      arrays = {IDS_FILE: self._ids}
      if self.kind == "exact":
        arrays[VECTORS_FILE] = self._vectors
      elif self.kind == "int8_row":
        arrays[CODES_FILE], arrays[ROW_SCALES_FILE] = self._codes
      else:
        os.makedirs(os.path.join(tmp, SCANN_DIR))
        self._searcher.serialize(os.path.join(tmp, SCANN_DIR), relative_path=True)
      for name, arr in arrays.items():
        np.save(os.path.join(tmp, name), arr, allow_pickle=False)
      files = {rel: {"bytes": os.path.getsize(full), "sha256": sha256_file(full)} for rel, full in relative_files(tmp)}
      atomic_write_json(os.path.join(tmp, META_FILE), {
          "format": FORMAT, "version": VERSION, "kind": self.kind, "dim": self.dim, "size": len(self._ids),
          "options": self.options, "settings": self.settings, "build_report": self.build_report, "files": files})
    return {**{rel: rec["bytes"] for rel, rec in files.items()},
            META_FILE: os.path.getsize(os.path.join(directory, META_FILE))}

  @classmethod
  def load(cls, directory: PathLike, verify: bool = True) -> "DenseIndex":
    """Loads a :meth:`save` directory, checking sizes, array headers and (``verify``) sha256 of every file."""
    directory = os.fspath(directory)
    meta = _read_meta(os.path.join(directory, META_FILE))
    for rel, rec in meta["files"].items():
      check_file(os.path.join(directory, rel), rec["bytes"], rec["sha256"], verify=verify, recorded_in=META_FILE,
                 error=IndexFileError)
    index = cls(meta["kind"], meta["dim"], meta["options"])
    index.settings = meta["settings"]
    index.build_report = meta["build_report"]
    n, dim = meta["size"], meta["dim"]
    ids = _load_npy(os.path.join(directory, IDS_FILE), (n,), np.int64)
    if index.kind == "exact":
      index._vectors = _load_npy(os.path.join(directory, VECTORS_FILE), (n, dim), np.float32)
    elif index.kind == "int8_row":
      scales_path = os.path.join(directory, ROW_SCALES_FILE)
      index._codes = (_load_npy(os.path.join(directory, CODES_FILE), (n, dim), np.int8),
                      _load_npy(scales_path, (n,), np.float32))
      if not np.all(np.isfinite(index._codes[1]) & (index._codes[1] > 0)):
        raise IndexFileError(scales_path, "row scales must be finite and positive")
      index.settings = row_settings(index.options)
      index._searcher = build_scann(dequantize_rows(*index._codes), index.kind, index.settings)
    else:
      index._searcher = _load_scann(os.path.join(directory, SCANN_DIR), n, dim)
    index._set_rows(ids)
    return index


def _read_meta(path: str) -> dict[str, Any]:
  """Parsed and checked ``index.json``, or an IndexFileError naming it."""
  meta = read_json(path, missing="missing (not an index directory?)", error=IndexFileError)
  required = ("format", "version", "kind", "dim", "size", "options", "settings", "build_report", "files")
  if not isinstance(meta, dict) or any(key not in meta for key in required):
    raise IndexFileError(path, f"expected an object with keys {list(required)}")
  if meta["format"] != FORMAT or meta["version"] != VERSION:
    raise IndexFileError(path, f"format {meta['format']!r} v{meta['version']}, expected {FORMAT!r} v{VERSION}")
  if meta["kind"] not in KINDS:
    raise IndexFileError(path, f"unknown index kind {meta['kind']!r}")
  return meta


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise IndexFileError(path, f"not a readable .npy array ({e})") from e
  return arr.shape, arr.dtype


def _load_npy(path: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
  """The ``.npy`` array at ``path``, or an IndexFileError unless it holds ``dtype[shape]``."""
  got_shape, got_dtype = _npy_header(path)
  if got_shape != shape or got_dtype != np.dtype(dtype):
    raise IndexFileError(path, f"holds {got_dtype}{list(got_shape)}, expected {np.dtype(dtype)}{list(shape)}")
  return np.load(path, allow_pickle=False)


def _load_scann(scann_dir: str, n: int, dim: int):
  """Loads a serialized ScaNN searcher after checking its array files (a :class:`NumpySearcher` without ScaNN)."""
  assets = os.path.join(scann_dir, "scann_assets.pbtxt")
  if not os.path.isfile(assets):
    raise IndexFileError(assets, "missing")
  expected = {"int8_dataset.npy": ((n, dim), np.int8), "int8_multipliers.npy": ((dim,), np.float32),
              "dataset.npy": ((n, dim), np.float32), "datapoint_to_token.npy": ((n,), None)}
  for name in sorted(os.listdir(scann_dir)):
    if not name.endswith(".npy"):
      continue
    path = os.path.join(scann_dir, name)
    shape, dtype = _npy_header(path)
    want_shape, want_dtype = expected.get(name, (None, None))
    if want_shape is not None and shape[:len(want_shape)] != want_shape:
      raise IndexFileError(path, f"shape {list(shape)}, expected {list(want_shape)}")
    if want_dtype is not None and dtype != np.dtype(want_dtype):
      raise IndexFileError(path, f"dtype {dtype}, expected {np.dtype(want_dtype)}")
  try:
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=import-outside-toplevel
  except ImportError:
    return NumpySearcher(scann_vectors(scann_dir))
  try:
    searcher = scann_ops_pybind.load_searcher(scann_dir, assets_backcompat_shim=False)
  except (RuntimeError, ValueError) as e:
    raise IndexFileError(scann_dir, f"ScaNN cannot load it ({e})") from e
  if searcher.size() != n:
    raise IndexFileError(assets, f"searcher holds {searcher.size()} rows, index.json records {n}")
  return searcher
