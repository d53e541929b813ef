"""The retriever, the reader and the unified retriever-reader as Flax modules.

Parameter trees are ``{"encoder": ...}`` (one shared encoder) or ``{"question_encoder": ..., "passage_encoder":
...}``, plus the reader heads ``qa_outputs`` (start / end logits per token) and ``qa_classifier`` (passage-ranking logit
from the [CLS] state). Encoder subtrees are those of :mod:`rnr_jax.models`, so Hugging Face weights drop in."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rnr_jax.models import EncoderConfig, build_encoder

Params = Any
HEAD_NAMES = ("qa_outputs", "qa_classifier")  # the reader heads of a RetrieverReader


def pool(sequence: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
  """``[B, L, H] -> [B, H]`` by the [CLS] state (the paper, DPR) or the masked mean (how MiniLM was trained)."""
  if pooling == "cls":
    return sequence[:, 0]
  if pooling == "mean":
    m = attention_mask.astype(jnp.float32)[..., None]
    return (sequence.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
  raise ValueError(f"unknown pooling {pooling!r}; expected 'cls' or 'mean'")


def retrieval_vector(sequence: jax.Array, attention_mask: jax.Array, pooling: str, dim: int) -> jax.Array:
  """The pooled vector's first ``dim`` entries (paper §2.2.1; ``dim=0``: full width), in float32."""
  v = pool(sequence, attention_mask, pooling).astype(jnp.float32)
  return v[:, :dim] if dim else v


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def dummy_inputs() -> dict[str, np.ndarray]:
  """A one-row input batch for ``init`` (parameter shapes do not depend on it)."""
  ones = np.ones((1, 4), np.int32)
  return {"input_ids": ones, "attention_mask": ones, "token_type_ids": np.zeros_like(ones)}


class Retriever(nn.Module):
  """Bi-encoder retriever: DPR's two encoders, or one shared encoder (paper §2.2.2)."""

  config: EncoderConfig
  shared: bool = True
  pooling: str = "cls"
  retrieval_dim: int = 128
  dtype: Any = jnp.float32

  def setup(self):
    make = lambda: build_encoder(self.config, dtype=self.dtype)
    if self.shared:
      self.encoder = make()
    else:
      self.question_encoder = make()
      self.passage_encoder = make()

  def _embed(self, enc, batch, deterministic):
    out = enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], deterministic=deterministic)
    return retrieval_vector(out.sequence, batch["attention_mask"], self.pooling, self.retrieval_dim)

  def embed_questions(self, batch, deterministic: bool = True) -> jax.Array:
    return self._embed(self.encoder if self.shared else self.question_encoder, batch, deterministic)

  def embed_passages(self, batch, deterministic: bool = True) -> jax.Array:
    return self._embed(self.encoder if self.shared else self.passage_encoder, batch, deterministic)

  def __call__(self, questions, passages, deterministic: bool = True):
    return self.embed_questions(questions, deterministic), self.embed_passages(passages, deterministic)


class RetrieverReader(nn.Module):
  """One encoder that retrieves (``embed``) and reads (``read``): the reader teacher and the unified student."""

  config: EncoderConfig
  pooling: str = "cls"
  retrieval_dim: int = 128
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = build_encoder(self.config, dtype=self.dtype)
    self.qa_outputs = nn.Dense(2, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02), name="qa_outputs")
    self.qa_classifier = nn.Dense(1, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02), name="qa_classifier")

  def embed(self, batch, deterministic: bool = True) -> jax.Array:
    """Retrieval vectors ``[B, retrieval_dim]`` (float32)."""
    out = self.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                       deterministic=deterministic)
    return retrieval_vector(out.sequence, batch["attention_mask"], self.pooling, self.retrieval_dim)

  def read(self, batch, deterministic: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``start_logits [B, L], end_logits [B, L], rank_logits [B]`` (float32)."""
    out = self.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                       deterministic=deterministic)
    se = self.qa_outputs(out.sequence).astype(jnp.float32)
    rank = self.qa_classifier(out.cls).astype(jnp.float32)[:, 0]
    return se[..., 0], se[..., 1], rank

  def __call__(self, batch, deterministic: bool = True):
    return self.embed(batch, deterministic), self.read(batch, deterministic)


def init_params(model: Retriever | RetrieverReader, rng: jax.Array) -> Params:
  """Randomly initialised parameters of either module."""
  x = dummy_inputs()
  args = (x, x) if isinstance(model, Retriever) else (x,)
  return model.init(rng, *args)["params"]


def _check_shapes(want: Params, got: Params, what: str) -> None:
  if jax.tree.map(jnp.shape, want) != jax.tree.map(jnp.shape, got):
    raise ValueError(f"pretrained {what} parameters do not match the model's")


def with_pretrained(params: Params, encoder: Params | None = None, heads: Params | None = None) -> Params:
  """``params`` with every encoder subtree replaced by ``encoder`` and the reader heads by ``heads`` (if given)."""
  out = dict(params)
  for name in ("encoder", "question_encoder", "passage_encoder"):
    if encoder is not None and name in out:
      _check_shapes(out[name], encoder, f"encoder ({name})")
      out[name] = encoder
  for name in HEAD_NAMES if heads is not None else ():
    _check_shapes(out[name], heads[name], f"reader head {name}")
    out[name] = heads[name]
  return out
