"""The deployable bundle: weights, index, token-ID corpus and tokenizer in one verified directory.

A bundle is what a minimal retrieve-and-read system ships (paper §2.3, appendix A.4). :func:`write_bundle`
stores each file compressed (bzip2 -9 for binary files, lzma -9 for text) with a manifest of sizes and
sha256; :func:`load_bundle` verifies every byte, unpacks once into a cache and loads the components;
:func:`update_bundle` replaces some of them. The weights file is :mod:`rnr_jax.bundle_weights`; compression
and file checks are :mod:`rnr_jax.bundle_files`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rnr_jax.bundle_files import (COMPRESSIONS, BundleError, Source, check_policy, check_stored, copy_stored, parallel,
                                  store, unpack)
from rnr_jax.bundle_weights import (WEIGHTS_DTYPES, flatten_params, read_params, stored_values, unflatten_params,
                                    write_params)
from rnr_jax.index import DenseIndex, IndexFileError
from rnr_jax.io import atomic_dir, atomic_write_json, read_json, relative_files, sha256_file, user_cache_dir

# The public API, with the names it re-exports from rnr_jax.bundle_files and rnr_jax.bundle_weights.
__all__ = ["WEIGHTS_DTYPES", "Bundle", "BundleError", "flatten_params", "footprint", "format_footprint",
           "load_bundle", "stored_values", "unflatten_params", "update_bundle", "write_bundle"]

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
_MB = 1e6


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


# -------------------------------------------------------------------- sources


def _tree_sources(directory: PathLike, prefix: str, component: str) -> list[Source]:
  """Every regular file under ``directory`` (recursively), stored under ``prefix/``."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: not a directory")
  return [Source(f"{prefix}/{rel}", full, component) for rel, full in relative_files(directory)]


def _tokenizer_sources(tokenizer: PathLike | Iterable[PathLike]) -> list[Source]:
  if isinstance(tokenizer, (str, os.PathLike)):
    return _tree_sources(tokenizer, TOKENIZER_DIR, "other")
  out = []
  for path in tokenizer:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: tokenizer file not found")
    out.append(Source(f"{TOKENIZER_DIR}/{os.path.basename(path)}", path, "other"))
  if len({s.path for s in out}) != len(out):
    raise ValueError("tokenizer files must have distinct base names")
  return out


def _extra_sources(extra_files: Mapping[str, PathLike]) -> list[Source]:
  out = []
  for name, path in sorted(extra_files.items()):
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
      raise ValueError(f"extra file name {name!r} must be a relative path without '.' or '..' parts")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{os.fspath(path)}: extra file {name!r} not found")
    out.append(Source(f"{EXTRA_DIR}/{name}", os.fspath(path), "other"))
  return out


def _params_source(staging: str, params: Mapping[str, Any], weights_dtype: str) -> Source:
  path = os.path.join(staging, "params.safetensors")
  write_params(path, params, weights_dtype)
  return Source(PARAMS_FILE, path, "model")


def _index_sources(staging: str, index: DenseIndex) -> list[Source]:
  index_dir = os.path.join(staging, "index")
  index.save(index_dir)
  return _tree_sources(index_dir, INDEX_DIR, "index")


def _config_source(staging: str, config: Mapping[str, Any]) -> Source:
  path = os.path.join(staging, CONFIG_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
  return Source(CONFIG_FILE, path, "other", compression="none")


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
  ``stored_mb``, ``raw_mb`` (MB are 10^6 bytes). Components: ``model`` (parameters),
  ``index``, ``corpus``, and ``other`` (tokenizer, extras, ``config.json``).
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


def _write(out_dir: PathLike, sources: Sequence[Source], carried: Sequence[Mapping[str, Any]],
           carried_root: str | None, policy: Mapping[str, str], weights_dtype: str) -> dict[str, Any]:
  """Stores ``sources``, copies ``carried`` entries from ``carried_root``, writes the manifest; atomic."""
  with atomic_dir(out_dir) as tmp:
    entries = parallel(lambda s: store(s, tmp, policy), sources)
    entries += parallel(lambda e: copy_stored(e, carried_root, tmp), carried)
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

  Layout (a compressed file has a ``.bz2`` / ``.xz`` suffix)::

    manifest.json                 format, compression policy, footprint table and, per file: stored
                                  and unpacked path, component, compression, stored and uncompressed
                                  bytes, sha256 of both (not listed in itself)
    config.json                   {"model": ..., "inference": ..., "weights": ..., "index": ...}
    model/params.safetensors.bz2  the weights (:func:`rnr_jax.bundle_weights.write_params`)
    index/...                     :meth:`DenseIndex.save` output
    corpus/...                    the token-ID corpus directory, copied file by file
    tokenizer/...                 tokenizer files
    extra/<name>                  any extra files

  ``manifest.json`` and ``config.json`` stay uncompressed so a bundle can be inspected
  with ``cat``; already-compressed files and files that would not shrink are stored as
  they are (:func:`rnr_jax.bundle_files.store`).

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
  policy = check_policy(compression)
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
  policy = check_policy({**manifest["compression"], **(compression or {})})
  weights_dtype = weights_dtype or manifest["weights_dtype"]
  config = read_json(os.path.join(bundle_dir, CONFIG_FILE), error=BundleError)
  replaced_prefixes = [CONFIG_FILE]
  parent = os.path.dirname(os.path.abspath(bundle_dir))
  with tempfile.TemporaryDirectory(prefix=".bundle-staging-", dir=parent) as staging:
    sources: list[Source] = []
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


_ENTRY_KEYS = ("path", "unpacked_path", "component", "compression", "bytes", "sha256", "raw_bytes", "raw_sha256")


def _read_manifest(bundle_dir: str) -> tuple[dict[str, Any], str]:
  """The checked manifest and the sha256 of its bytes."""
  path = os.path.join(bundle_dir, MANIFEST_FILE)
  manifest = read_json(path, error=BundleError)
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


def _default_cache_root(bundle_dir: str) -> str:
  if os.access(bundle_dir, os.W_OK):
    return os.path.join(bundle_dir, ".cache")
  return user_cache_dir()


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
      check_stored(os.path.join(cache, e["unpacked_path"]), e, verify, key="raw_")
  except BundleError:
    return False
  return True


def load_bundle(bundle_dir: PathLike, cache_dir: PathLike | None = None, verify: bool = True,
                param_dtype: Any = np.float32) -> Bundle:
  """Verifies a bundle, unpacks it into the cache if needed, and loads every component.

  Args:
    bundle_dir: the bundle directory.
    cache_dir: cache root for decompressed files, which go to
      ``<cache root>/<first 16 hex digits of the manifest's sha256>``; default
      ``<bundle>/.cache`` when the bundle is writable, else ``$XDG_CACHE_HOME/rnr_jax``
      (``~/.cache/rnr_jax``). A later load reuses the cache when its record matches the
      manifest and its files the recorded sizes (and sha256 when ``verify``). A bundle
      without compressed files is used in place.
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
  parallel(lambda e: check_stored(os.path.join(bundle_dir, e["path"]), e, verify), entries)
  unpacked = 0
  if all(e["compression"] == "none" for e in entries):
    root = bundle_dir
  else:
    cache_root = os.fspath(cache_dir) if cache_dir is not None else _default_cache_root(bundle_dir)
    root = os.path.join(cache_root, manifest_sha[:16])
    if not _cache_valid(root, manifest_sha, entries, verify):
      with atomic_dir(root) as tmp:
        unpacked = sum(parallel(lambda e: unpack(e, bundle_dir, tmp), entries))
        atomic_write_json(os.path.join(tmp, CACHE_RECORD),
                          {"bundle": os.path.abspath(bundle_dir), "manifest_sha256": manifest_sha})

  def component_dir(prefix: str) -> str | None:
    has = any(e["unpacked_path"].startswith(prefix + "/") for e in entries)
    return os.path.join(root, prefix) if has else None

  config = read_json(os.path.join(root, CONFIG_FILE), error=BundleError)
  params = read_params(os.path.join(root, PARAMS_FILE), param_dtype)
  try:
    index = DenseIndex.load(os.path.join(root, INDEX_DIR), verify=False)  # Hashes checked above.
  except IndexFileError as e:
    raise BundleError(e.path, str(e).removeprefix(f"{e.path}: ")) from e
  extra = {e["unpacked_path"].removeprefix(EXTRA_DIR + "/"): os.path.join(root, e["unpacked_path"])
           for e in entries if e["unpacked_path"].startswith(EXTRA_DIR + "/")}
  return Bundle(root=bundle_dir, unpacked_dir=root, params=params, config=config, index=index,
                corpus_dir=component_dir(CORPUS_DIR), tokenizer_dir=component_dir(TOKENIZER_DIR),
                extra_files=extra, manifest=manifest, unpacked_files=unpacked)
