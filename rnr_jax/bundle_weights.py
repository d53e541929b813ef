"""A bundle's weights: a parameter pytree as one safetensors file of float16, float32 or int8 values.

Keys are the '/'-joined pytree paths. Floating leaves are stored as :data:`WEIGHTS_DTYPES` says and converted
to ``param_dtype`` (float32 by default) on load, the paper's "FP32 graph, FP16 values" setting; integer
leaves are stored unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

from rnr_jax.bundle_files import BundleError
from rnr_jax.quantize import dequantize_columns, dequantize_rows, quantize_columns, quantize_rows

# "float16+int8-embeddings": float16 values, but the word-embedding table (the largest tensor of a small encoder:
# 2/3 of a 3-layer MiniLM) as int8 with one float32 scale per row (symmetric, max-abs); dequantized on load.
# "int8": weight-only int8 for every matrix: embedding tables per row, dense kernels per output unit (column);
# vectors (biases, LayerNorm) float16. Half the float16 size; computed in float32 / bf16 after dequantization.
WEIGHTS_DTYPES = ("float16", "float32", "float16+int8-embeddings", "int8")
INT8_SCALE_SUFFIX = ":int8_row_scale"
INT8_COL_SCALE_SUFFIX = ":int8_col_scale"
_INT8_KEYS = ("word_embeddings/embedding",)


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
      out[key], out[key + INT8_SCALE_SUFFIX] = quantize_rows(value)
      continue
    if layout == "columns":
      out[key], out[key + INT8_COL_SCALE_SUFFIX] = quantize_columns(value)
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


def _dequantize_int8(flat: dict[str, np.ndarray], dtype: Any, path: str = "") -> dict[str, np.ndarray]:
  """Replaces every int8 tensor and its scale (``:int8_row_scale`` / ``:int8_col_scale``) by ``dtype`` values."""
  layouts = ((INT8_SCALE_SUFFIX, 2, lambda q: q.shape[:1], dequantize_rows),  # [rows, columns], scale [rows]
             (INT8_COL_SCALE_SUFFIX, None, lambda q: q.shape[1:], dequantize_columns))  # [in, *out], [*out]
  for suffix, ndim, scale_shape, dequantize in layouts:
    for key in [k for k in flat if k.endswith(suffix)]:
      name = key.removesuffix(suffix)
      q, scale = flat.get(name), flat.pop(key)
      if (q is None or q.dtype != np.int8 or q.ndim < 2 or (ndim and q.ndim != ndim)
          or scale.shape != scale_shape(q)):
        raise BundleError(path, f"{key!r} does not match an int8 tensor {name!r}")
      flat[name] = dequantize(q, scale).astype(dtype)
  return flat


def write_params(path: str, params: Mapping[str, Any], weights_dtype: str) -> None:
  """Writes ``params`` as a safetensors file of ``weights_dtype`` values.

  An int8 tensor ``k`` comes with its float32 scales ``k:int8_row_scale`` (a scale per row) or
  ``k:int8_col_scale`` (per output unit); the metadata records ``stored_dtype``.
  """
  st_numpy.save_file(_weights_to_store(params, weights_dtype), path,
                     metadata={"format": "rnr_jax.params", "stored_dtype": weights_dtype})


def read_params(path: str, param_dtype: Any) -> dict[str, Any]:
  """The parameter pytree in a file of :func:`write_params`.

  Floating leaves become ``param_dtype``; None keeps the stored dtype, with int8 tensors dequantized to float16.
  """
  try:
    flat = st_numpy.load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise BundleError(path, f"not a readable safetensors file ({e})") from e
  flat = _dequantize_int8(flat, np.float16 if param_dtype is None else np.float32, path)
  if param_dtype is not None:
    flat = {k: v.astype(param_dtype) if _is_float(v.dtype) else v for k, v in flat.items()}
  return unflatten_params(flat)
