"""The deployable bundle (paper §2.3, A.4): weights, index, token-ID corpus and tokenizer, each file compressed with
a manifest of sizes and sha256; weights are safetensors keyed by '/'-joined paths, an int8 tensor ``k`` with float32
scales ``k:int8_row_scale`` (per row) or ``k:int8_col_scale`` (per output unit)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

from rnr_jax.bundle_files import (COMPRESSIONS, BundleError, Source, check_policy, check_stored, copy_stored, parallel,
                                  store, unpack)
from rnr_jax.index import DenseIndex, IndexFileError
from rnr_jax.io import (PathLike, atomic_dir, atomic_write_json, dir_lock, read_json, relative_files, repair_dir,
                        scratch_dir, sha256_file, user_cache_dir)
from rnr_jax.quantize import dequantize_columns, dequantize_rows, quantize_columns, quantize_rows

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
_ENTRY_KEYS = ("path", "unpacked_path", "component", "compression", "bytes", "sha256", "raw_bytes", "raw_sha256")

# "float16+int8-embeddings": float16, but the word-embedding table (2/3 of a 3-layer MiniLM) as int8 per row.
# "int8": weight-only int8 for every matrix, tables per row, kernels per output unit; vectors (biases, LayerNorm)
# float16. Half the float16 size; computed in float32 / bf16 after dequantization.
WEIGHTS_DTYPES = ("float16", "float32", "float16+int8-embeddings", "int8")
INT8_SCALE_SUFFIX = ":int8_row_scale"
INT8_COL_SCALE_SUFFIX = ":int8_col_scale"


@dataclasses.dataclass
class Bundle:
  """A loaded bundle; ``unpacked_dir`` holds every file uncompressed (the cache, or ``root``)."""

  root: str
  unpacked_dir: str
  params: dict[str, Any]
  config: dict[str, Any]
  index: DenseIndex
  corpus_dir: str | None
  tokenizer_dir: str | None
  extra_files: dict[str, str]  # {name: unpacked path}
  manifest: dict[str, Any]
  unpacked_files: int  # Decompressed by this load (0 when the cache was reused).


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{'a/b/c': array}`` from a nested mapping (a Flax parameter pytree) of arrays."""
  flat: dict[str, np.ndarray] = {}

  def visit(node: Any, prefix: str) -> None:
    if not isinstance(node, Mapping):
      flat[prefix] = np.asarray(node)
      return
    if not node:
      raise ValueError(f"empty mapping at {prefix or '<root>'!r}: it cannot round-trip through flat keys")
    for key, value in node.items():
      if not isinstance(key, str) or not key or "/" in key:
        raise ValueError(f"parameter keys must be non-empty strings without '/', got {key!r} under {prefix!r}")
      visit(value, f"{prefix}/{key}" if prefix else key)

  visit(params, "")
  return flat


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of :func:`flatten_params`."""
  tree: dict[str, Any] = {}
  for key in sorted(flat):
    *parents, leaf = key.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = flat[key]
  return tree


def _is_float(dtype: np.dtype) -> bool:
  return dtype.kind == "f" or dtype.name == "bfloat16"  # ml_dtypes' bfloat16, named so that inference needs no JAX


def _weights_to_store(params: Mapping[str, Any], weights_dtype: str) -> dict[str, np.ndarray]:
  """Flat params with floating leaves as ``weights_dtype`` stores them; raises on float16 overflow."""
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
  out = {}
  float_dtype = "float32" if weights_dtype == "float32" else "float16"
  for key, value in flatten_params(params).items():
    table = key.endswith("/embedding") and value.ndim == 2
    word_table = table and key.endswith("word_embeddings/embedding")
    if not _is_float(value.dtype):
      out[key] = np.ascontiguousarray(value)
    elif (weights_dtype == "int8" and table) or (weights_dtype == "float16+int8-embeddings" and word_table):
      out[key], out[key + INT8_SCALE_SUFFIX] = quantize_rows(value)
    elif weights_dtype == "int8" and value.ndim >= 2:
      out[key], out[key + INT8_COL_SCALE_SUFFIX] = quantize_columns(value)
    else:
      with np.errstate(over="ignore"):  # Overflow is reported below, naming the parameter.
        out[key] = np.ascontiguousarray(value.astype(float_dtype))
      if (np.isfinite(value.astype(np.float32)) & ~np.isfinite(out[key])).any():
        raise ValueError(f"parameter {key!r} has values beyond the {float_dtype} range; "
                         "store it with weights_dtype='float32'")
  return out


def stored_values(params: Mapping[str, Any], weights_dtype: str) -> dict[str, Any]:
  """The float32 parameters a bundle written with ``weights_dtype`` loads back (values rounded as stored)."""
  return unflatten_params(_as_float32(_weights_to_store(params, weights_dtype)))


def _as_float32(flat: dict[str, np.ndarray], path: str = "") -> dict[str, np.ndarray]:
  """Stored tensors, int8 ones dequantized by their ``:int8_row_scale`` / ``:int8_col_scale``, floats as float32."""
  layouts = ((INT8_SCALE_SUFFIX, 2, lambda q: q.shape[:1], dequantize_rows),  # [rows, columns], scale [rows]
             (INT8_COL_SCALE_SUFFIX, None, lambda q: q.shape[1:], dequantize_columns))  # [in, *out], [*out]
  for suffix, ndim, scale_shape, dequantize in layouts:
    for key in [k for k in flat if k.endswith(suffix)]:
      name = key.removesuffix(suffix)
      q, scale = flat.get(name), flat.pop(key)
      if (q is None or q.dtype != np.int8 or q.ndim < 2 or (ndim and q.ndim != ndim) or scale.shape != scale_shape(q)):
        raise BundleError(path, f"{key!r} does not match an int8 tensor {name!r}")
      flat[name] = dequantize(q, scale)
  return {k: v.astype(np.float32) if _is_float(v.dtype) else v for k, v in flat.items()}


def write_params(path: str, params: Mapping[str, Any], weights_dtype: str) -> None:
  """Writes ``params`` as a safetensors file of ``weights_dtype`` values; the metadata records ``stored_dtype``."""
  st_numpy.save_file(_weights_to_store(params, weights_dtype), path,
                     metadata={"format": "rnr_jax.params", "stored_dtype": weights_dtype})


def read_params(path: str) -> dict[str, Any]:
  """The float32 parameter pytree of a :func:`write_params` file."""
  try:
    flat = st_numpy.load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise BundleError(path, f"not a readable safetensors file ({e})") from e
  return unflatten_params(_as_float32(flat, path))


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
  for path in map(os.fspath, tokenizer):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: tokenizer file not found")
    out.append(Source(f"{TOKENIZER_DIR}/{os.path.basename(path)}", path, "other"))
  if len({s.path for s in out}) != len(out):
    raise ValueError("tokenizer files must have distinct base names")
  return out


def _extra_sources(extra_files: Mapping[str, PathLike]) -> list[Source]:
  out = []
  for name, path in sorted(extra_files.items()):
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
      raise ValueError(f"extra file name {name!r} must be a relative path without '.' or '..' parts")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{os.fspath(path)}: extra file {name!r} not found")
    out.append(Source(f"{EXTRA_DIR}/{name}", os.fspath(path), "other"))
  return out


def _component_sources(staging: str, params: Mapping[str, Any] | None, weights_dtype: str, index: DenseIndex | None,
                       token_corpus_dir: PathLike | None, tokenizer: PathLike | Iterable[PathLike] | None,
                       extra_files: Mapping[str, PathLike] | None) -> tuple[list[Source], list[str]]:
  """Sources of the components given (not None), and the bundle path prefixes they replace."""
  sources, replaced = [], []
  if params is not None:
    path = os.path.join(staging, "params.safetensors")
    write_params(path, params, weights_dtype)
    sources.append(Source(PARAMS_FILE, path, "model"))
    replaced.append(PARAMS_FILE)
  if index is not None:
    index.save(os.path.join(staging, "index"))
    sources += _tree_sources(os.path.join(staging, "index"), INDEX_DIR, "index")
    replaced.append(INDEX_DIR + "/")
  if token_corpus_dir is not None:
    sources += _tree_sources(token_corpus_dir, CORPUS_DIR, "corpus")
    replaced.append(CORPUS_DIR + "/")
  if tokenizer is not None:
    sources += _tokenizer_sources(tokenizer)
    replaced.append(TOKENIZER_DIR + "/")
  if extra_files is not None:
    sources += _extra_sources(extra_files)
    replaced.append(EXTRA_DIR + "/")
  return sources, replaced


def _config_source(staging: str, model_config: Mapping[str, Any], inference_config: Mapping[str, Any] | None,
                   weights_dtype: str, index: DenseIndex | Mapping[str, Any]) -> Source:
  """``config.json``, stored uncompressed so that ``cat`` shows it."""
  index_info = index if isinstance(index, Mapping) else {"kind": index.kind, "dim": index.dim, "size": len(index)}
  config = {"model": dict(model_config), "inference": dict(inference_config or {}), "index": dict(index_info),
            "weights": {"file": PARAMS_FILE, "stored_dtype": weights_dtype, "compute_dtype": "float32"}}
  path = os.path.join(staging, CONFIG_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return Source(CONFIG_FILE, path, "other", compression="none")


def footprint(files: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per-component rows (like the paper's Table 3) and a ``total`` row of ``files``, ``stored_bytes``, ``raw_bytes``
  (uncompressed), ``stored_mb`` and ``raw_mb`` (10^6 bytes); ``other`` holds tokenizer, extras, config."""
  rows = {c: {"component": c, "files": 0, "stored_bytes": 0, "raw_bytes": 0} for c in (*COMPONENTS, "total")}
  for entry in files:
    for name in (entry["component"], "total"):
      rows[name]["files"] += 1
      rows[name]["stored_bytes"] += entry["bytes"]
      rows[name]["raw_bytes"] += entry["raw_bytes"]
  for row in rows.values():
    row["stored_mb"] = round(row["stored_bytes"] / 1e6, 3)
    row["raw_mb"] = round(row["raw_bytes"] / 1e6, 3)
  return list(rows.values())


def format_footprint(rows: Sequence[Mapping[str, Any]]) -> str:
  """The footprint rows as a markdown table."""
  lines = ["| component | files | stored (MB) | uncompressed (MB) | stored bytes | uncompressed bytes |",
           "|---|---:|---:|---:|---:|---:|"]
  lines += [f"| {r['component']} | {r['files']} | {r['stored_mb']:.2f} | {r['raw_mb']:.2f} | "
            f"{r['stored_bytes']:,} | {r['raw_bytes']:,} |" for r in rows]
  return "\n".join(lines)


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
                "compression": dict(policy), "weights_dtype": weights_dtype, "files": entries,
                "footprint": footprint(entries)}
    atomic_write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
  return manifest


def write_bundle(out_dir: PathLike, *, params: Mapping[str, Any], model_config: Mapping[str, Any], index: DenseIndex,
                 token_corpus_dir: PathLike | None, tokenizer_dir_or_files: PathLike | Iterable[PathLike] | None,
                 extra_files: Mapping[str, PathLike] | None = None, compression: Mapping[str, str] | None = None,
                 weights_dtype: str = "float16", inference_config: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes a bundle directory atomically; returns the manifest. ``compression`` (``{"binary": method, "text":
  method}``) overrides bzip2 -9 / lzma -9; ``overwrite`` replaces a bundle, never another non-empty directory."""
  policy = check_policy(compression)
  path = os.fspath(out_dir)
  with dir_lock(path), scratch_dir(path) as staging:
    if os.path.lexists(path):
      if not overwrite:
        raise FileExistsError(f"{path}: exists (pass overwrite=True to replace the bundle)")
      if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        raise FileExistsError(f"{path}: exists and is not a bundle; refusing to replace it")
    sources = _component_sources(staging, params, weights_dtype, index, token_corpus_dir, tokenizer_dir_or_files,
                                 extra_files)[0]
    sources.append(_config_source(staging, model_config, inference_config, weights_dtype, index))
    return _write(out_dir, sources, [], None, policy, weights_dtype)


def update_bundle(bundle_dir: PathLike, *, inference_config: Mapping[str, Any] | None = None,
                  index: DenseIndex | None = None, token_corpus_dir: PathLike | None = None,
                  extra_files: Mapping[str, PathLike] | None = None) -> dict[str, Any]:
  """Rewrites the given components of a bundle atomically by its compression policy, carrying the others over byte
  for byte; returns the manifest; ``extra_files`` replaces all of ``extra/``."""
  bundle_dir = os.fspath(bundle_dir)
  with dir_lock(bundle_dir), scratch_dir(bundle_dir) as staging:
    manifest = _read_manifest(bundle_dir)[0]
    weights_dtype = manifest["weights_dtype"]
    config = read_json(os.path.join(bundle_dir, CONFIG_FILE), error=BundleError)
    sources, replaced = _component_sources(staging, None, weights_dtype, index, token_corpus_dir, None, extra_files)
    inference = config["inference"] if inference_config is None else inference_config
    sources.append(_config_source(staging, config["model"], inference, weights_dtype,
                                  config["index"] if index is None else index))
    carried = [e for e in manifest["files"] if not e["unpacked_path"].startswith((CONFIG_FILE, *replaced))]
    return _write(bundle_dir, sources, carried, bundle_dir, check_policy(manifest["compression"]), weights_dtype)


def _read_manifest(bundle_dir: str) -> tuple[dict[str, Any], str]:
  """The checked manifest and the sha256 of its bytes."""
  path = os.path.join(bundle_dir, MANIFEST_FILE)
  manifest = read_json(path, error=BundleError)
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise BundleError(path, f"not an {FORMAT} manifest")
  if manifest.get("version") != VERSION:
    raise BundleError(path, f"version {manifest.get('version')!r}, expected {VERSION}")
  files = manifest.get("files")
  if not isinstance(files, list) or not all(isinstance(e, dict) and all(k in e for k in _ENTRY_KEYS) for e in files):
    raise BundleError(path, f"'files' must be a list of entries with keys {list(_ENTRY_KEYS)}")
  for e in files:
    for key in ("path", "unpacked_path"):
      if not isinstance(e[key], str) or any(p in ("", ".", "..") for p in e[key].split("/")):
        raise BundleError(path, f"entry {key} {e[key]!r} is not a plain relative path")
    if e["compression"] not in COMPRESSIONS or e["component"] not in COMPONENTS:
      raise BundleError(path, f"entry {e['path']!r}: unknown compression or component")
  return manifest, sha256_file(path)


def _cache_valid(cache: str, manifest_sha: str, entries: Sequence[Mapping[str, Any]], verify: bool) -> bool:
  try:
    if read_json(os.path.join(cache, CACHE_RECORD))["manifest_sha256"] != manifest_sha:
      return False
    for e in entries:
      check_stored(os.path.join(cache, e["unpacked_path"]), e, verify, key="raw_")
  except (ValueError, KeyError, TypeError):  # BundleError and BadFileError are ValueErrors.
    return False
  return True


def load_bundle(bundle_dir: PathLike, cache_dir: PathLike | None = None, verify: bool = True) -> Bundle:
  """Verifies a bundle, unpacks it once into ``<cache_dir>/<manifest sha256[:16]>`` (default ``<bundle>/.cache``
  or the user cache) and loads every component (weights as float32); BundleError names a bad file."""
  bundle_dir = os.fspath(bundle_dir)
  repair_dir(bundle_dir)
  manifest, manifest_sha = _read_manifest(bundle_dir)
  entries = manifest["files"]
  parallel(lambda e: check_stored(os.path.join(bundle_dir, e["path"]), e, verify), entries)
  unpacked = 0
  if all(e["compression"] == "none" for e in entries):
    root = bundle_dir
  else:
    if cache_dir is None:
      cache_dir = os.path.join(bundle_dir, ".cache") if os.access(bundle_dir, os.W_OK) else user_cache_dir()
    root = os.path.join(os.fspath(cache_dir), manifest_sha[:16])
    if not _cache_valid(root, manifest_sha, entries, verify):
      with dir_lock(root):  # Another process may be unpacking the same bundle: wait for it, then reuse its files.
        if not _cache_valid(root, manifest_sha, entries, verify):
          with atomic_dir(root) as tmp:
            unpacked = sum(parallel(lambda e: unpack(e, bundle_dir, tmp), entries))
            atomic_write_json(os.path.join(tmp, CACHE_RECORD),
                              {"bundle": os.path.abspath(bundle_dir), "manifest_sha256": manifest_sha})

  def component_dir(prefix: str) -> str | None:
    return os.path.join(root, prefix) if any(e["unpacked_path"].startswith(prefix + "/") for e in entries) else None

  try:
    config = read_json(os.path.join(root, CONFIG_FILE), error=BundleError)
    params = read_params(os.path.join(root, PARAMS_FILE))
    index = DenseIndex.load(os.path.join(root, INDEX_DIR), verify=False)  # Hashes checked above.
  except (BundleError, IndexFileError) as e:
    rel = os.path.relpath(e.path, root).replace(os.sep, "/")
    if not rel.startswith("..") and rel not in {x["unpacked_path"] for x in entries}:
      raise BundleError(os.path.join(bundle_dir, MANIFEST_FILE), f"has no entry for {rel} (lost?)") from e
    raise BundleError(e.path, str(e).removeprefix(f"{e.path}: ")) from e
  extra = {e["unpacked_path"].removeprefix(EXTRA_DIR + "/"): os.path.join(root, e["unpacked_path"])
           for e in entries if e["unpacked_path"].startswith(EXTRA_DIR + "/")}
  return Bundle(root=bundle_dir, unpacked_dir=root, params=params, config=config, index=index,
                corpus_dir=component_dir(CORPUS_DIR), tokenizer_dir=component_dir(TOKENIZER_DIR),
                extra_files=extra, manifest=manifest, unpacked_files=unpacked)
