"""BERT encoder in Flax (linen), numerically equivalent to transformers' ``BertModel`` without its pooler.

Only BERT's config, embeddings and layer live here; the skeleton and blocks are in :mod:`rnr_jax.models.encoder`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax

from rnr_jax.models.encoder import Attention, ConfigModule, Embeddings, Encoder, HFEncoderConfig


@dataclasses.dataclass(frozen=True)
class BertConfig(HFEncoderConfig):
  """Architecture of a BERT encoder; field names and defaults follow ``transformers.BertConfig``."""

  model_type: ClassVar[str] = "bert"
  architecture: ClassVar[str] = "BertModel"

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                       f"({self.num_attention_heads})")

  @classmethod
  def _check_supported(cls, d: Mapping[str, Any]) -> None:
    position_embedding_type = d.get("position_embedding_type", "absolute")
    if position_embedding_type != "absolute":
      raise ValueError(f"position_embedding_type={position_embedding_type!r} is not supported (only 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
      if d.get(flag, False):
        raise ValueError(f"{flag}=True is not supported: the encoder is bidirectional without cross-attention")


class BertEmbeddings(Embeddings):
  config: BertConfig

  def words(self, input_ids: jax.Array) -> jax.Array:
    return self.embed(self.config.vocab_size, self.config.hidden_size, "word_embeddings")(input_ids)


class BertLayer(ConfigModule):
  """One post-LN transformer layer: attention (+ residual, norm), then FFN (+ residual, norm)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool) -> jax.Array:
    dropout = self.config.hidden_dropout_prob
    x = self.child(Attention, "attention", output_dropout_rate=dropout)(x, x, x, x, mask, deterministic=deterministic)
    return self.feed_forward(x, dropout, deterministic=deterministic)


class BertEncoder(Encoder):
  """BERT encoder (``BertModel`` without pooler), with the activation named by ``hidden_act``. Its parameter paths
  (stable: sharding rules regex-match them) are listed in docs/design.md, "Encoder parameter paths"."""

  config: BertConfig
  embeddings_class: ClassVar[type[Embeddings]] = BertEmbeddings
  layer_class: ClassVar[type[ConfigModule]] = BertLayer
