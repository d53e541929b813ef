"""MobileBERT encoder in Flax (linen), numerically equivalent to transformers' ``MobileBertModel`` without its pooler.

Only MobileBERT's config, embeddings and layer parts live here; the skeleton and shared blocks are in
:mod:`rnr_jax.models.encoder`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from rnr_jax.models.encoder import (NORM_TYPES, Attention, ConfigModule, Embeddings, Encoder, HFEncoderConfig,
                                    Intermediate, ResidualProjection)

# transformers builds these norms as ``NORM2FN[type](size)``, i.e. with torch's default epsilon.
_TORCH_DEFAULT_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class MobileBertConfig(HFEncoderConfig):
  """Architecture of a MobileBERT encoder; field names and defaults follow ``transformers.MobileBertConfig``."""

  model_type: ClassVar[str] = "mobilebert"
  architecture: ClassVar[str] = "MobileBertModel"

  # transformers.MobileBertConfig's defaults for shared fields (each keeps its place in the base class's order).
  hidden_size: int = 512
  num_hidden_layers: int = 24
  num_attention_heads: int = 4
  intermediate_size: int = 512
  hidden_act: str = "relu"
  hidden_dropout_prob: float = 0.0

  embedding_size: int = 128
  trigram_input: bool = True
  use_bottleneck: bool = True
  intra_bottleneck_size: int = 128
  use_bottleneck_attention: bool = False
  key_query_shared_bottleneck: bool = True
  num_feedforward_networks: int = 4
  normalization_type: str = "no_norm"
  classifier_activation: bool = True  # only used by transformers' pooler; kept for config round trips

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.normalization_type not in NORM_TYPES:
      raise ValueError(f"normalization_type must be one of {NORM_TYPES}, got {self.normalization_type!r}")
    if self.num_feedforward_networks < 1:
      raise ValueError(f"num_feedforward_networks must be >= 1, got {self.num_feedforward_networks}")
    if self.true_hidden_size % self.num_attention_heads:
      raise ValueError(f"true hidden size ({self.true_hidden_size}) is not a multiple of num_attention_heads "
                       f"({self.num_attention_heads})")

  @property
  def norm_kind(self) -> str:
    return self.normalization_type

  @property
  def true_hidden_size(self) -> int:
    return self.intra_bottleneck_size if self.use_bottleneck else self.hidden_size

  @property
  def uses_embedding_transformation(self) -> bool:
    return self.trigram_input or self.embedding_size != self.hidden_size


class MobileBertEmbeddings(Embeddings):
  """Word embeddings (optionally as trigrams) projected to ``hidden_size`` by ``embedding_transformation``."""

  config: MobileBertConfig

  def words(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    x = self.embed(c.vocab_size, c.embedding_size, "word_embeddings")(input_ids)
    if c.trigram_input:
      # [next token, this token, previous token], zero beyond the ends (a width-3 convolution).
      next_token = jnp.pad(x[:, 1:], ((0, 0), (0, 1), (0, 0)))
      x = jnp.concatenate([next_token, x, jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))], axis=-1)
    if c.uses_embedding_transformation:
      x = self.dense(c.hidden_size, "embedding_transformation")(x)
    return x

  def norm_eps(self) -> float:
    return _TORCH_DEFAULT_EPS


class BottleneckLayer(ConfigModule):
  """``norm(dense(x))`` projecting to ``intra_bottleneck_size``."""

  config: MobileBertConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.config.layer_norm_eps)(self.dense(self.config.intra_bottleneck_size, "dense")(x))


class Bottleneck(ConfigModule):
  """Layer inputs ``(query, key, value, residual)``: ``input`` projects the residual stream (and, with
  ``use_bottleneck_attention``, feeds q, k, v); else ``attention`` may project the shared query/key."""

  config: MobileBertConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    c = self.config
    residual = self.child(BottleneckLayer, "input")(x)
    if c.use_bottleneck_attention:
      return residual, residual, residual, residual
    if c.key_query_shared_bottleneck:
      shared = self.child(BottleneckLayer, "attention")(x)
      return shared, shared, x, residual
    return x, x, x, residual


class MobileBertLayerOutput(ConfigModule):
  """``norm(dense(h) + attention_output)``, then (with bottlenecks) ``bottleneck`` back to ``hidden_size``."""

  config: MobileBertConfig

  @nn.compact
  def __call__(self, h: jax.Array, attention_output: jax.Array, layer_input: jax.Array, *,
               deterministic: bool) -> jax.Array:
    c = self.config
    y = self.dense(c.true_hidden_size, "dense")(h)
    if not c.use_bottleneck:
      y = nn.Dropout(c.hidden_dropout_prob)(y, deterministic=deterministic)
    y = y.astype(jnp.float32) + attention_output.astype(jnp.float32)
    y = self.norm(_TORCH_DEFAULT_EPS)(y)
    if c.use_bottleneck:
      bottleneck = self.child(ResidualProjection, "bottleneck", dropout_rate=c.hidden_dropout_prob)
      y = bottleneck(y, layer_input, deterministic=deterministic)
    return y


class FeedForward(ConfigModule):
  """One of the stacked FFNs, without dropout (as transformers)."""

  config: MobileBertConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.feed_forward(x, 0.0, deterministic=True)


class MobileBertLayer(ConfigModule):
  """One MobileBERT layer: bottlenecks in, attention, stacked FFNs, FFN + bottleneck out."""

  config: MobileBertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool) -> jax.Array:
    c = self.config
    if c.use_bottleneck:
      query, key, value, residual = self.child(Bottleneck, "bottleneck")(x)
    else:
      query = key = value = residual = x
    # transformers drops out the attention output only in layers without bottlenecks.
    output_dropout = 0.0 if c.use_bottleneck else c.hidden_dropout_prob
    attention = self.child(Attention, "attention", output_dropout_rate=output_dropout)
    y = attention(query, key, value, residual, mask, deterministic=deterministic)
    for j in range(c.num_feedforward_networks - 1):
      y = self.child(FeedForward, f"ffn_{j}")(y)
    h = self.child(Intermediate, "intermediate")(y)
    return self.child(MobileBertLayerOutput, "output")(h, y, x, deterministic=deterministic)


class MobileBertEncoder(Encoder):
  """MobileBERT encoder (``MobileBertModel`` without pooler) with every architecture switch of its config; the
  embedding and layer output norms use epsilon 1e-5, as transformers does."""

  config: MobileBertConfig
  embeddings_class: ClassVar[type[Embeddings]] = MobileBertEmbeddings
  layer_class: ClassVar[type[ConfigModule]] = MobileBertLayer
