"""Maximum-inner-product search over passage embeddings: :class:`DenseIndex`, its edits and its files.

Kinds (:data:`KINDS`): ``"exact"`` float32 brute force; ``"int8"`` ScaNN brute force over int8 codes with a
scale per dimension (the paper's INT8 index, §2.3); ``"int8_row"`` int8 codes with a scale per row, ranked
by exact reordering of the dequantized rows; ``"ah"`` ScaNN tree + anisotropic hashing, sub-linear for large
corpora. Every build measures recall@10 and @20 against exact float32 search. The search kernels are in
:mod:`rnr_jax.index_search`.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from rnr_jax.index_search import (ah_settings, build_scann, exact_search, merge_topk, recall_at_k, row_settings,
                                  scann_search, scann_vectors)
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

# Options each kind accepts at build time (beyond the common evaluation options).
_AH_OPTIONS = ("num_leaves", "num_leaves_to_search", "training_sample_size", "dims_per_block",
               "anisotropic_quantization_threshold", "reorder_k", "reorder_dtype")
_KIND_OPTIONS = {"exact": (), "int8": (), "int8_row": ("reorder_k",), "ah": _AH_OPTIONS}


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
  """``ids`` as a duplicate-free int64 ``[n]`` array, or a ValueError naming ``what``."""
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


class DenseIndex:
  """Maximum-inner-product index over passage embeddings with external passage ids.

  Build with :meth:`build`, query with :meth:`search`, edit with :meth:`add`,
  :meth:`remove`, :meth:`replace`, persist with :meth:`save` / :meth:`load`.
  ScaNN searchers are rebuilt rather than mutated: removed rows are tombstones, added
  rows live in a small exact float32 side index searched with every query, and
  :meth:`compact` (called by :meth:`save`) folds both into a fresh main index.
  """

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
    self._ids = np.zeros(0, np.int64)  # Passage id of each main row.
    self._removed = np.zeros(0, bool)  # Tombstones over main rows.
    self._order = np.zeros(0, np.int64)  # argsort(self._ids): id -> row lookups.
    self._delta_vectors = np.zeros((0, dim), np.float32)  # Added since the last (re)build.
    self._delta_ids = np.zeros(0, np.int64)

  # ------------------------------------------------------------------ building

  @classmethod
  def build(cls, embeddings: np.ndarray, kind: str = "int8", *, ids: np.ndarray | None = None,
            eval_queries: np.ndarray | None = None, num_eval_queries: int = 1000, seed: int = 0,
            **options: Any) -> "DenseIndex":
    """Builds an index over ``embeddings`` and measures its recall.

    ``"int8"`` and ``"int8_row"`` store a quarter of the float32 size (``"int8_row"``
    4 bytes more per row); ``"int8_row"`` suits vectors whose dimensions span very
    different ranges, and holds its dequantized float32 rows in memory while loaded.

    Args:
      embeddings: float32 ``[N, d]`` passage embeddings, ``N >= 1``.
      kind: one of :data:`KINDS`.
      ids: int64 ``[N]`` passage ids, unique and non-negative; ``arange(N)`` by default.
      eval_queries: ``[Q, d]`` queries for the recall measurement; by default
        ``num_eval_queries`` rows of ``embeddings`` sampled with ``seed``.
      num_eval_queries: sample size when ``eval_queries`` is not given (0 skips).
      seed: sampling seed.
      **options: ``"ah"`` settings overriding the defaults derived from the data
        (:func:`rnr_jax.index_search.ah_settings`): ``num_leaves``,
        ``num_leaves_to_search``, ``training_sample_size``, ``dims_per_block``,
        ``anisotropic_quantization_threshold``, ``reorder_k``, ``reorder_dtype``
        (``"int8"`` or ``"float32"``); ``"int8_row"``: ``reorder_k``.

    Returns:
      The index; ``build_report`` holds ``n``, ``dim``, ``build_seconds``,
      ``recall@10``, ``recall@20`` (1.0 by construction for ``"exact"``),
      ``eval_queries`` and ``eval_source``.
    """
    if kind not in KINDS:
      raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    unknown = set(options) - set(_KIND_OPTIONS[kind])
    if unknown:
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
      rng = np.random.default_rng(seed)
      eval_queries = x[np.sort(rng.choice(len(x), min(num_eval_queries, len(x)), replace=False))]
      source = f"{len(eval_queries)} sampled embeddings (seed {seed})"
    else:
      source = "none"
    index = cls(kind, x.shape[1], options)
    index._build_main(x, ids, eval_queries, reference="float32 embeddings")
    index.build_report["eval_source"] = source
    return index

  def _build_main(self, vectors: np.ndarray, ids: np.ndarray, eval_queries: np.ndarray | None,
                  reference: str) -> None:
    """(Re)builds the main rows from ``vectors`` and clears pending edits."""
    start = time.perf_counter()
    if self.kind == "exact":
      self._vectors, self._searcher = vectors, None
    elif self.kind == "int8_row":
      self.settings = row_settings(self.options)
      self._codes = quantize_rows(vectors)
      self._vectors, self._searcher = None, build_scann(self._dequantized(), self.kind, self.settings)
    else:
      self.settings = ah_settings(vectors, self.options) if self.kind == "ah" else {}
      self._vectors, self._searcher = None, build_scann(vectors, self.kind, self.settings)
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
    self._ids = ids
    self._removed = np.zeros(len(ids), bool)
    self._order = np.argsort(ids, kind="stable")
    self._delta_vectors = np.zeros((0, self.dim), np.float32)
    self._delta_ids = np.zeros(0, np.int64)

  # ----------------------------------------------------------------- inspection

  def __len__(self) -> int:
    """Number of live passages (main rows not removed + added rows)."""
    return int(len(self._ids) - self._removed.sum() + len(self._delta_ids))

  def __repr__(self) -> str:
    return (f"DenseIndex(kind={self.kind!r}, dim={self.dim}, size={len(self)}, "
            f"pending_edits={self.pending_edits})")

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

  def _main_rows(self, ids: np.ndarray) -> np.ndarray:
    """Main row of each id, or -1 where the id has no main row (removed rows included)."""
    if not len(self._ids):
      return np.full(len(ids), -1, np.int64)
    pos = np.minimum(np.searchsorted(self._ids, ids, sorter=self._order), len(self._ids) - 1)
    rows = self._order[pos]
    return np.where(self._ids[rows] == ids, rows, -1)

  def _live_mask(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(live, main_rows, in_delta)`` per id; ``main_rows`` is -1 for ids not live in the main rows."""
    rows = self._main_rows(ids)
    rows = np.where((rows >= 0) & ~self._removed[np.maximum(rows, 0)], rows, -1) if len(self._ids) else rows
    in_delta = np.isin(ids, self._delta_ids)
    return (rows >= 0) | in_delta, rows, in_delta

  # ------------------------------------------------------------------ searching

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` passages by inner product for each query.

    Args:
      queries: float32 ``[Q, d]``.
      k: number of results; clipped (with a ``UserWarning``) to ``len(self)``.

    Returns:
      ``(ids [Q, k] int64, scores [Q, k] float32)``, best first; ids are
      passage ids. Empty ``"ah"`` slots hold ``-1`` / ``-inf``.
    """
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
    if n_main - len(removed) == 0:
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
      order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
      rows, scores = np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)
    ids = self._ids[np.maximum(rows, 0)]
    ids[np.isneginf(scores)] = -1
    return ids, scores

  # ---------------------------------------------------------------------- edits

  def add(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
    """Adds passages, searchable at once (exact float32 side index until :meth:`compact`).

    Raises:
      ValueError: wrong shape, non-finite values, duplicate ids, or ids already
        in the index (use :meth:`replace` to change a passage's embedding).
    """
    x = _as_embeddings(embeddings, self.dim, "embeddings")
    ids = _as_ids(ids, len(x), "ids")
    present = self._live_mask(ids)[0]
    if present.any():
      raise ValueError(f"passage ids already in the index (use replace): {ids[present][:10].tolist()}")
    self._delta_vectors = np.concatenate([self._delta_vectors, x])
    self._delta_ids = np.concatenate([self._delta_ids, ids])

  def remove(self, passage_ids: np.ndarray) -> None:
    """Removes passages; they are never returned again.

    Raises:
      KeyError: some ids are not in the index (nothing is removed then).
    """
    ids = _as_ids(np.atleast_1d(passage_ids), np.size(passage_ids), "passage_ids")
    live, rows, in_delta = self._live_mask(ids)
    if not live.all():
      raise KeyError(f"passage ids not in the index: {ids[~live][:10].tolist()}")
    self._removed[rows[rows >= 0]] = True
    keep = ~np.isin(self._delta_ids, ids[in_delta])
    self._delta_vectors, self._delta_ids = self._delta_vectors[keep], self._delta_ids[keep]

  def replace(self, embeddings: np.ndarray, ids: np.ndarray) -> None:
    """Replaces the embeddings of passages already in the index (remove + add, atomically).

    Raises:
      KeyError: some ids are not in the index. ValueError: as :meth:`add`.
    """
    x = _as_embeddings(embeddings, self.dim, "embeddings")
    ids = _as_ids(ids, len(x), "ids")
    live = self._live_mask(ids)[0]
    if not live.all():
      raise KeyError(f"passage ids not in the index: {ids[~live][:10].tolist()}")
    self.remove(ids)
    self.add(x, ids)

  def compact(self, num_eval_queries: int = 1000, seed: int = 0) -> None:
    """Folds pending edits into a freshly built main index (no-op without edits).

    The rebuild starts from the stored vectors (for ScaNN kinds, the dequantized
    int8 codes, or the float32 reordering vectors of a float32-reordered
    ``"ah"``) plus the added float32 rows, and re-measures recall against
    exact search over those same vectors.
    """
    if not self.pending_edits:
      return
    if len(self) == 0:
      raise ValueError("cannot compact an empty index: every passage was removed")
    keep = ~self._removed
    vectors = np.concatenate([self._main_vectors()[keep], self._delta_vectors])
    ids = np.concatenate([self._ids[keep], self._delta_ids])
    eval_queries = None
    if num_eval_queries > 0:
      rng = np.random.default_rng(seed)
      eval_queries = vectors[np.sort(rng.choice(len(ids), min(num_eval_queries, len(ids)), replace=False))]
    reference = "float32 embeddings" if self.kind == "exact" else "stored vectors + added embeddings"
    self._build_main(vectors, ids, eval_queries, reference=reference)
    self.build_report["eval_source"] = (f"{len(eval_queries)} sampled rows (seed {seed}), after compaction"
                                        if eval_queries is not None else "none")

  def _dequantized(self) -> np.ndarray:
    return dequantize_rows(*self._codes)

  def _main_vectors(self) -> np.ndarray:
    """float32 ``[n_main, d]`` vectors of the main rows (dequantized for ScaNN kinds)."""
    if self.kind == "exact":
      return self._vectors
    if self.kind == "int8_row":
      return self._dequantized()
    with tempfile.TemporaryDirectory(prefix="rnr_index_") as tmp:
      self._searcher.serialize(tmp, relative_path=True)
      return scann_vectors(tmp)

  # ------------------------------------------------------------- serialisation

  def save(self, directory: PathLike) -> dict[str, int]:
    """Writes the index to ``directory`` atomically; compacts pending edits first.

    An existing index directory there is replaced; any other non-empty directory is refused.
    Files::

      index.json      kind, dim, size, options, settings, build report, and the byte
                      size and sha256 of every other file
      ids.npy         int64[N]: the passage id of each row
      vectors.npy     float32[N, d]                                        ("exact")
      codes.npy       int8[N, d]; row_scales.npy float32[N]; codes * scale
                      is the stored row                                    ("int8_row")
      scann/          ScaNN's serialization with relative asset paths, so the directory
                      can be moved ("int8", "ah"); for "int8" its int8_dataset.npy and
                      int8_multipliers.npy are the codes and per-dimension multipliers

    Returns:
      ``{relative file path: bytes}`` of every file written.
    """
    if len(self) == 0:
      raise ValueError("cannot save an empty index: every passage was removed")
    directory = os.fspath(directory)
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.isfile(os.path.join(directory, META_FILE)):
      raise FileExistsError(f"{directory}: exists and is not an index directory; refusing to replace it")
    self.compact()
    with atomic_dir(directory) as tmp:
      np.save(os.path.join(tmp, IDS_FILE), self._ids, allow_pickle=False)
      if self.kind == "exact":
        np.save(os.path.join(tmp, VECTORS_FILE), self._vectors, allow_pickle=False)
      elif self.kind == "int8_row":
        np.save(os.path.join(tmp, CODES_FILE), self._codes[0], allow_pickle=False)
        np.save(os.path.join(tmp, ROW_SCALES_FILE), self._codes[1], allow_pickle=False)
      else:
        os.makedirs(os.path.join(tmp, SCANN_DIR))
        self._searcher.serialize(os.path.join(tmp, SCANN_DIR), relative_path=True)
      files = {rel: {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
               for rel, full in relative_files(tmp)}
      meta = {"format": FORMAT, "version": VERSION, "kind": self.kind, "dim": self.dim, "size": len(self._ids),
              "options": self.options, "settings": self.settings, "build_report": self.build_report,
              "files": files}
      atomic_write_json(os.path.join(tmp, META_FILE), meta)
    sizes = {rel: rec["bytes"] for rel, rec in files.items()}
    sizes[META_FILE] = os.path.getsize(os.path.join(directory, META_FILE))
    return sizes

  @classmethod
  def load(cls, directory: PathLike, verify: bool = True) -> "DenseIndex":
    """Loads an index written by :meth:`save`.

    Args:
      directory: the index directory.
      verify: also check every file's sha256 (sizes and array headers are always checked).

    Raises:
      IndexFileError: a file is missing, truncated, corrupt or inconsistent with ``index.json``.
    """
    directory = os.fspath(directory)
    meta_path = os.path.join(directory, META_FILE)
    meta = _read_meta(meta_path)
    for rel, rec in meta["files"].items():
      check_file(os.path.join(directory, rel), rec["bytes"], rec["sha256"], verify=verify, recorded_in=META_FILE,
                 error=IndexFileError)
    index = cls(meta["kind"], meta["dim"], meta["options"])
    index.settings = meta["settings"]
    index.build_report = meta["build_report"]
    n, dim = meta["size"], meta["dim"]
    ids_path = os.path.join(directory, IDS_FILE)
    _check_npy(ids_path, (n,), np.int64)
    ids = np.load(ids_path, allow_pickle=False)
    if index.kind == "exact":
      vec_path = os.path.join(directory, VECTORS_FILE)
      _check_npy(vec_path, (n, dim), np.float32)
      index._vectors = np.load(vec_path, allow_pickle=False)
    elif index.kind == "int8_row":
      codes_path, scales_path = os.path.join(directory, CODES_FILE), os.path.join(directory, ROW_SCALES_FILE)
      _check_npy(codes_path, (n, dim), np.int8)
      _check_npy(scales_path, (n,), np.float32)
      index._codes = (np.load(codes_path, allow_pickle=False), np.load(scales_path, allow_pickle=False))
      if not np.all(np.isfinite(index._codes[1]) & (index._codes[1] > 0)):
        raise IndexFileError(scales_path, "row scales must be finite and positive")
      index.settings = row_settings(index.options)
      index._searcher = build_scann(index._dequantized(), index.kind, index.settings)
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


def _read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of an ``.npy`` file, or an IndexFileError."""
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise IndexFileError(path, f"not a readable .npy array ({e})") from e
  return arr.shape, arr.dtype


def _check_npy(path: str, shape: tuple[int, ...], dtype: type) -> None:
  """Raises IndexFileError unless ``path`` is an ``.npy`` array of ``shape`` and ``dtype``."""
  got_shape, got_dtype = _read_npy_header(path)
  if got_shape != shape or got_dtype != np.dtype(dtype):
    raise IndexFileError(path, f"holds {got_dtype}{list(got_shape)}, expected {np.dtype(dtype)}{list(shape)}")


def _load_scann(scann_dir: str, n: int, dim: int):
  """Loads a serialized ScaNN searcher after checking its array files."""
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=import-outside-toplevel

  assets = os.path.join(scann_dir, "scann_assets.pbtxt")
  if not os.path.isfile(assets):
    raise IndexFileError(assets, "missing")
  expected = {"int8_dataset.npy": ((n, dim), np.int8), "int8_multipliers.npy": ((dim,), np.float32),
              "dataset.npy": ((n, dim), np.float32), "datapoint_to_token.npy": ((n,), None)}
  for name in sorted(os.listdir(scann_dir)):
    if not name.endswith(".npy"):
      continue
    path = os.path.join(scann_dir, name)
    shape, dtype = _read_npy_header(path)
    want_shape, want_dtype = expected.get(name, (None, None))
    if want_shape is not None and shape[:len(want_shape)] != want_shape:
      raise IndexFileError(path, f"shape {list(shape)}, expected {list(want_shape)}")
    if want_dtype is not None and dtype != np.dtype(want_dtype):
      raise IndexFileError(path, f"dtype {dtype}, expected {np.dtype(want_dtype)}")
  try:
    searcher = scann_ops_pybind.load_searcher(scann_dir, assets_backcompat_shim=False)
  except (RuntimeError, ValueError) as e:
    raise IndexFileError(scann_dir, f"ScaNN cannot load it ({e})") from e
  if searcher.size() != n:
    raise IndexFileError(assets, f"searcher holds {searcher.size()} rows, index.json records {n}")
  return searcher
