"""The deployable bundle: weights, index, token-ID corpus and tokenizer in one verified directory.

A bundle is what a minimal retrieve-and-read system ships (paper §2.3,
appendix A.4): FP16 weights, the (INT8) index, the token-ID corpus and the
tokenizer, each resource compressed (bzip2 -9 for binary files, lzma -9 for
text), with a manifest that lets a server verify every byte before use.

Layout (stored paths; a compressed file has a ``.bz2`` / ``.xz`` suffix)::

  <bundle>/
    manifest.json                 format, compression policy, footprint table and,
                                  per file: stored path, unpacked path, component,
                                  compression, stored and uncompressed bytes, sha256 of both
    config.json                   {"model": ..., "inference": ..., "weights": ..., "index": ...}
    model/params.safetensors.bz2  parameters as float16 values, keys '/'-joined pytree paths
    index/...                     DenseIndex.save output (index.json, ids.npy, scann/...)
    corpus/...                    the token-ID corpus directory, copied file by file
    tokenizer/...                 tokenizer files
    extra/<name>                  any extra files

``manifest.json`` and ``config.json`` stay uncompressed so a bundle can be
inspected with ``cat``; ``manifest.json`` is not listed in itself. Input files
that already are bzip2 / xz / gzip / zip / zstd streams, and files that would not
shrink, are stored as they are (compression ``"none"``). Components for the footprint table: ``model``
(parameters), ``index``, ``corpus``, and ``other`` (tokenizer, extras,
``config.json``). MB in the table are 10^6 bytes.

:func:`load_bundle` checks every stored file against the manifest (size always,
sha256 when ``verify``), decompresses compressed files once into a cache
directory ``<cache root>/<first 16 hex digits of the manifest's sha256>``, where
the cache root is ``cache_dir``, else ``<bundle>/.cache`` when the bundle is
writable, else ``$XDG_CACHE_HOME/rnr_jax`` (``~/.cache/rnr_jax``). Uncompressed
files are hard-linked (copied across filesystems) next to the decompressed ones
so that every component is one plain directory. A later load reuses the cache
when its record matches the manifest and its files match the recorded sizes
(and sha256 when ``verify``). A bundle without compressed files is used in place.

The weights are stored as float16 values and converted to ``param_dtype``
(float32 by default) on load, the paper's "FP32 graph, FP16 values" setting;
integer leaves are stored unchanged. Smaller settings (:data:`WEIGHTS_DTYPES`):
the word embeddings, or every matrix, as symmetric int8 with a float32 scale per
row (embedding tables) or per output unit (kernels), dequantized on load.
"""

from __future__ import annotations

import bz2
import codecs
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import lzma
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

from rnr_jax.index import DenseIndex, IndexFileError, sha256_file
from rnr_jax.io import atomic_dir, atomic_write_json

PathLike = str | os.PathLike

FORMAT = "rnr_jax.bundle"
VERSION = 1
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
PARAMS_FILE = "model/params.safetensors"
INDEX_DIR = "index"
CORPUS_DIR = "corpus"
TOKENIZER_DIR = "tokenizer"
EXTRA_DIR = "extra"
CACHE_RECORD = ".rnr_cache.json"
COMPONENTS = ("model", "index", "corpus", "other")
COMPRESSIONS = ("bz2", "lzma", "none")
SUFFIXES = {"bz2": ".bz2", "lzma": ".xz", "none": ""}
DEFAULT_COMPRESSION = {"binary": "bz2", "text": "lzma"}
# "float16+int8-embeddings": float16 values, but the word-embedding table (the largest tensor of a small encoder:
# 2/3 of a 3-layer MiniLM) as int8 with one float32 scale per row (symmetric, max-abs); dequantized on load.
# "int8": weight-only int8 for every matrix: embedding tables per row, dense kernels per output unit (column);
# vectors (biases, LayerNorm) float16. Half the float16 size; computed in float32 / bf16 after dequantization.
WEIGHTS_DTYPES = ("float16", "float32", "float16+int8-embeddings", "int8")
INT8_SCALE_SUFFIX = ":int8_row_scale"
INT8_COL_SCALE_SUFFIX = ":int8_col_scale"
_INT8_KEYS = ("word_embeddings/embedding",)

_CHUNK = 1 << 22
_MB = 1e6
# Leading bytes of already-compressed streams (bzip2 needs a further check, see _precompressed).
_MAGICS = (b"\xfd7zXZ\x00", b"\x1f\x8b", b"PK\x03\x04", b"\x28\xb5\x2f\xfd")


class BundleError(ValueError):
  """A bundle file (or the manifest) is missing, truncated, corrupt or inconsistent; ``path`` names it."""

  def __init__(self, path: PathLike, problem: str):
    self.path = os.fspath(path)
    super().__init__(f"{self.path}: {problem}")


@dataclasses.dataclass
class Bundle:
  """A loaded bundle.

  Attributes:
    root: the bundle directory.
    unpacked_dir: directory holding every file uncompressed (the cache, or
      ``root`` when nothing is compressed).
    params: nested dict of numpy arrays (floating leaves in ``param_dtype``).
    config: ``config.json``.
    index: the passage index.
    corpus_dir: unpacked token-ID corpus directory, or None.
    tokenizer_dir: unpacked tokenizer directory, or None.
    extra_files: ``{name: unpacked path}`` of the extra files.
    manifest: ``manifest.json``.
    unpacked_files: files decompressed by this load (0 when the cache was reused).
  """

  root: str
  unpacked_dir: str
  params: dict[str, Any]
  config: dict[str, Any]
  index: DenseIndex
  corpus_dir: str | None
  tokenizer_dir: str | None
  extra_files: dict[str, str]
  manifest: dict[str, Any]
  unpacked_files: int


@dataclasses.dataclass(frozen=True)
class _Source:
  """A file to store: its unpacked path in the bundle, where to read it, its component."""

  path: str
  source: str
  component: str
  compression: str | None = None  # Forced method; None: by content and policy.


# --------------------------------------------------------------------- params


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{'a/b/c': array}`` from a nested mapping (a Flax parameter pytree) of arrays."""
  flat: dict[str, np.ndarray] = {}

  def visit(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping):
      if not node:
        raise ValueError(f"empty mapping at {prefix or '<root>'!r}: it cannot round-trip through flat keys")
      for key, value in node.items():
        if not isinstance(key, str) or not key or "/" in key:
          raise ValueError(f"parameter keys must be non-empty strings without '/', got {key!r} under {prefix!r}")
        visit(value, f"{prefix}/{key}" if prefix else key)
    else:
      flat[prefix] = np.asarray(node)

  visit(params, "")
  return flat


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of :func:`flatten_params`."""
  tree: dict[str, Any] = {}
  for key in sorted(flat):
    node = tree
    *parents, leaf = key.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = flat[key]
  return tree


def _is_float(dtype: np.dtype) -> bool:
  return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


def _weights_to_store(params: Mapping[str, Any], weights_dtype: str) -> dict[str, np.ndarray]:
  """Flat params with floating leaves cast to ``weights_dtype``; raises on float16 overflow."""
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
  out = {}
  float_dtype = "float32" if weights_dtype == "float32" else "float16"
  for key, value in flatten_params(params).items():
    if not _is_float(value.dtype):
      out[key] = np.ascontiguousarray(value)
      continue
    layout = _int8_layout(key, value, weights_dtype)
    if layout == "rows":
      out[key], out[key + INT8_SCALE_SUFFIX] = quantize_rows_int8(value)
      continue
    if layout == "columns":
      out[key], out[key + INT8_COL_SCALE_SUFFIX] = quantize_columns_int8(value)
      continue
    with np.errstate(over="ignore"):  # Overflow is reported below, naming the parameter.
      cast = np.ascontiguousarray(value.astype(float_dtype))
    overflow = np.isfinite(value.astype(np.float32)) & ~np.isfinite(cast)
    if overflow.any():
      raise ValueError(f"parameter {key!r} has values beyond the {float_dtype} range; "
                       "store it with weights_dtype='float32'")
    out[key] = cast
  return out


def _int8_layout(key: str, value: np.ndarray, weights_dtype: str) -> str | None:
  """How ``weights_dtype`` stores a float tensor as int8: ``"rows"`` (embedding tables, a scale per row),
  ``"columns"`` (kernels, a scale per output unit) or None (not int8)."""
  table = key.endswith("/embedding") and value.ndim == 2
  if weights_dtype == "float16+int8-embeddings":
    return "rows" if table and key.endswith(_INT8_KEYS) else None
  if weights_dtype == "int8" and value.ndim >= 2:
    return "rows" if table else "columns"
  return None


def stored_values(params: Mapping[str, Any], weights_dtype: str) -> dict[str, Any]:
  """The float32 parameters a bundle written with ``weights_dtype`` loads back (values rounded as stored)."""
  flat = _dequantize_int8(_weights_to_store(params, weights_dtype), np.float32)
  return unflatten_params({k: v.astype(np.float32) if _is_float(v.dtype) else v for k, v in flat.items()})


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric per-row int8: ``(q int8 [R, C], scale float32 [R])`` with ``x ~= q * scale[:, None]``."""
  x = np.asarray(x, np.float32)
  scale = np.abs(x).max(axis=1) / 127.0
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  return np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8), scale


def dequantize_rows_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
  return q.astype(np.float32) * scale[:, None]


def quantize_columns_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8 per output unit of a kernel ``[in, *out]``: ``(q int8 [in, *out], scale float32 [*out])``."""
  x = np.asarray(x, np.float32)
  q, scale = quantize_rows_int8(x.reshape(x.shape[0], -1).T)
  return np.ascontiguousarray(q.T.reshape(x.shape)), scale.reshape(x.shape[1:])


def dequantize_columns_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
  return q.astype(np.float32) * scale[None]


def _dequantize_int8(flat: dict[str, np.ndarray], dtype: Any, path: str = "") -> dict[str, np.ndarray]:
  """Replaces every int8 tensor and its scale (``:int8_row_scale`` / ``:int8_col_scale``) by ``dtype`` values."""
  layouts = ((INT8_SCALE_SUFFIX, 2, lambda q: q.shape[:1], dequantize_rows_int8),  # [rows, columns], scale [rows]
             (INT8_COL_SCALE_SUFFIX, None, lambda q: q.shape[1:], dequantize_columns_int8))  # [in, *out], [*out]
  for suffix, ndim, scale_shape, dequantize in layouts:
    for key in [k for k in flat if k.endswith(suffix)]:
      name = key.removesuffix(suffix)
      q, scale = flat.get(name), flat.pop(key)
      if (q is None or q.dtype != np.int8 or q.ndim < 2 or (ndim and q.ndim != ndim)
          or scale.shape != scale_shape(q)):
        raise BundleError(path, f"{key!r} does not match an int8 tensor {name!r}")
      flat[name] = dequantize(q, scale).astype(dtype)
  return flat


def _load_params(path: str, param_dtype: Any) -> dict[str, Any]:
  try:
    flat = st_numpy.load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise BundleError(path, f"not a readable safetensors file ({e})") from e
  flat = _dequantize_int8(flat, np.float16 if param_dtype is None else np.float32, path)
  if param_dtype is not None:
    flat = {k: v.astype(param_dtype) if _is_float(v.dtype) else v for k, v in flat.items()}
  return unflatten_params(flat)


# ----------------------------------------------------------- storing files


def _precompressed(head: bytes) -> bool:
  """Whether a file starting with ``head`` already is a compressed stream."""
  if head.startswith(_MAGICS):
    return True
  return (len(head) >= 10 and head[:3] == b"BZh" and head[3:4] in b"123456789"
          and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"))


def _classify(path: str) -> str:
  """``"compressed"``, ``"text"`` (UTF-8 without NUL in the first 1 MiB) or ``"binary"``."""
  with open(path, "rb") as f:
    head = f.read(1 << 20)
    at_end = not f.read(1)
  if _precompressed(head):
    return "compressed"
  if b"\0" in head:
    return "binary"
  try:
    codecs.getincrementaldecoder("utf-8")().decode(head, final=at_end)
  except UnicodeDecodeError:
    return "binary"
  return "text"


def _compressor(method: str):
  if method == "bz2":
    return bz2.BZ2Compressor(9)
  if method == "lzma":
    return lzma.LZMACompressor(preset=9)
  raise ValueError(f"unknown compression {method!r}")


def _check_policy(compression: Mapping[str, str] | None) -> dict[str, str]:
  policy = dict(DEFAULT_COMPRESSION)
  if compression:
    unknown = set(compression) - set(policy)
    if unknown:
      raise ValueError(f"compression keys must be 'binary' and/or 'text', got {sorted(unknown)}")
    policy.update(compression)
  for kind, method in policy.items():
    if method not in COMPRESSIONS:
      raise ValueError(f"compression[{kind!r}] must be one of {COMPRESSIONS}, got {method!r}")
  return policy


def _store(src: _Source, out_root: str, policy: Mapping[str, str]) -> dict[str, Any]:
  """Writes ``src`` (compressed per ``policy``) under ``out_root``; returns its manifest entry."""
  method = src.compression
  if method is None:
    kind = _classify(src.source)
    method = "none" if kind == "compressed" else policy[kind]
  stored = src.path + SUFFIXES[method]
  dst = os.path.join(out_root, stored)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  raw_hash, stored_hash = hashlib.sha256(), hashlib.sha256()
  raw_bytes = stored_bytes = 0
  comp = None if method == "none" else _compressor(method)
  with open(src.source, "rb") as fin, open(dst, "wb") as fout:

    def emit(data: bytes) -> None:
      nonlocal stored_bytes
      if data:
        stored_hash.update(data)
        stored_bytes += len(data)
        fout.write(data)

    while block := fin.read(_CHUNK):
      raw_hash.update(block)
      raw_bytes += len(block)
      emit(comp.compress(block) if comp else block)
    if comp:
      emit(comp.flush())
  if comp and stored_bytes >= raw_bytes:  # Incompressible (or tiny): store the bytes as they are.
    os.remove(dst)
    return _store(dataclasses.replace(src, compression="none"), out_root, policy)
  return {"path": stored, "unpacked_path": src.path, "component": src.component, "compression": method,
          "bytes": stored_bytes, "sha256": stored_hash.hexdigest(),
          "raw_bytes": raw_bytes, "raw_sha256": raw_hash.hexdigest()}


def _copy_stored(entry: Mapping[str, Any], old_root: str, out_root: str) -> dict[str, Any]:
  """Copies a stored file of an existing bundle unchanged, checking it against its entry."""
  src = os.path.join(old_root, entry["path"])
  _check_stored(src, entry, verify=False)
  dst = os.path.join(out_root, entry["path"])
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  h = hashlib.sha256()
  with open(src, "rb") as fin, open(dst, "wb") as fout:
    while block := fin.read(_CHUNK):
      h.update(block)
      fout.write(block)
  if h.hexdigest() != entry["sha256"]:
    raise BundleError(src, "sha256 does not match the manifest (corrupt)")
  return dict(entry)


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
  """``[fn(x) for x in items]`` on a thread pool (bz2, lzma and hashlib release the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    return list(pool.map(fn, items))


def _tree_sources(directory: PathLike, prefix: str, component: str) -> list[_Source]:
  """Every regular file under ``directory`` (recursively), stored under ``prefix/``."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: not a directory")
  out = []
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, directory).replace(os.sep, "/")
      out.append(_Source(f"{prefix}/{rel}", full, component))
  return out


def _tokenizer_sources(tokenizer: PathLike | Iterable[PathLike]) -> list[_Source]:
  if isinstance(tokenizer, (str, os.PathLike)):
    return _tree_sources(tokenizer, TOKENIZER_DIR, "other")
  out = []
  for path in tokenizer:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: tokenizer file not found")
    out.append(_Source(f"{TOKENIZER_DIR}/{os.path.basename(path)}", path, "other"))
  if len({s.path for s in out}) != len(out):
    raise ValueError("tokenizer files must have distinct base names")
  return out


def _extra_sources(extra_files: Mapping[str, PathLike]) -> list[_Source]:
  out = []
  for name, path in sorted(extra_files.items()):
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
      raise ValueError(f"extra file name {name!r} must be a relative path without '.' or '..' parts")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{os.fspath(path)}: extra file {name!r} not found")
    out.append(_Source(f"{EXTRA_DIR}/{name}", os.fspath(path), "other"))
  return out


def _params_source(staging: str, params: Mapping[str, Any], weights_dtype: str) -> _Source:
  path = os.path.join(staging, "params.safetensors")
  st_numpy.save_file(_weights_to_store(params, weights_dtype), path,
                     metadata={"format": "rnr_jax.params", "stored_dtype": weights_dtype})
  return _Source(PARAMS_FILE, path, "model")


def _index_sources(staging: str, index: DenseIndex) -> list[_Source]:
  index_dir = os.path.join(staging, "index")
  index.save(index_dir)
  return _tree_sources(index_dir, INDEX_DIR, "index")


def _config_source(staging: str, config: Mapping[str, Any]) -> _Source:
  path = os.path.join(staging, CONFIG_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return _Source(CONFIG_FILE, path, "other", compression="none")


def _make_config(model_config: Mapping[str, Any], inference_config: Mapping[str, Any] | None,
                 weights_dtype: str, index: DenseIndex | Mapping[str, Any]) -> dict[str, Any]:
  index_info = index if isinstance(index, Mapping) else {"kind": index.kind, "dim": index.dim, "size": len(index)}
  return {"model": dict(model_config), "inference": dict(inference_config or {}),
          "weights": {"file": PARAMS_FILE, "stored_dtype": weights_dtype, "compute_dtype": "float32"},
          "index": dict(index_info)}


# ------------------------------------------------------------------ footprint


def footprint(files: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per-component size rows (like the paper's Table 3) plus a ``total`` row.

  Each row: ``component``, ``files``, ``stored_bytes``, ``raw_bytes`` (uncompressed),
  ``stored_mb``, ``raw_mb``.
  """
  rows = {c: {"component": c, "files": 0, "stored_bytes": 0, "raw_bytes": 0} for c in (*COMPONENTS, "total")}
  for entry in files:
    for name in (entry["component"], "total"):
      rows[name]["files"] += 1
      rows[name]["stored_bytes"] += entry["bytes"]
      rows[name]["raw_bytes"] += entry["raw_bytes"]
  for row in rows.values():
    row["stored_mb"] = round(row["stored_bytes"] / _MB, 3)
    row["raw_mb"] = round(row["raw_bytes"] / _MB, 3)
  return list(rows.values())


def format_footprint(rows: Sequence[Mapping[str, Any]]) -> str:
  """The footprint rows as a markdown table."""
  lines = ["| component | files | stored (MB) | uncompressed (MB) | stored bytes | uncompressed bytes |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['component']} | {r['files']} | {r['stored_mb']:.2f} | {r['raw_mb']:.2f} | "
                 f"{r['stored_bytes']:,} | {r['raw_bytes']:,} |")
  return "\n".join(lines)


# ---------------------------------------------------------------- writing


def _write(out_dir: PathLike, sources: Sequence[_Source], carried: Sequence[Mapping[str, Any]],
           carried_root: str | None, policy: Mapping[str, str], weights_dtype: str) -> dict[str, Any]:
  """Stores ``sources``, copies ``carried`` entries from ``carried_root``, writes the manifest; atomic."""
  with atomic_dir(out_dir) as tmp:
    entries = _parallel(lambda s: _store(s, tmp, policy), sources)
    entries += _parallel(lambda e: _copy_stored(e, carried_root, tmp), carried)
    paths = [e["unpacked_path"] for e in entries]
    if len(set(paths)) != len(paths):
      raise ValueError(f"two bundle files share a path: {sorted(p for p in paths if paths.count(p) > 1)[:5]}")
    entries.sort(key=lambda e: e["path"])
    manifest = {"format": FORMAT, "version": VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "compression": dict(policy), "weights_dtype": weights_dtype,
                "files": entries, "footprint": footprint(entries)}
    atomic_write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
  return manifest


def _refuse_foreign_dir(path: PathLike, overwrite: bool) -> None:
  """Refuses to replace an existing directory unless asked to, and never one that is not a bundle."""
  path = os.fspath(path)
  if not os.path.lexists(path):
    return
  if not overwrite:
    raise FileExistsError(f"{path}: exists (pass overwrite=True to replace the bundle)")
  if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
    raise FileExistsError(f"{path}: exists and is not a bundle; refusing to replace it")


def write_bundle(out_dir: PathLike, *, params: Mapping[str, Any], model_config: Mapping[str, Any],
                 index: DenseIndex, token_corpus_dir: PathLike | None,
                 tokenizer_dir_or_files: PathLike | Iterable[PathLike] | None,
                 extra_files: Mapping[str, PathLike] | None = None,
                 compression: Mapping[str, str] | None = None, weights_dtype: str = "float16",
                 inference_config: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes a bundle directory atomically (a temporary sibling renamed into place).

  Args:
    out_dir: the bundle directory to create.
    params: nested mapping of arrays (a Flax parameter pytree).
    model_config: JSON-serialisable model configuration (``config.json["model"]``).
    index: the passage index (saved with pending edits compacted).
    token_corpus_dir: token-ID corpus directory, copied file by file; None for none.
    tokenizer_dir_or_files: a tokenizer directory, a list of tokenizer files, or None.
    extra_files: ``{name: path}`` of further files, stored as ``extra/<name>``.
    compression: ``{"binary": "bz2"|"lzma"|"none", "text": "lzma"|"bz2"|"none"}``;
      missing keys take the defaults (bz2 binary, lzma text).
    weights_dtype: stored values, one of :data:`WEIGHTS_DTYPES` (default ``"float16"``).
    inference_config: JSON-serialisable inference settings (``config.json["inference"]``).
    overwrite: replace an existing bundle at ``out_dir``.

  Returns:
    The manifest (also written as ``manifest.json``); ``manifest["footprint"]``
    holds the per-component size rows (see :func:`format_footprint`).
  """
  policy = _check_policy(compression)
  _refuse_foreign_dir(out_dir, overwrite)
  parent = os.path.dirname(os.path.abspath(os.fspath(out_dir)))
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".bundle-staging-", dir=parent) as staging:
    sources = [_params_source(staging, params, weights_dtype), *_index_sources(staging, index),
               _config_source(staging, _make_config(model_config, inference_config, weights_dtype, index))]
    if token_corpus_dir is not None:
      sources += _tree_sources(token_corpus_dir, CORPUS_DIR, "corpus")
    if tokenizer_dir_or_files is not None:
      sources += _tokenizer_sources(tokenizer_dir_or_files)
    sources += _extra_sources(extra_files or {})
    return _write(out_dir, sources, [], None, policy, weights_dtype)


def update_bundle(bundle_dir: PathLike, *, params: Mapping[str, Any] | None = None,
                  model_config: Mapping[str, Any] | None = None, inference_config: Mapping[str, Any] | None = None,
                  index: DenseIndex | None = None, token_corpus_dir: PathLike | None = None,
                  tokenizer_dir_or_files: PathLike | Iterable[PathLike] | None = None,
                  extra_files: Mapping[str, PathLike] | None = None, compression: Mapping[str, str] | None = None,
                  weights_dtype: str | None = None) -> dict[str, Any]:
  """Rewrites the given components of a bundle and its manifest, atomically.

  Components not given are carried over byte for byte (each checked against
  its sha256 while copied). A given ``index`` replaces ``index/``,
  ``token_corpus_dir`` replaces ``corpus/``, ``tokenizer_dir_or_files``
  replaces ``tokenizer/``, ``extra_files`` replaces the whole ``extra/`` set,
  ``params`` the weights (in ``weights_dtype``, by default the bundle's);
  ``model_config`` / ``inference_config`` replace those parts of ``config.json``
  (which is rewritten on every update, to describe the current index).
  ``compression`` (default: the bundle's policy) applies to rewritten files only.
  The new bundle replaces the old directory (including any ``.cache`` in it).

  Returns:
    The new manifest.
  """
  bundle_dir = os.fspath(bundle_dir)
  manifest = _read_manifest(bundle_dir)[0]
  policy = _check_policy({**manifest["compression"], **(compression or {})})
  weights_dtype = weights_dtype or manifest["weights_dtype"]
  config = _read_json(os.path.join(bundle_dir, CONFIG_FILE))
  replaced_prefixes = [CONFIG_FILE]
  parent = os.path.dirname(os.path.abspath(bundle_dir))
  with tempfile.TemporaryDirectory(prefix=".bundle-staging-", dir=parent) as staging:
    sources: list[_Source] = []
    if params is not None:
      sources.append(_params_source(staging, params, weights_dtype))
      replaced_prefixes.append(PARAMS_FILE)
    elif weights_dtype != manifest["weights_dtype"]:
      raise ValueError("changing weights_dtype needs the params to store")
    if index is not None:
      sources += _index_sources(staging, index)
      replaced_prefixes.append(INDEX_DIR + "/")
    if token_corpus_dir is not None:
      sources += _tree_sources(token_corpus_dir, CORPUS_DIR, "corpus")
      replaced_prefixes.append(CORPUS_DIR + "/")
    if tokenizer_dir_or_files is not None:
      sources += _tokenizer_sources(tokenizer_dir_or_files)
      replaced_prefixes.append(TOKENIZER_DIR + "/")
    if extra_files is not None:
      sources += _extra_sources(extra_files)
      replaced_prefixes.append(EXTRA_DIR + "/")
    new_config = _make_config(config["model"] if model_config is None else model_config,
                              config["inference"] if inference_config is None else inference_config,
                              weights_dtype, config["index"] if index is None else index)
    sources.append(_config_source(staging, new_config))
    carried = [e for e in manifest["files"] if not e["unpacked_path"].startswith(tuple(replaced_prefixes))]
    return _write(bundle_dir, sources, carried, bundle_dir, policy, weights_dtype)


# ---------------------------------------------------------------- loading


def _read_json(path: str) -> Any:
  if not os.path.isfile(path):
    raise BundleError(path, "missing")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise BundleError(path, f"not valid JSON ({e})") from e


_ENTRY_KEYS = ("path", "unpacked_path", "component", "compression", "bytes", "sha256", "raw_bytes", "raw_sha256")


def _read_manifest(bundle_dir: str) -> tuple[dict[str, Any], str]:
  """The checked manifest and the sha256 of its bytes."""
  path = os.path.join(bundle_dir, MANIFEST_FILE)
  manifest = _read_json(path)
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise BundleError(path, f"not an {FORMAT} manifest")
  if manifest.get("version") != VERSION:
    raise BundleError(path, f"version {manifest.get('version')!r}, expected {VERSION}")
  files = manifest.get("files")
  if not isinstance(files, list) or not all(isinstance(e, dict) and all(k in e for k in _ENTRY_KEYS)
                                            for e in files):
    raise BundleError(path, f"'files' must be a list of entries with keys {list(_ENTRY_KEYS)}")
  for e in files:
    for key in ("path", "unpacked_path"):
      if not isinstance(e[key], str) or any(p in ("", ".", "..") for p in e[key].split("/")):
        raise BundleError(path, f"entry {key} {e[key]!r} is not a plain relative path")
    if e["compression"] not in COMPRESSIONS or e["component"] not in COMPONENTS:
      raise BundleError(path, f"entry {e['path']!r}: unknown compression or component")
  return manifest, sha256_file(path)


def _check_stored(path: str, entry: Mapping[str, Any], verify: bool, key: str = "") -> None:
  """Raises BundleError unless ``path`` has the entry's size (and sha256 when ``verify``)."""
  size_key, sha_key = f"{key}bytes", f"{key}sha256"
  if not os.path.isfile(path):
    raise BundleError(path, "missing")
  size = os.path.getsize(path)
  if size != entry[size_key]:
    raise BundleError(path, f"size {size} bytes, the manifest records {entry[size_key]} (truncated or altered)")
  if verify and sha256_file(path) != entry[sha_key]:
    raise BundleError(path, "sha256 does not match the manifest (corrupt)")


def _default_cache_root(bundle_dir: str) -> str:
  if os.access(bundle_dir, os.W_OK):
    return os.path.join(bundle_dir, ".cache")
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(xdg, "rnr_jax")


def _cache_valid(cache: str, manifest_sha: str, entries: Sequence[Mapping[str, Any]], verify: bool) -> bool:
  record_path = os.path.join(cache, CACHE_RECORD)
  try:
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  if record.get("manifest_sha256") != manifest_sha:
    return False
  try:
    for e in entries:
      _check_stored(os.path.join(cache, e["unpacked_path"]), e, verify, key="raw_")
  except BundleError:
    return False
  return True


def _unpack(entry: Mapping[str, Any], bundle_dir: str, out_root: str) -> int:
  """Writes one file uncompressed under ``out_root``; returns 1 if it was decompressed."""
  src = os.path.join(bundle_dir, entry["path"])
  dst = os.path.join(out_root, entry["unpacked_path"])
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if entry["compression"] == "none":
    try:
      os.link(src, dst)
    except OSError:
      shutil.copyfile(src, dst)
    return 0
  opener = bz2.open if entry["compression"] == "bz2" else lzma.open
  h, n = hashlib.sha256(), 0
  try:
    with opener(src, "rb") as fin, open(dst, "wb") as fout:
      while block := fin.read(_CHUNK):
        h.update(block)
        n += len(block)
        fout.write(block)
  except (OSError, EOFError, lzma.LZMAError) as e:
    raise BundleError(src, f"cannot {entry['compression']}-decompress it ({e})") from e
  if n != entry["raw_bytes"] or h.hexdigest() != entry["raw_sha256"]:
    raise BundleError(src, "decompressed content does not match the manifest's raw size / sha256")
  return 1


def load_bundle(bundle_dir: PathLike, cache_dir: PathLike | None = None, verify: bool = True,
                param_dtype: Any = np.float32) -> Bundle:
  """Verifies a bundle, unpacks it into the cache if needed, and loads every component.

  Args:
    bundle_dir: the bundle directory.
    cache_dir: cache root for decompressed files (see the module docstring).
    verify: check the sha256 of every stored file (and of reused cached files);
      sizes are always checked.
    param_dtype: dtype of the floating parameters (None keeps the stored float16).

  Raises:
    BundleError: the manifest or any file is missing, truncated, corrupt or
      inconsistent; the message starts with the file's path.
  """
  bundle_dir = os.fspath(bundle_dir)
  manifest, manifest_sha = _read_manifest(bundle_dir)
  entries = manifest["files"]
  _parallel(lambda e: _check_stored(os.path.join(bundle_dir, e["path"]), e, verify), entries)
  unpacked = 0
  if all(e["compression"] == "none" for e in entries):
    root = bundle_dir
  else:
    cache_root = os.fspath(cache_dir) if cache_dir is not None else _default_cache_root(bundle_dir)
    root = os.path.join(cache_root, manifest_sha[:16])
    if not _cache_valid(root, manifest_sha, entries, verify):
      with atomic_dir(root) as tmp:
        unpacked = sum(_parallel(lambda e: _unpack(e, bundle_dir, tmp), entries))
        atomic_write_json(os.path.join(tmp, CACHE_RECORD),
                          {"bundle": os.path.abspath(bundle_dir), "manifest_sha256": manifest_sha})

  def component_dir(prefix: str) -> str | None:
    has = any(e["unpacked_path"].startswith(prefix + "/") for e in entries)
    return os.path.join(root, prefix) if has else None

  config = _read_json(os.path.join(root, CONFIG_FILE))
  params = _load_params(os.path.join(root, PARAMS_FILE), param_dtype)
  try:
    index = DenseIndex.load(os.path.join(root, INDEX_DIR), verify=False)  # Hashes checked above.
  except IndexFileError as e:
    raise BundleError(e.path, str(e).removeprefix(f"{e.path}: ")) from e
  extra = {e["unpacked_path"].removeprefix(EXTRA_DIR + "/"): os.path.join(root, e["unpacked_path"])
           for e in entries if e["unpacked_path"].startswith(EXTRA_DIR + "/")}
  return Bundle(root=bundle_dir, unpacked_dir=root, params=params, config=config, index=index,
                corpus_dir=component_dir(CORPUS_DIR), tokenizer_dir=component_dir(TOKENIZER_DIR),
                extra_files=extra, manifest=manifest, unpacked_files=unpacked)
