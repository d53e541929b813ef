"""BERT encoder in Flax (linen), numerically equivalent to transformers' ``BertModel`` without its pooler.

Only BERT's config, embeddings and layer live here; the skeleton and the blocks are
in :mod:`rnr_jax.models.encoder`. Parameter paths are listed in :class:`BertEncoder`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax

from rnr_jax.models.encoder import ConfigModule, Embeddings, Encoder, HFEncoderConfig


@dataclasses.dataclass(frozen=True)
class BertConfig(HFEncoderConfig):
  """Architecture of a BERT encoder; field names and defaults follow ``transformers.BertConfig``."""

  model_type: ClassVar[str] = "bert"
  architecture: ClassVar[str] = "BertModel"

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads ({self.num_attention_heads})"
      )

  @classmethod
  def _check_supported(cls, d: Mapping[str, Any]) -> None:
    position_embedding_type = d.get("position_embedding_type", "absolute")
    if position_embedding_type != "absolute":
      raise ValueError(f"position_embedding_type={position_embedding_type!r} is not supported (only 'absolute')")
    for flag in ("is_decoder", "add_cross_attention"):
      if d.get(flag, False):
        raise ValueError(f"{flag}=True is not supported: the encoder is bidirectional without cross-attention")


class BertEmbeddings(Embeddings):
  """Word + absolute position + token type embeddings, LayerNorm, dropout."""

  config: BertConfig

  def words(self, input_ids: jax.Array) -> jax.Array:
    return self.embed(self.config.vocab_size, self.config.hidden_size, "word_embeddings")(input_ids)


class BertLayer(ConfigModule):
  """One post-LN transformer layer: attention (+ residual, norm), then FFN (+ residual, norm)."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool) -> jax.Array:
    c = self.config
    attention = self.attention(c.hidden_size // c.num_attention_heads, c.hidden_dropout_prob)
    attention_output = attention(x, x, x, x, mask, deterministic=deterministic)
    return self.feed_forward(attention_output, c.hidden_dropout_prob, deterministic=deterministic)


class BertEncoder(Encoder):
  """BERT encoder (``BertModel`` without pooler): word + absolute position + token type
  embeddings, post-LN transformer layers and the activation named by ``hidden_act``
  (exact erf GELU for ``"gelu"``).

  Parameter naming (stable; sharding rules may regex-match these paths). The tree
  mirrors the Hugging Face state dict with ``encoder.layer.{i}`` -> ``layer_{i}``,
  ``attention.self.{query,key,value}`` -> ``attention/{query,key,value}`` and
  ``LayerNorm`` -> ``layer_norm``; kernels are ``[in, out]`` (the transpose of
  ``torch.nn.Linear.weight``)::

      embeddings/word_embeddings/embedding          [vocab_size, hidden]
      embeddings/position_embeddings/embedding      [max_position_embeddings, hidden]
      embeddings/token_type_embeddings/embedding    [type_vocab_size, hidden]
      embeddings/layer_norm/{scale,bias}            [hidden]
      layer_{i}/attention/{query,key,value}/kernel  [hidden, hidden]  (+ bias [hidden])
      layer_{i}/attention/output/dense/kernel       [hidden, hidden]  (+ bias)
      layer_{i}/attention/output/layer_norm/{scale,bias}
      layer_{i}/intermediate/dense/kernel           [hidden, intermediate]  (+ bias)
      layer_{i}/output/dense/kernel                 [intermediate, hidden]  (+ bias)
      layer_{i}/output/layer_norm/{scale,bias}

  Attributes are those of :class:`~rnr_jax.models.encoder.Encoder`.
  """

  config: BertConfig
  embeddings_class: ClassVar[type[Embeddings]] = BertEmbeddings
  layer_class: ClassVar[type[ConfigModule]] = BertLayer
