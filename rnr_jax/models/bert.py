"""BERT encoder in Flax (linen), numerically equivalent to transformers' ``BertModel``.

The encoder covers what ``BertModel`` computes without its pooler: word + absolute
position + token type embeddings, post-LN transformer layers and the activation named
by ``hidden_act`` (exact erf GELU for ``"gelu"``). It returns the final hidden states
and the [CLS] vector (the first position).

The module also holds the building blocks MobileBERT reuses (:class:`Norm`,
:class:`Attention`, :class:`ResidualProjection`, :class:`Intermediate`) and the
shared :class:`EncoderOutput`.

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

Numerics: parameters are stored in ``param_dtype`` and matmuls run in ``dtype``
(e.g. bf16 compute with f32 params). Embedding sums, residual additions before a
norm, normalization statistics and the attention softmax are computed in float32
whatever ``dtype`` is.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

Dtype = Any  # anything jnp.dtype accepts (jnp.float32, jnp.bfloat16, "float32", ...)

_SQRT_2_OVER_PI = 0.7978845608028654


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


# Activations named like transformers' ``ACT2FN`` keys (the parameter-free ones).
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": _gelu_tanh,
  "gelu_fast": _gelu_tanh,
  "gelu_accurate": _gelu_tanh,
  "gelu_pytorch_tanh": _gelu_tanh,
  "gelu_python_tanh": _gelu_tanh,
  "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "relu": jax.nn.relu,
  "relu2": lambda x: jnp.square(jax.nn.relu(x)),
  "relu6": jax.nn.relu6,
  "leaky_relu": lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "hardswish": jax.nn.hard_swish,
  "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  "sigmoid": jax.nn.sigmoid,
  "tanh": jnp.tanh,
  "linear": lambda x: x,
}

NORM_TYPES = ("layer_norm", "no_norm")


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class HFEncoderConfig:
  """Base of the encoder configs: conversion from/to a transformers ``config.json`` dict.

  Subclasses are frozen dataclasses whose field names are the transformers config
  keys they use, and set ``model_type`` (the ``config.json`` ``model_type``) and
  ``architecture`` (the transformers class that loads the converted weights).
  """

  model_type: ClassVar[str]
  architecture: ClassVar[str]

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> Self:
    """Builds the config from a transformers config dict (e.g. a parsed ``config.json``).

    Keys the encoder does not use (``architectures``, ``id2label``, ``use_cache``...)
    are ignored; a ``model_type`` other than this class's raises ``ValueError``.
    """
    model_type = d.get("model_type", cls.model_type)
    if model_type != cls.model_type:
      raise ValueError(f"{cls.__name__} expects model_type={cls.model_type!r}, got {model_type!r}")
    cls._check_supported(d)
    names = {f.name for f in dataclasses.fields(cls)}
    ignored = sorted(set(d) - names - {"model_type"})
    if ignored:
      logger.debug("%s.from_hf_dict ignores keys %s", cls.__name__, ignored)
    return cls(**{k: d[k] for k in names if k in d})

  @classmethod
  def _check_supported(cls, d: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` for transformers settings this encoder does not implement."""

  def to_hf_dict(self) -> dict[str, Any]:
    """The transformers ``config.json`` dict (``model_type``, ``architectures`` and all fields)."""
    return {"model_type": self.model_type, "architectures": [self.architecture], **dataclasses.asdict(self)}

  def _validate_common(self) -> None:
    """Checks the fields every encoder config declares."""
    values = dataclasses.asdict(self)
    if values["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {values['hidden_act']!r}; supported: {sorted(ACTIVATIONS)}")
    for name in (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "intermediate_size",
      "max_position_embeddings",
      "type_vocab_size",
    ):
      if values[name] < 1:
        raise ValueError(f"{name} must be >= 1, got {values[name]}")


@dataclasses.dataclass(frozen=True)
class BertConfig(HFEncoderConfig):
  """Architecture of a BERT encoder; field names and defaults follow ``transformers.BertConfig``."""

  model_type: ClassVar[str] = "bert"
  architecture: ClassVar[str] = "BertModel"

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int | None = 0

  def __post_init__(self) -> None:
    self._validate_common()
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


# --------------------------------------------------------------------------- building blocks


class EncoderOutput(NamedTuple):
  """Encoder outputs: the final hidden states and the [CLS] (first position) vector."""

  sequence: jax.Array  # [batch, length, hidden]
  cls: jax.Array  # [batch, hidden]


def resolve_num_layers(num_hidden_layers: int, num_layers: int | None) -> int:
  """The number of layers an encoder keeps: all of them, or the first ``num_layers``."""
  if num_layers is None:
    return num_hidden_layers
  if not 1 <= num_layers <= num_hidden_layers:
    raise ValueError(f"num_layers must be in [1, {num_hidden_layers}], got {num_layers}")
  return num_layers


def prepare_inputs(
  input_ids: jax.Array,
  attention_mask: jax.Array | None,
  token_type_ids: jax.Array | None,
  max_position_embeddings: int,
) -> tuple[jax.Array | None, jax.Array]:
  """Validates shapes; returns the ``[B, 1, 1, L]`` boolean key mask (or None) and token types."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  length = input_ids.shape[1]
  if length > max_position_embeddings:
    raise ValueError(f"sequence length {length} exceeds max_position_embeddings={max_position_embeddings}")
  for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
    if x is not None and x.shape != input_ids.shape:
      raise ValueError(f"{name} shape {x.shape} differs from input_ids shape {input_ids.shape}")
  mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  return mask, token_type_ids


class Norm(nn.Module):
  """LayerNorm (``kind="layer_norm"``) or MobileBERT's NoNorm (``kind="no_norm"``: ``x * scale + bias``).

  Computed in float32 (biased variance, as ``torch.nn.LayerNorm``), returned in ``dtype``.
  """

  kind: str = "layer_norm"
  eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    x = x.astype(jnp.float32)
    if self.kind == "layer_norm":
      centered = x - jnp.mean(x, axis=-1, keepdims=True)
      variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
      x = centered * jax.lax.rsqrt(variance + self.eps)
    elif self.kind != "no_norm":
      raise ValueError(f"unknown normalization kind {self.kind!r}; expected one of {NORM_TYPES}")
    return (x * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class ResidualProjection(nn.Module):
  """``norm(dropout(dense(x)) + residual)`` with submodules ``dense`` and ``layer_norm``.

  The residual sum is formed in float32.
  """

  features: int
  init_std: float
  norm_kind: str = "layer_norm"
  eps: float = 1e-12
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool) -> jax.Array:
    y = nn.Dense(
      self.features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(self.init_std),
      name="dense",
    )(x)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = y.astype(jnp.float32) + residual.astype(jnp.float32)
    return Norm(self.norm_kind, self.eps, self.dtype, self.param_dtype, name="layer_norm")(y)


class Intermediate(nn.Module):
  """``activation(dense(x))`` with submodule ``dense``."""

  features: int
  activation: str
  init_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(
      self.features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(self.init_std),
      name="dense",
    )(x)
    return ACTIVATIONS[self.activation](y)


class Attention(nn.Module):
  """Multi-head self-attention followed by its :class:`ResidualProjection` (``output``).

  Query, key and value may come from different tensors (MobileBERT's bottlenecks);
  ``residual`` is added before the output norm. Submodules: ``query``, ``key``,
  ``value`` (each one ``[in, num_heads * head_dim]`` dense) and ``output``.
  """

  num_heads: int
  head_dim: int
  init_std: float
  attention_dropout_rate: float = 0.0
  output_dropout_rate: float = 0.0
  norm_kind: str = "layer_norm"
  eps: float = 1e-12
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    residual: jax.Array,
    mask: jax.Array | None,
    *,
    deterministic: bool,
  ) -> jax.Array:
    width = self.num_heads * self.head_dim

    def project(x: jax.Array, name: str) -> jax.Array:
      """``[B, L, in] -> [B, heads, L, head_dim]``."""
      y = nn.Dense(
        width,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.normal(self.init_std),
        name=name,
      )(x)
      return y.reshape(*y.shape[:-1], self.num_heads, self.head_dim).swapaxes(-2, -3)

    # Heads are moved in front of the sequence axis before the two batched matmuls:
    # XLA's CPU backend runs `bqnd,bknd->bnqk` einsums without that layout ~3x slower
    # at 256 tokens (bench/bench_encoder.py).
    q = project(query, "query") * jnp.asarray(self.head_dim**-0.5, self.dtype)
    k = project(key, "key")
    v = project(value, "value")
    logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=deterministic)
    context = jnp.matmul(probs.astype(v.dtype), v).swapaxes(-2, -3)
    context = context.reshape(*context.shape[:-2], width)
    return ResidualProjection(
      residual.shape[-1],
      self.init_std,
      self.norm_kind,
      self.eps,
      self.output_dropout_rate,
      self.dtype,
      self.param_dtype,
      name="output",
    )(context, residual, deterministic=deterministic)


# --------------------------------------------------------------------------- BERT


class BertEmbeddings(nn.Module):
  """Word + absolute position + token type embeddings, LayerNorm, dropout."""

  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *, deterministic: bool) -> jax.Array:
    c = self.config

    def embed(num: int, name: str) -> nn.Embed:
      return nn.Embed(
        num,
        c.hidden_size,
        dtype=self.param_dtype,
        param_dtype=self.param_dtype,
        embedding_init=nn.initializers.normal(c.initializer_range),
        name=name,
      )

    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (
      embed(c.vocab_size, "word_embeddings")(input_ids).astype(jnp.float32)
      + embed(c.max_position_embeddings, "position_embeddings")(positions).astype(jnp.float32)
      + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids).astype(jnp.float32)
    )
    x = Norm("layer_norm", c.layer_norm_eps, self.dtype, self.param_dtype, name="layer_norm")(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertLayer(nn.Module):
  """One post-LN transformer layer: attention (+ residual, norm), then FFN (+ residual, norm)."""

  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, *, deterministic: bool) -> jax.Array:
    c = self.config
    attention_output = Attention(
      num_heads=c.num_attention_heads,
      head_dim=c.hidden_size // c.num_attention_heads,
      init_std=c.initializer_range,
      attention_dropout_rate=c.attention_probs_dropout_prob,
      output_dropout_rate=c.hidden_dropout_prob,
      eps=c.layer_norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attention",
    )(x, x, x, x, mask, deterministic=deterministic)
    h = Intermediate(
      c.intermediate_size, c.hidden_act, c.initializer_range, self.dtype, self.param_dtype, name="intermediate"
    )(attention_output)
    return ResidualProjection(
      c.hidden_size,
      c.initializer_range,
      eps=c.layer_norm_eps,
      dropout_rate=c.hidden_dropout_prob,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="output",
    )(h, attention_output, deterministic=deterministic)


class BertEncoder(nn.Module):
  """BERT encoder (``BertModel`` without pooler).

  Attributes:
    config: the architecture.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); outputs are in this dtype.
    param_dtype: parameter dtype.
    num_layers: keep only the first ``num_layers`` layers (``None``: all of them).
  """

  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  num_layers: int | None = None

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> EncoderOutput:
    """Encodes ``input_ids`` ``[B, L]``; ``attention_mask`` is 1 for real tokens, 0 for padding.

    With ``deterministic=False`` dropout is active and needs ``rngs={"dropout": key}``.
    """
    c = self.config
    mask, token_type_ids = prepare_inputs(input_ids, attention_mask, token_type_ids, c.max_position_embeddings)
    x = BertEmbeddings(c, self.dtype, self.param_dtype, name="embeddings")(
      input_ids, token_type_ids, deterministic=deterministic
    )
    for i in range(resolve_num_layers(c.num_hidden_layers, self.num_layers)):
      x = BertLayer(c, self.dtype, self.param_dtype, name=f"layer_{i}")(x, mask, deterministic=deterministic)
    return EncoderOutput(sequence=x, cls=x[:, 0])
