"""Symmetric int8 quantization with one float32 scale per row or per output unit.

Used by the ``"int8_row"`` index (a scale per passage vector) and by the bundle's int8 weights (embedding
tables per row, kernels per output unit).
"""

from __future__ import annotations

import numpy as np


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(codes int8 [R, C], scales float32 [R])`` with ``codes * scales[:, None] ~= x``.

  Each row gets its own grid of 255 levels, ``scale = max_j |x_ij| / 127``, computed in float32; a row whose
  scale is 0 (all zeros) gets scale 1 and zero codes. Quantizing the dequantized rows again gives the same codes.
  """
  x = np.asarray(x, np.float32)
  scales = np.abs(x).max(axis=1) / 127.0
  # Test the scale rather than the peak: a subnormal peak / 127 can underflow to 0.
  scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
  return np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8), scales


def dequantize_rows(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """float32 ``codes * scales[:, None]``: the rows :func:`quantize_rows` stands for."""
  return codes.astype(np.float32) * scales[:, None]


def quantize_columns(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per output unit of a kernel ``[in, *out]``: ``(codes int8 [in, *out], scales float32 [*out])``."""
  x = np.asarray(x, np.float32)
  codes, scales = quantize_rows(x.reshape(x.shape[0], -1).T)
  return np.ascontiguousarray(codes.T.reshape(x.shape)), scales.reshape(x.shape[1:])


def dequantize_columns(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """float32 ``codes * scales``: the kernel :func:`quantize_columns` stands for."""
  return codes.astype(np.float32) * scales[None]
