"""Symmetric int8 quantization with one float32 scale per row (the ``"int8_row"`` index, embedding tables) or per output
unit (kernels)."""

from __future__ import annotations

import numpy as np


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(codes int8 [R, C], scales float32 [R])`` with ``codes * scales[:, None] ~= x``, ``scale = max|row| / 127``
  (1 for an all-zero row). Quantizing the dequantized rows again gives the same codes."""
  x = np.asarray(x, np.float32)
  scales = np.abs(x).max(axis=1) / 127.0
  # Test the scale rather than the peak: a subnormal peak / 127 can underflow to 0.
  scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
  return np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8), scales


def dequantize_rows(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
  return codes.astype(np.float32) * scales[:, None]


def quantize_columns(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per output unit of a kernel ``[in, *out]``: ``(codes int8 [in, *out], scales float32 [*out])``."""
  x = np.asarray(x, np.float32)
  codes, scales = quantize_rows(x.reshape(x.shape[0], -1).T)
  return np.ascontiguousarray(codes.T.reshape(x.shape)), scales.reshape(x.shape[1:])


def dequantize_columns(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
  return codes.astype(np.float32) * scales[None]
