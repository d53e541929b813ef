"""Retrieval vectors: pooling, truncation to the first d dims, jitted batch encoding.

The retrieval vector of a question (token type 0) or passage (token type 1) is
the pooled encoder output truncated to its first ``dim`` entries (paper §2.2.1:
the first 128 of MobileBERT's 512). Pooling is ``"cls"`` (the [CLS] state, as in
the paper and DPR) or ``"mean"`` (masked mean of the sequence, how
sentence-transformers models such as all-MiniLM-L6-v2 were pretrained).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnr_jax import tokenization as tk


def pool(sequence: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
  """``[B, L, H] -> [B, H]`` by the [CLS] state or the masked mean."""
  if pooling == "cls":
    return sequence[:, 0]
  if pooling == "mean":
    m = attention_mask.astype(jnp.float32)[..., None]
    return (sequence.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
  raise ValueError(f"unknown pooling {pooling!r}; expected 'cls' or 'mean'")


def retrieval_vector(sequence: jax.Array, attention_mask: jax.Array, pooling: str, dim: int) -> jax.Array:
  """Pooled vector truncated to its first ``dim`` entries (``dim=0``: full width), in float32."""
  v = pool(sequence, attention_mask, pooling).astype(jnp.float32)
  return v[:, :dim] if dim else v


def make_embed_fn(module, pooling: str, dim: int) -> Callable:
  """A jitted ``(params, batch_dict) -> [B, dim]`` function for an encoder module."""

  @jax.jit
  def embed(params, batch):
    out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"], deterministic=True)
    return retrieval_vector(out.sequence, batch["attention_mask"], pooling, dim)

  return embed


def embed_in_batches(embed_fn: Callable, params, batches: Sequence[tuple[np.ndarray, tk.EncodedBatch]],
                     total: int, dim: int, progress: bool = False) -> tuple[np.ndarray, float]:
  """Runs ``embed_fn`` over ``(indices, batch)`` pairs into one ``[total, dim]`` array.

  Returns the embeddings and items per second. Batches of one length bucket
  share one compilation; the last partial batch of a bucket is padded to the
  bucket's batch size so no extra shapes are compiled.
  """
  out = np.zeros((total, dim), np.float32)
  start = time.perf_counter()
  it = batches
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    it = tqdm(batches, desc="encode", unit="batch")
  pending = []
  for idx, batch in it:
    pending.append((idx, embed_fn(params, batch.as_dict())))
    if len(pending) > 2:  # keep a couple of batches in flight (async dispatch)
      i, v = pending.pop(0)
      out[i] = np.asarray(v)[: len(i)]
  for i, v in pending:
    out[i] = np.asarray(v)[: len(i)]
  elapsed = time.perf_counter() - start
  return out, total / max(elapsed, 1e-9)


def pad_rows(batch: tk.EncodedBatch, rows: int, pad_id: int = 0) -> tk.EncodedBatch:
  """Pads a batch with empty rows up to ``rows`` (fixed batch shapes under jit)."""
  n = batch.input_ids.shape[0]
  if n >= rows:
    return batch
  def _pad(x, value):
    return np.concatenate([x, np.full((rows - n,) + x.shape[1:], value, x.dtype)])
  mask = _pad(batch.attention_mask, 0)
  mask[n:, 0] = 1  # padding rows attend to one token, so no row is fully masked
  return tk.EncodedBatch(_pad(batch.input_ids, pad_id), mask, _pad(batch.token_type_ids, 0))
