"""Retriever, reader and the unified retriever-reader as Flax modules.

* :class:`Retriever`: DPR bi-encoder with a question encoder and a passage
  encoder, or (``shared=True``, paper §2.2.2) one encoder for both, questions
  told apart by token type 0 and passages by token type 1. The retrieval vector
  is the pooled output truncated to its first ``retrieval_dim`` dims.
* :class:`RetrieverReader`: one encoder with DPR reader heads: per-token start
  and end logits (``qa_outputs``) and a passage-ranking logit from the [CLS]
  state (``qa_classifier``). Used as the reader teacher (``read`` only) and as
  the unified retriever-reader (``embed`` and ``read``; paper §2.2.3).

Parameter trees: ``{"encoder": ...}`` (shared) or ``{"question_encoder": ...,
"passage_encoder": ...}``, plus ``qa_outputs`` / ``qa_classifier`` for readers.
Encoder subtrees are exactly those of :mod:`rnr_jax.models`, so Hugging Face
weights drop in with :func:`with_pretrained_encoders`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rnr_jax import embed
from rnr_jax.models import EncoderConfig, build_encoder

Params = Any
HEAD_NAMES = ("qa_outputs", "qa_classifier")  # the reader heads of a RetrieverReader


class Retriever(nn.Module):
  """Bi-encoder retriever (two encoders, or one shared)."""

  config: EncoderConfig
  shared: bool = True
  pooling: str = "cls"
  retrieval_dim: int = 128
  dtype: Any = jnp.float32
  num_layers: int | None = None

  def setup(self):
    make = lambda: build_encoder(self.config, dtype=self.dtype, num_layers=self.num_layers)
    if self.shared:
      self.encoder = make()
    else:
      self.question_encoder = make()
      self.passage_encoder = make()

  def _embed(self, enc, batch, deterministic):
    out = enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], deterministic=deterministic)
    return embed.retrieval_vector(out.sequence, batch["attention_mask"], self.pooling, self.retrieval_dim)

  def embed_questions(self, batch, deterministic: bool = True) -> jax.Array:
    return self._embed(self.encoder if self.shared else self.question_encoder, batch, deterministic)

  def embed_passages(self, batch, deterministic: bool = True) -> jax.Array:
    return self._embed(self.encoder if self.shared else self.passage_encoder, batch, deterministic)

  def __call__(self, questions, passages, deterministic: bool = True):
    return self.embed_questions(questions, deterministic), self.embed_passages(passages, deterministic)


class RetrieverReader(nn.Module):
  """One encoder that retrieves (``embed``) and reads (``read``)."""

  config: EncoderConfig
  pooling: str = "cls"
  retrieval_dim: int = 128
  dtype: Any = jnp.float32
  num_layers: int | None = None

  def setup(self):
    self.encoder = build_encoder(self.config, dtype=self.dtype, num_layers=self.num_layers)
    self.qa_outputs = nn.Dense(2, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02), name="qa_outputs")
    self.qa_classifier = nn.Dense(1, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                                  name="qa_classifier")

  def embed(self, batch, deterministic: bool = True) -> jax.Array:
    """Retrieval vectors ``[B, retrieval_dim]`` (float32)."""
    out = self.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                       deterministic=deterministic)
    return embed.retrieval_vector(out.sequence, batch["attention_mask"], self.pooling, self.retrieval_dim)

  def read(self, batch, deterministic: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``start_logits [B, L], end_logits [B, L], rank_logits [B]`` (float32)."""
    out = self.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                       deterministic=deterministic)
    se = self.qa_outputs(out.sequence).astype(jnp.float32)
    rank = self.qa_classifier(out.cls).astype(jnp.float32)[:, 0]
    return se[..., 0], se[..., 1], rank

  def __call__(self, batch, deterministic: bool = True):
    return self.embed(batch, deterministic), self.read(batch, deterministic)


def with_pretrained_encoders(params: Params, encoder_params: Params) -> Params:
  """Returns ``params`` with every encoder subtree replaced by ``encoder_params``.

  Shapes must match (same config and ``num_layers``); heads are kept.
  """
  out = dict(params)
  for name in ("encoder", "question_encoder", "passage_encoder"):
    if name in out:
      want = jax.tree_util.tree_map(jnp.shape, out[name])
      got = jax.tree_util.tree_map(jnp.shape, encoder_params)
      if want != got:
        raise ValueError(f"pretrained encoder parameters do not match the model's {name!r} subtree")
      out[name] = encoder_params
  return out


def with_pretrained_heads(params: Params, heads: Params) -> Params:
  """Returns ``params`` with the reader heads (:data:`HEAD_NAMES`) replaced by ``heads`` (same shapes)."""
  out = dict(params)
  for name in HEAD_NAMES:
    want = jax.tree_util.tree_map(jnp.shape, out[name])
    got = jax.tree_util.tree_map(jnp.shape, heads[name])
    if want != got:
      raise ValueError(f"reader head {name!r}: shapes {got} do not match the model's {want}")
    out[name] = heads[name]
  return out


def pretrained_loader(encoder_params: Params | None) -> Callable[[Params], Params] | None:
  """The training loop's ``load_pretrained`` hook for Hugging Face encoder weights (``None``: random init)."""
  if encoder_params is None:
    return None
  return functools.partial(with_pretrained_encoders, encoder_params=encoder_params)
